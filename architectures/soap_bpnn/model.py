"""A Behler-Parrinello network on SOAP power spectra.

Each atom is described by its SOAP power spectrum, computed by featomic
(``featomic.torch.SoapPowerSpectrum``) inside the model's ``forward``, so that the
exported model computes it too. The spectra of all neighbour-type pairs are
concatenated into one fixed-size vector per atom, which a small network of the
atom's own element (one MLP per element) maps to an atomic energy; the composition
baseline is added on top. Forces and stress come from autograd through featomic,
in training and in the exported model alike. Defaults follow metatrain's
``soap_bpnn``.
"""

import dataclasses
from typing import Any, Dict, List

import featomic.torch
import torch
from metatensor.torch import Labels
from metatomic.torch import NeighborListOptions, System

from hpctrain.config import option
from hpctrain.model import ReferenceModel


@dataclasses.dataclass
class CutoffHypers:
    """Where atomic environments end."""

    radius: float = option(5.0, doc="Radius of the atomic environments, in angstrom.")
    width: float = option(
        0.5, doc="Width of the shifted-cosine switch that takes the density to zero at ``radius``."
    )


@dataclasses.dataclass
class ScalingHypers:
    """Radial scaling of the neighbour density, ``rate / (rate + (r / scale)^exponent)``
    (Willatt et al. 2018): far neighbours weigh less than near ones."""

    rate: float = option(1.0, doc="Value of the scaling's denominator at ``r = 0``.")
    scale: float = option(2.0, doc="Distance (angstrom) where the scaling is ``1/2``.")
    exponent: float = option(7.0, doc="How sharply the scaling decays beyond ``scale``.")


@dataclasses.dataclass
class SoapHypers:
    """The SOAP power spectrum (featomic's ``SoapPowerSpectrum``)."""

    cutoff: CutoffHypers = option(factory=CutoffHypers, doc="Radial cutoff.")
    density_width: float = option(
        0.3, doc="Width (angstrom) of the Gaussian placed on each neighbour."
    )
    center_atom_weight: float = option(1.0, doc="Weight of the central atom's own Gaussian.")
    scaling: ScalingHypers = option(factory=ScalingHypers, doc="Radial scaling of the density.")
    max_angular: int = option(6, doc="Largest angular channel ``l`` of the expansion.")
    max_radial: int = option(
        7, doc="Largest radial channel ``n`` of the GTO basis (``max_radial + 1`` functions)."
    )

    def featomic(self) -> Dict[str, Any]:
        """The hypers in featomic's format."""
        return {
            "cutoff": {
                "radius": self.cutoff.radius,
                "smoothing": {"type": "ShiftedCosine", "width": self.cutoff.width},
            },
            "density": {
                "type": "Gaussian",
                "width": self.density_width,
                "center_atom_weight": self.center_atom_weight,
                "scaling": {"type": "Willatt2018", **dataclasses.asdict(self.scaling)},
            },
            "basis": {
                "type": "TensorProduct",
                "max_angular": self.max_angular,
                "radial": {"type": "Gto", "max_radial": self.max_radial},
            },
        }


@dataclasses.dataclass
class BpnnHypers:
    """The per-element networks."""

    num_hidden_layers: int = option(2, doc="Hidden layers of each element's network.")
    num_neurons_per_layer: int = option(32, doc="Width of the hidden layers.")
    layernorm: bool = option(
        True, doc="Normalise each atom's SOAP vector (a LayerNorm per element) first."
    )


@dataclasses.dataclass
class ModelHypers:
    """Model hypers of ``soap_bpnn``."""

    soap: SoapHypers = option(factory=SoapHypers, doc="SOAP descriptor.")
    bpnn: BpnnHypers = option(factory=BpnnHypers, doc="Per-element networks.")

    def validate(self, path: str, source: str) -> None:
        from hpctrain.errors import OptionsError

        soap = self.soap
        if soap.cutoff.radius <= 0 or not 0 < soap.cutoff.width <= soap.cutoff.radius:
            raise OptionsError(
                f"'{path}.soap.cutoff' in {source}: radius must be positive and width in "
                "(0, radius]"
            )
        if soap.max_angular < 0 or soap.max_radial < 0 or self.bpnn.num_hidden_layers < 0:
            raise OptionsError(
                f"'{path}' in {source}: max_angular, max_radial and num_hidden_layers must "
                "not be negative"
            )


def element_network(n_features: int, hypers: BpnnHypers, n_outputs: int) -> torch.nn.Sequential:
    layers: List[torch.nn.Module] = [torch.nn.LayerNorm(n_features)] if hypers.layernorm else []
    width = n_features
    for _ in range(hypers.num_hidden_layers):
        layers += [torch.nn.Linear(width, hypers.num_neurons_per_layer), torch.nn.SiLU()]
        width = hypers.num_neurons_per_layer
    layers.append(torch.nn.Linear(width, n_outputs))
    return torch.nn.Sequential(*layers)


class SoapBpnn(ReferenceModel):
    """See the module doc. Hypers: :class:`ModelHypers`."""

    __hypers__ = ModelHypers
    # featomic computes on the CPU; it moves CUDA systems there and back itself
    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float64, torch.float32]

    def __init__(self, hypers, dataset_info):
        super().__init__(hypers, dataset_info)
        soap = self.config.soap
        self.cutoff = float(soap.cutoff.radius)
        self.calculator = featomic.torch.SoapPowerSpectrum(**soap.featomic())
        types = torch.tensor(self.atomic_types, dtype=torch.int32)
        # every pair of neighbour types, so that the feature size does not depend on
        # which elements a batch happens to hold
        self.neighbor_pairs = Labels(
            ["neighbor_1_type", "neighbor_2_type"],
            torch.combinations(types, with_replacement=True),
        )
        self.n_features = (
            len(self.neighbor_pairs) * (soap.max_radial + 1) ** 2 * (soap.max_angular + 1)
        )
        self.networks = torch.nn.ModuleList(
            [
                element_network(self.n_features, self.config.bpnn, len(self.target_names))
                for _ in self.atomic_types
            ]
        )

    @property
    @torch.jit.unused
    def interaction_range(self) -> float:
        return self.cutoff

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return self.calculator.requested_neighbor_lists()

    def atomic_outputs(self, systems: List[System]) -> torch.Tensor:
        dtype = systems[0].positions.dtype
        device = systems[0].positions.device
        spectrum = self.calculator(systems).keys_to_properties(self.neighbor_pairs.to(device))
        sizes = torch.tensor([len(s) for s in systems], dtype=torch.long, device=device)
        first_atom = torch.cumsum(sizes, 0) - sizes
        center_types = spectrum.keys.column("center_type")
        outputs = torch.zeros(int(sizes.sum()), len(self.target_names), dtype=dtype, device=device)
        for i, network in enumerate(self.networks):
            # an element absent from the batch still runs (on no atoms), so that every
            # parameter takes part in the graph as DDP expects
            features = torch.zeros(0, self.n_features, dtype=dtype, device=device)
            rows = torch.zeros(0, dtype=torch.long, device=device)
            found = torch.nonzero(center_types == self.atomic_types[i])
            if found.shape[0] > 0:
                block = spectrum.block_by_id(int(found[0, 0]))
                samples = block.samples.values.to(torch.long)
                features = block.values
                rows = first_atom[samples[:, 0]] + samples[:, 1]
            outputs = outputs.index_copy(0, rows, network(features))
        return outputs
