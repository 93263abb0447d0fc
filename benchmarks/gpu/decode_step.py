"""GPT-2 small's decode step through the engine, bf16, at batch 1/32/256, against its byte floor.

The floor is the bytes one step must read (every weight once, the tied lm_head's included; each sequence's
K/V of every layer) over the device's measured copy bandwidth. Reported per batch: the CUDA graph's replay
alone (CUDA events), and the whole engine step (schedule, graph replay, sampling, update; wall clock) with
graphs on and off. Prompts of 128 random tokens; the steps are timed once every request is decoding.
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.gpu.common import Step, cuda_graphs_of
from benchmarks.kernels import bench_copy_and_matmul

PROMPT_LEN, STEPS = 128, 20


def _decoding_engine(step: Step, loaded, batch: int, graphs: bool):
    """An engine whose `batch` requests have all finished their prefill."""
    from lmservice.engine.engine import Engine, EngineConfig
    from lmservice.engine.sampling_params import SamplingParams

    engine = Engine(loaded, EngineConfig.from_fields(
        kv_cache_memory_mb=4096 if step.cuda else 64, max_num_seqs=max(batch, 1), max_num_batched_tokens=8192,
        enable_prefix_caching=False, enable_cuda_graphs=graphs, attention_backend="triton" if step.cuda else "torch"))
    g = torch.Generator().manual_seed(batch)
    prompt_len = PROMPT_LEN if step.cuda else 16
    prompts = torch.randint(0, loaded.config.vocab_size - 1, (batch, prompt_len), generator=g).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=4 * STEPS, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.submit(str(i), p, params)
    decoded: set[str] = set()
    while len(decoded) < batch:  # prefill steps, then one decode step for all
        for out in engine.step():
            decoded.add(out.request_id)
    engine.step()
    return engine


def _engine_step_ms(engine, steps: int) -> float:
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()  # returns after sampling has brought the tokens to the host: the GPU work is done
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def run(step: Step) -> None:
    from lmservice.model.loader import load_model

    setup = step.setup(torch.bfloat16)
    setup.copy_gbps, _ = bench_copy_and_matmul(setup)
    loaded = load_model(step.model_dir("gpt2"), device=step.device.type, dtype="bfloat16")
    c = loaded.config
    weight_bytes = sum(p.nbytes for n, p in loaded.model.named_parameters() if "wpe" not in n)
    steps = STEPS if step.cuda else 3
    rows = []
    for batch in (1, 32, 256) if step.cuda else (1, 3):
        engine = _decoding_engine(step, loaded, batch, graphs=True)
        ctx = (PROMPT_LEN if step.cuda else 16) + 2 + steps // 2  # the mean context over the timed steps
        kv_bytes = 2 * c.n_layer * ctx * c.n_embd * loaded.dtype.itemsize * batch
        floor_us = (weight_bytes + kv_bytes) / setup.copy_gbps / 1e3
        graphs = cuda_graphs_of(engine)
        replay = "-"
        if graphs is not None:
            bucket = next(b for b in graphs.buckets if b >= batch)
            replay_us = setup.time_us(graphs.graphs[bucket].replay)
            replay = f"{replay_us:.0f} ({replay_us / floor_us:.2f}x floor)"
            step.metrics[f"b{batch}_replay_us"] = replay_us
        elif step.cuda:
            step.check(f"batch {batch}: the engine captured CUDA graphs", False)
        ms_graphs = _engine_step_ms(engine, steps)
        del engine
        eager = _decoding_engine(step, loaded, batch, graphs=False)
        ms_eager = _engine_step_ms(eager, steps)
        del eager
        step.metrics[f"b{batch}"] = {"floor_us": floor_us, "step_ms_graphs": ms_graphs, "step_ms_eager": ms_eager}
        rows.append([batch, ctx, f"{floor_us:.0f}", replay, f"{ms_graphs:.2f}", f"{ms_eager:.2f}",
                     f"{batch / ms_graphs * 1e3:.0f}"])
    step.table(f"GPT-2 small decode step, bf16, {step.device.type}; floor = (weights {weight_bytes / 1e6:.0f} MB + KV) "
               f"/ copy bandwidth {setup.copy_gbps:.0f} GB/s",
               ["batch", "context", "floor us", "graph replay us", "engine step ms (graphs)",
                "engine step ms (eager)", "tok/s (graphs)"], rows)
