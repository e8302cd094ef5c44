"""Training of the message-passing transformer: the shared engine as it is."""

import dataclasses

from hpctrain.config import option
from hpctrain.engine import TrainingHypers
from hpctrain.trainer import EngineTrainer


@dataclasses.dataclass
class TrainerHypers(TrainingHypers):
    """Training hypers of ``mp_transformer`` (defaults tuned for small molecules)."""

    learning_rate: float = option(3e-3, doc="Peak learning rate of Adam.")
    warmup_epochs: float = option(1.0, doc="Epochs of linear learning-rate warm-up.")


class Trainer(EngineTrainer):
    __hypers__ = TrainerHypers
