"""Pieces the benchmark scripts share: model shapes and the torch thread flag."""

from __future__ import annotations

import argparse

import torch

SHAPES = {"gpt2": dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
          "tiny": dict(vocab_size=1000, n_positions=512, n_embd=64, n_layer=2, n_head=4)}


def add_threads_flag(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads for both sides (0: torch's default). On a shared machine 1 avoids "
                         "OpenMP threads spin-waiting on a busy core, which can slow small ops 30x")


def apply_threads(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
