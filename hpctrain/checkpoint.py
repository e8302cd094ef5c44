"""Checkpoint files: the only module that writes them.

A checkpoint is one ``torch.save`` file holding a versioned dict. Writes are atomic
(temporary file in the same directory, fsync, rename), so an interrupted write never
replaces a good checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Union

import torch

from .errors import CheckpointError

FORMAT = "hpctrain-checkpoint"
VERSION = 1


def save(payload: dict[str, Any], path: Union[str, Path]) -> Path:
    """Write ``payload`` (with format and version added) atomically to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:
            torch.save(data, file)
            file.flush()
            os.fsync(file.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def load(path: Union[str, Path], architecture: str = "") -> dict[str, Any]:
    """Read a checkpoint; fail clearly on a missing, foreign or too new file.

    :param architecture: when given, the checkpoint must come from it
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {error}); "
            "it may be truncated; use an older checkpoint of the run"
        ) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hpctrain checkpoint")
    if data["version"] > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {data['version']}, newer than this "
            f"hpctrain understands ({VERSION}); upgrade hpctrain"
        )
    if architecture and data.get("architecture") != architecture:
        raise CheckpointError(
            f"{path} was written by architecture '{data.get('architecture')}', not '{architecture}'"
        )
    return data
