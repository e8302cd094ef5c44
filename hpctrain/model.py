"""What the reference models share: energy heads with a composition baseline,
metatomic outputs, a batch path for training, checkpoints, restart and export.

A subclass declares ``__hypers__`` (a dataclass of its model hypers), its
``neighbor_options`` (one neighbour list), ``interaction_range`` and its core,
``atomic_outputs``, which maps the atoms and neighbour pairs of many structures at
once to one raw per-atom value per target. Training calls the core through
``forward_batch`` on a batch's tensors; MD engines and metatomic call ``forward``
on metatomic ``System`` objects, which gathers the same tensors from them and calls the same core.
It also names its ``output_layers`` (one row per target), which fine-tuning trains,
copies and leaves without adapters. Everything else lives here, once.
"""

from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from metatensor.torch import Labels, TensorBlock, TensorMap
from metatomic.torch import (
    AtomisticModel,
    ModelMetadata,
    ModelOutput,
    NeighborListOptions,
    System,
)

from . import checkpoint
from .architecture import DatasetInfo, ModelInterface
from .config import parse
from .errors import ArchitectureError, CheckpointError


def batched_pairs(
    systems: List[System], options: NeighborListOptions
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The atoms and neighbour pairs of all ``systems`` as one batch: the atomic
    types ``[atoms]``, the centre and neighbour of each pair ``[pairs]`` (indices
    into the batch's atoms) and the pair vectors ``[pairs, 3]``."""
    types, centers, neighbors, vectors = [], [], [], []
    offset = 0
    for system in systems:
        pairs = system.get_neighbor_list(options)
        samples = pairs.samples.values
        types.append(system.types)
        centers.append(samples[:, 0].long() + offset)
        neighbors.append(samples[:, 1].long() + offset)
        vectors.append(pairs.values.reshape(-1, 3))
        offset += len(system)
    return torch.cat(types), torch.cat(centers), torch.cat(neighbors), torch.cat(vectors)


def architecture_of(cls: type) -> str:
    """The architecture module (``architectures.<name>``) that defines ``cls``."""
    return cls.__module__.rsplit(".", 1)[0]


class ReferenceModel(torch.nn.Module, ModelInterface):
    """Base of hpctrain's reference models; see the module doc."""

    __hypers__: Any = None
    __checkpoint_version__ = 1
    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float32, torch.float64]

    def __init__(self, hypers: Dict[str, Any], dataset_info: DatasetInfo):
        super().__init__()
        self.hypers = dict(hypers)
        self.config = parse(self.__hypers__, hypers, "architecture.model")
        self.dataset_info = dataset_info
        self.atomic_types: List[int] = list(dataset_info.atomic_types)
        self.target_names: List[str] = list(dataset_info.targets)
        n_types, n_targets = len(self.atomic_types), len(self.target_names)
        type_map = torch.full((max(self.atomic_types) + 1,), -1, dtype=torch.long)
        type_map[torch.tensor(self.atomic_types)] = torch.arange(n_types)
        self.register_buffer("type_map", type_map)
        self.register_buffer("composition", torch.zeros(n_targets, n_types))
        self.register_buffer("scale", torch.ones(n_targets))

    # -- to be provided by subclasses -------------------------------------------------

    @property
    def interaction_range(self) -> float:
        raise NotImplementedError

    def atomic_outputs(
        self,
        type_index: torch.Tensor,
        centers: torch.Tensor,
        neighbors: torch.Tensor,
        vectors: torch.Tensor,
        type_counts: List[int],
    ) -> torch.Tensor:
        """``[atoms, n_targets]`` raw per-atom outputs of many structures' atoms.

        :param type_index: each atom's element, as a position in ``atomic_types``
        :param centers: the centre atom of each pair of ``neighbor_options``
        :param neighbors: the neighbour atom of each pair
        :param vectors: ``[pairs, 3]`` from centre to neighbour (differentiable)
        :param type_counts: atoms of each element (as known on the host)
        """
        raise NotImplementedError

    @torch.jit.unused
    def output_layers(self) -> List[str]:
        """The linear layers whose outputs are the targets, one row per target."""
        raise NotImplementedError

    # -- shared -----------------------------------------------------------------------

    @torch.jit.unused
    def head_modules(self) -> List[str]:
        """The modules that map an atom's features to its outputs (what fine-tuning
        with ``method: heads`` trains); by default the output layers."""
        return self.output_layers()

    @torch.jit.unused
    def set_baseline(
        self, target: str, weights: torch.Tensor, scale: Optional[float] = None
    ) -> None:
        """Per-element energies of ``target`` and the scale of the network's output
        (None: kept)."""
        i = self.target_names.index(target)
        self.composition[i] = weights.to(self.composition)
        if scale is not None:
            self.scale[i] = scale

    @torch.jit.unused
    @torch.no_grad()
    def inherit_head(self, target: str, source: str) -> None:
        """``target``'s head, composition baseline and scale become copies of
        ``source``'s."""
        i, j = self.target_names.index(target), self.target_names.index(source)
        modules = dict(self.named_modules())
        rows = [self.composition, self.scale]
        for name in self.output_layers():
            layer = modules[name]
            rows += [layer.weight] + ([layer.bias] if layer.bias is not None else [])
        for tensor in rows:
            tensor[i] = tensor[j]

    def requested_neighbor_lists(self) -> List[NeighborListOptions]:
        return [self.neighbor_options]

    def atomic_energies(self, raw: torch.Tensor, type_index: torch.Tensor) -> torch.Tensor:
        """``[atoms, n_targets]``: the network's outputs scaled, plus the baseline."""
        return raw * self.scale + self.composition.t().index_select(0, type_index)

    @torch.jit.unused
    def forward_batch(self, batch: Any, vectors: List[torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The energy ``[structures]`` of every target for a batch
        (:class:`hpctrain.data.batch.Batch`) and its pair ``vectors``."""
        type_index = self.type_map.index_select(0, batch.types.long())
        counts = [batch.element_counts.get(z, 0) for z in self.atomic_types]
        pairs = batch.pairs[0]
        raw = self.atomic_outputs(type_index, pairs.centers, pairs.neighbors, vectors[0], counts)
        energies = self.atomic_energies(raw, type_index)
        totals = torch.zeros(
            len(batch), energies.shape[1], dtype=energies.dtype, device=energies.device
        ).index_add(0, batch.system, energies)
        return {name: totals[:, i] for i, name in enumerate(self.target_names)}

    def forward(
        self,
        systems: List[System],
        outputs: Dict[str, ModelOutput],
        selected_atoms: Optional[Labels] = None,
    ) -> Dict[str, TensorMap]:
        types, centers, neighbors, vectors = batched_pairs(systems, self.neighbor_options)
        type_index = self.type_map[types.long()]
        counts: List[int] = torch.bincount(type_index, minlength=len(self.atomic_types)).tolist()
        raw = self.atomic_outputs(type_index, centers, neighbors, vectors, counts)
        energies = self.atomic_energies(raw, type_index)
        device = raw.device
        system_index = torch.cat(
            [
                torch.full((len(s),), i, dtype=torch.long, device=device)
                for i, s in enumerate(systems)
            ]
        )
        atom_index = torch.cat([torch.arange(len(s), device=device) for s in systems])
        keep = torch.ones(len(atom_index), dtype=torch.bool, device=device)
        if selected_atoms is not None:
            wanted = selected_atoms.values.to(device)
            stride = int(atom_index.max().item()) + 1 if len(atom_index) > 0 else 1
            keep = torch.isin(
                system_index * stride + atom_index, wanted[:, 0] * stride + wanted[:, 1]
            )
        results: Dict[str, TensorMap] = {}
        for i, name in enumerate(self.target_names):
            if name not in outputs:
                continue
            energy = energies[:, i]
            if outputs[name].sample_kind == "atom":
                values = energy[keep].unsqueeze(1)
                samples = Labels(
                    ["system", "atom"],
                    torch.stack([system_index[keep], atom_index[keep]], dim=1).to(torch.int32),
                )
            else:
                values = torch.zeros(len(systems), 1, dtype=energy.dtype, device=device)
                values = values.index_add(0, system_index[keep], energy[keep].unsqueeze(1))
                samples = Labels(
                    ["system"],
                    torch.arange(len(systems), device=device, dtype=torch.int32).unsqueeze(1),
                )
            block = TensorBlock(
                values=values,
                samples=samples,
                components=[],
                properties=Labels(["energy"], torch.zeros(1, 1, dtype=torch.int32, device=device)),
            )
            keys = Labels(["_"], torch.zeros(1, 1, dtype=torch.int32, device=device))
            results[name] = TensorMap(keys, [block])
        return results

    @torch.jit.unused
    def checkpoint_payload(self) -> Dict[str, Any]:
        return {
            "architecture": architecture_of(type(self)),
            "model_version": self.__checkpoint_version__,
            "model_hypers": self.hypers,
            "dataset_info": self.dataset_info.to_dict(),
            "model_state": {k: v.cpu() for k, v in self.state_dict().items()},
        }

    @torch.jit.unused
    def save_checkpoint(self, path: Union[str, Path]) -> None:
        """A checkpoint holding the model alone (enough to export or fine-tune)."""
        checkpoint.save(self.checkpoint_payload(), path)

    @classmethod
    @torch.jit.unused
    def upgrade_hypers(cls, hypers: Dict[str, Any], version: int) -> Dict[str, Any]:
        """The hypers that build, in this version, the model a checkpoint of model
        version ``version`` holds with ``hypers`` (unchanged unless a new version
        changed what a hyper's default builds)."""
        return hypers

    @classmethod
    @torch.jit.unused
    def load_checkpoint(cls, path: Union[str, Path]) -> "ReferenceModel":
        data = checkpoint.load(path, architecture_of(cls))
        if data["model_version"] > cls.__checkpoint_version__:
            raise CheckpointError(
                f"{path} holds a {cls.__name__} of version {data['model_version']}, newer "
                f"than this hpctrain's {cls.__checkpoint_version__}; upgrade hpctrain"
            )
        hypers = cls.upgrade_hypers(data["model_hypers"], data["model_version"])
        model = cls(hypers, DatasetInfo.from_dict(data["dataset_info"]))
        # in the checkpoint's dtype first, so that loading does not round the weights
        model = model.to(data["model_state"]["composition"].dtype)
        model.load_state_dict(data["model_state"])
        return model

    @torch.jit.unused
    def restart(self, dataset_info: DatasetInfo) -> "ReferenceModel":
        """Continue training on new data.

        Same targets: fine-tuning, the model is returned as it is. New targets:
        transfer learning, a model with heads for the old and the new targets, whose
        shared weights and old heads come from this one. New elements are refused.
        """
        new_types = sorted(set(dataset_info.atomic_types) - set(self.atomic_types))
        if new_types:
            raise CheckpointError(
                f"the checkpoint's model does not know the elements {new_types} of the new "
                "data; train a new model, or remove those structures"
            )
        try:
            info = self.dataset_info.union(dataset_info)
        except ArchitectureError as error:
            raise CheckpointError(
                f"the new data does not fit the checkpoint's model: {error}; give a new "
                "target another name to learn it alongside"
            ) from None
        if list(info.targets) == self.target_names:
            self.dataset_info = info
            return self
        parameter = next(self.parameters())
        model = type(self)(self.hypers, info).to(device=parameter.device, dtype=parameter.dtype)
        transfer_weights(self, model, len(self.target_names))
        return model

    @torch.jit.unused
    def export(self, metadata: Optional[ModelMetadata] = None) -> AtomisticModel:
        from .export import export

        return export(
            self,
            self.dataset_info,
            self.interaction_range,
            list(self.__supported_devices__),
            metadata,
        )


@torch.no_grad()
def transfer_weights(old: torch.nn.Module, new: torch.nn.Module, n_old_targets: int) -> None:
    """Copy ``old``'s weights into ``new``, which has more targets.

    Tensors of the same shape are copied; tensors whose first dimension grew from
    the old to the new number of targets (heads, baselines) get their old rows.
    """
    old_state = old.state_dict()
    for name, tensor in new.state_dict().items():
        source = old_state.get(name)
        if source is None:
            continue
        if source.shape == tensor.shape:
            tensor.copy_(source)
        elif source.shape[1:] == tensor.shape[1:] and source.shape[0] == n_old_targets:
            tensor[:n_old_targets].copy_(source)
