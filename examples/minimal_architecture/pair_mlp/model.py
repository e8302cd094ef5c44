"""An MLP on two-body features: the smallest useful model on the architecture API.

Each atom is described by the sum, over its neighbours within ``cutoff``, of a
smooth radial basis of their distance, one block per neighbour element, next to a
one-hot code of its own element. An MLP maps this descriptor to the atom's energy;
the structure's energy is the sum. Forces and stress come from autograd.

``atomic_outputs`` is the model's core: it sees the atoms and neighbour pairs of a
whole batch at once (no loop over structures), in training and in MD engines alike.
Everything else (composition baseline, metatomic outputs, the batch path of
training, checkpoints, restart, export) is inherited from
:class:`hpctrain.model.ReferenceModel`.

TorchScript compiles this file when the model is exported: annotations use
``typing.List``.
"""

# ruff: noqa: UP006, UP035

import dataclasses
import math
from typing import List

import torch
from metatomic.torch import NeighborListOptions

from hpctrain.config import option
from hpctrain.errors import OptionsError
from hpctrain.model import ReferenceModel


@dataclasses.dataclass
class ModelHypers:
    """Model hypers of ``pair_mlp``."""

    cutoff: float = option(4.0, doc="Radius of the neighbourhood, in angstrom.")
    num_radial: int = option(6, doc="Radial basis functions per neighbour element.")
    hidden: int = option(32, doc="Width of the two hidden layers of the MLP.")

    def validate(self, path: str, source: str) -> None:
        if self.cutoff <= 0 or self.num_radial < 1 or self.hidden < 1:
            raise OptionsError(
                f"'{path}' in {source}: cutoff must be positive, num_radial and hidden >= 1"
            )


class PairMLP(ReferenceModel):
    """See the module doc. Hypers: :class:`ModelHypers`."""

    __hypers__ = ModelHypers

    def __init__(self, hypers, dataset_info):
        super().__init__(hypers, dataset_info)
        self.cutoff = float(self.config.cutoff)
        self.num_types = len(self.atomic_types)
        self.neighbor_options = NeighborListOptions(cutoff=self.cutoff, full_list=True, strict=True)
        n = self.config.num_radial
        frequencies = math.pi / self.cutoff * torch.arange(1, n + 1, dtype=torch.float32)
        self.register_buffer("frequencies", frequencies)
        width = self.config.hidden
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(self.num_types * (n + 1), width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, width),
            torch.nn.SiLU(),
            torch.nn.Linear(width, len(self.target_names)),
        )

    @property
    @torch.jit.unused
    def interaction_range(self) -> float:
        return self.cutoff

    @torch.jit.unused
    def output_layers(self) -> List[str]:
        return ["mlp.4"]  # (one row per target; fine-tuning's heads)

    def atomic_outputs(
        self,
        type_index: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        vectors: torch.Tensor,
        type_counts: List[int],
    ) -> torch.Tensor:
        distances = torch.linalg.vector_norm(vectors, dim=1)
        # Bessel-like basis times a cosine cutoff: zero value and slope at the cutoff
        smooth = 0.5 * (torch.cos(math.pi * distances / self.cutoff) + 1.0)
        radial = torch.sin(self.frequencies * distances.unsqueeze(1))
        radial = radial * (smooth / distances).unsqueeze(1)
        n_atoms, n_radial = type_index.shape[0], self.frequencies.shape[0]
        # sum over neighbours, into the block of the neighbour's element
        blocks = torch.zeros(
            n_atoms * self.num_types, n_radial, dtype=radial.dtype, device=radial.device
        )
        blocks = blocks.index_add(0, centers * self.num_types + type_index[neighbors], radial)
        own = torch.nn.functional.one_hot(type_index, self.num_types).to(radial.dtype)
        return self.mlp(torch.cat([own, blocks.reshape(n_atoms, -1)], dim=1))
