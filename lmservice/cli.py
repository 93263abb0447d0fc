"""`lmservice`: the one entry point (serve, generate, batch, train).

The composition root: flags and environment are read here, once, into
`Settings`, and handed down. Each subcommand imports only what it needs.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path

from lmservice.batch import DEFAULT_CONCURRENCY
from lmservice.config import Settings


def _flag_type(annotation: object) -> tuple[type, bool, tuple | None]:
    """(element type, is_list, choices) of a Settings field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _flag_type(inner[0])
    if origin is list:
        elem, _, _ = _flag_type(args[0])
        return elem, True, None
    if origin is typing.Literal:
        return type(args[0]), False, args
    return annotation, False, None  # type: ignore[return-value]


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field; unset flags are left to the environment and defaults."""
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        elem, is_list, choices = _flag_type(field.annotation)
        help_text = field.description or ""
        env = f"LMSERVICE_{name.upper()}"
        if elem is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=f"{help_text} [{env}]")
        elif is_list:
            parser.add_argument(flag, dest=name, action="append", type=str,
                                default=argparse.SUPPRESS, help=f"{help_text} (repeatable) [{env}]")
        else:
            parser.add_argument(flag, dest=name, type=str, choices=choices,
                                default=argparse.SUPPRESS, help=f"{help_text} [{env}]")


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags given on the command line override LMSERVICE_* variables, which override defaults."""
    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def _serve(args: argparse.Namespace) -> int:
    from lmservice.api.server import run

    return run(settings_from_args(args))


def _early_stopping(value: str) -> bool | str:
    choices = {"true": True, "false": False, "never": "never"}
    if value.lower() not in choices:
        raise argparse.ArgumentTypeError(f"expected true, false or never, got {value!r}")
    return choices[value.lower()]


def _generate(args: argparse.Namespace) -> int:
    from lmservice.generate_cli import run

    return run(settings_from_args(args), args)


def _batch(args: argparse.Namespace) -> int:
    from lmservice.batch.runner import run

    return run(settings_from_args(args), args.input_file, args.output_file, args.concurrency)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmservice", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Serve the HTTP API (native + OpenAI-compatible).")
    add_settings_flags(serve)
    serve.set_defaults(func=_serve)

    gen = sub.add_parser("generate", help="Generate from a prompt on the command line (no server).")
    add_settings_flags(gen)
    gen.add_argument("prompt", nargs="+", help="Prompt text (several: batched together).")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--min-tokens", type=int, default=0)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy.")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--sample-seed", type=int, default=None, help="Per-request sampling seed.")
    gen.add_argument("--stop", action="append", default=[], help="Stop string (repeatable).")
    gen.add_argument("--n", type=int, default=1, help="Completions per prompt (with --num-beams: the n best beams).")
    gen.add_argument("--num-beams", type=int, default=1, help="Beam search with this many beams when > 1.")
    gen.add_argument("--length-penalty", type=float, default=1.0,
                     help="Beam search: a finished beam scores sum(logprobs) / generated_tokens**length_penalty.")
    gen.add_argument("--early-stopping", type=_early_stopping, default=False, metavar="{true,false,never}",
                     help="Beam search: stop once num_beams beams have finished (true), when no beam can beat "
                          "them (false), or only at max_tokens (never).")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--logprobs", type=int, default=None, help="Print top-n logprobs per token.")
    gen.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                     help="Print text as it is generated (single prompt).")
    gen.set_defaults(func=_generate)

    batch = sub.add_parser(
        "batch", help="Answer an OpenAI batch input file (JSONL) with the server's app, in process (no socket).",
        description="Each line {custom_id, method, url, body} is sent to the server's own app in this process; "
                    "each answer is appended to the output file as {id, custom_id, response, error}. Run it "
                    "again with the same files to resume: lines already answered are skipped. Exit status 0 "
                    "when every line is answered (per-line errors included). See docs/api.md#batch-files.")
    batch.add_argument("-i", "--input-file", type=Path, required=True, help="Batch input file (JSONL).")
    batch.add_argument("-o", "--output-file", type=Path, required=True,
                       help="Batch output file (JSONL); appended to, so a rerun resumes.")
    batch.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                       help="Lines in the engine at once (continuous batching fills each step from them).")
    add_settings_flags(batch)
    batch.set_defaults(func=_batch)

    train = sub.add_parser("train", help="Fine-tuning jobs: tokenizer, pretrain, lm, classify, translate.",
                           add_help=False)
    train.add_argument("train_args", nargs=argparse.REMAINDER)
    train.set_defaults(func=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        # The training jobs own their flags; they are never imported by the server.
        from lmservice.train.cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

