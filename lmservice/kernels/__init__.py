"""Kernels of lmservice: Triton kernels and their torch references, pure functions on tensors."""

from lmservice.kernels.ops import TORCH_OPS, KernelOps, auto_cpu_backend, load_ops

__all__ = ["TORCH_OPS", "KernelOps", "auto_cpu_backend", "load_ops"]
