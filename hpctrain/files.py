"""Files written whole or not at all: a temporary file, fsync, rename, fsync of the
directory. Checkpoints, resolved options, metrics, plots and predictions are written
this way (:func:`write_atomically`, :func:`write_text_atomically`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Union


def fsync_dir(path: Path) -> None:
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


_SYNC_IN_PLACE = threading.local()


@contextlib.contextmanager
def deferred_sync() -> Iterator[None]:
    """Within: atomic writes skip their fsyncs; the caller syncs the files later
    (the parts of a step checkpoint, made visible only by their commit marker)."""
    _SYNC_IN_PLACE.deferred = True
    try:
        yield
    finally:
        _SYNC_IN_PLACE.deferred = False


def atomic_write(path: Path, write: Callable[[Any], None], sync_dir: bool = True) -> None:
    deferred = getattr(_SYNC_IN_PLACE, "deferred", False)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            write(file)
            if not deferred:
                file.flush()
                os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_dir and not deferred:
        fsync_dir(path.parent)


def write_atomically(path: Union[str, Path], write: Callable[[Any], None]) -> None:
    """``write(file)`` into a binary file that becomes ``path`` only once whole, with the
    permissions a new file gets (a run's result files: models, plots, predictions)."""
    atomic_write(Path(path), write)


def write_text_atomically(path: Union[str, Path], text: str) -> None:
    """``path`` holds ``text`` whole or keeps what it had."""
    atomic_write(Path(path), lambda file: file.write(text.encode()))


def sync_files(directory: Path, files: list[Path]) -> None:
    """fsync ``files``, then ``directory`` (their names)."""
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(directory)
