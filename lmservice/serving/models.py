"""The names a server answers to: its base model and the adapters on it, with the tasks each can do.

A request names a model (or none: the first able to do its task); the registry
resolves it to a `ModelEntry` before anything reaches the engine, and the engine
sees only the adapter's name. The registry holds names only (each with its card and
tasks); everything else about an adapter (its loads, the requests pinned to it, its
device slot, its score head) has one owner, the engine's AdapterTable
(lmservice/engine/adapters.py). Adapters are added and removed while serving: the
engine loads or drops them on its own thread (`AsyncEngine.call`), the registry
changes its table on the event loop, so a name is resolvable exactly while its
adapter is loaded. An adapter's files are read and checked on a thread of their own, one load at a
time, neither on the event loop nor on the engine thread (both serve every other request meanwhile);
the engine thread only takes the adapter already read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from lmservice.engine.outputs import RequestRejectedError
from lmservice.model.card import ModelCard
from lmservice.serving.adapters import (
    DEFAULT_MAX_ADAPTER_PATH_CHARS,
    AdapterPathError,
    check_adapter_name,
    check_adapter_path,
    resolve_adapter_dir,
)

if TYPE_CHECKING:  # torch: only where an engine is built
    from lmservice.engine.async_engine import AsyncEngine
    from lmservice.engine.engine import Engine
    from lmservice.model.lora import LoRAAdapter

T = TypeVar("T")
# (directory, name, root) -> the adapter read and checked, and its card; ValueError for a broken one.
# Pure: any thread may call it (bootstrap binds lmservice.model.lora.read_adapter to the base's shapes).
AdapterReader = Callable[[Path, str, Path], "tuple[LoRAAdapter, ModelCard]"]

log = logging.getLogger("lmservice.serving")

Task = str  # "generate" | "classify" | "translate" | "embed"


@dataclass(frozen=True)
class ModelEntry:
    """A servable name: the base model (parent None) or an adapter on it."""

    name: str
    parent: str | None
    card: ModelCard
    tasks: tuple[Task, ...] = field(default=())

    @property
    def adapter(self) -> str | None:
        """What the engine calls this model: the adapter's name, or None for the base."""
        return None if self.parent is None else self.name


def tasks_of(card: ModelCard, has_score_head: bool) -> tuple[Task, ...]:
    """What a model can serve. Every language model also embeds (mean-pooled final hidden states);
    a classifier serves its head only."""
    if card.task == "classify" or has_score_head:
        return ("classify",)
    if card.task == "translate":
        return ("translate", "generate", "embed")
    return ("generate", "embed")


class UnknownModelError(KeyError):
    """No model or adapter of that name is served (HTTP 404, `model_not_found`)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class ModelRegistry:
    """Invariant: the table changes only on the event loop's thread (or before the engine thread
    starts), and a name is in it exactly while its adapter is loaded in the engine."""

    def __init__(self, engine: AsyncEngine, base: ModelEntry, adapters_dir: Path | None = None,
                 read_adapter: AdapterReader | None = None,
                 max_adapter_path_chars: int = DEFAULT_MAX_ADAPTER_PATH_CHARS) -> None:
        self.engine = engine
        self.adapters_dir = adapters_dir
        self.read_adapter = read_adapter
        self.max_adapter_path_chars = max_adapter_path_chars
        self.num_load_failures = 0  # adapters whose files failed to load (the scan's skips, POST's 400s)
        self._entries: dict[str, ModelEntry] = {base.name: base}
        self._loading: set[str] = set()  # names being added right now (held against a second add)
        self._read_lock = asyncio.Lock()  # one adapter read at a time

    def models(self) -> list[ModelEntry]:
        return list(self._entries.values())

    @property
    def num_adapters(self) -> int:
        return sum(1 for e in self._entries.values() if e.parent is not None)

    # --- resolving a request's model ---
    def get(self, name: str | None) -> ModelEntry:
        """The entry named `name` whatever it can do (None: the base model); UnknownModelError if unknown."""
        if name is None:
            return next(e for e in self._entries.values() if e.parent is None)
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownModelError(name)
        return entry

    def resolve(self, name: str | None, task: Task) -> ModelEntry:
        """The entry named `name`, or the first able to do `task`. UnknownModelError for an unknown name,
        RequestRejectedError (param "model") when it cannot do `task`."""
        if name is None:
            for entry in self._entries.values():
                if task in entry.tasks:
                    return entry
            raise RequestRejectedError(f"no served model can do `{task}`", "model")
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownModelError(name)
        if task not in entry.tasks:
            raise RequestRejectedError(f"model `{name}` cannot do `{task}` (it does: {', '.join(entry.tasks)})",
                                       "model")
        return entry

    def resolve_translation(self, name: str | None, source: str | None, target: str | None) -> ModelEntry:
        """The translate model named `name`, or the first whose languages match source -> target (None:
        any). RequestRejectedError naming `source` or `target` when the languages do not match."""
        pair = f"{source or '*'} -> {target or '*'}"

        def matches(entry: ModelEntry) -> bool:
            langs = entry.card.languages
            return langs is not None and source in (None, langs.source) and target in (None, langs.target)

        if name is not None:
            entry = self.resolve(name, "translate")
            if not matches(entry):
                langs = entry.card.languages
                have = f"{langs.source} -> {langs.target}" if langs else "unknown languages"
                param = "source" if langs is not None and source not in (None, langs.source) else "target"
                raise RequestRejectedError(f"model {entry.name!r} translates {have}, not {pair}", param)
            return entry
        candidates = [e for e in self._entries.values() if "translate" in e.tasks]
        for entry in candidates:
            if matches(entry):
                return entry
        if not candidates:
            return self.resolve(None, "translate")  # raises "no served model can do `translate`"
        have = ", ".join(f"{e.name} ({e.card.languages.source} -> {e.card.languages.target})"
                         for e in candidates if e.card.languages)
        raise RequestRejectedError(f"no model translates {pair}; available: {have}", "source")

    # --- adapters, while serving ---
    async def add_adapter(self, name: str, directory: str) -> ModelEntry:
        """Load `directory` (relative to the adapters dir) as `name`. AdapterPathError for a refused name or
        path, ValueError/OSError for a broken adapter (counted in `num_load_failures`); nothing changes on
        failure. The event loop does only the checks whose cost does not grow with the input."""
        check_adapter_name(name)
        check_adapter_path(directory, self.max_adapter_path_chars)
        self._claim(name)
        try:
            async with self._read_lock:
                path, adapter, card = await self._counting_failures(
                    directory, _on_own_thread(lambda: self._resolve_and_read(directory, name)))
            await self.engine.call(lambda engine: engine.serve_adapter(adapter))  # its files are fine by now
        finally:
            self._loading.discard(name)
        return self._register(name, path, adapter, card)

    async def remove_adapter(self, name: str) -> None:
        """New requests can no longer name it at once; requests in flight on it finish. UnknownModelError
        if no adapter of that name is served."""
        entry = self._entries.get(name)
        if entry is None or entry.parent is None:
            raise UnknownModelError(name)
        self._entries = {k: v for k, v in self._entries.items() if k != name}
        await self.engine.call(lambda engine: engine.remove_adapter(name))
        log.info("adapter %s removed", name)

    def add_adapter_now(self, name: str, path: Path, root: Path | None = None) -> ModelEntry:
        """At start-up, before the engine thread runs: `path` as given (--adapter NAME=DIR, or the scan of
        the adapters dir, `root`: every file read must lie inside it; default: inside `path`)."""
        self._claim(name)
        try:
            adapter, card = self._read(path, name, root or path)
            self.engine.call_now(lambda engine: engine.serve_adapter(adapter))
        finally:
            self._loading.discard(name)
        return self._register(name, path, adapter, card)

    def record_load_failure(self, path: Path, reason: object) -> None:
        """An adapter that failed to load: one log line naming it and why, and one more in the count."""
        self.num_load_failures += 1
        log.warning("adapter %s not loaded: %s", path, reason)

    def _resolve_and_read(self, directory: str, name: str) -> tuple[Path, LoRAAdapter, ModelCard]:
        path = resolve_adapter_dir(self.adapters_dir, directory)
        return (path, *self._read(path, name, self.adapters_dir))

    def _read(self, path: Path, name: str, root: Path | None) -> tuple[LoRAAdapter, ModelCard]:
        if self.read_adapter is None:
            raise AdapterPathError("this server cannot load adapters")
        return self.read_adapter(Path(path), name, Path(root or path))

    async def _counting_failures(self, directory: str, work: Any) -> Any:
        """`await work`; a failure of the adapter's files (not AdapterPathError: the request's mistake) is
        logged and counted before it is raised."""
        try:
            return await work
        except AdapterPathError:
            raise
        except (ValueError, OSError) as e:
            self.record_load_failure(Path(self.adapters_dir or ".") / directory, e)
            raise

    def _claim(self, name: str) -> None:
        if name in self._entries or name in self._loading:
            raise AdapterPathError(f"the name {name!r} is already in use")
        self._loading.add(name)

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._loading

    def _register(self, name: str, path: Path, adapter, card: ModelCard) -> ModelEntry:
        base = next(e for e in self._entries.values() if e.parent is None)
        entry = ModelEntry(name, base.name, card, tasks_of(card, adapter.score_weight is not None))
        self._entries = {**self._entries, name: entry}
        log.info("adapter %s loaded from %s (tasks: %s)", name, path, ", ".join(entry.tasks))
        return entry


async def _on_own_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a thread that ends with it. NOTE: not a pool shared with other work: a thread that runs a
    parallel torch op keeps an OpenMP team alive as long as it lives (lmservice/serving/bootstrap.py)."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmservice-adapter")
    try:
        return await asyncio.get_running_loop().run_in_executor(pool, fn)
    finally:
        pool.shutdown(wait=False)


def base_entry(engine: Engine) -> ModelEntry:
    loaded = engine.loaded
    return ModelEntry(loaded.name, None, loaded.card, tasks_of(loaded.card, loaded.model.score is not None))
