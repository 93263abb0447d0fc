"""OpenVINO GenAI as a closed-loop peer of lmservice's engine (benchmarks/engine.py --closed-loop --openvino).

The model is an `optimum-cli export openvino --task text-generation-with-past` of the benchmark's model (recipe in
../shared/PEERS.md). It runs through `ContinuousBatchingPipeline` with `add_request` + `step()`, on the prompts
lmservice gets (token ids, so each prompt has exactly its length), greedy, `ignore_eos`, exactly `new_tokens` per
request (min_new_tokens = max_new_tokens: no logit_bias is needed to force the length).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class OpenVINOPeer:
    """One --openvino entry, DIR[:KV[:PRECISION]]: an exported model directory and the CPU plugin's
    KV_CACHE_PRECISION and INFERENCE_PRECISION_HINT to ask for (None: the plugin's own choice)."""

    model_dir: Path
    kv_cache_precision: str | None = None
    inference_precision: str | None = None

    @classmethod
    def parse(cls, spec: str) -> OpenVINOPeer:
        path, *precisions = spec.split(":")
        if len(precisions) > 2:
            raise argparse.ArgumentTypeError(f"{spec!r}: expected DIR[:KV[:PRECISION]]")
        kv, precision = (precisions + ["", ""])[:2]
        return cls(Path(path), kv or None, precision or None)

    def properties(self, threads: int) -> dict[str, object]:
        props: dict[str, object] = {"INFERENCE_NUM_THREADS": threads} if threads else {}
        if self.kv_cache_precision:
            props["KV_CACHE_PRECISION"] = self.kv_cache_precision
        if self.inference_precision:
            props["INFERENCE_PRECISION_HINT"] = self.inference_precision
        return props


def precisions_in_effect(peer: OpenVINOPeer, props: dict[str, object]) -> tuple[str, str]:
    """KV cache and inference precision as the CPU plugin resolves them: the properties asked for, else the model's
    rt_info (the fp32 export asks for an f16 KV cache), else its defaults (u8 KV; bf16 where the CPU has it).
    NOTE: the pipeline does not expose its compiled model, so this compiles the same IR with the same properties
    once more and reads them back from that (checked once against the pipeline's KV bytes per block)."""
    import openvino as ov

    compiled = ov.Core().compile_model(peer.model_dir / "openvino_model.xml", "CPU", props)
    kv, precision = (compiled.get_property(name) for name in ("KV_CACHE_PRECISION", "INFERENCE_PRECISION_HINT"))
    return kv.get_type_name(), precision.get_type_name()


def run_openvino_closed_loop(peer: OpenVINOPeer, prompts: list[list[int]], concurrency: int, new_tokens: int,
                             threads: int) -> tuple[float, str, str]:
    """run_engine_closed_loop's workload through OpenVINO GenAI: every prompt, at most `concurrency` in flight, each
    replaced as soon as it finishes. Returns generated tokens/s and the KV cache and inference precisions in effect."""
    import numpy as np
    import openvino as ov
    import openvino_genai as ov_genai

    props = peer.properties(threads)
    kv, precision = precisions_in_effect(peer, props)
    scheduler = ov_genai.SchedulerConfig()
    scheduler.cache_size = 2  # GB
    scheduler.dynamic_split_fuse = True
    pipe = ov_genai.ContinuousBatchingPipeline(str(peer.model_dir), scheduler, "CPU", props)

    def config(num_tokens: int):
        c = ov_genai.GenerationConfig()
        c.max_new_tokens = c.min_new_tokens = num_tokens
        c.ignore_eos, c.do_sample = True, False
        return c

    def ids(p: list[int]):
        return ov.Tensor(np.array([p], dtype=np.int64))  # (1, T)

    pipe.add_request(len(prompts), ids(prompts[0][:8]), config(4))  # warm-up, as lmservice's run has
    while pipe.has_non_finished_requests():
        pipe.step()
    params = config(new_tokens)
    queue = list(enumerate(prompts))
    handles = {}
    generated = 0
    start = time.perf_counter()
    while queue or handles:
        while queue and len(handles) < concurrency:
            i, p = queue.pop(0)
            handles[i] = pipe.add_request(i, ids(p), params)
        pipe.step()
        for i, handle in list(handles.items()):
            if handle.get_status() != ov_genai.GenerationStatus.RUNNING:  # finished (or dropped: the assert says)
                generated += sum(len(out.generated_ids) for out in handle.read_all())
                del handles[i]
    elapsed = time.perf_counter() - start
    assert generated == len(prompts) * new_tokens, (generated, len(prompts), new_tokens)
    return generated / elapsed, kv, precision
