"""The training loss: energies per atom, forces and stress, each term divided by a
scale of its own target measured on the training set, so that weights of 1 mean
"equally important".

A term is the mean over the global batch of ``f(error / scale)``, times its weight:

- ``f`` is the square (``loss: mse``) or the Huber function, doubled so that it is the
  square below ``huber_delta`` and grows linearly above (``loss: huber``);
- the scales (``loss_scales: rms``, the default) are, per energy target: the RMS
  per-atom energy that the composition baseline leaves unexplained, but at least the
  RMS force component times 0.3 Å (:data:`ENERGY_LENGTH`); the RMS force component;
  and for the stress, that energy scale divided by the mean volume per atom of the
  structures with a stress (so that the stress counts as the virial per atom, in the
  energy's units). With
  ``loss_scales: none`` every scale is 1: errors count in their own units (eV/atom,
  eV/Å, eV/Å³), and a stress error of 0.01 eV/Å³ (1.6 GPa) weighs as little as a
  force error of 0.01 eV/Å.

The scales are measured once, before a new training, logged, and kept in the
trainer's checkpoint: a resumed run, or one continued on other data, trains the same
loss. A structure without a label (a stress missing in the data: NaN in the batch) is
left out of that term's mean, never compared with zero.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .composition import CompositionFit
from .data.batch import Batch
from .evaluation import display_name, metric_label, split_key

COMPONENTS = {"": 1, "forces": 3, "stress": 9}

ENERGY_LENGTH = 0.3
"""Å: the energy scale is at least the RMS force times this length (the energy that
moving an atom by a fraction of a bond length against a typical force changes).
Where all structures have one composition (a molecule's MD), the residual energy can
be a hundredth of the forces' scale; divided by it alone, the energy term outweighs
the forces a thousandfold and neither is learned. The length was chosen by
``benchmarks/accuracy.py`` (docs/benchmarks.rst): on ethanol, 0.1 Å still gave
mp_transformer twice the force error of 0.3 Å; on the periodic sets, whose residual
is larger, it changes nothing or little."""


def energy_scale(fit: CompositionFit) -> float:
    """The per-atom energy scale of the loss: the composition residual, at least the
    RMS force times :data:`ENERGY_LENGTH`."""
    return max(fit.energy_scale, ENERGY_LENGTH * (fit.forces_scale or 0.0))


def stress_scale(fit: CompositionFit) -> float | None:
    """The stress scale of the loss: the energy scale per volume per atom. A stress
    error then weighs as the error of the virial per atom it implies. (The RMS stress
    itself is the wrong yardstick: on BaTiO3 it is so small against the forces'
    scale that a stress error weighed 11,700 times a force error, and energies and
    forces suffered; see docs/benchmarks.rst.)"""
    if not fit.volume_per_atom:
        return fit.stress_scale
    return energy_scale(fit) / fit.volume_per_atom


class Loss:
    """The loss of one global batch and the validation loss, with fixed scales.

    :param scales: the scale of each term, keyed like the predictions (``"energy"``,
        ``"energy forces"``, ``"energy stress"``)
    :param weights: the weight of each kind of term (``""``, ``"forces"``, ``"stress"``)
    :param huber_delta: None for the squared error, else the Huber delta (in units of
        the scale)
    """

    def __init__(
        self,
        scales: dict[str, float],
        weights: dict[str, float],
        huber_delta: float | None = None,
    ):
        self.scales = dict(scales)
        self.weights = dict(weights)
        self.huber_delta = huber_delta

    @classmethod
    def measured(
        cls,
        fits: dict[str, CompositionFit],
        terms: list[str],
        weights: dict[str, float],
        huber_delta: float | None,
        normalized: bool,
    ) -> Loss:
        """The loss of ``terms`` with the scales of ``fits`` (an energy target's
        :class:`CompositionFit`; scale 1 for a target without one, or all of them
        unless ``normalized``)."""
        scales = {}
        for term in terms:
            target, gradient = split_key(term)
            fit = fits.get(target)
            scale = None
            if normalized and fit is not None:
                scale = {
                    "": energy_scale(fit),
                    "forces": fit.forces_scale,
                    "stress": stress_scale(fit),
                }[gradient]
            scales[term] = float(scale) if scale else 1.0
        return cls(scales, weights, huber_delta)

    def describe(self, targets: dict[str, Any]) -> str:
        """``MSE of errors divided by: energy 0.0123 eV/atom, forces 0.912 eV/A``."""
        parts = []
        for term, scale in self.scales.items():
            unit = metric_label(term, targets).split("[")[1].rstrip("]")
            parts.append(f"{display_name(term)} {scale:.4g} {unit}")
        kind = f"Huber (delta {self.huber_delta:g})" if self.huber_delta else "MSE"
        return f"{kind} of errors divided by: {', '.join(parts)}"

    def __call__(
        self,
        predictions: dict[str, torch.Tensor],
        batch: Batch,
        counts: dict[str, int],
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of this rank's share of a global batch, and its terms.

        :param counts: the number of labelled values behind each term (by its key) in
            the whole global batch: structures with the energy, atoms with forces,
            structures with a stress; each term is a sum divided by it. A value
            without a label (NaN: a structure of a set without it) counts nothing.
        """
        parts = {}
        for term, scale in self.scales.items():
            target, gradient = split_key(term)
            references = {"forces": batch.forces, "stress": batch.stress}.get(
                gradient, batch.targets
            )
            if target not in references:
                continue
            reference = references[target]
            known = torch.isfinite(reference)
            error = torch.where(known, predictions[term] - reference.nan_to_num(), 0.0)
            if not gradient:
                error = error / batch.n_atoms
            penalty = self.penalty(error / scale)
            if batch.loss_weights is not None:  # (per structure; per atom for forces)
                weights = batch.loss_weights
                weights = weights[batch.system] if gradient == "forces" else weights
                penalty = penalty * weights.reshape(-1, *[1] * (penalty.dim() - 1))
            total = penalty.sum()
            divisor = COMPONENTS[gradient] * max(1, counts.get(term, 0))
            parts[term] = self.weights.get(gradient, 1.0) * total / divisor
        return torch.stack(list(parts.values())).sum(), parts

    def penalty(self, x: torch.Tensor) -> torch.Tensor:
        if self.huber_delta is None:
            return x**2
        zeros = torch.zeros_like(x)
        return 2 * torch.nn.functional.huber_loss(x, zeros, "none", self.huber_delta)

    def of_metrics(self, metrics: dict[str, float], targets: dict[str, Any]) -> float:
        """The validation loss: the weighted sum of ``(RMSE / scale)**2`` over the
        terms that ``metrics`` (as :class:`~hpctrain.evaluation.ErrorSums` names
        them) holds."""
        loss = 0.0
        for term, scale in self.scales.items():
            rmse = metrics.get(metric_label(term, targets).format("RMSE"))
            if rmse is not None and math.isfinite(rmse):
                loss += self.weights.get(split_key(term)[1], 1.0) * (rmse / scale) ** 2
        return loss

    def state_dict(self) -> dict[str, Any]:
        return {"scales": dict(self.scales)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scales = dict(state["scales"])
