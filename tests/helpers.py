"""Shared by every test package: small random-weight GPT-2 checkpoints built offline (no hub), and
running requests through an engine (synchronously, or through the serving layer as the API does)."""

from __future__ import annotations

from pathlib import Path

import torch

EOS = "<|endoftext|>"


def build_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer with exactly `vocab_size` ids: the 256 byte symbols, then
    two-symbol merges, then EOS as the last id, so every id the model can emit decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    assert vocab_size > len(alphabet), "vocab_size must exceed the 256 byte symbols"
    # printable ASCII first so that merges cover common English pairs
    order = sorted(alphabet, key=lambda ch: (not ch.isalnum(), ch))
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    merges = []
    for a in order:
        for b in order:
            if len(vocab) >= vocab_size - 1:
                break
            if a + b not in vocab:
                vocab[a + b] = len(vocab)
                merges.append((a, b))
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, unk_token=EOS)


def make_gpt2_dir(path: Path, seed: int = 0, classifier_labels: list[str] | None = None,
                  eos: bool = False, **config_kwargs) -> Path:
    """Save a random GPT2LMHeadModel (or GPT2ForSequenceClassification) + tokenizer into `path`.

    eos=False leaves eos_token_id out of config.json so transformers' generate never
    stops early (the engine is given ignore_eos in parity tests)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification, GPT2LMHeadModel

    defaults = dict(vocab_size=1000, n_positions=128, n_embd=64, n_layer=2, n_head=4)
    defaults.update(config_kwargs)
    config = GPT2Config(**defaults)
    vocab_size = config.vocab_size
    if not eos:
        config.eos_token_id = None
        config.bos_token_id = None
    torch.manual_seed(seed)
    if classifier_labels:
        config.num_labels = len(classifier_labels)
        config.id2label = dict(enumerate(classifier_labels))
        config.label2id = {v: k for k, v in config.id2label.items()}
        config.pad_token_id = vocab_size - 1
        model = GPT2ForSequenceClassification(config)
    else:
        model = GPT2LMHeadModel(config)
    model.eval().save_pretrained(path)
    build_tokenizer(vocab_size).save_pretrained(path)
    return Path(path)


def prompts(num: int, vocab_size: int, min_len: int = 1, max_len: int = 40, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(min_len, max_len + 1, (num,), generator=g).tolist()
    return [torch.randint(0, vocab_size - 1, (n,), generator=g).tolist() for n in lens]


def submit(serving, request_id: str, prompt_token_ids: list[int], params, model: str | None = None,
           task: str = "generate"):
    """One request the way the API sends it: resolve the model, validate, admit; its RequestStream."""
    entry = serving.models.resolve(model, task)
    request = serving.engine.validator.check(request_id, prompt_token_ids, params, task=task, adapter=entry.adapter)
    return serving.engine.add_requests([request])[0]


def run_to_completion(engine, requests: list[tuple], stagger: int = 0) -> dict[str, dict]:
    """Add (request_id, prompt_ids, params[, adapter[, task]]) requests — `stagger` of them per step after the
    first batch when stagger > 0 — and step until idle. Returns per request id: tokens per
    index, text per index, logprobs per index, finish reasons, and the raw events."""
    results: dict[str, dict] = {}
    pending = list(requests)

    def add(n: int) -> None:
        for _ in range(min(n, len(pending))):
            rid, ids, params, *rest = pending.pop(0)
            adapter, task = (list(rest) + [None, "generate"][len(rest):])[:2]
            engine.submit(rid, ids, params, adapter=adapter, task=task)
            results[rid] = {"tokens": {}, "text": {}, "logprobs": {}, "finish": {}, "events": []}

    add(stagger or len(pending))
    while engine.has_unfinished() or pending:
        add(stagger)
        for out in engine.step():
            r = results[out.request_id]
            r["events"].append(out)
            r["scores"] = out.scores
            for c in out.outputs:
                r["tokens"].setdefault(c.index, []).extend(c.token_ids)
                r["text"][c.index] = r["text"].get(c.index, "") + c.text
                if c.logprobs:
                    r["logprobs"].setdefault(c.index, []).extend(c.logprobs)
                if c.finish_reason:
                    r["finish"][c.index] = (c.finish_reason, c.stop_reason)
    return results
