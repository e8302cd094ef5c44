"""Training of SOAP-BPNN: the shared engine with metatrain's ``soap_bpnn`` defaults."""

import dataclasses

from hpctrain.config import option
from hpctrain.engine import TrainingHypers
from hpctrain.trainer import EngineTrainer


@dataclasses.dataclass
class TrainerHypers(TrainingHypers):
    """Training hypers of ``soap_bpnn``: metatrain's defaults (batches of 8, cosine
    decay after a warm-up) but Adam at 2e-3, not 1e-3: with the balanced loss it gave
    lower energy, force and stress errors on ethanol, TiAl and BaTiO3 (three seeds
    each) and lower energies for higher force errors on HEA25 (docs/benchmarks.rst)."""

    batch_size: int = option(
        8,
        doc="Structures per optimizer step, summed over all ranks (a global batch), "
        "so that results do not depend on the number of ranks.",
    )
    learning_rate: float = option(2e-3, doc="Peak learning rate of Adam.")
    warmup_epochs: float = option(1.0, doc="Epochs of linear learning-rate warm-up.")


class Trainer(EngineTrainer):
    __hypers__ = TrainerHypers
