"""Training throughput and accuracy of hpctrain runs, written as JSON.

    python benchmarks/train_speed.py --data emt.xyz --device cuda --precision 32 \
        --batch-size 16 64 --epochs 5 --out results.json

Each case trains with ``python -m hpctrain`` in a fresh process (as users do) and
reads the run's ``metrics.csv``: time per epoch (the first epoch, which includes
warm-up, is reported apart), structures per second, and final validation errors.
With ``--check-export``, the exported model is also evaluated by metatomic's ASE
calculator on ``--device`` and on the CPU, in fresh processes, and the largest
energy and force differences are recorded.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def machine() -> dict:
    import torch

    info = {
        "hostname": platform.node(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def options(data: Path, device: str, precision: int, batch_size: int, epochs: int, model: dict):
    return {
        "seed": 0,
        "device": device,
        "base_precision": precision,
        "architecture": {
            "name": "mp_transformer",
            "model": model,
            "training": {"num_epochs": epochs, "batch_size": batch_size},
        },
        "training_set": {
            "systems": str(data),
            "targets": {"energy": {"forces": True, "stress": data.name.startswith("emt")}},
        },
        "validation_set": 0.1,
        "checkpoint": {"every_n_epochs": 0},
    }


def run_case(workdir: Path, name: str, opts: dict) -> dict:
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(opts))
    run_dir = workdir / name
    start = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "hpctrain", str(path), "-o", str(run_dir)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - start
    if result.returncode != 0:
        return {"name": name, "error": result.stderr[-3000:]}
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    times = [float(r["epoch_time_s"]) for r in rows]
    steady = times[1:] or times
    n_train = 0
    for line in (run_dir / "train.log").read_text().splitlines():
        if " data: " in line and " training, " in line:  # the banner's data line
            n_train = int(line.split(" data: ")[1].split(" training")[0])
    epoch = sum(steady) / len(steady)
    last = rows[-1]
    return {
        "name": name,
        "options": opts,
        "wall_s": wall,
        "first_epoch_s": times[0],
        "epoch_s": epoch,
        "structures_per_s": n_train / epoch,
        "final": {k: float(v) for k, v in last.items() if k.startswith("val ")},
        "run_dir": str(run_dir),
    }


def check_export(run_dir: Path, data: Path, device: str) -> dict:
    import ase.io
    import numpy as np

    from hpctrain.testing import evaluate_exported

    sample = run_dir / "sample.xyz"
    ase.io.write(sample, ase.io.read(data, ":8"))
    model, ext = run_dir / "model.pt", run_dir / "extensions"
    on_device = evaluate_exported(model, sample, ext, device=device)
    on_cpu = evaluate_exported(model, sample, ext, device="cpu")
    de = max(abs(a["energy"] - b["energy"]) for a, b in zip(on_device, on_cpu))
    df = max(
        float(np.abs(np.array(a["forces"]) - np.array(b["forces"])).max())
        for a, b in zip(on_device, on_cpu)
    )
    fd = max(abs(f - g) for r in on_device for _, _, f, g in r["fd"])
    return {"device": device, "max_energy_diff_eV": de, "max_force_diff_eV_A": df, "fd_error": fd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", type=int, nargs="+", default=[32])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[16])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--check-export", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    results = {"machine": machine(), "data": str(args.data), "cases": []}
    workdir = Path(tempfile.mkdtemp(prefix="hpctrain-speed-"))
    model = {"d_model": args.d_model}
    for precision in args.precision:
        for batch in args.batch_size:
            name = f"{args.data.stem}-{args.device}-fp{precision}-b{batch}"
            opts = options(args.data.resolve(), args.device, precision, batch, args.epochs, model)
            case = run_case(workdir, name, opts)
            print(json.dumps({k: v for k, v in case.items() if k != "options"}), flush=True)
            results["cases"].append(case)
    if args.check_export:
        done = [c for c in results["cases"] if "error" not in c]
        if done:
            results["export"] = check_export(Path(done[-1]["run_dir"]), args.data, args.device)
            print(json.dumps(results["export"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
