"""What this CPU can do, read once from /proc/cpuinfo (the processor differs between machines: AMD with
AVX2 only, Intel with AVX-512, VNNI and AMX). Off Linux the set is empty and every choice made from it
falls back to the safe one (fp32, 7-bit activations for int8)."""

from __future__ import annotations

import functools
from pathlib import Path

# bf16 matmul tiles in hardware (AMX). avx512_bf16 alone (dot-product instructions, e.g. AMD Zen 4) is not
# counted: bf16 has not been measured faster than fp32 on such a CPU yet.
BF16_FLAGS = frozenset({"amx_bf16"})


@functools.cache
def _cpuinfo_field(name: str) -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        if line.split(":", 1)[0].strip() == name:
            return line.split(":", 1)[1].strip()
    return ""


def cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo_field("flags").split())


def cpu_vendor() -> str:
    """GenuineIntel, AuthenticAMD, ... ("" where unknown)."""
    return _cpuinfo_field("vendor_id")


def has_bf16_matmul() -> bool:
    return bool(BF16_FLAGS & cpu_flags())
