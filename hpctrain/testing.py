"""Checks that architectures and exported models must pass, for tests.

:func:`evaluate_exported` runs an exported ``model.pt`` in a *fresh* Python process
that imports only ASE and metatomic (as an MD engine would), so that nothing loaded
by training can hide a broken export; :func:`predict_in_memory` computes the same
quantities with the trained torch model.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

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


def predict_in_memory(model: torch.nn.Module, structures: Path) -> list[dict[str, Any]]:
    """Energy, forces (and stress for periodic structures) of the torch model itself,
    through its own forward and autograd."""
    import ase.io
    from metatomic.torch import ModelOutput, System

    from .systems import NeighborLists

    model = model.eval()
    dtype = next(model.parameters()).dtype
    neighbors = NeighborLists(model.requested_neighbor_lists())
    results = []
    for atoms in ase.io.read(structures, ":"):
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
