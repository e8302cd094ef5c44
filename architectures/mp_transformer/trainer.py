"""Training of the message-passing transformer: the shared engine as it is."""

import dataclasses

from hpctrain.config import option
from hpctrain.engine import TrainingHypers
from hpctrain.trainer import EngineTrainer


@dataclasses.dataclass
class TrainerHypers(TrainingHypers):
    """Training hypers of ``mp_transformer``: the learning rate is the one of 2e-3 and
    3e-3 that gave the lower errors on three of the four datasets of
    ``benchmarks/accuracy.py`` (docs/benchmarks.rst)."""

    learning_rate: float = option(2e-3, doc="Peak learning rate of Adam.")
    warmup_epochs: float = option(1.0, doc="Epochs of linear learning-rate warm-up.")


class Trainer(EngineTrainer):
    __hypers__ = TrainerHypers
