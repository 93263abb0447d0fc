"""glibc's malloc, kept from hoarding memory a server has freed: fewer arenas, and a trim when the engine idles.

Why: glibc gives each thread that allocates an arena of its own, up to 8 per core, and returns an arena's
freed pages to the system only from its top. A server's threads (the event loop, the engine thread, the
tokenizing and grammar-compiling workers, the adapter readers) each fragment their own arena with
request-sized buffers, and RSS then grows by rounds of mixed traffic and stays up after the traffic stops.
Two arenas bound the fragmentation to two heaps; `malloc_trim(0)` hands the free pages inside them back
(madvise), and it runs only while the engine idles, since it holds each arena's lock while it walks it.
Elsewhere than glibc both are no-ops.
"""

from __future__ import annotations

import ctypes
import logging
import platform
import threading
from collections.abc import Callable

log = logging.getLogger("lmservice.serving")

M_ARENA_MAX = -8  # glibc's mallopt parameter (malloc.h)
MAX_ARENAS = 2
TRIM_INTERVAL_S = 10.0


def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def limit_arenas(max_arenas: int = MAX_ARENAS) -> bool:
    """At most `max_arenas` malloc arenas from now on (threads already holding one keep it); False off glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(M_ARENA_MAX, max_arenas))


def trim() -> bool:
    """Hand freed heap memory back to the system; True when some was."""
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0))


class IdleTrimmer:
    """A daemon thread that trims the heap every `interval_s` while `is_idle()` holds and work was done since
    the last trim (`work_count()` moved). It ends with `stop()`, or when `is_done()` says the server has."""

    def __init__(self, is_idle: Callable[[], bool], work_count: Callable[[], int], is_done: Callable[[], bool],
                 interval_s: float = TRIM_INTERVAL_S) -> None:
        self._is_idle, self._work_count, self._is_done = is_idle, work_count, is_done
        self.interval_s = interval_s
        self.num_trims = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lmservice-trim", daemon=True)

    def start(self) -> IdleTrimmer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        trimmed_at = self._work_count()
        while not self._stop.wait(self.interval_s) and not self._is_done():
            count = self._work_count()
            if count != trimmed_at and self._is_idle():
                trim()
                self.num_trims += 1
                trimmed_at = count
