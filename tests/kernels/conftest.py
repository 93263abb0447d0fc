"""Kernel tests run the Triton kernels on the CPU through the Triton interpreter.

NOTE: @triton.jit picks interpreter or compiler when the decorated module is imported,
so TRITON_INTERPRET is set here, before the tests import any kernel module.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
for _name in [m for m in sys.modules if m.startswith("lmservice.kernels.triton_")]:
    del sys.modules[_name]  # decorated for the compiler by an earlier import: import afresh


def _reinterpret_triton_language() -> None:
    """NOTE: triton.language's own helpers (tl.sum's combine, tl.sigmoid, tl.cdiv, ...) are
    @triton.jit functions, decorated when triton is first imported. transformers and peft
    import triton when they load, and test directories collected before this one import
    them, so those helpers were built for the compiler and the interpreter refuses to call
    them. Triton cannot be imported twice (its extension aborts), so wrap them in place.
    A no-op when triton is imported after TRITON_INTERPRET is set (the better fix: set it
    in a top-level tests/conftest.py)."""
    if "triton" not in sys.modules:
        return
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    wrapped: dict[int, InterpretedFunction] = {}
    for name, module in list(sys.modules.items()):
        if not name.startswith("triton.language") or module is None:
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                setattr(module, attr, wrapped.setdefault(id(value), InterpretedFunction(value.fn)))


_reinterpret_triton_language()

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
