"""TRITON_OPS is a drop-in KernelOps: every field, same parameters as TORCH_OPS."""

from __future__ import annotations

import dataclasses
import inspect

from lmservice.kernels import TORCH_OPS, load_ops


def test_triton_ops_mirror_torch_ops():
    triton_ops = load_ops("triton")
    assert triton_ops.name == "triton"
    for field in dataclasses.fields(TORCH_OPS):
        if not callable(getattr(TORCH_OPS, field.name)):  # name, gelu_adds_bias: data, not kernels
            continue
        ref = list(inspect.signature(getattr(TORCH_OPS, field.name)).parameters)
        fast = list(inspect.signature(getattr(triton_ops, field.name)).parameters)
        assert fast[: len(ref)] == ref, field.name
        assert all(inspect.signature(getattr(triton_ops, field.name)).parameters[p].default is not inspect.Parameter.empty
                   for p in fast[len(ref):]), f"{field.name}: extra parameters must be optional"
