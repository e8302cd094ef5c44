"""Progress within an epoch, as rank 0 prints it.

On a terminal, a bar redrawn in place (carriage return) with the rate in
structures/s, the time left in the epoch and in the run, and the running training loss; the
epoch's line replaces it. Elsewhere (SLURM output files, pipes, CI logs), one plain
log line every ``logging.progress_every_seconds`` (or ``progress_every_n_steps``),
never carriage returns. Other ranks print nothing.

The engine calls :meth:`ProgressMeter.step` once per optimizer step. It costs a
clock read; the loss, a tensor that may live on a GPU, is read (synchronising
with the device) only when a line or a redraw is due.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable

import torch

from . import report
from .options import LoggingOptions

BAR_WIDTH = 24
REDRAW_S = 0.2  # the bar is redrawn at most this often


@dataclasses.dataclass
class Throughput:
    """Structures trained and seconds spent in training steps by this process, for
    the end-of-run summary (validation and checkpoints at epoch ends excluded)."""

    structures: int = 0
    seconds: float = 0.0

    def reset(self) -> None:
        self.structures, self.seconds = 0, 0.0

    @property
    def rate(self) -> float:
        return self.structures / self.seconds if self.seconds > 0 else 0.0


TOTALS = Throughput()


def format_duration(seconds: float) -> str:
    """``42s``, ``3:07`` or ``1:02:03`` (hours:minutes:seconds)."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}:{seconds:02d}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}"


class ProgressMeter:
    """Counts the steps of an epoch and prints where it stands (see the module doc).

    :param options: the ``logging`` section (mode and intervals)
    :param is_main: whether this rank prints (rank 0)
    :param clock: seconds, monotonic (replaceable for tests)
    """

    def __init__(
        self,
        options: LoggingOptions,
        is_main: bool,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.options = options
        self.clock = clock
        self.console = report.console() if is_main else None
        mode = options.progress if is_main else "off"
        if mode == "auto":
            mode = "bar" if self.console is not None and self.console.is_terminal else "lines"
        if mode == "bar" and self.console is None:
            mode = "lines"
        self.mode = mode
        self.log = report.get_logger()
        self.epoch = self.num_epochs = 0
        self.total_steps = self.first_step = self.steps = self.structures = 0
        self.started = self.last_output = 0.0
        self.epoch_wall: float | None = None  # seconds of the last epoch, validation included
        self.loss_sum: torch.Tensor | None = None

    def start_epoch(self, epoch: int, num_epochs: int, total_steps: int, remaining: int) -> None:
        """Epoch ``epoch`` (from 1) of ``num_epochs`` begins, ``remaining`` of its
        ``total_steps`` steps to go (fewer when a run continues mid-epoch)."""
        now = self.clock()
        if self.started and self.first_step == 0 and self.done:  # the last epoch was whole
            self.epoch_wall = now - self.started
        self.epoch, self.num_epochs = epoch, num_epochs
        self.total_steps = max(total_steps, remaining)
        self.first_step = self.total_steps - remaining
        self.steps = self.structures = 0
        self.loss_sum = None
        self.started = self.last_output = now

    def step(self, structures: int, loss_sum: torch.Tensor) -> None:
        """One optimizer step of ``structures`` (global batch) is done; ``loss_sum``
        is this rank's running sum of step losses over the epoch so far."""
        self.steps += 1
        self.structures += structures
        self.loss_sum = loss_sum
        if self.mode == "off":
            return
        now = self.clock()
        if self.mode == "bar":
            if now - self.last_output >= REDRAW_S or self.steps == 1 or self.done:
                self.last_output = now
                self.console.show_status(self.bar(now))
            return
        every_n = self.options.progress_every_n_steps
        due = now - self.last_output >= self.options.progress_every_seconds
        if due or (every_n and (self.first_step + self.steps) % every_n == 0):
            self.last_output = now
            self.log.info(self.line(now))

    @property
    def done(self) -> bool:
        return self.first_step + self.steps >= self.total_steps

    def end_epoch(self, validating: bool = False) -> tuple[int, float]:
        """Structures trained in this epoch by this process and the seconds it took
        (training steps only); added to :data:`TOTALS`. On a terminal the bar stays
        (saying ``validating`` meanwhile) until the epoch's line replaces it."""
        seconds = self.clock() - self.started
        TOTALS.structures += self.structures
        TOTALS.seconds += seconds
        if validating and self.mode == "bar" and self.console is not None and self.steps:
            self.console.show_status(self.bar(self.clock(), "validating"))
        return self.structures, seconds

    # -- text -------------------------------------------------------------------------

    def _figures(self, now: float) -> tuple[int, float, str, float]:
        """Step, rate, ``ETA 0:12`` (with the run's: ``ETA 0:12 (run 3:07)``), loss."""
        elapsed = max(now - self.started, 1e-9)
        rate = self.structures / elapsed
        left = self.total_steps - self.first_step - self.steps
        per_step = elapsed / self.steps if self.steps else float("nan")
        eta = f"ETA {format_duration(left * per_step)}"
        if self.epoch < self.num_epochs:
            per_epoch = self.epoch_wall or self.total_steps * per_step
            run_left = left * per_step + (self.num_epochs - self.epoch) * per_epoch
            eta += f" (run {format_duration(run_left)})"
        loss = float(self.loss_sum) / self.steps if self.loss_sum is not None else float("nan")
        return self.first_step + self.steps, rate, eta, loss

    def bar(self, now: float, note: str = "") -> str:
        """``epoch 3/10 [#####-----]  45/100  810 structures/s  ETA 0:12 (run 3:07)  loss
        0.0123``, cut to the terminal's width (a wrapped line could not be redrawn); the
        run's ETA counts the last epoch's time, validation included."""
        step, rate, eta, loss = self._figures(now)
        filled = int(BAR_WIDTH * step / max(1, self.total_steps))
        text = (
            f"epoch {self.epoch}/{self.num_epochs} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}]"
            f"  {step}/{self.total_steps}  {report.significant(rate)} structures/s  "
            + (note if note else eta)
            + f"  loss {loss:.4g}"
        )
        width = shutil.get_terminal_size((100, 24)).columns - 1
        return text[:width]

    def line(self, now: float) -> str:
        """``epoch 3/10  step 45/100  810 structures/s  ETA 0:12 (run 3:07)  loss 0.0123``."""
        step, rate, eta, loss = self._figures(now)
        return (
            f"epoch {self.epoch}/{self.num_epochs}  step {step}/{self.total_steps}  "
            f"{report.significant(rate)} structures/s  {eta}  loss {loss:.4g}"
        )
