"""The batch run's counts, its progress line on stderr, and its summary.

A plain line rather than a tqdm bar: tqdm is not a dependency of the base install. On a terminal the line is
redrawn in place every second; otherwise (a Kubernetes Job's log, a file) a new line is written every
ten seconds, so the log stays readable.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO


@dataclass
class Progress:
    """Counts of this run's records (lines answered by an earlier run are `num_skipped`, counted apart)."""

    num_todo: int
    num_skipped: int = 0
    num_ok: int = 0
    num_failed: int = 0
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_retries: int = 0  # lines sent again after a 429 (the waiting queue was full of this run's own lines)
    started_at: float = field(default_factory=time.monotonic)

    def count(self, record: dict[str, Any]) -> None:
        """One record written: ok when the server answered 2xx, failed otherwise (an error status or an
        input line that never reached it)."""
        response = record.get("response")
        if record.get("error") is None and response is not None and 200 <= response["status_code"] < 300:
            self.num_ok += 1
        else:
            self.num_failed += 1
        body = response.get("body") if response is not None else None
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            self.num_prompt_tokens += int(usage.get("prompt_tokens") or 0)
            self.num_generated_tokens += int(usage.get("completion_tokens") or 0)

    @property
    def num_done(self) -> int:
        return self.num_ok + self.num_failed

    def elapsed_s(self) -> float:
        return max(1e-9, time.monotonic() - self.started_at)

    def line(self) -> str:
        elapsed = self.elapsed_s()
        percent = 100.0 * self.num_done / self.num_todo if self.num_todo else 100.0
        return (f"batch: {self.num_done}/{self.num_todo} lines ({percent:.0f}%), {self.num_failed} failed | "
                f"{self.num_done / elapsed:.1f} lines/s | {self.num_generated_tokens / elapsed:.1f} generated tokens/s | "
                f"{self.num_prompt_tokens / elapsed:.1f} prompt tokens/s | {elapsed:.0f} s")

    def summary(self, finished: bool) -> str:
        state = "done" if finished else "stopped early (run again with the same files to resume)"
        elapsed = self.elapsed_s()
        return (f"batch {state}: {self.num_done} lines answered in {elapsed:.1f} s ({self.num_ok} ok, "
                f"{self.num_failed} failed; {self.num_skipped} answered by an earlier run; "
                f"{self.num_retries} sent again after a 429); "
                f"{self.num_generated_tokens} generated tokens ({self.num_generated_tokens / elapsed:.1f}/s), "
                f"{self.num_prompt_tokens} prompt tokens ({self.num_prompt_tokens / elapsed:.1f}/s)")


class ProgressLine:
    """Writes `progress.line()` to `stream` now and then (module docstring)."""

    def __init__(self, progress: Progress, stream: TextIO = sys.stderr) -> None:
        self.progress, self.stream = progress, stream
        self.is_tty = stream.isatty()
        self.interval_s = 1.0 if self.is_tty else 10.0

    def show(self) -> None:
        if self.is_tty:
            self.stream.write("\r\x1b[K" + self.progress.line())
        else:
            self.stream.write(self.progress.line() + "\n")
        self.stream.flush()

    def end(self) -> None:
        """The last redraw, closed with its newline (off a terminal the summary says the same)."""
        if self.is_tty:
            self.show()
            self.stream.write("\n")
            self.stream.flush()
