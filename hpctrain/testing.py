"""Checks that architectures and exported models must pass, for tests.

:func:`evaluate_exported` runs an exported ``model.pt`` in a *fresh* Python process
that imports only ASE and metatomic (as an MD engine would), so that nothing loaded
by training can hide a broken export; :func:`predict_in_memory` computes the same
quantities with the trained torch model.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

# Runs in a fresh interpreter: only ASE, numpy and metatomic are imported.
_FRESH_PROCESS = r"""
import json, sys
import numpy as np
import ase.io
from metatomic_ase import MetatomicCalculator

model, extensions, xyz, out, step, device = sys.argv[1:7]
calc = MetatomicCalculator(model, extensions_directory=extensions or None, device=device)
results = []
for atoms in ase.io.read(xyz, ":"):
    atoms.calc = calc
    energy = float(atoms.get_potential_energy())
    forces = atoms.get_forces()
    stress = atoms.get_stress(voigt=False).tolist() if atoms.pbc.all() else None
    h = float(step)
    fd = []
    for i, k in sorted({(0, 0), (len(atoms) // 2, 1), (len(atoms) - 1, 2)}):
        shifted = []
        for sign in (1, -1):
            probe = atoms.copy()
            probe.positions[i, k] += sign * h
            probe.calc = calc
            shifted.append(float(probe.get_potential_energy()))
        fd.append([i, k, -(shifted[0] - shifted[1]) / (2 * h), float(forces[i, k])])
    results.append({"energy": energy, "forces": forces.tolist(), "stress": stress, "fd": fd})
json.dump(results, open(out, "w"))
"""


def evaluate_exported(
    model_path: Path,
    structures: Path,
    extensions: Path | None = None,
    step: float = 1e-4,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """Energies, forces, stress and finite-difference forces from ``model_path``,
    computed by metatomic's ASE calculator on ``device`` in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "results.json"
        subprocess.run(
            [
                sys.executable,
                "-c",
                _FRESH_PROCESS,
                str(model_path),
                str(extensions or ""),
                str(structures),
                str(out),
                str(step),
                device,
            ],
            check=True,
            timeout=600,
        )
        return json.loads(out.read_text())


def predict_in_memory(model: torch.nn.Module, structures: Path | list) -> list[dict[str, Any]]:
    """Energy, forces (and stress for periodic structures) of the torch model itself,
    through its own forward and autograd, for the structures of a file or a list of
    ``ase.Atoms`` (at full precision: a file rounds positions to its digits)."""
    import ase.io
    from metatomic.torch import ModelOutput, System

    from .systems import NeighborLists

    model = model.eval()
    dtype = next(model.parameters()).dtype
    neighbors = NeighborLists(model.requested_neighbor_lists())
    results = []
    if isinstance(structures, list):
        frames = structures
    else:
        frames = ase.io.read(structures, ":", parallel=False)
    for atoms in frames:
        positions = torch.tensor(atoms.positions, dtype=dtype, requires_grad=True)
        strain = torch.zeros(3, 3, dtype=dtype, requires_grad=True)
        deform = torch.eye(3, dtype=dtype) + strain
        cell = torch.tensor(atoms.cell.array, dtype=dtype)
        system = System(
            types=torch.tensor(atoms.numbers, dtype=torch.int32),
            positions=positions @ deform,
            cell=cell @ deform,
            pbc=torch.tensor(atoms.pbc),
        )
        neighbors.add([system])
        output = model([system], {"energy": ModelOutput(unit="eV", sample_kind="system")}, None)
        energy = output["energy"].block().values.sum()
        d_positions, d_strain = torch.autograd.grad(energy, [positions, strain])
        stress = None
        if atoms.pbc.all():
            stress = (d_strain / abs(torch.det(cell))).tolist()
        results.append(
            {"energy": float(energy.detach()), "forces": (-d_positions).tolist(), "stress": stress}
        )
    return results


# Runs in a fresh interpreter: NVE molecular dynamics with the exported model.
_FRESH_MD = r"""
import json, sys
import ase.io
from ase import units
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution
from ase.md.verlet import VelocityVerlet
from metatomic_ase import MetatomicCalculator

model, extensions, xyz, out, steps = sys.argv[1:6]
atoms = ase.io.read(xyz, 0)
atoms.calc = MetatomicCalculator(model, extensions_directory=extensions or None, device="cpu")
rng = __import__("numpy").random.default_rng(0)
MaxwellBoltzmannDistribution(atoms, temperature_K=300, rng=rng)
dyn = VelocityVerlet(atoms, timestep=0.25 * units.fs)
energies = []
for _ in range(int(steps)):
    dyn.run(1)
    energies.append(float(atoms.get_potential_energy() + atoms.get_kinetic_energy()))
json.dump({"total_energy": energies, "n_atoms": len(atoms)}, open(out, "w"))
"""


def run_md_exported(
    model_path: Path, structure: Path, extensions: Path | None = None, steps: int = 100
) -> dict[str, Any]:
    """Total energies along a short NVE run of the exported model (fresh process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "md.json"
        subprocess.run(
            [
                sys.executable,
                "-c",
                _FRESH_MD,
                str(model_path),
                str(extensions or ""),
                str(structure),
                str(out),
                str(steps),
            ],
            check=True,
            timeout=600,
        )
        return json.loads(out.read_text())


def emt_structures(periodic: bool, n: int, seed: int = 0) -> list:
    """Small structures with EMT labels (energy, forces, and stress when periodic):
    rattled ethanol-like molecules, or strained fcc Cu/Au cells of 8 atoms."""
    import ase.build
    import numpy as np
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    frames = []
    for _ in range(n):
        if periodic:
            atoms = ase.build.bulk("Cu", "fcc", a=3.6, cubic=True).repeat((2, 1, 1))
            atoms.numbers[rng.random(len(atoms)) < 0.4] = 79
            strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
            atoms.set_cell(atoms.cell.array @ strain, scale_atoms=True)
            atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        else:
            atoms = ase.build.molecule("CH3CH2OH")
            atoms.positions += rng.normal(0, 0.05, atoms.positions.shape)
        atoms.calc = EMT()
        atoms.info["energy"] = atoms.get_potential_energy()
        atoms.arrays["forces"] = atoms.get_forces()
        if periodic:
            atoms.info["stress"] = atoms.get_stress(voigt=False)
        atoms.calc = None
        frames.append(atoms)
    return frames


class ArchitectureTests:
    """Conformance tests every architecture's tests subclass, with small hypers::

        class TestMyArch(ArchitectureTests):
            architecture = "my_arch"
            model_hypers = {"width": 8}
            training_hypers = {"num_epochs": 3, "batch_size": 4}

    Covers construction, forward, rotation and permutation invariance, training
    (the loss decreases), checkpoint round trip, restart (fine-tuning and new
    targets), export, and the exported model in a fresh process: same energies,
    forces and stress as in memory, forces equal to finite differences of the
    energy, and energy conservation in a short NVE run.
    """

    architecture: str = ""
    model_hypers: dict[str, Any] = {}
    training_hypers: dict[str, Any] = {"num_epochs": 2, "batch_size": 4}
    dtype = torch.float64
    #: tolerance of exported vs in-memory energies (eV) and forces (eV/A)
    tolerance: float = 1e-8

    # -- fixtures ---------------------------------------------------------------------

    @pytest.fixture(scope="class")
    @classmethod
    def data(cls, tmp_path_factory) -> dict[str, Path]:
        import ase.io

        folder = tmp_path_factory.mktemp("conformance-data")
        paths = {"molecules": folder / "molecules.xyz", "crystals": folder / "crystals.xyz"}
        ase.io.write(paths["molecules"], emt_structures(False, 24, seed=1), parallel=False)
        ase.io.write(paths["crystals"], emt_structures(True, 24, seed=2), parallel=False)
        return paths

    @pytest.fixture(scope="class")
    @classmethod
    def datasets(cls, data) -> dict[str, Any]:
        from .config import parse
        from .data import read_dataset
        from .options import DatasetOptions

        def read(path, stress):
            options = parse(
                DatasetOptions,
                {
                    "systems": {"read_from": str(path)},
                    "targets": {"energy": {"forces": True, "stress": stress}},
                },
            )
            return read_dataset(options, "training_set", "conformance", cls.dtype)

        return {
            "molecules": read(data["molecules"], False),
            "crystals": read(data["crystals"], True),
        }

    @pytest.fixture(autouse=True)
    def _run_context(self):
        from . import run

        with run.use(run.RunContext(seed=5)):
            yield

    # -- helpers ----------------------------------------------------------------------

    def module(self):
        from .architecture import import_architecture, resolve

        return import_architecture(self.architecture), resolve(
            self.architecture, self.model_hypers, self.training_hypers
        )

    def new_model(self, info):
        _, arch = self.module()
        torch.manual_seed(0)
        return arch.model_class(arch.model_hypers, info).to(self.dtype)

    def trained(self, datasets, tmp_path, name="crystals"):
        _, arch = self.module()
        dataset = datasets[name]
        model = self.new_model(dataset.info)
        trainer = arch.trainer_class(arch.training_hypers)
        train, val = dataset.subset(range(20)), dataset.subset(range(20, 24))
        trainer.train(model, [torch.device("cpu")], [train], [val], str(tmp_path))
        return model, trainer

    def energies(self, model, structures: Path) -> list[float]:
        return [r["energy"] for r in predict_in_memory(model, structures)]

    # -- the tests --------------------------------------------------------------------

    def test_architecture_is_valid(self):
        from .architecture import validate_architecture

        module, _ = self.module()
        validate_architecture(module)

    def test_forward_gives_one_energy_per_structure(self, datasets, data):
        model = self.new_model(datasets["molecules"].info)
        results = predict_in_memory(model, data["molecules"])
        assert len(results) == 24
        assert all(math.isfinite(r["energy"]) for r in results)
        assert len({round(r["energy"], 10) for r in results}) > 1

    def test_the_batch_path_and_the_system_path_agree(self, datasets):
        """Where the model has a batch core (``forward_batch``), training computes
        through it; MD engines call ``forward`` on Systems. Both give the same
        energies, forces and stress, on periodic crystals and molecules together."""
        from metatomic.torch import ModelOutput

        from .data.batch import collate
        from .evaluation import EnergyModule, predict

        outputs = {"energy": ModelOutput(unit="eV", sample_kind="system")}
        for name, expected_keys in [
            ("crystals", {"energy", "energy forces", "energy stress"}),
            ("molecules", {"energy", "energy forces"}),
        ]:
            model = self.new_model(datasets[name].info)
            if not hasattr(model, "forward_batch"):
                pytest.skip(f"{self.architecture} trains through metatomic's interface alone")
            requests = model.requested_neighbor_lists()
            batch = collate([datasets[name][i] for i in (3, 0, 7, 1)], requests)
            batched, systems = (
                predict(batch, EnergyModule(model, outputs, path), create_graph=False)
                for path in (True, False)
            )
            assert set(batched) == set(systems) == expected_keys
            for key, value in batched.items():
                expected = systems[key]
                assert value.shape == expected.shape and bool(expected.abs().max() > 0), key
                torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-9)

    def test_energy_is_invariant_under_rotation_and_permutation(self, datasets):
        import numpy as np
        from scipy.spatial.transform import Rotation

        model = self.new_model(datasets["crystals"].info)
        atoms = emt_structures(True, 1, seed=7)[0]
        rotated = atoms.copy()
        matrix = Rotation.random(random_state=3).as_matrix()
        rotated.positions = atoms.positions @ matrix.T
        rotated.cell = atoms.cell.array @ matrix.T
        permuted = atoms[np.random.default_rng(4).permutation(len(atoms))]
        # in memory: an extxyz file keeps 8 decimals of the positions, which moves the
        # energy by about the forces times 5e-9 A
        results = predict_in_memory(model, [atoms, rotated, permuted])
        energy = results[0]["energy"]
        assert results[1]["energy"] == pytest.approx(energy, rel=1e-10, abs=1e-10)
        assert results[2]["energy"] == pytest.approx(energy, rel=1e-10, abs=1e-10)
        forces, turned = np.array(results[0]["forces"]), np.array(results[1]["forces"])
        np.testing.assert_allclose(turned, forces @ matrix.T, atol=1e-9)

    def test_training_reduces_the_error(self, datasets, data, tmp_path):
        import numpy as np

        reference = datasets["crystals"]
        before_model = self.new_model(reference.info)
        model, _ = self.trained(datasets, tmp_path)
        truth = np.concatenate([reference[i].forces["energy"].numpy() for i in range(20)])

        def force_rmse(m):
            predicted = np.concatenate(
                [np.array(r["forces"]) for r in predict_in_memory(m, data["crystals"])][:20]
            )
            return float(np.sqrt(((predicted - truth) ** 2).mean()))

        assert force_rmse(model) < force_rmse(before_model)

    def test_checkpoint_round_trip_gives_identical_predictions(self, datasets, data, tmp_path):
        model, trainer = self.trained(datasets, tmp_path)
        path = tmp_path / "model.ckpt"
        trainer.save_checkpoint(path)
        module, _ = self.module()
        loaded = module.__model__.load_checkpoint(path)
        assert self.energies(loaded, data["crystals"]) == self.energies(model, data["crystals"])
        # the trainer part loads too (it raises on a checkpoint it cannot use)
        module.__trainer__.load_checkpoint(path, self.module()[1].training_hypers)

    def test_restart_for_fine_tuning_and_for_new_targets(self, datasets, data, tmp_path):
        import dataclasses

        from .architecture import TargetInfo

        model, trainer = self.trained(datasets, tmp_path)
        path = tmp_path / "model.ckpt"
        trainer.save_checkpoint(path)
        module, _ = self.module()
        info = datasets["crystals"].info
        same = module.__model__.load_checkpoint(path).restart(info)
        assert self.energies(same, data["crystals"]) == self.energies(model, data["crystals"])
        extra = dataclasses.replace(
            info, targets={**info.targets, "energy/other": TargetInfo(unit="eV", gradients=[])}
        )
        grown = module.__model__.load_checkpoint(path).restart(extra)
        assert set(grown.dataset_info.targets) == {"energy", "energy/other"}
        # the old target is predicted as before (a wider output layer may round
        # differently in the last bits)
        assert self.energies(grown, data["crystals"]) == pytest.approx(
            self.energies(model, data["crystals"]), rel=1e-12, abs=1e-12
        )

    def test_heads_for_fine_tuning(self, datasets):
        """A model on :class:`~hpctrain.model.ReferenceModel` names its output layers
        (a row per target) and heads, which fine-tuning trains and copies."""
        import dataclasses

        from .architecture import TargetInfo

        info = datasets["crystals"].info
        extra = dataclasses.replace(
            info, targets={**info.targets, "energy/other": TargetInfo(unit="eV", gradients=[])}
        )
        model = self.new_model(extra)
        if not hasattr(model, "output_layers"):
            pytest.skip("not a ReferenceModel: fine-tuning with heads or lora does not apply")
        modules = dict(model.named_modules())
        for name in model.output_layers():
            layer = modules[name]
            assert isinstance(layer, torch.nn.Linear) and layer.out_features == 2, name
        assert all(name in modules for name in model.head_modules())
        model.inherit_head("energy/other", "energy")
        for name in model.output_layers():
            assert torch.equal(modules[name].weight[1], modules[name].weight[0]), name

    def test_exported_model_in_a_fresh_process(self, datasets, data, tmp_path):
        import numpy as np

        model, _ = self.trained(datasets, tmp_path)
        path = tmp_path / "model.pt"
        model.export().save(str(path), collect_extensions=str(tmp_path / "extensions"))
        for name in ("crystals", "molecules"):
            if name == "molecules":
                model, _ = self.trained(datasets, tmp_path / "m", name="molecules")
                model.export().save(str(path), collect_extensions=str(tmp_path / "extensions"))
            sample = tmp_path / f"{name}-sample.xyz"
            import ase.io

            ase.io.write(sample, ase.io.read(data[name], ":4", parallel=False), parallel=False)
            expected = predict_in_memory(model, sample)
            exported = evaluate_exported(path, sample, tmp_path / "extensions")
            for mine, theirs in zip(expected, exported):
                assert theirs["energy"] == pytest.approx(mine["energy"], abs=self.tolerance)
                np.testing.assert_allclose(theirs["forces"], mine["forces"], atol=self.tolerance)
                if mine["stress"] is not None:
                    np.testing.assert_allclose(
                        theirs["stress"], mine["stress"], atol=self.tolerance
                    )
                for _, _, finite_difference, force in theirs["fd"]:
                    assert finite_difference == pytest.approx(force, abs=1e-6)

    def test_nve_md_with_the_exported_model_conserves_energy(self, datasets, data, tmp_path):
        import numpy as np

        model, _ = self.trained(datasets, tmp_path)
        path = tmp_path / "model.pt"
        model.export().save(str(path), collect_extensions=str(tmp_path / "extensions"))
        result = run_md_exported(path, data["crystals"], tmp_path / "extensions", steps=100)
        energies = np.array(result["total_energy"])
        drift = np.abs(energies - energies[0]).max() / result["n_atoms"]
        assert drift < 1e-3, f"total energy drifts by {drift:.2e} eV/atom over 100 steps"
