"""The batch loader's own rate, by loader threads, and the share of a step spent waiting for it.

    python benchmarks/loader.py --out benchmarks/results/loader.json          # 3-4 min, 2 cores
    python benchmarks/loader.py --quick --out /tmp/loader-quick.json          # smoke test

Data: EMT structures of 32 atoms (periodic fcc alloys, ``make_emt_dataset.py``),
converted to shards with ``hpctrain convert``, once without neighbour pairs
(*searched*: the loader searches them per batch) and once with ``--neighbors 5``
(*stored*: read with the positions), and opened as training opens them (float32).
Neighbour lists: the model's own requests (``mp_transformer``, default hypers: one
full list at 5 Å). Every measurement below is made for both.

1. **Loader rate**: epochs of ``BatchLoader.batches`` over the sampler's plan
   (``DistributedBatchSampler``, rank 0 of 1), for 0, 1, 2... loader threads, each
   batch consumed by a trivial model (the sum of its pair vectors, so that every
   batch is made and used). Structures/s is the median of steady epochs (the first,
   opening files, is reported apart).
2. **Where a batch's time goes** (no threads): reading the structures from the
   shards, their neighbour pairs (searched by vesin, one thread, or made from the
   stored ones), the rest of ``collate``.
3. **Data waiting in training**: ``mp_transformer`` steps (``Engine.train_step``) fed
   by the loader as ``Engine.run_steps`` feeds them; the share of the wall time
   spent in ``next()`` of the loader, by loader threads.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # architectures/ when run from elsewhere
sys.path.insert(0, str(ROOT / "benchmarks"))

from data import (  # noqa: E402
    hpctrain_command,
    load,
    log,
    machine,
    open_dataset,
    training_engine,
    write_results,
)

TARGETS = {"structures_per_s": 20000.0, "data_share": 0.02}


def make_shards(workdir: Path, n: int, cutoff: float) -> dict[str, Path]:
    """The same EMT structures as shards without (``searched``) and with (``stored``)
    their neighbour pairs within ``cutoff``."""
    xyz = workdir / "emt.xyz"
    make = [sys.executable, str(ROOT / "benchmarks" / "make_emt_dataset.py")]
    subprocess.run([*make, "-n", str(n), "--atoms", "32", "-o", str(xyz)], check=True)
    out = {"searched": workdir / "emt-shards", "stored": workdir / "emt-pairs"}
    for pairs, shards in out.items():
        extra = ["--neighbors", str(cutoff)] if pairs == "stored" else []
        convert = [*hpctrain_command(), "convert", str(xyz), "-o", str(shards), *extra]
        subprocess.run(convert, check=True, capture_output=True)
    return out


def model_requests() -> list:
    from architectures.mp_transformer import __model__ as Model

    dataset_info = open_dataset(ROOT / "examples" / "rmd17_ethanol_100.xyz", False).info
    return list(Model({}, dataset_info).requested_neighbor_lists())


def loader_rate(shards: Path, requests: list, workers: int, batch_size: int, min_s: float):
    """Epochs of batches made by ``workers`` threads and used by a trivial model."""
    from hpctrain.data import DistributedBatchSampler
    from hpctrain.data.batch import pair_vectors
    from hpctrain.data.loader import BatchLoader

    dataset = open_dataset(shards, True)
    loader = BatchLoader(dataset, requests, torch.device("cpu"), workers)
    sampler = DistributedBatchSampler(len(dataset), batch_size, rank=0, world_size=1, seed=0)
    times, pairs = [], 0
    while len(times) < 4 or sum(times[1:]) < min_s:
        sampler.set_epoch(len(times))
        plan = [[step.local] for step in sampler.plan()]
        start = time.perf_counter()
        seen = 0
        for (batch,) in loader.batches(plan):
            p = batch.pairs[0]
            pair_vectors(p, batch.positions).sum()
            seen += len(batch.n_atoms)
            pairs += len(p.centers)
        times.append(time.perf_counter() - start)
        assert seen == len(dataset), (seen, len(dataset))
    n = len(dataset)
    return {
        "workers": workers,
        "batch_size": batch_size,
        "n_structures": n,
        "pairs_per_structure": pairs / n / len(times),
        "first_epoch_structures_per_s": n / times[0],
        "structures_per_s": n / statistics.median(times[1:]),
        "epochs": len(times),
        "load": load(),
    }


def batch_breakdown(shards: Path, requests: list, batch_size: int) -> dict:
    """Microseconds per structure of reading, neighbour lists and the rest of collate."""
    from hpctrain.data.batch import collate, neighbor_pairs

    dataset = open_dataset(shards, True)
    chunks = np.array_split(np.arange(len(dataset)), max(1, len(dataset) // batch_size))
    seconds = {"read": 0.0, "neighbor_lists": 0.0, "collate_without_neighbor_lists": 0.0}
    for timed in (False, True):  # a first pass opens files, fills caches, loads vesin
        for chunk in chunks:
            start = time.perf_counter()
            columns = dataset.columns(chunk)
            read = time.perf_counter()
            for r in requests:
                neighbor_pairs(columns, columns.offsets, r.cutoff, r.full_list, torch.float32)
            paired = time.perf_counter()
            collate(columns)
            if timed:
                seconds["read"] += read - start
                seconds["neighbor_lists"] += paired - read
                seconds["collate_without_neighbor_lists"] += time.perf_counter() - paired
    per = {f"{k}_us": 1e6 * v / len(dataset) for k, v in seconds.items()}
    return {**per, "total_us": sum(per.values())}


def data_share(shards: Path, workers: int, batch_size: int, steps: int, workdir: Path) -> dict:
    """Wall time of ``mp_transformer`` steps and of waiting for their batches."""
    dataset = open_dataset(shards, True)
    options = {"batch_size": batch_size, "num_workers": workers}
    engine = training_engine(dataset, options, "cpu", workdir)
    engine.train_step(*_first_step(engine))  # warm-up
    plan = [engine.micro_batches(s.local) for s in engine.sampler.plan()][:steps]
    waiting = stepping = 0.0
    prepared = engine.loader.batches(plan)
    try:
        for step, _ in zip(engine.sampler, range(steps)):
            start = time.perf_counter()
            batches = next(prepared)
            middle = time.perf_counter()
            engine.train_step(step.global_, batches)
            waiting += middle - start
            stepping += time.perf_counter() - middle
    finally:
        prepared.close()
    return {
        "workers": workers,
        "batch_size": batch_size,
        "steps": steps,
        "step_s": stepping / steps,
        "data_wait_s": waiting / steps,
        "data_share": waiting / (waiting + stepping),
        "load": load(),
    }


def _first_step(engine) -> tuple:
    step = next(iter(engine.sampler.plan()))
    return step.global_, engine.step_batches(step.local)


def table(results: dict) -> str:
    lines = [
        "Loader rate (EMT 32 atoms, shards, 5 A full list, trivial model)",
        f"  {'pairs':>8} {'threads':>7} {'first epoch/s':>14} {'steady/s':>10}",
    ]
    for r in results["rate"]:
        lines.append(
            f"  {r['pairs']:>8} {r['workers']:>7} {r['first_epoch_structures_per_s']:>14.0f} "
            f"{r['structures_per_s']:>10.0f}"
        )
    lines.append("Per structure (no threads)")
    for pairs, b in results["breakdown"].items():
        lines.append(
            f"  {pairs}: read {b['read_us']:.0f} us, neighbour lists "
            f"{b['neighbor_lists_us']:.0f} us, rest of collate "
            f"{b['collate_without_neighbor_lists_us']:.0f} us"
        )
    lines.append("Waiting for data in mp_transformer steps (share of wall time)")
    for r in results["training"]:
        lines.append(
            f"  {r['pairs']}, {r['workers']} thread(s): step {r['step_s']:.3f} s, waiting "
            f"{1000 * r['data_wait_s']:.1f} ms ({100 * r['data_share']:.2f}%)"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("loader-benchmark.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("-n", type=int, help="EMT structures (default 3000)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, help="timed training steps (default 20)")
    args = parser.parse_args()
    n = args.n or (64 if args.quick else 3000)
    steps = args.steps or (2 if args.quick else 20)
    min_s = 0.2 if args.quick else 2.0
    started = time.perf_counter()
    results: dict = {"machine": machine(), "load_start": load(), "targets": TARGETS}
    results["settings"] = {"structures": n, "batch_size": args.batch_size, "steps": steps}
    with tempfile.TemporaryDirectory(prefix="hpctrain-loader-bench-") as scratch:
        workdir = Path(scratch)
        requests = model_requests()
        cutoff = max(r.cutoff for r in requests)
        log(f"generating {n} EMT structures and their shards")
        directories = make_shards(workdir, n, cutoff)
        results["requests"] = [{"cutoff": r.cutoff, "full_list": r.full_list} for r in requests]
        results["rate"], results["breakdown"], results["training"] = [], {}, []
        for pairs, shards in directories.items():
            for workers in args.workers:
                row = loader_rate(shards, requests, workers, args.batch_size, min_s)
                results["rate"].append({"pairs": pairs, **row})
                log(f"  {pairs}, {workers} thread(s): {row['structures_per_s']:.0f} structures/s")
            results["breakdown"][pairs] = batch_breakdown(shards, requests, args.batch_size)
            for workers in sorted({0, max(args.workers)}):
                row = data_share(shards, workers, args.batch_size, steps, workdir)
                results["training"].append({"pairs": pairs, **row})
                log(f"  training, {pairs}, {workers} thread(s): {100 * row['data_share']:.2f}%")
    best = max(r["structures_per_s"] for r in results["rate"])
    default_share = next(
        r["data_share"] for r in results["training"] if r["workers"] == 0 and r["pairs"] == "stored"
    )
    results["verdicts"] = {
        "best_structures_per_s": best,
        "rate_met": best >= TARGETS["structures_per_s"],
        "data_share_default": default_share,
        "data_share_met": min(r["data_share"] for r in results["training"]) < TARGETS["data_share"],
    }
    results["load_end"] = load()
    results["total_s"] = time.perf_counter() - started
    write_results(args.out, results)
    print(table(results))
    log(f"wrote {args.out} in {results['total_s']:.0f} s")


if __name__ == "__main__":
    main()
