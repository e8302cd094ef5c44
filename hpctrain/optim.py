"""Learning-rate schedule and exponential moving average of the weights.

Both are step-based and keep their whole state in ``state_dict()``, so that a resumed
run continues them exactly.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch


class LearningRate:
    """Linear warm-up, then ``cosine`` decay to ``min_ratio``, ``plateau`` halving
    when the validation loss stops improving, or ``constant``.

    Sets the learning rate of every parameter group of ``optimizer`` at each step.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        peak: float,
        kind: str,
        total_steps: int,
        warmup_steps: int,
        min_ratio: float,
        patience: int,
        factor: float = 0.5,
    ):
        self.optimizer = optimizer
        self.peak = peak
        self.kind = kind
        self.total_steps = max(1, total_steps)
        self.warmup_steps = warmup_steps
        self.min_ratio = min_ratio
        self.patience = patience
        self.factor = factor
        self.step_count = 0
        self.plateau_factor = 1.0
        self.best = math.inf
        self.bad_epochs = 0
        self.apply()

    def value(self) -> float:
        step = self.step_count
        if step < self.warmup_steps:
            return self.peak * (step + 1) / self.warmup_steps
        if self.kind == "cosine":
            span = max(1, self.total_steps - self.warmup_steps)
            progress = min(1.0, (step - self.warmup_steps) / span)
            cosine = 0.5 * (1 + math.cos(math.pi * progress))
            return self.peak * (self.min_ratio + (1 - self.min_ratio) * cosine)
        if self.kind == "plateau":
            return max(self.peak * self.min_ratio, self.peak * self.plateau_factor)
        return self.peak

    def apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.value()

    def step(self) -> None:
        self.step_count += 1
        self.apply()

    def observe(self, validation_loss: float) -> None:
        """After a validation: for ``plateau``, lower the rate after ``patience``
        validations without improvement."""
        if validation_loss < self.best * (1 - 1e-4):
            self.best = validation_loss
            self.bad_epochs = 0
            return
        self.bad_epochs += 1
        if self.kind == "plateau" and self.bad_epochs > self.patience:
            self.plateau_factor *= self.factor
            self.bad_epochs = 0
            self.apply()

    def state_dict(self) -> dict[str, Any]:
        keys = ("step_count", "plateau_factor", "best", "bad_epochs")
        return {k: getattr(self, k) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.apply()


class ExponentialMovingAverage:
    """A shadow copy of the weights, ``shadow = decay * shadow + (1 - decay) * w``.

    Validation and the final model use the shadow weights (``swapped()``), which
    are smoother than the last step's.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.shadow = [p.detach().clone() for p in self.parameters]

    @torch.no_grad()
    def update(self) -> None:
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.parameters], 1 - self.decay)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model holds the shadow weights inside the ``with`` block."""
        self._swap()
        try:
            yield
        finally:
            self._swap()

    @torch.no_grad()
    def _swap(self) -> None:
        for param, shadow in zip(self.parameters, self.shadow):
            tmp = param.detach().clone()
            param.copy_(shadow)
            shadow.copy_(tmp)

    @torch.no_grad()
    def copy_to_model(self) -> None:
        for param, shadow in zip(self.parameters, self.shadow):
            param.copy_(shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for shadow, saved in zip(self.shadow, state["shadow"]):
            shadow.copy_(saved)


def make_adam(parameters: Iterable[torch.nn.Parameter], learning_rate: float) -> torch.optim.Adam:
    """Adam updating all parameters in one fused operation (one kernel on a GPU,
    where the per-tensor update launches about ten per parameter tensor)."""
    return torch.optim.Adam(parameters, lr=learning_rate, fused=True)
