"""SIGTERM/SIGINT during training: the first sets a flag the loop reads at the next step boundary; a second
SIGINT stops at once (the checkpoint writes are atomic, so nothing on disk is ever half-written)."""
from __future__ import annotations

import signal
import sys
import threading
from types import FrameType
from typing import Optional

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + the signal number, as shells report them


class Preemption:
    """Context manager: while inside, SIGTERM and SIGINT ask the loop to stop instead of killing it."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._old: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum, 143)  # under torchrun a rank may stop on another rank's SIGTERM

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: saving at the next step boundary, then stopping"
              f"{' (Ctrl-C again to stop at once)' if signum == signal.SIGINT else ''}", file=sys.stderr, flush=True)

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # signals can only be caught there
            for sig in EXIT_CODES:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
