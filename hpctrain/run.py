"""What a training run knows beyond the architecture API: its rank, its directory,
its checkpoint and logging schedule. The flow sets it for the run's duration
(``with run.use(context):``); the shared engine reads it.

The architecture API's ``Trainer.train(model, devices, ...)`` carries no such
settings, so the flow publishes them here; a trainer run outside the flow gets the
defaults (one process, no periodic checkpoints beyond the trainer's own). Code that
hpctrain calls with a context takes it as an argument instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .options import CheckpointOptions, LoggingOptions
from .signals import StopRequest

if TYPE_CHECKING:
    from .wandb_run import WandbRun


@dataclasses.dataclass
class RunContext:
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    run_dir: Path | None = None
    checkpoint: CheckpointOptions = dataclasses.field(default_factory=CheckpointOptions)
    logging: LoggingOptions = dataclasses.field(default_factory=LoggingOptions)
    stop: StopRequest | None = None  # set by the flow: signal handlers installed
    resume_from: Path | None = None  # the checkpoint this run continues, if any
    wandb: WandbRun | None = None  # rank 0's W&B run (logging.wandb), opened by the flow

    @property
    def is_main(self) -> bool:
        return self.rank == 0


_current = RunContext()


def current() -> RunContext:
    """The context of the run in progress (the defaults outside one)."""
    return _current


@contextlib.contextmanager
def use(context: RunContext) -> Iterator[RunContext]:
    """``context`` is the current one inside the block; the previous one after it,
    however the block ends."""
    global _current
    previous, _current = _current, context
    try:
        yield context
    finally:
        _current = previous
