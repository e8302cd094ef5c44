"""Predictions with forces and stress by autograd, and metrics exact across ranks."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from metatomic.torch import ModelOutput

from . import launch, run, timing
from .data.batch import Batch, collate
from .data.dataset import AtomisticDataset
from .data.sampler import shard_for_rank
from .systems import NeighborLists, make_systems


class EnergyModule(torch.nn.Module):
    """The model as DDP sees it: systems in, one energy tensor per target out."""

    def __init__(self, model: torch.nn.Module, outputs: dict[str, ModelOutput]):
        super().__init__()
        self.model = model
        self.outputs = outputs

    @staticmethod
    def run(model, outputs, systems) -> dict[str, torch.Tensor]:
        results = model(systems, outputs, None)
        return {name: results[name].block().values.reshape(-1) for name in outputs}

    def forward(self, systems):
        return self.run(self.model, self.outputs, systems)


def predict(
    batch: Batch, network: Callable, neighbors: NeighborLists, create_graph: bool
) -> dict[str, torch.Tensor]:
    """Energies from ``network(systems)``, and forces/stress by autograd where the
    batch has reference values for them."""
    forces = bool(batch.forces)
    stress = bool(batch.stress)
    with timing.section("systems"):
        systems, positions, strain = make_systems(batch, neighbors, forces, stress)
    with timing.section("forward"):  # the energies and their gradients
        energies = network(systems)
        results = dict(energies)
        inputs = (positions if forces else []) + ([strain] if stress else [])
        for name, energy in energies.items():
            if name not in batch.forces and name not in batch.stress:
                continue
            grads = torch.autograd.grad(
                energy.sum(), inputs, create_graph=create_graph, retain_graph=True
            )
            if name in batch.forces:
                results[f"{name} forces"] = -torch.cat(grads[: len(positions)])
            if name in batch.stress:
                volumes = torch.stack([torch.det(c).abs() for c in batch.cells])
                results[f"{name} stress"] = grads[-1] / volumes[:, None, None]
    return results


@torch.no_grad()
def evaluate(
    predict_batch: Callable[[Batch], dict[str, torch.Tensor]],
    datasets: Sequence[AtomisticDataset],
    targets: dict[str, Any],
    batch_size: int,
    device: torch.device,
    ctx: run.RunContext,
) -> dict[str, float]:
    """RMSE and MAE of every prediction over ``datasets``; each structure is seen by
    exactly one rank and the sums are all-reduced, so the metrics are exact."""
    sums: dict[str, torch.Tensor] = {}
    for dataset in datasets:
        indices = shard_for_rank(len(dataset), ctx.rank, ctx.world_size)
        for i in range(0, len(indices), batch_size):
            batch = collate([dataset[int(j)] for j in indices[i : i + batch_size]], device)
            with torch.enable_grad():
                predictions = predict_batch(batch)
            for key, value in predictions.items():
                reference = _reference(batch, key)
                if key in targets:
                    value, reference = value / batch.n_atoms, reference / batch.n_atoms
                error = (value.detach() - reference).double().reshape(-1)
                acc = sums.setdefault(key, torch.zeros(3, dtype=torch.float64, device=device))
                acc[0] += (error**2).sum()
                acc[1] += error.abs().sum()
                acc[2] += error.numel()
    # a rank may have had no structure at all: agree on the keys first
    keys = sorted(set().union(*launch.all_gather_object(sorted(sums))))
    metrics = {}
    for key in keys:
        total = sums.get(key, torch.zeros(3, dtype=torch.float64, device=device))
        launch.all_reduce_sum(total)
        label = metric_label(key, targets)
        metrics[label.format("RMSE")] = math.sqrt(total[0].item() / total[2].item())
        metrics[label.format("MAE")] = total[1].item() / total[2].item()
    return metrics


def split_key(key: str) -> tuple[str, str]:
    """``"energy/pbe forces"`` -> ``("energy/pbe", "forces")``; ``"energy"`` -> ``("energy", "")``.

    Prediction keys are a target name, then a space and the gradient where it
    applies (target names contain no spaces; they may contain ``/`` variants).
    """
    name, _, gradient = key.partition(" ")
    return name, gradient


def metric_label(key: str, targets: dict[str, Any]) -> str:
    """``energy {} [eV/atom]``, ``energy forces {} [eV/A]``, ... with units."""
    name, gradient = split_key(key)
    unit = targets[name].unit
    suffix = {"": "/atom", "forces": "/A", "stress": "/A^3"}[gradient]
    return f"{key} {{}} [{unit}{suffix}]"


def evaluate_model(
    model: torch.nn.Module,
    targets: dict[str, Any],
    datasets: Sequence[AtomisticDataset],
    device: torch.device,
    batch_size: int = 16,
) -> dict[str, float]:
    """Metrics of any model following metatomic's model interface on ``datasets``
    (e.g. the test set after training), distributed over the ranks."""
    model = model.to(device).eval()
    outputs = {name: ModelOutput(unit=t.unit, sample_kind="system") for name, t in targets.items()}
    neighbors = NeighborLists(model.requested_neighbor_lists())
    return evaluate(
        lambda batch: predict(
            batch, lambda systems: EnergyModule.run(model, outputs, systems), neighbors, False
        ),
        datasets,
        targets,
        batch_size,
        device,
        run.current(),
    )


def _reference(batch: Batch, key: str) -> torch.Tensor:
    name, gradient = split_key(key)
    if gradient == "forces":
        return batch.forces[name]
    if gradient == "stress":
        return batch.stress[name]
    return batch.targets[name]
