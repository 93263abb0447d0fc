"""`lmservice train <job> ...`: the fine-tuning jobs' entry point (also under torchrun).

Each job module exposes `add_arguments(parser)` and `run(args) -> int`; they are
imported lazily so `--help` and the tokenizer job stay light. User errors
(bad data, non-GPT-2 base, unknown LoRA target, existing output) exit 2 with
one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
from collections.abc import Sequence

JOBS = {
    "tokenizer": ("lmservice.train.tokenizer_job", "Byte-level BPE tokenizer (GPT-2 scheme) from text files."),
    "pretrain": ("lmservice.train.pretrain", "GPT-2 from scratch (config preset + tokenizer) on plain text."),
    "lm": ("lmservice.train.lm", "Causal-LM fine-tuning (text or prompt/completion), full or --lora."),
    "classify": ("lmservice.train.classify", "Sequence classification (text + label), full or --lora."),
    "translate": ("lmservice.train.translate", "Translation with a prompt template, full or --lora."),
}


# What the `train` extra (pyproject.toml) adds to the server's install, as import names. The quick start
# installs the package without it, so the jobs check for it first and name the install command.
TRAIN_EXTRA_MODULES = ("datasets", "ftfy", "accelerate", "sacrebleu", "matplotlib", "tqdm")
INSTALL_TRAIN_EXTRA = "pip install 'lmservice[train]' (from a checkout: pip install -e '.[train]')"


def missing_train_modules() -> list[str]:
    return [name for name in TRAIN_EXTRA_MODULES if importlib.util.find_spec(name) is None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmservice train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    for name, (module, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    missing = missing_train_modules()
    if missing:
        print(f"lmservice train: the training jobs need the train extra (missing: {', '.join(missing)}); "
              f"install it with: {INSTALL_TRAIN_EXTRA}", file=sys.stderr)
        return 2
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # weight-loading bars; training draws its own
    from lmservice.train.data import DataError
    from lmservice.train.modeling import ModelError

    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except (DataError, ModelError, FileExistsError) as e:
        print(f"lmservice train {args.job}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
