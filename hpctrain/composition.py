"""The composition baseline: per-element energies fitted by least squares."""

from __future__ import annotations

import math

import numpy as np
import torch

from . import launch, run
from .data.dataset import AtomisticDataset
from .data.sampler import shard_for_rank


def fit_composition(
    dataset: AtomisticDataset, target: str, atomic_types: list[int], ctx: run.RunContext
) -> tuple[torch.Tensor, float]:
    """Per-element energies by least squares, and the RMS per-atom residual.

    Streams this rank's share of the training set (keeping only each structure's
    element counts) and all-reduces the normal equations, so it works at any scale.
    """
    index = {z: i for i, z in enumerate(atomic_types)}
    n_types = len(atomic_types)
    shares = shard_for_rank(len(dataset), ctx.rank, ctx.world_size)
    normal = torch.zeros(n_types + 1, n_types + 1, dtype=torch.float64)
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
    launch.all_reduce_sum(normal)
    xtx, xty = normal[:n_types, :n_types], normal[:n_types, n_types]
    weights = torch.linalg.pinv(xtx) @ xty
    residual = torch.zeros(2, dtype=torch.float64)
    for counts, energy in counts_cache:
        residual += torch.tensor([((energy - counts @ weights) / counts.sum()) ** 2, 1.0])
    launch.all_reduce_sum(residual)
    scale = math.sqrt(residual[0].item() / max(1.0, residual[1].item()))
    return weights, max(scale, 1e-3)
