"""What the engine reports of training, epoch by epoch: where it starts, the progress
within each epoch (:mod:`hpctrain.progress`), each validated epoch's line, and its row
of ``metrics.csv``, TensorBoard and W&B (rank 0 writes; other ranks count only)."""

from __future__ import annotations

from typing import Any

import torch

from .progress import ProgressMeter
from .report import (
    MetricsLog,
    errors_text,
    get_logger,
    plural,
    significant,
    validation_metrics,
    validation_sets_in,
)
from .run import RunContext


class EpochReporter:
    """Reports of one call of ``Engine.train``; :meth:`close` ends them.

    :param first_step: the optimizer step training starts from (the metrics files
        drop rows of later steps, left by a run stopped before its checkpoint)
    """

    def __init__(self, context: RunContext, num_epochs: int, steps_per_epoch: int, first_step: int):
        self.context = context
        self.num_epochs = num_epochs
        self.steps_per_epoch = steps_per_epoch
        self.log = get_logger()
        self.meter = ProgressMeter(context.logging, context.is_main)
        self.metrics = None
        if context.is_main and context.run_dir:
            self.metrics = MetricsLog(
                context.run_dir, context.logging.tensorboard, first_step, context.wandb
            )

    def started(self, epoch: int, step: int, batch: str, resumed_within: int) -> None:
        """Training begins at ``epoch`` (done so far) and ``step``, with global batches
        of ``batch`` (in words); ``resumed_within`` structures of that epoch are done."""
        self.log.info(
            f"training: {plural(self.num_epochs, 'epoch')} of "
            f"{plural(self.steps_per_epoch, 'step')}, global batch {batch} on "
            f"{plural(self.context.world_size, 'rank')}"
        )
        if epoch >= self.num_epochs:
            self.log.info(
                f"training already ended at step {step} (epoch {epoch}): nothing left to train"
            )
        elif step:
            within = (
                f"{resumed_within} structures of it done" if resumed_within else "from its start"
            )
            self.log.info(f"resuming at step {step} (epoch {epoch + 1}, {within})")

    def start_epoch(self, epoch: int, remaining_steps: int) -> None:
        """Epoch ``epoch`` (from 0) begins with ``remaining_steps`` to go."""
        self.meter.start_epoch(epoch + 1, self.num_epochs, self.steps_per_epoch, remaining_steps)

    def step(self, structures: int, loss_sum: torch.Tensor) -> None:
        self.meter.step(structures, loss_sum)

    def end_epoch(self, validating: bool) -> int:
        """The epoch's steps are done; the structures this process trained in it."""
        structures, _ = self.meter.end_epoch(validating)
        return structures

    def validated(self, row: dict[str, Any], rate: float) -> None:
        """A validated epoch: its line, and its row in the metrics files."""
        self.log.info(epoch_line(row, self.num_epochs, rate))
        for number in validation_sets_in(row):
            errors = errors_text(validation_metrics(row, number))
            self.log.info(f"{'':>11}validation_set[{number}]: {errors}")
        if self.metrics is not None:
            self.metrics.write(row)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def epoch_line(row: dict[str, Any], num_epochs: int, rate: float) -> str:
    """``epoch    3/10  loss 0.42  energy RMSE ... eV/atom  forces RMSE ...  lr 0.003
    0.33 s (240 structures/s)``."""
    parts = [f"epoch {row['epoch']:>4}/{num_epochs}", f"loss {row['train_loss']:.4g}"]
    parts.append(errors_text(validation_metrics(row)))
    parts.append(f"lr {row['learning_rate']:.3g}")
    parts.append(f"{row['epoch_time_s']:.2f} s ({significant(rate)} structures/s)")
    return "  ".join(p for p in parts if p)
