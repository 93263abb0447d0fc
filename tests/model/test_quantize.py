"""--quantization int8 and int4 (lmservice/model/quantize.py): the kernels against their own dequantized
references, the quantized models against fp32, and what load_model refuses."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.sampling_params import SamplingParams
from lmservice.kernels import TORCH_CPU_KERNELS, CpuKernels
from lmservice.kernels.cpu_native import native_library
from lmservice.model.config import ModelConfigError
from lmservice.model.loader import load_model
from lmservice.model.quantize import BlockLinear, Int8Linear
from tests.helpers import make_gpt2_dir, prompts, run_to_completion

_LIB = native_library()
KERNELS = ["torch", pytest.param("native", marks=pytest.mark.skipif(
    _LIB is None or not _LIB.has_int8, reason="no native int8 kernel on this CPU (it needs AVX2)"))]


@pytest.mark.parametrize("rows, in_features, out_features", [(1, 64, 192), (7, 256, 64), (32, 96, 1000), (48, 80, 300)])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kernels", KERNELS)
def test_int8_linear_matches_its_dequantized_reference(rows, in_features, out_features, with_bias, kernels):
    """With the native policy, up to its linear_int8_rows rows (32 here, whatever the CPU's policy says, so that
    AVX2's kernel is checked too) the C kernel, past it FBGEMM; with torch's always FBGEMM: each against the
    reference that quantizes the input its way."""
    g = torch.Generator().manual_seed(rows + in_features)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    weight[3] *= 20  # per-channel scales: one loud row must not cost the others their precision
    bias = torch.randn(out_features, generator=g)
    native = replace(CpuKernels.using(_LIB), linear_int8_rows=32) if kernels == "native" else TORCH_CPU_KERNELS
    layer = Int8Linear(weight, bias, native)
    assert (layer.native_rows > 0) == (kernels == "native")
    x = torch.randn(rows, in_features, generator=g)
    out, ref = layer(x, with_bias=with_bias), layer.reference(x, with_bias=with_bias)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    # The kernel's own activation rounding may differ from the reference's by one level on a few inputs.
    step = (max(x.max().item(), 0) - min(x.min().item(), 0)) / (127 if layer.reduce_range else 255)
    bound = 2 * step * (layer.weight_int8.float().abs() * layer.scales[:, None]).sum(dim=1).max().item()
    assert (out - ref).abs().max().item() <= bound
    # and both are close to the fp32 layer: the weights' error is at most half a level per channel
    exact = F.linear(x, weight, bias if with_bias else None)
    assert torch.nn.functional.cosine_similarity(out.flatten(), exact.flatten(), dim=0) > 0.999
    quantized = layer.weight_int8.float() * layer.scales[:, None]
    assert ((quantized - weight).abs() <= layer.scales[:, None] / 2 + 1e-7).all()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpt2_dir(tmp_path_factory.mktemp("quant") / "model", seed=7, vocab_size=1000, n_embd=128,
                         n_layer=2, n_head=4)


def test_quantized_model_is_close_to_fp32_and_every_projection_is_int8(model_dir):
    fp32 = load_model(model_dir, "cpu", "float32")
    int8 = load_model(model_dir, "cpu", "auto", quantization="int8")
    blocks = int8.model.transformer.h
    assert all(isinstance(m, Int8Linear) for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    assert isinstance(int8.model.lm_head, Int8Linear) and int8.dtype == torch.float32
    batch = prompts(6, 1000, 4, 40, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=0)
    results = {}
    for name, loaded in (("fp32", fp32), ("int8", int8)):
        engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=128))
        out = run_to_completion(engine, [(str(i), p, params) for i, p in enumerate(batch)])
        results[name] = torch.tensor([lp.logprob for i in range(len(batch))
                                      for lp in out[str(i)]["events"][-1].prompt_logprobs if lp])
    # the log-likelihood of every prompt token under int8 stays within a few hundredths of fp32's
    assert (results["int8"] - results["fp32"]).abs().max() < 0.05
    assert abs(results["int8"].mean() - results["fp32"].mean()) < 0.005


def test_int8_serves_greedy_requests_to_their_end(model_dir):
    engine = Engine(load_model(model_dir, "cpu", "float32", quantization="int8"), EngineConfig.from_fields(num_kv_blocks=64))
    out = run_to_completion(engine, [("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))])
    assert len(out["a"]["tokens"][0]) == 8 and engine.pool.num_used_blocks == 0


def test_what_int8_cannot_go_with_is_refused(model_dir):
    for quantization in ("int8", "int4"):
        with pytest.raises(ModelConfigError, match=f"--quantization {quantization} computes in float32"):
            load_model(model_dir, "cpu", "bfloat16", quantization=quantization)
    with pytest.raises(ModelConfigError, match="not one of"):
        load_model(model_dir, "cpu", "float32", quantization="int3")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("kernels", KERNELS)
def test_block_linear_matches_its_dequantized_reference(bits, rows, kernels):
    """The C kernel at any row count (native policy) or the dequantized torch path (torch policy: exactly the
    reference), with and without bias; both close to the fp32 layer."""
    g = torch.Generator().manual_seed(rows + bits)
    weight, bias = torch.randn(200, 96, generator=g) * 0.05, torch.randn(200, generator=g)
    layer = BlockLinear(weight, bias, bits, CpuKernels.using(_LIB) if kernels == "native" else TORCH_CPU_KERNELS)
    x = torch.randn(rows, 96, generator=g)
    for with_bias in (True, False):
        out, ref = layer(x, with_bias=with_bias), layer.reference(x, with_bias=with_bias)
        assert out.shape == (rows, 200) and out.dtype == torch.float32
        if kernels == "torch":
            assert torch.equal(out, ref)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    exact = F.linear(x, weight, bias)
    assert F.cosine_similarity(out.flatten(), (exact - bias).flatten(), dim=0) > (0.999 if bits == 8 else 0.99)


def test_int4_model_is_close_to_fp32_and_serves_to_the_end(model_dir):
    """Every projection in 4-bit blocks, the LM head int8; each prompt token's log-likelihood near fp32's."""
    loaded = load_model(model_dir, "cpu", "float32", quantization="int4")
    blocks = loaded.model.transformer.h
    assert all(isinstance(m, BlockLinear) and m.bits == 4
               for b in blocks for m in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj))
    assert isinstance(loaded.model.lm_head, Int8Linear)
    batch = prompts(6, 1000, 4, 40, seed=3)
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=0)
    results = {}
    for name, model in (("fp32", load_model(model_dir, "cpu", "float32")), ("int4", loaded)):
        engine = Engine(model, EngineConfig.from_fields(num_kv_blocks=128))
        out = run_to_completion(engine, [(str(i), p, params) for i, p in enumerate(batch)])
        results[name] = torch.tensor([lp.logprob for i in range(len(batch))
                                      for lp in out[str(i)]["events"][-1].prompt_logprobs if lp])
    assert abs(results["int4"].mean() - results["fp32"].mean()) < 0.05, (results["int4"] - results["fp32"]).abs().max()
    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=64))
    out = run_to_completion(engine, [("a", [1, 2, 3], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))])
    assert len(out["a"]["tokens"][0]) == 8 and engine.pool.num_used_blocks == 0


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_lora_adds_its_delta_to_quantized_projections(model_dir, tmp_path, quantization):
    """A LoRA adapter on a quantized model: each prompt token's log-likelihood near fp32-with-adapter's, and far
    from the quantized model's own without it (the negative control: the delta really is added)."""
    from tests.engine.test_multi_lora import make_adapter

    adapter = make_adapter(model_dir, tmp_path / "adapter", 4, 8, ["c_attn", "c_proj", "c_fc"], False, seed=3)
    batch = prompts(4, 1000, 8, 30, seed=5)
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=0)
    results = {}
    for name, q in (("fp32", "none"), ("quantized", quantization)):
        engine = Engine(load_model(model_dir, "cpu", "float32", quantization=q), EngineConfig.from_fields(num_kv_blocks=128))
        engine.add_adapter("a", adapter)
        for with_adapter in (True, False):
            out = run_to_completion(engine, [(str(i), p, params, "a" if with_adapter else None) for i, p in enumerate(batch)])
            results[name, with_adapter] = torch.tensor([lp.logprob for i in range(len(batch))
                                                        for lp in out[str(i)]["events"][-1].prompt_logprobs if lp])
    near = (results["quantized", True] - results["fp32", True]).abs().mean()
    moved = (results["quantized", True] - results["quantized", False]).abs().mean()
    assert near < 0.05 and moved > 10 * near, (near, moved)
