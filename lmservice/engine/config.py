"""The engine's configuration and every one of its defaults (torch-free).

EngineConfig nests the scheduler's config and the per-request limits; Settings
(lmservice/config.py) takes its defaults from these classes under the same field
names, and lmservice/serving/bootstrap.py maps settings onto them by name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lmservice.engine.sampling_params import RequestLimits
from lmservice.engine.scheduler import SchedulerConfig


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """Every engine default lives here or in the two configs it nests (Settings takes its defaults
    from them). A field's name is the same everywhere: here, in Settings, and as a CLI flag."""

    block_size: int = 16  # tokens per KV-cache block
    kv_cache_memory_mb: int = 1024
    kv_cache_dtype: str = "auto"  # auto (int8 under quantized weights, else the model's dtype) | fp32 | fp16 | bf16 | int8
    num_kv_blocks: int | None = None  # overrides kv_cache_memory_mb
    enable_prefix_caching: bool = True
    max_lora_rank: int = 64
    attention_backend: str = "auto"  # auto | torch | native | triton
    cpu_kernels: str = "auto"  # auto | native | torch: whether the native C kernels run (lmservice/kernels/cpu_policy.py)
    enable_cuda_graphs: bool = True  # decode steps as CUDA graphs (CUDA only)
    seed: int = 0  # of the sampler, for requests that carry none
    # speculative decoding (lmservice/engine/speculative.py): None (off), "ngram" or "draft:DIR"
    speculative: str | None = None
    num_speculative_tokens: int = 3  # guesses per sequence per step
    speculative_ngram_min: int = 2  # n-gram prompt lookup: shortest suffix matched (one token guesses badly)
    speculative_ngram_max: int = 4  # ... and longest (tried first)
    speculative_disable_batch_size: int = 2  # no guesses in steps with more decoding sequences than this (measured: docs/benchmarks.md)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    limits: RequestLimits = field(default_factory=RequestLimits)

    _NESTED = {"scheduler": SchedulerConfig, "limits": RequestLimits}

    @classmethod
    def field_names(cls) -> set[str]:
        """The flat names of every setting, nested ones included."""
        own = {f.name for f in fields(cls)} - cls._NESTED.keys()
        return own.union(*({f.name for f in fields(sub)} for sub in cls._NESTED.values()))

    @classmethod
    def from_fields(cls, **values: Any) -> EngineConfig:
        """The config from flat names (Settings' fields, or keyword arguments): each value goes to the
        config that has a field of its name. An unknown name is a TypeError."""
        unknown = set(values) - cls.field_names()
        if unknown:
            raise TypeError(f"not engine settings: {sorted(unknown)}")
        nested = {name: sub(**_pick(sub, values)) for name, sub in cls._NESTED.items()}
        return cls(**_pick(cls, values), **nested)


def _pick(cls, values: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: values[f.name] for f in fields(cls) if f.name in values}
