"""Test errors of hpctrain's reference architectures and metatrain's soap_bpnn, on the
same data, split and budget, each exported model scored the same way.

    python benchmarks/accuracy.py --out accuracy.json            # the three datasets
    python benchmarks/accuracy.py --data ../shared/data/ace_TiAl_329.xyz --epochs 30 \
        --out tial.json

For each dataset the benchmark draws one split (seed 0: 10 % test, then 10 % of the
rest for validation) and writes it as three files that every framework reads. Each
framework trains with its own default hypers and the same options otherwise (seed 0
or ``--seed``, float32, batch 8, ``--epochs``, energies, forces and, where the data has them,
stresses; one CPU thread each). Each exported ``model.pt`` is then loaded in a fresh
process of its own framework's environment by metatomic's ASE calculator, as an MD
engine would, and scored on the test structures: energy MAE and RMSE per atom
(meV/atom), force RMSE (eV/Å), stress RMSE (GPa) over the test structures that have
a stress.

metatrain runs in its own virtual environment (``--venv``; created as
``peer_soap_bpnn.py`` creates it). ``--only hpctrain`` skips it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from peer_soap_bpnn import install_peer, peer_info, peer_python

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DATASETS = ["ace_TiAl_329.xyz", "hea25_bulk_100.xyz", "rmd17_ethanol_100.xyz"]
MODELS = ["hpctrain/soap_bpnn", "hpctrain/mp_transformer", "metatrain/soap_bpnn"]
GPA = 160.21766208  # GPa per eV/A^3

# Runs in a fresh interpreter of the framework that trained the model.
SCORE = r"""
import json, sys
import ase.io, numpy as np
from metatomic_ase import MetatomicCalculator

model, extensions, test, out = sys.argv[1:5]
calculator = MetatomicCalculator(model, extensions_directory=extensions, device="cpu")
energy, forces, stress = [], [], []
for atoms in ase.io.read(test, ":"):
    reference = atoms.calc.results
    atoms.calc = calculator
    n = len(atoms)
    energy.append((atoms.get_potential_energy() - reference["energy"]) / n)
    forces.append((atoms.get_forces() - reference["forces"]).ravel())
    if "stress" in reference and atoms.pbc.all():
        ref = np.asarray(reference["stress"])
        got = atoms.get_stress(voigt=ref.shape == (6,))
        if ref.shape == (6,):  # Voigt: count the off-diagonal components twice, as 3x3
            from ase.stress import voigt_6_to_full_3x3_stress as full
            got, ref = full(got), full(ref)
        stress.append((got - ref).ravel())
energy = np.array(energy)
result = {
    "energy_mae_mev_per_atom": 1000 * float(np.abs(energy).mean()),
    "energy_rmse_mev_per_atom": 1000 * float(np.sqrt((energy**2).mean())),
    "forces_rmse_ev_per_a": float(np.sqrt((np.concatenate(forces) ** 2).mean())),
    "test_structures": len(energy),
}
if stress:
    rmse = float(np.sqrt((np.concatenate(stress) ** 2).mean()))
    result["stress_rmse_gpa"] = rmse * GPA
    result["stress_structures"] = len(stress)
open(out, "w").write(json.dumps(result))
""".replace("GPA", repr(GPA))


def split(
    data: Path, workdir: Path, seed: int, with_stress: bool = False
) -> dict[str, Path | int | bool]:
    """10 % test, then 10 % of the rest for validation, as files; whether the data
    has stresses. ``with_stress``: only the structures that have a stress."""
    import ase.io

    frames = ase.io.read(data, ":")
    if with_stress:
        frames = [f for f in frames if f.pbc.all() and "stress" in f.calc.results]
    workdir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(frames))
    n_test = max(1, round(0.1 * len(frames)))
    n_val = max(1, round(0.1 * (len(frames) - n_test)))
    parts = {
        "test": order[:n_test],
        "val": order[n_test : n_test + n_val],
        "train": order[n_test + n_val :],
    }
    files: dict[str, Path | int | bool] = {}
    for name, indices in parts.items():
        files[name] = workdir / f"{name}.xyz"
        ase.io.write(files[name], [frames[i] for i in indices])
    files["n_train"] = len(parts["train"])
    files["stress"] = all(f.pbc.all() and "stress" in f.calc.results for f in frames)
    return files


def options(framework: str, architecture: str, files: dict, args) -> dict:
    """The options file of one framework: only what must be said, defaults otherwise."""
    stress = bool(files["stress"])

    def dataset(path: Path) -> dict:
        if framework == "hpctrain":
            targets = {"energy": {"unit": "eV", "forces": True, "stress": stress}}
            return {"systems": str(path), "targets": targets}
        energy = {"key": "energy", "unit": "eV", "forces": {"key": "forces"}}
        if stress:
            energy["stress"] = {"key": "stress"}
        return {"systems": {"read_from": str(path)}, "targets": {"energy": energy}}

    training = {"num_epochs": args.epochs, "batch_size": args.batch_size}
    model = {}
    if framework == "hpctrain":
        training.update(json.loads(args.hpctrain_training))
        model = json.loads(args.hpctrain_model)
    result = {
        "seed": args.seed,
        "base_precision": 32,
        "device": "cpu",
        "architecture": {"name": architecture, "training": training},
        "training_set": dataset(files["train"]),
        "validation_set": dataset(files["val"]),
        "test_set": dataset(files["test"]),
    }
    if framework == "hpctrain":
        result["architecture"]["model"] = model
        result["distributed"] = {"threads_per_rank": 1}
        result["checkpoint"] = {"every_n_epochs": 0, "every_minutes": None}
    else:
        training.update(num_workers=0, checkpoint_interval=args.epochs + 1)
    return result


def timed_run(command: list[str], workdir: Path, env: dict[str, str], what: str) -> float:
    """Run a training ``command`` in ``workdir``; its wall time. Its output goes to
    ``train-output.log`` there; a failure ends the benchmark with the end of that
    output (the folder itself is removed unless ``--keep`` names one)."""
    start = time.perf_counter()
    out = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    output = out.stdout + out.stderr
    (workdir / "train-output.log").write_text(output)
    if out.returncode != 0:
        tail = "\n".join(output.splitlines()[-25:])
        raise SystemExit(
            f"{what} failed (exit {out.returncode}); the end of its output:\n{tail}\n"
            f"(all of it in {workdir}/train-output.log if --keep names a folder)"
        )
    return wall


def score_exported(
    python: Path, exported: Path, extensions: Path, test: Path, out: Path, env: dict[str, str]
) -> dict:
    """The test errors of an exported model, in a fresh process of ``python`` (see
    :data:`SCORE`), also written to ``out``."""
    subprocess.run(
        [str(python), "-c", SCORE, str(exported), str(extensions), str(test), str(out)],
        env=env,
        check=True,
    )
    return json.loads(out.read_text())


def train_and_score(model: str, files: dict, workdir: Path, args) -> dict:
    framework, architecture = model.split("/")
    workdir.mkdir(parents=True)
    (workdir / "options.yaml").write_text(
        yaml.safe_dump(options(framework, architecture, files, args))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    if framework == "hpctrain":
        env["PYTHONPATH"] = str(ROOT)
        python = Path(sys.executable)
        command = [str(python), "-m", "hpctrain", "train", "options.yaml", "-o", "run"]
        exported, extensions = workdir / "run" / "model.pt", workdir / "run" / "extensions"
    else:
        python = peer_python(args.venv)
        command = [str(args.venv / "bin" / "mtt"), "train", "options.yaml", "-o", "model.pt"]
        exported, extensions = workdir / "model.pt", workdir / "extensions"
    wall = timed_run(command, workdir, env, model)
    scores = workdir / "scores.json"
    test = Path(files["test"])
    return {"train_wall_s": wall, **score_exported(python, exported, extensions, test, scores, env)}


def table(results: dict) -> str:
    lines = [
        f"{'dataset':<24}{'model':<26}{'E MAE meV/at':>13}{'F RMSE eV/A':>13}{'S RMSE GPa':>12}"
        f"{'train s':>9}"
    ]
    for data, by_model in results.items():
        for model, r in by_model.items():
            stress = f"{r['stress_rmse_gpa']:.3f}" if "stress_rmse_gpa" in r else "-"
            lines.append(
                f"{data:<24}{model:<26}{r['energy_mae_mev_per_atom']:>13.2f}"
                f"{r['forces_rmse_ev_per_a']:>13.4f}{stress:>12}{r['train_wall_s']:>9.0f}"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, action="append", help=f"default: {', '.join(DATASETS)}"
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="training seed of every framework (the split stays that of seed 0, so that "
        "every run is scored on the same test structures)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--only", choices=["hpctrain", "metatrain"], default=None)
    parser.add_argument(
        "--only-with-stress",
        action="store_true",
        help="keep only the structures that have a stress (for a framework that needs "
        "a stress on every structure of a dataset trained on stress)",
    )
    parser.add_argument(
        "--hpctrain-training",
        default="{}",
        metavar="JSON",
        help='more training hypers for hpctrain, e.g. \'{"loss_scales": "none"}\'',
    )
    parser.add_argument(
        "--hpctrain-model",
        default="{}",
        metavar="JSON",
        help="model hypers for hpctrain, e.g. '{\"d_model\": 128}' (with --models)",
    )
    parser.add_argument(
        "--models", nargs="+", choices=MODELS, default=None, help="default: all three"
    )
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "peer-mtt")
    parser.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    datasets = args.data or [DATA / name for name in DATASETS]
    models = [m for m in args.models or MODELS if args.only is None or m.startswith(args.only)]
    if any(m.startswith("metatrain") for m in models):
        install_peer(args.venv, None)
    workroot = args.keep or Path(tempfile.mkdtemp(prefix="hpctrain-accuracy-"))
    results: dict[str, dict] = {}
    try:
        for data in datasets:
            files = split(data, workroot / data.stem, seed=0, with_stress=args.only_with_stress)
            results[data.name] = {}
            for model in models:
                print(f"{data.name}: {model} ...", flush=True)
                workdir = workroot / data.stem / model.replace("/", "-")
                results[data.name][model] = train_and_score(model, files, workdir, args)
                print(f"  {json.dumps(results[data.name][model])}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workroot, ignore_errors=True)
    report = {
        "machine": {"node": platform.node(), "cpu_count": os.cpu_count()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join(a for a in sys.argv if a != str(args.keep) and a != "--keep"),
        "settings": {
            "epochs": args.epochs,
            "seed": args.seed,
            "batch_size": args.batch_size,
            "precision": 32,
            "hpctrain_training": json.loads(args.hpctrain_training),
            "hpctrain_model": json.loads(args.hpctrain_model),
            "only_with_stress": args.only_with_stress,
        },
        "peer": peer_info(args.venv) if "metatrain/soap_bpnn" in models else None,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
