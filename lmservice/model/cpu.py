"""What this CPU can do, read once from /proc/cpuinfo (the processor differs between machines: AMD with
AVX2 only, Intel with AVX-512, VNNI and AMX). The flags are lmservice/kernels/cpuinfo.py's, capped as the
kernels' are by LMSERVICE_CPU_ISA, so the model's choices and the kernel variant always agree. Off Linux
the set is empty and every choice made from it falls back to the safe one (fp32, 7-bit activations for
int8)."""

from __future__ import annotations

from lmservice.kernels.cpuinfo import cpu_flags

# bf16 matmul tiles in hardware (AMX). avx512_bf16 alone (dot-product instructions, e.g. AMD Zen 4) is not
# counted: bf16 has not been measured faster than fp32 on such a CPU yet.
BF16_FLAGS = frozenset({"amx_bf16"})
__all__ = ["BF16_FLAGS", "cpu_flags", "has_bf16_matmul"]


def has_bf16_matmul() -> bool:
    return bool(BF16_FLAGS & cpu_flags())
