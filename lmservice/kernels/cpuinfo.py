"""What this CPU is, read once from /proc/cpuinfo: the native kernels' variant choice
(lmservice/kernels/cpu_native.py) and the service's dtype and int8 choices (lmservice/model/cpu.py) read the same
flags. Off Linux every field is "" and the flag set is empty.

`LMSERVICE_CPU_ISA` caps the instruction set everything here sees, as if the CPU had nothing past that
level: `x86-64`, `x86-64-v2`, `x86-64-v3` (AVX2, no AVX-512 and no VNNI), `x86-64-v4` (AVX-512, no VNNI)
or `x86-64-v4-vnni` (no AMX). It is read here and nowhere else, so that the kernel variant, the int8
activation range and the bf16 default all follow it: an AVX-512 machine runs the AVX2 paths with
LMSERVICE_CPU_ISA=x86-64-v3 (tests/kernels/test_cpu_isa.py). The service's own Settings never see it: the
kernels know nothing of the service.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ISA_ENV = "LMSERVICE_CPU_ISA"
ISA_LEVELS = ("x86-64", "x86-64-v2", "x86-64-v3", "x86-64-v4", "x86-64-v4-vnni")  # each adds to the one before
_V2 = frozenset({"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"})
_V3 = frozenset({"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"})


@functools.cache
def cpuinfo_field(name: str) -> str:
    """The first processor's `name` field ("" where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def _level(flag: str) -> int:
    """The index in ISA_LEVELS of the first level that has `flag`; past the last for AMX."""
    if flag.startswith("amx"):
        return len(ISA_LEVELS)
    if "vnni" in flag:
        return ISA_LEVELS.index("x86-64-v4-vnni")
    if flag.startswith(("avx512", "avx10")) or (flag.startswith("avx") and flag not in _V3):
        return ISA_LEVELS.index("x86-64-v4")
    if flag in _V3:
        return ISA_LEVELS.index("x86-64-v3")
    return ISA_LEVELS.index("x86-64-v2") if flag in _V2 else 0


def isa_cap() -> str | None:
    """The level LMSERVICE_CPU_ISA caps the CPU at (None: no cap). An unknown value is a ValueError."""
    cap = os.environ.get(ISA_ENV, "").strip()
    if not cap:
        return None
    if cap not in ISA_LEVELS:
        raise ValueError(f"{ISA_ENV}={cap!r} is not one of {', '.join(ISA_LEVELS)}")
    return cap


def cpu_flags() -> frozenset[str]:
    """The CPU's flags, less those past LMSERVICE_CPU_ISA's level."""
    flags = frozenset(cpuinfo_field("flags").split())
    cap = isa_cap()
    if cap is None:
        return flags
    top = ISA_LEVELS.index(cap)
    return frozenset(f for f in flags if _level(f) <= top)
