"""hpctrain's ``soap_bpnn`` against metatrain's ``soap_bpnn``, side by side on one CPU.

    python benchmarks/peer_soap_bpnn.py --data emt200.xyz --stress --epochs 5 \
        --batch-size 16 --repeats 2 --out peer.json

Creates a virtual environment for the peer (``--venv``, default under the system's
temporary directory; never inside the repository) and installs ``torch==2.13.0``
there first (``--torch-index-url https://download.pytorch.org/whl/cpu`` for the CPU
build where the default index serves CUDA wheels), then ``metatrain[soap-bpnn]`` with
torch pinned. It reads the peer's default hypers from the installed package, writes
matching options for both frameworks (same data split, same SOAP cutoff, width,
``max_angular``, ``max_radial``, same network sizes, batch size, epochs, learning
rate, precision, seed, one thread, no data-loader workers), runs both in turn
(``--repeats`` times, interleaved, so that both see the same load) and reads from
their outputs:

- the epoch period: time between consecutive epoch lines of each log (one training
  epoch plus validation, the same for both), averaged over epochs 2 onwards (the
  first has warm-up); hpctrain's from its log's millisecond stamps, metatrain's
  (whose stamps are whole seconds) from when each line reached this script.
  hpctrain's ``metrics.csv`` also gives its training time alone;
- the final validation RMSEs (energy per atom and forces);
- the CPU time of each whole run (start-up and final evaluation included), which
  other jobs on the machine disturb less than wall times.

It writes JSON (versions, the peer's defaults, settings, load averages, every run)
and prints a table. The two models differ where the frameworks do; the JSON lists
how under ``differences``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"

DIFFERENCES = [
    "descriptor: hpctrain computes featomic's SOAP power spectrum (GTO radial basis, "
    "Gaussian density of width 0.3 A, radial scaling, one block per unordered pair of "
    "neighbour types); metatrain's uses torch-spex (Laplacian-eigenstate radial basis, "
    "point density, no radial scaling, every ordered pair of neighbour types), so its "
    "feature vector is longer for more than one element",
    "heads: metatrain adds a per-target MLP head (one hidden layer) after the per-element "
    "networks; hpctrain's per-element networks end in the output layer",
    "loss weights, learning-rate schedule and target scaling follow each framework's defaults",
]


def peer_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install_peer(venv: Path, torch_index_url: str | None) -> None:
    """A virtual environment with torch (pinned) and metatrain, unless already there."""
    if (venv / "bin" / "mtt").exists():
        return
    print(f"creating the peer environment in {venv}", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(peer_python(venv)), "-m", "pip", "install", "--quiet"]
    index = ["--index-url", torch_index_url] if torch_index_url else []
    subprocess.run([*pip, TORCH, *index], check=True)
    constraints = venv / "constraints.txt"
    constraints.write_text(TORCH + "\n")
    subprocess.run([*pip, "-c", str(constraints), "metatrain[soap-bpnn]"], check=True)


def peer_info(venv: Path) -> dict:
    """Versions and the default hypers of metatrain's soap_bpnn, from the package."""
    script = (
        "import json, importlib.metadata as m\n"
        "from metatrain.utils.architectures import get_default_hypers\n"
        "print(json.dumps({'versions': {p: m.version(p) for p in "
        "['metatrain', 'torch', 'torch-spex', 'metatensor-torch', 'metatomic-torch']}, "
        "'defaults': get_default_hypers('soap_bpnn')}, default=str))\n"
    )
    out = subprocess.run(
        [str(peer_python(venv)), "-c", script], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def split(data: Path, workdir: Path, fraction: float, seed: int) -> tuple[Path, Path, int]:
    """The same training and validation files for both frameworks."""
    import ase.io

    frames = ase.io.read(data, ":")
    order = np.random.default_rng(seed).permutation(len(frames))
    n_val = max(1, round(fraction * len(frames)))
    train, val = workdir / "train.xyz", workdir / "val.xyz"
    ase.io.write(train, [frames[i] for i in order[n_val:]])
    ase.io.write(val, [frames[i] for i in order[:n_val]])
    return train, val, len(frames) - n_val


def hypers_from(args: argparse.Namespace) -> dict:
    return {
        "soap": {
            "cutoff": {"radius": args.cutoff, "width": args.cutoff_width},
            "max_angular": args.max_angular,
            "max_radial": args.max_radial,
        },
        "bpnn": {
            "num_hidden_layers": args.hidden_layers,
            "num_neurons_per_layer": args.neurons,
            "layernorm": True,
        },
    }


def shared_options(args, model: dict, **training: Any) -> dict:
    """What both frameworks' options say alike: seed, precision, device, model hypers
    and the training budget; ``training`` adds each framework's own training keys."""
    return {
        "seed": args.seed,
        "base_precision": args.precision,
        "device": "cpu",
        "architecture": {
            "name": "soap_bpnn",
            "model": model,
            "training": {
                "num_epochs": args.epochs,
                "batch_size": args.batch_size,
                "learning_rate": args.learning_rate,
                **training,
            },
        },
        "test_set": 0.0,
    }


def ours_options(args, model: dict, train: Path, val: Path) -> dict:
    # metatrain warms up over 1% of the steps
    options = shared_options(args, model, warmup_epochs=0.01 * args.epochs)

    def dataset(path: Path) -> dict:
        targets = {"energy": {"unit": "eV", "forces": True, "stress": args.stress}}
        return {"systems": str(path), "targets": targets}

    return {
        **options,
        "training_set": dataset(train),
        "validation_set": dataset(val),
        "distributed": {"threads_per_rank": 1},
        "checkpoint": {"every_n_epochs": 0},
    }


def peer_options(args, model: dict, train: Path, val: Path) -> dict:
    options = shared_options(
        args, model, num_workers=0, log_interval=1, checkpoint_interval=args.epochs + 1
    )

    def dataset(path: Path) -> dict:
        targets = {"energy": {"key": "energy", "unit": "eV", "forces": {"key": "forces"}}}
        if args.stress:
            targets["energy"]["stress"] = {"key": "stress"}
        return {"systems": {"read_from": str(path), "length_unit": "angstrom"}, "targets": targets}

    return {**options, "training_set": dataset(train), "validation_set": dataset(val)}


def epoch_period(times: list[float]) -> float | None:
    """Mean time (seconds) between consecutive epoch lines, from the second epoch on."""
    if len(times) < 3:
        return None
    return (times[-1] - times[1]) / (len(times) - 2)


def run_ours(options: dict, workdir: Path, env: dict) -> dict:
    (workdir / "options.yaml").write_text(yaml.safe_dump(options))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "hpctrain", "train", "options.yaml", "-o", "run"],
        cwd=workdir,
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    rows = list(csv.DictReader((workdir / "run" / "metrics.csv").open()))
    log = (workdir / "run" / "train.log").read_text().splitlines()
    stamps = [
        datetime.strptime(" ".join(line.split()[:2]), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for line in log
        if re.search(r"INFO epoch .* structures/s\)$", line)
    ]
    train_times = [float(r["epoch_time_s"]) for r in rows]
    last = rows[-1]
    return {
        "wall_s": wall,
        "epoch_period_s": epoch_period(stamps),
        "train_epoch_s": statistics.mean(train_times[1:] or train_times),
        "val_energy_rmse_ev_per_atom": float(last["val energy RMSE [eV/atom]"]),
        "val_forces_rmse_ev_per_a": float(last["val forces RMSE [eV/A]"]),
        "per_epoch": [
            [float(r["val energy RMSE [eV/atom]"]), float(r["val forces RMSE [eV/A]"])]
            for r in rows
        ],
    }


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def run_stamped(command: list[str], cwd: Path, env: dict) -> tuple[int, list[tuple[float, str]]]:
    """Run ``command`` with its stdout and stderr read line by line as they come: its
    exit status and every line with the time (``perf_counter``) it arrived. Python's
    logging flushes each record, so the arrival is when it was logged, to well under a
    millisecond, where the log's own stamps are whole seconds."""
    lines: list[tuple[float, str]] = []
    with subprocess.Popen(
        command,
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as process:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append((time.perf_counter(), line.rstrip("\n")))
    return process.returncode, lines


def run_peer(options: dict, workdir: Path, env: dict, venv: Path) -> dict:
    (workdir / "options.yaml").write_text(yaml.safe_dump(options))
    start = time.perf_counter()
    returncode, lines = run_stamped(
        [str(venv / "bin" / "mtt"), "train", "options.yaml", "-o", "model.pt"], workdir, env
    )
    wall = time.perf_counter() - start
    (workdir / "mtt.log").write_text("\n".join(line for _, line in lines) + "\n")
    if returncode != 0:
        raise SystemExit(f"metatrain failed (exit {returncode}); see {workdir / 'mtt.log'}")
    # metatrain stamps its log lines in whole seconds, which alone would move a 3 s
    # epoch period by up to 10 %: the epoch lines are timed as they arrive instead
    stamps = [at for at, line in lines if re.search(r"\]\[INFO\] - Epoch:", line)]
    (train_csv,) = (workdir / "outputs").rglob("train.csv")
    table = train_csv.read_text().splitlines()
    header = [h.strip() for h in table[0].split(",")]
    rows = [dict(zip(header, [v.strip() for v in line.split(",")])) for line in table[1:]]
    rows = [r for r in rows if _is_number(r.get("validation forces RMSE", ""))]  # no unit rows
    errors = [  # metatrain logs meV
        [
            float(r["validation energy RMSE (per atom)"]) / 1000,
            float(r["validation forces RMSE"]) / 1000,
        ]
        for r in rows
    ]
    return {
        "wall_s": wall,
        "epoch_period_s": epoch_period(stamps),
        "val_energy_rmse_ev_per_atom": errors[-1][0],
        "val_forces_rmse_ev_per_a": errors[-1][1],
        "per_epoch": errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="extxyz with energy, forces")
    parser.add_argument("--stress", action="store_true", help="learn the stress too")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "peer-mtt")
    parser.add_argument("--torch-index-url", default=None)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--precision", type=int, choices=[32, 64], default=32)
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--cutoff-width", type=float, default=0.5)
    parser.add_argument("--max-angular", type=int, default=6)
    parser.add_argument("--max-radial", type=int, default=7)
    parser.add_argument("--hidden-layers", type=int, default=2)
    parser.add_argument("--neurons", type=int, default=32)
    parser.add_argument("--validation", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", choices=["ours", "peer"], default=None)
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if not args.data.is_file():
        parser.error(f"--data {args.data}: no such file (make one with make_emt_dataset.py)")
    if args.venv.resolve().is_relative_to(ROOT):
        parser.error(f"--venv {args.venv}: must be outside the repository")

    if args.only != "ours":
        install_peer(args.venv, args.torch_index_url)
    info = peer_info(args.venv) if args.only != "ours" else {}
    workroot = Path(tempfile.mkdtemp(prefix="peer-soap-bpnn-"))
    train, val, n_train = split(args.data, workroot, args.validation, args.seed)
    model = hypers_from(args)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    runs: dict[str, list[dict]] = {"ours": [], "peer": []}
    for repeat in range(args.repeats):
        for name in ("ours", "peer"):
            if args.only and name != args.only:
                continue
            workdir = workroot / f"{name}-{repeat}"
            workdir.mkdir()
            load_before = os.getloadavg()
            cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
            if name == "ours":
                result = run_ours(ours_options(args, model, train, val), workdir, env)
            else:
                options = peer_options(args, model, train, val)
                result = run_peer(options, workdir, env, args.venv)
            cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
            # the whole run: start-up, data, training, validation, final evaluation, export
            result["cpu_s"] = (cpu.ru_utime - cpu_before.ru_utime) + (
                cpu.ru_stime - cpu_before.ru_stime
            )
            result["load_average_before"] = load_before
            result["load_average_after"] = os.getloadavg()
            runs[name].append(result)
            print(name, repeat, json.dumps(result), flush=True)

    summary = {}
    for name, results in runs.items():
        if results:
            periods = [r["epoch_period_s"] for r in results if r["epoch_period_s"]]
            summary[name] = {
                "epoch_period_s_median": statistics.median(periods) if periods else None,
                "epoch_period_s_all": periods,
                "val_energy_rmse_ev_per_atom": results[-1]["val_energy_rmse_ev_per_atom"],
                "val_forces_rmse_ev_per_a": results[-1]["val_forces_rmse_ev_per_a"],
            }
    if len(summary) == 2 and summary["peer"]["epoch_period_s_median"]:
        ours, peer = summary["ours"], summary["peer"]
        ratio = ours["epoch_period_s_median"] / peer["epoch_period_s_median"]
        summary["ratio_ours_to_peer"] = ratio
        # the first epoch at which hpctrain is at least as accurate as the peer's last
        target = (peer["val_energy_rmse_ev_per_atom"], peer["val_forces_rmse_ev_per_a"])
        reached = [
            epoch
            for epoch, (energy, forces) in enumerate(runs["ours"][-1]["per_epoch"], 1)
            if energy <= target[0] and forces <= target[1]
        ]
        if reached:
            summary["ours_epochs_to_peer_accuracy"] = reached[0]
            summary["time_to_peer_accuracy_ratio"] = (
                reached[0] * ours["epoch_period_s_median"]
            ) / (args.epochs * peer["epoch_period_s_median"])
    result = {
        "machine": {
            "node": platform.node(),
            "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "threads": 1,
        },
        "peer": info,
        "data": {"file": args.data.name, "train": n_train, "validation": args.validation},
        "settings": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "precision": args.precision,
            "learning_rate": args.learning_rate,
            "stress": args.stress,
            "model": model,
        },
        "differences": DIFFERENCES,
        "runs": runs,
        "summary": summary,
    }
    args.out.write_text(json.dumps(result, indent=2))
    print()
    print(f"{'':6} {'s/epoch (median)':>17} {'energy RMSE eV/atom':>20} {'forces RMSE eV/A':>17}")
    for name in ("ours", "peer"):
        if name in summary:
            s = summary[name]
            period = s["epoch_period_s_median"]
            print(
                f"{name:6} {'-' if period is None else f'{period:.2f}':>17} "
                f"{s['val_energy_rmse_ev_per_atom']:>20.4f} {s['val_forces_rmse_ev_per_a']:>17.4f}"
            )
    if "ratio_ours_to_peer" in summary:
        print(f"ours / peer epoch time: {summary['ratio_ours_to_peer']:.2f}")
    if "time_to_peer_accuracy_ratio" in summary:
        print(
            f"ours reaches the peer's final errors after {summary['ours_epochs_to_peer_accuracy']} "
            f"epoch(s): time ratio {summary['time_to_peer_accuracy_ratio']:.2f}"
        )
    if not args.keep:
        shutil.rmtree(workroot, ignore_errors=True)
    else:
        print(f"run directories kept in {workroot}")


if __name__ == "__main__":
    main()
