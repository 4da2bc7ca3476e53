"""Progress of long stages: done/total, rate and ETA, logged and handed to an optional callback.

A stage creates one `Progress` per unit of work it runs (a parse part, the hashing of dedup, the shards of reshard)
and calls `advance(n)`. The callback gets a plain dict so that anything can show it (the terminal in `cc4m build`,
Prefect progress artifacts in flows/tasks.py) without this library knowing about either:

    {"stage": str, "done": int, "total": int | None, "unit": str, "rate": float, "eta_s": float | None}

Calls are throttled (a CC12M parse advances millions of times); the first and the final update always go out.
"""
from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

ProgressCallback = Callable[[dict[str, Any]], None]

log = logging.getLogger(__name__)


class Progress:
    """Counts work done in one stage; logs every `log_every_s` and calls `callback` at most every `every_s`."""

    def __init__(self, stage: str, total: int | None, unit: str = "item", callback: ProgressCallback | None = None,
                 every_s: float = 1.0, log_every_s: float = 30.0, clock: Callable[[], float] = time.monotonic):
        if total is not None and total < 0:
            raise ValueError(f"Progress total must be >= 0 or None, got {total!r}")
        self.stage, self.total, self.unit = stage, total, unit
        self.callback = callback
        self.every_s, self.log_every_s = every_s, log_every_s
        self.clock = clock
        self.done = 0
        self.started = clock()
        self._last_call = self._last_log = None  # type: float | None

    def snapshot(self) -> dict[str, Any]:
        elapsed = max(self.clock() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = None
        if self.total is not None and rate > 0:
            eta = max(self.total - self.done, 0) / rate
        return {"stage": self.stage, "done": self.done, "total": self.total, "unit": self.unit,
                "rate": round(rate, 3), "eta_s": None if eta is None else round(eta, 1)}

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._emit(final=False)

    def finish(self) -> dict[str, Any]:
        """The last update (always emitted); returns it."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> dict[str, Any]:
        now = self.clock()
        state = self.snapshot()
        if final or self._last_log is None or now - self._last_log >= self.log_every_s:
            self._last_log = now
            log.info("%s", format_progress(state))
        if self.callback is not None and (final or self._last_call is None or now - self._last_call >= self.every_s):
            self._last_call = now
            self.callback(state)
        return state


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}"


def format_progress(state: dict[str, Any]) -> str:
    """One line, e.g. `parse: 12,000/100,000 rows (12%), 2,345.0 rows/s, ETA 0:00:37`."""
    done, total, unit = state["done"], state["total"], state["unit"]
    amount = f"{done:,}" if total is None else f"{done:,}/{total:,}"
    if total:
        amount += f" ({100 * done / total:.0f}%)"
    text = f"{state['stage']}: {amount} {unit}s, {state['rate']:,.1f} {unit}s/s"
    if state.get("eta_s") is not None:
        text += f", ETA {_duration(state['eta_s'])}"
    return text


class TerminalProgress:
    """A callback that shows the latest progress on one terminal line (a new line per update when not a tty)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.finished: tuple[str, int] | None = None

    def __call__(self, state: dict[str, Any]) -> None:
        if state["total"] is not None and state["done"] >= state["total"]:
            if self.finished == (state["stage"], state["done"]):
                return  # the last advance and finish() both report 100 %: show it once
            self.finished = (state["stage"], state["done"])
        line = format_progress(state)
        if self.tty:
            self.stream.write("\r\x1b[2K" + line)
            if state["total"] is not None and state["done"] >= state["total"]:
                self.stream.write("\n")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
