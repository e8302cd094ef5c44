"""metatomic Systems from batches, for models trained through metatomic's interface
(and for exported models): strain for stress, neighbour lists with autograd."""

from __future__ import annotations

import torch
from metatomic.torch import NeighborListOptions, System

from .data.batch import Batch

# TorchScript libraries that hpctrain loaded for its own neighbour lists (not loaded by
# a model's code before): an exported model does not require them
OWN_LIBRARIES: set[str] = set()


class NeighborLists:
    """Computes the neighbour lists a model requests, differentiable in positions/cell."""

    def __init__(self, requests: list[NeighborListOptions], length_unit: str = "angstrom"):
        before = set(torch.ops.loaded_libraries)
        from vesin.metatomic import NeighborList

        OWN_LIBRARIES.update(set(torch.ops.loaded_libraries) - before)
        self.calculators = [NeighborList(options, length_unit) for options in requests]

    def add(self, systems: list[System]) -> None:
        for calculator in self.calculators:
            calculator.add_neighbor_list(systems)


def make_systems(
    batch: Batch,
    positions: torch.Tensor,
    strain: torch.Tensor | None,
    neighbors: NeighborLists,
) -> list[System]:
    """One System per structure of ``batch``, with the neighbour lists of ``neighbors``.

    ``positions`` (``[n_atoms, 3]``, the batch's, usually a leaf that requires
    gradients) are split per structure; with ``strain`` (``[n_structures, 3, 3]``
    zeros), positions and cells are multiplied by ``1 + strain``, so that the
    derivative of the energy with respect to the strain, divided by the volume, is
    the stress.

    The geometry keeps the batch's precision under mixed precision: autocast would
    turn the strain product into bfloat16, positions to three significant digits.
    """
    with torch.autocast(positions.device.type, enabled=False):
        per_structure = torch.split(positions, batch.sizes)
        types = torch.split(batch.types, batch.sizes)
        if strain is not None:
            eye = torch.eye(3, dtype=positions.dtype, device=positions.device)
        systems = []
        for i in range(len(batch)):
            pos, cell = per_structure[i], batch.cells[i]
            if strain is not None:
                deform = eye + strain[i]
                pos = pos @ deform
                cell = cell @ deform
            systems.append(System(types=types[i], positions=pos, cell=cell, pbc=batch.pbcs[i]))
        neighbors.add(systems)
    return systems
