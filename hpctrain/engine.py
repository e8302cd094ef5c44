"""The shared training engine: what every trainer needs, written once.

An architecture's trainer hands the engine its model (a ``torch.nn.Module``
following metatomic's model interface) and its hypers (a :class:`TrainingHypers`
subclass); the engine owns DDP, the epoch/step loop, the loss over energies, forces
and stress, metrics all-reduced over ranks, the learning-rate schedule, the
composition baseline and rank-0 reporting. Variants override small hooks
(:meth:`Engine.compute_loss`, :meth:`Engine.prepare_model`) instead of copying the loop.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from metatomic.torch import ModelOutput

from . import launch, run
from .config import option
from .data.batch import Batch, collate
from .data.dataset import AtomisticDataset
from .data.sampler import DistributedBatchSampler, shard_for_rank
from .report import MetricsCSV, get_logger
from .systems import NeighborLists, make_systems


@dataclasses.dataclass
class TrainingHypers:
    """Training hypers shared by the reference architectures."""

    num_epochs: int = option(100, doc="Passes over the training set.")
    batch_size: int = option(
        16,
        doc="Structures per optimizer step, summed over all ranks (a global batch), "
        "so that results do not depend on the number of ranks.",
    )
    learning_rate: float = option(1e-3, doc="Peak learning rate of Adam.")
    warmup_epochs: float = option(0.0, doc="Epochs of linear learning-rate warm-up from zero.")
    min_lr_ratio: float = option(
        0.01, doc="Final learning rate of the cosine decay, relative to the peak."
    )
    energy_weight: float = option(1.0, doc="Weight of the per-atom energy error in the loss.")
    forces_weight: float = option(1.0, doc="Weight of the force error in the loss.")
    stress_weight: float = option(1.0, doc="Weight of the stress error in the loss.")
    fit_composition: bool = option(
        True,
        doc="Fit per-element energy offsets by least squares before training, so the "
        "network learns only what composition does not explain.",
    )

    def validate(self, path: str, source: str) -> None:
        from .errors import OptionsError

        for name in ("num_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise OptionsError(f"'{path}.{name}' in {source} must be at least 1")
        if self.learning_rate <= 0:
            raise OptionsError(f"'{path}.learning_rate' in {source} must be positive")


class ConcatDataset:
    """Several datasets with the same targets, indexed as one."""

    def __init__(self, datasets: Sequence[AtomisticDataset]):
        self.datasets = list(datasets)
        self.starts = np.cumsum([0] + [len(d) for d in self.datasets])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, index: int):
        which = int(np.searchsorted(self.starts, index, side="right") - 1)
        return self.datasets[which][index - int(self.starts[which])]

    @property
    def n_atoms(self) -> np.ndarray:
        return np.concatenate([d.n_atoms for d in self.datasets])


def _check_same_targets(datasets: Sequence[AtomisticDataset], what: str) -> None:
    first = datasets[0]
    for other in datasets[1:]:
        if other.info.targets != first.info.targets:
            from .errors import DataError

            raise DataError(
                f"{what} datasets {first.name} and {other.name} provide different "
                "targets or gradients; the reference engine trains on datasets with "
                "identical targets"
            )


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in checkpoints."""

    epoch: int = 0
    step: int = 0
    best_metric: float = math.inf


class Engine:
    """Trains ``model`` on ``train_datasets``; see the module doc."""

    def __init__(
        self,
        hypers: TrainingHypers,
        model: torch.nn.Module,
        device: torch.device,
        train_datasets: Sequence[AtomisticDataset],
        val_datasets: Sequence[AtomisticDataset],
        checkpoint_dir: Path,
        save_checkpoint: Callable[[Path], None],
        state: dict[str, Any] | None = None,
    ):
        self.hypers = hypers
        self.context = run.current()
        self.device = device
        self.dtype = train_datasets[0].dtype
        self.checkpoint_dir = Path(checkpoint_dir)
        self.save_checkpoint = save_checkpoint
        self.log = get_logger()
        _check_same_targets(train_datasets, "training")
        self.train_set = ConcatDataset(train_datasets)
        self.val_sets = list(val_datasets)
        self.targets = dict(model.dataset_info.targets)
        self.model = model.to(device=device, dtype=self.dtype)
        self.neighbors = NeighborLists(model.requested_neighbor_lists())
        self.outputs = {
            name: ModelOutput(unit=t.unit, sample_kind="system") for name, t in self.targets.items()
        }
        self.sampler = DistributedBatchSampler(
            len(self.train_set),
            hypers.batch_size,
            self.context.rank,
            self.context.world_size,
            self.context.seed,
        )
        self.progress = Progress()
        if state is None:
            self.prepare_model()
        self.network: torch.nn.Module = _EnergyModule(self.model, self.outputs)
        if launch.is_distributed():
            # buffers (baseline, type map) are identical on all ranks by construction
            self.network = torch.nn.parallel.DistributedDataParallel(
                self.network,
                device_ids=[device] if device.type == "cuda" else None,
                broadcast_buffers=False,
                gradient_as_bucket_view=True,
            )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=hypers.learning_rate)
        self.steps_per_epoch = len(self.sampler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        if state is not None:
            self.load_state_dict(state)

    # -- hooks ------------------------------------------------------------------------

    def prepare_model(self) -> None:
        """Before the first epoch of a new training: fit the composition baseline."""
        if not self.hypers.fit_composition or not hasattr(self.model, "set_baseline"):
            return
        for name, target in self.targets.items():
            if target.quantity == "energy" and not target.per_atom:
                weights, scale = fit_composition(
                    self.train_set, name, self.model.atomic_types, self.context
                )
                self.model.set_baseline(name, weights, scale)
                self.log.info(
                    f"composition baseline of '{name}': per-atom residual scale "
                    f"{scale:.4g} {target.unit}"
                )

    def compute_loss(
        self, batch: Batch, n_structures: int, n_atoms: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of this rank's share of a global batch, scaled so that the average
        over ranks (what DDP computes) is the loss of the whole global batch."""
        predictions = self.predict(batch, self.network, create_graph=True)
        scale = float(self.context.world_size)
        loss = torch.zeros((), dtype=self.dtype, device=self.device)
        hp = self.hypers
        parts = {}
        for name in self.targets:
            error = (predictions[name] - batch.targets[name]) / batch.n_atoms
            parts[name] = hp.energy_weight * (error**2).sum() / n_structures
            if name in batch.forces:
                error = predictions[f"{name}/forces"] - batch.forces[name]
                parts[f"{name}/forces"] = hp.forces_weight * (error**2).sum() / (3 * n_atoms)
            if name in batch.stress:
                error = predictions[f"{name}/stress"] - batch.stress[name]
                parts[f"{name}/stress"] = hp.stress_weight * (error**2).sum() / (9 * n_structures)
        for part in parts.values():
            loss = loss + part
        return loss * scale, parts

    # -- training ---------------------------------------------------------------------

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_ratio`` at the last step."""
        total = max(1, self.hypers.num_epochs * self.steps_per_epoch)
        warmup = int(self.hypers.warmup_epochs * self.steps_per_epoch)
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        low = self.hypers.min_lr_ratio
        return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))

    def predict(
        self, batch: Batch, network: torch.nn.Module, create_graph: bool
    ) -> dict[str, torch.Tensor]:
        return predict(batch, network, self.neighbors, create_graph)

    def train(self) -> None:
        ctx = self.context
        hp = self.hypers
        n_atoms_all = self.train_set.n_atoms
        csv = MetricsCSV(ctx.run_dir / "metrics.csv") if ctx.is_main and ctx.run_dir else None
        self.log.info(
            f"training: {len(self.train_set)} structures, {self.steps_per_epoch} steps per "
            f"epoch of global batch {hp.batch_size} on {ctx.world_size} rank(s), "
            f"{hp.num_epochs} epochs"
        )
        for epoch in range(self.progress.epoch, hp.num_epochs):
            start = time.perf_counter()
            self.model.train()
            self.sampler.set_epoch(epoch)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            steps = 0
            for step in self.sampler:
                batch = collate([self.train_set[int(i)] for i in step.local], self.device)
                loss, _ = self.compute_loss(
                    batch, len(step.global_), int(n_atoms_all[step.global_].sum())
                )
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.progress.step += 1
                loss_sum += loss.detach().double()
                steps += 1
            launch.all_reduce_sum(loss_sum)
            train_loss = loss_sum.item() / ctx.world_size / max(1, steps)
            self.progress.epoch = epoch + 1
            elapsed = time.perf_counter() - start
            last = epoch + 1 == hp.num_epochs
            if (epoch + 1) % max(1, ctx.logging.every_n_epochs) == 0 or last:
                metrics = self.validate()
                row = {
                    "epoch": epoch + 1,
                    "step": self.progress.step,
                    "learning_rate": self.optimizer.param_groups[0]["lr"],
                    "train_loss": train_loss,
                    **{f"val {k}": v for k, v in metrics.items()},
                    "epoch_time_s": elapsed,
                }
                self.log.info(_format_row(row, hp.num_epochs, len(self.train_set) / elapsed))
                if csv is not None:
                    csv.write(row)
            every = ctx.checkpoint.every_n_epochs
            if every and (epoch + 1) % every == 0 and not last:
                self.write_epoch_checkpoint(epoch + 1)

    def write_epoch_checkpoint(self, epoch: int) -> None:
        """``epoch-N.ckpt`` on rank 0, keeping the newest ``keep_last``."""
        if not self.context.is_main:
            return
        self.save_checkpoint(self.checkpoint_dir / f"epoch-{epoch}.ckpt")
        keep = self.context.checkpoint.keep_last
        old = sorted(
            self.checkpoint_dir.glob("epoch-*.ckpt"), key=lambda p: int(p.stem.split("-")[1])
        )
        for path in old[: max(0, len(old) - keep)]:
            path.unlink()

    def validate(self) -> dict[str, float]:
        """RMSE and MAE per target over all validation sets, exact across ranks."""
        self.model.eval()
        size = max(1, self.hypers.batch_size // self.context.world_size)
        return evaluate(
            lambda batch: self.predict(batch, self.model_forward, create_graph=False),
            self.val_sets,
            self.targets,
            size,
            self.device,
            self.context,
        )

    def model_forward(self, systems):
        return _EnergyModule.run(self.model, self.outputs, systems)

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "progress": dataclasses.asdict(self.progress),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = Progress(**state["progress"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if "sampler" in state:
            self.sampler.load_state_dict(state["sampler"])


class _EnergyModule(torch.nn.Module):
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
    systems, positions, strain = make_systems(batch, neighbors, forces, stress)
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
            results[f"{name}/forces"] = -torch.cat(grads[: len(positions)])
        if name in batch.stress:
            volumes = torch.stack([torch.det(c).abs() for c in batch.cells])
            results[f"{name}/stress"] = grads[-1] / volumes[:, None, None]
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


def metric_label(key: str, targets: dict[str, Any]) -> str:
    """``energy {} [eV/atom]``, ``energy/forces {} [eV/A]``, ... with units."""
    name, _, gradient = key.partition("/")
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
            batch, lambda systems: _EnergyModule.run(model, outputs, systems), neighbors, False
        ),
        datasets,
        targets,
        batch_size,
        device,
        run.current(),
    )


def _reference(batch: Batch, key: str) -> torch.Tensor:
    if key.endswith("/forces"):
        return batch.forces[key[: -len("/forces")]]
    if key.endswith("/stress"):
        return batch.stress[key[: -len("/stress")]]
    return batch.targets[key]


def _format_row(row: dict[str, float], num_epochs: int, rate: float) -> str:
    parts = [f"epoch {row['epoch']:>4}/{num_epochs}", f"loss {row['train_loss']:.4g}"]
    for key, value in row.items():
        if key.startswith("val ") and " RMSE [" in key:
            label, unit = key[4:].split(" RMSE [")
            parts.append(f"{label} RMSE {value:.4g} {unit[:-1]}")
    parts.append(f"lr {row['learning_rate']:.3g}")
    parts.append(f"{row['epoch_time_s']:.2f} s ({rate:.0f} structures/s)")
    return "  ".join(parts)


def fit_composition(
    dataset: ConcatDataset, target: str, atomic_types: list[int], ctx: run.RunContext
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
