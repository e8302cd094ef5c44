"""The shared training engine: what every trainer needs, written once.

An architecture's trainer hands the engine its model (a ``torch.nn.Module``
following metatomic's model interface) and its hypers (a :class:`TrainingHypers`
subclass); the engine owns DDP, the epoch/step loop, the loss over energies, forces
and stress, metrics all-reduced over ranks, the learning-rate schedule, the
composition baseline and rank-0 reporting. Variants override small hooks
(:meth:`Engine.compute_loss`, :meth:`Engine.prepare_model`) instead of copying the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from metatomic.torch import ModelOutput, NeighborListOptions

from . import checkpoint, finetune, launch, run, timing
from .agreement import Agreed, StepAgreement
from .architecture import DatasetInfo
from .composition import CompositionFit, fit_composition
from .data.batch import Batch
from .data.loader import BatchLoader, default_workers
from .data.sampler import DistributedBatchSampler, StepIndices, work_estimates
from .data.structures import AtomisticDataset, ConcatDataset, labels_of
from .ddp import wrap_ddp
from .epoch_report import EpochReporter
from .errors import CheckpointError, OptionsError, Preempted, TrainingDiverged
from .evaluation import EnergyModule, evaluate, predict, split_key
from .hypers import TrainingHypers
from .loss import Loss
from .optim import ExponentialMovingAverage, LearningRate, make_adam
from .report import get_logger
from .training_sets import batch_in_words, check_datasets, mixture_of


class EngineModel(Protocol):
    """What the engine needs of a model: metatomic's model interface
    (``forward(systems, outputs, selected_atoms)``, ``requested_neighbor_lists()``),
    the :class:`~hpctrain.architecture.DatasetInfo` it was built for, and parameters.
    ``set_baseline(composition, scale)``, where a model has it, receives the
    composition baseline before a new training (:meth:`Engine.prepare_model`)."""

    dataset_info: DatasetInfo

    def requested_neighbor_lists(self) -> list[NeighborListOptions]: ...

    def parameters(self) -> Iterator[torch.nn.Parameter]: ...


@dataclasses.dataclass
class Progress:
    """Where training stands; saved in checkpoints."""

    epoch: int = 0
    step: int = 0
    best_metric: float = math.inf
    validations_without_improvement: int = 0  # (early stopping's count)
    baseline_refit: bool = False  # (after the last step: refit.refit_baselines)


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
        check_datasets(hypers, self.context.world_size, train_datasets)
        self.train_set = ConcatDataset(train_datasets)
        self.n_atoms = self.train_set.n_atoms  # (per structure: the batches by atoms)
        self.val_sets = list(val_datasets)
        self.targets = dict(model.dataset_info.targets)
        self.model = model.to(device=device, dtype=self.dtype)
        requests = model.requested_neighbor_lists()
        self.outputs = {
            name: ModelOutput(unit=t.unit, sample_kind="system") for name, t in self.targets.items()
        }
        self.energies = EnergyModule(self.model, self.outputs)
        # (the System path computes its own neighbour lists, with autograd)
        self.requests = requests if self.energies.batched else []
        self.loader, self.sampler = self.make_data(train_datasets, requests)
        self.progress = Progress()
        self.best: dict[str, Any] | None = None  # the weights of the best validation
        self.loss = self.make_loss(state is None)
        # per loss term and structure, its labelled values (the counts of a step)
        self.labelled = {t: self.train_set.label_counts(*split_key(t)) for t in self.loss.scales}
        self.network: torch.nn.Module = self.energies
        if launch.is_distributed():
            self.network = wrap_ddp(self.network, device)
        if hypers.mixed_precision and device.type != "cuda":
            raise OptionsError(
                "'architecture.training.mixed_precision' needs a CUDA device; this run "
                f"trains on {device.type}"
            )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = make_adam(trainable, hypers.learning_rate)
        self.steps_per_epoch = len(self.sampler)
        self.lr = self.make_learning_rate()
        self.ema = (
            ExponentialMovingAverage(self.model, hypers.ema_decay) if hypers.ema_decay else None
        )
        self.agreement = StepAgreement(self.context.world_size)
        self.agreed = Agreed()  # what the ranks agreed after the last step
        self.checkpoints = self.make_checkpoints()
        if state is not None:
            self.load_state_dict(state)
            self.load_rank_state()

    def make_data(self, train_datasets: Sequence[AtomisticDataset], requests: list) -> tuple:
        """The loader of the training batches and the sampler of their structures."""
        hp, ctx = self.hypers, self.context
        self.workers = default_workers(self.device) if hp.num_workers is None else hp.num_workers
        loader = BatchLoader(
            self.train_set,
            self.requests,
            self.device,
            self.workers,
            loss_weights=self.train_set.loss_weights,
        )
        sampler = DistributedBatchSampler(
            len(self.train_set),
            hp.batch_size,
            ctx.rank,
            ctx.world_size,
            ctx.seed,
            costs=self.work_estimates(max((r.cutoff for r in requests), default=0.0)),
            max_atoms=hp.max_atoms_per_batch,
            n_atoms=self.n_atoms,
            mixture=mixture_of(train_datasets),
        )
        return loader, sampler

    def make_learning_rate(self) -> LearningRate:
        hp = self.hypers
        return LearningRate(
            self.optimizer,
            hp.learning_rate,
            hp.scheduler,
            total_steps=hp.num_epochs * self.steps_per_epoch,
            warmup_steps=int(hp.warmup_epochs * self.steps_per_epoch),
            min_ratio=hp.min_lr_ratio,
            patience=hp.plateau_patience,
        )

    def make_checkpoints(self) -> checkpoint.CheckpointManager | None:
        """The run's step checkpoints, on the schedule of the ``checkpoint`` options
        (none without a run directory)."""
        ctx = self.context
        if ctx.run_dir is None:
            return None
        options = ctx.checkpoint
        return checkpoint.CheckpointManager(
            self.checkpoint_dir / "checkpoints",
            ctx.rank,
            ctx.world_size,
            options.keep_last,
            options.keep_best,
            launch.barrier,
            checkpoint.Schedule(
                options.every_n_epochs, options.every_n_steps, options.every_minutes
            ),
        )

    # -- hooks ------------------------------------------------------------------------

    def work_estimates(self, cutoff: float) -> np.ndarray | None:
        """Relative cost of each training structure, by which global batches are
        shared among ranks (None: every ``world_size``-th structure); by default
        atoms and estimated neighbour pairs within the model's largest cutoff."""
        if self.context.world_size == 1:
            return None
        return work_estimates(self.train_set.n_atoms, self.train_set.volumes, cutoff)

    def make_loss(self, new: bool) -> Loss:
        """The loss of every term the training set has labels for. A new training
        measures its scales (one pass over the training set, which also fits the
        composition baseline: :meth:`prepare_model`); a resumed one loads them."""
        hp = self.hypers
        terms = sorted(set().union(*map(labels_of, self.train_set.datasets)))
        weights = {"": hp.energy_weight, "forces": hp.forces_weight, "stress": hp.stress_weight}
        delta = hp.huber_delta if hp.loss == "huber" else None
        keys = [f"{name} {gradient}" if gradient else name for name, gradient in terms]
        if not new:
            return Loss(dict.fromkeys(keys, 1.0), weights, delta)  # (scales: the state's)
        fits = self.measure_targets()
        self.prepare_model(fits)
        loss = Loss.measured(fits, keys, weights, delta, hp.loss_scales == "rms")
        self.log.info(f"loss: {loss.describe(self.targets)}")
        return loss

    def measure_targets(self) -> dict[str, CompositionFit]:
        """One pass over the training set per energy target it labels (a fine-tuned
        model may have others): its composition fit and the scales of its energies,
        forces and stress."""
        types = getattr(self.model, "atomic_types", self.model.dataset_info.atomic_types)
        labelled = {name for d in self.train_set.datasets for name in d.info.targets}
        return {
            name: fit_composition(self.train_set, name, list(types), self.context)
            for name, target in self.targets.items()
            if target.quantity == "energy" and not target.per_atom and name in labelled
        }

    def load_loss_state(self, state: dict[str, Any] | None) -> None:
        """The loss scales of the checkpoint; measured now for a checkpoint written
        before hpctrain kept them (the loss then differs from the one it trained)."""
        if state is not None:
            self.loss.load_state_dict(state)
            return
        hp = self.hypers
        fits = self.measure_targets()
        self.loss = Loss.measured(
            fits,
            list(self.loss.scales),
            self.loss.weights,
            self.loss.huber_delta,
            hp.loss_scales == "rms",
        )
        self.log.warning(
            "the checkpoint holds no loss scales (an older hpctrain wrote it): measured "
            f"them on this training set: {self.loss.describe(self.targets)}"
        )

    def prepare_model(self, fits: dict[str, CompositionFit]) -> None:
        """Before the first epoch of a new training: set the composition baseline of
        each energy target (``fits``) in the model."""
        if not self.hypers.fit_composition or not hasattr(self.model, "set_baseline"):
            return
        tuned = self.hypers.finetune
        pretrained = finetune.pretrained_targets(tuned) if tuned else set()
        for name, fit in fits.items():
            unit = self.targets[name].unit
            if name in pretrained and tuned.composition == "keep":
                self.log.info(f"composition baseline of '{name}': the pretrained model's")
                finetune.check_kept_baseline(name, fit, self.model, unit)
                continue
            scale = None if name in pretrained else fit.output_scale
            self.model.set_baseline(name, fit.weights, scale)
            self.log.info(
                f"composition baseline of '{name}': per-atom residual "
                f"{fit.energy_scale:.4g} {unit}; network output scale "
                + (f"{fit.output_scale:.4g} {unit}" if scale else "the pretrained model's")
            )

    def compute_loss(
        self, batch: Batch, counts: dict[str, int]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of this rank's share of a global batch, scaled so that the average
        over ranks (what DDP computes) is the loss of the whole global batch.

        :param counts: per loss term, the labelled values behind it in the whole
            global batch: structures with the energy, atoms with forces, structures
            with a stress
        """
        predictions = self.predict(batch, self.network, create_graph=True)
        loss, parts = self.loss(predictions, batch, counts)
        return loss * float(self.context.world_size), parts

    # -- training ---------------------------------------------------------------------

    def predict(
        self, batch: Batch, network: torch.nn.Module, create_graph: bool
    ) -> dict[str, torch.Tensor]:
        return predict(batch, network, create_graph)

    def micro_batches(self, local: np.ndarray) -> list[np.ndarray]:
        """This rank's share of a global batch split into ``accumulation_steps``
        micro-batches (indices in the training set)."""
        return [c for c in np.array_split(local, self.hypers.accumulation_steps) if len(c)]

    def step_batches(self, local: np.ndarray) -> list[Batch]:
        """The micro-batches of ``local``, made now (the loop has them made ahead)."""
        return [self.loader.make(c).to(self.device) for c in self.micro_batches(local)]

    def train_step(self, global_: np.ndarray, batches: list[Batch]) -> torch.Tensor:
        """One optimizer step on this rank's share of the global batch ``global_``
        (indices in the training set), as micro-batches ``batches``
        (:meth:`micro_batches`); returns its loss, on the device.

        Gradients are synchronised across ranks only on the last micro-batch. Before
        the weights change, the ranks agree on whether the loss is finite (else nothing
        is updated and :class:`TrainingDiverged` is raised) and on pending stop signals
        and time-based checkpoints, acted on after the step. That small all-reduce starts before the
        last backward pass and overlaps it.
        """
        hp = self.hypers
        counts = {term: int(labelled[global_].sum()) for term, labelled in self.labelled.items()}
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = last or not hasattr(self.network, "no_sync")
            with contextlib.nullcontext() if sync else self.network.no_sync():
                with self.autocast():
                    loss, _ = self.compute_loss(batch, counts)
                total += loss.detach().double()
                if last:
                    with timing.section("agree"):
                        agreement = self.start_agreement(total)
                with timing.section("backward"):
                    loss.backward()
        with timing.section("agree"):
            self.agreed = self.finish_agreement(agreement)
        if self.agreed.nonfinite:
            if self.checkpoints is not None:
                self.checkpoints.finish()  # a pending checkpoint holds a good state
            raise TrainingDiverged(
                f"the loss became NaN or infinite at step {self.progress.step + 1} (epoch "
                f"{self.progress.epoch + 1}); the weights were not updated and no checkpoint "
                f"of this state was written. Last good checkpoint: {self.last_checkpoint()}. "
                "Lower the learning rate, set grad_clip, or check the data for outliers."
            )
        with timing.section("optimizer"):
            if hp.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), hp.grad_clip)
            self.optimizer.step()
            self.lr.step()
            if self.ema is not None:
                self.ema.update()
        self.progress.step += 1
        return total

    def start_agreement(self, loss: torch.Tensor) -> launch.PendingSum:
        """Start the step's agreement between ranks (:mod:`hpctrain.agreement`): this
        rank's non-finite loss, due checkpoint, flushed checkpoint files and stop
        signal."""
        checkpoints, stop = self.checkpoints, self.context.stop
        return self.agreement.start(
            loss,
            due=checkpoints is not None and checkpoints.time_due(),
            flushed=checkpoints is not None and checkpoints.flushed(),
            received=stop.received if stop is not None else None,
        )

    def finish_agreement(self, pending: launch.PendingSum) -> Agreed:
        """Wait for the agreement; commit the pending checkpoint once every rank's
        files of it are on disk."""
        agreed = self.agreement.finish(pending)
        if agreed.flushed and self.checkpoints is not None and self.checkpoints.pending is not None:
            self.checkpoints.commit()
        return agreed

    def autocast(self):
        if self.hypers.mixed_precision:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train(self) -> None:
        """The epochs left to train, each followed by validation and a checkpoint as
        scheduled; the reports are closed whatever ends it."""
        hp, progress = self.hypers, self.progress
        report = EpochReporter(self.context, hp.num_epochs, self.steps_per_epoch, progress.step)
        try:
            within = self.sampler.consumed if self.sampler.epoch == progress.epoch else 0
            report.started(progress.epoch, progress.step, batch_in_words(hp), within)
            for epoch in range(progress.epoch, hp.num_epochs):
                if self.stopped_early:
                    self.log.info(f"early stopping: training ended {self.stopped_early}")
                    break
                self.train_epoch(epoch, report)
            if self.ema is not None:
                self.ema.copy_to_model()
        finally:
            report.close()

    def train_epoch(self, epoch: int, report: EpochReporter) -> None:
        """Epoch ``epoch`` (from 0): its steps left, then validation and its checkpoint."""
        ctx = self.context
        start = time.perf_counter()
        self.model.train()
        self.sampler.set_epoch(epoch)
        report.start_epoch(epoch, self.sampler.remaining_steps())
        loss_sum, steps = self.run_steps(report)
        last = epoch + 1 == self.hypers.num_epochs
        validating = (epoch + 1) % max(1, ctx.logging.every_n_epochs) == 0 or last
        trained = report.end_epoch(validating)
        launch.all_reduce_sum(loss_sum)
        train_loss = loss_sum.item() / ctx.world_size / max(1, steps)
        self.progress.epoch = epoch + 1
        elapsed = time.perf_counter() - start
        val_loss = None
        if validating:
            val_loss = self.validate_epoch(train_loss, elapsed, trained / elapsed, report)
        last = last or self.stopped_early is not None
        if self.checkpoints is not None and self.checkpoints.due_after_epoch(epoch + 1, last):
            self.write_checkpoint(val_loss, wait=last)

    @property
    def stopped_early(self) -> str | None:
        """Why training ends before ``num_epochs`` (early stopping), or None."""
        p, hp = self.progress, self.hypers
        count = p.validations_without_improvement
        return hp.early_stopping.note(count, p.epoch, hp.num_epochs, p.best_metric)

    def run_steps(self, report: EpochReporter) -> tuple[torch.Tensor, int]:
        """The steps left in the epoch, with the checkpoints and the stop they call
        for; the sum of their losses (on the device) and their number."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        steps = 0
        plan = [self.micro_batches(step.local) for step in self.sampler.plan()]
        with contextlib.closing(self.loader.batches(plan)) as prepared:
            for step in self.sampler:
                with timing.section("data"):  # (waiting for it, when made ahead)
                    batches = next(prepared)
                loss_sum += self.train_step(step.global_, batches)
                steps += 1
                self.after_step(step, loss_sum, report)
        return loss_sum, steps

    def after_step(self, step: StepIndices, loss_sum: torch.Tensor, report: EpochReporter) -> None:
        """Report a step; act on a stop signal and on a checkpoint it makes due."""
        report.step(len(step.global_), loss_sum)
        if self.agreed.stop:
            self.stop_for_signal()
        epoch_done = self.sampler.consumed >= self.sampler.epoch_length
        checkpoints = self.checkpoints
        if checkpoints is not None and not epoch_done:  # (the epoch's end writes its own)
            if checkpoints.due_after_step(self.progress.step, self.agreed.due):
                self.write_checkpoint()

    def stop_for_signal(self) -> None:
        """A rank received a stop signal: checkpoint now, and end with :class:`Preempted`."""
        self.log.info(f"stop requested at step {self.progress.step}: checkpointing")
        path = self.write_checkpoint(wait=True)
        raise Preempted(
            f"stopped by {' and '.join(self.agreed.stopped_by)} at step {self.progress.step}; "
            f"checkpoint {path}. Continue with 'continue_from: auto' (or --continue auto) "
            "and the same --output-dir"
        )

    def validate_epoch(
        self, train_loss: float, elapsed: float, rate: float, report: EpochReporter
    ) -> float:
        """Validate after an epoch, report it, and return the validation loss."""
        errors = self.validate()
        val_loss = self.validation_loss(errors)
        self.lr.observe(val_loss)
        progress = self.progress
        progress.validations_without_improvement = self.hypers.early_stopping.count(
            progress.validations_without_improvement, val_loss, progress.best_metric
        )
        if val_loss < self.progress.best_metric:
            self.keep_best(val_loss)
        self.progress.best_metric = min(self.progress.best_metric, val_loss)
        row = {
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "learning_rate": self.optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            **{f"val {k}": v for k, v in errors.items()},
            "val_loss": val_loss,
            "epoch_time_s": elapsed,
        }
        report.validated(row, rate)
        return val_loss

    def write_checkpoint(
        self, validation_loss: float | None = None, wait: bool = False
    ) -> Path | None:
        """A step checkpoint of the whole run, written by all ranks together.

        :param wait: return once it is committed; otherwise it is committed at a
            later step, once every rank's files are on disk (see
            :class:`~hpctrain.checkpoint.CheckpointManager`)
        """
        if self.checkpoints is None:
            return None
        with timing.section("checkpoint"):
            return self._write_checkpoint(validation_loss, wait)

    def _write_checkpoint(self, validation_loss: float | None, wait: bool) -> Path:
        rank_state = {"rng": checkpoint.rng_state(), "sampler": self.sampler.state_dict()}
        info = {"epoch": self.progress.epoch, "validation_loss": validation_loss}
        step = self.progress.step
        if wait:
            path = self.checkpoints.save(step, self.save_checkpoint, rank_state, info)
            self.log.info(f"checkpoint {path}")
        else:
            path = self.checkpoints.start(step, self.save_checkpoint, rank_state, info)
            self.log.info(f"checkpoint {path} (syncing to disk; committed when done)")
        return path

    def last_checkpoint(self) -> str:
        latest = self.checkpoints.latest() if self.checkpoints else None
        return str(latest) if latest else "none written yet"

    def validation_loss(self, metrics: dict[str, float]) -> float:
        """The training loss's weighting of the validation errors (MSE from RMSE)."""
        return self.loss.of_metrics(metrics, self.targets)

    def keep_best(self, validation_loss: float) -> None:
        """Keep (on the CPU) the weights just validated: ``export: best`` exports them."""
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            state = self.model.state_dict()
            weights = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
        self.best = {
            "epoch": self.progress.epoch,
            "step": self.progress.step,
            "validation_loss": validation_loss,
            "model_state": weights,
        }

    def validate(self) -> dict[str, float]:
        """RMSE and MAE per target over all validation sets, exact across ranks,
        with the averaged weights when ``ema_decay`` is set."""
        with self.ema.swapped() if self.ema is not None else contextlib.nullcontext():
            return self._validate()

    def _validate(self) -> dict[str, float]:
        self.model.eval()
        size = max(1, self.hypers.batch_size // self.context.world_size)
        return evaluate(
            lambda batch: self.predict(batch, self.energies, create_graph=False),
            self.val_sets,
            self.targets,
            size,
            self.device,
            self.context,
            self.requests,
            workers=self.workers,
            each_set=True,
        )

    # -- state ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "progress": dataclasses.asdict(self.progress),
            "optimizer": self.optimizer.state_dict(),
            "learning_rate": self.lr.state_dict(),
            "sampler": self.sampler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "loss": self.loss.state_dict(),
            "best": self.best,
        }

    def load_rank_state(self) -> None:
        """This rank's RNG states and data cursor, when continuing from a step
        checkpoint written with this rank (else the shared cursor is kept)."""
        resume = self.context.resume_from
        part = checkpoint.load_rank_state(resume, self.context.rank) if resume else None
        if part is not None:
            checkpoint.set_rng_state(part["rng"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.progress = Progress(**state["progress"])
        self.best = state.get("best")
        self.load_loss_state(state.get("loss"))
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr.load_state_dict(state["learning_rate"])
        if state.get("sampler") is None:  # written at an epoch end (format v1)
            self.sampler.set_epoch(self.progress.epoch)
            return
        try:
            self.sampler.load_state_dict(state["sampler"])
        except CheckpointError as error:
            # fine-tuning on other data: the old position in the data means nothing
            self.log.warning(f"{error}; epoch {self.progress.epoch + 1} starts the new data afresh")
            self.sampler.set_epoch(self.progress.epoch)
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
