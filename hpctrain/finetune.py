"""Fine-tuning (``architecture.training.finetune``): a new run starts from the model of
another run's checkpoint and trains all of it, its heads only, or low-rank adapters
(LoRA) on the linear layers of its body.

Who does what:

* the flow builds the model (:func:`pretrained_model`): the checkpoint's model,
  restarted on the new data's targets (``Model.load_checkpoint(read_from).restart``, as
  the architecture API has it), the heads of new targets copied from old ones where
  ``inherit_heads`` says so;
* the trainer chooses what trains (:func:`prepare`) before the engine makes its
  optimizer and DDP, for a new run and for a resumed one alike;
* LoRA adapters are torch parametrizations of the weights (``W + alpha / rank * B A``,
  ``B`` zero at the start, so that the first step starts from the pretrained model).
  Checkpoints hold the merged weights as the model's state, which any hpctrain command
  reads like any other model, and the adapters as the trainer's state, from which a
  resumed run continues bit for bit. When training ends they are merged into the
  weights (:func:`finish`), so that the exported model is a plain model.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import functools
import math
from typing import Any, Literal, Optional

import torch
from torch.nn.utils import parametrize

from . import checkpoint
from .architecture import import_architecture
from .config import option, parse
from .errors import CheckpointError, OptionsError
from .report import get_logger

KEY = "architecture.training.finetune"


@dataclasses.dataclass
class LoraOptions:
    """Low-rank adapters of ``method: lora``."""

    rank: int = option(4, doc="Rank of each adapter (the trainable parameters grow with it).")
    alpha: float = option(
        4.0, doc="The adapters' update is scaled by ``alpha / rank`` (1 by default)."
    )

    def validate(self, path: str, source: str) -> None:
        if self.rank < 1:
            raise OptionsError(f"'{path}.rank' in {source} must be at least 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise OptionsError(f"'{path}.alpha' in {source} must be positive, got {self.alpha}")


@dataclasses.dataclass
class ReplayOptions:
    """Some of the pretrained model's own training data in every epoch, so that it
    forgets less of what it knew."""

    training_set: Any = option(
        doc="The data to replay, as a ``training_set`` entry (the pretrained run's "
        "training set, or part of it); without ``targets``, those of the training set."
    )
    fraction: float = option(
        0.2,
        doc="Share of each epoch's structures drawn from it, fresh each epoch (without "
        "repeats while it has enough); the epoch grows by them, so that the new data is "
        "still seen once per epoch.",
    )

    def validate(self, path: str, source: str) -> None:
        if not 0 < self.fraction < 1:
            raise OptionsError(
                f"'{path}.fraction' in {source} must be between 0 and 1 (exclusive), got "
                f"{self.fraction}"
            )


@dataclasses.dataclass
class FinetuneOptions:
    """Start from a pretrained model instead of a new one."""

    read_from: str = option(
        doc="The pretrained model's checkpoint: a run's ``model.ckpt`` or step "
        "checkpoint, of the same architecture (relative paths start at the options "
        "file's directory). Its model hypers replace the options' ``architecture.model``."
    )
    method: Literal["full", "heads", "lora"] = option(
        "full",
        doc="What trains: ``full`` every weight; ``heads`` the heads alone (the layers "
        "that map an atom's features to its energies), the body stays as pretrained; "
        "``lora`` low-rank adapters on every linear layer of the body, merged into the "
        "weights when training ends, everything else frozen.",
    )
    freeze: list[str] = option(
        factory=list,
        doc="Parameters that do not train besides those ``method`` freezes: names or "
        "glob patterns of parameters or modules (``layers.0``, ``layers.*.query``). "
        "The log lists the model's modules.",
    )
    inherit_heads: dict[str, str] = option(
        factory=dict,
        doc="A new target's head starts as a copy of a pretrained target's, with its "
        "composition baseline: ``{new_target: pretrained_target}``. Other new targets "
        "get new heads.",
    )
    composition: Literal["keep", "refit"] = option(
        "keep",
        doc="The composition baseline of the pretrained model's targets: ``keep`` it "
        "(the fine-tuned model starts as the pretrained one), or ``refit`` it on the new "
        "training set (for energies of another reference, e.g. another DFT code; a set of "
        "few compositions then fixes the per-element energies poorly).",
    )
    lora: LoraOptions = option(factory=LoraOptions, doc="Adapters of ``method: lora``.")
    replay: Optional[ReplayOptions] = option(
        None,
        doc="Train on some of the pretrained model's data too, e.g. ``{training_set: "
        "pretraining.xyz, fraction: 0.2}``.",
    )


def options_of(training_hypers: dict[str, Any], source: str = "") -> FinetuneOptions | None:
    """The ``finetune`` section of raw training hypers (None when absent)."""
    raw = training_hypers.get("finetune")
    return None if raw is None else parse(FinetuneOptions, raw, KEY, source)


def replay_of(training_hypers: dict[str, Any], source: str = "") -> tuple[Any, float] | None:
    """The replayed data's options (a ``DatasetOptions``, paths made absolute by the
    options' loading) and its share of an epoch; None without replay."""
    from .options import DatasetOptions

    tuned = options_of(training_hypers, source)
    if tuned is None or tuned.replay is None:
        return None
    path = f"{KEY}.replay.training_set"
    return parse(DatasetOptions, tuned.replay.training_set, path, source), tuned.replay.fraction


# -- the model: built by the flow --------------------------------------------------------


def pretrained_hypers(
    options: FinetuneOptions, given: dict[str, Any], source: str = ""
) -> dict[str, Any]:
    """The model hypers of the pretrained model, which replace those the options give
    (``given``, as written), with a warning where they differ."""
    try:
        hypers = copy.deepcopy(pretrained_summary(options.read_from)[0])
    except CheckpointError as error:
        raise CheckpointError(f"'{KEY}.read_from' in {source}: {error}") from None
    differ = differences(given, hypers)
    if differ:
        get_logger().warning(
            f"fine-tuning: the model is the pretrained one of {options.read_from}, with "
            f"its hypers; architecture.model's {', '.join(differ)} differ and are ignored"
        )
    return hypers


def pretrained_model(model_class: Any, options: FinetuneOptions, info: Any) -> Any:
    """The pretrained model of ``options.read_from``, restarted on the new data's
    targets (``info``), with the heads of ``inherit_heads`` copied."""
    from ase.data import chemical_symbols

    path = options.read_from
    model = model_class.load_checkpoint(path)
    known = set(model.dataset_info.atomic_types)
    unknown = sorted(set(info.atomic_types) - known)
    if unknown:
        raise CheckpointError(
            f"'{KEY}.read_from' {path}: the pretrained model knows the elements "
            f"{', '.join(chemical_symbols[z] for z in sorted(known))}, the training set "
            f"also has {', '.join(chemical_symbols[z] for z in unknown)}; a model cannot "
            "learn new elements by fine-tuning: remove those structures, or train a new model"
        )
    old = list(model.dataset_info.targets)
    check_inherit_heads(options.inherit_heads, old, list(info.targets), path)
    headless = [t for t in info.targets if t not in old and t not in options.inherit_heads]
    if options.method == "lora" and headless:
        raise OptionsError(
            f"'{KEY}.method: lora' trains adapters of the model's body only, so the new "
            f"target '{headless[0]}' would keep an untrained head: start it from a "
            f"pretrained one with 'inherit_heads: {{{headless[0]}: {old[0]}}}', or use "
            "method full or heads"
        )
    model = model.restart(info)
    for new, source in options.inherit_heads.items():
        model.inherit_head(new, source)
    return model


def differences(given: dict[str, Any], actual: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys (dotted) of ``given`` whose values ``actual`` does not have."""
    found = []
    for key, value in given.items():
        other = actual.get(key) if isinstance(actual, dict) else None
        if isinstance(value, dict) and isinstance(other, dict):
            found += differences(value, other, f"{prefix}{key}.")
        elif value != other:
            found.append(f"{prefix}{key}")
    return found


def check_inherit_heads(inherit: dict[str, str], old: list[str], new: list[str], path: str) -> None:
    for target, source in inherit.items():
        if source not in old:
            raise OptionsError(
                f"'{KEY}.inherit_heads.{target}': the pretrained model ({path}) has no "
                f"target '{source}'; its targets are {', '.join(old)}"
            )
        if target not in new:
            raise OptionsError(
                f"'{KEY}.inherit_heads.{target}': the training set has no target "
                f"'{target}'; its targets are {', '.join(new)}"
            )
        if target in old:
            raise OptionsError(
                f"'{KEY}.inherit_heads.{target}': the pretrained model has a head for "
                f"'{target}' already, which fine-tuning continues; inherit only new targets"
            )


def pretrained_targets(options: FinetuneOptions) -> set[str]:
    """The targets whose heads come from the pretrained model: its own, and the new
    ones that inherit a head."""
    return set(pretrained_summary(options.read_from)[1]) | set(options.inherit_heads)


@functools.lru_cache(maxsize=4)
def pretrained_summary(path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The model hypers and targets of the checkpoint at ``path``, read once per
    process (the options' check and the engine ask; the model is loaded apart)."""
    data = checkpoint.load(path)
    hypers = data["model_hypers"]
    model_class = import_architecture(data["architecture"]).__model__
    if hasattr(model_class, "upgrade_hypers"):  # (a reference model)
        hypers = model_class.upgrade_hypers(hypers, data.get("model_version", 1))
    return hypers, tuple(data["dataset_info"]["targets"])


def check_kept_baseline(target: str, fit: Any, model: Any, unit: str) -> None:
    """Warn when the pretrained composition baseline that fine-tuning keeps is far
    from the one the new training set has (``fit``): another reference energy."""
    kept = model.composition[model.target_names.index(target)]
    offset = fit.offset(kept)
    if offset > max(10 * fit.energy_scale, 0.01):
        get_logger().warning(
            f"fine-tuning: the pretrained composition baseline of '{target}' is "
            f"{offset:.4g} {unit} per atom away from the one fitted on this training set, "
            f"which leaves {fit.energy_scale:.4g} {unit}/atom unexplained: its energies "
            "likely have another reference (another DFT code, functional or settings). "
            f"Set '{KEY}.composition: refit', or the network must learn the offset"
        )


# -- what trains: chosen by the trainer --------------------------------------------------


def prepare(model: torch.nn.Module, options: FinetuneOptions, state: dict | None) -> None:
    """Freeze what ``options`` does not train and add the LoRA adapters; then the
    adapters and frozen weights of a resumed run (``state``: the trainer's state)."""
    if options.method == "lora":
        add_adapters(model, options.lora)
    elif options.method == "heads":
        heads = tuple(f"{name}." for name in model.head_modules())
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name.startswith(heads))
    freeze(model, options.freeze)
    if state is not None and state.get("adapters") is not None:
        model.load_state_dict(state["adapters"])
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for name, p in model.named_parameters() if not name.endswith(ADAPTERS))
    if trainable == 0:
        raise OptionsError(
            f"'{KEY}': method {options.method} with freeze {options.freeze} leaves no "
            "parameter to train; freeze less"
        )
    get_logger().info(
        f"fine-tuning {options.read_from} (method {options.method}"
        + (f", rank {options.lora.rank}" if options.method == "lora" else "")
        + f"): {trainable:,} parameters train, {100 * trainable / total:.2f} % of the "
        f"model's {total:,}"
    )


def freeze(model: torch.nn.Module, patterns: list[str]) -> None:
    """Freeze what each of ``patterns`` names: a parameter, a module (all its
    parameters), or a glob pattern of either; one that matches nothing is an error."""
    names = [name for name, _ in model.named_parameters()]
    for pattern in patterns:
        hits = [
            n
            for n in names
            if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, f"{pattern}.*")
        ]
        if not hits:
            modules = sorted({n.split(".parametrizations")[0].rsplit(".", 1)[0] for n in names})
            raise OptionsError(
                f"'{KEY}.freeze': '{pattern}' matches no parameter of the model; its "
                f"modules are {', '.join(modules)}"
            )
        parameters = dict(model.named_parameters())
        for name in hits:
            parameters[name].requires_grad_(False)


ADAPTERS = (".lora_a", ".lora_b")


class LowRankUpdate(torch.nn.Module):
    """The parametrization ``W -> W + scaling * B A`` of a linear layer's weight."""

    def __init__(self, weight: torch.Tensor, rank: int, scaling: float):
        super().__init__()
        out_features, in_features = weight.shape
        options = {"dtype": weight.dtype, "device": weight.device}
        self.lora_a = torch.nn.Parameter(torch.empty(rank, in_features, **options))
        self.lora_b = torch.nn.Parameter(torch.zeros(out_features, rank, **options))
        torch.nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.scaling = scaling

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + self.scaling * (self.lora_b @ self.lora_a)


def add_adapters(model: torch.nn.Module, options: LoraOptions) -> None:
    """Freeze every weight and give each linear layer of the body (outside
    ``model.head_modules()``) an adapter."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    heads = tuple(model.head_modules())
    body = [
        module
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
        and not any(name == h or name.startswith(f"{h}.") for h in heads)
    ]
    if not body:
        raise OptionsError(f"'{KEY}.method: lora': the model's body has no linear layer")
    for module in body:
        update = LowRankUpdate(module.weight, options.rank, options.alpha / options.rank)
        parametrize.register_parametrization(module, "weight", update)


def has_adapters(model: torch.nn.Module) -> bool:
    return any(parametrize.is_parametrized(m) for m in model.modules())


def plain_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's state with every adapter merged into its weight: the state of the
    plain model (what checkpoints hold as the model)."""
    state = model.state_dict()
    if not has_adapters(model):
        return state
    modules = dict(model.named_modules())
    plain: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for key, value in state.items():
            if ".parametrizations." not in key:
                plain[key] = value
                continue
            name = key.split(".parametrizations.")[0]
            if f"{name}.weight" not in plain:
                plain[f"{name}.weight"] = modules[name].weight.detach().clone()
    return plain


def finish(model: torch.nn.Module, engine: Any) -> None:
    """After training: merge the adapters into the weights, those of the best
    validation too, so that the model (exported, tested, checkpointed) is plain."""
    if not has_adapters(model):
        return
    best = getattr(engine, "best", None)
    if best is not None and any(".parametrizations." in k for k in best["model_state"]):
        scratch = copy.deepcopy(model)
        scratch.load_state_dict(best["model_state"])
        best["model_state"] = plain_state(scratch)
    for module in list(model.modules()):
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
