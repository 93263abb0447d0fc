"""What this CPU is, read once from /proc/cpuinfo: the native kernels' build key and prebuilt-variant choice
(lmservice/kernels/cpu_native.py) and the service's dtype and int8 choices (lmservice/model/cpu.py) read the same
fields. Off Linux every field is "" and the flag set is empty."""

from __future__ import annotations

import functools
from pathlib import Path


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


def cpu_flags() -> frozenset[str]:
    return frozenset(cpuinfo_field("flags").split())
