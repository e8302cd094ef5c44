"""A trainer on the shared engine: what the reference architectures' trainers share.

A reference trainer is this class with its own ``__hypers__`` (a
:class:`~hpctrain.engine.TrainingHypers` subclass) and, where needed, its own
``engine_class`` overriding small hooks.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Union

import torch

from . import checkpoint, finetune, run
from .architecture import TrainerInterface
from .config import parse, to_dict
from .engine import Engine, TrainingHypers
from .refit import refit_baselines
from .training_sets import check_datasets


class EngineTrainer(TrainerInterface):
    """``Trainer(train_hypers)``; ``train`` runs the shared :class:`Engine`."""

    __hypers__: Any = TrainingHypers
    engine_class = Engine

    def __init__(self, train_hypers: dict[str, Any]):
        self.hypers = parse(self.__hypers__, train_hypers, "architecture.training")
        self.model: torch.nn.Module | None = None
        self.engine: Engine | None = None
        self._state: dict[str, Any] | None = None

    @classmethod
    def check_datasets(
        cls, train_hypers: dict[str, Any], world_size: int, train_datasets: list[Any]
    ) -> None:
        """Raise now on what :meth:`train` would refuse (the flow asks before training)."""
        hypers = parse(cls.__hypers__, train_hypers, "architecture.training")
        check_datasets(hypers, world_size, train_datasets)

    def make_engine(
        self,
        model: Any,
        device: torch.device,
        train_datasets: list[Any],
        val_datasets: list[Any],
        checkpoint_dir: Union[str, Path],
    ) -> Engine:
        """The engine that trains ``model``: :meth:`train` runs its loop, benchmarks
        time its steps (the same object either way)."""
        self.model = model
        if self.hypers.finetune is not None:
            finetune.prepare(model, self.hypers.finetune, self._state)
        self.engine = self.engine_class(
            self.hypers,
            model,
            device,
            train_datasets,
            val_datasets,
            Path(checkpoint_dir),
            save_checkpoint=self.save_checkpoint,
            state=self._state,
        )
        return self.engine

    def train(
        self,
        model: Any,
        devices: list[torch.device],
        train_datasets: list[Any],
        val_datasets: list[Any],
        checkpoint_dir: Union[str, Path],
    ) -> None:
        if len(devices) != 1:
            raise ValueError(
                f"a rank trains on exactly one device, got {devices}; hpctrain gives "
                "each rank its own device"
            )
        engine = self.make_engine(model, devices[0], train_datasets, val_datasets, checkpoint_dir)
        engine.train()
        if self.hypers.refit_composition:
            refit_baselines(engine)
        finetune.finish(model, engine)

    @property
    def stopped_early(self) -> str | None:
        """Why training ended before its last epoch (early stopping), or None."""
        return self.engine.stopped_early if self.engine is not None else None

    def best_model(self) -> tuple[Any, dict[str, Any]] | None:
        """A copy of the model with the weights of its best validation, and where they
        come from (``epoch``, ``step``, ``validation_loss``); None before any."""
        best = self.engine.best if self.engine is not None else None
        if self.model is None or best is None:
            return None
        model = copy.deepcopy(self.model)
        model.load_state_dict(best["model_state"])
        return model, {k: v for k, v in best.items() if k != "model_state"}

    def save_checkpoint(self, path: Union[str, Path]) -> None:
        """Model and trainer state in one file (rank 0 calls this)."""
        if self.model is None or self.engine is None:
            raise RuntimeError("save_checkpoint is called after train()")
        payload = self.model.checkpoint_payload()
        payload["train_hypers"] = to_dict(self.hypers)
        payload["trainer_state"] = self.engine.state_dict()
        if finetune.has_adapters(self.model):
            # the model as the plain model it becomes; the adapters for a resumed run
            plain = finetune.plain_state(self.model)
            payload["model_state"] = {k: v.cpu() for k, v in plain.items()}
            adapters = {k: v.cpu() for k, v in self.model.state_dict().items()}
            payload["trainer_state"]["adapters"] = adapters
        payload["seed"] = run.current().seed
        checkpoint.save(payload, path)

    @classmethod
    def load_checkpoint(cls, path: Union[str, Path], train_hypers: dict[str, Any]) -> EngineTrainer:
        data = checkpoint.load(path)
        trainer = cls(train_hypers)
        trainer._state = data.get("trainer_state")
        return trainer
