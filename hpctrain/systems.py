"""metatomic Systems from batches: strain for stress, neighbour lists with autograd."""

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
    neighbors: NeighborLists,
    positions_grad: bool,
    strain_grad: bool,
) -> tuple[list[System], list[torch.Tensor], torch.Tensor | None]:
    """Systems for ``batch``; returns them, the position leaves and the strain leaf.

    With ``strain_grad``, positions and cells are multiplied by ``1 + strain``
    (a ``[n_structures, 3, 3]`` zero tensor), so that the derivative of the energy
    with respect to the strain, divided by the volume, is the stress.

    The geometry keeps the batch's precision under mixed precision: autocast would
    turn the strain product into bfloat16, positions to three significant digits.
    """
    device_type = batch.positions[0].device.type if len(batch) else "cpu"
    with torch.autocast(device_type, enabled=False):
        return _make_systems(batch, neighbors, positions_grad, strain_grad)


def _make_systems(
    batch: Batch, neighbors: NeighborLists, positions_grad: bool, strain_grad: bool
) -> tuple[list[System], list[torch.Tensor], torch.Tensor | None]:
    positions = [p.detach().requires_grad_(positions_grad) for p in batch.positions]
    strain = None
    if strain_grad:
        dtype, device = positions[0].dtype, positions[0].device
        strain = torch.zeros(len(batch), 3, 3, dtype=dtype, device=device, requires_grad=True)
        eye = torch.eye(3, dtype=dtype, device=device)
    systems = []
    for i in range(len(batch)):
        pos, cell = positions[i], batch.cells[i]
        if strain is not None:
            deform = eye + strain[i]
            pos = pos @ deform
            cell = cell @ deform
        systems.append(System(types=batch.numbers[i], positions=pos, cell=cell, pbc=batch.pbcs[i]))
    neighbors.add(systems)
    return systems, positions, strain
