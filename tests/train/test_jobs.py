"""Tiny end-to-end runs of every job: each writes a complete artifact that transformers/PEFT load as is."""

from __future__ import annotations

import json
import math

import torch
from peft import PeftModel
from transformers import AutoTokenizer, GPT2ForSequenceClassification, GPT2LMHeadModel

from lmservice.model.card import ModelCard
from lmservice.train.artifact import CURVES_FILE, work_dir_for


def _assert_artifact(out, files):
    names = {p.name for p in out.iterdir()}
    assert set(files) | {"lmservice.json", CURVES_FILE} <= names, names
    assert not work_dir_for(out).exists(), "checkpoints are removed after success"
    assert [p.name for p in out.parent.iterdir() if ".tmp-" in p.name] == [], "no temp dir left behind"
    png = (out / CURVES_FILE).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    return ModelCard.load(out)


def test_tokenizer_job_round_trips_text(train, data_dir, tmp_path):
    out = tmp_path / "tok"
    assert train("tokenizer", "--train", data_dir / "text.txt", data_dir / "pairs.de", "--vocab-size", "300",
                 "--output", out) == 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 300 and tok.eos_token == "<|endoftext|>" and tok.eos_token_id == 0
    for text in ["a dog runs in the park.", "ein kleines Mädchen ist hier. ß €", "unseen: qxz 🙂"]:
        assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: nothing is unknown


def test_pretrain_writes_a_gpt2_checkpoint(train, tokenizer_dir, data_dir, tmp_path):
    out = tmp_path / "base"
    assert train("pretrain", "--tokenizer", tokenizer_dir, "--train", data_dir / "text.txt", "--preset", "tiny",
                 "--n-embd", "32", "--n-positions", "32", "--max-steps", "6", "--output", out) == 0
    card = _assert_artifact(out, {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"})
    model = GPT2LMHeadModel.from_pretrained(out)
    assert (model.config.n_layer, model.config.n_embd, model.config.n_positions) == (2, 32, 32)
    assert card.task == "generate" and card.metrics["train_steps"] == 6
    assert card.metrics["perplexity"] == round(math.exp(card.metrics["eval_loss"]), 3)
    assert card.hyperparameters["max_steps"] == 6


def test_lm_full_on_text(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "lm"
    assert train("lm", "--base", base_dir, "--train", data_dir / "text.txt", "--max-length", "32",
                 "--sample-by", "line", "--max-steps", "4", "--output", out) == 0
    card = _assert_artifact(out, {"config.json", "model.safetensors", "tokenizer.json"})
    assert card.base_model == str(base_dir) and card.data["format"] == "text" and "perplexity" in card.metrics
    GPT2LMHeadModel.from_pretrained(out)


def test_lm_lora_on_prompt_completion(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "lm-lora"
    assert train("lm", "--base", base_dir, "--train", data_dir / "prompts.jsonl", "--lora",
                 "--lora-targets", "c_attn", "c_fc", "--max-steps", "4", "--lr", "1e-2", "--output", out) == 0
    card = _assert_artifact(out, {"adapter_config.json", "adapter_model.safetensors"})
    assert card.data["format"] == "prompt_completion"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base_dir)
    assert set(config["target_modules"]) == {"c_attn", "c_fc"}
    PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), out)


def test_classify_lora_carries_its_score_head(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "cls"
    assert train("classify", "--base", base_dir, "--train", data_dir / "sentiment.tsv", "--text-column", "sentence",
                 "--labels", "neg", "pos", "--label-names", "negative", "positive", "--lora",
                 "--max-steps", "4", "--output", out) == 0
    card = _assert_artifact(out, {"adapter_config.json", "adapter_model.safetensors"})
    assert card.task == "classify" and card.labels == ["negative", "positive"]
    assert 0.0 <= card.metrics["accuracy"] <= 1.0 and 0.0 <= card.metrics["macro_f1"] <= 1.0
    from safetensors.torch import load_file

    keys = load_file(out / "adapter_model.safetensors").keys()
    assert any(k.endswith("score.weight") for k in keys), keys


def test_classify_full_saves_labels_in_config(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "cls-full"
    assert train("classify", "--base", base_dir, "--train", data_dir / "sentiment.tsv", "--text-column", "sentence",
                 "--max-steps", "2", "--output", out) == 0
    _assert_artifact(out, {"config.json", "model.safetensors", "tokenizer.json"})
    model = GPT2ForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "neg", 1: "pos"}  # sorted values when --labels is not given


def test_translate_lora_from_parallel_files(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "tr"
    assert train("translate", "--base", base_dir, "--train-src", data_dir / "pairs.en", "--train-tgt",
                 data_dir / "pairs.de", "--lora", "--max-steps", "4", "--max-eval-examples", "8",
                 "--max-new-tokens", "8", "--output", out) == 0
    card = _assert_artifact(out, {"adapter_config.json", "adapter_model.safetensors"})
    assert card.task == "translate" and card.prompt_template == "English: {text}\nGerman:"
    assert (card.languages.source, card.languages.target) == ("en", "de")
    assert {"bleu", "chrf", "eval_loss"} <= card.metrics.keys() and card.metrics["num_eval_pairs"] == 8


def test_translate_example_layout_is_prompt_then_target_then_eos(base_dir):
    """Training text == template.replace("{text}", src) + " " + tgt + EOS, loss on the target part only."""
    from datasets import Dataset

    from lmservice.train.examples import IGNORE_INDEX, encode_prompt_completion

    tok = AutoTokenizer.from_pretrained(base_dir)
    ds = Dataset.from_dict({"src": ["a dog is here."], "tgt": ["ein Hund ist hier."]})
    template = "English: {text}\nGerman:"
    row = encode_prompt_completion(ds, tok, lambda r: template.replace("{text}", r["src"]),
                                   lambda r: " " + r["tgt"], max_length=64)[0]
    prompt_ids = tok("English: a dog is here.\nGerman:", add_special_tokens=False)["input_ids"]
    target_ids = tok(" ein Hund ist hier.", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == prompt_ids + target_ids + [tok.eos_token_id]
    assert row["labels"] == [IGNORE_INDEX] * len(prompt_ids) + target_ids + [tok.eos_token_id]


def test_translate_from_jsonl_with_full_weights(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "tr-full"
    assert train("translate", "--base", base_dir, "--train", data_dir / "pairs.jsonl", "--max-steps", "2",
                 "--max-eval-examples", "4", "--max-new-tokens", "4", "--prompt-template", "{text} =>",
                 "--output", out) == 0
    card = _assert_artifact(out, {"config.json", "model.safetensors"})
    assert card.prompt_template == "{text} =>"
    assert torch.isfinite(torch.tensor(card.metrics["eval_loss"]))


def test_artifact_is_readable_by_other_users(train, tokenizer_dir, data_dir, tmp_path):
    """mkdtemp's 0700 must not leak into the artifact: a server in a container runs as another user."""
    import os
    import stat

    out = tmp_path / "perm"
    assert train("pretrain", "--tokenizer", tokenizer_dir, "--train", data_dir / "text.txt", "--preset", "tiny",
                 "--n-embd", "32", "--n-positions", "32", "--max-steps", "1", "--output", out) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_label_smoothing_reaches_the_trainer_loss_with_shifted_labels(base_dir, tmp_path):
    """--label-smoothing on a LoRA causal LM: Trainer's loss == torch's smoothed cross-entropy of the
    next-token predictions (labels shifted by one, prompt positions ignored)."""
    import argparse

    import torch.nn.functional as F
    from transformers import Trainer

    from lmservice.train.examples import IGNORE_INDEX
    from lmservice.train.modeling import apply_lora
    from lmservice.train.options import add_base_arguments, add_training_arguments, training_arguments

    p = argparse.ArgumentParser()
    add_base_arguments(p)
    add_training_arguments(p, lr=1e-3)
    args = p.parse_args(["--base", str(base_dir), "--output", str(tmp_path / "o"), "--label-smoothing", "0.1"])
    torch.manual_seed(0)
    model = apply_lora(GPT2LMHeadModel.from_pretrained(base_dir), 4, 8.0, 0.0, ["c_attn"], task_type="CAUSAL_LM")
    trainer = Trainer(model=model, args=training_arguments(args, tmp_path / "w", has_eval=False))
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX
    loss = trainer.compute_loss(model, {"input_ids": ids, "labels": labels.clone()})
    logits = model(input_ids=ids).logits
    flat = logits[:, :-1].reshape(-1, logits.shape[-1])
    expected = F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX, label_smoothing=0.1)
    unsmoothed = F.cross_entropy(flat, labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert torch.allclose(loss, expected, atol=1e-5), (loss, expected)
    assert not torch.allclose(loss, unsmoothed, atol=1e-3)
