"""Progress and metrics: rank 0 prints and writes files; other ranks only warn."""

from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path

LOGGER_NAME = "hpctrain"


def setup_logging(rank: int, log_file: Path | None = None) -> logging.Logger:
    """Rank 0 logs INFO to stdout (and ``log_file``); other ranks log warnings and
    errors only, prefixed with their rank."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers.clear()
    logger.propagate = False
    prefix = "" if rank == 0 else f"[rank {rank}] "
    formatter = logging.Formatter(f"%(asctime)s {prefix}%(message)s", "%H:%M:%S")
    stream = logging.StreamHandler(sys.stdout if rank == 0 else sys.stderr)
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
