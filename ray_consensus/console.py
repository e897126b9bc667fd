"""What a run prints on stderr: the project's own lines and, on a terminal, one progress bar for the run.

    [ray-consensus] plan: 50000 images in 196 shards, 13 models; ...
    [ray-consensus] attributions ━━━━━━━━━━──────────  312,000/650,000 image×member  1,240/s  ETA 4m 32s · reduce 80/196

Every line goes through `say`, which lifts the bar off the line it is drawn on and puts it back
below, so lines and bar never interleave. Off a terminal (a `ray job submit` log, a file, CI)
there is no bar: the runner prints a line per finished shard instead, which reads well in a log.
Ray's own loggers are kept to errors (`cluster.init_ray`, `dispatch.quiet_ray_data`), so what
remains is ours, or a real error from Ray. Errors that Ray's own processes (raylet, GCS) forward to
the driver, such as a node's disk over 95% full, become one line of ours per source (`RayLogs`);
what workers print passes through, with the bar lifted off its line.
"""

from __future__ import annotations

import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import Callable, TextIO

PREFIX = "[ray-consensus]"
BAR_WIDTH = 24

_bar: Progress | None = None  # the bar on screen, if any
_lock = threading.RLock()  # Ray's forwarded logs arrive on a thread of their own
# A C++ log line of Ray's: "[2026-12-02 18:08:49,864 E 27487 27498] (raylet) file_system_monitor.cc:116: text".
_RAY_CC_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,.]+ [A-Z] \d+ \d+\] (?:\(\w+\) )?(\S+:\d+): (.*)$")


@contextmanager
def _above_bar():
    """Lift the bar off its line for what is printed inside, and draw it again below."""
    with _lock:
        if _bar is not None:
            _bar.clear()
        yield
        if _bar is not None:
            _bar.draw()


def say(msg: str) -> None:
    """One line of the project's own output."""
    with _above_bar():
        print(f"{PREFIX} {msg}", file=sys.stderr, flush=True)


class RayLogs:
    """A handler for the log batches Ray forwards to the driver (`cluster.init_ray` puts it in place of
    Ray's own printer, which it wraps, with `compat.route_forwarded_logs`). Lines of Ray's own processes
    become ours, each source once (the raylet repeats its disk warning every few seconds); workers'
    output goes to `passthrough`."""

    PROCESSES = ("raylet", "gcs_server")

    def __init__(self, passthrough: Callable[[dict], None]):
        self.passthrough, self.seen = passthrough, set()

    def __call__(self, data: dict) -> None:
        if data.get("pid") not in self.PROCESSES:
            with _above_bar():
                self.passthrough(data)
            return
        for line in data.get("lines") or []:
            line = line.strip()
            match = _RAY_CC_LINE.match(line)
            source, text = match.groups() if match else (line, line)
            if text and source not in self.seen:
                self.seen.add(source)
                say(f"Ray's {data['pid']}: {text}")


def on_terminal(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stderr
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """'42s', '4m 32s', '2h 05m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


class Progress:
    """The run's attribution work (images × members) done so far, its rate and time left, and the reduce
    tasks finished: one line redrawn in place. Use as a context manager; `add` and `note` redraw it."""

    def __init__(self, total: int, stream: TextIO | None = None, clock=time.monotonic):
        self.total, self.done, self.stream, self.clock = max(int(total), 0), 0, stream or sys.stderr, clock
        self.started = clock()
        self.extra = ""
        self._drawn = False

    def __enter__(self) -> Progress:
        global _bar
        _bar = self
        self.draw()
        return self

    def __exit__(self, *exc) -> None:
        global _bar
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
        _bar, self._drawn = None, False

    def add(self, n: int) -> None:
        self.done = min(self.total, self.done + int(n))
        self.draw()

    def note(self, text: str) -> None:
        self.extra = text
        self.draw()

    def text(self) -> str:
        frac = self.done / self.total if self.total else 1.0
        full = int(frac * BAR_WIDTH)
        bar = "━" * full + "─" * (BAR_WIDTH - full)
        elapsed = self.clock() - self.started
        rate = self.done / elapsed if elapsed > 0 and self.done else 0.0
        if self.done >= self.total:
            eta = f"done in {duration(elapsed)}"
        elif rate > 0:
            eta = f"ETA {duration((self.total - self.done) / rate)}"
        else:
            eta = "ETA -"
        rate_text = f"{rate:,.1f}/s" if rate < 100 else f"{rate:,.0f}/s"
        extra = f" · {self.extra}" if self.extra else ""
        return (f"{PREFIX} attributions {bar} {self.done:,}/{self.total:,} image×member  {rate_text}  "
                f"{eta}{extra}")

    def draw(self) -> None:
        with _lock:
            self.stream.write("\r\x1b[2K" + self.text())
            self.stream.flush()
            self._drawn = True

    def clear(self) -> None:
        with _lock:
            if self._drawn:
                self.stream.write("\r\x1b[2K")
                self.stream.flush()
                self._drawn = False
