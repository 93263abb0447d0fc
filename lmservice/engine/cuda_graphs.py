"""Decode steps replayed as CUDA graphs, one per batch-size bucket.

A small model's decode step is launch-bound on a GPU (about 140 kernels for
GPT-2 small). Each bucket's forward is captured once over static input buffers;
a step copies its inputs into them, pads up to the bucket (slot -1: nothing
written; seq_len 0: the decode kernel returns zeros for the row) and replays.
The block-table width is fixed at the model's whole context, so the decode
kernel's split count, chosen from shapes only, is fixed at capture.

`capture=False` runs the same padded static-buffer path eagerly: that is how the
padding logic is tested on machines without a GPU.
"""

from __future__ import annotations

import torch

from lmservice.engine.fast_path import StepBatch
from lmservice.kernels import KernelOps
from lmservice.model.gpt2 import AttentionMetadata, GPT2ForServing

_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


class DecodeGraphs:
    """One of the decode fast paths (fast_path.py): pure decode steps without LoRA, up to max_batch sequences."""

    name = "CUDA graphs"

    def __init__(self, model: GPT2ForServing, ops: KernelOps, kv_caches: list, max_batch: int, max_blocks: int,
                 device: torch.device, capture: bool = True) -> None:
        self.model, self.ops, self.kv_caches = model, ops, kv_caches
        self.buckets = [b for b in _BUCKETS if b < max_batch] + [max_batch]
        size = self.buckets[-1]
        self.max_blocks = max_blocks
        self.input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self.positions = torch.zeros(size, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((size,), -1, dtype=torch.long, device=device)
        self.seq_lens = torch.zeros(size, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(size, max_blocks, dtype=torch.int32, device=device)
        self._no_prefill = (torch.zeros(1, dtype=torch.int32, device=device), torch.zeros(0, dtype=torch.int32, device=device),
                            torch.zeros(0, max_blocks, dtype=torch.int32, device=device))
        self.capture = capture
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        if capture:
            pool = None
            for b in reversed(self.buckets):  # largest first: the others reuse its memory pool
                pool = self._capture(b, pool)

    def _forward(self, b: int) -> torch.Tensor:
        cu, lens, tables = self._no_prefill
        meta = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], num_decode_tokens=b, decode_seq_lens=self.seq_lens[:b],
            decode_block_tables=self.block_tables[:b], prefill_cu_seqlens_q=cu, prefill_seq_lens=lens,
            prefill_block_tables=tables)
        return self.model(self.input_ids[:b], self.positions[:b], meta, self.kv_caches, self.ops)

    @torch.inference_mode()
    def _capture(self, b: int, pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: autotuning and lazy allocations stay out of the graph
            for _ in range(2):
                self._forward(b)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            self.outputs[b] = self._forward(b)
        self.graphs[b] = graph
        return graph.pool()

    def can_run(self, batch: StepBatch) -> bool:
        return batch.is_plain_decode and batch.num_decodes <= self.buckets[-1]

    def run(self, batch: StepBatch) -> torch.Tensor:
        """Hidden states (n, C) of n decode tokens, one per sequence."""
        n, width = batch.block_tables.shape
        b = next(size for size in self.buckets if size >= n)
        self.input_ids[:n].copy_(torch.tensor(batch.input_ids))
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.slot_mapping[n:b].fill_(-1)  # padding rows write nothing
        self.seq_lens[:n].copy_(batch.seq_lens)
        self.seq_lens[n:b].zero_()  # and attend to nothing
        self.block_tables[:n, :width].copy_(batch.block_tables)
        if not self.capture:
            return self._forward(b)[:n]
        self.graphs[b].replay()
        return self.outputs[b][:n]
