"""What a run reports: rank 0 prints and writes files; other ranks only warn.

Rank 0's console may carry a status line (the progress bar of
:mod:`hpctrain.progress`) redrawn in place; every logged message wipes it first,
so that messages and the bar never share a line. Validated epochs go to
``metrics.csv`` and, when the ``tensorboard`` package is installed, to TensorBoard
event files, and to the run's W&B run when it has one (:mod:`hpctrain.wandb_run`),
all behind :class:`MetricsLog`.
"""

from __future__ import annotations

import csv
import logging
import math
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, TextIO

LOGGER_NAME = "hpctrain"


class Console(logging.StreamHandler):
    """Rank 0's standard output, with an optional status line drawn in place."""

    def __init__(self, stream: TextIO):
        super().__init__(stream)
        self.status_width = 0  # characters of the status line drawn now (0: none)

    @property
    def is_terminal(self) -> bool:
        isatty = getattr(self.stream, "isatty", None)
        try:
            return bool(isatty and isatty())
        except ValueError:  # a closed stream
            return False

    def show_status(self, text: str) -> None:
        """Draw ``text`` over the current status line (carriage return, no newline)."""
        with self.lock:
            pad = max(0, self.status_width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self.stream.flush()
            self.status_width = len(text)

    def clear_status(self) -> None:
        """Wipe the status line; the cursor is left at the start of the empty line."""
        with self.lock:
            if self.status_width:
                self.stream.write("\r" + " " * self.status_width + "\r")
                self.stream.flush()
                self.status_width = 0

    def end_status(self) -> None:
        """Keep the status line as it is and move to the next line (before an error)."""
        with self.lock:
            if self.status_width:
                self.stream.write("\n")
                self.stream.flush()
                self.status_width = 0

    def emit(self, record: logging.LogRecord) -> None:
        if self.status_width:
            self.clear_status()
        super().emit(record)


_console: Console | None = None


class ConsoleFormatter(logging.Formatter):
    """``12:00:01 message``; warnings and errors say so (``12:00:01 warning: ...``), after
    the rank of a rank other than 0 (``12:00:01 [rank 3] warning: ...``)."""

    def __init__(self, prefix: str):
        super().__init__("%(asctime)s %(message)s", "%H:%M:%S")
        self.prefix = prefix

    def formatMessage(self, record: logging.LogRecord) -> str:
        word = ""
        if record.levelno >= logging.WARNING:
            word = "warning: " if record.levelno == logging.WARNING else "error: "
        return f"{record.asctime} {self.prefix}{word}{record.message}"


def setup_logging(rank: int, log_file: Path | None = None) -> logging.Logger:
    """Rank 0 logs INFO to stdout (and ``log_file``); other ranks log warnings and
    errors only, prefixed with their rank."""
    global _console
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = ConsoleFormatter(prefix)
    if rank == 0:
        _console = Console(sys.stdout)
        stream: logging.Handler = _console
    else:
        _console = None
        stream = logging.StreamHandler(sys.stderr)
    stream.setFormatter(formatter)
    logger.addHandler(stream)
    logger.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    if log_file is not None and rank == 0:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    return logger


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


def log_to_file(message: str, level: int = logging.ERROR) -> None:
    """Write ``message`` to the run's ``train.log`` only (when there is one): for
    what is printed to stderr anyway, such as the error that ended the run."""
    logger = get_logger()
    for handler in logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(logger.makeRecord(logger.name, level, "", 0, message, None, None))


def console() -> Console | None:
    """Rank 0's console handler once :func:`setup_logging` ran (else None)."""
    return _console


def end_status_line() -> None:
    """Finish a progress bar left on screen, so that what follows starts a new line."""
    if _console is not None:
        _console.end_status()


def block(title: str, rows: Iterable[tuple[str, str]]) -> str:
    """A titled block of ``label: value`` lines, logged as one message."""
    return "\n".join([title, *(f"  {label}: {value}" for label, value in rows)])


# -- metrics --------------------------------------------------------------------------


class MetricsCSV:
    """One row per logged epoch; continues an existing file rather than overwriting."""

    def __init__(self, path: Path):
        self.path = path
        self.columns: list[str] | None = None
        if path.exists():
            with path.open() as file:
                header = file.readline().strip()
            self.columns = header.split(",") if header else None

    def write(self, row: dict[str, float]) -> None:
        if self.columns is None:
            self.columns = list(row)
            with self.path.open("w", newline="") as file:
                csv.writer(file).writerow(self.columns)
        with self.path.open("a", newline="") as file:
            csv.writer(file).writerow([row.get(c, "") for c in self.columns])

    def close(self) -> None:
        pass


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The rows of a ``metrics.csv`` as numbers (empty cells left out); [] without one."""
    if not path.is_file():
        return []
    with path.open(newline="") as file:
        return [
            {key: float(value) for key, value in row.items() if key and value not in ("", None)}
            for row in csv.DictReader(file)
        ]


def scalar_tag(column: str) -> str:
    """The TensorBoard tag and W&B key of a ``metrics.csv`` column: validation errors
    grouped."""
    return "val/" + column[4:] if column.startswith("val ") else column


class TensorBoardScalars:
    """The columns of ``metrics.csv`` as TensorBoard scalars over optimizer steps.

    :param purge_step: when continuing a run, the step it continues from: TensorBoard
        hides what an earlier, interrupted process wrote from this step on
    :raises ImportError: when the ``tensorboard`` package is not installed
    """

    def __init__(self, directory: Path, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.directory = directory
        self.writer = SummaryWriter(str(directory), purge_step=purge_step or None)

    def write(self, row: dict[str, float]) -> None:
        step = int(row["step"])
        for column, value in row.items():
            if column != "step":
                self.writer.add_scalar(scalar_tag(column), float(value), step)
        self.writer.flush()  # an epoch's row is small; a killed run keeps it

    def close(self) -> None:
        self.writer.close()


class RowWriter(Protocol):
    """What records the rows of ``metrics.csv`` beside it (a W&B run)."""

    def write(self, row: dict[str, float]) -> None: ...


class MetricsLog:
    """Where validated epochs are recorded (rank 0): ``metrics.csv``; when
    ``tensorboard`` is set and the package is installed, ``tensorboard/``; and
    ``wandb``, the run's W&B run, which the flow opened and finishes (not :meth:`close`)."""

    def __init__(
        self,
        run_dir: Path,
        tensorboard: bool = True,
        purge_step: int | None = None,
        wandb: RowWriter | None = None,
    ):
        self.csv = MetricsCSV(run_dir / "metrics.csv")
        self.wandb = wandb
        self.tensorboard: TensorBoardScalars | None = None
        if tensorboard:
            try:
                self.tensorboard = TensorBoardScalars(run_dir / "tensorboard", purge_step)
            except ImportError:
                get_logger().info(
                    "TensorBoard: the 'tensorboard' package is not installed, metrics go to "
                    "metrics.csv only (pip install tensorboard; 'logging.tensorboard: false' "
                    "silences this)"
                )

    def write(self, row: dict[str, float]) -> None:
        self.csv.write(row)
        if self.tensorboard is not None:
            self.tensorboard.write(row)
        if self.wandb is not None:
            self.wandb.write(row)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def plural(count: int, word: str) -> str:
    """``1 epoch``, ``2 epochs``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def significant(value: float, digits: int = 2) -> str:
    """``value`` to at most ``digits`` significant digits, without an exponent or
    trailing zeros: 1234 -> ``1200``, 72.1 -> ``72``, 8.0 -> ``8``, 0.0123 -> ``0.012``."""
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    text = f"{round(value, decimals):.{max(decimals, 0)}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def errors_text(metrics: dict[str, float], sep: str = "  ") -> str:
    """``energy RMSE 0.012 eV/atom  forces RMSE 0.3 eV/A``: the RMSEs among ``metrics``
    (``val `` prefixes dropped), one format for epoch, test and summary lines."""
    parts = []
    for key, value in metrics.items():
        if " RMSE [" in key:
            label, unit = key.removeprefix("val ").split(" RMSE [")
            parts.append(f"{label} RMSE {value:.4g} {unit[:-1]}")
    return sep.join(parts)


PER_SET = re.compile(r"^val \[(\d+)\] ")
"""A metrics column of one validation set of several: ``val [1] energy RMSE [eV/atom]``."""


def validation_metrics(row: dict[str, Any], number: int | None = None) -> dict[str, float]:
    """The validation metrics of a row: over all validation sets (``number`` None), or
    of set ``number``, named as the totals are."""
    if number is None:
        return {k: v for k, v in row.items() if k.startswith("val ") and not PER_SET.match(k)}
    prefix = f"val [{number}] "
    return {"val " + k[len(prefix) :]: v for k, v in row.items() if k.startswith(prefix)}


def validation_sets_in(row: dict[str, Any]) -> list[int]:
    """The validation sets with metrics of their own in a row (none with one set)."""
    return sorted({int(m.group(1)) for k in row if (m := PER_SET.match(k))})


def validation_errors(row: dict[str, float]) -> str:
    """``energy RMSE 0.012 eV/atom, forces RMSE 0.3 eV/A`` from a metrics row."""
    return errors_text(validation_metrics(row), ", ") or "none recorded"


def best_and_final(
    rows: list[dict[str, float]],
) -> tuple[dict[str, float] | None, dict[str, float] | None]:
    """The row with the lowest validation loss (the latest row of an epoch counts,
    should a restart have repeated it) and the last row."""
    by_epoch: dict[float, dict[str, float]] = {}
    for row in rows:
        if "epoch" in row:
            by_epoch[row["epoch"]] = row
    latest = list(by_epoch.values())
    if not latest:
        return None, None
    scored = [r for r in latest if math.isfinite(r.get("val_loss", math.nan))]
    best = min(scored, key=lambda r: (r["val_loss"], r["epoch"])) if scored else None
    return best, max(latest, key=lambda r: r["epoch"])
