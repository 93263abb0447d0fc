"""The kernel set the model runs on, chosen once at start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lmservice.kernels.activation import bias_gelu_torch
from lmservice.kernels.attention import decode_attention_torch, plan_decode_torch, prefill_attention_torch
from lmservice.kernels.cpu_native import NativeLibrary, plan_decode_native
from lmservice.kernels.cpu_policy import CpuKernels, choose_cpu_kernels
from lmservice.kernels.kv_cache import write_kv_cache_torch
from lmservice.kernels.lora import add_lora_torch
from lmservice.kernels.norm import add_layer_norm_torch


@dataclass(frozen=True)
class KernelOps:
    """One implementation of every kernel the model needs; all share signatures."""

    name: str
    write_kv_cache: Callable
    prefill_attention: Callable
    decode_attention: Callable
    # Once per step, before the layers: what decode_attention needs beyond seq_lens and block tables
    # (torch: the gather indices and mask; Triton: nothing, its kernel reads the tables in place).
    plan_decode: Callable
    add_layer_norm: Callable
    bias_gelu: Callable
    add_lora: Callable = add_lora_torch  # y += per-token LoRA delta (lmservice/kernels/lora.py)
    # True: c_fc's bias is added inside bias_gelu (one fused kernel). False: it goes in the matmul
    # (addmm's epilogue), which on CPU is faster than a bias-less mm then an add (2.5x at 8 rows).
    gelu_adds_bias: bool = True


TORCH_OPS = KernelOps(
    name="torch",
    write_kv_cache=write_kv_cache_torch,
    prefill_attention=prefill_attention_torch,
    decode_attention=decode_attention_torch,
    plan_decode=plan_decode_torch,
    add_layer_norm=add_layer_norm_torch,
    bias_gelu=bias_gelu_torch,
    add_lora=add_lora_torch,
    gelu_adds_bias=False,
)


def native_ops(library: NativeLibrary) -> KernelOps:
    """torch's set with the C decode attention of `library` (CPU, fp32 or bf16 queries), which reads the paged cache
    in place (any KV-cache format)."""
    return replace(TORCH_OPS, name="native", decode_attention=library.decode_attention, plan_decode=plan_decode_native)


def load_ops(backend: str) -> KernelOps:
    """`torch` or `triton` (the Triton set is imported only when asked for). The native set comes with the
    CPU-kernel policy: choose_kernels."""
    if backend == "torch":
        return TORCH_OPS
    if backend == "triton":
        from lmservice.kernels.triton_ops import TRITON_OPS  # here: triton is optional

        return TRITON_OPS
    raise ValueError(f"unknown kernel set {backend!r} (expected torch or triton)")


def choose_kernels(attention_backend: str, cpu_kernels: str, device: torch.device,
                   dtype: torch.dtype) -> tuple[KernelOps, CpuKernels]:
    """The kernel set and the CPU-kernel policy of a model on `device` in `dtype`, decided together, once.

    `cpu_kernels` (auto | native | torch, lmservice/kernels/cpu_policy.py) decides whether C code runs on a
    CPU; `attention_backend` picks Triton or the CPU set: auto is Triton on CUDA; `native` is a second
    spelling of cpu_kernels native and `torch` one of cpu_kernels torch (torch asked for: no C code at
    all). Contradicting values are a ValueError."""
    implied = {"native": "native", "torch": "torch", "triton": "torch"}.get(attention_backend)
    if implied is not None and cpu_kernels not in ("auto", implied):
        raise ValueError(f"attention_backend {attention_backend} contradicts cpu_kernels {cpu_kernels}")
    if attention_backend == "triton" or (attention_backend == "auto" and device.type == "cuda"):
        return load_ops("triton"), choose_cpu_kernels(implied or cpu_kernels, device, dtype)
    if attention_backend not in ("auto", "native", "torch"):
        raise ValueError(f"unknown attention backend {attention_backend!r} (expected auto, torch, native or triton)")
    policy = choose_cpu_kernels(implied or cpu_kernels, device, dtype)
    return (TORCH_OPS if policy.library is None else native_ops(policy.library)), policy
