"""Peak memory of training steps on structures of very different sizes: batches of a
fixed number of structures against batches by atom budget (``max_atoms_per_batch``).

    python benchmarks/atom_budget.py --out atom-budget.json           # ~3 min, 2 cores
    python benchmarks/atom_budget.py --device cuda --out atom-budget.json

Data: EMT structures (energies, forces, stress) of two sizes mixed, by default 300 of
8 atoms and 40 of 200 atoms (``make_emt_dataset.py``), as a dataset mixing molecules
and bulk cells has them. ``mp_transformer`` (default hypers, float32) trains one epoch
with ``batch_size`` B, then one with ``max_atoms_per_batch`` = B × the mean atoms per
structure (the same mean batch). For every step: its atoms, neighbour pairs, time
and peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over the step, on the
CPU the process's peak resident memory so far (Linux's VmHWM) above its value after
the first step: memory freed by a step is reused by the next, so on the CPU the
epoch's peak is what the largest step needed. Each batching trains in a process of
its own.

Also, for 2, 4 and 8 ranks, how unevenly the ranks' shares of each batch are loaded
(the largest share's estimated work over the mean share's), with both batchings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data import load, log, machine, open_dataset, training_engine, write_results  # noqa: E402


def mixed_dataset(workdir: Path, small: int, large: int, sizes: tuple[int, int]) -> Path:
    make = [sys.executable, str(ROOT / "benchmarks" / "make_emt_dataset.py")]
    parts = []
    for seed, (n, atoms) in enumerate(((small, sizes[0]), (large, sizes[1]))):
        part = workdir / f"emt-{atoms}.xyz"
        subprocess.run(
            [*make, "-n", str(n), "--atoms", str(atoms), "--seed", str(seed), "-o", str(part)],
            check=True,
        )
        parts.append(part.read_text())
    path = workdir / "mixed.xyz"
    path.write_text("".join(parts))
    return path


def resident_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def epoch_of_steps(engine, device: torch.device) -> list[dict]:
    """One epoch, each step measured; the first step (which allocates what every step
    reuses) is the baseline of the CPU's memory and is left out."""
    plan = [engine.micro_batches(s.local) for s in engine.sampler.plan()]
    prepared = engine.loader.batches(plan)
    rows, base = [], None
    try:
        for step in engine.sampler:
            batches = next(prepared)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            engine.train_step(step.global_, batches)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                peak = (torch.cuda.max_memory_allocated(device) - before) / 2**20
            else:  # the process's peak so far, above the state after the first step
                high = resident_kib("VmHWM") / 1024
                base = high if base is None else base
                peak = high - base
            rows.append(
                {
                    "structures": len(step.global_),
                    "atoms": sum(int(b.n_atoms.sum()) for b in batches),
                    "pairs": sum(len(b.pairs[0].centers) for b in batches),
                    "step_s": time.perf_counter() - start,
                    "peak_mib": peak,
                }
            )
    finally:
        prepared.close()
    return rows[1:]


def imbalance(engine, batch_size: int, budget: int, world_sizes: list[int]) -> dict:
    """Weak scaling over ``world_sizes`` ranks (``batch_size`` structures or ``budget``
    atoms per rank): per batching, the mean and worst ratio of the most loaded rank's
    estimated work to the mean rank's, over an epoch's batches."""
    from hpctrain.data.sampler import DistributedBatchSampler, balanced_owners, work_estimates

    data, seed = engine.train_set, engine.sampler.seed
    cutoff = max(r.cutoff for r in engine.requests)
    costs = work_estimates(data.n_atoms, data.volumes, cutoff)  # (as N ranks estimate it)
    out: dict = {}
    for world in world_sizes:
        for name, size, atoms in (
            ("batch_size", batch_size * world, None),
            ("max_atoms_per_batch", 1, budget * world),
        ):
            sampler = DistributedBatchSampler(
                len(data), size, 0, world, seed, costs=costs, max_atoms=atoms, n_atoms=data.n_atoms
            )
            ratios = []
            for batch in sampler.global_batches():
                loads = np.bincount(balanced_owners(costs[batch], world), costs[batch], world)
                ratios.append(float(loads.max() / loads.mean()))
            out.setdefault(name, {})[str(world)] = {
                "mean": statistics.mean(ratios),
                "worst": max(ratios),
            }
    return out


def summary(rows: list[dict]) -> dict:
    out = {}
    for key in ("structures", "atoms", "pairs", "peak_mib", "step_s"):
        values = [r[key] for r in rows]
        out[key] = {"min": min(values), "median": statistics.median(values), "max": max(values)}
    return out


def one_batching(args, path: Path, training: dict, workdir: Path) -> dict:
    """Train one epoch with ``training``'s batching (in a process of its own, so that
    the other batching's memory does not count)."""
    device = torch.device(args.device)
    dataset = open_dataset(path, True)
    engine = training_engine(dataset, training, device, workdir)
    rows = epoch_of_steps(engine, device)
    return {"training": training, "steps": rows, "summary": summary(rows), "load": load()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--small", type=int, default=300, help="structures of the small size")
    parser.add_argument("--large", type=int, default=40, help="structures of the large size")
    parser.add_argument("--sizes", type=int, nargs=2, default=[8, 200], help="their atoms")
    parser.add_argument("--quick", action="store_true", help="60 + 8 structures of 8 and 64 atoms")
    parser.add_argument("--out", type=Path, default=Path("atom-budget.json"))
    parser.add_argument("--worker", nargs=2, metavar=("DATA", "TRAINING"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        data, training = args.worker
        with tempfile.TemporaryDirectory(prefix="hpctrain-atom-budget-") as scratch:
            row = one_batching(args, Path(data), json.loads(training), Path(scratch))
        print(json.dumps(row))
        return
    if args.quick:
        args.small, args.large, args.sizes, args.batch_size = 60, 8, [8, 64], 8
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "worker")}
    results: dict = {"machine": machine(), "load_start": load(), "settings": settings}
    with tempfile.TemporaryDirectory(prefix="hpctrain-atom-budget-") as scratch:
        workdir = Path(scratch)
        path = mixed_dataset(workdir, args.small, args.large, tuple(args.sizes))
        dataset = open_dataset(path, True)
        mean_atoms = float(np.mean(dataset.n_atoms))
        budget = int(round(args.batch_size * mean_atoms))
        results["mean_atoms"], results["budget"] = mean_atoms, budget
        results["runs"] = {}
        for name, training in (
            ("batch_size", {"batch_size": args.batch_size}),
            ("max_atoms_per_batch", {"max_atoms_per_batch": budget}),
        ):
            worker = [sys.executable, __file__, "--device", args.device, "--worker", str(path)]
            done = subprocess.run(
                [*worker, json.dumps(training)], check=True, capture_output=True, text=True
            )
            results["runs"][name] = row = json.loads(done.stdout.splitlines()[-1])
            s = row["summary"]
            log(
                f"{name} {next(iter(training.values()))}: atoms per step "
                f"{s['atoms']['min']}-{s['atoms']['max']}, peak memory "
                f"{s['peak_mib']['max']:.0f} MiB above the first step's"
            )
        engine = training_engine(dataset, {"batch_size": args.batch_size}, "cpu", workdir)
        results["rank_imbalance"] = imbalance(engine, args.batch_size, budget, [2, 4, 8])
        for name, worlds in results["rank_imbalance"].items():
            text = ", ".join(
                f"{w} ranks {v['mean']:.2f} (worst {v['worst']:.2f})" for w, v in worlds.items()
            )
            log(f"most loaded rank / mean, {name}: {text}")
    results["load_end"] = load()
    write_results(args.out, results)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
