"""mp_transformer against the conformance suite, with small hypers."""

import pytest

from hpctrain.testing import ArchitectureTests


@pytest.mark.slow
class TestMessagePassingTransformer(ArchitectureTests):
    architecture = "mp_transformer"
    model_hypers = {"d_model": 16, "num_heads": 2, "num_layers": 2, "num_radial": 4}
    training_hypers = {"num_epochs": 3, "batch_size": 4, "learning_rate": 0.01}
