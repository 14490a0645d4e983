"""Where a command's time goes: wall-clock seconds per named phase, taken at boundaries the loop already has
(no device syncs of its own), printed as one line at the end of `dlbase train`."""
from __future__ import annotations

import contextlib
import os
import time
from typing import Iterator, Optional


def process_age() -> Optional[float]:
    """Seconds since this process started (interpreter start-up and imports included), or None off Linux."""
    try:
        with open("/proc/self/stat") as fh:
            started = int(fh.read().rsplit(")", 1)[1].split()[19])  # field 22: start time in clock ticks
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


class Phases:
    """Seconds per phase, in the order they first ran. `start` is the process's age when this object was made:
    the interpreter, the imports and the command line."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        age = process_age()
        if age is not None:
            self.seconds["start"] = age
        self._t0 = time.perf_counter() - (age or 0.0)

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def total(self) -> float:
        """Seconds from the process's start (or this object's) to now."""
        return time.perf_counter() - self._t0

    def line(self) -> str:
        """`time (s): start 2.10 device 0.31 ... other 0.05 total 4.20` — machine-readable, one line."""
        total = self.total()
        other = max(0.0, total - sum(self.seconds.values()))
        parts = [f"{name.replace(' ', '_')} {s:.2f}" for name, s in self.seconds.items()]
        return f"time (s): {' '.join(parts)} other {other:.2f} total {total:.2f}"


def parse(line: str) -> dict[str, float]:
    """Phases.line() back to {phase: seconds} (scripts/speedrun.py reads it from the command's output)."""
    words = line.split(":", 1)[1].split()
    return {words[i]: float(words[i + 1]) for i in range(0, len(words) - 1, 2)}
