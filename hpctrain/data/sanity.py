"""What the banner says about the training data, and warnings for what looks wrong.

A unit mistake (kcal/mol or Hartree read as eV, nm or bohr as angstrom) trains without
an error, into a model that is wrong everywhere. On a sample of the training set, the
banner shows the mean energy per atom, the RMS force, the shortest interatomic distance
against the model's cutoff, and the structures with no pair of atoms within it; values
no DFT dataset in eV and angstrom has are warned of.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

SAMPLE = 1000  # structures read for the figures (spread over the training set)
SHORTEST_PLAUSIBLE = 0.5  # angstrom: shorter than any bond (H2: 0.74)
FORCE_RMS_RANGE = (0.005, 20.0)  # eV/angstrom, RMS force component of a dataset


@dataclasses.dataclass
class DataSanity:
    """Figures of ``sampled`` of ``total`` training structures (see the module doc)."""

    sampled: int
    total: int
    energy_per_atom: float | None  # mean energy per atom of the first target, eV
    force_rms: float | None  # RMS force component, eV/angstrom
    shortest: float  # shortest interatomic distance, angstrom (inf: none within the cutoff)
    isolated: int  # sampled structures with no pair of atoms within the cutoff
    cutoff: float | None  # the model's largest neighbour-list cutoff, angstrom
    stressed: int | None = None  # training structures with a stress (None: not trained)

    def lines(self) -> list[tuple[str, str]]:
        """Banner rows."""
        of = f"{self.sampled} of {self.total}" if self.sampled < self.total else f"all {self.total}"
        rows = []
        values = []
        if self.energy_per_atom is not None:
            values.append(f"mean energy {self.energy_per_atom:.4g} eV/atom")
        if self.force_rms is not None:
            values.append(f"RMS force {self.force_rms:.3g} eV/A")
        if values:
            rows.append(("data check", f"{', '.join(values)} ({of} training structures)"))
        if self.stressed is not None:
            left_out = self.total - self.stressed
            rows.append(
                (
                    "stress",
                    f"on {self.stressed} of {self.total} training structures"
                    + (f" ({left_out} without: left out of the stress loss)" if left_out else ""),
                )
            )
        if self.cutoff is not None:
            shortest = f"{self.shortest:.3g} A" if math.isfinite(self.shortest) else "none"
            rows.append(
                (
                    "distances",
                    f"shortest {shortest}, cutoff {self.cutoff:g} A; {self.isolated} "
                    f"structure{'' if self.isolated == 1 else 's'} without a neighbour",
                )
            )
        return rows

    def warnings(self) -> list[str]:
        """What no dataset in eV and angstrom looks like, with what to check."""
        found = []
        low, high = FORCE_RMS_RANGE
        if self.force_rms is not None and not low <= self.force_rms <= high:
            found.append(
                f"the RMS force of the training data is {self.force_rms:.3g} eV/A, outside "
                f"the {low:g}-{high:g} eV/A of DFT datasets: are the forces in another unit "
                "(kcal/mol/A, Hartree/bohr)? Name the units of the data in the options "
                "(targets.<name>.unit, systems.length_unit)"
            )
        if math.isfinite(self.shortest) and self.shortest < SHORTEST_PLAUSIBLE:
            found.append(
                f"two atoms of the training data are {self.shortest:.3g} A apart, closer "
                "than any bond: are the positions in another unit (nm)? Set "
                "systems.length_unit in the options"
            )
        if self.cutoff is not None and self.isolated:
            found.append(
                f"{self.isolated} of {self.sampled} sampled training structures have no pair "
                f"of atoms within the cutoff of {self.cutoff:g} A: their atoms are seen "
                "alone (right for isolated-atom energies; otherwise check cells and units)"
            )
        return found


def check_data(
    datasets: Sequence, cutoff: float | None, seed: int, sample: int = SAMPLE
) -> DataSanity:
    """The figures of :class:`DataSanity` on up to ``sample`` structures of
    ``datasets`` drawn with ``seed`` (all of them when there are fewer)."""
    sizes = [len(d) for d in datasets]
    total = sum(sizes)
    picked = np.arange(total)
    if total > sample:
        picked = np.sort(np.random.default_rng(seed).choice(total, sample, replace=False))
    starts = np.cumsum([0, *sizes])
    energies, forces, shortest, isolated = [], [], math.inf, 0
    for index in picked:
        which = int(np.searchsorted(starts, index, side="right")) - 1
        structure = datasets[which][int(index - starts[which])]
        n_atoms = len(structure.numbers)
        if structure.targets:
            energy = next(iter(structure.targets.values()))
            energies.append(float(energy.sum()) / n_atoms)
        for value in structure.forces.values():
            forces.append(value.detach().double().reshape(-1).numpy())
            break
        if cutoff is not None:
            nearest = nearest_distance(structure, cutoff)
            shortest = min(shortest, nearest)
            isolated += not math.isfinite(nearest)
    trains_stress = any("strain" in t.gradients for d in datasets for t in d.info.targets.values())
    stressed = int(sum(d.has_stress.sum() for d in datasets)) if trains_stress else None
    force_rms = None
    if forces:
        force_rms = float(np.sqrt(np.mean(np.square(np.concatenate(forces)))))
    return DataSanity(
        sampled=len(picked),
        total=total,
        energy_per_atom=float(np.mean(energies)) if energies else None,
        force_rms=force_rms,
        shortest=shortest,
        isolated=isolated,
        cutoff=cutoff,
        stressed=stressed,
    )


def nearest_distance(structure, cutoff: float) -> float:
    """The shortest distance between two atoms of ``structure`` (periodic images
    included), or inf when no pair is within ``cutoff``."""
    from vesin import NeighborList

    positions = structure.positions.detach().double().numpy()
    cell = structure.cell.detach().double().numpy()
    pbc = structure.pbc.numpy().astype(bool)
    if not pbc.any():
        cell = np.zeros((3, 3))
    (distances,) = NeighborList(cutoff=cutoff, full_list=False).compute(
        positions, cell, [bool(p) for p in pbc], quantities="d"
    )
    return float(distances.min()) if len(distances) else math.inf
