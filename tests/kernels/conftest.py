"""Kernel tests run the Triton kernels on the CPU through the Triton interpreter.

NOTE: @triton.jit picks interpreter or compiler when a kernel module is imported,
so TRITON_INTERPRET is set here, before any kernels.triton_* import; a kernel module
that an earlier test directory imported without it is dropped and re-imported.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
for _name in [m for m in sys.modules if m.startswith("kernels.triton_")]:
    del sys.modules[_name]

import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def poison_allocations(monkeypatch):
    """Every float tensor from torch.empty/empty_like starts as NaN, so an output
    element (or partial-result slot) a kernel forgets to write fails the comparison."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poisoned(t: torch.Tensor) -> torch.Tensor:
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poisoned(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poisoned(real_empty_like(*a, **k)))


@pytest.fixture
def gen(request) -> torch.Generator:
    """Fresh random inputs per test case, reproducible from its id."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
