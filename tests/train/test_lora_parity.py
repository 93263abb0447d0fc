"""A trained adapter, loaded by PEFT onto transformers' GPT-2, gives the logits of an independent reference:
the base weights with W + (alpha/r) * B @ A folded in by hand from adapter_model.safetensors (fp32, 1e-4).

The reference reads only the adapter's files, so it checks what the server will read, not PEFT's internals.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel


def fold_lora(model: torch.nn.Module, adapter_dir) -> int:
    """Add (alpha/r) * B @ A to every targeted Conv1D weight of `model`, in place; copy saved modules.

    Conv1D stores its weight as (in, out), LoRA's A as (r, in) and B as (out, r),
    so the update to the Conv1D weight is (B @ A).T. Returns the number of folded layers.
    """
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    params = dict(model.named_parameters())
    folded = 0
    with torch.no_grad():
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            b = tensors[key.replace(".lora_A.", ".lora_B.")]  # (out, r)
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            delta = (b @ a).T  # (in, out), like Conv1D.weight
            assert delta.abs().max() > 0, "training moved B away from its zero init"
            params[module + ".weight"] += scale * delta
            folded += 1
        for key, value in tensors.items():
            if "lora_" not in key:  # modules_to_save (the score head) are stored whole
                params[key.removeprefix("base_model.model.")].copy_(value)
    return folded


def _input_ids(base_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    return torch.tensor([tok("the film is lovely and a big tree")["input_ids"]])  # (1, T)


@pytest.mark.parametrize("targets", [["c_attn"], ["c_attn", "c_proj", "c_fc"]])
def test_lm_adapter_logits_equal_folded_reference(train, base_dir, data_dir, tmp_path, targets):
    out = tmp_path / "adapter"
    assert train("translate", "--base", base_dir, "--train", data_dir / "pairs.jsonl", "--lora",
                 "--lora-targets", *targets, "--lora-r", "4", "--lora-alpha", "8", "--max-steps", "3",
                 "--lr", "1e-2", "--max-eval-examples", "2", "--max-new-tokens", "2", "--output", out) == 0
    ids = _input_ids(base_dir)
    peft_model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), out).eval()
    reference = GPT2LMHeadModel.from_pretrained(base_dir).eval()
    assert fold_lora(reference, out) == 2 * len(targets) + (2 if "c_proj" in targets else 0)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits  # (1, T, V)
        want = reference(input_ids=ids).logits  # (1, T, V)
        base = GPT2LMHeadModel.from_pretrained(base_dir).eval()(input_ids=ids).logits
    assert not torch.allclose(got, base, atol=1e-4), "the adapter changes the output"
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_classify_adapter_logits_equal_folded_reference(train, base_dir, data_dir, tmp_path):
    out = tmp_path / "cls"
    assert train("classify", "--base", base_dir, "--train", data_dir / "sentiment.tsv", "--text-column", "sentence",
                 "--lora", "--lora-targets", "c_attn", "c_fc", "--max-steps", "3", "--lr", "1e-2",
                 "--output", out) == 0
    ids = _input_ids(base_dir)
    base = GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, out).eval()
    reference = GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=2).eval()
    fold_lora(reference, out)
    with torch.no_grad():
        got = peft_model(input_ids=ids).logits  # (1, num_labels)
        want = reference(input_ids=ids).logits  # (1, num_labels)
        # The head alone, by hand: last token's final hidden state @ score.weight.T
        hidden = reference.transformer(input_ids=ids).last_hidden_state[:, -1]  # (1, C)
        by_hand = hidden @ reference.score.weight.T  # (1, num_labels)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, by_hand, atol=1e-4, rtol=0)
