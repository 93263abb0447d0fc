"""The kernel set the model runs on, chosen once at start-up."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from lmservice.kernels.activation import bias_gelu_torch
from lmservice.kernels.attention import decode_attention_torch, plan_decode_torch, prefill_attention_torch
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


def auto_cpu_backend(dtype: torch.dtype) -> str:
    """The CPU kernel set for a model of `dtype`: native for float32 where the C library builds, else torch."""
    if dtype != torch.float32:
        return "torch"
    from lmservice.kernels.cpu_native import native_library  # noqa: PLC0415 (builds it on first use)

    return "native" if native_library() is not None else "torch"


def load_ops(backend: str) -> KernelOps:
    """`torch`, `native` (torch's set with the C decode attention of lmservice/kernels/cpu_native.py: CPU, fp32) or
    `triton`; the Triton set and the native library are loaded only when asked for."""
    if backend == "torch":
        return TORCH_OPS
    if backend == "native":
        from lmservice.kernels.cpu_native import decode_attention_native, native_library, plan_decode_native  # noqa: PLC0415

        if native_library() is None:
            raise RuntimeError("the native CPU kernels could not be built (no C compiler?): use attention_backend torch")
        return replace(TORCH_OPS, name="native", decode_attention=decode_attention_native,
                       plan_decode=plan_decode_native)
    if backend == "triton":
        from lmservice.kernels.triton_ops import TRITON_OPS  # noqa: PLC0415 (triton is optional)

        return TRITON_OPS
    raise ValueError(f"unknown attention backend {backend!r} (expected torch, native or triton)")
