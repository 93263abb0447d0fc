"""Offline engine throughput vs transformers' generate, side by side in one run.

A GPT-2-small-shaped model with random weights; prompts of --prompt-len tokens,
--new-tokens each (ignore_eos). For each dtype and concurrency: lmservice's
engine with all requests added at once, transformers' generate one request at
a time, and transformers' generate on one static batch of the same size.

    python benchmarks/engine.py                       # the table in docs/benchmarks.md
    python benchmarks/engine.py --concurrency 1 8 --dtypes float32 --new-tokens 32   # quicker
    python benchmarks/engine.py --decode-steps 16 --repeats 3   # decode step alone, best of 3, alternating
    python benchmarks/engine.py --decode-steps 12 --dtypes float32 int8 bfloat16 --concurrency 1 32
    python benchmarks/engine.py --closed-loop --force-token 64 --concurrency 1 8 32   # serve.py's workload, no HTTP
    python benchmarks/engine.py --closed-loop --force-token 64 --concurrency 1 8 32 --dtypes float32 \
        --kv-cache-dtypes fp32 fp16 bf16 int8 --rounds 2   # each KV-cache dtype, rounds in alternating order
    python benchmarks/engine.py --closed-loop --force-token 64 --concurrency 1 8 32 --dtypes float32 --threads 2 \
        --kv-cache-dtypes fp32 int8 --openvino /tmp/ov/m-fp32:f32:f32 /tmp/ov/m-fp32:u8:f32 --rounds 2

`--dtypes int8` / `int4` is lmservice with --quantization int8 / int4 (fp32 activations); transformers runs fp32
beside it. `--kv-cache-dtypes` (closed loop only) runs each weight dtype with each KV-cache dtype. `--openvino`
(closed loop only) adds OpenVINO GenAI rows on the same prompts, in the same rounds (benchmarks/openvino_peer.py):
DIR is an `optimum-cli export openvino` of this model (../shared/PEERS.md), KV and PRECISION the CPU plugin's
KV_CACHE_PRECISION and INFERENCE_PRECISION_HINT (empty: its default); the row names the precisions in effect.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, add_threads_flag, apply_threads, closed_loop, closed_loop_prompt_ids  # noqa: E402
from benchmarks.openvino_peer import OpenVINOPeer, run_openvino_closed_loop  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402


def make_model(path: Path, shape: str) -> None:
    from tests.helpers import make_gpt2_dir

    make_gpt2_dir(path, seed=0, **SHAPES[shape])


QUANTIZED = ("int8", "int4")  # --dtypes entries that are float32 with --quantization


def load(model_dir: Path, dtype: str):
    """lmservice's model for a --dtypes entry ("int8", "int4": float32 with that --quantization)."""
    if dtype in QUANTIZED:
        return load_model(model_dir, "cpu", "float32", quantization=dtype)
    return load_model(model_dir, "cpu", dtype)


def hf_dtype(dtype: str) -> torch.dtype:
    return torch.float32 if dtype in QUANTIZED else getattr(torch, dtype)


def run_engine(model_dir: Path, dtype: str, prompts: list[list[int]], new_tokens: int) -> float:
    loaded = load(model_dir, dtype)
    engine = Engine(loaded, EngineConfig.from_fields(kv_cache_memory_mb=2048, max_num_seqs=256, max_num_batched_tokens=4096,
                                         enable_prefix_caching=False))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
    engine.submit("warmup", prompts[0][:8], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    start = time.perf_counter()
    for i, p in enumerate(prompts):
        engine.submit(str(i), p, params)
    generated = 0
    while engine.has_unfinished():
        for out in engine.step():
            generated += sum(len(c.token_ids) for c in out.outputs)
    elapsed = time.perf_counter() - start
    assert generated == len(prompts) * new_tokens
    return generated / elapsed


def run_engine_closed_loop(model_dir: Path, dtype: str, prompts: list[list[int]], concurrency: int, new_tokens: int,
                           force_token: int | None, kv_cache_dtype: str = "auto") -> float:
    """benchmarks/serve.py's workload without HTTP: every prompt, at most `concurrency` in flight, each replaced as
    soon as it finishes (same logit_bias); returns generated tokens/s."""
    engine = Engine(load(model_dir, dtype), EngineConfig.from_fields(kv_cache_dtype=kv_cache_dtype))  # else defaults
    bias = {force_token: 100.0} if force_token is not None else None
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logit_bias=bias)
    engine.submit("warmup", prompts[0][:8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    return closed_loop(engine, prompts, params, concurrency)[0]


def run_hf(model_dir: Path, dtype: str, prompts: list[list[int]], new_tokens: int, static_batch: bool) -> float:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir, dtype=hf_dtype(dtype)).eval()
    batches = [prompts] if static_batch else [[p] for p in prompts]
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[0][:8]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
        start = time.perf_counter()
        for batch in batches:
            ids = torch.tensor(batch)  # equal-length prompts: no padding
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        elapsed = time.perf_counter() - start
    return len(prompts) * new_tokens / elapsed


def decode_step_ms(model_dir: Path, dtype: str, prompts: list[list[int]], steps: int, repeats: int) -> tuple[float, float]:
    """Decode-step time (ms, median step of a run, best of `repeats` runs) of lmservice and of
    transformers' generate on a static batch, measured alternately so that both see the same machine
    load. transformers' steps are timed from inside its loop (a logits processor); prefill is excluded."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir, dtype=hf_dtype(dtype)).eval()
    ids = torch.tensor(prompts)
    loaded = load(model_dir, dtype)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 2, ignore_eos=True)
    ours, theirs = [], []
    stamps: list[float] = []

    def stamp(input_ids, scores):  # a logits processor: generate calls it once per step
        stamps.append(time.perf_counter())
        return scores

    for _ in range(repeats):
        stamps.clear()
        with torch.inference_mode():
            hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps + 1, min_new_tokens=steps + 1,
                        do_sample=False, pad_token_id=0, logits_processor=[stamp])
        gaps = sorted(b - a for a, b in zip(stamps, stamps[1:], strict=False))  # decode steps only
        theirs.append(gaps[len(gaps) // 2] * 1e3)
        engine = Engine(loaded, EngineConfig.from_fields(kv_cache_memory_mb=512, max_num_batched_tokens=8192,
                                             enable_prefix_caching=False))
        for i, p in enumerate(prompts):
            engine.submit(str(i), p, params)
        engine.step()  # the whole prefill in one step
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            engine.step()
            times.append(time.perf_counter() - t)
        ours.append(sorted(times)[len(times) // 2] * 1e3)
    return min(ours), min(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="gpt2", choices=["gpt2", "tiny"])
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--hf-serial-max", type=int, default=8,
                    help="run transformers one-at-a-time on at most this many prompts (its rate does not depend on concurrency)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--decode-steps", type=int, default=0,
                    help="instead: time N decode steps (prefill excluded), lmservice and transformers alternately")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--closed-loop", action="store_true",
                    help="instead: benchmarks/serve.py's workload in process (2 x concurrency requests, at most "
                         "concurrency in flight): the HTTP + SSE overhead is serve.py's figure against this one")
    ap.add_argument("--force-token", type=int, default=None, help="as in benchmarks/serve.py (--closed-loop)")
    ap.add_argument("--kv-cache-dtypes", nargs="+", default=["auto"], choices=["auto", "fp32", "fp16", "bf16", "int8"],
                    help="--closed-loop: run each --dtypes entry with each KV-cache dtype")
    ap.add_argument("--openvino", nargs="+", default=[], type=OpenVINOPeer.parse, metavar="DIR[:KV[:PRECISION]]",
                    help="--closed-loop: also run OpenVINO GenAI on each export, e.g. /tmp/ov/m-int8:u8:f32")
    ap.add_argument("--rounds", type=int, default=1,
                    help="--closed-loop: repeat the whole table, every other round in reverse order (a shared "
                         "machine's drift then weighs on every configuration alike)")
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        make_model(model_dir, args.shape)
        vocab = SHAPES[args.shape]["vocab_size"]
        if args.closed_loop:
            print("| dtype | KV cache | concurrency | round | in-process tok/s |")
            print("| --- | --- | ---: | ---: | ---: |")
            runs = [(dtype, kv, c) for dtype in args.dtypes for kv in args.kv_cache_dtypes for c in args.concurrency]
            runs += [(peer, None, c) for peer in args.openvino for c in args.concurrency]
            for r in range(args.rounds):
                for dtype, kv, c in runs if r % 2 == 0 else runs[::-1]:
                    prompts = closed_loop_prompt_ids(c, args.prompt_len, min(vocab, 50000))
                    if isinstance(dtype, OpenVINOPeer):  # its row names the export and the precisions in effect
                        rate, kv, precision = run_openvino_closed_loop(dtype, prompts, c, args.new_tokens, args.threads)
                        name = f"openvino {dtype.model_dir.name} ({kv} KV, {precision})"
                    else:
                        rate = run_engine_closed_loop(model_dir, dtype, prompts, c, args.new_tokens, args.force_token, kv)
                        name = dtype
                    print(f"| {name} | {kv} | {c} | {r + 1} | {rate:.1f} |", flush=True)
            return
        if args.decode_steps:
            print("| dtype | batch | lmservice ms/step | transformers static batch ms/step | speed-up |")
            print("| --- | ---: | ---: | ---: | ---: |")
            for dtype in args.dtypes:
                for c in args.concurrency:
                    g = torch.Generator().manual_seed(c)
                    prompts = torch.randint(0, vocab - 1, (c, args.prompt_len), generator=g).tolist()
                    ours, theirs = decode_step_ms(model_dir, dtype, prompts, args.decode_steps, args.repeats)
                    print(f"| {dtype} | {c} | {ours:.1f} | {theirs:.1f} | {theirs / ours:.2f}x |", flush=True)
            return
        rows = []
        for dtype in args.dtypes:
            serial = None
            for c in args.concurrency:
                g = torch.Generator().manual_seed(c)
                prompts = torch.randint(0, vocab - 1, (c, args.prompt_len), generator=g).tolist()
                ours = run_engine(model_dir, dtype, prompts, args.new_tokens)
                static = serial_rate = float("nan")
                if not args.skip_hf:
                    if serial is None:
                        serial = run_hf(model_dir, dtype, prompts[: args.hf_serial_max], args.new_tokens, False)
                    serial_rate = serial
                    static = run_hf(model_dir, dtype, prompts, args.new_tokens, True)
                rows.append((dtype, c, ours, serial_rate, static))
                print(f"{dtype} c={c}: lmservice {ours:.1f} tok/s, hf serial {serial_rate:.1f}, hf static {static:.1f}",
                      flush=True)

    print("\n| dtype | concurrency | lmservice tok/s | transformers one-at-a-time tok/s | transformers static batch tok/s "
          "| vs one-at-a-time | vs static batch |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for dtype, c, ours, serial, static in rows:
        print(f"| {dtype} | {c} | {ours:.1f} | {serial:.1f} | {static:.1f} | {ours / serial:.2f}x | {ours / static:.2f}x |")


if __name__ == "__main__":
    main()
