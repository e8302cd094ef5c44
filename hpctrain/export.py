"""Turning a trained torch model into a metatomic ``AtomisticModel``, and writing it
(``model.pt`` with the TorchScript extensions it needs)."""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

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
        name: ModelOutput(
            unit=target.unit,
            sample_kind="atom" if target.per_atom else "system",
            description=describe_output(name, target.unit),
        )
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


def describe_output(name: str, unit: str) -> str:
    """What an output is, in words (metatomic shows it to users choosing a variant)."""
    base, _, variant = name.partition("/")
    if variant:
        return f"{base} of the '{variant}' level of theory (variant of '{base}'), in {unit}"
    return f"{name}, in {unit}"


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
        metadata if metadata is not None else ModelMetadata(),
        capabilities(dataset_info, interaction_range, supported_devices, dtype),
    )


def with_metadata(model: Any, metadata: ModelMetadata) -> AtomisticModel:
    """``model.export()`` carrying ``metadata`` (name, authors, references, description).

    The architecture API's ``export()`` takes no argument; hpctrain's models accept
    ``export(metadata: Optional[ModelMetadata])``. For the others, ``metadata`` is
    merged into what their export wrote: given fields replace, authors and
    references add up.
    """
    if "metadata" in inspect.signature(model.export).parameters:
        return model.export(metadata=metadata)
    exported = model.export()
    own = exported.metadata()
    references = {k: list(v) for k, v in own.references.items()}
    for kind, entries in metadata.references.items():
        references.setdefault(kind, []).extend(e for e in entries if e not in references[kind])
    merged = ModelMetadata(
        name=metadata.name or own.name,
        description=metadata.description or own.description,
        authors=list(own.authors) + [a for a in metadata.authors if a not in own.authors],
        references=references,
    )
    return AtomisticModel(exported.module, merged, exported.capabilities())


def export_model(model: Any, run_dir: Path, metadata: Any = None, name: str = "model.pt") -> Path:
    """``model.pt`` (or ``name``) and the TorchScript extensions it needs, in
    ``run_dir``; ``metadata``: a metatomic ``ModelMetadata`` to carry."""
    from .systems import OWN_LIBRARIES

    path = run_dir / name
    atomistic = model.export() if metadata is None else with_metadata(model, metadata)
    # under a temporary name first: an interrupted export leaves no partial model
    partial = run_dir / f".{name}.partial"
    # metatomic lists every TorchScript library this process loaded as one the model
    # requires; those hpctrain loaded for training alone are left out, so that a model
    # exported by a run and by 'hpctrain export' (a fresh process) requires the same
    loaded = torch.ops.loaded_libraries
    try:
        torch.ops.loaded_libraries = loaded - OWN_LIBRARIES
        atomistic.save(str(partial), collect_extensions=str(run_dir / "extensions"))
        os.replace(partial, path)
    finally:
        torch.ops.loaded_libraries = loaded
        partial.unlink(missing_ok=True)
    return path
