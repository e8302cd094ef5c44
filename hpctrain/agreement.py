"""What all ranks must do together after a training step, agreed in one all-reduce.

After each step every rank adds its counts to one small integer tensor: whether its
loss is not finite (computed on the device, read without waiting for it), whether a
time-based checkpoint is due, whether its files of the pending checkpoint are on disk,
and which stop signal it received. The sum says, identically on every rank, whether
to stop for a NaN, to checkpoint, to commit the pending checkpoint, or to stop for a
signal. It is the step's only synchronisation besides DDP's gradients, and overlaps
the backward pass.
"""

from __future__ import annotations

import dataclasses

import torch

from . import launch
from .signals import STOP_SIGNALS

# slots of the agreed tensor; one count per stop signal follows
NONFINITE, DUE, FLUSHED, SIGNALS = 0, 1, 2, 3


@dataclasses.dataclass
class Agreed:
    """What the ranks agreed after a step."""

    nonfinite: bool = False  # some rank's loss is NaN or infinite
    due: bool = False  # a time-based checkpoint is due
    flushed: bool = False  # every rank's files of the pending checkpoint are on disk
    stopped_by: list[str] = dataclasses.field(default_factory=list)  # signals received

    @property
    def stop(self) -> bool:
        return bool(self.stopped_by)


class StepAgreement:
    """Starts and finishes the agreement of each step (see the module doc).

    :param world_size: the ranks that take part
    """

    def __init__(self, world_size: int):
        self.world_size = world_size

    def start(
        self, loss: torch.Tensor, due: bool, flushed: bool, received: str | None
    ) -> launch.PendingSum:
        """Start the all-reduce of this rank's counts and return at once.

        :param due: this rank's clock says a time-based checkpoint is due
        :param flushed: this rank's files of the pending checkpoint are on disk
        :param received: the stop signal this rank received (its name), if any
        """
        stops = [received == signal.name for signal in STOP_SIGNALS]
        host = torch.tensor([due, flushed, *stops], dtype=torch.int32)
        nonfinite = (~torch.isfinite(loss)).to(torch.int32).reshape(1)
        return launch.start_all_reduce_sum(torch.cat([nonfinite, host.to(nonfinite.device)]))

    def finish(self, pending: launch.PendingSum) -> Agreed:
        """Wait for the sums of :meth:`start` and read them (the step's one read from
        the device)."""
        counts = pending.wait().cpu().tolist()
        return Agreed(
            nonfinite=bool(counts[NONFINITE]),
            due=bool(counts[DUE]),
            flushed=int(counts[FLUSHED]) == self.world_size,
            stopped_by=[s.name for s, n in zip(STOP_SIGNALS, counts[SIGNALS:]) if n],
        )
