"""The KV cache's tensors: every layer's K and V in one allocation, stored as --kv-cache-dtype says.

The formats (fp32, fp16, bf16, or int8 with a scale per token and head) are lmservice/kernels/kv_cache.py's; the
kernels widen them as they read. Blocks are the unit the block pool hands out (lmservice/engine/block_pool.py),
whatever the format: an int8 cache's scales are indexed by the same slots, so prefix caching and preemption
never see the format, only how many blocks a memory budget buys.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmservice.kernels.kv_cache import (
    INT8_KV_SCALE_DTYPE,
    KV_CACHE_DTYPES,
    LayerKVCache,
    kv_bytes_per_token_head,
    kv_cache_dtype,
)
from lmservice.model.config import GPT2Config

KV_CACHE_DTYPE_NAMES = {dtype: name for name, dtype in KV_CACHE_DTYPES.items()}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, quantization: str = "none") -> torch.dtype:
    """--kv-cache-dtype's value for a model in `model_dtype` with `quantization`: auto stores the model's own
    dtype, except under 8- or 4-bit weights, where it stores int8. An int8 cache served 1.05-1.4x the tokens/s of
    an fp32 one with int8 weights (the more, the more sequences) at no measurable perplexity (docs/benchmarks.md),
    and quantized weights already give up fp32's exact tokens; an unquantized model keeps the invariant that an
    fp32 model gives transformers' tokens."""
    if name != "auto":
        return kv_cache_dtype(name)
    return torch.int8 if quantization in ("int8", "int4") else model_dtype


def kv_cache_bytes_per_block(config: GPT2Config, block_size: int, dtype: torch.dtype) -> int:
    """Bytes of one block of every layer's K and V in `dtype`'s cache, int8 scales included."""
    return 2 * config.n_layer * block_size * config.n_head * kv_bytes_per_token_head(config.head_dim, dtype)


@dataclass
class KVCacheTensors:
    """Every layer's K and V in one tensor, an int8 cache's scales in a second; `layers` are views into them.
    NOTE: not zeroed (a GiB of zeros is a third of a second of start-up): no kernel reads a slot before it is
    written (the kernel tests poison fresh caches with NaN to prove it), and untouched pages cost no memory."""

    buffer: torch.Tensor  # (n_layer, 2, num_blocks, block_size, n_head, head_dim) in the storage dtype
    scales: torch.Tensor | None  # int8: (n_layer, 2, num_blocks, block_size, n_head) fp32; else None
    layers: list[LayerKVCache]  # layer i's K and V (and scales): views into the two above

    @classmethod
    def allocate(cls, config: GPT2Config, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> KVCacheTensors:
        c = config
        buffer = torch.empty(c.n_layer, 2, num_blocks, block_size, c.n_head, c.head_dim, dtype=dtype, device=device)
        scales = None
        if dtype == torch.int8:
            scales = torch.empty(c.n_layer, 2, num_blocks, block_size, c.n_head, dtype=INT8_KV_SCALE_DTYPE,
                                 device=device)
        layers = [LayerKVCache(buffer[i, 0], buffer[i, 1], *((scales[i, 0], scales[i, 1]) if scales is not None else ()))
                  for i in range(c.n_layer)]
        return cls(buffer, scales, layers)

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Block src[i] -> block dst[i] in every layer, K and V, with an int8 cache's scales (copy-on-write of a
        shared block). src, dst: (num_copies,) int64 on the cache's device, every source read before any write."""
        self.buffer[:, :, dst] = self.buffer[:, :, src]  # (n_layer, 2, num_copies, block_size, n_head, head_dim)
        if self.scales is not None:
            self.scales[:, :, dst] = self.scales[:, :, src]

    def describe(self) -> dict[str, str | int]:
        """For the start-up log, /metrics (lmservice_cache_config_info, lmservice_kv_cache_bytes) and benchmarks:
        the storage dtype (fp32, fp16, bf16, int8), blocks, tokens per block, and bytes with the int8 scales."""
        return {"dtype": KV_CACHE_DTYPE_NAMES[self.buffer.dtype], "num_blocks": self.buffer.shape[2],
                "block_size": self.buffer.shape[3],
                "bytes": self.buffer.nbytes + (self.scales.nbytes if self.scales is not None else 0)}
