"""Stop requests: SIGUSR1, SIGUSR2 and SIGTERM from the scheduler, SIGINT (Ctrl-C).

SLURM sends them before a time limit or at preemption (``--signal``), ``scancel``
and ``scontrol requeue`` send SIGTERM. The flow holds the handlers for the whole
run, and what a signal does depends on where the run is:

- while training (``deferred``): it only sets a flag; the engine looks at it at each
  step boundary, where all ranks agree to write one checkpoint together and stop;
- before training, and after the final checkpoint (``immediate``): there is nothing
  to save, or what is left (export, test metrics) is redone by the next job, so the
  handler raises :class:`~hpctrain.errors.Preempted` at once (exit code 75);
- while the final checkpoint is written (``deferred`` again): the write finishes,
  then the run stops.

A first Ctrl-C stops the run like SIGTERM (without requeuing a SLURM job: a person
asked it to stop); a second one raises :class:`KeyboardInterrupt` at once.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

from .errors import Preempted

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Installs the handlers; ``received`` names the first stop signal, if any.

    :param immediate: raise :class:`Preempted` from the handler (see the module doc)
        instead of only setting the flag
    :param when: what the run is doing, for the message of an immediate stop
    """

    def __init__(self, immediate: bool = False, when: str = "before training began") -> None:
        self.received: str | None = None
        self.interrupted = False  # Ctrl-C (SIGINT) came
        self.immediate = immediate
        self.when = when
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = self.interrupted or name == "SIGINT"
        if self.received is None:
            self.received = name
        if self.immediate:
            self.immediate = False  # one exception, even if more signals follow
            raise Preempted(f"stopped by {name} {self.when}")

    @property
    def requeue(self) -> bool:
        """Whether the job should run again: not when a person pressed Ctrl-C."""
        return not self.interrupted

    @contextlib.contextmanager
    def immediately(self, when: str) -> Iterator[None]:
        """Within: a stop signal raises :class:`Preempted` saying ``when`` (also one
        that came before, while the flag was only set)."""
        if self.received is not None:
            raise Preempted(f"stopped by {self.received} {when}")
        self.immediate, self.when = True, when
        try:
            yield
        finally:
            self.immediate = False

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
