"""Weights & Biases logging (``logging.wandb``): rank 0's W&B run, which receives the
rows of ``metrics.csv`` at the same optimizer steps (through
:class:`hpctrain.report.MetricsLog`), with the resolved options and where the run
runs (:func:`hpctrain.banner.system`) as its config.

The flow opens the W&B run before training and finishes it however the run ends
(:func:`opened`): a stop signal marks it preempted, an error marks it failed, and a
run continued in the same run directory (``--continue auto``, a requeued job)
continues the same W&B run. Its id is kept in the run directory (``wandb-run-id``),
its files go to ``wandb/`` there. W&B takes no step lower than one it has: a continued
run leaves out its rows up to the last step of ``metrics.csv`` (the rows that an
interrupted process logged after its last checkpoint stay as that process logged
them). W&B writes what it is given every few seconds: the rows that a killed process
logged in its last seconds may be missing from W&B, never from ``metrics.csv``.

The ``wandb`` package is optional (``pip install hpctrain[wandb]``);
:func:`check_installed` fails a run that asks for it before anything starts.
"""

from __future__ import annotations

import contextlib
import importlib.util
import secrets
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import launch
from .errors import OptionsError, Preempted
from .files import write_text_atomically
from .options import WandbOptions
from .report import get_logger, read_metrics, scalar_tag

RUN_ID_FILE = "wandb-run-id"
INSTALL = "pip install hpctrain[wandb]"


def active(options: WandbOptions | None) -> bool:
    """Whether ``logging.wandb`` asks for a W&B run (given, and not ``mode: disabled``)."""
    return options is not None and options.mode != "disabled"


def check_installed(options: WandbOptions | None, source: str) -> None:
    """Fail when ``options`` ask for W&B and the ``wandb`` package is not installed
    (every rank, before launching: nothing has started, nothing is lost)."""
    if not active(options):
        return
    try:
        found = importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):  # (a module in the way that is no package)
        found = False
    if not found:
        raise OptionsError(not_installed(source))


def not_installed(source: str) -> str:
    return (
        f"'logging.wandb' in {source} asks for Weights & Biases logging, but the 'wandb' "
        f"package is not installed: {INSTALL} (or remove 'logging.wandb')"
    )


class WandbRun:
    """Rank 0's W&B run: the rows of ``metrics.csv`` as its history, at their step.

    :param run: the run ``wandb.init`` returned
    :param next_step: the lowest step the W&B run still takes; rows of lower steps
        are left out
    """

    def __init__(self, run: Any, next_step: int):
        self.run = run
        self.next_step = next_step
        self.left_out: int | None = None  # the step of the first row left out

    def write(self, row: dict[str, float]) -> None:
        """Log a row of ``metrics.csv`` (not ``step`` itself: it is the W&B step)."""
        step = int(row["step"])
        if step < self.next_step:
            if self.left_out is None:
                get_logger().info(
                    f"W&B: steps up to {self.next_step - 1} were logged by an earlier "
                    f"process of this run; the rows of step {step} to it are not logged again"
                )
                self.left_out = step
            return
        values = {scalar_tag(c): float(v) for c, v in row.items() if c != "step"}
        self.run.log(values, step=step, commit=True)
        self.next_step = step + 1

    def finish(self, error: BaseException | None = None) -> None:
        """End the W&B run: finished; after ``error``, failed with its exit code, or
        preempted after a stop signal (:class:`Preempted`). A W&B run that cannot end
        well only warns: training and its files are done."""
        try:
            if isinstance(error, Preempted):
                self.run.mark_preempting()
            exit_code = 0 if error is None else getattr(error, "exit_code", 1)
            self.run.finish(exit_code=exit_code)
        except Exception as failure:
            get_logger().warning(f"W&B: the run did not finish cleanly: {failure}")


def start(options: WandbOptions, run_dir: Path, config: dict[str, Any], source: str) -> WandbRun:
    """Start (or continue, with the id kept in ``run_dir``) the W&B run of ``run_dir``,
    with ``config`` as its config; its files go to ``run_dir/wandb``."""
    try:
        import wandb
    except ImportError:
        raise OptionsError(not_installed(source)) from None
    id_file = run_dir / RUN_ID_FILE
    known = id_file.is_file() and id_file.read_text().strip()
    run_id = known or new_run_id()
    if not known:
        write_text_atomically(id_file, run_id + "\n")  # before: a crash in init keeps it
    run = None
    try:
        run = wandb.init(
            project=options.project,
            entity=options.entity,
            name=options.name or run_dir.name,
            tags=options.tags,
            mode=options.mode,
            id=run_id,
            resume="allow",
            dir=run_dir,
            settings=wandb.Settings(console="off", quiet=True),
        )
        run.config.update(config, allow_val_change=True)  # (a continued run's may change)
        next_step = max(run.step, last_logged_step(run_dir) + 1)
    except Exception as error:
        if run is not None:
            run.finish(exit_code=1)
        raise OptionsError(
            f"'logging.wandb' in {source}: W&B could not start run {run_id}: "
            f"{str(error).rstrip('.')}. Log in with 'wandb login' (or set WANDB_API_KEY), "
            "or set 'mode: offline' and upload later with 'wandb sync'"
        ) from None
    continued = " (continued)" if known else ""
    get_logger().info(
        f"W&B: run {run_id}{continued}, project {options.project}, {options.mode}; "
        f"files in {run_dir / 'wandb'}"
    )
    return WandbRun(run, next_step)


def new_run_id() -> str:
    """A fresh W&B run id: 8 random lowercase letters and digits, as W&B makes them."""
    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def last_logged_step(run_dir: Path) -> int:
    """The last step of ``metrics.csv``, whose rows the W&B run received too (-1: none)."""
    steps = [int(row["step"]) for row in read_metrics(run_dir / "metrics.csv") if "step" in row]
    return max(steps, default=-1)


@contextlib.contextmanager
def opened(
    options: WandbOptions | None,
    run_dir: Path,
    is_main: bool,
    config: dict[str, Any],
    source: str,
) -> Iterator[WandbRun | None]:
    """Rank 0's W&B run when ``options`` ask for one (else None), for the block; it is
    finished however the block ends (see :meth:`WandbRun.finish`). Every rank enters
    it: an error starting the W&B run ends every rank, before training."""
    with launch.errors_agreed():
        wandb_run = start(options, run_dir, config, source) if active(options) and is_main else None
    if wandb_run is None:
        yield None
        return
    try:
        yield wandb_run
    except BaseException as error:
        wandb_run.finish(error)
        raise
    wandb_run.finish()
