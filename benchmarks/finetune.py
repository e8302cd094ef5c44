"""Fine-tuning against training from scratch on a small dataset: test errors and time.

    python benchmarks/finetune.py --out results/finetune.json

A model is pretrained on one molecule (MD17 aspirin, C/H/O, 21 atoms) and fine-tuned
on a small set of another (rMD17 ethanol, 9 atoms, another DFT code, so other
reference energies), with each ``finetune.method``, and compared with the same
architecture trained from scratch on the same small set with the same options. Every
exported ``model.pt`` is scored in a fresh process by metatomic's ASE calculator on
held-out ethanol structures (the new task) and on held-out aspirin structures (what
the pretrained model knew: how much it forgot).

Splits (seed 0): aspirin 100 test, 80 validation, the rest to pretrain; ethanol 40
test, 10 validation, and the first ``--n-small`` of the other 50 to fine-tune (or
train from scratch), for each number given.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml
from accuracy import score_exported, timed_run
from data import log, machine, write_results

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

# name: the finetune section (None: from scratch)
RUNS = {
    "scratch": None,
    "full": {"method": "full"},
    "full, composition refit": {"method": "full", "composition": "refit"},
    "full, refit, replay 0.2": {
        "method": "full",
        "composition": "refit",
        "replay": {"fraction": 0.2},
    },
    "heads, refit": {"method": "heads", "composition": "refit"},
    "lora, refit": {"method": "lora", "composition": "refit"},
}


def write_splits(workdir: Path, n_small: list[int]) -> dict[str, Path]:
    import ase.io

    rng = np.random.default_rng(0)
    files = {}
    for name, source, sizes in (
        ("aspirin", "md17_aspirin_1000.xyz", {"test": 100, "val": 80}),
        ("ethanol", "rmd17_ethanol_100.xyz", {"test": 40, "val": 10}),
    ):
        frames = ase.io.read(DATA / source, ":")
        order = rng.permutation(len(frames))
        start = 0
        for part in ("test", "val", "train"):
            end = start + sizes.get(part, len(frames) - start)
            files[f"{name}-{part}"] = workdir / f"{name}-{part}.xyz"
            ase.io.write(files[f"{name}-{part}"], [frames[i] for i in order[start:end]])
            start = end
    rest = ase.io.read(files["ethanol-train"], ":")
    for n in n_small:
        files[f"ethanol-train-{n}"] = workdir / f"ethanol-train-{n}.xyz"
        ase.io.write(files[f"ethanol-train-{n}"], rest[:n])
    return files


def options(train: Path, val: Path, epochs: int, batch: int, args, finetune=None) -> dict:
    dataset = {"targets": {"energy": {"unit": "eV", "forces": True}}}
    training = {"num_epochs": epochs, "batch_size": batch, "learning_rate": args.learning_rate}
    if finetune is not None:
        training["finetune"] = finetune
    return {
        "seed": 0,
        "base_precision": 32,
        "device": "cpu",
        "architecture": {"name": args.architecture, "training": training},
        "training_set": {**dataset, "systems": str(train)},
        "validation_set": {**dataset, "systems": str(val)},
        "distributed": {"threads_per_rank": args.threads},
        "checkpoint": {"every_n_epochs": 0, "every_minutes": None},
    }


def train(workdir: Path, options: dict, threads: int) -> float:
    workdir.mkdir(parents=True)
    (workdir / "options.yaml").write_text(yaml.safe_dump(options))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "hpctrain", "train", "options.yaml", "-o", "run"]
    return timed_run(command, workdir, env, f"training in {workdir}")


def score(run: Path, test: Path) -> dict:
    out = run / f"scores-{test.stem}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = score_exported(
        Path(sys.executable), run / "model.pt", run / "extensions", test, out, env
    )
    return {k: result[k] for k in ("energy_mae_mev_per_atom", "forces_rmse_ev_per_a")}


def table(results: dict) -> str:
    lines = [
        f"{'run':<36}{'ethanol E MAE':>14}{'F RMSE':>9}{'aspirin E MAE':>15}{'F RMSE':>9}"
        f"{'train s':>9}"
    ]
    for name, r in results.items():
        e, a = r["ethanol"], r["aspirin"]
        lines.append(
            f"{name:<36}{e['energy_mae_mev_per_atom']:>14.1f}{e['forces_rmse_ev_per_a']:>9.3f}"
            f"{a['energy_mae_mev_per_atom']:>15.1f}{a['forces_rmse_ev_per_a']:>9.3f}"
            f"{r['train_wall_s']:>9.1f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="mp_transformer")
    parser.add_argument("--pretrain-epochs", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=60, help="fine-tuning and scratch")
    parser.add_argument("--n-small", type=int, nargs="+", default=[20, 50])
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs"
    )
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    import shutil
    import tempfile

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="finetune-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        run(args, workdir)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> None:
    """Every run of ``args`` in ``workdir``; the table, and the results to ``args.out``."""
    files = write_splits(workdir, args.n_small)
    log(f"pretraining on {files['aspirin-train']} in {workdir / 'pretrain'}")
    pre = options(files["aspirin-train"], files["aspirin-val"], args.pretrain_epochs, 16, args)
    pretrain_s = train(workdir / "pretrain", pre, args.threads)
    pretrained = workdir / "pretrain" / "run"
    results = {
        "pretrained, not fine-tuned": {
            "train_wall_s": pretrain_s,
            "ethanol": score(pretrained, files["ethanol-test"]),
            "aspirin": score(pretrained, files["aspirin-test"]),
        }
    }
    for n in args.n_small:
        for name in args.runs:
            finetune = RUNS[name]
            if finetune is not None:
                finetune = {**finetune, "read_from": str(pretrained / "model.ckpt")}
                if "replay" in finetune:
                    replay = {**finetune["replay"], "training_set": str(files["aspirin-train"])}
                    finetune["replay"] = replay
            log(f"{name} on {n} ethanol structures")
            train_file, val_file = files[f"ethanol-train-{n}"], files["ethanol-val"]
            small = options(train_file, val_file, args.epochs, 8, args, finetune)
            run_dir = workdir / f"{n}-{name.replace(', ', '-').replace(' ', '_')}"
            wall = train(run_dir, small, args.threads)
            results[f"{n} ethanol: {name}"] = {
                "train_wall_s": wall,
                "ethanol": score(run_dir / "run", files["ethanol-test"]),
                "aspirin": score(run_dir / "run", files["aspirin-test"]),
            }
            log(json.dumps(results[f"{n} ethanol: {name}"]))
    print(table(results))
    if args.out:
        arguments = {k: v for k, v in vars(args).items() if k not in ("workdir", "out")}
        write_results(
            args.out,
            {"machine": machine(), "arguments": arguments, "results": results},
        )


if __name__ == "__main__":
    main()
