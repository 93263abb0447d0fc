"""The engine as the API sees it: an engine loop in one worker thread, an async stream per request.

The asyncio event loop never waits on model compute: add_request and abort only
validate and enqueue; the worker thread runs `Engine.step()` and hands each
step's outputs back with one `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import re
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from service.config import DEFAULT_ADAPTERS_DIR, DEFAULT_MODEL_DIR, Settings
from service.engine.engine import Engine, EngineConfig, EngineStats
from service.engine.outputs import EngineRequestError, RequestOutput, RequestRejectedError
from service.engine.sampling_params import SamplingParams
from service.model.card import ModelCard
from service.model.loader import LoadedModel, load_model

log = logging.getLogger("lmservice.engine")

ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # used with fullmatch: no trailing newline


class AdapterPathError(ValueError):
    """An adapter name or directory the server refuses (outside the adapters dir, bad name): HTTP 400."""


@dataclass
class ModelEntry:
    """A servable name: the base model or an adapter on it."""

    name: str
    parent: str | None
    card: ModelCard
    tasks: list[str] = field(default_factory=list)


def tasks_of(card: ModelCard, has_score_head: bool) -> list[str]:
    if card.task == "classify" or has_score_head:
        return ["classify"]
    if card.task == "translate":
        return ["translate", "generate"]
    return ["generate"]


class RequestStream:
    """Async iterator over one request's RequestOutput events; ends after the finished one."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self.finished = False

    def put(self, out: RequestOutput) -> None:
        self._queue.put_nowait(out)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            out = await self._queue.get()
            if out.finished:
                self.finished = True
            if out.error is not None:
                raise EngineRequestError(out.error)
            yield out


class AsyncEngine:
    def __init__(self, engine: Engine, entries: list[ModelEntry], adapters_dir: Path | None = None) -> None:
        self.engine = engine
        self.adapters_dir = adapters_dir
        self._entries = {e.name: e for e in entries}
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: BaseException | None = None
        # Admitted adds not yet taken by the engine thread: the queue bounds count them too.
        self._pending_lock = threading.Lock()
        self._pending_seqs = 0
        self._pending_tokens = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> AsyncEngine:
        """The base model and its adapters: every --adapter NAME=DIR, and every PEFT directory under
        --adapters-dir (with no --model given, the shipped models/ directory)."""
        loaded = load_model(settings.model, settings.device, settings.dtype, settings.served_model_name)
        adapters_dir = settings.adapters_dir
        if adapters_dir is None and Path(settings.model).resolve() == DEFAULT_MODEL_DIR.resolve():
            adapters_dir = DEFAULT_ADAPTERS_DIR
        adapters = find_adapters(adapters_dir) if adapters_dir is not None else {}
        adapters.update(settings.adapter_dirs())
        return cls.from_loaded(loaded, engine_config(settings), adapters, adapters_dir)

    @classmethod
    def from_loaded(cls, loaded: LoadedModel, config: EngineConfig, adapters: dict[str, Path] | None = None,
                    adapters_dir: Path | None = None) -> AsyncEngine:
        engine = Engine(loaded, config)
        base = ModelEntry(loaded.name, None, loaded.card, tasks_of(loaded.card, loaded.model.score is not None))
        self = cls(engine, [base], adapters_dir)
        for name, path in (adapters or {}).items():
            self._register_adapter(name, path)
        return self

    def _register_adapter(self, name: str, path: Path) -> ModelEntry:
        if name in self._entries:
            raise AdapterPathError(f"the name {name!r} is already in use")
        adapter, card = self.engine.add_adapter(name, path)
        entry = ModelEntry(name, self.engine.loaded.name, card, tasks_of(card, adapter.score_weight is not None))
        # NOTE: replaced, never mutated: the event loop reads _entries while the engine thread writes it
        self._entries = {**self._entries, name: entry}
        log.info("adapter %s loaded from %s (tasks: %s)", name, path, ", ".join(entry.tasks))
        return entry

    def _unregister_adapter(self, name: str) -> None:
        entry = self._entries.get(name)
        if entry is None or entry.parent is None:
            raise KeyError(name)
        self.engine.remove_adapter(name)
        self._entries = {k: v for k, v in self._entries.items() if k != name}

    # --- what the API reads ---
    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def eos_token_id(self) -> int | None:
        return self.engine.eos_token_id

    def models(self) -> list[ModelEntry]:
        return list(self._entries.values())

    def get_model(self, name: str | None, task: str) -> ModelEntry:
        """The entry named `name` (KeyError when unknown), or the first able to do `task`."""
        if name is None:
            for entry in self._entries.values():
                if task in entry.tasks:
                    return entry
            raise RequestRejectedError(f"no served model can do `{task}`", "model")
        entry = self._entries.get(name)
        if entry is None:
            raise KeyError(name)
        if task not in entry.tasks:
            raise RequestRejectedError(f"model `{name}` cannot do `{task}` (it does: {', '.join(entry.tasks)})", "model")
        return entry

    # --- lifecycle ---
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="lmservice-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failed is None

    def stats(self) -> EngineStats:
        """Counters now (plain reads of ints under the GIL; never waits for a step)."""
        return self.engine.stats()

    # --- adapters, changed while serving (on the engine thread, which owns them) ---
    def resolve_adapter_dir(self, name: str, directory: str) -> Path:
        """`directory` inside the adapters dir, or AdapterPathError (no path traversal, no absolute escape)."""
        if not ADAPTER_NAME.fullmatch(name):
            raise AdapterPathError(f"adapter name {name!r} must be 1-64 of [A-Za-z0-9._-], starting with a letter or digit")
        if self.adapters_dir is None:
            raise AdapterPathError("this server has no adapters dir (--adapters-dir): it cannot load adapters")
        root = Path(self.adapters_dir).resolve()
        path = (root / directory).resolve()
        if path == root or root not in path.parents:
            raise AdapterPathError(f"adapter directory {directory!r} is outside the adapters dir")
        return path

    async def add_adapter(self, name: str, directory: str) -> ModelEntry:
        path = self.resolve_adapter_dir(name, directory)
        return await self._on_engine_thread(lambda: self._register_adapter(name, path))

    async def remove_adapter(self, name: str) -> None:
        await self._on_engine_thread(lambda: self._unregister_adapter(name))

    async def _on_engine_thread(self, fn: Callable):
        self._check_alive()
        future: Future = Future()
        self._commands.put(("call", (fn, future)))
        self._wakeup.set()
        return await asyncio.wrap_future(future)

    # --- requests ---
    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    model: str | None = None, priority: int = 0, task: str = "generate") -> RequestStream:
        """Validate, check admission and enqueue; never waits for the engine thread."""
        return self.add_requests([(request_id, prompt_token_ids)], params, model, priority, task)[0]

    def add_requests(self, prompts: list[tuple[str, list[int]]], params: SamplingParams,
                     model: str | None = None, priority: int = 0, task: str = "generate") -> list[RequestStream]:
        """Several prompts with the same parameters (one HTTP request), admitted all or none: each is
        validated, then the queue bounds are checked once for their sum, so a request too big for the
        queue is refused whole and never takes room from other clients meanwhile."""
        entry = self.get_model(model, "classify" if task == "classify" else "generate")
        adapter = entry.name if entry.parent is not None else None
        self._check_alive()
        ids_seen = set()
        for request_id, prompt_token_ids in prompts:
            if request_id in self._streams or request_id in ids_seen:
                raise RequestRejectedError(f"request id {request_id!r} is already in use", "request_id")
            ids_seen.add(request_id)
            self.engine.validate_request(prompt_token_ids, params, task)
        n = 1 if task == "classify" else params.n
        num_seqs = n * len(prompts)
        num_tokens = n * sum(len(ids) for _, ids in prompts)
        with self._pending_lock:
            self.engine.scheduler.check_admission(num_seqs + self._pending_seqs, num_tokens + self._pending_tokens)
            self._pending_seqs += num_seqs
            self._pending_tokens += num_tokens
        streams = [RequestStream(request_id) for request_id, _ in prompts]
        for stream in streams:
            self._streams[stream.request_id] = stream
        adds = [(request_id, ids, params, adapter, priority, task) for request_id, ids in prompts]
        self._commands.put(("add", (adds, num_seqs, num_tokens)))
        self._wakeup.set()
        return streams

    def _check_alive(self) -> None:
        if self._failed is not None:
            raise EngineRequestError(f"the engine loop died: {self._failed}")

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wakeup.set()

    # --- the worker thread ---
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if self.engine.has_unfinished():
                    outputs = self.engine.step()
                    self._dispatch(outputs)
                    if not outputs and not self.engine.scheduler.running:
                        self._wakeup.wait(0.01)  # nothing could be scheduled: don't spin
                        self._wakeup.clear()
                else:
                    self._wakeup.wait(0.5)
                    self._wakeup.clear()
        except BaseException as e:  # noqa: BLE001 (reported through is_alive and the streams)
            log.exception("engine loop died")
            self._failed = e
            self._fail_all(f"engine loop died: {e}")

    def _drain_commands(self) -> None:
        outputs = []
        while True:
            try:
                kind, payload = self._commands.get_nowait()
            except queue.Empty:
                break
            if kind == "add":
                adds, num_seqs, num_tokens = payload
                for args in adds:
                    try:
                        self.engine.add_request(*args, admitted=True)
                    except Exception as e:  # noqa: BLE001 (e.g. an adapter removed meanwhile: fails alone)
                        outputs.append(RequestOutput(request_id=args[0], outputs=[], finished=True, error=str(e)))
                with self._pending_lock:  # after the adds: the bound never undercounts
                    self._pending_seqs -= num_seqs
                    self._pending_tokens -= num_tokens
            elif kind == "abort":
                out = self.engine.abort(payload)
                if out is not None:
                    outputs.append(out)
            elif kind == "call":
                fn, future = payload
                try:
                    future.set_result(fn())
                except Exception as e:  # noqa: BLE001 (handed to the awaiting caller)
                    future.set_exception(e)
        if outputs:
            self._dispatch(outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if outputs and self._loop is not None:
            self._loop.call_soon_threadsafe(self._deliver, outputs)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            stream.put(out)

    def _fail_all(self, message: str) -> None:
        failed = [RequestOutput(request_id=rid, outputs=[], finished=True, error=message) for rid in list(self._streams)]
        self._dispatch(failed)


def find_adapters(directory: Path) -> dict[str, Path]:
    """Every PEFT adapter directory (one holding adapter_config.json) directly under `directory`, named
    as the adapter name rule allows. A symlink that leads outside the directory is skipped with a
    warning: the scan trusts no more than POST /v1/adapters does."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterPathError(f"adapters dir {directory} does not exist")
    root = directory.resolve()
    found = {}
    for path in sorted(directory.iterdir()):
        if not (path / "adapter_config.json").is_file():
            continue
        real = path.resolve()
        if real == root or root not in real.parents:
            log.warning("skipping adapter %s: it leads outside the adapters dir (to %s)", path.name, real)
        elif not ADAPTER_NAME.fullmatch(path.name):
            log.warning("skipping adapter directory %r: not a valid adapter name", path.name)
        else:
            found[path.name] = path
    return found


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        block_size=settings.block_size, kv_cache_memory_mb=settings.kv_cache_memory_mb,
        num_kv_blocks=settings.num_kv_blocks, max_num_batched_tokens=settings.max_num_batched_tokens,
        max_num_seqs=settings.max_num_seqs, enable_prefix_caching=settings.enable_prefix_caching,
        max_waiting_requests=settings.max_waiting_requests, max_waiting_tokens=settings.max_waiting_tokens,
        max_loras=settings.max_loras, max_lora_rank=settings.max_lora_rank,
        enable_cuda_graphs=settings.enable_cuda_graphs, attention_backend=settings.attention_backend, seed=settings.seed,
        limits=settings.request_limits())
