"""Training of SOAP-BPNN: the shared engine with metatrain's ``soap_bpnn`` defaults."""

import dataclasses

from hpctrain.config import option
from hpctrain.engine import TrainingHypers
from hpctrain.trainer import EngineTrainer


@dataclasses.dataclass
class TrainerHypers(TrainingHypers):
    """Training hypers of ``soap_bpnn`` (metatrain's defaults: batches of 8, Adam at
    1e-3, cosine decay after a warm-up of 1% of the 100 epochs)."""

    batch_size: int = option(
        8,
        doc="Structures per optimizer step, summed over all ranks (a global batch), "
        "so that results do not depend on the number of ranks.",
    )
    learning_rate: float = option(1e-3, doc="Peak learning rate of Adam.")
    warmup_epochs: float = option(1.0, doc="Epochs of linear learning-rate warm-up.")


class Trainer(EngineTrainer):
    __hypers__ = TrainerHypers
