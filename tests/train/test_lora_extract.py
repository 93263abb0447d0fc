"""--lora-extract: train the target projections in full, save their change as a LoRA adapter (truncated SVD).

References: the fully trained model's own logits (a full-rank extraction must reproduce them through
PEFT) and torch's SVD truncation (a low-rank one must fold to exactly the best rank-r change).
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

from lmservice.model.card import ModelCard
from lmservice.train.modeling import extract_lora, freeze_for_extraction
from tests.train.test_lora_parity import fold_lora

TARGETS = ["c_attn", "c_proj", "c_fc"]


def _perturbed(base_dir, cls=GPT2LMHeadModel, targets=TARGETS, **kwargs):
    """A model whose target projection (or embedding) weights and score head moved away from the base's."""
    torch.manual_seed(1)
    model = cls.from_pretrained(base_dir, **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if (parts[-2] in targets and parts[-1] == "weight") or parts[0] == "score":
                p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("targets", [TARGETS, [*TARGETS, "wte"]], ids=["projections", "with-embeddings"])
def test_full_rank_extraction_reproduces_the_trained_model(base_dir, targets):
    trained = _perturbed(base_dir, GPT2ForSequenceClassification, targets, num_labels=3, pad_token_id=0)
    base = GPT2ForSequenceClassification.from_pretrained(base_dir, config=trained.config)
    adapter = extract_lora(trained, base, r=32, alpha=16.0, targets=targets, modules_to_save=["score"],
                           task_type="SEQ_CLS")  # n_embd 32: every change has rank <= 32
    plain = GPT2ForSequenceClassification.from_pretrained(base_dir, config=trained.config)
    plain.score.load_state_dict(trained.score.state_dict())  # the same head on the base's own projections
    ids = torch.randint(1, trained.config.vocab_size, (3, 10))
    with torch.no_grad():
        want, got, plain = trained(input_ids=ids).logits, adapter(input_ids=ids).logits, plain(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(plain, want, atol=1e-2)  # the adapter, not the base, carries the change


def test_low_rank_extraction_is_the_truncated_svd_and_reloads(base_dir, tmp_path):
    trained = _perturbed(base_dir)
    base = GPT2LMHeadModel.from_pretrained(base_dir)
    adapter = extract_lora(trained, base, r=4, alpha=8.0, targets=["c_attn"], modules_to_save=[],
                           task_type="CAUSAL_LM")
    adapter.save_pretrained(tmp_path / "a")
    folded = GPT2LMHeadModel.from_pretrained(base_dir)
    assert fold_lora(folded, tmp_path / "a") == 2  # what the server reads: alpha/r * B @ A from the files
    fresh = dict(GPT2LMHeadModel.from_pretrained(base_dir).named_parameters())
    for name, p in folded.named_parameters():
        if name.endswith("attn.c_attn.weight"):
            delta = dict(trained.named_parameters())[name] - fresh[name]
            u, s, vh = torch.linalg.svd(delta.T, full_matrices=False)
            best = (u[:, :4] * s[:4]) @ vh[:4]
            assert torch.allclose((p - fresh[name]).T, best, atol=1e-5)
            assert not torch.allclose(best, delta.T, atol=1e-3)  # rank 4 < the change's rank: truncated
        else:
            assert torch.equal(p, fresh[name]), name  # c_proj / c_fc were not targets: untouched
    reloaded = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(base_dir), tmp_path / "a")
    ids = torch.randint(1, base.config.vocab_size, (2, 8))
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, folded(input_ids=ids).logits, atol=1e-4)


def test_freeze_leaves_only_what_an_adapter_carries(base_dir):
    model = GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=2, pad_token_id=0)
    freeze_for_extraction(model, TARGETS, ["score"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "score.weight" in trainable and "transformer.h.0.mlp.c_fc.weight" in trainable
    assert not any(n.endswith(".bias") or "wte" in n or "wpe" in n or "ln_" in n for n in trainable), trainable
    assert len(trainable) == 1 + 4 * model.config.n_layer


def test_classify_job_measures_and_saves_the_extracted_adapter(train, base_dir, data_dir, tmp_path):
    from transformers import AutoTokenizer

    from tests.train.conftest import sentiment_rows

    held = sentiment_rows(40, seed=3)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in held))
    out = tmp_path / "sent"
    assert train("classify", "--base", base_dir, "--train", data_dir / "sentiment.tsv", "--eval",
                 tmp_path / "dev.tsv", "--text-column", "sentence", "--labels", "neg", "pos", "--lora",
                 "--lora-extract", "--lora-r", "4", "--lora-targets", *TARGETS, "--max-steps", "6", "--lr", "3e-3",
                 "--output", out) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and "score" in config["modules_to_save"]
    card = ModelCard.load(out)
    assert card.hyperparameters["lora_extract"] is True
    # The card's figures are the saved adapter's, not the fully trained model's: re-measure them through PEFT
    # on the same rows. The eval loss (5 equal batches of 8, so the mean over rows) tells the two apart.
    tok = AutoTokenizer.from_pretrained(base_dir)
    base = GPT2ForSequenceClassification.from_pretrained(base_dir, num_labels=2, pad_token_id=tok.eos_token_id)
    model = PeftModel.from_pretrained(base, out).eval()
    targets = torch.tensor([["neg", "pos"].index(y) for _, y in held])
    with torch.no_grad():
        logits = torch.cat([model(input_ids=tok(t, return_tensors="pt")["input_ids"]).logits for t, _ in held])
    loss = torch.nn.functional.cross_entropy(logits, targets).item()
    accuracy = (logits.argmax(-1) == targets).float().mean().item()
    assert abs(card.metrics["eval_loss"] - loss) < 1e-4, (card.metrics["eval_loss"], loss)
    assert abs(card.metrics["accuracy"] - accuracy) < 1e-4, (card.metrics["accuracy"], accuracy)
