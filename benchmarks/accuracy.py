"""Validation errors after a fixed training budget, next to the composition baseline.

    python benchmarks/accuracy.py --architecture mp_transformer \
        --data examples/rmd17_ethanol_100.xyz --epochs 40 --out accuracy.json

Trains with ``python -m hpctrain`` (seed 0, validation fraction 0.1) and reads the
last validation errors from ``metrics.csv``. The baseline is what the per-element
energies alone give on the same validation structures (forces zero): a model that
learned something is clearly below it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from hpctrain import run
from hpctrain.composition import fit_composition
from hpctrain.config import parse
from hpctrain.data import read_dataset, split_indices
from hpctrain.options import DatasetOptions

SEED = 0


def baseline(data: Path, stress: bool) -> dict[str, float]:
    """Energy (per atom), force and stress RMSE of the composition baseline alone."""
    options = parse(
        DatasetOptions,
        {"systems": {"read_from": str(data)}, "targets": {"energy": {"stress": stress}}},
    )
    dataset = read_dataset(options, "training_set", str(data), torch.float64)
    val, train = split_indices(len(dataset), [0.1], SEED)
    types = dataset.info.atomic_types
    context = run.RunContext(seed=SEED)
    weights = fit_composition(dataset.subset(train), "energy", types, context).weights
    index = {z: i for i, z in enumerate(types)}
    energy, forces, stresses = [], [], []
    for i in val:
        s = dataset[int(i)]
        counts = np.bincount([index[int(z)] for z in s.numbers], minlength=len(types))
        predicted = float(counts @ weights.numpy())
        energy.append((predicted - float(s.targets["energy"][0])) / len(s.numbers))
        forces.append(s.forces["energy"].numpy().ravel())
        if stress:
            stresses.append(s.stress["energy"].numpy().ravel())
    result = {
        "energy RMSE [eV/atom]": float(np.sqrt(np.mean(np.square(energy)))),
        "forces RMSE [eV/A]": float(np.sqrt(np.mean(np.square(np.concatenate(forces))))),
    }
    if stress:
        result["stress RMSE [eV/A^3]"] = float(
            np.sqrt(np.mean(np.square(np.concatenate(stresses))))
        )
    return result


def train(
    architecture: str,
    data: Path,
    stress: bool,
    epochs: int,
    batch: int,
    extra: dict,
    threads: int | None = None,
):
    workdir = Path(tempfile.mkdtemp(prefix="hpctrain-accuracy-"))
    options = {
        "seed": SEED,
        "architecture": {
            "name": architecture,
            "model": extra.get("model", {}),
            "training": {"num_epochs": epochs, "batch_size": batch, **extra.get("training", {})},
        },
        "training_set": {
            "systems": str(data.resolve()),
            "targets": {"energy": {"forces": True, "stress": stress}},
        },
        "validation_set": 0.1,
        "checkpoint": {"every_n_epochs": 0},
    }
    if threads:
        options["distributed"] = {"threads_per_rank": threads}
    (workdir / "options.yaml").write_text(yaml.safe_dump(options))
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "hpctrain",
            str(workdir / "options.yaml"),
            "-o",
            str(workdir / "run"),
        ],
        check=True,
    )
    wall = time.perf_counter() - start
    rows = list(csv.DictReader((workdir / "run" / "metrics.csv").open()))
    epoch_times = [float(r["epoch_time_s"]) for r in rows]
    final = {k[4:]: float(v) for k, v in rows[-1].items() if k.startswith("val ") and "RMSE" in k}
    return {"wall_s": wall, "epoch_s": float(np.mean(epoch_times[1:] or epoch_times)), **final}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="mp_transformer")
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--stress", action="store_true")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hypers", default="{}", help='JSON: {"model": {...}, "training": {...}}')
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU threads (default: hpctrain's choice)"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "architecture": args.architecture,
        "data": args.data.name,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "baseline": baseline(args.data, args.stress),
        "model": train(
            args.architecture,
            args.data,
            args.stress,
            args.epochs,
            args.batch_size,
            json.loads(args.hypers),
            args.threads,
        ),
        "threads": args.threads,
        "load_average_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=1))
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
