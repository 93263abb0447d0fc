"""The native CPU kernels side by side with what they replace, interleaved round by round (min over rounds):

    python benchmarks/native_step.py --threads 2                 # both tables
    python benchmarks/native_step.py --threads 2 --only linears  # or: --only steps

1. linears: the 49 weights of one GPT-2-small decode step (48 projections + the LM head), per row count:
   fp32 through oneDNN and through the few-rows C linear; int8 through FBGEMM (quantized::linear_dynamic)
   and through the C int8 x int8 kernel; the 48 projections in 4-bit blocks (--quantization int4) and in 8-bit
   blocks through the C block kernel (the C columns where the library has an int8 kernel: AVX2 or VNNI).
2. steps: engine decode steps at each batch size with the whole-step C call (lmservice/engine/native_decode.py)
   against the op-by-op path, the same engine switching between them every round; a row per dtype that has
   a C step on this CPU (int8 and int4 need the int8 kernel), the others named below the table
   (`--dtypes float32 int8 int4`).

The library is the one the engine would load (the best build for this CPU; LMSERVICE_CPU_ISA=x86-64-v3
measures the AVX2 build on a bigger CPU).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import SHAPES, add_threads_flag, apply_threads  # noqa: E402
from benchmarks.engine import load, make_model  # noqa: E402
from lmservice.engine.engine import Engine, EngineConfig  # noqa: E402
from lmservice.engine.sampling_params import SamplingParams  # noqa: E402
from lmservice.kernels import cpu_native  # noqa: E402
from lmservice.kernels.linear import linear_onednn  # noqa: E402
from lmservice.model.loader import load_model  # noqa: E402
from lmservice.model.quantize import BlockLinear, Int8Linear  # noqa: E402


def _best_ms(calls: dict[str, callable], rounds: int) -> dict[str, float]:
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(rounds):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], (time.perf_counter() - start) * 1e3)
    return best


def linears(shape: str, rows_list: list[int], rounds: int) -> None:
    c = SHAPES[shape]
    n = c["n_embd"]
    shapes = [(3 * n, n), (n, n), (4 * n, n), (n, 4 * n)] * c["n_layer"] + [(c["vocab_size"], n)]
    torch.manual_seed(0)
    weights = [torch.randn(o, i) * 0.02 for o, i in shapes]
    biases = [torch.randn(o) * 0.02 for o, _ in shapes]
    quantized = [Int8Linear(w, b) for w, b in zip(weights, biases, strict=True)]  # on FBGEMM at any row count
    blocks = {bits: [BlockLinear(w, b, bits) for w, b in zip(weights[:-1], biases[:-1], strict=True)] for bits in (4, 8)}
    fp32_mb = sum(w.numel() for w in weights) * 4 / 1e6
    lib = cpu_native.native_library()
    print(f"{len(weights)} weights, {fp32_mb:.0f} MB in fp32; ms for all of them (GB/s of weights read); "
          f"the {lib.variant} build\n")
    print("| rows | fp32 oneDNN | fp32 C | int8 FBGEMM | int8 C | int4 blocks C (no LM head) | int8 blocks C (no LM head) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in rows_list:
        xs = {k: torch.randn(rows, k) for k in {i for _, i in shapes}}
        calls = {
            "fp32 oneDNN": lambda xs=xs: [linear_onednn(xs[w.shape[1]], w, b) for w, b in zip(weights, biases, strict=True)],
            "fp32 C": lambda xs=xs: [lib.linear_f32(xs[w.shape[1]], w, b) for w, b in zip(weights, biases, strict=True)],
            "int8 FBGEMM": lambda xs=xs: [q(xs[q.in_features]) for q in quantized],
        }
        if lib.has_int8:
            calls["int8 C"] = lambda xs=xs: [lib.linear_int8(xs[q.in_features], q.weight_packed, q.weight_sums,
                                                             q.scales, q.bias) for q in quantized]
            for bits in (4, 8):
                calls[f"int{bits} blocks C"] = lambda xs=xs, bits=bits: [
                    lib.linear_block(xs[m.in_features], m.weight_packed, m.block_scales, bits, m.out_features, m.bias)
                    for m in blocks[bits]]
        best = _best_ms(calls, rounds)
        head_mb = weights[-1].numel() * 4 / 1e6
        size = {"fp32 oneDNN": fp32_mb, "fp32 C": fp32_mb, "int8 FBGEMM": fp32_mb / 4, "int8 C": fp32_mb / 4,
                "int4 blocks C": (fp32_mb - head_mb) * 4.5 / 32, "int8 blocks C": (fp32_mb - head_mb) * 8.5 / 32}
        cells = [f"{best[k]:.1f} ({size[k] / best[k]:.0f})" if k in best else "-" for k in size]
        print(f"| {rows} | " + " | ".join(cells) + " |", flush=True)


def steps(model_dir: Path, shape: str, dtypes: list[str], batches: list[int], rounds: int, prompt_len: int) -> None:
    print("\n| dtype | batch | op by op ms/step (median, min) | C step ms/step (median, min) | C / op by op |")
    print("| --- | ---: | ---: | ---: | ---: |")
    vocab = SHAPES[shape]["vocab_size"]
    without: list[str] = []
    for dtype in dtypes:
        loaded = load_model(model_dir, "cpu", "float32", quantization="int4") if dtype == "int4" else load(model_dir, dtype)
        for batch in batches:
            engine = Engine(loaded, EngineConfig.from_fields(kv_cache_memory_mb=1024, max_num_batched_tokens=8192,
                                                             enable_prefix_caching=False))
            decoder = engine.runner.fast_path
            if decoder is None:
                without.append(dtype)
                break
            g = torch.Generator().manual_seed(batch)
            params = SamplingParams(temperature=0.0, max_tokens=rounds * 24 + 8, ignore_eos=True)
            for i, p in enumerate(torch.randint(0, vocab - 1, (batch, prompt_len), generator=g).tolist()):
                engine.submit(str(i), p, params)
            engine.step()  # the prefill
            times: dict[str, list[float]] = {"op": [], "C": []}
            for _ in range(rounds):
                for mode, max_rows in (("op", 0), ("C", batch)):
                    decoder.max_rows = max_rows
                    engine.step()  # warm-up of this path
                    start = time.perf_counter()
                    for _ in range(10):
                        engine.step()
                    times[mode].append((time.perf_counter() - start) * 100)
            op, c = statistics.median(times["op"]), statistics.median(times["C"])
            print(f"| {dtype} | {batch} | {op:.1f} ({min(times['op']):.1f}) | {c:.1f} ({min(times['C']):.1f}) | "
                  f"{c / op:.2f} |", flush=True)
    if without:
        print(f"\nno C step on this CPU for: {', '.join(without)} (int8 and int4 need the int8 kernel: AVX2)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=["linears", "steps"])
    ap.add_argument("--shape", default="gpt2", choices=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "int8"], help="float32, int8, int4")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=128)
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)
    if cpu_native.native_library() is None:
        sys.exit("no native kernels are built for this CPU (no C compiler at install time?)")
    if args.only != "steps":
        linears(args.shape, args.rows, args.rounds)
    if args.only != "linears":
        with tempfile.TemporaryDirectory() as tmp:
            make_model(Path(tmp) / "model", args.shape)
            steps(Path(tmp) / "model", args.shape, args.dtypes, args.batch, args.rounds, args.prompt_len)


if __name__ == "__main__":
    main()
