"""Kernels of lmservice: Triton kernels and their torch references, the native CPU kernels, pure functions on
tensors."""

from lmservice.kernels.cpu_policy import TORCH_CPU_KERNELS, CpuKernels
from lmservice.kernels.ops import TORCH_OPS, KernelOps, choose_kernels, load_ops, native_ops

__all__ = ["TORCH_CPU_KERNELS", "TORCH_OPS", "CpuKernels", "KernelOps", "choose_kernels", "load_ops", "native_ops"]
