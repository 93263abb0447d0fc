"""The engine on the device against transformers' GPT2LMHeadModel on the same device.

fp32: greedy tokens equal, token for token, with CUDA graphs on and off, prefix caching off, chunked
prefill and 32-token blocks (a GPT-2-small-shaped random-weight model; prompts that share prefixes).
bf16: tokens agree on most prompts and the chosen tokens' logprobs stay close; the rate is reported
against transformers in fp32 and in bf16, on the same random model and on the shipped trained model
(models/base), whose peaked distributions make the rate mean something.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks.gpu.common import Step, agreement, cuda_graphs_of, first_divergence, greedy_tokens, hf_greedy

ROOT = Path(__file__).resolve().parents[2]
STORIES = ["once upon a time, there was a little girl named lily. she", "the dog ran to the park and",
           "tom and his mom went to the store. they", "one day, a big bird flew over the tree and saw",
           "sam had a red ball. he liked to", "the sun was hot, so the kids went to the", "mia found a box under her bed.",
           "the cat did not want to"]
VARIANTS = {  # engine settings beside the defaults; every one must give transformers' tokens in fp32
    "cuda graphs": {},
    "eager (no graphs)": {"enable_cuda_graphs": False},
    "no prefix cache": {"enable_prefix_caching": False},
    "chunked prefill": {"max_num_batched_tokens": 64},
    "block size 32": {"block_size": 32},
}


def _prompts(vocab_size: int, dry: bool) -> list[list[int]]:
    from tests.helpers import prompts

    base = prompts(4 if dry else 12, vocab_size, 1, 30 if dry else 60, seed=3)
    # prompts sharing long prefixes with others (prefix-cache hits), and on a GPU one longer than a chunk
    shared = [base[0] + [5, 6, 7], base[0][:17] + [9]] + ([] if dry else [base[1] + base[2], list(base[3])])
    long = [] if dry else prompts(1, vocab_size, 300, 300, seed=4)
    return base + shared + long


def _engine(step: Step, loaded, **settings):
    """On a GPU the Triton kernels; in a dry run the torch ones (the engine on interpreted Triton kernels is
    tests/engine/test_triton_backend.py's, and too slow for a dry run)."""
    from lmservice.engine.engine import Engine, EngineConfig

    backend = "triton" if step.cuda else "torch"
    settings = {"num_kv_blocks": 1024 if step.cuda else 256, "max_num_seqs": 32, "attention_backend": backend,
                **settings}
    if step.dry and "max_num_batched_tokens" in settings:
        settings["max_num_batched_tokens"] = 7
    return Engine(loaded, EngineConfig.from_fields(**settings))


def _count_graph_runs(engine) -> list[int]:
    """One entry per decode step that replayed a CUDA graph (none on a CPU)."""
    calls: list[int] = []
    graphs = cuda_graphs_of(engine)
    if graphs is not None:
        run = graphs.run
        graphs.run = lambda *a, **k: calls.append(1) or run(*a, **k)
    return calls


def _hf(model_dir: Path, dtype: torch.dtype, device):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(model_dir, dtype=dtype).to(device).eval()


def check_fp32(step: Step, new_tokens: int) -> None:
    from lmservice.model.loader import load_model

    model_dir = step.model_dir("gpt2", seed=2)
    ps = _prompts(step.shape()["vocab_size"], step.dry)
    want, want_lp = hf_greedy(_hf(model_dir, torch.float32, step.device), ps, new_tokens, step.device)
    loaded = load_model(model_dir, device=step.device.type, dtype="float32")
    rows = []
    for name, settings in VARIANTS.items():
        engine = _engine(step, loaded, **settings)
        graph_runs = _count_graph_runs(engine)
        got, got_lp = greedy_tokens(engine, ps, new_tokens, stagger=3, logprobs=0)
        same, _ = agreement(got, want)
        diff = max((abs(a - b) for g, w, gl, wl in zip(got, want, got_lp, want_lp, strict=True)
                    for a, b in list(zip(gl, wl, strict=True))[:first_divergence(g, w)]), default=0.0)
        step.check(f"fp32 {name}: greedy tokens equal transformers'", same == len(ps), f"{same}/{len(ps)} prompts")
        step.check(f"fp32 {name}: logprobs within 1e-3", diff <= 1e-3, f"max |diff| {diff:.1e}")
        step.check(f"fp32 {name}: every KV block free when idle", engine.pool.num_used_blocks == 0)
        if step.cuda and name == "cuda graphs":
            step.check("fp32 cuda graphs: decode steps replayed graphs", len(graph_runs) > 0,
                       f"{len(graph_runs)} graphed steps")
        if name == "cuda graphs":
            step.check("fp32: shared prefixes hit the prefix cache", engine.pool.num_hits > 0)
        rows.append([name, f"{same}/{len(ps)}", f"{diff:.1e}", len(graph_runs), engine.pool.num_hits])
        del engine
    step.table(f"engine vs transformers, fp32, greedy, {new_tokens} new tokens, {step.device.type}",
               ["variant", "prompts with equal tokens", "max logprob diff", "graphed decode steps", "prefix-cache hits"],
               rows)


def check_bf16(step: Step, new_tokens: int) -> None:
    from lmservice.model.loader import load_model

    rows = []
    models = [("models/base", ROOT / "models" / "base")]
    if not step.dry:  # the same code as models/base's; on a GPU the GPT-2 small shape's rate is worth having
        models.insert(0, ("random GPT-2 shape", step.model_dir("gpt2", seed=2)))
    for label, model_dir in models:
        loaded = load_model(model_dir, device=step.device.type, dtype="bfloat16")
        if label == "models/base":
            ps = [loaded.tokenizer.encode(s) for s in STORIES[: 3 if step.dry else None]]
        else:
            ps = _prompts(step.shape()["vocab_size"], step.dry)
        want32, want32_lp = hf_greedy(_hf(model_dir, torch.float32, step.device), ps, new_tokens, step.device)
        want16, _ = hf_greedy(_hf(model_dir, torch.bfloat16, step.device), ps, new_tokens, step.device)
        engine = _engine(step, loaded)
        got, got_lp = greedy_tokens(engine, ps, new_tokens, stagger=3, logprobs=0)
        same32, prefix32 = agreement(got, want32)
        same16, prefix16 = agreement(got, want16)
        ref16, _ = agreement(want16, want32)  # transformers' own bf16 against its fp32: the noise floor
        diff = max((abs(a - b) for g, w, gl, wl in zip(got, want32, got_lp, want32_lp, strict=True)
                    for a, b in list(zip(gl, wl, strict=True))[:first_divergence(g, w)]), default=0.0)
        rows.append([label, f"{same32}/{len(ps)} ({prefix32:.0%} of tokens)", f"{same16}/{len(ps)} ({prefix16:.0%})",
                     f"{ref16}/{len(ps)}", f"{diff:.3f}"])
        step.metrics[f"bf16 {label}"] = {"same_vs_fp32": same32, "same_vs_hf_bf16": same16, "hf_bf16_vs_fp32": ref16,
                                         "prompts": len(ps), "max_logprob_diff": diff}
        if label == "models/base":
            step.check("bf16 models/base: tokens equal transformers fp32 on most prompts", 2 * same32 >= len(ps),
                       f"{same32}/{len(ps)}")
            step.check("bf16 models/base: chosen-token logprobs within 0.15 of fp32", diff <= 0.15, f"{diff:.3f}")
        step.check(f"bf16 {label}: every KV block free when idle", engine.pool.num_used_blocks == 0)
        del engine
    step.table(f"engine in bf16 vs transformers, greedy, {new_tokens} new tokens, {step.device.type}",
               ["model", "equal to transformers fp32", "equal to transformers bf16", "transformers bf16 vs fp32",
                "max logprob diff vs fp32 (before divergence)"], rows)


def run(step: Step) -> None:
    new_tokens = 4 if step.dry else 16
    check_fp32(step, new_tokens)
    check_bf16(step, 4 if step.dry else 32)
