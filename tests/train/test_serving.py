"""Round trip: what the jobs write, lmservice's engine loads and serves, with transformers/PEFT's outputs.

A tiny base from the pretrain job, a translate adapter and a classify adapter from the LoRA jobs:
the engine's greedy tokens equal PEFT's generate (fp32), its classify scores equal the softmax of
PEFT's GPT2ForSequenceClassification logits (1e-4), and it reads the cards the jobs wrote.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

from lmservice.engine.engine import Engine, EngineConfig
from lmservice.engine.sampling_params import SamplingParams
from lmservice.model.card import ModelCard
from lmservice.model.loader import load_model
from lmservice.train.cli import main
from tests.helpers import run_to_completion

NEW = 8
FLAGS = ["--batch-size", "8", "--no-progress", "--threads", "1", "--save-steps", "100"]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, tokenizer_dir, data_dir):
    root = tmp_path_factory.mktemp("serving")
    base, translate, sentiment = root / "base", root / "translate", root / "sentiment"
    assert main(["pretrain", "--tokenizer", str(tokenizer_dir), "--train", str(data_dir / "text.txt"),
                 "--sample-by", "line", "--preset", "tiny", "--n-embd", "32", "--n-positions", "64",
                 "--max-steps", "10", "--lr", "1e-2", "--output", str(base), *FLAGS]) == 0
    assert main(["translate", "--base", str(base), "--train", str(data_dir / "pairs.jsonl"), "--lora",
                 "--lora-targets", "c_attn", "c_proj", "c_fc", "--max-steps", "6", "--lr", "1e-2",
                 "--max-eval-examples", "4", "--max-new-tokens", "4", "--output", str(translate), *FLAGS]) == 0
    assert main(["classify", "--base", str(base), "--train", str(data_dir / "sentiment.tsv"),
                 "--text-column", "sentence", "--labels", "neg", "pos", "--label-names", "negative", "positive",
                 "--lora", "--lora-targets", "c_attn", "c_fc", "--max-steps", "6", "--lr", "1e-2",
                 "--output", str(sentiment), *FLAGS]) == 0
    return base, translate, sentiment


def _peft_greedy(base, adapter, prompt_ids, eos_id) -> list[int]:
    model = GPT2LMHeadModel.from_pretrained(base).eval()
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    ids = torch.tensor([prompt_ids])  # (1, T)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                             do_sample=False, eos_token_id=eos_id, pad_token_id=eos_id)
    return out[0, len(prompt_ids):].tolist()


def _strip_eos(ids: list[int], eos_id: int) -> list[int]:
    return ids[: ids.index(eos_id)] if eos_id in ids else ids


def test_engine_serves_pretrained_base_and_translate_adapter_like_peft(artifacts):
    base, translate, _ = artifacts
    tok = AutoTokenizer.from_pretrained(base)
    engine = Engine(load_model(base, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=64))
    _, card = engine.add_adapter("translate", translate)
    assert card == ModelCard.load(translate) and card.task == "translate"
    prompts = [card.render_translation_prompt(s) for s in ["a dog is here.", "two men is here.", "the cat"]]
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=NEW)
    requests = [(f"t{i}", p, params, "translate") for i, p in enumerate(ids)]
    requests += [(f"b{i}", p, params, None) for i, p in enumerate(ids)]  # the base in the same batches
    results = run_to_completion(engine, requests)
    eos = tok.eos_token_id
    assert sum(len(_strip_eos(r["tokens"][0], eos)) for r in results.values()) > 0, "something was generated"
    for i, p in enumerate(ids):
        assert _strip_eos(results[f"t{i}"]["tokens"][0], eos) == _strip_eos(_peft_greedy(base, translate, p, eos), eos)
        assert _strip_eos(results[f"b{i}"]["tokens"][0], eos) == _strip_eos(_peft_greedy(base, None, p, eos), eos)


def test_engine_classifies_with_the_trained_score_head_like_peft(artifacts):
    base, _, sentiment = artifacts
    tok = AutoTokenizer.from_pretrained(base)
    engine = Engine(load_model(base, "cpu", "float32"), EngineConfig.from_fields(num_kv_blocks=64))
    _, card = engine.add_adapter("sentiment", sentiment)
    assert card.task == "classify" and card.labels == ["negative", "positive"]
    peft_model = PeftModel.from_pretrained(GPT2ForSequenceClassification.from_pretrained(base, num_labels=2),
                                           sentiment).eval()
    texts = ["the film is lovely and the park", "the film is awful and a red ball", "dull"]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    results = run_to_completion(engine, [(f"c{i}", p, SamplingParams(), "sentiment", "classify")
                                         for i, p in enumerate(ids)])
    for i, p in enumerate(ids):
        with torch.no_grad():
            expected = torch.softmax(peft_model(input_ids=torch.tensor([p])).logits[0], -1).tolist()  # (2,)
        assert results[f"c{i}"]["scores"] == pytest.approx(expected, abs=1e-4)
