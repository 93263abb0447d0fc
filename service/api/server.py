"""`lmservice serve`: uvicorn running our app, with a graceful drain on SIGTERM.

SIGTERM: stop admitting (/ready -> 503, new model requests -> 503), let the
in-flight requests finish for up to settings.drain_timeout_s, abort the rest,
then shut uvicorn down and exit 0. A second SIGTERM, or SIGINT, exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType

import uvicorn

from service.api.app import create_app
from service.api.jsonlog import configure_logging
from service.config import Settings

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server whose first SIGTERM drains instead of closing connections at once."""

    def __init__(self, config: uvicorn.Config, drain) -> None:
        super().__init__(config)
        self._drain = drain  # async (timeout_s) -> number aborted
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None
        self.drain_timeout_s = 0.0

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGTERM and self._drain_task is None and self._loop is not None and self.started:
            # Runs in the signal handler: only schedule; the drain itself runs on the loop.
            self._loop.call_soon_threadsafe(self._begin_drain)
            self._drain_task = asyncio.Future()  # placeholder until the loop creates the task
            return
        super().handle_exit(sig, frame)

    def _begin_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    async def _drain_then_exit(self) -> None:
        logger.info("SIGTERM: draining", extra={"drain_timeout_s": self.drain_timeout_s})
        aborted = await self._drain(self.drain_timeout_s)
        logger.info("drained", extra={"aborted": aborted})
        self.should_exit = True


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; 0 after a clean drain, 1 when the model cannot be loaded."""
    configure_logging(settings.log_level)
    from service.engine.async_engine import AsyncEngine  # noqa: PLC0415  (torch and the model: only when serving)

    try:
        # Loaded before uvicorn starts so that a bad model or adapter is one clear line and exit 1.
        engine = AsyncEngine.from_settings(settings)
    except (ValueError, OSError) as e:  # ModelConfigError, LoRAAdapterError, AdapterPathError, missing files
        logger.error("cannot load the model", extra={"error": str(e)})
        return 1
    app = create_app(settings, engine)
    state = app.state.server
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_config=None, access_log=False,
        log_level=settings.log_level, timeout_graceful_shutdown=5, lifespan="on",
    )
    server = DrainingServer(config, drain=state.drain)
    server.drain_timeout_s = settings.drain_timeout_s
    server.run()
    return 0 if server.started else 1
