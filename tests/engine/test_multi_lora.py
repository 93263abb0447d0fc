"""Multi-LoRA serving through the engine, against transformers + PEFT."""

from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.sampling_params import SamplingParams
from lmservice.model.loader import load_model
from lmservice.serving.adapters import AdapterPathError
from lmservice.serving.bootstrap import serving_for
from tests.helpers import make_gpt2_dir, prompts, run_to_completion, submit

ADAPTERS = {  # name: (rank, alpha, targets, rslora)
    "attn-r4": (4, 8, ["c_attn"], False),
    "all-r8": (8, 16, ["c_attn", "c_proj", "c_fc", "wte"], False),  # token embeddings adapted too
    "mlp-r2-rslora": (2, 4, ["c_fc", "mlp.c_proj", "wpe"], True),  # and position embeddings
}
NEW = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def make_adapter(base_dir, out_dir, rank, alpha, targets, rslora, seed, classifier=False):
    """A PEFT LoRA adapter on transformers' GPT-2 with random (non-zero) A and B."""
    torch.manual_seed(seed)
    cls = GPT2ForSequenceClassification if classifier else GPT2LMHeadModel
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, fan_in_fan_out=True, use_rslora=rslora,
                     modules_to_save=["score"] if classifier else None,
                     task_type="SEQ_CLS" if classifier else "CAUSAL_LM")
    peft_model = get_peft_model(cls.from_pretrained(base_dir), cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name or "lora_embedding" in name:
                p.normal_(0.0, 0.3)  # PEFT starts B at zero: make the adapter change the output
            elif "modules_to_save" in name:
                p.normal_(0.0, 0.5)
    peft_model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = make_gpt2_dir(root / "base", seed=4, n_embd=64, n_layer=2, n_head=4)
    adapters_dir = root / "adapters"
    dirs = {name: make_adapter(base, adapters_dir / name, *spec, seed=i) for i, (name, spec) in enumerate(ADAPTERS.items())}
    return base, adapters_dir, dirs


def reference(base, adapter_dir, prompt):
    model = GPT2LMHeadModel.from_pretrained(base).eval()
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def engine_with(base, dirs, **kwargs):
    engine = Engine(load_model(base, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=256, **kwargs))
    for name, path in dirs.items():
        engine.add_adapter(name, path)
    return engine


@pytest.mark.parametrize("max_loras, backend", [(8, "torch"), (2, "torch"), (8, "triton")])
def test_mixed_adapters_in_one_batch_match_peft(lora_setup, max_loras, backend):
    """The triton row runs the SGMV/BGMV kernels (and the attention kernels) in the interpreter."""
    base, _, dirs = lora_setup
    engine = engine_with(base, dirs, max_loras=max_loras, attention_backend=backend)
    names = [None, *dirs]
    requests = [(f"r{i}", p, GREEDY, names[i % len(names)]) for i, p in enumerate(prompts(8, 1000, 3, 20, seed=8))]
    widest = 0
    step = engine.step

    def watched_step():
        nonlocal widest
        out = step()
        widest = max(widest, len({s.adapter for s in engine.scheduler.running if s.adapter}))
        return out

    engine.step = watched_step
    results = run_to_completion(engine, requests)
    assert 1 < widest <= max_loras  # adapters really shared batches, never more than max_loras of them
    for rid, p, _, name in requests:
        assert results[rid]["tokens"][0] == reference(base, dirs.get(name), p), f"{rid} adapter={name}"
    assert engine.pool.num_used_blocks == 0
    if max_loras == 2:
        assert len(engine.adapters.resident_names()) == 2  # swapped LRU through 2 device slots


def test_same_prompt_under_two_adapters_keeps_own_kv(lora_setup):
    base, _, dirs = lora_setup
    engine = engine_with(base, dirs)
    prompt = list(range(1, 40))  # several full blocks: a shared cache would be hit
    first = run_to_completion(engine, [("a", prompt, GREEDY, "attn-r4")])
    second = run_to_completion(engine, [("b", prompt, GREEDY, "all-r8"), ("c", prompt, GREEDY, None)])
    again = run_to_completion(engine, [("d", prompt, GREEDY, "attn-r4")])
    assert first["a"]["tokens"][0] == reference(base, dirs["attn-r4"], prompt)
    assert second["b"]["tokens"][0] == reference(base, dirs["all-r8"], prompt)
    assert second["c"]["tokens"][0] == reference(base, None, prompt)
    assert again["d"]["tokens"][0] == first["a"]["tokens"][0]
    assert again["d"]["events"][0].num_cached_tokens > 0  # hit its own adapter's blocks only


def test_classify_through_adapter_matches_peft(tmp_path):
    base = make_gpt2_dir(tmp_path / "cls-base", seed=4, classifier_labels=["neg", "pos", "mixed"])
    adapter = make_adapter(base, tmp_path / "sentiment", 4, 8, ["c_attn", "c_fc", "wte"], False, 9, classifier=True)
    (adapter / "lmservice.json").write_text(json.dumps({"task": "classify", "labels": ["neg", "pos", "mixed"]}))
    lm_base = tmp_path / "lm-base"  # serve it on the LM checkpoint of the same transformer weights
    shutil.copytree(base, lm_base)
    cfg = json.loads((lm_base / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (lm_base / "config.json").write_text(json.dumps(cfg))
    engine = Engine(load_model(lm_base, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=64))
    _, card = engine.add_adapter("sentiment", adapter)
    assert card.labels == ["neg", "pos", "mixed"]
    peft_model = PeftModel.from_pretrained(GPT2ForSequenceClassification.from_pretrained(base), adapter).eval()
    texts = prompts(4, 1000, 2, 25, seed=11)
    requests = [(f"c{i}", t, SamplingParams(), "sentiment", "classify") for i, t in enumerate(texts)]
    requests.append(("gen", texts[0], GREEDY, None))  # generation shares the batches
    results = run_to_completion(engine, requests)
    for i, t in enumerate(texts):
        with torch.no_grad():
            expected = torch.softmax(peft_model(torch.tensor([t])).logits[0], -1).tolist()
        assert results[f"c{i}"]["scores"] == pytest.approx(expected, abs=1e-4)
    assert len(results["gen"]["tokens"][0]) == NEW


def test_adapters_added_and_removed_while_serving(lora_setup):
    base, adapters_dir, dirs = lora_setup
    broken = adapters_dir / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text("{not json")

    async def scenario():
        serving = serving_for(Engine(load_model(base, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=128)),
                              {"attn-r4": dirs["attn-r4"]}, adapters_dir)
        engine, models = serving.engine, serving.models
        engine.start()
        try:
            slow = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
            stream = submit(serving, "inflight", [1, 2, 3], slow, model="attn-r4")
            await models.remove_adapter("attn-r4")  # in flight: keeps its adapter until it ends
            assert "attn-r4" not in [m.name for m in models.models()]
            with pytest.raises(KeyError):
                submit(serving, "late", [1, 2, 3], GREEDY, model="attn-r4")
            tokens = [t async for out in stream for c in out.outputs for t in c.token_ids]
            ref = reference(base, dirs["attn-r4"], [1, 2, 3])
            assert tokens[:NEW] == ref

            entry = await models.add_adapter("published", "all-r8")
            assert entry.parent == "base" and list(entry.tasks) == ["generate", "embed"]
            stream = submit(serving, "new", [4, 5, 6], GREEDY, model="published")
            tokens = [t async for out in stream for c in out.outputs for t in c.token_ids]
            assert tokens == reference(base, dirs["all-r8"], [4, 5, 6])

            for bad in ("../base", "/etc", "all-r8/../../base"):
                with pytest.raises(AdapterPathError):
                    await models.add_adapter("x", bad)
            with pytest.raises(AdapterPathError):
                await models.add_adapter("../evil", "all-r8")
            with pytest.raises(ValueError, match="adapter_config.json"):
                await models.add_adapter("broken", "broken")
            assert [m.name for m in models.models()] == ["base", "published"]
            assert engine.stats().num_kv_blocks_used == 0
        finally:
            await engine.shutdown()

    asyncio.run(scenario())
