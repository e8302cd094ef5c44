"""A message-passing transformer on neighbour lists.

Each layer lets every atom attend to its neighbours within ``cutoff``: queries come
from the centre, keys and values from the neighbour's state and a radial basis of
their distance. A sink term and a cosine cutoff make the attention weights vanish
smoothly as a neighbour leaves the cutoff, so energies and forces are continuous.
Besides the attention message, which is a weighted mean over the neighbours, each
layer keeps neighbour densities that attention cannot express: sums over the
neighbours (not means), each term faded by the cutoff, of learned radial channels
alone (l = 0) and times the spherical harmonics of the direction to the neighbour
(l = 1 .. ``max_angular``). The l = 0 sums and, for each l, the dot products of
every pair of channels are rotation invariant (a power spectrum: sums over pairs of
neighbours of their channels times the Legendre polynomial of the angle between
them); they say how many neighbours there are at which distances and in which
arrangement, which is what energies, forces and stress depend on. The radial basis
is scaled to unit mean square within the cutoff, so that the weights of keys,
values and densities learn from inputs of unit size. Forces and stress come from
autograd, in training and in the exported model alike. An atom's energy is the sum
of a readout of its state after every layer, each a small network on the state as it
is (not normalised: its size says how dense the neighbourhood is).

Older checkpoints load with the layout they were trained with: version 1 (before
the densities) weighted its l = 1 and l = 2 terms by the attention and had no
l = 0 sums (``angular_messages: attention``); version 2 took the squared norm of
each channel's l = 1 and l = 2 sums alone and did not normalise
(``angular_products: norms``, ``normalize_radial: false``); version 3 read the
energy out of the last layer's state alone, after a LayerNorm
(``readout_layers: last``, ``readout_norm: true``).
"""

import dataclasses
import math
from typing import Any, Dict, List, Literal, Tuple

import torch
from metatomic.torch import NeighborListOptions

from hpctrain.config import option
from hpctrain.model import ReferenceModel


@dataclasses.dataclass
class ModelHypers:
    """Model hypers of ``mp_transformer``."""

    cutoff: float = option(5.0, doc="Radius of the neighbourhood, in angstrom.")
    d_model: int = option(64, doc="Width of the atom states.")
    num_heads: int = option(4, doc="Attention heads; must divide ``d_model``.")
    num_layers: int = option(2, doc="Message-passing layers.")
    num_radial: int = option(8, doc="Radial (Bessel) basis functions.")
    angular_channels: int = option(
        16, doc="Channels of each neighbour density (l = 0 .. max_angular) per layer."
    )
    angular_messages: Literal["densities", "attention"] = option(
        "densities",
        doc="'densities': l=0, 1 and 2 sums over the neighbours, faded by the cutoff; "
        "'attention': l=1 and 2 means weighted by the attention (the layout of "
        "checkpoint version 1, which loads with it).",
    )
    max_angular: int = option(
        2,
        doc="Highest degree of the spherical harmonics in the angular densities "
        "(degrees 1 .. max_angular); their products resolve the angle between two "
        "neighbours as Legendre polynomials of its cosine up to this degree, as a "
        "power spectrum's l does. 3 or 4 learned ethanol's forces better and BaTiO3's "
        "energies and stress worse in the accuracy benchmark (docs/benchmarks.rst).",
    )
    angular_products: Literal["pairs", "norms"] = option(
        "pairs",
        doc="Invariants of the angular densities: 'pairs', the dot product of every "
        "pair of channels (angular_channels**2 per degree: how the channels' "
        "directions relate, the three-body information of a power spectrum); "
        "'norms', each channel's squared norm alone (the layout of checkpoint "
        "version 2; max_angular 2).",
    )
    normalize_radial: bool = option(
        True,
        doc="Scale each radial function to unit mean square over neighbours spread "
        "evenly within the cutoff (6.7 times the plain Bessel function at 5 A). "
        "Without it (checkpoints of version 2 and before) the keys, values and "
        "densities learn from inputs a tenth of unit size, and more slowly "
        "(docs/benchmarks.rst, mp_transformer version 3).",
    )
    readout_layers: Literal["all", "last"] = option(
        "all",
        doc="'all': an atom's energy is the sum of a readout of its state after every "
        "layer (a one-hidden-layer network per layer); 'last': of the last layer's "
        "state alone (checkpoints of version 3 and before).",
    )
    readout_norm: bool = option(
        False,
        doc="A LayerNorm of the state before each readout (checkpoints of version 3 "
        "and before). It divides out the state's size, which grows with the "
        "neighbour densities (docs/benchmarks.rst, mp_transformer version 4).",
    )
    density_scale: float = option(
        0.3,
        doc="Factor on every neighbour's term in the neighbour densities. The "
        "densities are sums, so they grow with the number of neighbours (about 50 "
        "within 5 A in a dense metal); this keeps them near unit size.",
    )

    def validate(self, path: str, source: str) -> None:
        from hpctrain.errors import OptionsError

        if self.d_model % self.num_heads:
            raise OptionsError(
                f"'{path}.num_heads' ({self.num_heads}) must divide "
                f"'{path}.d_model' ({self.d_model}) in {source}"
            )
        if self.cutoff <= 0 or self.num_layers < 1:
            raise OptionsError(f"'{path}': cutoff must be positive and num_layers >= 1")
        if self.max_angular < 1 or (self.angular_products == "norms" and self.max_angular != 2):
            raise OptionsError(
                f"'{path}.max_angular' must be at least 1, and 2 with angular_products "
                f"'norms'; got {self.max_angular} in {source}"
            )
        if not self.density_scale > 0:
            raise OptionsError(
                f"'{path}.density_scale' must be positive, got {self.density_scale} in "
                f"{source}; the default is 0.3"
            )


def radial_normalization(num_radial: int, cutoff: float) -> torch.Tensor:
    """The factors ``[num_radial]`` (float64) that give each radial function
    ``sin(n pi r / c) / r``, faded by the cosine cutoff, unit mean square over
    neighbours spread evenly within the cutoff sphere (weight ``r**2``). The mean
    square is ``3 / c**3`` times the integral of ``sin(n pi r / c)**2`` times the
    squared fade, ``15 / (32 c**2)`` for ``n = 1`` and ``9 / (16 c**2)`` beyond: a
    closed form, so every process builds the same model bit for bit."""
    factors = [cutoff * math.sqrt(32 / 15)] + [cutoff * 4 / 3] * (num_radial - 1)
    return torch.tensor(factors[:num_radial], dtype=torch.float64)


def solid_harmonics(degree: int) -> List[Dict[Tuple[int, int, int], float]]:
    """The ``2 l + 1`` real solid harmonics of degree ``l``, as polynomials
    ``{(i, j, k): coefficient of x**i y**j z**k}``, normalised as Racah's (so that
    on unit vectors ``sum_m S_m(u) S_m(v)`` is the Legendre polynomial of ``u . v``);
    the closed form of Helgaker, Jorgensen and Olsen, Molecular Electronic-Structure
    Theory, eq. 6.4.48."""
    harmonics = []
    for m in range(-degree, degree + 1):
        am, twice_vm = abs(m), (0 if m >= 0 else 1)
        norm = math.sqrt(
            2 * math.factorial(degree + am) * math.factorial(degree - am) / (2 if m == 0 else 1)
        ) / (2**am * math.factorial(degree))
        polynomial: Dict[Tuple[int, int, int], float] = {}
        for t in range((degree - am) // 2 + 1):
            for u in range(t + 1):
                for twice_v in range(twice_vm, am + 1, 2):  # v = v_m, v_m + 1, ...
                    sign = (-1) ** (t + (twice_v - twice_vm) // 2)
                    coefficient = (
                        sign
                        * 0.25**t
                        * math.comb(degree, t)
                        * math.comb(degree - t, am + t)
                        * math.comb(t, u)
                        * math.comb(am, twice_v)
                    )
                    power = (2 * t + am - 2 * u - twice_v, 2 * u + twice_v, degree - 2 * t - am)
                    polynomial[power] = polynomial.get(power, 0.0) + norm * coefficient
        harmonics.append(polynomial)
    return harmonics


def spherical_harmonics_basis(
    max_degree: int,
) -> Tuple[torch.Tensor, torch.Tensor, List[Tuple[int, int]]]:
    """Real spherical harmonics of degree 1 .. ``max_degree`` as polynomials of a
    unit vector: the exponents ``[M, 3]`` of the monomials ``x**i y**j z**k`` of
    each degree, the ``[H, M]`` coefficients (float64) of the ``2 l + 1`` harmonics
    of each degree (:func:`solid_harmonics`), and each degree's ``[start, stop)``
    among the ``H`` harmonics. Within a degree, ``Y(u) . Y(v) = P_l(u . v)``, so the
    dot products of sums over neighbours are the angular terms of a power
    spectrum."""
    exponents = [
        (i, j, k - i - j)
        for k in range(1, max_degree + 1)
        for i in range(k, -1, -1)
        for j in range(k - i, -1, -1)
    ]
    column = {power: n for n, power in enumerate(exponents)}
    rows: List[List[float]] = []
    degrees: List[Tuple[int, int]] = []
    for degree in range(1, max_degree + 1):
        degrees.append((len(rows), len(rows) + 2 * degree + 1))
        for polynomial in solid_harmonics(degree):
            row = [0.0] * len(exponents)
            for power, coefficient in polynomial.items():
                row[column[power]] = coefficient
            rows.append(row)
    return torch.tensor(exponents), torch.tensor(rows, dtype=torch.float64), degrees


def readout_network(d_model: int, n_targets: int, norm: bool) -> torch.nn.Sequential:
    """An atom's state to its raw outputs: one hidden layer of ``d_model`` (after a
    LayerNorm with ``norm``; an identity in its place otherwise, so that the layers'
    names in checkpoints are the same either way)."""
    return torch.nn.Sequential(
        torch.nn.LayerNorm(d_model) if norm else torch.nn.Identity(),
        torch.nn.Linear(d_model, d_model),
        torch.nn.SiLU(),
        torch.nn.Linear(d_model, n_targets),
    )


class AttentionLayer(torch.nn.Module):
    degrees: List[Tuple[int, int]]  # (for TorchScript, which cannot type an empty list)

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        num_radial: int,
        angular: int,
        densities: bool,
        density_scale: float,
        degrees: List[Tuple[int, int]],
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.angular = angular
        self.densities = densities
        self.density_scale = density_scale
        # with pairs: the harmonics [start, stop) of each degree l = 1, 2, ...
        self.degrees = degrees
        n_degrees = len(degrees) if degrees else 2
        channels = d_model + (n_degrees + (1 if densities else 0)) * angular
        invariants = n_degrees * (angular * angular if degrees else angular)
        n_features = d_model + (angular if densities else 0) + invariants
        self.norm = torch.nn.LayerNorm(d_model)
        self.query = torch.nn.Linear(d_model, d_model)
        self.key = torch.nn.Linear(d_model, d_model)
        self.value = torch.nn.Linear(d_model, channels)
        self.radial_key = torch.nn.Linear(num_radial, d_model)
        self.radial_value = torch.nn.Linear(num_radial, channels)
        self.out = torch.nn.Linear(n_features, d_model)
        self.feed_forward = torch.nn.Sequential(
            torch.nn.LayerNorm(d_model),
            torch.nn.Linear(d_model, 2 * d_model),
            torch.nn.SiLU(),
            torch.nn.Linear(2 * d_model, d_model),
        )

    def forward(
        self,
        h: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        radial: torch.Tensor,
        smooth: torch.Tensor,
        unit: torch.Tensor,
        harmonics: torch.Tensor,
        degree_of: torch.Tensor,
    ) -> torch.Tensor:
        n_atoms, n_edges = h.shape[0], centers.shape[0]
        heads, dim = self.num_heads, self.head_dim
        x = self.norm(h)
        q = self.query(x)[centers].view(n_edges, heads, dim)
        k = (self.key(x)[neighbors] + self.radial_key(radial)).view(n_edges, heads, dim)
        v = self.value(x)[neighbors] * self.radial_value(radial)
        scores = (q * k).sum(-1) / math.sqrt(dim)  # [edges, heads]
        # attention with a sink of score 0: weights -> 0 smoothly as smooth -> 0
        shift = torch.zeros(n_atoms, heads, dtype=h.dtype, device=h.device)
        shift = shift.scatter_reduce(
            0,
            centers.unsqueeze(1).expand(n_edges, heads),
            scores.detach(),
            "amax",
            include_self=True,
        )
        weights = smooth.unsqueeze(1) * torch.exp(scores - shift[centers])
        total = torch.exp(-shift).index_add(0, centers, weights)
        alpha = weights / total[centers]  # [edges, heads]

        d_model = heads * dim
        scalar = (alpha.unsqueeze(2) * v[:, :d_model].view(n_edges, heads, dim)).reshape(
            n_edges, d_model
        )
        a = self.angular
        if self.densities:  # sums over the neighbours, faded by the cutoff
            channels = (self.density_scale * smooth).unsqueeze(1) * v[:, d_model:]
        else:  # (version 1) weighted by the attention
            channels = alpha.mean(1, keepdim=True) * v[:, d_model:]
        message = h.new_zeros(n_atoms, d_model).index_add(0, centers, scalar)
        if self.degrees:  # dot products of every pair of channels, per degree
            n_l0 = channels.shape[1] - len(self.degrees) * a
            per_degree = channels[:, n_l0:].reshape(n_edges, len(self.degrees), a)
            terms = per_degree.index_select(1, degree_of) * harmonics.unsqueeze(2)
            sums = h.new_zeros(n_atoms, harmonics.shape[1], a).index_add(0, centers, terms)
            invariants = []
            for start, stop in self.degrees:
                density = sums[:, start:stop]  # [atoms, harmonics of degree l, a]
                gram = torch.bmm(density.transpose(1, 2), density)
                invariants.append(gram.reshape(n_atoms, a * a))
        else:  # (version 2 and before) squared norms of l = 1 and 2 sums
            n_l0 = channels.shape[1] - 2 * a  # a with densities, else none
            eye = torch.eye(3, dtype=h.dtype, device=h.device)
            traceless = unit.unsqueeze(2) * unit.unsqueeze(1) - eye / 3
            v1 = channels[:, n_l0 : n_l0 + a].unsqueeze(2) * unit.unsqueeze(1)
            v2 = channels[:, n_l0 + a :].unsqueeze(2) * traceless.reshape(n_edges, 1, 9)
            l1 = h.new_zeros(n_atoms, a, 3).index_add(0, centers, v1)
            l2 = h.new_zeros(n_atoms, a, 9).index_add(0, centers, v2)
            invariants = [(l1 * l1).sum(-1), (l2 * l2).sum(-1)]
        l0 = h.new_zeros(n_atoms, n_l0).index_add(0, centers, channels[:, :n_l0])
        features = torch.cat([message, l0] + invariants, dim=1)
        h = h + self.out(features)
        return h + self.feed_forward(h)


class MessagePassingTransformer(ReferenceModel):
    """See the module doc. Hypers: :class:`ModelHypers`."""

    __hypers__ = ModelHypers
    __checkpoint_version__ = 4  # 2: densities; 3: pairs, normalize_radial; 4: readouts
    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float32, torch.float64]

    def __init__(self, hypers, dataset_info):
        super().__init__(hypers, dataset_info)
        c = self.config
        self.cutoff = float(c.cutoff)
        self.num_layers = int(c.num_layers)
        self.neighbor_options = NeighborListOptions(cutoff=self.cutoff, full_list=True, strict=True)
        self.embedding = torch.nn.Embedding(len(self.atomic_types), c.d_model)
        self.register_buffer(
            "frequencies",
            math.pi / self.cutoff * torch.arange(1, c.num_radial + 1, dtype=torch.float32),
        )
        radial_norm = radial_normalization(c.num_radial, self.cutoff)
        if not c.normalize_radial:
            radial_norm = torch.ones_like(radial_norm)
        self.max_angular = int(c.max_angular)
        degrees: List[Tuple[int, int]] = []
        exponents = torch.zeros(0, 3, dtype=torch.long)
        projection = torch.zeros(0, 0, dtype=torch.float64)
        if c.angular_products == "pairs":
            exponents, projection, degrees = spherical_harmonics_basis(self.max_angular)
        degree_of = [d for d, (start, stop) in enumerate(degrees) for _ in range(start, stop)]
        # functions of the hypers in closed form: recomputed, not kept in checkpoints
        self.register_buffer("radial_norm", radial_norm, persistent=False)
        self.register_buffer("monomial_exponents", exponents, persistent=False)
        self.register_buffer("harmonic_coefficients", projection, persistent=False)
        self.register_buffer(
            "degree_of", torch.tensor(degree_of, dtype=torch.long), persistent=False
        )
        self.layers = torch.nn.ModuleList(
            [
                AttentionLayer(
                    c.d_model,
                    c.num_heads,
                    c.num_radial,
                    c.angular_channels,
                    c.angular_messages == "densities",
                    c.density_scale,
                    degrees,
                )
                for _ in range(c.num_layers)
            ]
        )
        n_targets = len(self.target_names)
        self.readout = readout_network(c.d_model, n_targets, c.readout_norm)  # last layer's
        earlier = c.num_layers - 1 if c.readout_layers == "all" else 0
        self.layer_readouts = torch.nn.ModuleList(
            [readout_network(c.d_model, n_targets, c.readout_norm) for _ in range(earlier)]
        )

    @classmethod
    @torch.jit.unused
    def upgrade_hypers(cls, hypers: Dict[str, Any], version: int) -> Dict[str, Any]:
        if version < 2:  # before the neighbour densities
            hypers = {**hypers, "angular_messages": "attention"}
        if version < 3:  # before the channel pairs and the normalisation
            old = {"angular_products": "norms", "normalize_radial": False, "max_angular": 2}
            hypers = {**hypers, **old}
        if version < 4:  # before the readouts of every layer
            hypers = {**hypers, "readout_layers": "last", "readout_norm": True}
        return hypers

    @property
    @torch.jit.unused
    def interaction_range(self) -> float:
        return self.cutoff * self.num_layers

    @torch.jit.unused
    def output_layers(self) -> List[str]:
        last = len(self.readout) - 1
        earlier = [f"layer_readouts.{i}.{last}" for i in range(len(self.layer_readouts))]
        return [f"readout.{last}"] + earlier

    @torch.jit.unused
    def head_modules(self) -> List[str]:
        return ["readout"] + [f"layer_readouts.{i}" for i in range(len(self.layer_readouts))]

    def radial_basis(
        self, distances: torch.Tensor, safe: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The radial basis ``[pairs, num_radial]`` of the pair ``distances``, faded
        by the cosine cutoff, and that fade ``[pairs]``; ``safe`` are the distances
        with those below 1e-6 set to 1 (the divisor)."""
        smooth = torch.where(
            distances < self.cutoff,
            0.5 * (torch.cos(math.pi * distances / self.cutoff) + 1.0),
            torch.zeros_like(distances),
        )
        radial = torch.sin(self.frequencies * safe.unsqueeze(1)) / safe.unsqueeze(1)
        norm = self.radial_norm.to(distances.dtype)  # (float64 until the model is cast)
        return radial * (norm * smooth.unsqueeze(1)), smooth

    def angular_basis(self, unit: torch.Tensor) -> torch.Tensor:
        """``[pairs, H]``: the spherical harmonics of the unit vectors (see
        :func:`spherical_harmonics_basis`; none with ``angular_products: norms``)."""
        exponents = self.monomial_exponents
        if exponents.shape[0] == 0:
            return unit.new_zeros(unit.shape[0], 0)
        powers = [torch.ones_like(unit)]
        for _ in range(self.max_angular):  # products, not pow: finite gradients at 0
            powers.append(powers[-1] * unit)
        table = torch.stack(powers, dim=1)  # [pairs, degree, xyz]
        monomials = (
            table[:, :, 0].index_select(1, exponents[:, 0])
            * table[:, :, 1].index_select(1, exponents[:, 1])
            * table[:, :, 2].index_select(1, exponents[:, 2])
        )
        return monomials @ self.harmonic_coefficients.to(unit.dtype).t()

    def atomic_outputs(
        self,
        type_index: torch.Tensor,
        centers_: torch.Tensor,
        neighbors_: torch.Tensor,
        vectors_: torch.Tensor,
        type_counts: List[int],
    ) -> torch.Tensor:
        distances = torch.linalg.vector_norm(vectors_, dim=1)
        safe = torch.where(distances > 1e-6, distances, torch.ones_like(distances))
        radial, smooth = self.radial_basis(distances, safe)
        unit = vectors_ / safe.unsqueeze(1)
        harmonics = self.angular_basis(unit)

        h = self.embedding(type_index)
        states: List[torch.Tensor] = []
        for layer in self.layers:
            h = layer(h, centers_, neighbors_, radial, smooth, unit, harmonics, self.degree_of)
            states.append(h)
        outputs = self.readout(h)
        for i, readout in enumerate(self.layer_readouts):  # of the layers before the last
            outputs = outputs + readout(states[i])
        return outputs
