"""Generate a periodic dataset with EMT labels (energy, forces, stress), for benchmarks.

    python benchmarks/make_emt_dataset.py -n 1000 --atoms 32 -o emt.xyz

Structures are fcc supercells of Cu, Ag, Au, Ni, Pd, Pt and Al alloys, with a
random strain of a few percent and random displacements, so that energies, forces
and stresses all vary. EMT (from ASE) is fast and physical enough to learn.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
from ase.build import bulk
from ase.calculators.emt import EMT
from ase.io import write

ELEMENTS = ["Cu", "Ag", "Au", "Ni", "Pd", "Pt", "Al"]


def structures(n: int, atoms: int, seed: int):
    rng = np.random.default_rng(seed)
    repeat = max(1, round((atoms / 4) ** (1 / 3)))
    calc = EMT()
    for _ in range(n):
        host = rng.choice(ELEMENTS)
        crystal = bulk(host, "fcc", cubic=True).repeat(
            (repeat, repeat, math.ceil(atoms / 4 / repeat**2))
        )
        crystal = crystal[:atoms] if len(crystal) > atoms else crystal
        swap = rng.random(len(crystal)) < 0.3
        crystal.numbers[swap] = [
            __import__("ase").data.atomic_numbers[e] for e in rng.choice(ELEMENTS, swap.sum())
        ]
        strain = np.eye(3) + rng.normal(0, 0.02, (3, 3))
        crystal.set_cell(crystal.cell.array @ strain, scale_atoms=True)
        crystal.positions += rng.normal(0, 0.08, crystal.positions.shape)
        crystal.calc = calc
        energy = crystal.get_potential_energy()
        forces = crystal.get_forces()
        stress = crystal.get_stress(voigt=False)
        crystal.calc = None
        crystal.info["energy"] = energy
        crystal.info["stress"] = stress
        crystal.arrays["forces"] = forces
        yield crystal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=1000, help="number of structures")
    parser.add_argument("--atoms", type=int, default=32, help="atoms per structure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--output", required=True, help="extxyz file to write")
    args = parser.parse_args()
    write(args.output, list(structures(args.n, args.atoms, args.seed)), format="extxyz")


if __name__ == "__main__":
    main()
