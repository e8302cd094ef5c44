"""pair_mlp: a minimal architecture, an MLP on two-body (distance) features."""

from hpctrain.trainer import EngineTrainer

from .model import PairMLP

__model__ = PairMLP
__trainer__ = EngineTrainer

__authors__ = [("hpctrain developers <hpctrain@users.noreply.github.com>", "@hpctrain")]
__maintainers__ = [("hpctrain developers <hpctrain@users.noreply.github.com>", "@hpctrain")]
