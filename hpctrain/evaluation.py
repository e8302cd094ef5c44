"""Predictions with forces and stress by autograd, and metrics exact across ranks."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from metatomic.torch import AtomisticModel, ModelEvaluationOptions, ModelOutput

from . import launch, run, timing
from .data.batch import Batch, pair_vectors
from .data.loader import BatchLoader
from .data.sampler import shard_for_rank
from .data.structures import AtomisticDataset
from .systems import NeighborLists, make_systems


class EnergyModule(torch.nn.Module):
    """The model as DDP sees it: a batch and its geometry leaves in, the energy of
    every structure per target out.

    A model with a batch core (``forward_batch(batch, vectors)``, as hpctrain's
    reference models have) computes on the batch's tensors, with pair vectors made
    on the device from positions, cells and cell shifts; any other model (one with
    metatomic's interface alone) gets one metatomic ``System`` per structure, with
    its neighbour lists, as an MD engine would give them.

    :param batched: force one path (None: the batch core where the model has one)
    """

    def __init__(
        self, model: torch.nn.Module, outputs: dict[str, ModelOutput], batched: bool | None = None
    ):
        super().__init__()
        self.model = model
        self.outputs = outputs
        self.batched = hasattr(model, "forward_batch") if batched is None else batched
        self.neighbors = None if self.batched else NeighborLists(model.requested_neighbor_lists())

    def forward(
        self, batch: Batch, positions: torch.Tensor, strain: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        if self.batched:
            vectors = [pair_vectors(p, positions, strain) for p in batch.pairs]
            energies = self.model.forward_batch(batch, vectors)
            return {name: energies[name] for name in self.outputs}
        systems = make_systems(batch, positions, strain, self.neighbors)
        results = self.model(systems, self.outputs, None)
        return {name: results[name].block().values.reshape(-1) for name in self.outputs}


Network = Callable[[Batch, torch.Tensor, "torch.Tensor | None"], dict[str, torch.Tensor]]


def predict(batch: Batch, network: Network, create_graph: bool) -> dict[str, torch.Tensor]:
    """Energies from ``network(batch, positions, strain)``, and forces/stress by
    autograd where the batch has reference values for them."""
    forces = bool(batch.forces)
    stress = bool(batch.stress)
    positions = batch.positions.detach().requires_grad_(forces)
    strain = None
    if stress:
        strain = torch.zeros(
            len(batch), 3, 3, dtype=positions.dtype, device=positions.device, requires_grad=True
        )
    with timing.section("forward"):  # the energies and their gradients
        energies = network(batch, positions, strain)
        results = dict(energies)
        inputs = ([positions] if forces else []) + ([strain] if stress else [])
        for name, energy in energies.items():
            if name not in batch.forces and name not in batch.stress:
                continue
            grads = torch.autograd.grad(
                energy.sum(), inputs, create_graph=create_graph, retain_graph=True
            )
            if name in batch.forces:
                results[f"{name} forces"] = -grads[0]
            if name in batch.stress:
                volumes = torch.linalg.det(batch.cells).abs()
                # (a structure that is not periodic has no stress, and no NaN gradients)
                volumes = torch.where(volumes > 0, volumes, torch.ones_like(volumes))
                results[f"{name} stress"] = grads[-1] / volumes[:, None, None]
    return results


class ErrorSums:
    """Squared and absolute errors of predictions, summed per metric on this rank.

    :meth:`metrics` all-reduces the sums, so that every rank gets the exact metrics
    of all structures. Energies count per atom (``energy RMSE [eV/atom]``) and, with
    ``totals``, per structure as well (``energy RMSE [eV]``).
    """

    def __init__(self, targets: dict[str, Any], device: torch.device, totals: bool = False):
        self.targets = targets
        self.device = device
        self.totals = totals
        self.sums: dict[tuple[str, bool], torch.Tensor] = {}

    def _add(self, key: str, total: bool, error: torch.Tensor, count: Any) -> None:
        error = error.detach().double().reshape(-1)
        acc = self.sums.get((key, total))
        if acc is None:
            acc = torch.zeros(3, dtype=torch.float64, device=self.device)
            self.sums[(key, total)] = acc
        acc[:2] += torch.stack([(error**2).sum(), error.abs().sum()])
        acc[2] += count

    def add(self, batch: Batch, predictions: dict[str, torch.Tensor]) -> None:
        """Errors of ``predictions`` (as :func:`predict` returns them) on ``batch``;
        nothing is read from the device."""
        for key, value in predictions.items():
            reference = reference_of(batch, key)
            if reference is None:
                continue  # (a target that these structures' set does not carry)
            error = value.detach() - reference
            # only the labelled values: a structure without a stress, or of a set
            # without this target or its forces, has NaN in their place
            known = torch.isfinite(error).reshape(len(error), -1).all(dim=1)
            error = torch.where(known.reshape(-1, *[1] * (error.dim() - 1)), error, 0.0)
            count: Any = known.sum() * (error[0].numel() if len(error) else 0)
            if key in self.targets:
                if self.totals:
                    self._add(key, True, error, count)
                error = error / batch.n_atoms
            self._add(key, False, error, count)

    def metrics(self) -> dict[str, float]:
        """RMSE and MAE of everything added on any rank (a collective: every rank calls)."""
        # a rank may have had no structure at all: agree on the keys first
        keys = sorted(set().union(*map(tuple, launch.all_gather_object(sorted(self.sums)))))
        metrics = {}
        for key, total in keys:
            sums = self.sums.get(
                (key, total), torch.zeros(3, dtype=torch.float64, device=self.device)
            )
            launch.all_reduce_sum(sums)
            if sums[2].item() == 0:
                continue  # (a stress that no structure of these sets has)
            label = metric_label(key, self.targets, total)
            metrics[label.format("RMSE")] = math.sqrt(sums[0].item() / sums[2].item())
            metrics[label.format("MAE")] = sums[1].item() / sums[2].item()
        return metrics


BatchCallback = Callable[[int, np.ndarray, Batch, dict[str, torch.Tensor]], None]


@torch.no_grad()
def evaluate(
    predict_batch: Callable[[Batch], dict[str, torch.Tensor]],
    datasets: Sequence[AtomisticDataset],
    targets: dict[str, Any],
    batch_size: int,
    device: torch.device,
    ctx: run.RunContext,
    requests: Sequence = (),
    totals: bool = False,
    on_batch: BatchCallback | None = None,
    workers: int = 0,
    each_set: bool = False,
) -> dict[str, float]:
    """RMSE and MAE of every prediction over ``datasets``; each structure is seen by
    exactly one rank and the sums are all-reduced, so the metrics are exact.

    :param requests: the neighbour lists the batches carry (the model's requests)
    :param totals: also report energies per structure, not only per atom
    :param on_batch: called as ``on_batch(dataset_index, indices, batch, predictions)``
        after each batch of this rank (``indices``: positions in that dataset)
    :param workers: loader threads preparing the next batches
    :param each_set: with several datasets, also the metrics of each, as
        ``[i] energy RMSE [eV/atom]`` for dataset ``i``
    """
    errors = ErrorSums(targets, device, totals)
    several = each_set and len(datasets) > 1
    per_set = [ErrorSums(targets, device, totals) for _ in datasets] if several else []
    for number, dataset in enumerate(datasets):
        indices = shard_for_rank(len(dataset), ctx.rank, ctx.world_size)
        chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
        loader = BatchLoader(dataset, requests, device, workers)
        with contextlib.closing(loader.batches([[c] for c in chunks])) as batches:
            for chunk, (batch,) in zip(chunks, batches):
                with torch.enable_grad():
                    predictions = predict_batch(batch)
                errors.add(batch, predictions)
                if per_set:
                    per_set[number].add(batch, predictions)
                if on_batch is not None:
                    on_batch(number, chunk, batch, predictions)
    metrics = errors.metrics()
    for number, sums in enumerate(per_set):
        metrics.update({f"[{number}] {key}": value for key, value in sums.metrics().items()})
    return metrics


def split_key(key: str) -> tuple[str, str]:
    """``"energy/pbe forces"`` -> ``("energy/pbe", "forces")``; ``"energy"`` -> ``("energy", "")``.

    Prediction keys are a target name, then a space and the gradient where it
    applies (target names contain no spaces; they may contain ``/`` variants).
    """
    name, _, gradient = key.partition(" ")
    return name, gradient


def display_name(key: str) -> str:
    """What messages and metrics call a prediction: ``forces`` and ``stress`` for the
    gradients of ``energy``; other targets keep their name (``energy/pbe forces``)."""
    name, gradient = split_key(key)
    return gradient if gradient and name == "energy" else key


def metric_label(key: str, targets: dict[str, Any], total: bool = False) -> str:
    """``energy {} [eV/atom]``, ``forces {} [eV/A]``, ``stress {} [eV/A^3]`` with units;
    ``energy {} [eV]`` for the energy per structure (``total``)."""
    name, gradient = split_key(key)
    unit = targets[name].unit
    suffix = "" if total else {"": "/atom", "forces": "/A", "stress": "/A^3"}[gradient]
    return f"{display_name(key)} {{}} [{unit}{suffix}]"


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
    network = EnergyModule(model, outputs)
    return evaluate(
        lambda batch: predict(batch, network, False),
        datasets,
        targets,
        batch_size,
        device,
        run.current(),
        model.requested_neighbor_lists() if network.batched else (),
    )


def evaluate_exported_model(
    model: AtomisticModel,
    targets: dict[str, Any],
    datasets: Sequence[AtomisticDataset],
    device: torch.device,
    batch_size: int = 16,
    totals: bool = True,
    on_batch: BatchCallback | None = None,
) -> dict[str, float]:
    """Metrics of an exported model (``model.pt``, loaded with metatomic) on
    ``datasets``, distributed over the ranks of :func:`run.current`.

    The model runs as an MD engine runs it: through ``AtomisticModel.forward`` with
    positions in angstrom, in the model's dtype, forces and stress by autograd. The
    reference values stay in the datasets' dtype.
    """
    model = model.to(device).eval()
    dtype = DTYPES[model.capabilities().dtype]
    options = ModelEvaluationOptions(
        length_unit="angstrom",
        outputs={
            name: ModelOutput(unit=t.unit, sample_kind="system") for name, t in targets.items()
        },
    )
    neighbors = NeighborLists(model.requested_neighbor_lists())

    def network(batch, positions, strain):
        systems = make_systems(batch, positions, strain, neighbors)
        results = model(systems, options, check_consistency=False)
        return {name: results[name].block().values.reshape(-1) for name in targets}

    return evaluate(
        lambda batch: predict(batch.to_dtype(dtype), network, False),
        datasets,
        targets,
        batch_size,
        device,
        run.current(),
        totals=totals,
        on_batch=on_batch,
    )


DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16}


def reference_of(batch: Batch, key: str) -> torch.Tensor | None:
    """The reference values in ``batch`` of a prediction key (``energy forces``, ...),
    or None when the batch has none."""
    name, gradient = split_key(key)
    references = {"forces": batch.forces, "stress": batch.stress}.get(gradient, batch.targets)
    return references.get(name)
