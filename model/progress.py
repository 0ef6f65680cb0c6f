"""A small progress bar: count, rate, ETA and a few live figures. No dependency.

On a terminal it redraws one line; when stderr is a file or a pipe (a cluster job's log) it prints a
plain line every ``log_every`` seconds instead, so logs stay readable.
"""

from __future__ import annotations

import os
import sys
import time


def format_duration(seconds: float) -> str:
    """``16.2 s`` under a minute (a tiny run's whole length must not read as 00:00), ``3 min 05 s`` under an
    hour, ``2 h 07 min`` beyond."""
    seconds = max(0.0, seconds)
    if seconds < 59.95:  # (59.96 would print as "60.0 s")
        return f"{seconds:.1f} s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s"


class AtMostEvery:
    """``due()`` is True at most once every ``seconds`` (counted from creation), or whenever forced: for
    work worth redoing now and then, not at every occasion (redrawing a picture after every epoch)."""

    def __init__(self, seconds: float, clock=time.monotonic):
        self.seconds, self.clock = seconds, clock
        self.last = clock()

    def due(self, force: bool = False) -> bool:
        now = self.clock()
        if force or now - self.last >= self.seconds:
            self.last = now
            return True
        return False


class Progress:
    def __init__(self, total: int, desc: str, unit: str = "img", *, enabled: bool = True, stream=None, log_every=None):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = stream or sys.stderr
        self.enabled = enabled and os.environ.get("TRAINING_PROGRESS", "1") != "0"
        self.interactive = self.stream.isatty()
        self.log_every = log_every if log_every is not None else (0.2 if self.interactive else 30.0)
        self.done = 0
        self.start = self.last_draw = time.perf_counter()
        self.figures: dict[str, str] = {}

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return self.done / elapsed if elapsed > 0 else 0.0

    def update(self, n: int = 1, **figures) -> None:
        self.done += n
        self.figures.update({k: (f"{v:.4g}" if isinstance(v, float) else str(v)) for k, v in figures.items()})
        now = time.perf_counter()
        if now - self.last_draw >= self.log_every:
            self.last_draw = now
            self._draw()

    def close(self) -> None:
        self._draw(final=True)

    def _draw(self, final: bool = False) -> None:
        if not self.enabled:
            return
        rate = self.rate
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        fraction = self.done / self.total if self.total else 1.0
        figures = " ".join(f"{k}={v}" for k, v in self.figures.items())
        timing = f"{rate:,.1f} {self.unit}/s"
        timing += (
            f" elapsed {format_duration(time.perf_counter() - self.start)}" if final else f" ETA {format_duration(eta)}"
        )
        if self.interactive:
            width = 24
            filled = int(width * fraction)
            bar = "█" * filled + "·" * (width - filled)
            line = f"\r{self.desc} {bar} {self.done:,}/{self.total:,} {figures} {timing}\033[K"
            self.stream.write(line + ("\n" if final else ""))
        else:
            self.stream.write(f"{self.desc}: {self.done:,}/{self.total:,} ({fraction:.0%}) {figures} {timing}\n")
        self.stream.flush()
