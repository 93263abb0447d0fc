"""Checkpoint loading: formats, heads, dtypes, and errors that name the file and the field."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.sampling_params import SamplingParams
from lmservice.model.config import ModelConfigError
from lmservice.model.loader import load_model
from tests.helpers import make_gpt2_dir, run_to_completion


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_gpt2_dir(tmp_path_factory.mktemp("loader") / "m", seed=5)


def _hf_logits(model_dir, ids):
    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(model_dir).eval()(torch.tensor([ids])).logits[0, -1]


def _our_logprobs(model_dir, ids, dtype="float32"):
    engine = Engine(load_model(model_dir, "cpu", dtype), EngineConfig.from_fields(num_kv_blocks=32))
    r = run_to_completion(engine, [("a", ids, SamplingParams(temperature=0, max_tokens=1, logprobs=5))])["a"]
    return r["logprobs"][0][0]


def test_sharded_safetensors_and_pytorch_bin_load_the_same(model_dir, tmp_path):
    tensors = load_file(str(model_dir / "model.safetensors"))
    names = sorted(tensors)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (sharded / f.name).write_bytes(f.read_bytes())
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, str(sharded / fname))
    weight_map = {k: fname for fname, keys in halves.items() for k in keys}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for f in model_dir.iterdir():
        if f.name != "model.safetensors":
            (legacy / f.name).write_bytes(f.read_bytes())
    torch.save({k.removeprefix("transformer."): v for k, v in tensors.items()}, legacy / "pytorch_model.bin")

    ids = [5, 17, 99, 3]
    expected = torch.log_softmax(_hf_logits(model_dir, ids), -1)
    for d in (model_dir, sharded, legacy):
        lp = _our_logprobs(d, ids)
        assert lp.token_id == int(expected.argmax())
        assert lp.logprob == pytest.approx(expected.max().item(), abs=1e-4)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_dtypes_run(model_dir, dtype):
    lp = _our_logprobs(model_dir, [1, 2, 3], dtype)
    expected = torch.log_softmax(_hf_logits(model_dir, [1, 2, 3]), -1)
    assert lp.logprob == pytest.approx(expected[lp.token_id].item(), abs=0.1)


def test_sequence_classification_checkpoint_classifies(tmp_path):
    d = make_gpt2_dir(tmp_path / "cls", seed=6, classifier_labels=["neg", "pos"])
    loaded = load_model(d, "cpu", "float32")
    assert loaded.card.task == "classify" and loaded.card.labels == ["neg", "pos"]
    engine = Engine(loaded, EngineConfig.from_fields(num_kv_blocks=32))
    ids = [4, 8, 15, 16, 23, 42]
    r = run_to_completion(engine, [("c", ids, SamplingParams(), None, "classify")])["c"]
    with torch.no_grad():
        ref = torch.softmax(GPT2ForSequenceClassification.from_pretrained(d).eval()(torch.tensor([ids])).logits[0], -1)
    assert r["scores"] == pytest.approx(ref.tolist(), abs=1e-5)


def _edit_config(model_dir, tmp_path, name="edited", **changes):
    d = tmp_path / name
    d.mkdir()
    for f in model_dir.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("changes, field", [
    (dict(model_type="llama"), "model_type"),
    (dict(architectures=["LlamaForCausalLM"]), "architectures"),
    (dict(n_head=5), "n_embd"),
    (dict(activation_function="swish"), "activation_function"),
    (dict(n_layer=0), "n_layer"),
])
def test_unsupported_config_names_file_and_field(model_dir, tmp_path, changes, field):
    d = _edit_config(model_dir, tmp_path, **changes)
    with pytest.raises(ModelConfigError, match=f"config.json: field `{field}`"):
        load_model(d, "cpu")


def test_tensor_shape_mismatch_names_file_and_tensor(model_dir, tmp_path):
    d = _edit_config(model_dir, tmp_path, n_positions=64)
    with pytest.raises(ModelConfigError, match=r"model.safetensors: tensor `transformer.wpe.weight` has shape \(128, 64\)"):
        load_model(d, "cpu")
    d2 = _edit_config(model_dir, tmp_path, "deeper", n_layer=3)
    with pytest.raises(ModelConfigError, match="no tensor `transformer.h.2"):
        load_model(d2, "cpu")


def test_missing_pieces(tmp_path, model_dir):
    with pytest.raises(ModelConfigError, match="model directory not found"):
        load_model(tmp_path / "nope", "cpu")
    d = _edit_config(model_dir, tmp_path, tie_word_embeddings=False)
    with pytest.raises(ModelConfigError, match="no `lm_head.weight`"):
        load_model(d, "cpu")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelConfigError, match="no weights found"):
        load_model(d, "cpu")


@pytest.mark.parametrize("flags, expected", [({"avx2", "fma"}, torch.float32), ({"avx512f", "amx_bf16"}, torch.bfloat16),
                                             ({"avx512_bf16"}, torch.float32), (set(), torch.float32)])
def test_auto_dtype_on_a_cpu_follows_its_bf16_hardware(monkeypatch, flags, expected):
    import lmservice.model.cpu as cpu
    from lmservice.model.loader import resolve_dtype

    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    assert resolve_dtype("auto", torch.device("cpu")) == expected
    assert resolve_dtype("float32", torch.device("cpu")) == torch.float32  # an explicit dtype is never changed
