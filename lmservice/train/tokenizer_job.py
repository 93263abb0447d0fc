"""`lmservice train tokenizer`: a byte-level BPE tokenizer (GPT-2's scheme) from text files.

Byte-level: every byte has a token, so any UTF-8 text round-trips with no
unknown token. `<|endoftext|>` is the one special token (id 0) and serves as
BOS, EOS, UNK and padding, as in GPT-2. Saved as a Hugging Face tokenizer dir
(tokenizer.json + tokenizer_config.json) that `AutoTokenizer` loads.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from lmservice.train.artifact import atomic_directory
from lmservice.train.data import DataError, load_text
from lmservice.train.options import add_text_arguments

EOS_TOKEN = "<|endoftext|>"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", type=Path, nargs="+", required=True, help="Text files (.txt).")
    p.add_argument("--output", type=Path, required=True, help="Tokenizer directory to write.")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--min-frequency", type=int, default=2)
    p.add_argument("--model-max-length", type=int, default=1024, help="Recorded in tokenizer_config.json.")
    p.add_argument("--overwrite", action="store_true")
    add_text_arguments(p)


def train_tokenizer(paths: list[Path], vocab_size: int, min_frequency: int = 2, fix: bool = True) -> Tokenizer:
    if vocab_size <= 256 + 1:
        raise DataError(f"--vocab-size must exceed the 256 byte tokens + 1 special, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=False,
    )
    ds = load_text(paths, sample_by="line", fix=fix)
    tok.train_from_iterator((ds[i : i + 1000]["text"] for i in range(0, len(ds), 1000)), trainer=trainer)
    return tok


def as_hf_tokenizer(tok: Tokenizer, model_max_length: int) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=model_max_length,
    )


def run(args: argparse.Namespace) -> int:
    tok = train_tokenizer(args.train, args.vocab_size, args.min_frequency, fix=args.fix_text)
    hf_tok = as_hf_tokenizer(tok, args.model_max_length)
    with atomic_directory(args.output, overwrite=args.overwrite) as tmp:
        hf_tok.save_pretrained(tmp)
    print(f"wrote {args.output} (vocab {tok.get_vocab_size()})")
    return 0
