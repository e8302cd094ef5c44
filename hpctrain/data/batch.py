"""Batches: several structures as one set of tensors, with their neighbour pairs
(:func:`collate`).

A batch is made off the training step's critical path (by the loader,
:mod:`hpctrain.data.loader`): the structures' arrays are concatenated per atom, the
neighbour lists the model requests are computed on the CPU and concatenated with
their cell shifts, and the whole batch is moved to the device in one go. The step
then computes pair vectors from positions, cells and shifts on the device, so that
forces and stress come from autograd; nothing in it loops over structures.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from .pairs import batch_pairs
from .structures import Columns, Structure


@dataclasses.dataclass
class Pairs:
    """The neighbour pairs of one requested neighbour list, over a whole batch.

    The vector of pair ``p`` is ``positions[neighbors[p]] - positions[centers[p]]
    + cell_shifts[p]`` (:func:`pair_vectors`), where ``cell_shifts[p]`` is its whole
    cell shift times its structure's cell (made with the batch: cells are data, not
    trained); the indices are positions in the batch's atoms.
    """

    centers: torch.Tensor  # [pairs] int64
    neighbors: torch.Tensor  # [pairs] int64
    cell_shifts: torch.Tensor  # [pairs, 3] in the positions' dtype and unit
    system: torch.Tensor  # [pairs] int64: the structure of each pair

    def __len__(self) -> int:
        return len(self.centers)


@dataclasses.dataclass
class Batch:
    """Several structures, concatenated per atom, on one device.

    ``types``, ``positions`` and ``system`` (the structure of each atom) are per
    atom; ``cells`` ``[n_structures, 3, 3]``, ``pbcs`` ``[n_structures, 3]`` and
    ``n_atoms`` per structure; ``pairs`` holds one :class:`Pairs` per neighbour list
    the model requested, in the order it requested them. ``sizes`` and
    ``element_counts`` (atoms of each atomic number) are the same counts on the host,
    so that splitting the batch needs no read from the device.
    ``targets[name]`` is ``[n_structures]`` (or ``[n_atoms]`` per atom),
    ``forces[name]`` is ``[n_atoms, 3]``, ``stress[name]`` is ``[n_structures, 3, 3]``
    (NaN for a structure without a stress). ``loss_weights`` ``[n_structures]`` weighs
    each structure's loss terms (None: all 1).
    """

    types: torch.Tensor
    positions: torch.Tensor
    system: torch.Tensor
    cells: torch.Tensor
    pbcs: torch.Tensor
    n_atoms: torch.Tensor
    pairs: list[Pairs]
    targets: dict[str, torch.Tensor]
    forces: dict[str, torch.Tensor]
    stress: dict[str, torch.Tensor]
    sizes: list[int]
    element_counts: dict[int, int]
    loss_weights: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.sizes)

    def apply(self, function) -> Batch:
        """A batch with ``function`` applied to every tensor."""

        def each(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {k: function(v) for k, v in values.items()}

        fields = {
            f.name: function(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        }
        pairs = [
            Pairs(*(function(getattr(p, f.name)) for f in dataclasses.fields(Pairs)))
            for p in self.pairs
        ]
        return dataclasses.replace(
            self,
            **fields,
            pairs=pairs,
            targets=each(self.targets),
            forces=each(self.forces),
            stress=each(self.stress),
        )

    def to(self, device: torch.device | str | None, non_blocking: bool = False) -> Batch:
        """This batch on ``device`` (itself if it is there already)."""
        if device is None or self.positions.device == torch.device(device):
            return self
        return self.apply(lambda t: t.to(device, non_blocking=non_blocking))

    def to_dtype(self, dtype: torch.dtype) -> Batch:
        """Positions, cells, shifts and references in ``dtype`` (itself if they are)."""
        if self.positions.dtype == dtype:
            return self
        return self.apply(lambda t: t.to(dtype) if t.is_floating_point() else t)

    def pin_memory(self) -> Batch:
        """This batch in page-locked memory, for asynchronous copies to a GPU."""
        return self.apply(lambda t: t.pin_memory())


def neighbor_pairs(
    columns: Columns, offsets: np.ndarray, cutoff: float, full_list: bool, dtype: torch.dtype
) -> Pairs:
    """The pairs within ``cutoff`` of every structure: those stored with it, else
    searched (one thread, on the CPU; :func:`hpctrain.data.pairs.batch_pairs`)."""
    floats = torch.empty(0, dtype=dtype).numpy().dtype
    centers, neighbors, shifted, system = batch_pairs(columns, offsets, cutoff, full_list, floats)
    return Pairs(
        centers=torch.from_numpy(centers),
        neighbors=torch.from_numpy(neighbors),
        cell_shifts=torch.from_numpy(shifted),
        system=torch.from_numpy(system),
    )


def collate(
    structures: Sequence[Structure] | Columns,
    requests: Sequence = (),
    device: torch.device | str | None = None,
) -> Batch:
    """Concatenate ``structures`` (or take their :class:`Columns`) into a batch, with
    the neighbour pairs of each request (metatomic ``NeighborListOptions``: cutoff and
    full or half list; the pairs are those strictly within the cutoff), on ``device``."""
    columns = structures if isinstance(structures, Columns) else Columns.of(structures)
    sizes = columns.sizes.tolist()
    offsets = columns.offsets
    elements, counts = np.unique(columns.numbers, return_counts=True)
    dtype = torch.from_numpy(columns.positions[:0]).dtype
    tensor = torch.from_numpy
    batch = Batch(
        types=tensor(columns.numbers.astype(np.int32, copy=False)),
        positions=tensor(columns.positions),
        system=tensor(np.repeat(np.arange(len(sizes)), sizes)),
        cells=tensor(columns.cells),
        pbcs=tensor(columns.pbcs),
        n_atoms=tensor(columns.sizes.astype(np.int64, copy=False)),
        pairs=[neighbor_pairs(columns, offsets, r.cutoff, r.full_list, dtype) for r in requests],
        targets={k: tensor(v) for k, v in columns.targets.items()},
        forces={k: tensor(v) for k, v in columns.forces.items()},
        stress={k: tensor(v) for k, v in columns.stress.items()},
        sizes=sizes,
        element_counts={int(z): int(n) for z, n in zip(elements, counts)},
    )
    return batch.to(device)


def pair_vectors(
    pairs: Pairs, positions: torch.Tensor, strain: torch.Tensor | None = None
) -> torch.Tensor:
    """``[pairs, 3]`` vectors from each centre to its neighbour, differentiable in
    ``positions`` and, with ``strain`` (``[n_structures, 3, 3]``), in the strain that
    deforms each structure's positions and cell by ``1 + strain``.

    The geometry keeps the positions' precision under mixed precision (autocast
    would compute these products in bfloat16: three significant digits).
    """
    with torch.autocast(positions.device.type, enabled=False):
        vectors = (
            positions.index_select(0, pairs.neighbors)
            - positions.index_select(0, pairs.centers)
            + pairs.cell_shifts
        )
        if strain is not None:
            deform = torch.bmm(vectors.unsqueeze(1), strain.index_select(0, pairs.system))
            vectors = vectors + deform.squeeze(1)
    return vectors
