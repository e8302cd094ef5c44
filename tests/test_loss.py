"""The loss and the stress: scales measured on the training set, structures without a
stress left out, and stress as the strain derivative of the energy (data and models)."""

import dataclasses

import ase.build
import ase.io
import numpy as np
import pytest
import torch
from ase.calculators.emt import EMT

from hpctrain import run
from hpctrain.composition import fit_composition
from hpctrain.config import parse
from hpctrain.data import read_dataset
from hpctrain.data.batch import collate
from hpctrain.errors import DataError
from hpctrain.evaluation import EnergyModule, ErrorSums, predict
from hpctrain.loss import ENERGY_LENGTH, Loss
from hpctrain.options import DatasetOptions
from hpctrain.testing import emt_structures


def strained_cu(seed: int):
    rng = np.random.default_rng(seed)
    atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
    atoms.numbers[rng.random(len(atoms)) < 0.4] = 79
    atoms.set_cell(atoms.cell.array @ (np.eye(3) + rng.normal(0, 0.02, (3, 3))), True)
    atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
    return atoms


def strain_derivative(energy, atoms, h: float = 1e-5) -> np.ndarray:
    """(1/V) dE/d(strain) by central differences, positions and cell deformed by
    ``1 + strain`` (the definition of the stress, with ASE's sign)."""
    volume = atoms.get_volume()
    out = np.zeros((3, 3))
    for i in range(3):
        for j in range(3):
            values = []
            for sign in (1, -1):
                strained = atoms.copy()
                deform = np.eye(3)
                deform[i, j] += sign * h
                strained.set_cell(atoms.cell.array @ deform, scale_atoms=True)
                values.append(energy(strained))
            out[i, j] = (values[0] - values[1]) / (2 * h) / volume
    return out


def read(path, targets, dtype=torch.float64):
    options = parse(DatasetOptions, {"systems": {"read_from": str(path)}, "targets": targets})
    return read_dataset(options, "training_set", "test", dtype)


def emt_energy(atoms) -> float:
    atoms = atoms.copy()
    atoms.calc = EMT()
    return atoms.get_potential_energy()


def test_stress_and_virial_in_the_data_are_the_strain_derivative_of_the_energy(tmp_path):
    """The sign and unit convention of docs/options.rst: stress = (1/V) dE/d(strain)
    (ASE's sign, positive when stretched), virial = -stress * V."""
    frames = [strained_cu(seed) for seed in range(3)]
    for atoms in frames:
        atoms.info["energy"] = emt_energy(atoms)
        atoms.info["stress"] = strain_derivative(emt_energy, atoms)
        atoms.info["virial"] = -atoms.info["stress"] * atoms.get_volume()
        atoms.info["emt_stress"] = (lambda a: (setattr(a, "calc", EMT()), a.get_stress(False)))(
            atoms.copy()
        )[1]
    path = tmp_path / "cu.xyz"
    ase.io.write(path, frames)
    by_stress = read(path, {"energy": {"forces": False, "stress": True}})
    by_virial = read(path, {"energy": {"forces": False, "virial": True}})
    by_emt = read(path, {"energy": {"forces": False, "stress": "emt_stress"}})
    for k, atoms in enumerate(frames):
        expected = atoms.info["stress"]
        np.testing.assert_allclose(by_stress[k].stress["energy"].numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(by_virial[k].stress["energy"].numpy(), expected, atol=1e-12)
        np.testing.assert_allclose(by_emt[k].stress["energy"].numpy(), expected, atol=1e-7)


@pytest.mark.parametrize("batched", [True, False], ids=["batch-path", "system-path"])
@pytest.mark.parametrize("architecture", ["mp_transformer", "soap_bpnn"])
def test_a_models_stress_is_the_strain_derivative_of_its_energy(architecture, batched, tmp_path):
    """Through both training paths (the batch core with pair vectors strained on the
    device; metatomic Systems with a strained cell), with autograd, for a batch
    mixing crystals and a molecule (which has no stress, and no NaN either)."""
    from hpctrain.architecture import resolve

    crystals, molecules = emt_structures(True, 3, seed=4), emt_structures(False, 1, seed=5)
    for atoms in molecules:
        atoms.set_cell(np.zeros((3, 3)))
    ase.io.write(tmp_path / "mixed.xyz", crystals + molecules)
    dataset = read(tmp_path / "mixed.xyz", {"energy": {"forces": True, "stress": True}})
    assert dataset.has_stress.tolist() == [True, True, True, False]
    arch = resolve(architecture, {}, {}, "test")
    torch.manual_seed(0)
    model = arch.model_class(arch.model_hypers, dataset.info).to(torch.float64)
    network = EnergyModule(model, {"energy": _output()}, batched)
    requests = model.requested_neighbor_lists()
    predictions = predict(collate([dataset[i] for i in range(4)], requests), network, False)
    stress = predictions["energy stress"].detach().numpy()
    assert np.isfinite(stress).all()

    def model_energy(atoms) -> float:
        strained = dataclasses.replace(
            dataset[0],
            numbers=torch.tensor(atoms.numbers, dtype=torch.int32),
            positions=torch.tensor(atoms.positions),
            cell=torch.tensor(atoms.cell.array),
            forces={},
            stress={},
        )
        with torch.no_grad():
            return float(predict(collate([strained], requests), network, False)["energy"][0])

    for k, atoms in enumerate(ase.io.read(tmp_path / "mixed.xyz", ":3")):
        expected = strain_derivative(model_energy, atoms, h=1e-5)
        np.testing.assert_allclose(stress[k], expected, rtol=1e-6, atol=1e-9)


def _output():
    from metatomic.torch import ModelOutput

    return ModelOutput(unit="eV", sample_kind="system")


def test_structures_without_a_stress_are_left_out_of_the_loss_and_the_metrics(tmp_path):
    crystals = emt_structures(True, 3, seed=1)
    del crystals[1].info["stress"]  # a crystal whose stress was not computed
    molecule = emt_structures(False, 1, seed=2)[0]
    ase.io.write(tmp_path / "mixed.xyz", crystals + [molecule])
    dataset = read(tmp_path / "mixed.xyz", {"energy": {"forces": True, "stress": True}})
    assert dataset.has_stress.tolist() == [True, False, True, False]
    batch = collate([dataset[i] for i in range(4)])
    reference = batch.stress["energy"]
    predicted = torch.zeros_like(reference, requires_grad=True)
    predictions = {
        "energy": batch.targets["energy"].clone(),
        "energy forces": batch.forces["energy"].clone(),
        "energy stress": predicted,
    }
    loss = Loss({"energy stress": 0.5}, {"stress": 2.0})
    total, parts = loss(predictions, batch, {"energy stress": 2})
    known = reference[[0, 2]]
    expected = 2.0 * ((known / 0.5) ** 2).sum() / (9 * 2)
    torch.testing.assert_close(total, expected)
    total.backward()
    assert torch.isfinite(predicted.grad).all()
    assert (predicted.grad[[1, 3]] == 0).all() and (predicted.grad[[0, 2]] != 0).any()
    errors = ErrorSums(dataset.info.targets, torch.device("cpu"))
    errors.add(batch, {"energy stress": predicted.detach()})
    rmse = errors.metrics()["stress RMSE [eV/A^3]"]
    assert rmse == pytest.approx(float(known.pow(2).mean().sqrt()), rel=1e-12)


def test_a_stress_that_no_structure_has_is_an_error(tmp_path):
    ase.io.write(tmp_path / "molecules.xyz", emt_structures(False, 2, seed=1))
    with pytest.raises(DataError, match="no structure has a stress for target 'energy'"):
        read(tmp_path / "molecules.xyz", {"energy": {"forces": True, "stress": True}})


def test_the_scales_are_the_rms_of_each_target_on_the_training_set(tmp_path):
    frames = emt_structures(True, 6, seed=3)
    del frames[2].info["stress"]
    ase.io.write(tmp_path / "cu.xyz", frames)
    dataset = read(tmp_path / "cu.xyz", {"energy": {"forces": True, "stress": True}})
    types = dataset.info.atomic_types
    fit = fit_composition(dataset, "energy", types, run.RunContext())
    frames = ase.io.read(tmp_path / "cu.xyz", ":")  # (as written: rounded by the format)
    forces = np.concatenate([f.get_forces() for f in frames])
    stress = np.stack([f.get_stress(voigt=False) for f in frames if "stress" in f.calc.results])
    assert len(stress) == 5
    assert fit.forces_scale == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-12)
    assert fit.stress_scale == pytest.approx(np.sqrt(np.mean(stress**2)), rel=1e-12)
    terms = ["energy", "energy forces", "energy stress"]
    loss = Loss.measured({"energy": fit}, terms, {}, None, normalized=True)
    # (the energy scale: at least ENERGY_LENGTH times the RMS force)
    assert loss.scales == {
        "energy": max(fit.energy_scale, ENERGY_LENGTH * fit.forces_scale),
        "energy forces": fit.forces_scale,
        "energy stress": pytest.approx(
            max(fit.energy_scale, ENERGY_LENGTH * fit.forces_scale)
            / np.mean([f.get_volume() / len(f) for f in frames if "stress" in f.calc.results]),
            rel=1e-12,
        ),
    }
    raw = Loss.measured({"energy": fit}, terms, {}, None, normalized=False)
    assert set(raw.scales.values()) == {1.0}
    # the validation loss weighs RMSEs as the training loss weighs errors
    metrics = {"energy RMSE [eV/atom]": 0.1, "forces RMSE [eV/A]": 0.2, "stress RMSE [eV/A^3]": 0.3}
    expected = sum((v / s) ** 2 for v, s in zip(metrics.values(), loss.scales.values()))
    assert loss.of_metrics(metrics, dataset.info.targets) == pytest.approx(expected)


def test_huber_is_the_square_below_delta_and_linear_above():
    loss = Loss({"energy": 1.0}, {}, huber_delta=0.5)
    x = torch.tensor([0.1, -0.3, 2.0, -4.0], dtype=torch.float64)
    expected = torch.where(x.abs() < 0.5, x**2, 2 * 0.5 * (x.abs() - 0.25))
    torch.testing.assert_close(loss.penalty(x), expected)


def test_shards_keep_which_structures_have_a_stress(tmp_path):
    from hpctrain import cli
    from hpctrain.data import ShardDataset
    from hpctrain.data.inspection import summarize

    crystals = emt_structures(True, 5, seed=6)
    del crystals[3].info["stress"]
    molecules = emt_structures(False, 2, seed=7)
    ase.io.write(tmp_path / "mixed.xyz", crystals + molecules)
    shards = tmp_path / "shards"
    assert (
        cli.main(
            [
                "convert",
                str(tmp_path / "mixed.xyz"),
                "-o",
                str(shards),
                "--stress",
                "stress",
                "--shard-size",
                "3",
            ]
        )
        == 0
    )
    in_memory = read(tmp_path / "mixed.xyz", {"energy": {"forces": True, "stress": True}})
    stored = ShardDataset(shards)
    expected = [True, True, True, False, True, False, False]
    assert in_memory.has_stress.tolist() == stored.has_stress.tolist() == expected
    for i in range(len(stored)):
        a, b = in_memory[i].stress["energy"], stored[i].stress["energy"]
        torch.testing.assert_close(a, b, equal_nan=True)
    assert "stress: RMS component" in summarize(shards)
    assert "on 4 of 7 structures" in summarize(shards)


def test_loss_weights_multiply_each_structures_terms(tmp_path):
    """A structure of weight w counts w times in every term (forces: its atoms)."""
    ase.io.write(tmp_path / "emt.xyz", emt_structures(True, 3, seed=4))
    dataset = read(tmp_path / "emt.xyz", {"energy": {"forces": True, "stress": True}})
    batch = collate([dataset[i] for i in range(3)])
    predictions = {
        "energy": batch.targets["energy"] + torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64),
        "energy forces": batch.forces["energy"] + 0.05,
        "energy stress": batch.stress["energy"] - 0.01,
    }
    loss = Loss({"energy": 0.2, "energy forces": 0.5, "energy stress": 0.02}, {})
    counts = {"energy": 3, "energy forces": int(batch.n_atoms.sum()), "energy stress": 3}
    _, plain = loss(predictions, batch, counts)
    weights = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    weighted = dataclasses.replace(batch, loss_weights=weights)
    _, parts = loss(predictions, weighted, counts)
    # the same terms computed by hand, structure by structure
    per_atom = ((predictions["energy"] - batch.targets["energy"]) / batch.n_atoms / 0.2) ** 2
    torch.testing.assert_close(parts["energy"], (weights * per_atom).sum() / 3)
    force_terms = ((predictions["energy forces"] - batch.forces["energy"]) / 0.5) ** 2
    by_structure = torch.zeros(3, dtype=torch.float64).index_add_(
        0, batch.system, force_terms.sum(dim=1)
    )
    torch.testing.assert_close(
        parts["energy forces"], (weights * by_structure).sum() / (3 * counts["energy forces"])
    )
    torch.testing.assert_close(
        plain["energy forces"], by_structure.sum() / (3 * counts["energy forces"])
    )
    stress_terms = (((predictions["energy stress"] - batch.stress["energy"]) / 0.02) ** 2).sum(
        dim=(1, 2)
    )
    torch.testing.assert_close(parts["energy stress"], (weights * stress_terms).sum() / 27)
