"""``export: best | last``: which weights ``model.pt`` and the test metrics are made of."""

import csv

import ase.io
import pytest
import torch
from conftest import hpctrain, tiny_options, write_options

from architectures.mp_transformer import __model__ as Model
from hpctrain.testing import predict_in_memory

pytestmark = pytest.mark.slow

# validated on structures whose forces are reversed: the better the model learns
# the training forces, the worse its validation, so the first epoch is the best
OPTIONS = tiny_options(
    base_precision=64,
    architecture={"training": {"num_epochs": 6, "learning_rate": 0.01, "energy_weight": 0}},
    validation_set={"systems": "reversed.xyz", "targets": {"energy": {"forces": True}}},
    test_set=0.1,
)


def write_reversed(workdir):
    frames = ase.io.read(workdir / "ethanol.xyz", "90:")
    for atoms in frames:
        atoms.calc.results["forces"] = -atoms.get_forces()
    ase.io.write(workdir / "reversed.xyz", frames)


def predictions_of(model_path, structures):
    from metatomic.torch import load_atomistic_model

    from hpctrain.testing import evaluate_exported

    load_atomistic_model(str(model_path))  # a readable model
    return evaluate_exported(model_path, structures, model_path.parent / "extensions")


@pytest.mark.parametrize("which", ["best", "last"])
def test_the_exported_model_has_the_chosen_weights(workdir, which):
    write_reversed(workdir)
    write_options(workdir, {**OPTIONS, "export": which})
    result = hpctrain("train", "options.yaml", "-o", "run", cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = workdir / "run"
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    saved = torch.load(run_dir / "model.ckpt", weights_only=False)
    best = saved["trainer_state"]["best"]
    assert best["epoch"] == int(best_row["epoch"]) < len(rows)  # (not the last epoch)
    assert best["validation_loss"] == pytest.approx(float(best_row["val_loss"]), rel=1e-12)
    sample = workdir / "sample.xyz"
    ase.io.write(sample, ase.io.read(workdir / "ethanol.xyz", ":5"))
    energies = {}
    for name, weights in (("best", best["model_state"]), ("last", saved["model_state"])):
        model = Model.load_checkpoint(run_dir / "model.ckpt")
        model.load_state_dict(weights)
        energies[name] = [r["energy"] for r in predict_in_memory(model, sample)]
    exported = [r["energy"] for r in predictions_of(run_dir / "model.pt", sample)]
    other = "last" if which == "best" else "best"
    assert exported == pytest.approx(energies[which], abs=1e-8)
    assert exported != pytest.approx(energies[other], abs=1e-3)
    # hpctrain export --best gives the same model from the checkpoint
    again = hpctrain(
        "export",
        run_dir / "model.ckpt",
        "-o",
        "again.pt",
        *(["--best"] * (which == "best")),
        cwd=workdir,
    )
    assert again.returncode == 0, again.stderr
    energies_again = [r["energy"] for r in predictions_of(workdir / "again.pt", sample)]
    assert energies_again == pytest.approx(energies[which], abs=1e-8)
    if which == "best":
        assert f"exported: the best validation's weights (epoch {best['epoch']}," in result.stdout
    else:
        assert "exported: the last weights (export: last)" in result.stdout
