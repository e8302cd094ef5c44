"""Batches of structures as lists of tensors on a device (:func:`collate`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from .structures import Structure


@dataclasses.dataclass
class Batch:
    """Several structures, concatenated per atom, on one device.

    ``targets[name]`` is ``[n_structures]`` (or ``[n_atoms]`` per atom),
    ``forces[name]`` is ``[n_atoms, 3]``, ``stress[name]`` is ``[n_structures, 3, 3]``.
    """

    numbers: list[torch.Tensor]
    positions: list[torch.Tensor]
    cells: list[torch.Tensor]
    pbcs: list[torch.Tensor]
    n_atoms: torch.Tensor
    targets: dict[str, torch.Tensor]
    forces: dict[str, torch.Tensor]
    stress: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return len(self.numbers)


def collate(structures: Sequence[Structure], device: torch.device | None = None) -> Batch:
    """Stack structures into a batch on ``device``."""

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors).to(device)

    first = structures[0]
    return Batch(
        numbers=[s.numbers.to(device) for s in structures],
        positions=[s.positions.to(device) for s in structures],
        cells=[s.cell.to(device) for s in structures],
        pbcs=[s.pbc.to(device) for s in structures],
        n_atoms=torch.tensor([len(s.numbers) for s in structures], device=device),
        targets={k: cat([s.targets[k] for s in structures]) for k in first.targets},
        forces={k: cat([s.forces[k] for s in structures]) for k in first.forces},
        stress={k: torch.stack([s.stress[k] for s in structures]).to(device) for k in first.stress},
    )
