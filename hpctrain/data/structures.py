"""The structures hpctrain trains on: one :class:`Structure` as tensors, and the
datasets every trainer receives (:class:`AtomisticDataset`, its :class:`Subset`, and
:class:`StructureDataset`, structures held as columnar arrays in memory).

Units are those hpctrain trains in: positions in angstrom, energies in eV, forces in
eV/angstrom, stress in eV/angstrom^3 (ASE's sign).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch

from ..architecture import DatasetInfo
from .pairs import HalfList

LENGTH_UNIT = "angstrom"
ENERGY_UNIT = "eV"


@dataclasses.dataclass
class Structure:
    """One structure and its targets, as tensors.

    ``targets`` maps a target name to its value (shape ``[1]``, or ``[n_atoms]``
    per atom); ``forces`` and ``stress`` map target names to their gradients.
    ``neighbors``: its neighbour pairs when they were stored with it (else the loader
    searches them).
    """

    numbers: torch.Tensor  # [n_atoms] int32
    positions: torch.Tensor  # [n_atoms, 3]
    cell: torch.Tensor  # [3, 3], zero for non-periodic directions
    pbc: torch.Tensor  # [3] bool
    targets: dict[str, torch.Tensor]
    forces: dict[str, torch.Tensor]
    stress: dict[str, torch.Tensor]
    neighbors: HalfList | None = None


class AtomisticDataset(torch.utils.data.Dataset):
    """A map-style dataset of structures: ``len``, ``dataset[i] -> Structure``.

    Every dataset hpctrain hands to ``Trainer.train`` is one of these. Besides the
    structures it knows ``info`` (types, targets and units), ``name`` (its source,
    for messages), ``dtype`` (of the tensors it returns), and, without reading the structures,
    ``n_atoms`` (atoms of every structure) and ``volumes`` (their cell volumes).
    """

    info: DatasetInfo
    name: str
    dtype: torch.dtype
    sampling_weight: float | None = None  # (a training set's share of each epoch)
    loss_weight: float = 1.0  # (a training set's weight in the loss)
    replay_fraction: float | None = None  # (fine-tuning: replayed data's share of an epoch)
    pair_cutoff: float | None = None  # (the cutoff of neighbour pairs stored with it)

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Structure:
        raise NotImplementedError

    @property
    def n_atoms(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def volumes(self) -> np.ndarray:
        """Cell volume of every structure (in the dataset's length unit, cubed); NaN
        where a structure is not periodic in all three directions."""
        raise NotImplementedError

    @property
    def has_stress(self) -> np.ndarray:
        """Whether each structure has a stress (for every target trained on one); a
        structure without (NaN in its place) is left out of the stress loss."""
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
        self.sampling_weight = dataset.sampling_weight
        self.loss_weight = dataset.loss_weight
        self.replay_fraction = dataset.replay_fraction
        self.pair_cutoff = dataset.pair_cutoff

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Structure:
        if not 0 <= index < len(self.indices):
            raise IndexError(f"structure {index} of a dataset of {len(self)}")
        return self.dataset[int(self.indices[index])]

    @property
    def n_atoms(self) -> np.ndarray:
        return self.dataset.n_atoms[self.indices]

    @property
    def volumes(self) -> np.ndarray:
        return self.dataset.volumes[self.indices]

    @property
    def has_stress(self) -> np.ndarray:
        return self.dataset.has_stress[self.indices]


class StructureDataset(AtomisticDataset):
    """Structures held in memory as columnar arrays (ragged per-atom data by offsets),
    with their neighbour pairs when they were stored (``neighbors``, one per structure).

    Positions, cells, forces and stress are held in ``dtype`` (converted once, not
    per structure); energies keep their precision until a structure is taken.
    """

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
        neighbors: list[HalfList] | None = None,
    ):
        floats = torch.empty(0, dtype=dtype).numpy().dtype
        self.numbers = np.asarray(numbers, dtype=np.int32)
        self.positions = np.asarray(positions, dtype=floats)
        self.offsets = offsets
        self.cells = np.asarray(cells, dtype=floats)
        self.pbcs = pbcs
        self.targets = targets
        self.forces = {k: np.asarray(v, dtype=floats) for k, v in forces.items()}
        self.stress = {k: np.asarray(v, dtype=floats) for k, v in stress.items()}
        self.neighbors = neighbors
        self._typed_targets = {k: np.asarray(v, dtype=floats) for k, v in targets.items()}
        self.info = info
        self.name = name
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def volumes(self) -> np.ndarray:
        return cell_volumes(self.cells, self.pbcs)

    @property
    def has_stress(self) -> np.ndarray:
        return stress_known(self.stress, len(self))

    def __getitem__(self, index: int) -> Structure:
        if not 0 <= index < len(self):
            raise IndexError(f"structure {index} of a dataset of {len(self)}")
        start, stop = self.offsets[index], self.offsets[index + 1]
        tensor = torch.from_numpy  # (rows of arrays in the dataset's dtype: views)
        targets = {}
        for name, values in self._typed_targets.items():
            per_atom = self.info.targets[name].per_atom
            targets[name] = tensor(values[start:stop] if per_atom else values[index : index + 1])
        return Structure(
            numbers=tensor(self.numbers[start:stop]),
            positions=tensor(self.positions[start:stop]),
            cell=tensor(self.cells[index]),
            pbc=tensor(self.pbcs[index]),
            targets=targets,
            forces={k: tensor(v[start:stop]) for k, v in self.forces.items()},
            stress={k: tensor(v[index]) for k, v in self.stress.items()},
            neighbors=None if self.neighbors is None else self.neighbors[index],
        )


GRADIENT_NAMES = {"positions": "forces", "strain": "stress"}  # (TargetInfo.gradients)


def cell_volumes(cells: np.ndarray, pbcs: np.ndarray) -> np.ndarray:
    """``|det(cell)|`` of ``[n, 3, 3]`` cells; NaN where ``[n, 3]`` pbc is not all true."""
    volumes = np.abs(np.linalg.det(np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)))
    return np.where(np.asarray(pbcs).reshape(-1, 3).all(axis=1), volumes, np.nan)


def stress_known(stress: dict[str, np.ndarray], n: int) -> np.ndarray:
    """Whether each of ``n`` structures has a finite stress in every ``[n, 3, 3]``
    array of ``stress`` (False for all without any)."""
    if not stress:
        return np.zeros(n, dtype=bool)
    return np.all([np.isfinite(v).all(axis=(1, 2)) for v in stress.values()], axis=0)


def labels_of(dataset: AtomisticDataset) -> set[tuple[str, str]]:
    """``{("energy", ""), ("energy", "forces")}``: each target, and its gradients."""
    return {
        (name, GRADIENT_NAMES.get(g, g))
        for name, target in dataset.info.targets.items()
        for g in ["", *target.gradients]
    }


class ConcatDataset:
    """Several datasets indexed as one. A label that one set has and another has not
    (another target, such as another level of theory; forces; a stress) is NaN in the
    structures of the set without it: left out of the loss and the metrics."""

    def __init__(self, datasets: Sequence[AtomisticDataset]):
        self.datasets = list(datasets)
        self.starts = np.cumsum([0] + [len(d) for d in self.datasets])
        self.labels = [labels_of(d) for d in self.datasets]
        every = set().union(*self.labels)
        self.missing = [sorted(every - mine) for mine in self.labels]

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        which = int(np.searchsorted(self.starts, index, side="right") - 1)
        structure = self.datasets[which][index - int(self.starts[which])]
        if not self.missing[which]:
            return structure
        targets, forces, stress = (
            dict(structure.targets),
            dict(structure.forces),
            dict(structure.stress),
        )
        n = len(structure.numbers)
        places = {"": (targets, (1,)), "forces": (forces, (n, 3)), "stress": (stress, (3, 3))}
        for name, kind in self.missing[which]:
            values, shape = places[kind]
            values[name] = torch.full(shape, math.nan, dtype=structure.positions.dtype)
        return dataclasses.replace(structure, targets=targets, forces=forces, stress=stress)

    def label_counts(self, target: str, kind: str) -> np.ndarray:
        """Per structure, how many values of a label it has: 1 for an energy of
        ``target`` (``kind`` ``""``), its atoms for forces, 1 for a stress it has;
        0 in the sets without the label."""
        parts = []
        for dataset, mine in zip(self.datasets, self.labels):
            if (target, kind) not in mine:
                parts.append(np.zeros(len(dataset), dtype=np.int64))
            elif kind == "forces":
                parts.append(np.asarray(dataset.n_atoms, dtype=np.int64))
            elif kind == "stress":
                parts.append(np.asarray(dataset.has_stress, dtype=np.int64))
            else:
                parts.append(np.ones(len(dataset), dtype=np.int64))
        return np.concatenate(parts)

    @property
    def n_atoms(self) -> np.ndarray:
        return np.concatenate([d.n_atoms for d in self.datasets])

    @property
    def volumes(self) -> np.ndarray:
        return np.concatenate([d.volumes for d in self.datasets])

    @property
    def has_stress(self) -> np.ndarray:
        return np.concatenate([d.has_stress for d in self.datasets])

    @property
    def loss_weights(self) -> np.ndarray | None:
        """Every structure's weight in the loss (its set's), or None: all 1."""
        if all(d.loss_weight == 1.0 for d in self.datasets):
            return None
        return np.concatenate([np.full(len(d), d.loss_weight) for d in self.datasets])
