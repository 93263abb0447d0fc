"""`lmservice serve`: uvicorn running our app, with a graceful drain on SIGTERM.

SIGTERM: stop admitting (/ready -> 503, new model requests -> 503), let the
in-flight requests finish for up to settings.drain_timeout_s, abort the rest,
then shut uvicorn down and exit 0. A second SIGTERM, or SIGINT, exits at once:
in-flight requests are aborted (streams still end with their last chunk and
`[DONE]`), and the process exits within about a second, with status 1.

A connection must send its request headers within settings.header_read_timeout_s
of opening (or of starting its next request): half-sent requests cannot hold
sockets open.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lmservice.api.app import create_app
from lmservice.api.jsonlog import configure_logging
from lmservice.config import Settings

logger = logging.getLogger(__name__)


def header_timeout_protocol(timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol, closing connections whose request headers take over `timeout_s`."""

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            logger.info("closing a connection: request headers not received in time",
                        extra={"header_read_timeout_s": timeout_s})
            self.transport.close()

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing connections at once,
    and whose second SIGTERM (or a SIGINT) aborts what runs and exits (see module docstring)."""

    def __init__(self, config: uvicorn.Config, drain, abort_all) -> None:
        super().__init__(config)
        self._drain = drain  # async (timeout_s) -> number aborted
        self._abort_all = abort_all  # async (grace_s) -> number aborted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self.draining = False
        self.forced = False
        self.drain_timeout_s = 0.0

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: only schedule; the work runs on the loop.
        if self._loop is None or not self.started:
            super().handle_exit(sig, frame)
        elif sig == signal.SIGTERM and not self.draining:
            self.draining = True
            self._loop.call_soon_threadsafe(self._start, self._drain_then_exit)
        elif not self.forced:
            self.forced = True
            self._loop.call_soon_threadsafe(self._start, self._abort_then_exit)

    def _start(self, work) -> None:
        task = asyncio.ensure_future(work())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_then_exit(self) -> None:
        logger.info("SIGTERM: draining", extra={"drain_timeout_s": self.drain_timeout_s})
        aborted = await self._drain(self.drain_timeout_s)
        logger.info("drained", extra={"aborted": aborted})
        self.should_exit = True

    async def _abort_then_exit(self) -> None:
        logger.info("second signal: aborting every request and exiting")
        aborted = await self._abort_all(1.0)
        logger.info("aborted", extra={"aborted": aborted})
        await asyncio.sleep(0.1)  # the streams' last bytes leave the socket buffers
        self.should_exit = True
        self.force_exit = True


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain, 1 when the model cannot be loaded or
    a second signal forced the exit."""
    configure_logging(settings.log_level)
    from lmservice.serving.bootstrap import build_serving  # here: torch and the model only when serving

    try:
        # Loaded before uvicorn starts so that a bad model or adapter is one clear line and exit 1.
        serving = build_serving(settings)
    except (ValueError, OSError) as e:  # ModelConfigError, LoRAAdapterError, AdapterPathError, missing files
        logger.error("cannot load the model", extra={"error": str(e)})
        return 1
    app = create_app(settings, serving)
    state = app.state.server
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level, timeout_graceful_shutdown=5, lifespan="on",
        http=header_timeout_protocol(settings.header_read_timeout_s),
    )
    server = DrainingServer(config, drain=state.drain, abort_all=state.abort_all)
    server.drain_timeout_s = settings.drain_timeout_s
    server.run()
    return 0 if server.started and not server.forced else 1
