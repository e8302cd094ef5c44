"""The composition baseline (per-element energies fitted by least squares before
training, and refitted after it on what the trained network leaves) and the scale of
the network's output."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from . import launch, run
from .data.batch import Batch
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
    stress_scale: float | None = None
    """RMS stress component over the structures with a stress, or None without any."""
    volume_per_atom: float | None = None
    """Mean cell volume per atom of the structures with a stress (Å³), or None."""
    mean_fractions: torch.Tensor | None = None
    """Mean fraction of each element in a structure (in the order of ``atomic_types``)."""

    def offset(self, weights: torch.Tensor) -> float:
        """How far another baseline (per-element ``weights``) is from this one, per atom,
        on the training set's mean composition."""
        if self.mean_fractions is None:
            return 0.0
        difference = weights.double().cpu() - self.weights.double()
        return abs(float(self.mean_fractions @ difference))

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
    force and stress components (see :class:`CompositionFit`).

    Streams this rank's share of the training set (keeping only each structure's
    element counts) and all-reduces the normal equations, so it works at any scale.
    The RMS values are exactly rounded sums (:func:`math.fsum`) of every structure's
    part, the same on any number of ranks.
    """
    index = {z: i for i, z in enumerate(atomic_types)}
    n_types = len(atomic_types)
    shares = shard_for_rank(len(dataset), ctx.rank, ctx.world_size)
    normal = torch.zeros(n_types + 1, n_types + 1, dtype=torch.float64)
    fractions = torch.zeros(n_types + 1, dtype=torch.float64)  # (and the structures)
    counts_cache = []
    parts = []  # per structure: (force sum of squares, components, stress ..., ...)
    for i in shares:
        structure = dataset[int(i)]
        energy = float(structure.targets[target][0])
        if not math.isfinite(energy):
            continue  # (a structure of a training set without this target)
        counts = torch.zeros(n_types, dtype=torch.float64)
        for z, c in zip(*np.unique(structure.numbers.numpy(), return_counts=True)):
            counts[index[int(z)]] = float(c)
        row = torch.cat([counts, torch.tensor([energy], dtype=torch.float64)])
        normal += torch.outer(row, row)
        fractions[:n_types] += counts / counts.sum()
        fractions[n_types] += 1
        counts_cache.append((counts, energy))
        stress = _sum_of_squares(structure.stress.get(target))
        volume = abs(float(torch.det(structure.cell.double()))) / len(structure.numbers)
        parts.append(
            _sum_of_squares(structure.forces.get(target))
            + stress
            + ((volume, 1) if stress[1] else (0.0, 0))
        )
    launch.all_reduce_sum(normal)
    launch.all_reduce_sum(fractions)
    xtx, xty = normal[:n_types, :n_types], normal[:n_types, n_types]
    weights = torch.linalg.pinv(xtx) @ xty
    residuals = [
        float((energy - counts @ weights) / counts.sum()) ** 2 for counts, energy in counts_cache
    ]
    gathered = launch.all_gather_object((parts, residuals))
    parts = [p for rank_parts, _ in gathered for p in rank_parts]
    residuals = [r for _, rank_residuals in gathered for r in rank_residuals]
    energy_scale = math.sqrt(math.fsum(residuals) / max(1, len(residuals)))
    forces_scale = _rms([p[0] for p in parts], [p[1] for p in parts])
    stress_scale = _rms([p[2] for p in parts], [p[3] for p in parts])
    stressed = sum(p[5] for p in parts)
    volume_per_atom = math.fsum(p[4] for p in parts) / stressed if stressed else None
    return CompositionFit(
        weights=weights,
        energy_scale=max(energy_scale, 1e-3),
        forces_scale=max(forces_scale, 1e-3) if forces_scale is not None else None,
        stress_scale=max(stress_scale, 1e-6) if stress_scale is not None else None,
        volume_per_atom=volume_per_atom,
        mean_fractions=fractions[:n_types] / max(1.0, float(fractions[n_types])),
    )


def _sum_of_squares(values: torch.Tensor | None) -> tuple[float, int]:
    """Sum of squares and number of the finite values (a structure without a label
    holds NaN in its place)."""
    if values is None:
        return (0.0, 0)
    values = values.double()
    values = values[torch.isfinite(values)]
    return (float((values**2).sum()), values.numel())


def _rms(squares: list[float], counts: list[int]) -> float | None:
    n = sum(counts)
    return math.sqrt(math.fsum(squares) / n) if n else None


@dataclasses.dataclass(frozen=True)
class ResidualFit:
    """What a trained model leaves of the energies of a set of structures, per atom
    (as the loss counts energies), as normal equations over the element fractions:
    ``normal`` is ``[F r]^T [F r]`` for F the fraction of each element in each
    structure and r the per-atom residual (reference minus prediction), summed over
    every rank."""

    normal: torch.Tensor
    fraction_sums: torch.Tensor
    structures: int

    def change(self) -> torch.Tensor:
        """The change of the per-element energies that fits the residuals by least
        squares."""
        n = len(self.fraction_sums)
        return torch.linalg.pinv(self.normal[:n, :n]) @ self.normal[:n, n]

    def rmse(self, change: torch.Tensor | None = None) -> float:
        """The per-atom energy RMSE after ``change`` of the per-element energies."""
        n = len(self.fraction_sums)
        squares = self.normal[n, n]
        if change is not None:
            squares = (
                squares - 2 * change @ self.normal[:n, n] + change @ self.normal[:n, :n] @ change
            )
        return math.sqrt(max(0.0, float(squares)) / max(1, self.structures))

    def per_atom(self, change: torch.Tensor) -> float:
        """``change`` per atom on the mean composition of the structures."""
        return float(self.fraction_sums @ change) / max(1, self.structures)


@torch.no_grad()
def residual_fits(
    energies: Callable[[Batch], dict[str, torch.Tensor]],
    batches: Iterable[Batch],
    targets: list[str],
    atomic_types: list[int],
) -> dict[str, ResidualFit]:
    """The :class:`ResidualFit` of each energy target over ``batches`` (this rank's
    share of a set; the sums are all-reduced, so every rank calls it).

    Fitted on the training set after training, the change refits the composition
    baseline: forces and stress do not see these constants, and as an energy term that
    weighs little beside forces pulls them back only weakly, they drift while the
    network trains. The change never raises the training set's energy error and
    changes no force or stress.

    :param energies: the model's energy per structure of each target for a batch
    """
    n_types = len(atomic_types)
    lookup = torch.full((max(atomic_types) + 1,), -1, dtype=torch.long)
    lookup[torch.tensor(atomic_types)] = torch.arange(n_types)
    normal = {name: torch.zeros(n_types + 1, n_types + 1, dtype=torch.float64) for name in targets}
    sums = {name: torch.zeros(n_types + 1, dtype=torch.float64) for name in targets}
    for batch in batches:
        predicted = energies(batch)
        types = lookup[batch.types.cpu().long()]
        counts = torch.zeros(len(batch), n_types, dtype=torch.float64)
        counts.index_put_(
            (batch.system.cpu(), types), torch.ones(len(types), dtype=torch.float64), True
        )
        for name in targets:
            if name not in batch.targets:
                continue
            residual = batch.targets[name].cpu().double() - predicted[name].cpu().double()
            known = torch.isfinite(residual)
            rows = torch.cat([counts, residual.unsqueeze(1)], dim=1)[known]
            rows = rows / rows[:, :n_types].sum(1, True)
            normal[name] += rows.T @ rows
            sums[name][:n_types] += rows[:, :n_types].sum(0)
            sums[name][n_types] += len(rows)
    fits = {}
    for name in targets:
        launch.all_reduce_sum(normal[name])
        launch.all_reduce_sum(sums[name])
        fits[name] = ResidualFit(normal[name], sums[name][:n_types], int(sums[name][n_types]))
    return fits
