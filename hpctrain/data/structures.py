"""The structures hpctrain trains on: one :class:`Structure` as tensors, several as
:class:`Columns` (what a batch is made of), and the datasets every trainer receives
(:class:`AtomisticDataset`, its :class:`Subset`, and :class:`StructureDataset`,
structures held as columnar arrays in memory).

A batch's structures are taken as columns (``dataset.columns(indices)``): the
datasets that hold arrays gather them for all the batch's structures at once,
without an object per structure; any other dataset's structures are concatenated
one by one (:meth:`Columns.of`). Both give the same arrays.

Units are those hpctrain trains in: positions in angstrom, energies in eV, forces in
eV/angstrom, stress in eV/angstrom^3 (ASE's sign).
"""

from __future__ import annotations

import dataclasses
import functools
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


@dataclasses.dataclass
class Columns:
    """Structures as columns: per-atom arrays concatenated in the structures' order,
    per-structure ones stacked.

    ``targets[name]`` has one row per structure, or per atom for the names in
    ``per_atom``; ``forces`` are per atom, ``stress`` ``[n, 3, 3]``; ``neighbors``
    holds each structure's stored pairs (or None: searched when the batch is made).
    """

    numbers: np.ndarray  # [atoms] int32
    positions: np.ndarray  # [atoms, 3]
    sizes: np.ndarray  # [n] atoms of each structure, int64
    cells: np.ndarray  # [n, 3, 3]
    pbcs: np.ndarray  # [n, 3]
    targets: dict[str, np.ndarray]
    forces: dict[str, np.ndarray]
    stress: dict[str, np.ndarray]
    neighbors: list[HalfList | None]
    per_atom: frozenset[str] = frozenset()

    def __len__(self) -> int:
        return len(self.sizes)

    @functools.cached_property
    def offsets(self) -> np.ndarray:
        """``[n + 1]``: where each structure's atoms start, and the end."""
        return np.concatenate([[0], np.cumsum(self.sizes)])

    @classmethod
    def of(cls, structures: Sequence[Structure], per_atom: frozenset[str] = frozenset()):
        """The columns of ``structures``, concatenated one by one."""
        first = structures[0]

        def cat(tensors: list[torch.Tensor]) -> np.ndarray:
            return np.concatenate([t.numpy() for t in tensors])

        def stack(tensors: list[torch.Tensor]) -> np.ndarray:
            return np.stack([t.numpy() for t in tensors])

        return cls(
            numbers=cat([s.numbers for s in structures]),
            positions=cat([s.positions for s in structures]),
            sizes=np.array([len(s.numbers) for s in structures], dtype=np.int64),
            cells=stack([s.cell for s in structures]),
            pbcs=stack([s.pbc for s in structures]),
            targets={k: cat([s.targets[k] for s in structures]) for k in first.targets},
            forces={k: cat([s.forces[k] for s in structures]) for k in first.forces},
            stress={k: stack([s.stress[k] for s in structures]) for k in first.stress},
            neighbors=[s.neighbors for s in structures],
            per_atom=per_atom,
        )

    def take(self, order: np.ndarray) -> Columns:
        """The structures at ``order`` (indices into these), in that order."""
        order = np.asarray(order, dtype=np.int64)
        sizes = self.sizes[order]
        starts = self.offsets[order]
        # the rows of their atoms: each structure's range, concatenated
        atoms = np.arange(int(sizes.sum()), dtype=np.int64)
        atoms += np.repeat(starts - (np.cumsum(sizes) - sizes), sizes)
        return Columns(
            numbers=self.numbers[atoms],
            positions=self.positions[atoms],
            sizes=sizes,
            cells=self.cells[order],
            pbcs=self.pbcs[order],
            targets={k: v[atoms if k in self.per_atom else order] for k, v in self.targets.items()},
            forces={k: v[atoms] for k, v in self.forces.items()},
            stress={k: v[order] for k, v in self.stress.items()},
            neighbors=[self.neighbors[i] for i in order],
            per_atom=self.per_atom,
        )

    @staticmethod
    def pick(sources: Sequence[Columns], rows: Sequence[int]) -> Columns:
        """Structure ``rows[k]`` of ``sources[k]`` for each ``k``, in that order (with
        the labels of the first source); for structures scattered over many sources."""
        first = sources[0]
        spans = []
        for source, i in zip(sources, rows):
            offsets = source.offsets
            spans.append((source, i, slice(offsets[i], offsets[i + 1])))

        def atoms(field: str, name: str | None = None) -> np.ndarray:
            if name is None:
                return np.concatenate([getattr(c, field)[a] for c, _, a in spans])
            return np.concatenate([getattr(c, field)[name][a] for c, _, a in spans])

        def structures(field: str, name: str | None = None) -> np.ndarray:
            if name is None:
                return np.stack([getattr(c, field)[i] for c, i, _ in spans])
            return np.stack([getattr(c, field)[name][i] for c, i, _ in spans])

        return Columns(
            numbers=atoms("numbers"),
            positions=atoms("positions"),
            sizes=np.array([a.stop - a.start for _, _, a in spans], dtype=np.int64),
            cells=structures("cells"),
            pbcs=structures("pbcs"),
            targets={
                k: atoms("targets", k) if k in first.per_atom else structures("targets", k)
                for k in first.targets
            },
            forces={k: atoms("forces", k) for k in first.forces},
            stress={k: structures("stress", k) for k in first.stress},
            neighbors=[c.neighbors[i] for c, i, _ in spans],
            per_atom=first.per_atom,
        )

    @staticmethod
    def concat(parts: Sequence[Columns]) -> Columns:
        """The structures of ``parts`` (with the same labels), one part after another."""
        if len(parts) == 1:
            return parts[0]
        first = parts[0]

        def cat(field: str) -> np.ndarray:
            return np.concatenate([getattr(p, field) for p in parts])

        def cat_each(field: str) -> dict[str, np.ndarray]:
            names = getattr(first, field)
            return {k: np.concatenate([getattr(p, field)[k] for p in parts]) for k in names}

        return Columns(
            numbers=cat("numbers"),
            positions=cat("positions"),
            sizes=cat("sizes"),
            cells=cat("cells"),
            pbcs=cat("pbcs"),
            targets=cat_each("targets"),
            forces=cat_each("forces"),
            stress=cat_each("stress"),
            neighbors=[h for p in parts for h in p.neighbors],
            per_atom=first.per_atom,
        )

    @staticmethod
    def gathered(parts: Sequence[tuple[np.ndarray, Columns]], n: int) -> Columns:
        """``n`` structures from ``parts``: each the places (in ``0..n-1``, increasing)
        of its structures and their columns."""
        parts = sorted(parts, key=lambda part: int(part[0][0]))  # labels as the first's
        whole = Columns.concat([columns for _, columns in parts])
        places = np.concatenate([where for where, _ in parts])
        if np.array_equal(places, np.arange(n)):
            return whole
        order = np.empty(n, dtype=np.int64)
        order[places] = np.arange(n)
        return whole.take(order)


def checked_indices(indices: np.ndarray, n: int) -> np.ndarray:
    """``indices`` as int64, each in ``0..n-1`` (else an IndexError naming them)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) and not (0 <= indices.min() and indices.max() < n):
        raise IndexError(f"structures {indices.tolist()} of a dataset of {n}")
    return indices


def per_atom_targets(info: DatasetInfo) -> frozenset[str]:
    return frozenset(name for name, target in info.targets.items() if target.per_atom)


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

    def columns(self, indices: np.ndarray) -> Columns:
        """The structures at ``indices``, in that order, as columns."""
        return Columns.of([self[int(i)] for i in indices], per_atom_targets(self.info))

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

    def columns(self, indices: np.ndarray) -> Columns:
        return self.dataset.columns(self.indices[checked_indices(indices, len(self))])

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
        first, last = int(offsets[0]), int(offsets[-1])
        self.as_columns = Columns(  # (views of the arrays above)
            numbers=self.numbers[first:last],
            positions=self.positions[first:last],
            sizes=np.diff(offsets).astype(np.int64),
            cells=self.cells,
            pbcs=self.pbcs,
            targets={
                k: v[first:last] if info.targets[k].per_atom else v
                for k, v in self._typed_targets.items()
            },
            forces={k: v[first:last] for k, v in self.forces.items()},
            stress=self.stress,
            neighbors=neighbors if neighbors is not None else [None] * (len(offsets) - 1),
            per_atom=per_atom_targets(info),
        )

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def columns(self, indices: np.ndarray) -> Columns:
        return self.as_columns.take(checked_indices(indices, len(self)))

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
        dtype = structure.positions.numpy().dtype
        nan = self._nan_labels(which, 1, len(structure.numbers), dtype)
        return dataclasses.replace(
            structure,
            targets={**structure.targets, **{k: torch.from_numpy(v) for k, v in nan[""].items()}},
            forces={
                **structure.forces,
                **{k: torch.from_numpy(v) for k, v in nan["forces"].items()},
            },
            stress={
                **structure.stress,
                **{k: torch.from_numpy(v[0]) for k, v in nan["stress"].items()},
            },
        )

    def columns(self, indices: np.ndarray) -> Columns:
        """The structures at ``indices`` as columns, NaN where their set lacks a label."""
        indices = checked_indices(indices, len(self))
        which = np.searchsorted(self.starts, indices, side="right") - 1
        parts = []
        for d in np.unique(which):
            places = np.flatnonzero(which == d)
            columns = self.datasets[d].columns(indices[places] - self.starts[d])
            if self.missing[d]:
                nan = self._nan_labels(
                    d, len(columns), len(columns.numbers), columns.positions.dtype
                )
                columns = dataclasses.replace(
                    columns,
                    targets={**columns.targets, **nan[""]},
                    forces={**columns.forces, **nan["forces"]},
                    stress={**columns.stress, **nan["stress"]},
                )
            parts.append((places, columns))
        return Columns.gathered(parts, len(indices))

    def _nan_labels(
        self, which: int, n_structures: int, n_atoms: int, dtype: np.dtype
    ) -> dict[str, dict[str, np.ndarray]]:
        """The labels set ``which`` lacks, NaN, by kind (``""`` targets, ``forces``,
        ``stress``), for ``n_structures`` of ``n_atoms`` atoms in all."""
        shapes = {"": (n_structures,), "forces": (n_atoms, 3), "stress": (n_structures, 3, 3)}
        labels: dict[str, dict[str, np.ndarray]] = {kind: {} for kind in shapes}
        for name, kind in self.missing[which]:
            labels[kind][name] = np.full(shapes[kind], np.nan, dtype=dtype)
        return labels

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
