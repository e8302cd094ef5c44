"""Message-passing transformer: attention over neighbours within a smooth cutoff."""

from .model import MessagePassingTransformer
from .trainer import Trainer

__model__ = MessagePassingTransformer
__trainer__ = Trainer

__authors__ = [("hpctrain developers <hpctrain@users.noreply.github.com>", "@hpctrain")]
__maintainers__ = [("hpctrain developers <hpctrain@users.noreply.github.com>", "@hpctrain")]
