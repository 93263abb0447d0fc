"""Everything a server or the CLI runs on, built from Settings: the one place settings meet the engine.

`engine_config` maps settings to the engine's config by field name (the engine's
configs hold every default; Settings takes them from there), so a new engine
field is one line in its config and one in Settings, and tests/engine check
that the two agree.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from lmservice.config import DEFAULT_ADAPTERS_DIR, DEFAULT_MODEL_DIR, Settings
from lmservice.engine.async_engine import AsyncEngine
from lmservice.engine.engine import Engine, EngineConfig
from lmservice.model.loader import load_model
from lmservice.serving.adapters import find_adapters
from lmservice.serving.models import ModelRegistry, base_entry
from lmservice.serving.structured import GrammarCompiler

# On a CPU the engine thread waits after each step, at most this long, for the event loop to take the step's
# outputs (AsyncEngine): 1.4x the int8 throughput at 32 concurrent streams on 2 cores in one A/B (docs/benchmarks.md).
HANDOFF_TIMEOUT_S = 0.02


@dataclass(frozen=True)
class Serving:
    """What the API serves: the engine (its thread not yet started) and the names it answers to."""

    engine: AsyncEngine
    models: ModelRegistry
    grammars: GrammarCompiler


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig.from_fields(**{name: getattr(settings, name) for name in EngineConfig.field_names()})


def build_engine(settings: Settings) -> Engine:
    """The synchronous engine on the base model (`lmservice generate`)."""
    if settings.threads:
        torch.set_num_threads(settings.threads)
    loaded = load_model(settings.model, settings.device, settings.dtype, settings.served_model_name,
                        quantization=settings.quantization, linear_backend=settings.linear_backend)
    return Engine(loaded, engine_config(settings))


def build_serving(settings: Settings) -> Serving:
    """The base model and its adapters: every --adapter NAME=DIR, and every PEFT directory under
    --adapters-dir (with no --model given, the shipped models/ directory). Raises ValueError/OSError
    for a model or adapter that cannot be loaded.

    Built on a thread of its own that ends when they are loaded. NOTE: a thread that runs a parallel torch op
    on a CPU becomes the master of an OpenMP team, whose workers live as long as it does. Loading on the main
    thread left its team alive beside the engine thread's, and with more OpenMP threads than cores libgomp
    stops spinning at barriers: every parallel region of every step then put its workers to sleep and woke
    them (~75 context switches per decode step, each a wake-up of an idle vCPU), and an int8 batch-1 step took
    11.7 ms in the server against 7.9 in process (docs/benchmarks.md). A thread that ends takes its team with it."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmservice-load") as pool:
        return pool.submit(_build_serving, settings).result()


def _build_serving(settings: Settings) -> Serving:
    adapters_dir = settings.adapters_dir
    if adapters_dir is None and Path(settings.model).resolve() == DEFAULT_MODEL_DIR.resolve():
        adapters_dir = DEFAULT_ADAPTERS_DIR
    adapters = find_adapters(adapters_dir) if adapters_dir is not None else {}
    adapters.update(settings.adapter_dirs())
    return serving_for(build_engine(settings), adapters, adapters_dir,
                       max_structured_spec_bytes=settings.max_structured_spec_bytes)


def serving_for(engine: Engine, adapters: dict[str, Path] | None = None,
                adapters_dir: Path | None = None, max_structured_spec_bytes: int = 65536) -> Serving:
    """An engine with these adapters loaded, and its registry (tests build engines this way too)."""
    async_engine = AsyncEngine(engine, handoff_timeout_s=HANDOFF_TIMEOUT_S if engine.loaded.device.type == "cpu" else None)
    models = ModelRegistry(async_engine, base_entry(engine), adapters_dir)
    for name, path in (adapters or {}).items():
        models.add_adapter_now(name, path)
    grammars = GrammarCompiler(engine.tokenizer, engine.vocab_size, max_spec_bytes=max_structured_spec_bytes)
    return Serving(async_engine, models, grammars)
