"""Structures and targets held as columnar arrays, read from any ASE format.

Units are converted on reading to those hpctrain trains in: positions in angstrom,
energies in eV, forces in eV/angstrom, stress in eV/angstrom^3 (ASE's sign).
A virial is turned into a stress (``stress = -virial / volume``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from ..architecture import DatasetInfo, TargetInfo
from ..errors import DataError
from ..options import DatasetOptions

LENGTH_UNIT = "angstrom"
ENERGY_UNIT = "eV"


@dataclasses.dataclass
class Structure:
    """One structure and its targets, as tensors.

    ``targets`` maps a target name to its value (shape ``[1]``, or ``[n_atoms]``
    per atom); ``forces`` and ``stress`` map target names to their gradients.
    """

    numbers: torch.Tensor  # [n_atoms] int32
    positions: torch.Tensor  # [n_atoms, 3]
    cell: torch.Tensor  # [3, 3], zero for non-periodic directions
    pbc: torch.Tensor  # [3] bool
    targets: dict[str, torch.Tensor]
    forces: dict[str, torch.Tensor]
    stress: dict[str, torch.Tensor]


class AtomisticDataset(torch.utils.data.Dataset):
    """A map-style dataset of structures: ``len``, ``dataset[i] -> Structure``.

    Every dataset hpctrain hands to ``Trainer.train`` is one of these. Besides the
    structures it knows ``info`` (types, targets and units), ``name`` (its source,
    for messages), ``dtype`` (of the tensors it returns) and ``n_atoms`` (atoms of
    every structure, without reading them).
    """

    info: DatasetInfo
    name: str
    dtype: torch.dtype

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Structure:
        raise NotImplementedError

    @property
    def n_atoms(self) -> np.ndarray:
        raise NotImplementedError

    def subset(self, indices: Sequence[int], name: str | None = None) -> Subset:
        """The structures at ``indices``, in that order, read lazily from this one."""
        return Subset(self, indices, name)


class Subset(AtomisticDataset):
    """Some structures of another dataset (a split), read lazily through it."""

    def __init__(self, dataset: AtomisticDataset, indices: Sequence[int], name: str | None):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.info = dataset.info
        self.name = name or dataset.name
        self.dtype = dataset.dtype

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Structure:
        if not 0 <= index < len(self.indices):
            raise IndexError(f"structure {index} of a dataset of {len(self)}")
        return self.dataset[int(self.indices[index])]

    @property
    def n_atoms(self) -> np.ndarray:
        return self.dataset.n_atoms[self.indices]


class StructureDataset(AtomisticDataset):
    """Structures held in memory as columnar arrays (ragged per-atom data by offsets)."""

    def __init__(
        self,
        numbers: np.ndarray,
        positions: np.ndarray,
        offsets: np.ndarray,
        cells: np.ndarray,
        pbcs: np.ndarray,
        targets: dict[str, np.ndarray],
        forces: dict[str, np.ndarray],
        stress: dict[str, np.ndarray],
        info: DatasetInfo,
        name: str,
        dtype: torch.dtype = torch.float64,
    ):
        self.numbers = numbers
        self.positions = positions
        self.offsets = offsets
        self.cells = cells
        self.pbcs = pbcs
        self.targets = targets
        self.forces = forces
        self.stress = stress
        self.info = info
        self.name = name
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, index: int) -> Structure:
        if not 0 <= index < len(self):
            raise IndexError(f"structure {index} of a dataset of {len(self)}")
        start, stop = self.offsets[index], self.offsets[index + 1]
        dtype = self.dtype

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)

        targets = {}
        for name, values in self.targets.items():
            per_atom = self.info.targets[name].per_atom
            targets[name] = tensor(values[start:stop] if per_atom else values[index : index + 1])
        return Structure(
            numbers=torch.from_numpy(self.numbers[start:stop].astype(np.int32)),
            positions=tensor(self.positions[start:stop]),
            cell=tensor(self.cells[index]),
            pbc=torch.from_numpy(self.pbcs[index].copy()),
            targets=targets,
            forces={k: tensor(v[start:stop]) for k, v in self.forces.items()},
            stress={k: tensor(v[index]) for k, v in self.stress.items()},
        )


def _lookup(atoms, key: str):
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    if atoms.calc is not None and key in atoms.calc.results:
        return atoms.calc.results[key]
    return None


def _full_3x3(value, what: str, where: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape == (6,):
        from ase.stress import voigt_6_to_full_3x3_stress

        return voigt_6_to_full_3x3_stress(array)
    if array.size == 9:
        return array.reshape(3, 3)
    raise DataError(f"{where}: {what} must have 6 (Voigt) or 9 values, got shape {array.shape}")


def _conversion(unit: str, to: str, key: str, source: str) -> float:
    from metatomic.torch import unit_conversion_factor

    try:
        return float(unit_conversion_factor(unit, to))
    except Exception as error:  # metatomic raises RuntimeError/ValueError on unknown units
        raise DataError(
            f"'{key}' in {source}: cannot convert unit {unit!r} to {to!r}: {error}"
        ) from None


def read_dataset(
    options: DatasetOptions,
    path_in_options: str,
    source: str,
    dtype: torch.dtype = torch.float64,
) -> StructureDataset:
    """Read every structure of ``options.systems.read_from`` with its targets.

    :param path_in_options: where ``options`` sits in the options file, for messages
    :param source: the options file, for messages
    """
    import ase.io

    path = options.systems.read_from
    length = _conversion(
        options.systems.length_unit, LENGTH_UNIT, f"{path_in_options}.systems.length_unit", source
    )
    energy_factors = {
        name: _conversion(t.unit, ENERGY_UNIT, f"{path_in_options}.targets.{name}.unit", source)
        for name, t in options.targets.items()
    }
    numbers, positions, counts, cells, pbcs = [], [], [], [], []
    targets: dict[str, list] = {name: [] for name in options.targets}
    forces: dict[str, list] = {}
    stress: dict[str, list] = {}
    for name, target in options.targets.items():
        if target.gradient_key("forces"):
            forces[name] = []
        if target.gradient_key("stress") or target.gradient_key("virial"):
            stress[name] = []

    try:
        frames = ase.io.iread(path, index=":", format=options.systems.reader)
        for index, atoms in enumerate(frames):
            where = f"{path}, structure {index}"
            n = len(atoms)
            if n == 0:
                raise DataError(f"{where} has no atoms")
            numbers.append(atoms.numbers.astype(np.int32))
            positions.append(atoms.positions * length)
            counts.append(n)
            cell = np.asarray(atoms.cell.array, dtype=np.float64) * length
            pbc = np.asarray(atoms.pbc, dtype=bool)
            cell[~pbc] = 0.0
            cells.append(cell)
            pbcs.append(pbc)
            for name, target in options.targets.items():
                factor = energy_factors[name]
                key = target.key or name
                value = _lookup(atoms, key)
                if value is None:
                    raise DataError(
                        f"{where} has no '{key}' for target '{name}' "
                        f"(at '{path_in_options}.targets.{name}.key'); "
                        f"available keys: {sorted(set(atoms.info) | set(atoms.arrays))}"
                    )
                value = np.asarray(value, dtype=np.float64) * factor
                expected = (n,) if target.per_atom else ()
                if value.reshape(-1).shape != (int(np.prod(expected)) or 1,):
                    raise DataError(
                        f"{where}: target '{name}' has shape {value.shape}, expected "
                        f"{'one value per atom' if target.per_atom else 'one value'}"
                    )
                targets[name].append(value.reshape(expected if target.per_atom else (1,)))
                if name in forces:
                    fkey = target.gradient_key("forces")
                    f = _lookup(atoms, fkey)
                    if f is None:
                        raise DataError(
                            f"{where} has no forces '{fkey}' for target '{name}'; set "
                            f"'{path_in_options}.targets.{name}.forces: false' to learn "
                            "energies only, or name the right key"
                        )
                    f = np.asarray(f, dtype=np.float64)
                    if f.shape != (n, 3):
                        raise DataError(f"{where}: forces have shape {f.shape}, expected ({n}, 3)")
                    forces[name].append(f * factor / length)
                if name in stress:
                    skey = target.gradient_key("stress") or target.gradient_key("virial")
                    raw = _lookup(atoms, skey)
                    if raw is None:
                        raise DataError(
                            f"{where} has no '{skey}' for target '{name}'; remove "
                            f"'{path_in_options}.targets.{name}.stress/virial' or name the key"
                        )
                    if not pbc.all():
                        raise DataError(
                            f"{where}: stress/virial needs a periodic structure "
                            "(pbc = T T T); this one is not"
                        )
                    s = _full_3x3(raw, skey, where)
                    if target.gradient_key("virial"):
                        s = -s / abs(np.linalg.det(cell / length))
                        s = s * factor / length**3
                    else:
                        s = s * factor / length**3
                    stress[name].append(s)
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(
            f"{path} does not exist (at '{path_in_options}.systems.read_from')"
        ) from None
    except Exception as error:
        raise DataError(
            f"cannot read {path} (at '{path_in_options}.systems.read_from'): {error}"
        ) from error
    if not counts:
        raise DataError(f"{path} holds no structures (at '{path_in_options}.systems.read_from')")

    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    arrays = {
        "positions": np.concatenate(positions),
        "cells": np.stack(cells),
        **{f"target '{k}'": np.concatenate(v) for k, v in targets.items()},
        **{f"forces of '{k}'": np.concatenate(v) for k, v in forces.items()},
        **{f"stress of '{k}'": np.stack(v) for k, v in stress.items()},
    }
    for what, array in arrays.items():
        bad = ~np.isfinite(array)
        if bad.any():
            row = int(np.argwhere(bad)[0][0])
            per_atom = array.shape[0] == offsets[-1] and what != "cells"
            structure = int(np.searchsorted(offsets, row, side="right") - 1) if per_atom else row
            raise DataError(f"{path}, structure {structure}: {what} holds NaN or inf values")

    info = DatasetInfo(
        length_unit=LENGTH_UNIT,
        atomic_types=sorted({int(z) for z in np.unique(np.concatenate(numbers))}),
        targets={
            name: TargetInfo(
                quantity=t.quantity,
                unit=ENERGY_UNIT,
                per_atom=t.per_atom,
                gradients=(["positions"] if name in forces else [])
                + (["strain"] if name in stress else []),
            )
            for name, t in options.targets.items()
        },
    )
    return StructureDataset(
        numbers=np.concatenate(numbers),
        positions=arrays["positions"],
        offsets=offsets,
        cells=arrays["cells"],
        pbcs=np.stack(pbcs),
        targets={k: np.concatenate(v) for k, v in targets.items()},
        forces={k: np.concatenate(v) for k, v in forces.items()},
        stress={k: np.stack(v) for k, v in stress.items()},
        info=info,
        name=path,
        dtype=dtype,
    )
