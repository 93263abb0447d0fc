"""`lmservice train <job> ...`: the fine-tuning jobs' entry point (also under torchrun).

Each job module exposes `add_arguments(parser)` and `run(args) -> int`; they are
imported lazily so `--help` and the tokenizer job stay light. User errors
(bad data, non-GPT-2 base, unknown LoRA target, existing output) exit 2 with
one clear line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

JOBS = {
    "tokenizer": ("service.train.tokenizer_job", "Byte-level BPE tokenizer (GPT-2 scheme) from text files."),
    "pretrain": ("service.train.pretrain", "GPT-2 from scratch (config preset + tokenizer) on plain text."),
    "lm": ("service.train.lm", "Causal-LM fine-tuning (text or prompt/completion), full or --lora."),
    "classify": ("service.train.classify", "Sequence classification (text + label), full or --lora."),
    "translate": ("service.train.translate", "Translation with a prompt template, full or --lora."),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmservice train", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="job", required=True)
    for name, (module, help_text) in JOBS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from transformers.utils import logging as hf_logging  # noqa: PLC0415

    hf_logging.disable_progress_bar()  # weight-loading bars; training draws its own
    from service.train.data import DataError  # noqa: PLC0415
    from service.train.modeling import ModelError  # noqa: PLC0415

    try:
        return int(importlib.import_module(args.module).run(args) or 0)
    except (DataError, ModelError, FileExistsError) as e:
        print(f"lmservice train {args.job}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
