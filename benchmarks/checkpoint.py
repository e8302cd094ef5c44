"""Checkpoint write and load times against state size, next to a bare torch.save.

    python benchmarks/checkpoint.py --sizes 1 10 100 --out checkpoint.json

For each state size (MB of float32 weights, plus Adam's two moments: 3x), times
(median of ``--repeat``) a bare ``torch.save`` to a new file on the same disk, the
same followed by an fsync (what durability costs anyway), and step checkpoints of
hpctrain's CheckpointManager in one process: "write", what a training step waits
for (the rank part and the replicated part written; their fsync and the commit
marker follow in the background), and "committed", until the commit marker is on
disk (what a stop or the end of training waits for); then loading it back. Target:
the write within 1.2x of the bare ``torch.save``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from hpctrain import checkpoint


def state_of(megabytes: float) -> dict:
    n = int(megabytes * 2**20 / 4)
    model = {"weights": torch.randn(n)}
    optimizer = {"exp_avg": torch.randn(n), "exp_avg_sq": torch.rand(n)}
    return {"architecture": "benchmark", "model_state": model, "trainer_state": optimizer}


def timed(function, repeat: int, before=lambda: None) -> float:
    """Median wall time of ``function``; ``before`` runs untimed ahead of each call."""
    times = []
    for _ in range(repeat):
        before()
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(size: float, root: Path, manager, repeat: int) -> dict:
    state = state_of(size)
    # Like the checkpoints, each bare save goes to a new file and the newest
    # KEEP files are kept (the older ones removed untimed): the page cache then holds
    # as much written data as with the checkpoint manager.
    write, before = rotating(root / "bare", KEEP, lambda path: torch.save(state, path))
    bare = timed(write, repeat, before)
    write, before = rotating(root / "synced", KEEP, lambda path: save_and_fsync(state, path))
    synced = timed(write, repeat, before)
    steps = iter(range(manager_step(manager), 10**9))

    def start() -> None:
        manager.start(
            next(steps),
            lambda path: checkpoint.save(state, path),
            {"rng": checkpoint.rng_state()},
            {},
        )

    # What a training step waits for: the files written (synced in the background).
    # The sync, the commit marker and the removal of old checkpoints go on while
    # training does; nothing else runs here, so they are finished untimed.
    write = timed(start, repeat, manager.finish)
    manager.finish()
    # until the checkpoint is committed on disk, as at a stop or the end of training
    durable = timed(lambda: (start(), manager.finish()), repeat)
    latest = checkpoint.latest(manager.root)
    load = timed(lambda: checkpoint.load(latest), repeat)
    return {
        "state_mb": 3 * size,
        "bare_torch_save_s": bare,
        "torch_save_fsync_s": synced,
        "checkpoint_write_s": write,
        "ratio": write / bare,
        "checkpoint_committed_s": durable,
        "committed_ratio_to_fsynced": durable / synced,
        "checkpoint_load_s": load,
    }


KEEP = 2  # the manager's keep_last below


def rotating(prefix: Path, keep: int, save) -> tuple:
    """(write, before) for :func:`timed`: ``save`` to a new file each time, and
    before it, untimed, the removal of files older than the newest ``keep`` (as the
    checkpoint manager keeps ``keep_last`` committed ones while it writes the next)."""
    written: list[Path] = []
    count = itertools.count()

    def write() -> None:
        written.append(prefix.with_name(f"{prefix.name}-{next(count)}.pt"))
        save(written[-1])

    def before() -> None:
        while len(written) > keep:
            written.pop(0).unlink()

    return write, before


def save_and_fsync(state: dict, path: Path) -> None:
    with open(path, "wb") as file:
        torch.save(state, file)
        file.flush()
        os.fsync(file.fileno())


def manager_step(manager) -> int:
    steps = checkpoint.committed_steps(manager.root)
    return steps[-1][0] + 1 if steps else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 10, 100])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="disk to write to")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(dir=args.dir, prefix="hpctrain-ckpt-"))
    results = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "date": time.strftime("%Y-%m-%d"),
        },
        "cases": [],
    }
    manager = checkpoint.CheckpointManager(root / "checkpoints", 0, 1, KEEP, False, lambda: None)
    for size in args.sizes:
        case = measure(size, root, manager, args.repeat)
        print(json.dumps(case), flush=True)
        results["cases"].append(case)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
