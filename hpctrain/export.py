"""Turning a trained torch model into a metatomic ``AtomisticModel``."""

from __future__ import annotations

import torch
from metatomic.torch import AtomisticModel, ModelCapabilities, ModelMetadata, ModelOutput

from .architecture import DatasetInfo

_DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32", torch.float16: "float16"}


def capabilities(
    dataset_info: DatasetInfo,
    interaction_range: float,
    supported_devices: list[str],
    dtype: torch.dtype,
) -> ModelCapabilities:
    """What the exported model computes, for which elements, in which units."""
    outputs = {
        name: ModelOutput(unit=target.unit, sample_kind="atom" if target.per_atom else "system")
        for name, target in dataset_info.targets.items()
    }
    return ModelCapabilities(
        outputs=outputs,
        atomic_types=list(dataset_info.atomic_types),
        interaction_range=float(interaction_range),
        length_unit=dataset_info.length_unit,
        supported_devices=list(supported_devices),
        dtype=_DTYPE_NAMES[dtype],
    )


def export(
    module: torch.nn.Module,
    dataset_info: DatasetInfo,
    interaction_range: float,
    supported_devices: list[str],
    metadata: ModelMetadata | None = None,
) -> AtomisticModel:
    """Wrap ``module`` (in eval mode, on CPU, in its own dtype) for MD engines."""
    module = module.to("cpu").eval()
    dtype = next(module.parameters()).dtype
    return AtomisticModel(
        module,
        metadata or ModelMetadata(),
        capabilities(dataset_info, interaction_range, supported_devices, dtype),
    )
