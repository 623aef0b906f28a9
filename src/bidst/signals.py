"""SIGINT/SIGTERM during training: note the request so the loop can checkpoint after the current step and stop."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunInterrupted(Exception):
    """Training stopped on a signal after saving a checkpoint; the exit code is 128 + the signal number."""

    def __init__(self, signum: int, step: int) -> None:
        self.exit_code = 128 + signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; a checkpoint was saved, continue with --resume")


class StopSignals:
    """While active, the first SIGINT/SIGTERM only records itself; the same signal again stops at once, as usual
    (Ctrl-C twice). The other one is the same request: a terminal's Ctrl-C reaches a sweep's runs as well as the
    sweep, which then sends them SIGTERM, and that must not cost them their checkpoint.

    Handlers are installed from the main thread only; elsewhere nothing changes and no stop is ever asked.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del frame
        if self.signum == signum:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def flags(self) -> list[float]:
        """One 0/1 flag per stop signal, to be summed over DDP ranks so every rank stops at the same step."""
        return [float(self.signum == s) for s in STOP_SIGNALS]

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]


def requested(summed_flags: list[float]) -> int:
    """The stop signal any rank received, from `flags()` summed over ranks; 0 if none."""
    return next((s for s, flag in zip(STOP_SIGNALS, summed_flags) if flag > 0), 0)
