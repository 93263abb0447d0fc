"""An innocent client beside a hostile one: a seeded stream whose text must equal its run alone, and a
/health prober whose latencies are recorded (and printed, so a run's log shows them)."""

from __future__ import annotations

import threading
import time

import httpx

from tests.servers import StreamInBackground

INNOCENT = {"model": "base", "prompt": "an innocent bystander", "max_tokens": 300, "temperature": 1.0, "seed": 7,
            "ignore_eos": True}


def innocent_text(url: str) -> str:
    """The innocent stream's text when it runs alone."""
    stream = StreamInBackground(url, INNOCENT)
    stream.thread.join(120)
    return stream.text()


class HealthProbe:
    """GET /health every `interval_s` in a thread; `latencies_s` of each answer (a failure counts as inf)."""

    def __init__(self, url: str, interval_s: float = 0.05) -> None:
        self.url = url
        self.interval_s = interval_s
        self.latencies_s: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._stop.is_set():
                start = time.perf_counter()
                try:
                    ok = client.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.latencies_s.append(time.perf_counter() - start if ok else float("inf"))
                self._stop.wait(self.interval_s)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    @property
    def worst_s(self) -> float:
        return max(self.latencies_s, default=0.0)


class Bystander:
    """`with Bystander(url, alone) as b:` runs the innocent stream and the prober around the block; on exit
    the stream must have finished with exactly `alone`, and /health must have answered every probe within
    `max_health_s`."""

    def __init__(self, url: str, alone: str, max_health_s: float = 1.0) -> None:
        self.url, self.alone, self.max_health_s = url, alone, max_health_s
        self.probe = HealthProbe(url)

    def __enter__(self) -> Bystander:
        self.stream = StreamInBackground(self.url, INNOCENT)
        self.probe.__enter__()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stream.thread.join(120)
        self.probe.__exit__()
        if exc_type is not None:
            return
        print(f"/health: {len(self.probe.latencies_s)} probes, worst {self.probe.worst_s * 1000:.0f} ms")
        assert self.stream.done and self.stream.text() == self.alone
        assert self.probe.latencies_s and self.probe.worst_s < self.max_health_s, self.probe.latencies_s
