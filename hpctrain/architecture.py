"""The architecture API: interfaces, dataset description, resolution and checks.

An architecture is a module exposing ``__model__``, ``__trainer__``, ``__authors__``
and ``__maintainers__``. ``architecture.name`` in the options is looked up as
``architectures.<name>`` first, then as an importable module path (a third-party
package).
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import pkgutil
from abc import ABC, abstractmethod
from pathlib import Path
from types import ModuleType
from typing import Any, Union

import torch

from .config import parse, to_dict
from .errors import ArchitectureError, OptionsError

GRADIENTS = ("positions", "strain")


@dataclasses.dataclass
class TargetInfo:
    """What a target is: quantity, unit, per-atom or per-structure, and gradients.

    ``gradients`` holds ``"positions"`` when forces are learned and ``"strain"`` when
    stress or virial is.
    """

    quantity: str = "energy"
    unit: str = "eV"
    per_atom: bool = False
    gradients: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class DatasetInfo:
    """What a model needs to know about the data it will see.

    Built from all training datasets together: the union of their atomic types and
    targets. Units are those of the data handed to the trainer.
    """

    length_unit: str = "angstrom"
    atomic_types: list[int] = dataclasses.field(default_factory=list)
    targets: dict[str, TargetInfo] = dataclasses.field(default_factory=dict)

    def union(self, other: DatasetInfo) -> DatasetInfo:
        """Types and targets of both; a target in both must agree."""
        if other.length_unit != self.length_unit:
            raise ArchitectureError(
                f"length units differ: {self.length_unit} and {other.length_unit}"
            )
        targets = dict(self.targets)
        for name, info in other.targets.items():
            mine = targets.get(name)
            if mine is None:
                targets[name] = info
                continue
            if (mine.quantity, mine.unit, mine.per_atom) != (
                info.quantity,
                info.unit,
                info.per_atom,
            ):
                raise ArchitectureError(
                    f"target '{name}' is described differently by two datasets: {mine} and {info}"
                )
            gradients = sorted(set(mine.gradients) | set(info.gradients))
            targets[name] = dataclasses.replace(mine, gradients=gradients)
        return DatasetInfo(
            length_unit=self.length_unit,
            atomic_types=sorted(set(self.atomic_types) | set(other.atomic_types)),
            targets=targets,
        )

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DatasetInfo:
        return cls(
            length_unit=data["length_unit"],
            atomic_types=list(data["atomic_types"]),
            targets={k: TargetInfo(**v) for k, v in data["targets"].items()},
        )


class ModelInterface(ABC):
    """What hpctrain calls on a model. ``__init__(model_hypers, dataset_info)``.

    A model need not be a ``torch.nn.Module``. ``__supported_devices__`` and
    ``__supported_dtypes__`` are sorted by preference.
    """

    __supported_devices__: list[str] = ["cuda", "cpu"]
    __supported_dtypes__: list[torch.dtype] = [torch.float64, torch.float32]

    @classmethod
    @abstractmethod
    def load_checkpoint(cls, path: Union[str, Path]) -> ModelInterface:
        """The model stored in a checkpoint."""

    @abstractmethod
    def restart(self, dataset_info: DatasetInfo) -> ModelInterface:
        """Continue training with the same or new targets (fine-tuning, transfer)."""

    @abstractmethod
    def export(self) -> Any:
        """A ``metatomic.torch.AtomisticModel`` ready to ``save()``."""


class TrainerInterface(ABC):
    """What hpctrain calls on a trainer. ``__init__(train_hypers)``."""

    @abstractmethod
    def train(
        self,
        model: Any,
        devices: list[torch.device],
        train_datasets: list[Any],
        val_datasets: list[Any],
        checkpoint_dir: str,
    ) -> None:
        """Train ``model`` in place."""

    @abstractmethod
    def save_checkpoint(self, path: Union[str, Path]) -> None:
        """Write everything needed to continue training to ``path``."""

    @classmethod
    @abstractmethod
    def load_checkpoint(
        cls, path: Union[str, Path], train_hypers: dict[str, Any]
    ) -> TrainerInterface:
        """A trainer that continues from a checkpoint."""


_CONSTANTS = ("__model__", "__trainer__", "__authors__", "__maintainers__")
_MODEL_METHODS = ("load_checkpoint", "restart", "export")
_TRAINER_METHODS = ("train", "load_checkpoint")


def _known_names() -> list[str]:
    import architectures

    return sorted(m.name for m in pkgutil.iter_modules(architectures.__path__))


def import_architecture(name: str) -> ModuleType:
    """``architectures.<name>`` first, then ``name`` as a module path."""
    if not name:
        raise ArchitectureError("'architecture.name' is empty")
    local = f"architectures.{name}"
    if "." not in name and importlib.util.find_spec(local) is not None:
        return importlib.import_module(local)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        known = _known_names()
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else "."
        raise ArchitectureError(
            f"unknown architecture '{name}' (at 'architecture.name'){hint} Built-in "
            f"architectures: {', '.join(known)}; a third-party architecture must be an "
            "importable module path such as 'mypackage.myarch'."
        )
    return importlib.import_module(name)


def validate_architecture(module: ModuleType) -> None:
    """Check the four constants and the required methods; name what is missing."""
    name = module.__name__
    missing = [c for c in _CONSTANTS if not hasattr(module, c)]
    if missing:
        raise ArchitectureError(
            f"architecture '{name}' does not define {', '.join(missing)} in its "
            "__init__.py (required by the architecture API)"
        )
    for constant in ("__authors__", "__maintainers__"):
        value = getattr(module, constant)
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, (list, tuple)) and len(v) == 2 for v in value
        )
        if not ok:
            raise ArchitectureError(
                f"architecture '{name}': {constant} must be a list of "
                "('Name <email>', '@github-handle') pairs"
            )
    for constant, methods in (("__model__", _MODEL_METHODS), ("__trainer__", _TRAINER_METHODS)):
        cls = getattr(module, constant)
        absent = [m for m in methods if not callable(getattr(cls, m, None))]
        if absent:
            raise ArchitectureError(
                f"architecture '{name}': {constant} ({getattr(cls, '__name__', cls)}) "
                f"lacks {', '.join(absent)}"
            )
    model, trainer = module.__model__, module.__trainer__
    if not (
        callable(getattr(trainer, "save_checkpoint", None))
        or callable(getattr(model, "save_checkpoint", None))
    ):
        raise ArchitectureError(
            f"architecture '{name}': neither __trainer__.save_checkpoint nor "
            "__model__.save_checkpoint is defined; one of them must write checkpoints"
        )
    for attribute, kind in (("__supported_devices__", str), ("__supported_dtypes__", torch.dtype)):
        value = getattr(model, attribute, None)
        valid = (
            isinstance(value, (list, tuple)) and value and all(isinstance(v, kind) for v in value)
        )
        if value is not None and not valid:
            raise ArchitectureError(
                f"architecture '{name}': __model__.{attribute} must be a non-empty list "
                f"of {kind.__name__}"
            )


@dataclasses.dataclass
class Architecture:
    """A validated architecture and its hypers, defaults merged under the user's."""

    name: str
    module: ModuleType
    model_hypers: dict[str, Any]
    training_hypers: dict[str, Any]

    @property
    def model_class(self) -> Any:
        return self.module.__model__

    @property
    def trainer_class(self) -> Any:
        return self.module.__trainer__


def _merge_hypers(cls: Any, given: dict[str, Any], path: str, source: str) -> dict[str, Any]:
    schema = getattr(cls, "__hypers__", None)
    if schema is None:
        return dict(given)
    return to_dict(parse(schema, given, path, source))


def resolve(
    name: str, model: dict[str, Any], training: dict[str, Any], source: str = ""
) -> Architecture:
    """Import, validate and merge default hypers (typed via ``__hypers__``)."""
    module = import_architecture(name)
    validate_architecture(module)
    return Architecture(
        name=name,
        module=module,
        model_hypers=_merge_hypers(module.__model__, model, "architecture.model", source),
        training_hypers=_merge_hypers(
            module.__trainer__, training, "architecture.training", source
        ),
    )


DTYPES = {16: torch.float16, 32: torch.float32, 64: torch.float64}


def choose_dtype(model_class: Any, base_precision: int | None) -> torch.dtype:
    """The requested precision if the model supports it, else its first preference."""
    supported = list(getattr(model_class, "__supported_dtypes__", [torch.float32]))
    if base_precision is None:
        return supported[0]
    dtype = DTYPES[base_precision]
    if dtype not in supported:
        bits = sorted(k for k, v in DTYPES.items() if v in supported)
        raise OptionsError(
            f"'base_precision: {base_precision}' is not supported by this architecture; "
            f"use one of {bits}"
        )
    return dtype


def choose_device_type(model_class: Any, requested: str, cuda_available: bool) -> str:
    """'cpu' or 'cuda', from the request, the model's preference and the machine."""
    supported = list(getattr(model_class, "__supported_devices__", ["cpu"]))
    available = {"cpu"} | ({"cuda"} if cuda_available else set())
    if requested == "auto":
        for device in supported:
            if device in available:
                return device
        raise OptionsError(
            f"none of the architecture's devices {supported} is available on this machine"
        )
    if requested not in supported:
        raise OptionsError(
            f"'device: {requested}' is not supported by this architecture (it supports {supported})"
        )
    if requested not in available:
        raise OptionsError(
            f"'device: {requested}' was requested but this machine has no {requested} "
            "device (torch.cuda.is_available() is False); use 'device: auto' or 'cpu'"
        )
    return requested
