"""Two runs sharing a machine: does each get its share of the cores?

Runs ``hpctrain train`` on EMT data (periodic, energies, forces, stress), one process
each, in three set-ups on the same machine:

1. ``alone``: one run with half of the usable cores (``OMP_NUM_THREADS``);
2. ``shared``: two runs at once, each given half the cores by ``OMP_NUM_THREADS``;
3. ``oversubscribed``: two runs at once, each taking every core
   (``distributed.threads_per_rank``), which is what a run did when it ignored
   ``OMP_NUM_THREADS``.

Reports the training-step throughput of each run (structures per second over the
epochs after the first, from ``metrics.csv``) and its slowdown against ``alone``. A
run given its share should be about as fast beside another as alone. With ``--bind``,
the runs given half the cores are also bound to their own half (as ``taskset`` or
``srun --cpu-bind`` does); hpctrain then reads its share from the affinity.

    python benchmarks/threads.py --out threads.json
    python benchmarks/threads.py --quick --out /tmp/threads.json   # a smoke run
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

OPTIONS = """\
architecture:
  name: {architecture}
  training: {{num_epochs: {epochs}, batch_size: {batch}}}
checkpoint: {{every_n_epochs: 0}}
training_set:
  systems: {data}
  targets: {{energy: {{forces: true, stress: true}}}}
validation_set: 0.05
seed: 1
{threads}
"""


def start(
    workdir: Path, name: str, options: str, omp: int, cpus: list[int] | None
) -> subprocess.Popen:
    path = workdir / f"{name}.yaml"
    path.write_text(options)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["OMP_NUM_THREADS"] = str(omp)
    log = open(workdir / f"{name}.out", "w")
    return subprocess.Popen(
        [sys.executable, "-m", "hpctrain", str(path), "-o", str(workdir / name)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )


def throughput(run_dir: Path, structures: int) -> float:
    """Training structures per second over the epochs after the first (warm-up)."""
    with open(run_dir / "metrics.csv") as file:
        times = [float(row["epoch_time_s"]) for row in csv.DictReader(file)]
    return structures / statistics.median(times[1:] if len(times) > 1 else times)


def trained_structures(out: Path) -> int:
    for line in out.read_text().splitlines():
        if line.strip().startswith("data: "):
            return int(line.split("data: ")[1].split()[0])
    raise RuntimeError(f"no data line in {out}:\n{out.read_text()[-2000:]}")


def setup(workdir: Path, name: str, runs: list[tuple]) -> list[dict]:
    """Start ``runs`` (name, options, OMP_NUM_THREADS, cores or None) at once; their
    throughputs."""
    started = time.perf_counter()
    procs = [(run[0], start(workdir, *run)) for run in runs]
    results = []
    for run, proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"{run} failed:\n{(workdir / f'{run}.out').read_text()[-3000:]}")
        structures = trained_structures(workdir / f"{run}.out")
        threads = next(
            line.split(", ", 1)[1].strip()
            for line in (workdir / f"{run}.out").read_text().splitlines()
            if line.strip().startswith("ranks: ")
        )
        results.append(
            {
                "setup": name,
                "run": run,
                "threads": threads,
                "structures_per_s": throughput(workdir / run, structures),
            }
        )
    print(f"{name}: {time.perf_counter() - started:.0f} s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--architecture", default="soap_bpnn")
    parser.add_argument("--structures", type=int, default=400)
    parser.add_argument("--atoms", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a tiny smoke configuration")
    parser.add_argument(
        "--bind", action="store_true", help="bind the runs given half the cores to their half"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.quick:
        args.structures, args.atoms, args.epochs, args.batch = 60, 8, 2, 8
    usable = sorted(os.sched_getaffinity(0))
    cores = len(usable)
    half = max(1, cores // 2)
    first, second = (usable[:half], usable[half : 2 * half]) if args.bind else (None, None)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        data = workdir / "emt.xyz"
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "make_emt_dataset.py")]
            + ["-n", str(args.structures), "--atoms", str(args.atoms), "-o", str(data)],
            check=True,
        )

        def options(threads: str) -> str:
            return OPTIONS.format(
                architecture=args.architecture,
                epochs=args.epochs,
                batch=args.batch,
                data=data,
                threads=threads,
            )

        own = options("")
        greedy = options(f"distributed: {{threads_per_rank: {cores}}}")
        rows = setup(workdir, "alone", [("alone", own, half, first)])
        rows += setup(
            workdir, "shared", [("shared-a", own, half, first), ("shared-b", own, half, second)]
        )
        rows += setup(
            workdir,
            "oversubscribed",
            [("greedy-a", greedy, half, None), ("greedy-b", greedy, half, None)],
        )
    alone = rows[0]["structures_per_s"]
    for row in rows:
        row["slowdown"] = alone / row["structures_per_s"]
    result = {
        "machine": {
            "hostname": platform.node(),
            "cores": cores,
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "config": vars(args) | {"out": str(args.out), "threads_each": half},
        "runs": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'run':<10} {'threads':<48} {'structures/s':>12} {'slowdown':>9}")
    for row in rows:
        print(
            f"{row['run']:<10} {row['threads']:<48} {row['structures_per_s']:>12.1f} "
            f"{row['slowdown']:>9.2f}"
        )


if __name__ == "__main__":
    main()
