"""Stop requests from the scheduler: SIGUSR1, SIGUSR2 and SIGTERM only set a flag.

SLURM sends them before a time limit or at preemption (``--signal``), ``scancel``
and ``scontrol requeue`` send SIGTERM. The engine looks at the flag at each step
boundary, where all ranks agree to write one checkpoint together and stop.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopRequest:
    """Installs the handlers; ``received`` names the first stop signal, if any."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> StopRequest:
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc: Any) -> None:
        self.restore()
