"""SOAP-BPNN: per-element neural networks on SOAP power spectra (featomic's, in torch)."""

from .model import SoapBpnn
from .trainer import Trainer

__model__ = SoapBpnn
__trainer__ = Trainer

__authors__ = [("hpctrain developers <hpctrain@users.noreply.github.com>", "@hpctrain")]
__maintainers__ = [("hpctrain developers <hpctrain@users.noreply.github.com>", "@hpctrain")]
