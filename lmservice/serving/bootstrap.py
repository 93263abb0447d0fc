"""Everything a server or the CLI runs on, built from Settings: the one place settings meet the engine.

`engine_config` maps settings to the engine's config by field name (the engine's
configs hold every default; Settings takes them from there), so a new engine
field is one line in its config and one in Settings, and tests/engine check
that the two agree.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from lmservice.config import DEFAULT_ADAPTERS_DIR, DEFAULT_MODEL_DIR, Settings
from lmservice.engine.async_engine import AsyncEngine
from lmservice.engine.engine import Engine, EngineConfig
from lmservice.model.loader import load_model
from lmservice.model.lora import read_adapter
from lmservice.serving import allocator
from lmservice.serving.adapters import DEFAULT_MAX_ADAPTER_PATH_CHARS, find_adapters
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
    11.7 ms in the server against 7.9 in process (docs/benchmarks.md). A thread that ends takes its team with it.

    The process's malloc is held to a few arenas from here on, and its heap trimmed while the engine idles
    (lmservice/serving/allocator.py)."""
    allocator.limit_arenas()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmservice-load") as pool:
        serving = pool.submit(_build_serving, settings).result()
    _idle_trimmer(serving.engine).start()
    return serving


def _idle_trimmer(engine: AsyncEngine) -> allocator.IdleTrimmer:
    """Trims after work, while nothing runs or waits; ends once the engine thread has run and stopped."""
    num_steps = 0
    was_alive = False

    def steps_done() -> int:
        nonlocal num_steps
        num_steps = engine.step_samples_since(num_steps)[1]
        return num_steps

    def is_idle() -> bool:
        stats = engine.stats()
        return stats.num_running == 0 and stats.num_waiting == 0

    def is_done() -> bool:
        nonlocal was_alive
        alive = engine.is_alive()
        was_alive = was_alive or alive
        return was_alive and not alive

    return allocator.IdleTrimmer(is_idle, steps_done, is_done)


def _build_serving(settings: Settings) -> Serving:
    adapters_dir = settings.adapters_dir
    if adapters_dir is None and Path(settings.model).resolve() == DEFAULT_MODEL_DIR.resolve():
        adapters_dir = DEFAULT_ADAPTERS_DIR
    serving = serving_for(build_engine(settings), settings.adapter_dirs(), adapters_dir,
                          max_structured_spec_bytes=settings.max_structured_spec_bytes,
                          max_adapter_path_chars=settings.max_adapter_path_chars)
    if adapters_dir is not None:
        load_adapters_dir(serving.models, adapters_dir)
    return serving


def load_adapters_dir(models: ModelRegistry, adapters_dir: Path) -> None:
    """Every adapter under `adapters_dir` that loads (a name given with --adapter wins over the scan's).
    One that does not (its files broken, leading outside the dir, or its name refused) is skipped with one
    log line naming it and why, and counted in `models.num_load_failures`: one bad file does not keep
    the server or the other adapters from starting."""
    found, refused = find_adapters(adapters_dir)
    for path, reason in refused.items():
        models.record_load_failure(path, reason)
    for name, path in found.items():
        if name in models:
            continue
        try:
            models.add_adapter_now(name, path, root=adapters_dir)
        except (ValueError, OSError) as e:  # LoRAAdapterError names the file and field; OSError: unreadable
            models.record_load_failure(path, e)


def serving_for(engine: Engine, adapters: dict[str, Path] | None = None,
                adapters_dir: Path | None = None, max_structured_spec_bytes: int = 65536,
                max_adapter_path_chars: int = DEFAULT_MAX_ADAPTER_PATH_CHARS) -> Serving:
    """An engine with these adapters loaded (a broken one raises), and its registry (tests build engines
    this way too)."""
    async_engine = AsyncEngine(engine, handoff_timeout_s=HANDOFF_TIMEOUT_S if engine.loaded.device.type == "cpu" else None)
    reader = partial(_read_adapter, engine.adapters.targets, engine.adapters.max_lora_rank)
    models = ModelRegistry(async_engine, base_entry(engine), adapters_dir, read_adapter=reader,
                           max_adapter_path_chars=max_adapter_path_chars)
    for name, path in (adapters or {}).items():
        models.add_adapter_now(name, path)
    grammars = GrammarCompiler(engine.tokenizer, engine.vocab_size, max_spec_bytes=max_structured_spec_bytes)
    return Serving(async_engine, models, grammars)


def _read_adapter(targets, max_lora_rank: int, path: Path, name: str, root: Path):
    return read_adapter(path, targets, max_lora_rank, name=name, root=root)
