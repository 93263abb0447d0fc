"""`lmservice serve`: uvicorn running our app, with a graceful drain on SIGTERM.

SIGTERM: stop admitting (/ready -> 503, new model requests -> 503), let the
in-flight requests finish for up to settings.drain_timeout_s, abort the rest,
then shut uvicorn down and exit 0. SIGINT takes the same path with no grace:
in-flight requests are aborted at once (streams still end with their last chunk
and `[DONE]`), uvicorn and the engine shut down in order, and the process exits
within about a second, with status 1. A second signal during either exits at once.

The port is bound before the model loads: a busy port fails at once.

Connections are bounded by lmservice/api/protocol.py (header sizes and counts, header and body read
timeouts): half-sent or oversized requests cannot hold sockets or memory.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from types import FrameType

import uvicorn

from lmservice.api.app import TracingUnavailableError, create_app, open_tracing
from lmservice.api.jsonlog import configure_logging
from lmservice.api.protocol import HttpLimits, limited_protocol
from lmservice.config import Settings

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first signal drains instead of closing connections at once (SIGTERM for
    up to drain_timeout_s, SIGINT for none), and whose second signal aborts what runs and exits at once
    (see module docstring)."""

    def __init__(self, config: uvicorn.Config, drain, abort_all) -> None:
        super().__init__(config)
        self._drain = drain  # async (timeout_s) -> number aborted
        self._abort_all = abort_all  # async (grace_s) -> number aborted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self.draining = False
        self.interrupted = False  # the drain was a SIGINT's (no grace)
        self.forced = False
        self.drain_timeout_s = 0.0

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and sockets:  # uvicorn says where it listens only for sockets it bound itself
            host, port = sockets[0].getsockname()[:2]
            logger.info("listening", extra={"url": f"http://{f'[{host}]' if ':' in host else host}:{port}"})

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only schedule; the work runs on the loop.
        if self._loop is None or not self.started:
            super().handle_exit(sig, frame)
        elif not self.draining:
            self.draining = True
            self.interrupted = sig == signal.SIGINT
            self._loop.call_soon_threadsafe(self._start, self._drain_then_exit)
        elif not self.forced:
            self.forced = True
            self._loop.call_soon_threadsafe(self._start, self._abort_then_exit)

    def _start(self, work) -> None:
        task = asyncio.ensure_future(work())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_then_exit(self) -> None:
        # NOTE: a SIGINT takes the same path with no grace: in-flight requests are aborted at once (streams end
        # with their last chunk and [DONE]), then uvicorn shuts down in order, the app's lifespan included; a
        # forced exit instead would cancel the lifespan task (an error-level CancelledError traceback).
        timeout_s = 0.0 if self.interrupted else self.drain_timeout_s
        logger.info("SIGINT: aborting in-flight requests" if self.interrupted else "SIGTERM: draining",
                    extra={"drain_timeout_s": timeout_s})
        aborted = await self._drain(timeout_s)
        logger.info("drained", extra={"aborted": aborted})
        self.should_exit = True

    async def _abort_then_exit(self) -> None:
        logger.info("second signal: aborting every request and exiting")
        aborted = await self._abort_all(1.0)
        logger.info("aborted", extra={"aborted": aborted})
        await asyncio.sleep(0.1)  # the streams' last bytes leave the socket buffers
        self.should_exit = True
        self.force_exit = True


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound before the model loads, so a busy port is one clear line at once
    (OSError) rather than after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a SIGTERM's drain, 1 when the port cannot be bound, tracing is asked
    for without the otel extra, the model cannot be loaded, or the exit was a SIGINT's or forced by a second
    signal."""
    configure_logging(settings.log_level)
    try:
        sock = bind(settings.host, settings.port)
    except OSError as e:
        logger.error("cannot listen", extra={"host": settings.host, "port": settings.port, "error": str(e)})
        return 1
    try:
        tracing = open_tracing(settings)  # before the model loads: a missing extra is one line at once
    except TracingUnavailableError as e:
        logger.error("cannot trace", extra={"error": str(e)})
        sock.close()
        return 1
    from lmservice.serving.bootstrap import build_serving  # here: torch and the model only when serving

    try:
        # Loaded before uvicorn starts so that a bad model or adapter is one clear line and exit 1.
        serving = build_serving(settings)
    except (ValueError, OSError) as e:  # ModelConfigError, LoRAAdapterError, AdapterPathError, missing files
        logger.error("cannot load the model", extra={"error": str(e)})
        sock.close()
        return 1
    app = create_app(settings, serving, tracing=tracing)
    state = app.state.server
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level, timeout_graceful_shutdown=5, lifespan="on",
        http=limited_protocol(HttpLimits.from_settings(settings)),
    )
    server = DrainingServer(config, drain=state.drain, abort_all=state.abort_all)
    server.drain_timeout_s = settings.drain_timeout_s
    server.run(sockets=[sock])
    return 0 if server.started and not (server.forced or server.interrupted) else 1
