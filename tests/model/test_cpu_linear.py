"""fp32 projections through oneDNN (lmservice/model/cpu_linear.py) against F.linear, and how `auto` chooses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmservice.kernels import TORCH_CPU_KERNELS, CpuKernels
from lmservice.kernels.cpu_native import native_library
from lmservice.model import cpu_linear
from lmservice.model.cpu_linear import OneDNNLinear, resolve_linear_backend
from lmservice.model.loader import ModelConfigError, load_model
from tests.helpers import make_gpt2_dir

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(not cpu_linear.onednn_available(), reason="this torch build has no oneDNN")


@pytest.mark.parametrize(("rows", "in_features", "out_features"),
                         [(1, 768, 2304), (3, 64, 1000), (4, 96, 50), (5, 64, 1000), (32, 96, 96)])
def test_onednn_linear_matches_f_linear(rows, in_features, out_features):
    g = torch.Generator().manual_seed(rows)
    linear = nn.Linear(in_features, out_features)
    x = torch.randn(rows, in_features, generator=g)
    fast = OneDNNLinear(linear)
    with torch.inference_mode():
        torch.testing.assert_close(fast(x), F.linear(x, linear.weight, linear.bias), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fast(x, with_bias=False), F.linear(x, linear.weight), atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(fast(x.view(1, rows, in_features)), F.linear(x, linear.weight, linear.bias)[None],
                                   atol=1e-4, rtol=1e-5)


def test_few_rows_go_to_the_native_kernel(monkeypatch):
    """With the native policy: up to linear_f32_rows rows the C linear, more oneDNN (each path made to fail in
    turn); with torch's (the default until the engine hands one over) never the C linear."""
    lib = native_library()
    if lib is None:
        pytest.skip("no native kernels built for this CPU: every call goes to oneDNN")
    kernels = CpuKernels.using(lib)
    layer = nn.Linear(64, 48)
    fast = OneDNNLinear(layer, kernels)

    def refuse(*_):
        raise AssertionError("wrong path")

    x = torch.randn(8, 64)
    monkeypatch.setattr(cpu_linear, "linear_onednn", refuse)
    for rows in range(1, kernels.linear_f32_rows + 1):
        fast(x[:rows])
    monkeypatch.undo()
    monkeypatch.setattr(lib, "linear_f32", refuse)
    fast(x[: kernels.linear_f32_rows + 1])
    OneDNNLinear(layer)(x[:1])
    fast.use_cpu_kernels(TORCH_CPU_KERNELS)
    fast(x[:1])


def test_swapped_model_shares_its_weights(tmp_path):
    """The LM head stays tied to wte and no tensor is copied: same storage before and after the swap."""
    model_dir = make_gpt2_dir(tmp_path / "m", vocab_size=300, n_positions=64, n_embd=32, n_layer=2, n_head=2)
    loaded = load_model(model_dir, "cpu", "float32", linear_backend="onednn")
    model = loaded.model
    assert isinstance(model.lm_head, OneDNNLinear) and isinstance(model.transformer.h[1].mlp.c_fc, OneDNNLinear)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    plain = load_model(model_dir, "cpu", "float32", linear_backend="torch").model
    assert isinstance(plain.lm_head, nn.Linear)
    assert model.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize(("machine", "expected"), [("x86_64", "onednn"), ("AMD64", "onednn"), ("aarch64", "torch")])
def test_auto_picks_onednn_on_x86(monkeypatch, machine, expected):
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: machine)
    assert resolve_linear_backend("auto", CPU, torch.float32, "none") == expected
    assert resolve_linear_backend("onednn", CPU, torch.float32, "none") == "onednn"  # asked for: always
    assert resolve_linear_backend("torch", CPU, torch.float32, "none") == "torch"


def test_only_fp32_cpu_projections_change(monkeypatch):
    monkeypatch.setattr(cpu_linear.platform, "machine", lambda: "x86_64")
    assert resolve_linear_backend("onednn", CPU, torch.bfloat16, "none") == "torch"  # F.linear is oneDNN already
    assert resolve_linear_backend("onednn", CPU, torch.float32, "int8") == "torch"  # int8 has its own modules
    assert resolve_linear_backend("auto", torch.device("cuda"), torch.float32, "none") == "torch"


def test_unknown_backend_is_a_config_error(tmp_path):
    model_dir = make_gpt2_dir(tmp_path / "m", vocab_size=300, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    with pytest.raises(ModelConfigError, match="linear backend 'mkl' is not one of auto, torch, onednn"):
        load_model(model_dir, "cpu", "float32", linear_backend="mkl")
