"""curation.progress: done/total, rate and ETA from an injected clock; throttled callbacks; terminal rendering."""
from __future__ import annotations

import io

import pytest

from curation.progress import Progress, TerminalProgress, format_progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rate_eta_and_throttled_callback():
    clock, seen = Clock(), []
    meter = Progress("parse", 1000, "row", seen.append, every_s=1.0, clock=clock)
    clock.now += 2.0
    meter.advance(200)  # first update: always sent
    assert seen[-1] == {"stage": "parse", "done": 200, "total": 1000, "unit": "row", "rate": 100.0, "eta_s": 8.0}
    clock.now += 0.5
    meter.advance(100)  # within every_s of the last call: not sent
    assert len(seen) == 1
    clock.now += 0.5
    meter.advance(100)
    assert len(seen) == 2 and seen[-1]["done"] == 400 and seen[-1]["eta_s"] == pytest.approx(4.5)  # 400 in 3 s, 600 to go
    meter.advance(600)
    final = meter.finish()  # the final update goes out even inside the throttle window
    assert seen[-1] == final and final["done"] == 1000 and final["eta_s"] == 0.0


def test_unknown_total_has_no_eta_and_bad_total_is_refused():
    clock = Clock()
    meter = Progress("extract", None, "image", clock=clock)
    clock.now += 4
    meter.advance(10)
    state = meter.finish()
    assert state["eta_s"] is None and state["rate"] == 2.5
    assert format_progress(state) == "extract: 10 images, 2.5 images/s"
    with pytest.raises(ValueError, match="total"):
        Progress("x", -1)


def test_terminal_line():
    state = {"stage": "reshard", "done": 500, "total": 2000, "unit": "sample", "rate": 50.0, "eta_s": 3725.0}
    assert format_progress(state) == "reshard: 500/2,000 (25%) samples, 50.0 samples/s, ETA 1:02:05"
    stream = io.StringIO()  # not a tty: one line per update
    terminal = TerminalProgress(stream)
    terminal(state)
    assert stream.getvalue() == format_progress(state) + "\n"
    done = {**state, "done": 2000, "eta_s": 0.0}
    terminal(done)
    terminal({**done, "rate": 49.0})  # the same completion reported again (advance, then finish): shown once
    assert stream.getvalue().count("2,000/2,000") == 1
