"""Training sets of different levels of theory, each labelling its own variant of the
energy (``energy/pbe``, ``energy/r2scan``): one body, a head and a composition baseline
per variant; every label is learned from the structures that have it; the exported
model carries every variant and ASE picks one."""

import csv
import json
import math
import subprocess
import sys

import ase.io
import numpy as np
import pytest
import torch
from conftest import hpctrain, tiny_options, write_options

from hpctrain.data.batch import collate
from hpctrain.loss import Loss

ETHANOL = np.array([6, 2, 1])  # H, C, O in C2H5OH


def variant_sets(workdir):
    """The first 50 structures as PBE, the other 50 as another level of theory whose
    energies are 1 eV per atom higher (another reference)."""
    frames = ase.io.read(workdir / "ethanol.xyz", ":")
    ase.io.write(workdir / "pbe.xyz", frames[:50])
    for atoms in frames[50:]:
        atoms.calc.results["energy"] += 1.0 * len(atoms)
    ase.io.write(workdir / "r2scan.xyz", frames[50:])


OPTIONS = tiny_options(
    base_precision=64,
    architecture={"training": {"num_epochs": 2, "batch_size": 8}},
    training_set=[
        {"systems": "pbe.xyz", "targets": {"energy/pbe": {"key": "energy"}}},
        {"systems": "r2scan.xyz", "targets": {"energy/r2scan": {"key": "energy"}}},
    ],
    validation_set=0.1,
    export="last",
)

# Runs in a fresh interpreter: the exported model's outputs, and its energy of one
# structure for each variant chosen from ASE.
PICK = r"""
import json, sys
import ase.io
from metatomic_ase import MetatomicCalculator

model, extensions, xyz, out = sys.argv[1:5]
atoms = ase.io.read(xyz, 0)
result = {}
for variant in ("pbe", "r2scan"):
    calc = MetatomicCalculator(model, extensions_directory=extensions, variants={"energy": variant})
    atoms.calc = calc
    result[variant] = float(atoms.get_potential_energy())
result["outputs"] = sorted(calc._model.capabilities().outputs)
json.dump(result, open(out, "w"))
"""


@pytest.mark.slow
def test_two_levels_of_theory_train_one_body_and_ase_picks_a_variant(workdir):
    variant_sets(workdir)
    write_options(workdir, OPTIONS)
    result = hpctrain("train", "options.yaml", "-o", "run", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "targets: energy/pbe, energy/pbe forces, energy/r2scan, energy/r2scan" in result.stdout
    assert "pbe.xyz: energy/pbe, energy/pbe forces;" in result.stdout  # which set has which
    # a term per variant, each scaled by its own structures
    assert "divided by: energy/pbe 0." in result.stdout
    assert "energy/r2scan forces 1." in result.stdout
    run_dir = workdir / "run"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    for variant in ("pbe", "r2scan"):
        for row in rows:
            assert math.isfinite(float(row[f"val energy/{variant} RMSE [eV/atom]"]))
            assert math.isfinite(float(row[f"val energy/{variant} forces RMSE [eV/A]"]))
    # a composition baseline each, fitted on its own set's structures: 1 eV per atom apart
    state = torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]
    # on two ranks, each term counts the labelled values of the whole global batch
    two = hpctrain("train", "options.yaml", "-o", "two", cwd=workdir, launcher="mpiexec")
    assert two.returncode == 0, two.stderr
    ranks = torch.load(workdir / "two" / "model.ckpt", weights_only=False)["model_state"]
    for key, value in state.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-7, atol=1e-10)
    pbe, r2scan = state["composition"].numpy()
    assert (r2scan - pbe) @ ETHANOL / ETHANOL.sum() == pytest.approx(1.0, abs=0.02)
    # the exported model carries both variants; ASE picks each in a fresh process
    out = workdir / "picked.json"
    subprocess.run(
        [sys.executable, "-c", PICK, run_dir / "model.pt", run_dir / "extensions"]
        + [workdir / "r2scan.xyz", out],
        check=True,
        timeout=300,
    )
    picked = json.loads(out.read_text())
    assert {"energy/pbe", "energy/r2scan"} <= set(picked["outputs"])
    # each variant is the model's own output of that target (export: last weights)
    from architectures.mp_transformer import __model__ as Model

    model = Model.load_checkpoint(run_dir / "model.ckpt")
    atoms = ase.io.read(workdir / "r2scan.xyz", 0)
    for variant in ("pbe", "r2scan"):
        expected = energy_of(model, atoms, f"energy/{variant}")
        assert picked[variant] == pytest.approx(expected, rel=1e-12, abs=1e-9), variant
    # 9 eV apart by their baselines, give or take what the two heads learned in 2 epochs
    assert picked["r2scan"] - picked["pbe"] == pytest.approx(9.0, abs=2.0)
    # hpctrain eval evaluates the level of theory it is asked for
    evaluated = hpctrain(
        "eval", run_dir / "model.pt", "r2scan.xyz", "--variant", "r2scan", cwd=workdir
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert "50 structures (energy/r2scan, forces)" in evaluated.stdout
    assert "energy/r2scan forces [eV/A]" in evaluated.stdout
    unnamed = hpctrain("eval", run_dir / "model.pt", "r2scan.xyz", cwd=workdir)
    assert unnamed.returncode == 2
    assert "no plain 'energy' output but the levels of theory pbe, r2scan" in unnamed.stderr


def energy_of(model, atoms, target):
    from metatomic.torch import ModelOutput, System

    from hpctrain.systems import NeighborLists

    dtype = next(model.parameters()).dtype
    system = System(
        types=torch.tensor(atoms.numbers, dtype=torch.int32),
        positions=torch.tensor(atoms.positions, dtype=dtype),
        cell=torch.zeros(3, 3, dtype=dtype),
        pbc=torch.zeros(3, dtype=torch.bool),
    )
    NeighborLists(model.requested_neighbor_lists()).add([system])
    outputs = model([system], {target: ModelOutput(unit="eV", sample_kind="system")}, None)
    return float(outputs[target].block().values.sum().detach())


def test_a_structure_without_a_label_adds_nothing_to_the_loss():
    """Two structures labelled for ``a`` only, one for ``b`` only (NaN elsewhere): each
    term is the mean over the structures that carry its label."""
    from hpctrain.data.structures import Structure

    def structure(a, b, forces_b):
        positions = torch.zeros(2, 3, dtype=torch.float64)
        return Structure(
            numbers=torch.tensor([1, 1], dtype=torch.int32),
            positions=positions,
            cell=torch.zeros(3, 3, dtype=torch.float64),
            pbc=torch.zeros(3, dtype=torch.bool),
            targets={"energy/a": torch.tensor([a]), "energy/b": torch.tensor([b])},
            forces={"energy/b": torch.full((2, 3), forces_b, dtype=torch.float64)},
            stress={},
        )

    nan = math.nan
    batch = collate([structure(2.0, nan, nan), structure(4.0, nan, nan), structure(nan, 6.0, 1.0)])
    predictions = {
        "energy/a": torch.tensor([0.0, 0.0, 100.0], dtype=torch.float64),
        "energy/b": torch.tensor([100.0, 100.0, 0.0], dtype=torch.float64),
        "energy/b forces": torch.zeros(6, 3, dtype=torch.float64),
    }
    loss = Loss({"energy/a": 1.0, "energy/b": 1.0, "energy/b forces": 1.0}, {})
    counts = {"energy/a": 2, "energy/b": 1, "energy/b forces": 2}
    total, parts = loss(predictions, batch, counts)
    # per atom: a's errors 1 and 2 (two atoms each), b's 3; forces 1 on 2 atoms x 3
    assert parts["energy/a"].item() == pytest.approx((1**2 + 2**2) / 2)
    assert parts["energy/b"].item() == pytest.approx(3**2 / 1)
    assert parts["energy/b forces"].item() == pytest.approx(6 * 1.0 / (3 * 2))
    assert total.item() == pytest.approx(2.5 + 9.0 + 1.0)
