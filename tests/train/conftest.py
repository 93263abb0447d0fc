"""Tiny fixtures for the training-job tests: a BPE tokenizer and a random 2-layer GPT-2 (n_embd 32).

Everything is built once per session in a temp dir from a few hundred lines
of made-up text, so each job test trains for a handful of steps in seconds.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from lmservice.train.tokenizer_job import as_hf_tokenizer, train_tokenizer

SUBJECTS = ["a dog", "the cat", "a little girl", "two men", "a woman", "the boy"]
VERBS = ["runs in", "sits on", "looks at", "plays with", "walks past"]
OBJECTS = ["the park", "a red ball", "the grass", "a big tree", "the water"]
GERMAN = {"a dog": "ein Hund", "the cat": "die Katze", "a little girl": "ein kleines Mädchen",
          "two men": "zwei Männer", "a woman": "eine Frau", "the boy": "der Junge"}
POSITIVE = ["great", "lovely", "wonderful", "good", "charming"]
NEGATIVE = ["bad", "awful", "boring", "terrible", "dull"]


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}." for _ in range(n)]


def sentiment_rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(POSITIVE if label == "pos" else NEGATIVE)
        rows.append((f"the film is {word} and {rng.choice(OBJECTS)}", label))
    return rows


def parallel_pairs(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        subject = rng.choice(SUBJECTS)
        pairs.append((f"{subject} is here.", f"{GERMAN[subject]} ist hier."))
    return pairs


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    (d / "text.txt").write_text("\n".join(sentences(300)) + "\n")
    (d / "sentiment.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sentiment_rows(200)))
    pairs = parallel_pairs(200)
    (d / "pairs.en").write_text("".join(s + "\n" for s, _ in pairs))
    (d / "pairs.de").write_text("".join(t + "\n" for _, t in pairs))
    (d / "pairs.jsonl").write_text("".join(json.dumps({"src": s, "tgt": t}) + "\n" for s, t in pairs))
    (d / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"Q: {s}\nA:", "completion": " yes"}) + "\n"
                                             for s in sentences(100, seed=1)))
    return d


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, data_dir) -> Path:
    d = tmp_path_factory.mktemp("tokenizer")
    extra = tmp_path_factory.mktemp("extra") / "extra.txt"
    extra.write_text("".join(t + "\n" for _, t in parallel_pairs(100)) + "".join(t + "\n" for t, _ in sentiment_rows(100)))
    tok = train_tokenizer([data_dir / "text.txt", extra], vocab_size=400)
    as_hf_tokenizer(tok, model_max_length=64).save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A random tiny GPT-2 with the tokenizer: a valid base checkpoint for every job."""
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("base")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    GPT2LMHeadModel(config).save_pretrained(d)
    tok.save_pretrained(d)
    return d


# Flags every tiny job run shares: small batches, no progress bar, one thread, checkpoints often.
FAST = ["--batch-size", "8", "--no-progress", "--threads", "1", "--save-steps", "4", "--logging-steps", "1"]


@pytest.fixture
def train():
    """`train("classify", "--base", d, ...)` runs `lmservice train ...` in-process with FAST flags; returns rc."""
    from lmservice.train.cli import main

    def run(*argv) -> int:
        return main([str(a) for a in argv] + (FAST if argv[0] != "tokenizer" else []))

    return run
