"""A Behler-Parrinello network on SOAP power spectra.

Each atom is described by its SOAP power spectrum (the one of featomic's
``SoapPowerSpectrum`` with the same hypers, to the accuracy of a spline), computed in
plain torch inside the model's ``forward`` from the neighbour list: the radial
integral of a Gaussian density on the orthonormalised GTO basis is tabulated once
(closed form) and evaluated by a cubic Hermite spline (``basis.py``), multiplied by
the cutoff function, the radial scaling if any and real spherical harmonics, summed
over the neighbours of each type, and contracted over ``m``. The spectra of all
neighbour-type pairs form one fixed-size vector per atom, which a small network of
the atom's own element (one MLP per element) maps to an atomic energy; the
composition baseline is added on top. Forces and stress come from autograd, in
training and in the exported model alike, which needs no extension. Defaults
follow metatrain's ``soap_bpnn``.
"""

import dataclasses
import math
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from metatensor.torch import Labels
from metatomic.torch import NeighborListOptions

from hpctrain.concatenate import concatenate
from hpctrain.config import option
from hpctrain.model import ReferenceModel

from .basis import SPLINE_STEP, harmonics_constants, radial_spline, spherical_harmonics


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
    scaling: Optional[ScalingHypers] = option(
        factory=ScalingHypers,
        doc="Radial scaling of the density; ``null``: none, every neighbour within the "
        "cutoff weighs the same (as in metatrain's ``soap_bpnn``), which on the "
        "periodic sets of the accuracy benchmark gives better energies and stress and "
        "worse forces (docs/benchmarks.rst).",
    )
    max_angular: int = option(6, doc="Largest angular channel ``l`` of the expansion.")
    max_radial: int = option(
        7, doc="Largest radial channel ``n`` of the GTO basis (``max_radial + 1`` functions)."
    )

    def featomic(self) -> Dict[str, Any]:
        """The hypers in featomic's format."""
        density: Dict[str, Any] = {
            "type": "Gaussian",
            "width": self.density_width,
            "center_atom_weight": self.center_atom_weight,
        }
        if self.scaling is not None:
            density["scaling"] = {"type": "Willatt2018", **dataclasses.asdict(self.scaling)}
        return {
            "cutoff": {
                "radius": self.cutoff.radius,
                "smoothing": {"type": "ShiftedCosine", "width": self.cutoff.width},
            },
            "density": density,
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


MAX_PARAMETERS = 500_000_000  # about 8 GB with gradients and Adam's state in float32


def check_size(config: ModelHypers, n_types: int, n_outputs: int) -> int:
    """The parameters of a model for ``n_types`` elements; an error naming the
    remedies, before anything is allocated, when there are more than
    :data:`MAX_PARAMETERS` (the power spectrum grows with the square of the elements)."""
    from hpctrain.errors import OptionsError

    soap, bpnn = config.soap, config.bpnn
    n_features = n_types * (n_types + 1) // 2 * (soap.max_angular + 1) * (soap.max_radial + 1) ** 2
    width, per_element = n_features, 2 * n_features if bpnn.layernorm else 0
    for _ in range(bpnn.num_hidden_layers):
        per_element += (width + 1) * bpnn.num_neurons_per_layer
        width = bpnn.num_neurons_per_layer
    per_element += (width + 1) * n_outputs
    parameters = n_types * per_element
    if parameters > MAX_PARAMETERS:
        raise OptionsError(
            f"soap_bpnn for {n_types} elements with max_radial {soap.max_radial} and "
            f"max_angular {soap.max_angular} would have {n_features:,} SOAP features per atom "
            f"and {parameters:,} parameters (about {parameters * 16 / 1e9:.0f} GB to train "
            f"in float32), more than the {MAX_PARAMETERS:,} it accepts: lower "
            "architecture.model.soap.max_radial and max_angular, or train mp_transformer, "
            "whose size does not grow with the number of elements"
        )
    return parameters


def product_windows(t: int) -> Tuple[int, int]:
    """How the products of ``t`` neighbour types' expansions are made: each type ``t1``
    with the ``w`` types that follow it cyclically (``t1, t1 + 1, ... mod t``), in one
    batched product over windows; and, where ``t`` is even, the ``e`` types of the
    first half with the type half-way round (``t1, t1 + t/2``) in a second one. Every
    unordered pair of types, ``t1 = t2`` included, comes out exactly once."""
    return (t + 1) // 2, t // 2 if t % 2 == 0 else 0


def angular_groups(n_l: int, overhead: int = 6) -> List[List[int]]:
    """The degrees ``l = 0 .. n_l - 1`` in consecutive groups, one batched product
    each, every ``l`` of a group padded to the ``2 l + 1`` values of ``m`` of its
    largest: the partition with the fewest padded values of ``m`` plus ``overhead``
    for each product (with ``max_angular`` 6, ``[0, 1], [2, 3], [4, 5, 6]``: 59
    values where one product over every ``l`` took 91, 46 % of them zeros)."""
    cost = [0.0] + [math.inf] * n_l  # of the best partition of l < stop
    start = [0] * (n_l + 1)
    for stop in range(1, n_l + 1):
        for first in range(stop):
            c = cost[first] + (stop - first) * (2 * stop - 1) + overhead
            if c < cost[stop]:
                cost[stop], start[stop] = c, first
    groups: List[List[int]] = []
    stop = n_l
    while stop > 0:
        groups.insert(0, list(range(start[stop], stop)))
        stop = start[stop]
    return groups


def window_rows(t: int, n_group: int, n_m: int, w: int) -> List[int]:
    """The rows ``(type, l, m)`` of a group's padded expansions (``n_group`` values of
    ``l``, ``n_m`` of ``m``) that make the right-hand side of its windowed products,
    in the order ``t1, l, m, window``: row ``(t1 + d mod t, l, m)`` for window ``d``.
    One gather of these rows lays out every window's matrices as the batched product
    reads them; its gradient is one scatter into the expansions (a stack of rolled
    copies cost a zero fill of the whole stack per window in the double backward)."""
    return [
        ((t1 + d) % t * n_group + ell) * n_m + m
        for t1 in range(t)
        for ell in range(n_group)
        for m in range(n_m)
        for d in range(w)
    ]


def product_tables(
    t: int, n_l: int, w: int
) -> Tuple[List[int], List[int], List[Tuple[int, int, int, int, int]]]:
    """The batched products, one per group of ``l`` (:func:`angular_groups`), for
    ``t`` types and windows of ``w``: which rows of the expansions make each group
    (the zero row, index ``n_l^2``, pads each ``l`` to the ``m`` of the group's
    largest), which rows of those make the windows (:func:`window_rows`), and per
    group where its rows start and how many there are in each list, and its ``m``."""
    padding: List[int] = []
    rows: List[int] = []
    groups: List[Tuple[int, int, int, int, int]] = []
    for group in angular_groups(n_l):
        n_m = 2 * group[-1] + 1
        pad = [ell * ell + m if m < 2 * ell + 1 else n_l * n_l for ell in group for m in range(n_m)]
        window = window_rows(t, len(group), n_m, w)
        groups.append((len(padding), len(pad), len(rows), len(window), n_m))
        padding, rows = padding + pad, rows + window
    return padding, rows, groups


def product_layout(t: int, n: int, n_l: int) -> Tuple[List[int], List[float]]:
    """For each feature in the order the products come out (see :func:`product_windows`;
    per atom and group of ``l`` (:func:`angular_groups`): ``t1, l, n1, window, n2``,
    then ``t1, l, n1, n2`` of the half-way pairs), its position in featomic's order
    and its scale.

    featomic orders the features by neighbour-type pair ``t1 <= t2``, then ``l, n1,
    n2``; a product ``t1 > t2`` is featomic's ``(t2, t1)`` with ``n1, n2`` swapped. A
    pair of different types counts twice (``sqrt(2)``), and each ``l`` is scaled by
    ``(-1)^l / sqrt(2l + 1)``."""
    pairs = {(a, b): i for i, (a, b) in enumerate((a, b) for a in range(t) for b in range(a, t))}
    w, e = product_windows(t)

    def feature(t1: int, t2: int, ell: int, n1: int, n2: int) -> Tuple[int, float]:
        if t1 > t2:
            t1, t2, n1, n2 = t2, t1, n2, n1
        weight = (math.sqrt(2.0) if t1 != t2 else 1.0) * (-1) ** ell / math.sqrt(2 * ell + 1)
        return ((pairs[(t1, t2)] * n_l + ell) * n + n1) * n + n2, weight

    features: List[Tuple[int, float]] = []
    for group in angular_groups(n_l):
        features += [
            feature(t1, (t1 + d) % t, ell, n1, n2)
            for t1 in range(t)
            for ell in group
            for n1 in range(n)
            for d in range(w)
            for n2 in range(n)
        ] + [
            feature(t1, t1 + e, ell, n1, n2)
            for t1 in range(e)
            for ell in group
            for n1 in range(n)
            for n2 in range(n)
        ]
    return [i for i, _ in features], [s for _, s in features]


class InputLayerNorm(torch.nn.LayerNorm):
    """The layer norm of an element's features, its weights kept in featomic's feature
    order (that of the checkpoints) and applied to features in the order the products
    come out: feature ``k`` takes the weights at ``source[k]``."""

    def __init__(self, source: torch.Tensor):
        super().__init__(len(source))
        self.register_buffer("source", source, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(
            x,
            self.normalized_shape,
            self.weight.index_select(0, self.source),
            self.bias.index_select(0, self.source),
            self.eps,
        )


class InputLinear(torch.nn.Linear):
    """The first linear layer of an element's network, its weights kept in featomic's
    feature order and applied as :class:`InputLayerNorm`'s."""

    def __init__(self, source: torch.Tensor, out_features: int):
        super().__init__(len(source), out_features)
        self.register_buffer("source", source, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight.index_select(1, self.source), self.bias)


def element_network(
    source: torch.Tensor, hypers: BpnnHypers, n_outputs: int
) -> torch.nn.Sequential:
    """An element's network on the features in product order (``source``: each
    feature's position in featomic's order, which the weights keep)."""
    layers: List[torch.nn.Module] = [InputLayerNorm(source)] if hypers.layernorm else []
    widths = [hypers.num_neurons_per_layer] * hypers.num_hidden_layers + [n_outputs]
    for i, width in enumerate(widths):
        if i == 0:
            layers.append(InputLinear(source, width))
        else:
            layers += [torch.nn.SiLU(), torch.nn.Linear(widths[i - 1], width)]
    return torch.nn.Sequential(*layers)


class SoapBpnn(ReferenceModel):
    """See the module doc. Hypers: :class:`ModelHypers`."""

    __hypers__ = ModelHypers
    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float64, torch.float32]

    def __init__(self, hypers, dataset_info):
        super().__init__(hypers, dataset_info)
        check_size(self.config, len(self.atomic_types), len(self.target_names))
        soap = self.config.soap
        self.cutoff = float(soap.cutoff.radius)
        self.cutoff_width = float(soap.cutoff.width)
        self.radial_scaling = soap.scaling is not None  # (else the values below go unused)
        scaling = soap.scaling if soap.scaling is not None else ScalingHypers()
        self.scaling_rate, self.scaling_scale = float(scaling.rate), float(scaling.scale)
        self.scaling_exponent = float(scaling.exponent)
        self.max_angular = int(soap.max_angular)
        self.n_radial = int(soap.max_radial) + 1
        self.n_types = len(self.atomic_types)
        self.neighbor_options = NeighborListOptions(
            cutoff=self.cutoff, full_list=False, strict=True
        )
        # the tables below follow from the hypers: not part of the state, so that
        # checkpoints hold the weights alone
        values, derivatives = radial_spline(
            soap.cutoff.radius, soap.density_width, soap.max_angular, soap.max_radial, SPLINE_STEP
        )
        self.spline_step = SPLINE_STEP
        self.register_buffer("spline_values", torch.from_numpy(values), persistent=False)
        self.register_buffer(
            "spline_derivatives", torch.from_numpy(derivatives * SPLINE_STEP), persistent=False
        )
        self.harmonics = harmonics_constants(self.max_angular)
        # the central atom's own Gaussian: l = 0 only, Y_00 = 1/sqrt(4 pi)
        center = np.zeros(((self.max_angular + 1) ** 2, self.n_radial))
        center[0] = values[0, 0] * soap.center_atom_weight / math.sqrt(4 * math.pi)
        self.register_buffer("center_density", torch.from_numpy(center), persistent=False)
        degrees = [ell for ell in range(self.max_angular + 1) for _ in range(2 * ell + 1)]
        self.register_buffer("lm_degree", torch.tensor(degrees), persistent=False)
        self.register_buffer(
            "lm_parity", torch.tensor([(-1.0) ** ell for ell in degrees]), persistent=False
        )
        # the batched products, one per group of l (see product_tables)
        self.windows, self.halfway = product_windows(self.n_types)
        padding, rows, groups = product_tables(self.n_types, self.max_angular + 1, self.windows)
        self.product_groups: List[Tuple[int, int, int, int, int]] = groups
        self.register_buffer("lm_padding", torch.tensor(padding), persistent=False)
        self.register_buffer("window_rows", torch.tensor(rows), persistent=False)
        self.neighbor_pairs = Labels(
            ["neighbor_1_type", "neighbor_2_type"],
            torch.combinations(
                torch.tensor(self.atomic_types, dtype=torch.int32), with_replacement=True
            ),
        )
        # the features in the order the products come out, and where each sits in
        # featomic's order (that of keys_to_properties), which the weights keep
        source, scale = product_layout(self.n_types, self.n_radial, self.max_angular + 1)
        self.register_buffer("feature_source", torch.tensor(source), persistent=False)
        self.register_buffer("feature_scale", torch.tensor(scale), persistent=False)
        self.n_features = len(source)
        self.networks = torch.nn.ModuleList(
            [
                element_network(self.feature_source, self.config.bpnn, len(self.target_names))
                for _ in self.atomic_types
            ]
        )

    @property
    @torch.jit.unused
    def interaction_range(self) -> float:
        return self.cutoff

    @torch.jit.unused
    def output_layers(self) -> List[str]:
        """The last layer of every element's network."""
        return [f"networks.{i}.{len(n) - 1}" for i, n in enumerate(self.networks)]

    def radial(self, distances: torch.Tensor) -> torch.Tensor:
        """``[pairs, l, n]``: the splined radial integral times cutoff (and scaling)."""
        x = distances / self.spline_step
        k = torch.clamp(x.detach().floor().long(), 0, self.spline_values.shape[0] - 2)
        t = (x - k.to(x.dtype)).unsqueeze(1).unsqueeze(2)
        t2 = t * t
        t3 = t2 * t
        values = self.spline_values.index_select(0, k)
        slopes = self.spline_derivatives.index_select(0, k)
        values_1 = self.spline_values.index_select(0, k + 1)
        slopes_1 = self.spline_derivatives.index_select(0, k + 1)
        spline = (
            (2 * t3 - 3 * t2 + 1) * values
            + (t3 - 2 * t2 + t) * slopes
            + (3 * t2 - 2 * t3) * values_1
            + (t3 - t2) * slopes_1
        )
        start = self.cutoff - self.cutoff_width
        switch = 0.5 * (1.0 + torch.cos(math.pi * (distances - start) / self.cutoff_width))
        cutoff = torch.where(
            distances <= start,
            torch.ones_like(distances),
            torch.where(distances >= self.cutoff, torch.zeros_like(distances), switch),
        )
        if self.radial_scaling:
            scaled = torch.pow(distances / self.scaling_scale, self.scaling_exponent)
            if self.scaling_rate > 0:
                cutoff = cutoff * self.scaling_rate / (self.scaling_rate + scaled)
            else:
                cutoff = cutoff / scaled
        return spline * cutoff.unsqueeze(1).unsqueeze(2)

    def power_spectrum(
        self,
        type_index: torch.Tensor,
        first: torch.Tensor,
        second: torch.Tensor,
        vector: torch.Tensor,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """SOAP power spectra ``[atoms, features]`` of the atoms of elements
        ``type_index`` with the half neighbour list (``first``, ``second``,
        ``vector``), sorted by element (stably), the features in product order
        (``feature_source`` says where each sits in featomic's); and the rank of each
        atom in that order."""
        n_atoms = type_index.shape[0]
        device = vector.device
        # atoms sorted by element, so that each element's network gets a contiguous slice
        order = torch.argsort(type_index, stable=True)
        rank = torch.empty_like(order).index_copy_(0, order, torch.arange(n_atoms, device=device))

        distances = torch.linalg.vector_norm(vector, dim=1)
        harmonics = spherical_harmonics(
            vector / distances.unsqueeze(1), self.max_angular, self.harmonics
        )
        radial = self.radial(distances).index_select(1, self.lm_degree)
        # [pairs, lm, n]: the second atom seen from the first; the first seen from the
        # second is its mirror image, (-1)^l times the same (the list is a half list)
        density = harmonics.unsqueeze(2) * radial
        t, n, n_l = self.n_types, self.n_radial, self.max_angular + 1
        n_lm = n_l * n_l
        expansion = torch.zeros(n_atoms * t, n_lm, n, dtype=vector.dtype, device=device)
        expansion = expansion.index_add(0, rank[first] * t + type_index[second], density)
        expansion = expansion.index_add(
            0, rank[second] * t + type_index[first], density * self.lm_parity.unsqueeze(1)
        )
        # the central atom's own Gaussian, at l = 0 of its own type
        own = self.center_density.unsqueeze(0).expand(n_atoms, -1, -1)
        own_rows = torch.arange(n_atoms, device=device) * t + type_index[order]
        expansion = expansion.index_add(0, own_rows, own)
        # [atoms, t, (l, m), n] and a zero row after the last (l, m): the padding of m
        expansion = torch.nn.functional.pad(expansion.reshape(n_atoms, t, n_lm, n), (0, 0, 0, 1))
        # products summed over m, batched over (atom, t1, l), one per group of l: each
        # type's expansion with those of the types in its window (t1, t1 + 1, ...
        # t1 + w - 1, cyclically); then, for an even number of types, the pairs
        # half-way round
        w, e = self.windows, self.halfway
        pieces: List[torch.Tensor] = []
        for pad_start, n_pad, rows_start, n_rows, n_m in self.product_groups:
            # this group's l, each padded to n_m values of m: [atoms, t, (l, m), n]
            padded = expansion.index_select(2, self.lm_padding.narrow(0, pad_start, n_pad))
            left = padded.reshape(-1, n_m, n).transpose(1, 2)
            rows = self.window_rows.narrow(0, rows_start, n_rows)
            right = padded.reshape(n_atoms, -1, n).index_select(1, rows)
            right = right.reshape(-1, n_m, w * n)  # [(atom, t1, l), m, (window, n2)]
            pieces.append(torch.bmm(left, right).reshape(n_atoms, -1))
            if e > 0:
                halfway = torch.bmm(
                    padded[:, :e].reshape(-1, n_m, n).transpose(1, 2),
                    padded[:, e:].reshape(-1, n_m, n),
                )
                pieces.append(halfway.reshape(n_atoms, -1))
        if len(pieces) == 1:
            products = pieces[0]
        elif torch.jit.is_scripting():
            products = torch.cat(pieces, dim=1)
        else:  # training: a gradient without full-size zero fills in the double backward
            products = concatenate(pieces, 1)
        features = products * self.feature_scale
        return features, rank

    def atomic_outputs(
        self,
        type_index: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        vectors: torch.Tensor,
        type_counts: List[int],
    ) -> torch.Tensor:
        features, rank = self.power_spectrum(type_index, centers, neighbors, vectors)
        outputs: List[torch.Tensor] = []
        # an element absent from the batch still runs (on no atoms), so that every
        # parameter takes part in the graph as DDP expects
        chunks = torch.split(features, type_counts)
        for i, network in enumerate(self.networks):
            outputs.append(network(chunks[i]))
        return torch.cat(outputs).index_select(0, rank)
