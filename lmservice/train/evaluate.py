"""End-of-job evaluation on the held-out split: classification scores and translation quality.

Perplexity needs nothing here: it is exp(eval_loss) from the Trainer's own
evaluation. Translation is scored on greedy generations made with transformers'
`generate` (the server's greedy decoding is tested token-for-token against it).
"""

from __future__ import annotations

from collections.abc import Sequence

import sacrebleu
import torch
from transformers import PreTrainedTokenizerBase


def classification_metrics(predictions: Sequence[int], references: Sequence[int], num_labels: int) -> dict:
    """accuracy and macro-F1 (mean over classes of per-class F1; a class never predicted nor present counts 0)."""
    assert len(predictions) == len(references) and len(references) > 0
    pred = torch.as_tensor(predictions)
    ref = torch.as_tensor(references)
    f1s = []
    for c in range(num_labels):
        tp = ((pred == c) & (ref == c)).sum().item()
        fp = ((pred == c) & (ref != c)).sum().item()
        fn = ((pred != c) & (ref == c)).sum().item()
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return {"accuracy": round((pred == ref).float().mean().item(), 5), "macro_f1": round(sum(f1s) / num_labels, 5)}


@torch.no_grad()
def predict_labels(model: torch.nn.Module, batches: Sequence[dict[str, torch.Tensor]]) -> list[int]:
    """argmax label of each example; `batches` come from the job's PadCollator."""
    out: list[int] = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, L)
        out.extend(logits.argmax(-1).tolist())
    return out


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str],
                    max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuation of each prompt up to EOS (EOS and what follows it dropped).

    Prompts are left-padded within a batch; the attention mask keeps padding out
    of every real token's context, and generate derives positions from it.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts[start : start + batch_size]]
        longest = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), longest), eos, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros_like(input_ids)  # (B, T)
        for i, ids in enumerate(chunk):
            input_ids[i, longest - len(ids) :] = torch.as_tensor(ids)
            attention_mask[i, longest - len(ids) :] = 1
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                   max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                                   pad_token_id=eos)  # (B, T + new)
        for row in generated[:, longest:].tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append(tokenizer.decode(row).strip())
    return out


def translation_metrics(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """sacrebleu corpus BLEU (default 13a tokenization) and chrF, with their signatures."""
    bleu, chrf = sacrebleu.metrics.BLEU(), sacrebleu.metrics.CHRF()
    refs = [list(references)]
    return {
        "bleu": round(bleu.corpus_score(list(hypotheses), refs).score, 2),
        "chrf": round(chrf.corpus_score(list(hypotheses), refs).score, 2),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
