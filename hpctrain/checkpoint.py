"""Checkpoints: the only module that writes them.

Two forms, one format:

- a **file** (``model.ckpt``, what ``Trainer.save_checkpoint(path)`` writes): one
  ``torch.save`` of a versioned dict holding the model and the trainer state;
- a **step directory** written during training by :class:`CheckpointManager`,
  ``checkpoints/step-000001200/``: ``replicated.pt`` (the same dict, written once by
  rank 0), ``rank-00000.pt`` ... (each rank's RNG states and data cursor) and, last,
  ``COMMITTED``. A directory without ``COMMITTED`` is an interrupted write and is
  never picked.

Every file is written atomically (temporary file, fsync, rename, fsync of the
directory). In a step directory the parts are renamed first and synced by a
background thread while training goes on; the commit marker is written only once
every rank's parts are on disk, so training pays about a bare ``torch.save``. The
newest checkpoint is the committed one with the highest step, never the newest by
modification time. Old versions are upgraded on load by pure functions, one
version at a time.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch

from .errors import CheckpointError
from .files import atomic_write, deferred_sync, sync_files

FORMAT = "hpctrain-checkpoint"
VERSION = 2
COMMITTED = "COMMITTED"
REPLICATED = "replicated.pt"
_STEP_DIR = re.compile(r"step-(\d+)$")


def save(payload: dict[str, Any], path: Union[str, Path], sync_dir: bool = True) -> Path:
    """Write ``payload`` (with format and version added) atomically to ``path``.

    :param sync_dir: also fsync the directory (a step checkpoint does it once, before
        its commit marker)
    """
    path = Path(path)
    data = {"format": FORMAT, "version": VERSION, **payload}
    atomic_write(path, lambda file: torch.save(data, file), sync_dir)
    return path


# -- versions ---------------------------------------------------------------------------


def upgrade_v1_to_v2(data: dict[str, Any]) -> dict[str, Any]:
    """v1 kept the learning rate as a LambdaLR state and wrote only at epoch ends."""
    data = dict(data)
    state = dict(data.get("trainer_state") or {})
    if "scheduler" in state:
        scheduler = state.pop("scheduler")
        state["learning_rate"] = {
            "step_count": scheduler["last_epoch"],
            "plateau_factor": 1.0,
            "best": math.inf,
            "bad_epochs": 0,
        }
        state["sampler"] = None  # at an epoch end: the next epoch starts afresh
        state["ema"] = None
        data["trainer_state"] = state
    data["version"] = 2
    return data


UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: upgrade_v1_to_v2}


def upgrade(data: dict[str, Any]) -> dict[str, Any]:
    """Bring a checkpoint dict to the current version, one pure step at a time."""
    while data["version"] < VERSION:
        data = UPGRADES[data["version"]](data)
    return data


# -- reading ----------------------------------------------------------------------------


def is_step_dir(path: Path) -> bool:
    return path.is_dir() and _STEP_DIR.search(path.name) is not None


_read_once: dict[Path, dict[str, Any]] | None = None


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """Inside the block each checkpoint is read from disk once: a resumed run's seed,
    trainer and model (each of which the architecture API loads from a path) come
    from one read. What :func:`load` returns is then shared: read it, never change it.
    """
    global _read_once
    previous, _read_once = _read_once, {}
    try:
        yield
    finally:
        _read_once = previous


def _read(path: Path) -> dict[str, Any]:
    key = path.resolve()
    if _read_once is not None and key in _read_once:
        return _read_once[key]
    try:
        data = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({type(error).__name__}: {error}); "
            "it may be truncated; use an older checkpoint of the run"
        ) from None
    if _read_once is not None:
        _read_once[key] = data
    return data


def load(path: Union[str, Path], architecture: str = "") -> dict[str, Any]:
    """Read a checkpoint file or committed step directory, upgraded to this version.

    :param architecture: when given, the checkpoint must come from it
    """
    path = Path(path)
    if path.is_dir():
        if not (path / COMMITTED).exists():
            raise CheckpointError(
                f"{path} is not a committed checkpoint (its write was interrupted); use "
                "an older one, or 'continue_from: auto' which picks the newest committed"
            )
        path = path / REPLICATED
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    data = _read(path)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an hpctrain checkpoint")
    if data["version"] > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {data['version']}, newer than this "
            f"hpctrain understands ({VERSION}); upgrade hpctrain"
        )
    if architecture and data.get("architecture") != architecture:
        written, wanted = (
            str(name).removeprefix("architectures.")
            for name in (data.get("architecture"), architecture)
        )
        raise CheckpointError(
            f"{path} was written by architecture '{written}', not '{wanted}': to continue "
            f"or fine-tune it, set 'architecture.name: {written}'; to train '{wanted}' from "
            "scratch, leave out continue_from (--continue)"
        )
    return upgrade(data)


def load_rank_state(path: Union[str, Path], rank: int) -> dict[str, Any] | None:
    """This rank's part of a step directory, or None (a file, or a rank that did not
    exist when it was written: resuming with more ranks)."""
    path = Path(path)
    part = path / f"rank-{rank:05d}.pt"
    if not (path.is_dir() and part.is_file()):
        return None
    return torch.load(part, map_location="cpu", weights_only=False)


def committed_steps(root: Union[str, Path]) -> list[tuple[int, Path]]:
    """(step, directory) of every committed checkpoint under ``root``, by step."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.search(path.name)
        if match and (path / COMMITTED).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def verify(path: Union[str, Path]) -> None:
    """Read a committed step directory whole: its record, the shared part and every
    rank's part. Raises :class:`CheckpointError` naming what cannot be read."""
    path = Path(path)
    try:
        world_size = int(json.loads((path / COMMITTED).read_text())["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{path / COMMITTED} is not readable ({error})") from None
    load(path)
    for rank in range(world_size):
        part = path / f"rank-{rank:05d}.pt"
        try:
            torch.load(part, map_location="cpu", weights_only=False)
        except Exception as error:
            raise CheckpointError(
                f"{part} is not readable ({type(error).__name__}: {error})"
            ) from None


def set_aside(path: Union[str, Path]) -> Path:
    """Rename the step directory ``path`` so that it is never chosen or pruned again,
    keeping its files (``step-N`` -> ``step-N.damaged``, ``.damaged-2``, ...)."""
    path = Path(path)
    target, n = path.with_name(f"{path.name}.damaged"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.damaged-{n}")
    os.replace(path, target)
    return target


def latest(root: Union[str, Path]) -> Path | None:
    """The committed checkpoint with the highest step under ``root``."""
    steps = committed_steps(root)
    return steps[-1][1] if steps else None


# -- random states ----------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    state = {
        # the Mersenne Twister's 625 words as one array: saved as one object, not 625
        "python": (version, np.asarray(internal, dtype=np.uint64), gauss),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(int(word) for word in internal), gauss))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- writing during training ------------------------------------------------------------


@dataclasses.dataclass
class _Pending:
    """A step checkpoint whose files are written but not yet committed."""

    step: int
    path: Path
    info: dict[str, Any]
    synced: Future  # this rank's files on disk


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When step checkpoints are written (the ``checkpoint`` options)."""

    every_n_epochs: int = 1  # 0: never at epoch ends (the last epoch always writes one)
    every_n_steps: int | None = None
    every_minutes: float | None = None


class CheckpointManager:
    """Step checkpoints of one run, written by all ranks together, on a :class:`Schedule`.

    A write has two halves. :meth:`start` writes every rank's files (to the page
    cache: about as fast as a bare ``torch.save``) and has a background thread
    fsync them. :meth:`commit`, called by all ranks once they agree that every
    rank's files are on disk (the engine piggybacks this on its per-step
    all-reduce), has the same thread write the commit marker and then remove old
    checkpoints. Until the marker exists the directory is an interrupted write,
    never picked. :meth:`save` does both and waits, for the checkpoints that must
    be visible before the process goes on (a stop, the end).

    :param root: the run's ``checkpoints/`` directory
    :param barrier: waits for all ranks (a no-op in one process)
    """

    def __init__(
        self,
        root: Union[str, Path],
        rank: int,
        world_size: int,
        keep_last: int,
        keep_best: bool,
        barrier: Callable[[], None],
        schedule: Schedule = Schedule(),
    ):
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = max(1, keep_last)
        self.keep_best = keep_best
        self.barrier = barrier
        self.schedule = schedule
        self.last_time = time.monotonic()
        self.pending: _Pending | None = None
        # one thread, so that syncs, markers and removals happen in order
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._committing: Future | None = None

    def path(self, step: int) -> Path:
        return self.root / f"step-{step:09d}"

    # -- the schedule -----------------------------------------------------------------

    def time_due(self) -> bool:
        """This rank's clock says a time-based checkpoint is due (the ranks agree on
        it after the step, see :mod:`hpctrain.agreement`)."""
        minutes = self.schedule.every_minutes
        return minutes is not None and time.monotonic() - self.last_time > 60 * minutes

    def due_after_step(self, step: int, time_due: bool) -> bool:
        """A checkpoint within an epoch: every ``every_n_steps``, or when the ranks
        agreed that one is due by time."""
        every = self.schedule.every_n_steps
        return time_due or bool(every and step % every == 0)

    def due_after_epoch(self, epoch: int, last: bool) -> bool:
        """A checkpoint at the end of epoch ``epoch`` (from 1): every
        ``every_n_epochs``, and always after the last."""
        every = self.schedule.every_n_epochs
        return last or bool(every and epoch % every == 0)

    def latest(self) -> Path | None:
        """The newest committed step checkpoint (the one to continue from)."""
        return latest(self.root)

    def close(self) -> None:
        """Wait for the background work asked for so far, then end its thread."""
        try:
            self.wait()
        finally:
            self._worker.shutdown(wait=True)

    # -- writing ----------------------------------------------------------------------

    def save(
        self,
        step: int,
        write_replicated: Callable[[Path], None],
        rank_state: dict[str, Any],
        info: dict[str, Any],
    ) -> Path:
        """Write and commit step ``step`` (every rank its part, rank 0 the shared
        part); returns once it is committed. Called by every rank."""
        self.start(step, write_replicated, rank_state, info)
        path = self.finish()
        assert path is not None
        return path

    def start(
        self,
        step: int,
        write_replicated: Callable[[Path], None],
        rank_state: dict[str, Any],
        info: dict[str, Any],
    ) -> Path:
        """Write this rank's files of step ``step`` and have them synced to disk in
        the background; a pending earlier checkpoint is finished first. Called by
        every rank."""
        self.finish()
        path = self.path(step)
        if self.rank == 0 and path.exists():
            shutil.rmtree(path)  # an interrupted write of this same step
        self.barrier()
        part = path / f"rank-{self.rank:05d}.pt"
        with deferred_sync():
            atomic_write(part, lambda file: torch.save(rank_state, file))
            if self.rank == 0:
                write_replicated(path / REPLICATED)
        own = [part]
        if self.rank == 0:  # the shared part: whatever the trainer wrote (not the
            # other ranks' parts, which they may be writing and renaming right now)
            own += [
                p
                for p in path.iterdir()
                if p.is_file() and not p.name.startswith(("rank-", ".rank-"))
            ]
        self.pending = _Pending(step, path, info, self._worker.submit(sync_files, path, own))
        self.last_time = time.monotonic()
        return path

    def flushed(self) -> bool:
        """Whether this rank's files of the pending checkpoint are on disk."""
        return self.pending is not None and self.pending.synced.done()

    def commit(self) -> Path:
        """Make the pending checkpoint visible; call on every rank once all ranks'
        files are on disk. Rank 0 has the marker written and then old checkpoints
        removed, in the background (:meth:`wait` waits for both)."""
        pending = self.pending
        assert pending is not None, "no checkpoint to commit"
        self.pending = None
        try:
            pending.synced.result()
        except OSError as error:
            raise CheckpointError(
                f"could not write checkpoint {pending.path} to disk: {error}"
            ) from error
        if self.rank == 0:
            self.wait()
            record = {
                "step": pending.step,
                "world_size": self.world_size,
                "time": time.time(),
                **pending.info,
            }
            self._committing = self._worker.submit(self._mark_and_prune, pending.path, record)
        return pending.path

    def _mark_and_prune(self, path: Path, record: dict[str, Any]) -> None:
        try:
            atomic_write(path / COMMITTED, lambda file: file.write(json.dumps(record).encode()))
        except OSError as error:
            raise CheckpointError(f"could not commit checkpoint {path}: {error}") from error
        self.prune()

    def finish(self) -> Path | None:
        """Commit the pending checkpoint now, if any (all ranks, together), and
        return once every commit marker is on disk."""
        if self.pending is None:
            self.wait()
            return None
        wait_futures([self.pending.synced])
        self.barrier()
        path = self.commit()
        self.wait()
        self.barrier()
        return path

    def wait(self) -> None:
        """Until the commit marker and the removal of old checkpoints asked for by
        the last :meth:`commit` are done; raises if the marker could not be written."""
        committing, self._committing = self._committing, None
        if committing is not None:
            committing.result()

    def prune(self) -> None:
        """Keep the newest ``keep_last`` committed steps and the best one; remove
        the rest, including interrupted writes older than the newest commit."""
        steps = committed_steps(self.root)
        keep = {p for _, p in steps[-self.keep_last :]}
        if self.keep_best:
            best = self.best()
            if best is not None:
                keep.add(best)
        newest = steps[-1][0] if steps else -1
        for path in self.root.iterdir():
            match = _STEP_DIR.search(path.name)
            if not match or path in keep:
                continue
            committed = (path / COMMITTED).is_file()
            if committed or int(match.group(1)) < newest:
                # uncommit first: a removal cut short never leaves a committed remnant
                (path / COMMITTED).unlink(missing_ok=True)
                shutil.rmtree(path, ignore_errors=True)

    def best(self) -> Path | None:
        """The committed step with the lowest validation loss, if any recorded one."""
        scored = []
        for _, path in committed_steps(self.root):
            try:
                record = json.loads((path / COMMITTED).read_text())
            except FileNotFoundError:  # removed meanwhile
                continue
            if record.get("validation_loss") is not None:
                scored.append((record["validation_loss"], record["step"], path))
        return min(scored)[2] if scored else None
