"""The training hypers shared by the reference architectures (``architecture.training``
in the options file): an architecture's trainer subclasses :class:`TrainingHypers` to
change defaults or add its own."""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional

from .config import option
from .early_stopping import EarlyStoppingOptions
from .errors import OptionsError
from .finetune import FinetuneOptions


@dataclasses.dataclass
class TrainingHypers:
    """Training hypers shared by the reference architectures."""

    num_epochs: int = option(100, doc="Passes over the training set.")
    batch_size: int = option(
        16,
        doc="Structures per optimizer step, summed over all ranks (a global batch), "
        "so that results do not depend on the number of ranks.",
    )
    max_atoms_per_batch: Optional[int] = option(
        None,
        doc="Batches by atom budget instead of ``batch_size``: each optimizer step takes "
        "the next structures of the epoch's order while their atoms, summed over all "
        "ranks, fit in this number, so that a step's memory does not depend on which "
        "structures it draws. The ranks share each batch by estimated work. Every "
        "structure must have at most ``max_atoms_per_batch / ranks`` atoms. The learning-"
        "rate schedule counts the first epoch's steps for every epoch.",
    )
    learning_rate: float = option(1e-3, doc="Peak learning rate of Adam.")
    warmup_epochs: float = option(0.0, doc="Epochs of linear learning-rate warm-up from zero.")
    scheduler: Literal["cosine", "plateau", "constant"] = option(
        "cosine",
        doc="After warm-up: ``cosine`` decay to ``min_lr_ratio`` at the last step, "
        "``plateau`` halving after ``plateau_patience`` validations without "
        "improvement (down to ``min_lr_ratio``), or ``constant``.",
    )
    min_lr_ratio: float = option(
        0.01, doc="Lowest learning rate, relative to the peak (cosine and plateau)."
    )
    plateau_patience: int = option(
        10, doc="Validations without improvement before ``plateau`` halves the rate."
    )
    grad_clip: Optional[float] = option(
        None, doc="Clip the gradient norm (over all parameters) to this value."
    )
    accumulation_steps: int = option(
        1,
        doc="Split each rank's share of a global batch into this many micro-batches "
        "(to save memory); gradients are accumulated, so results do not change.",
    )
    ema_decay: Optional[float] = option(
        None,
        doc="Keep an exponential moving average of the weights with this decay (e.g. "
        "0.999); validation and the final model use it.",
    )
    mixed_precision: bool = option(
        False, doc="bfloat16 autocast of the forward pass, on CUDA only."
    )
    energy_weight: float = option(
        1.0, doc="Weight of the per-atom energy term of the loss (see ``loss_scales``)."
    )
    forces_weight: float = option(1.0, doc="Weight of the force term of the loss.")
    stress_weight: float = option(1.0, doc="Weight of the stress term of the loss.")
    loss_scales: Literal["rms", "none"] = option(
        "rms",
        doc="``rms``: each term of the loss is the error divided by a scale of its target "
        "measured on the training set before training (the RMS per-atom energy that the "
        "composition baseline leaves unexplained, the RMS force component, the RMS "
        "stress component), so that weights of 1 make energies, forces and stress "
        "equally important; the scales are logged and kept in checkpoints. ``none``: "
        "errors in their own units (eV/atom, eV/A, eV/A^3).",
    )
    loss: Literal["mse", "huber"] = option(
        "mse",
        doc="``mse``: mean squared (scaled) errors. ``huber``: squared below "
        "``huber_delta``, linear above, so that a few outlying labels pull less.",
    )
    huber_delta: float = option(
        1.0,
        doc="Where the Huber loss turns linear, in units of each term's scale (in the "
        "errors' own units with ``loss_scales: none``).",
    )
    num_workers: Optional[int] = option(
        None,
        doc="Loader threads per rank that read, give neighbour lists to and collate the "
        "coming batches while a step computes (two steps ahead). Left out: 2 on a GPU, "
        "0 on a CPU (each batch made when its step starts, as the step's threads keep "
        "the cores busy). The batches, and so the results, do not depend on it.",
    )
    early_stopping: EarlyStoppingOptions = option(
        factory=EarlyStoppingOptions,
        doc="End training when the validation loss stops improving, e.g. ``{patience: "
        "20, min_delta: 0.001}``; off unless ``patience`` is given.",
    )
    finetune: Optional[FinetuneOptions] = option(
        None,
        doc="Start from the model of another run's checkpoint (another dataset, other "
        "targets) and train all of it, its heads, or LoRA adapters, e.g. ``{read_from: "
        "pretrained/model.ckpt, method: lora}``; see :doc:`finetuning`.",
    )
    fit_composition: bool = option(
        True,
        doc="Fit per-element energy offsets by least squares before training, so the "
        "network learns only what composition does not explain.",
    )
    refit_composition: bool = option(
        True,
        doc="After the last step, refit those offsets by least squares on what the "
        "trained network leaves of the training energies, per atom (one pass over the "
        "training set, for the best weights and the last). Forces and stress do not "
        "see these constants, so they drift while the network trains; the refit "
        "changes no force or stress and never raises the training set's energy error.",
    )

    def validate(self, path: str, source: str) -> None:
        for name in ("num_epochs", "batch_size", "accumulation_steps"):
            if getattr(self, name) < 1:
                raise OptionsError(f"'{path}.{name}' in {source} must be at least 1")
        if self.max_atoms_per_batch is not None and self.max_atoms_per_batch < 1:
            raise OptionsError(f"'{path}.max_atoms_per_batch' in {source} must be at least 1")
        if self.learning_rate <= 0:
            raise OptionsError(f"'{path}.learning_rate' in {source} must be positive")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise OptionsError(f"'{path}.ema_decay' in {source} must be in (0, 1)")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise OptionsError(f"'{path}.grad_clip' in {source} must be positive")
        if self.num_workers is not None and self.num_workers < 0:
            raise OptionsError(f"'{path}.num_workers' in {source} must not be negative")
        if self.huber_delta <= 0:
            raise OptionsError(f"'{path}.huber_delta' in {source} must be positive")
        for name in ("energy_weight", "forces_weight", "stress_weight"):
            if getattr(self, name) < 0:
                raise OptionsError(f"'{path}.{name}' in {source} must not be negative")
