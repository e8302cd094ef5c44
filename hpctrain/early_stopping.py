"""Early stopping (``architecture.training.early_stopping``): training ends when the
validation loss has not improved for ``patience`` validations in a row.

The count lives in the engine's progress, so it is in every checkpoint: a resumed or
requeued run stops where an uninterrupted one would, and a run that stopped early and
is continued with a larger ``patience`` trains on.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .config import option
from .errors import OptionsError


@dataclasses.dataclass
class EarlyStoppingOptions:
    """End training when the validation loss stops improving. The exported model is
    then the best validation's (``export: best``, the default)."""

    patience: Optional[int] = option(
        None,
        doc="Stop after this many validations in a row without improvement (null: never "
        "stop early). Validation runs every ``logging.every_n_epochs`` epochs, so this "
        "counts validations, not epochs.",
    )
    min_delta: float = option(
        0.0,
        doc="A validation improves when its loss is below the best so far by more than "
        "this (the validation loss has no unit with ``loss_scales: rms``).",
    )

    def validate(self, path: str, source: str) -> None:
        if self.patience is not None and self.patience < 1:
            raise OptionsError(
                f"'{path}.patience' in {source} must be at least 1 (or null: never stop "
                f"early), got {self.patience}"
            )
        if not (math.isfinite(self.min_delta) and self.min_delta >= 0):
            raise OptionsError(
                f"'{path}.min_delta' in {source} must be a finite number, 0 or more, got "
                f"{self.min_delta}"
            )

    def count(self, count: int, validation_loss: float, best_before: float) -> int:
        """Validations without improvement after one with ``validation_loss``, given
        ``count`` before it and the best loss before it (a NaN never improves)."""
        return 0 if validation_loss < best_before - self.min_delta else count + 1

    def note(self, count: int, epoch: int, num_epochs: int, best: float) -> str | None:
        """Why training ends at ``epoch`` (of ``num_epochs``), or None: it goes on."""
        if self.patience is None or count < self.patience or epoch >= num_epochs:
            return None
        by = f" by more than {self.min_delta:g}" if self.min_delta > 0 else ""
        return (
            f"after epoch {epoch} of {num_epochs}: the validation loss has not improved{by} "
            f"in {count} validations (patience {self.patience}; best {best:.4g})"
        )
