"""The data check of the banner: figures of the training data, and warnings for unit
mistakes that would otherwise train silently (real files, read as training reads them)."""

import math

import ase.io
import pytest
import torch
from conftest import EXAMPLE_XYZ

from hpctrain.config import parse
from hpctrain.data import read_dataset
from hpctrain.data.sanity import check_data
from hpctrain.options import DatasetOptions

CUTOFF = 5.0


def dataset(path, length_unit="angstrom"):
    options = parse(
        DatasetOptions,
        {"systems": {"read_from": str(path), "length_unit": length_unit}},
    )
    return read_dataset(options, "training_set", "test", torch.float64)


def scaled_example(path, positions=1.0, forces=1.0):
    """The example with positions and forces multiplied (a unit mistake)."""
    frames = ase.io.read(EXAMPLE_XYZ, ":")
    for atoms in frames:
        f = atoms.get_forces() * forces
        energy = atoms.get_potential_energy()
        atoms.positions *= positions
        atoms.calc = None
        atoms.info["energy"] = energy
        atoms.arrays["forces"] = f
    ase.io.write(path, frames)
    return path


def test_the_example_passes_with_plausible_figures():
    sanity = check_data([dataset(EXAMPLE_XYZ)], CUTOFF, seed=1)
    assert (sanity.sampled, sanity.total, sanity.isolated) == (100, 100, 0)
    assert 0.85 < sanity.shortest < 1.0  # C-H bonds of ethanol, compressed in MD
    assert 0.5 < sanity.force_rms < 3.0
    assert sanity.energy_per_atom == pytest.approx(-467.7, abs=0.1)
    assert sanity.warnings() == []
    rows = dict(sanity.lines())
    assert rows["data check"].endswith("(all 100 training structures)")
    assert rows["distances"].startswith(f"shortest {sanity.shortest:.3g} A, cutoff 5 A; 0 ")


def test_a_sample_is_drawn_from_every_dataset():
    example = dataset(EXAMPLE_XYZ)
    sanity = check_data([example.subset(range(50)), example.subset(range(50, 100))], CUTOFF, 1, 30)
    assert (sanity.sampled, sanity.total) == (30, 100)
    assert dict(sanity.lines())["data check"].endswith("(30 of 100 training structures)")


def test_positions_in_nm_are_warned_of(tmp_path):
    sanity = check_data([dataset(scaled_example(tmp_path / "nm.xyz", positions=0.1))], CUTOFF, 1)
    assert sanity.shortest < 0.1
    (warning,) = sanity.warnings()
    assert "closer than any bond" in warning and "systems.length_unit" in warning


def test_forces_in_kcal_per_mol_are_warned_of(tmp_path):
    sanity = check_data([dataset(scaled_example(tmp_path / "kcal.xyz", forces=23.06))], CUTOFF, 1)
    (warning,) = sanity.warnings()
    assert f"RMS force of the training data is {sanity.force_rms:.3g} eV/A" in warning
    assert "kcal/mol/A" in warning


def test_lengths_declared_in_a_larger_unit_leave_atoms_without_neighbours():
    """angstrom data read as nm: every distance times ten, beyond the cutoff."""
    sanity = check_data([dataset(EXAMPLE_XYZ, length_unit="nm")], CUTOFF, 1)
    assert sanity.isolated == 100 and math.isinf(sanity.shortest)
    assert dict(sanity.lines())["distances"] == (
        "shortest none, cutoff 5 A; 100 structures without a neighbour"
    )
    assert any(
        "100 of 100 sampled training structures have no pair" in w for w in sanity.warnings()
    )
