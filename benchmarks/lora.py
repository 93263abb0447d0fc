"""Cost of batched LoRA at GPT-2-small shapes, per decode step (all 48 projections), kernels only.

32 decode rows over N distinct rank-8 adapters (N = 0 is the base alone), each targeting c_attn, c_proj
and c_fc in every layer; rows either interleaved (row i has adapter i % N) or ordered by adapter, as a
runner that sorts its batch by adapter slot gives them (contiguous groups: no gather/scatter). For each N: the base projections alone (F.linear),
and the same with the LoRA hook after each, through the LoRAStore's stacked buffers. The whole-engine
benchmark (throughput vs merged single-adapter models, benchmarks/multi_lora.py) runs the engine instead.

    python benchmarks/lora.py                                  # CPU, torch path
    python benchmarks/lora.py --device cuda --kernels torch triton   # GPU, both paths
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmservice.kernels.lora import LoRAMapping, add_lora_torch  # noqa: E402
from lmservice.model.lora import LoRAAdapter, LoRATargets  # noqa: E402
from lmservice.model.lora_store import LoRAStore  # noqa: E402

GPT2_SMALL = LoRATargets(n_layer=12, n_embd=768, n_inner=3072)


def make_store(num_adapters: int, rank: int, device: str, dtype: torch.dtype) -> tuple[LoRAStore, list[int]]:
    """A store holding `num_adapters` random adapters on every projection, all resident."""
    store = LoRAStore(
        GPT2_SMALL, max_loras=max(num_adapters, 1), max_lora_rank=rank, device=device, dtype=dtype
    )
    gen = torch.Generator().manual_seed(0)
    for i in range(num_adapters):
        weights = {
            key: (
                torch.randn(rank, n_in, generator=gen) * 0.01,
                torch.randn(n_out, rank, generator=gen) * 0.01,
            )
            for key, (n_in, n_out) in GPT2_SMALL.shapes().items()
        }
        store.add(LoRAAdapter(f"a{i}", Path(f"a{i}"), weights))
    slots = store.acquire([f"a{i}" for i in range(num_adapters)])
    return store, slots


def time_pair(base_fn, lora_fn, device: str, min_time_s: float) -> tuple[float, float]:
    """Median seconds of one call of each, alternating the two so that load drift on a shared machine
    hits both alike."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for fn in (base_fn, lora_fn, base_fn, lora_fn):
        fn()
    sync()
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while time.perf_counter() - start < min_time_s or len(times[0]) < 5:
        for fn, samples in zip((base_fn, lora_fn), times, strict=True):
            t0 = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - t0)
    base, lora = (sorted(samples)[len(samples) // 2] for samples in times)
    return base, lora


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--num-adapters", type=int, nargs="+", default=[0, 1, 4, 8, 32])
    parser.add_argument("--num-rows", type=int, default=32, help="decode rows (one token per request)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--kernels", nargs="+", default=["torch"], choices=["torch", "triton"])
    parser.add_argument("--min-time", type=float, default=2.0, help="seconds of timing per measurement")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    add_lora = {"torch": add_lora_torch}
    if "triton" in args.kernels:
        from lmservice.kernels.triton_lora import add_lora_triton

        add_lora["triton"] = add_lora_triton

    gen = torch.Generator().manual_seed(1)
    shapes = GPT2_SMALL.shapes()
    weights = {
        key: (torch.randn(n_out, n_in, generator=gen) * 0.02).to(args.device, dtype)
        for key, (n_in, n_out) in shapes.items()
    }
    inputs = {
        key: torch.randn(args.num_rows, n_in, generator=gen).to(args.device, dtype)
        for key, (n_in, _) in shapes.items()
    }

    def base_step(hook=None):
        for key, weight in weights.items():
            y = F.linear(inputs[key], weight)  # (T, out)
            if hook is not None:
                hook.apply(key, inputs[key], y)

    print(
        f"device={args.device} dtype={args.dtype} rows={args.num_rows} rank={args.rank} torch_threads={torch.get_num_threads()}"
    )
    print("| kernels | distinct adapters | rows | base ms | with LoRA ms | LoRA ms | with LoRA / base |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: |")
    rows = args.num_rows
    for num_adapters in args.num_adapters:
        store, slots = make_store(num_adapters, args.rank, args.device, dtype)
        orders = {
            "interleaved": [slots[i % num_adapters] if num_adapters else -1 for i in range(rows)],
            "ordered": [slots[i * num_adapters // rows] if num_adapters else -1 for i in range(rows)],
        }
        for order, row_slots in orders.items():
            mapping = LoRAMapping.from_seq_slots(row_slots, [1] * rows, args.device)
            for name, fn in add_lora.items():
                hook = store.step_hook(mapping, fn)  # None without adapters: the model skips LoRA
                base_s, step_s = time_pair(
                    base_step, lambda hook=hook: base_step(hook), args.device, args.min_time
                )
                print(
                    f"| {name} | {num_adapters} | {order} | {base_s * 1e3:.1f} | {step_s * 1e3:.1f} "
                    f"| {(step_s - base_s) * 1e3:.1f} | {step_s / base_s:.2f}x |"
                )
            if num_adapters == 0:
                break  # one order is enough
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
