"""One GPT-2-small projection at decode batch sizes, per weight format: the measurement behind
--quantization int8 and --dtype auto (run it on each CPU family: AVX2, AVX-512, AMX).

    python benchmarks/linear.py --threads 2          # microseconds per call; fp32, bf16, int8 and int4 (ours),
                                                     # weight-only int8

int8 is lmservice/model/quantize.py's Int8Linear (per-channel int8 weights, dynamically quantized activations);
int4 its BlockLinear of 4 bits (--quantization int4: blocks of 32 with an fp16 scale, activations quantized per
block), as the engine runs it; "w8 weight-only" is torch._weight_int8pack_mm with bf16 activations, the
alternative int8 was chosen over.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_threads_flag, apply_threads  # noqa: E402
from lmservice.kernels.cpu_policy import choose_cpu_kernels  # noqa: E402
from lmservice.model.cpu import cpu_flags  # noqa: E402
from lmservice.model.quantize import BlockLinear, Int8Linear  # noqa: E402

SHAPES = [(768, 2304, "attn.c_attn"), (768, 768, "attn.c_proj"), (768, 3072, "mlp.c_fc"), (3072, 768, "mlp.c_proj"),
          (768, 50257, "lm_head")]


def per_call_us(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=30)
    add_threads_flag(ap)
    args = ap.parse_args()
    apply_threads(args)
    torch.manual_seed(0)
    simd = sorted(f for f in cpu_flags() if f.startswith(("avx512_bf16", "amx", "avx512_vnni", "avx_vnni", "avx2")))
    print(f"threads {torch.get_num_threads()}, torch CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"flags: {' '.join(simd)}\n")
    print("| rows | layer (in x out) | fp32 us | bf16 us | int8 us | int4 us | w8 weight-only us | int8 vs fp32 | "
          "int4 vs fp32 | bf16 vs fp32 |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for rows in args.rows:
        for k, n, name in SHAPES:
            fp32, bf16, int8, int4, wonly = measure(rows, k, n, args.repeats)
            print(f"| {rows} | {name} ({k} x {n}) | {fp32:.0f} | {bf16:.0f} | {int8:.0f} | {int4:.0f} | {wonly:.0f} | "
                  f"{fp32 / int8:.2f}x | {fp32 / int4:.2f}x | {fp32 / bf16:.2f}x |", flush=True)


def measure(rows: int, k: int, n: int, repeats: int) -> tuple[float, float, float, float, float]:
    """Microseconds per call of (rows x k) @ (k x n) + bias: fp32, bf16, our int8 and int4, weight-only int8."""
    x, w, b = torch.randn(rows, k), torch.randn(n, k) * 0.02, torch.randn(n) * 0.02
    xb, wb, bb = x.bfloat16(), w.bfloat16(), b.bfloat16()
    kernels = choose_cpu_kernels("auto", torch.device("cpu"), torch.float32)
    q = Int8Linear(w, b, kernels)  # as the engine runs it
    q4 = BlockLinear(w, b, 4, kernels)
    w8, s8 = q.weight_int8, q.scales.bfloat16()
    return (per_call_us(lambda: F.linear(x, w, b), repeats), per_call_us(lambda: F.linear(xb, wb, bb), repeats),
            per_call_us(lambda: q(x), repeats), per_call_us(lambda: q4(x), repeats),
            per_call_us(lambda: torch._weight_int8pack_mm(xb, w8, s8), max(3, repeats // 5)))

if __name__ == "__main__":
    main()
