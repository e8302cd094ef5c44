"""The composition baseline (per-element energies fitted by least squares) and the
scale of the network's output."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from . import launch, run
from .data.sampler import shard_for_rank
from .data.structures import AtomisticDataset


@dataclasses.dataclass(frozen=True)
class CompositionFit:
    """What one pass over the training set tells about an energy target."""

    weights: torch.Tensor
    """Energy per atom of each element (in the order of ``atomic_types``)."""
    energy_scale: float
    """RMS per-atom energy that the baseline leaves unexplained."""
    forces_scale: float | None
    """RMS force component, or None when the structures carry no forces."""

    @property
    def output_scale(self) -> float:
        """The scale of the network's per-atom output: the RMS force component when
        forces are trained (forces are the output's derivative, and atomic energies
        that vary by about a force times an ångström as an atom moves learn forces
        quickly), else the RMS per-atom residual energy."""
        return self.forces_scale if self.forces_scale else self.energy_scale


def fit_composition(
    dataset: AtomisticDataset, target: str, atomic_types: list[int], ctx: run.RunContext
) -> CompositionFit:
    """Per-element energies by least squares, the RMS per-atom residual and the RMS
    force component (see :class:`CompositionFit`).

    Streams this rank's share of the training set (keeping only each structure's
    element counts) and all-reduces the normal equations, so it works at any scale.
    """
    index = {z: i for i, z in enumerate(atomic_types)}
    n_types = len(atomic_types)
    shares = shard_for_rank(len(dataset), ctx.rank, ctx.world_size)
    normal = torch.zeros(n_types + 1, n_types + 1, dtype=torch.float64)
    forces = torch.zeros(2, dtype=torch.float64)  # sum of squares, components
    counts_cache = []
    for i in shares:
        structure = dataset[int(i)]
        counts = torch.zeros(n_types, dtype=torch.float64)
        for z, c in zip(*np.unique(structure.numbers.numpy(), return_counts=True)):
            counts[index[int(z)]] = float(c)
        energy = float(structure.targets[target][0])
        row = torch.cat([counts, torch.tensor([energy], dtype=torch.float64)])
        normal += torch.outer(row, row)
        counts_cache.append((counts, energy))
        if target in structure.forces:
            values = structure.forces[target].double()
            forces += torch.tensor([float((values**2).sum()), values.numel()])
    launch.all_reduce_sum(normal)
    launch.all_reduce_sum(forces)
    xtx, xty = normal[:n_types, :n_types], normal[:n_types, n_types]
    weights = torch.linalg.pinv(xtx) @ xty
    residual = torch.zeros(2, dtype=torch.float64)
    for counts, energy in counts_cache:
        residual += torch.tensor([((energy - counts @ weights) / counts.sum()) ** 2, 1.0])
    launch.all_reduce_sum(residual)
    energy_scale = math.sqrt(residual[0].item() / max(1.0, residual[1].item()))
    forces_scale = math.sqrt(forces[0].item() / forces[1].item()) if forces[1] > 0 else None
    return CompositionFit(
        weights=weights,
        energy_scale=max(energy_scale, 1e-3),
        forces_scale=max(forces_scale, 1e-3) if forces_scale is not None else None,
    )
