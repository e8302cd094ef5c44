"""The options file: typed sections, defaults, validation, resolution.

The format is metatrain's (``seed``, ``base_precision``, ``device``,
``architecture: {name, model, training}``, ``training_set`` / ``validation_set`` /
``test_set``) plus hpctrain's own sections ``distributed``, ``checkpoint``,
``logging`` and ``slurm``.  Every field is declared once, with its default and doc;
``docs/options.rst`` is generated from these declarations.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .config import option, parse, suggest, to_dict
from .errors import OptionsError


@dataclasses.dataclass
class GradientOptions:
    """Where a gradient target (forces, stress, virial) is read from."""

    key: str = option(doc="Name of the array (forces) or info entry (stress, virial).")


@dataclasses.dataclass
class TargetOptions:
    """One target to learn, e.g. ``energy``."""

    quantity: Literal["energy"] = option(
        "energy", doc="Physical quantity of the target. Only 'energy' is supported."
    )
    key: str | None = option(
        None, doc="Key of the target in the data files; defaults to the target's name."
    )
    unit: str = option("eV", doc="Unit of the target in the data files.")
    per_atom: bool = option(False, doc="Whether the target is given per atom.")
    forces: Union[bool, str, GradientOptions] = option(
        True,
        doc="Learn forces (the negative position gradient of the energy). "
        "``true`` reads the per-atom array ``forces``; a string names another key; "
        "``false`` learns energies only.",
    )
    stress: Union[bool, str, GradientOptions] = option(
        False,
        doc="Learn the stress (ASE sign convention, energy/length^3), read from the "
        "info entry ``stress`` (or the key given). Periodic structures only.",
    )
    virial: Union[bool, str, GradientOptions] = option(
        False,
        doc="Learn the virial (energy), read from the info entry ``virial`` (or the "
        "key given). Mutually exclusive with ``stress``.",
    )

    def validate(self, path: str, source: str) -> None:
        if self.stress and self.virial:
            raise OptionsError(
                f"'{path}' in {source} sets both 'stress' and 'virial'; "
                "a dataset provides one of them, keep only that one"
            )

    def gradient_key(self, gradient: str) -> str | None:
        """The data key of ``gradient`` ('forces', 'stress', 'virial'), or None."""
        value = getattr(self, gradient)
        if value is False:
            return None
        if value is True:
            return gradient
        if isinstance(value, str):
            return value
        return value.key


@dataclasses.dataclass
class SystemsOptions:
    """Where the structures of a dataset come from."""

    read_from: str = option(
        doc="Path of the structures: any file ASE reads (extxyz, ...), or a directory "
        "of HDF5 shards written by ``hpctrain convert`` (read lazily; see :doc:`shards`). "
        "Relative paths are taken from the directory of the options file."
    )
    reader: str | None = option(
        None, doc="ASE format name, when it cannot be guessed from the file name."
    )
    length_unit: str = option("angstrom", doc="Unit of positions and cells in the file.")


@dataclasses.dataclass
class DatasetOptions:
    """One dataset: its structures and the targets to read from them.

    A plain string is shorthand for ``{systems: {read_from: <string>}}``.
    """

    systems: SystemsOptions = option(doc="Structures (a path string is accepted).")
    targets: dict[str, TargetOptions] = option(
        factory=lambda: {"energy": TargetOptions()},
        doc="Targets by name. Default: ``energy`` with forces; a validation or test "
        "set without ``targets`` takes the training set's.",
    )
    loss_weight: float = option(
        1.0,
        doc="Training sets only: multiplies every loss term of this set's structures "
        "(0 keeps a set out of the loss; 2 counts each of its structures twice).",
    )
    sampling_weight: Optional[float] = option(
        None,
        doc="Training sets only: this set's share of every epoch, relative to the other "
        "sets' weights (each set needs one when any has one). An epoch keeps the total "
        "number of training structures; a set whose share is smaller than itself gives "
        "a different random subset each epoch, a larger one repeats each structure "
        "equally often plus a random draw of the rest.",
    )

    def validate(self, path: str, source: str) -> None:
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise OptionsError(
                f"'{path}.loss_weight' in {source} must be a number, 0 or more, got "
                f"{self.loss_weight}"
            )
        weight = self.sampling_weight
        if weight is not None and not (math.isfinite(weight) and weight > 0):
            raise OptionsError(
                f"'{path}.sampling_weight' in {source} must be a positive number, got {weight}"
            )


@dataclasses.dataclass
class ArchitectureOptions:
    """The model family to train and its hypers."""

    name: str = option(
        doc="Architecture: a folder of ``architectures/`` (e.g. ``mp_transformer``) "
        "or any importable module path of a third-party architecture."
    )
    model: dict[str, Any] = option(
        factory=dict, doc="Model hypers; the architecture's defaults fill the rest."
    )
    training: dict[str, Any] = option(
        factory=dict, doc="Training hypers; the architecture's defaults fill the rest."
    )


@dataclasses.dataclass
class DistributedOptions:
    """How ranks talk to each other. Rank, world size and devices come from the
    launcher (srun, mpiexec, torchrun), never from this file."""

    backend: Literal["auto", "nccl", "gloo"] = option(
        "auto", doc="torch.distributed backend; ``auto`` is nccl on CUDA, gloo on CPU."
    )
    timeout_s: float = option(
        300.0,
        doc="Seconds a rank waits in a collective before giving up, so that a dead "
        "rank never leaves the others hanging forever.",
    )
    threads_per_rank: int | None = option(
        None,
        doc="CPU threads per rank; default: OMP_NUM_THREADS, else SLURM_CPUS_PER_TASK, "
        "else the cores the process may use divided by the ranks on its node. Never more "
        "than the cores the process may use (affinity, cgroup quota).",
    )


@dataclasses.dataclass
class CheckpointOptions:
    """When checkpoints are written in the run directory."""

    every_n_epochs: int = option(1, doc="Write a checkpoint every N epochs (0: never).")
    every_n_steps: int | None = option(
        None, doc="Also write one every N optimizer steps (mid-epoch)."
    )
    every_minutes: float | None = option(
        30.0, doc="Also write one when this many minutes passed since the last one."
    )
    keep_last: int = option(3, doc="How many of the newest checkpoints to keep.")
    keep_best: bool = option(True, doc="Also keep the checkpoint with the lowest validation loss.")
    requeue: bool = option(
        False,
        doc="On SIGUSR1/SIGUSR2/SIGTERM, after the checkpoint, requeue the SLURM job "
        "(``scontrol requeue``) so that a plain ``srun python -m hpctrain`` job continues "
        "by itself (with ``continue_from: auto`` and a fixed ``--output-dir``).",
    )


@dataclasses.dataclass
class WandbOptions:
    """A Weights & Biases run that receives, from rank 0, the rows of ``metrics.csv``
    at the same optimizer steps, with the resolved options and the run's system as
    its config (``pip install hpctrain[wandb]``). Its id is kept in the run directory
    (``wandb-run-id``): a run continued there continues the same W&B run."""

    project: str = option(doc="W&B project of the run (a ``logging.wandb`` section needs it).")
    entity: str | None = option(
        None, doc="W&B entity (user or team) of the project; default: the account's."
    )
    name: str | None = option(
        None, doc="Display name of the W&B run; default: the run directory's name."
    )
    tags: list[str] = option(factory=list, doc="Tags of the W&B run.")
    mode: Literal["online", "offline", "disabled"] = option(
        "online",
        doc="``online`` sends as it trains; ``offline`` writes to ``wandb/`` in the run "
        "directory only, for ``wandb sync`` later (nodes without network); ``disabled`` "
        "logs nothing.",
    )

    def validate(self, path: str, source: str) -> None:
        if not self.project.strip():
            raise OptionsError(f"'{path}.project' in {source} must not be empty")
        for i, tag in enumerate(self.tags):
            if not tag.strip() or len(tag) > 64:
                raise OptionsError(
                    f"'{path}.tags[{i}]' in {source} must be 1 to 64 characters, got {tag!r}"
                )


@dataclasses.dataclass
class LoggingOptions:
    """What the run reports while training."""

    every_n_epochs: int = option(1, doc="Print and record validation metrics every N epochs.")
    progress: Literal["auto", "bar", "lines", "off"] = option(
        "auto",
        doc="Progress within an epoch, printed by rank 0: ``bar`` redraws one line in "
        "place (rate, ETA, loss); ``lines`` prints a plain line every "
        "``progress_every_seconds`` (for SLURM output files and pipes); ``auto`` is "
        "``bar`` when standard output is a terminal, else ``lines``.",
    )
    progress_every_seconds: float = option(
        60.0, doc="Seconds between two progress lines (``lines`` mode)."
    )
    progress_every_n_steps: int | None = option(
        None, doc="Also print a progress line every N optimizer steps (``lines`` mode)."
    )
    tensorboard: bool = option(
        True,
        doc="Also write the metrics of ``metrics.csv`` as TensorBoard scalars to "
        "``tensorboard/`` in the run directory, when the ``tensorboard`` package is "
        "installed (``pip install hpctrain[tensorboard]``); without it, a note is printed.",
    )
    wandb: WandbOptions | None = option(
        None,
        doc="Also log the metrics of ``metrics.csv`` to Weights & Biases (``null``: no "
        "W&B). The run fails before training when the ``wandb`` package is missing.",
    )

    def validate(self, path: str, source: str) -> None:
        if self.every_n_epochs < 1:
            raise OptionsError(f"'{path}.every_n_epochs' in {source} must be at least 1")
        if not self.progress_every_seconds > 0:
            raise OptionsError(
                f"'{path}.progress_every_seconds' in {source} must be positive, got "
                f"{self.progress_every_seconds}"
            )
        if self.progress_every_n_steps is not None and self.progress_every_n_steps < 1:
            raise OptionsError(
                f"'{path}.progress_every_n_steps' in {source} must be at least 1 (or null)"
            )


@dataclasses.dataclass
class SlurmOptions:
    """Resources of SLURM jobs sent by ``hpctrain submit`` (where its command-line
    flags win). ``hpctrain train`` ignores this section: inside a job, ranks and
    devices come from the launcher."""

    partition: str | None = option(None, doc="SLURM partition.")
    account: str | None = option(None, doc="SLURM account to charge.")
    nodes: int = option(1, doc="Number of nodes.")
    gpus_per_node: int = option(0, doc="GPUs per node; one rank per GPU.")
    tasks_per_node: int | None = option(
        None, doc="Ranks per node on CPU nodes (default: 1 per GPU, or 1)."
    )
    cpus_per_task: int | None = option(None, doc="CPU cores per rank.")
    time: str = option("01:00:00", doc="Time limit of each job, HH:MM:SS.")
    max_requeues: int = option(10, doc="How often a preempted or timed-out job may requeue itself.")
    sbatch: list[str] = option(
        factory=list, doc="Extra ``#SBATCH`` options passed through, e.g. ``--qos=long``."
    )


@dataclasses.dataclass
class Options:
    """Top level of ``options.yaml``."""

    architecture: ArchitectureOptions = option(doc="Model family and its hypers.")
    training_set: Any = option(
        doc="Dataset, path string, or list of datasets (each with its own targets)."
    )
    validation_set: Any = option(
        0.1,
        doc="Dataset(s) as for ``training_set``, or a fraction of the training set "
        "split off at random (seeded, identical on every rank).",
    )
    test_set: Any = option(
        0.0, doc="Dataset(s), or a fraction of the training set; evaluated at the end."
    )
    seed: int | None = option(
        None,
        doc="Seed of every random choice (splits, order, initial weights). When "
        "omitted, one is drawn, shared by all ranks and written to the resolved options.",
    )
    base_precision: Literal[16, 32, 64] = option(32, doc="Floating point bits of model and data.")
    device: Literal["auto", "cpu", "cuda"] = option(
        "auto",
        doc="``auto``: the architecture's most preferred device that the machine has.",
    )
    continue_from: str | None = option(
        None,
        doc="Checkpoint (file or step directory) to continue from; ``auto``: the newest "
        "committed checkpoint of the run directory, or a fresh start when there is none.",
    )
    distributed: DistributedOptions = option(
        factory=DistributedOptions, doc="Collectives and threads."
    )
    checkpoint: CheckpointOptions = option(factory=CheckpointOptions, doc="Checkpoint schedule.")
    export: Literal["best", "last"] = option(
        "best",
        doc="The weights that ``model.pt`` (and the test metrics) are made of: ``best``, "
        "those of the validation with the lowest validation loss (kept in checkpoints, "
        "so across restarts); ``last``, those after the last step. An architecture whose "
        "trainer keeps no best weights exports the last ones.",
    )
    logging: LoggingOptions = option(factory=LoggingOptions, doc="Progress and metrics.")
    slurm: SlurmOptions = option(factory=SlurmOptions, doc="Used by ``hpctrain submit``.")


def _dataset(value: Any, path: str, base: Path, source: str) -> DatasetOptions:
    if isinstance(value, str):
        value = {"systems": {"read_from": value}}
    elif isinstance(value, dict) and isinstance(value.get("systems"), str):
        value = {**value, "systems": {"read_from": value["systems"]}}
    dataset = parse(DatasetOptions, value, path, source)
    if not dataset.targets:
        raise OptionsError(f"'{path}.targets' in {source} is empty; name at least one target")
    for name, target in dataset.targets.items():
        check_target_name(name, target.quantity, f"{path}.targets", source)
    read_from = Path(dataset.systems.read_from).expanduser()
    if not read_from.is_absolute():
        read_from = base / read_from
    if not read_from.exists():
        raise OptionsError(
            f"'{path}.systems.read_from' in {source}: {str(read_from)!r} does not "
            "exist (relative paths start at the options file's directory)"
        )
    dataset.systems.read_from = str(read_from.resolve())
    return dataset


def check_target_name(name: str, quantity: str, path: str, source: str) -> None:
    """Target names become the exported model's output names, which metatomic
    restricts to ``<quantity>``, ``<quantity>/<variant>`` or ``<domain>::<name>``."""
    base, _, variant = name.partition("/")
    if base == quantity and (variant or name == quantity):
        return
    if "::" in base and all(base.split("::")):
        return
    raise OptionsError(
        f"target name '{name}' at '{path}' in {source} cannot name a model output: use "
        f"'{quantity}', a variant such as '{quantity}/{name.replace('/', '_')}', or a "
        f"custom name such as 'mtt::{name.replace('/', '_')}'"
    )


def _datasets(value: Any, key: str, base: Path, source: str) -> list[DatasetOptions]:
    if isinstance(value, list):
        if not value:
            raise OptionsError(f"'{key}' in {source} is an empty list")
        return [_dataset(v, f"{key}[{i}]", base, source) for i, v in enumerate(value)]
    return [_dataset(value, key, base, source)]


def _fraction_or_datasets(value: Any, key: str, base: Path, source: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not 0.0 <= value < 1.0:
            raise OptionsError(
                f"'{key}' in {source} is a fraction of the training set and must be in "
                f"[0, 1), got {value}"
            )
        return float(value)
    return _datasets(value, key, base, source)


def _check_sampling_weights(options: Options, source: str) -> None:
    """Sampling and loss weights: on training sets only; sampling weights on all of
    them or none."""
    for key in ("validation_set", "test_set"):
        value = getattr(options, key)
        for i, dataset in enumerate(value if isinstance(value, list) else []):
            if dataset.sampling_weight is not None or dataset.loss_weight != 1.0:
                name = "sampling_weight" if dataset.sampling_weight is not None else "loss_weight"
                raise OptionsError(
                    f"'{key}[{i}].{name}' in {source}: only training sets are sampled and "
                    "weighted in the loss (validation and test sets are used whole); remove it"
                )
    weighted = [d.sampling_weight is not None for d in options.training_set]
    if any(weighted) and not all(weighted):
        missing = weighted.index(False)
        raise OptionsError(
            f"'training_set[{missing}]' in {source} has no sampling_weight while other "
            "training sets have one; give every training set a sampling_weight (or none)"
        )


def load_yaml(path: Union[str, Path]) -> dict[str, Any]:
    """Read an options file as a mapping, with messages that name the file."""
    path = Path(path)
    if path.is_dir():
        resolved = path / "options.resolved.yaml"
        hint = f"; to repeat the run it holds, give {resolved}" if resolved.is_file() else ""
        raise OptionsError(f"{path} is a directory, not an options file{hint}")
    if not path.is_file():
        raise OptionsError(f"options file {str(path)!r} does not exist")
    try:
        with path.open() as file:  # (a stream: the messages name the file and line)
            data = yaml.safe_load(file)
    except yaml.YAMLError as error:
        raise OptionsError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise OptionsError(
            f"{path} must hold a mapping of options (architecture, training_set, ...), "
            f"got {type(data).__name__}"
        )
    return data


def load_options(path: Union[str, Path], overrides: dict[str, Any] | None = None) -> Options:
    """Parse and validate an options file; dataset paths become absolute.

    Architecture hypers are kept as given here; :func:`hpctrain.architecture.resolve`
    merges them with the architecture's defaults.
    """
    path = Path(path)
    data = load_yaml(path)
    data.update(overrides or {})
    source = str(path)
    valid = [f.name for f in dataclasses.fields(Options) if f.init]
    for key in data:  # first: a misspelt key is the likely cause of a missing one
        if key not in valid:
            raise OptionsError(f"unknown key '{key}' in {source}{suggest(str(key), valid)}")
    for key in ("architecture", "training_set"):
        if key not in data:
            raise OptionsError(f"missing required key '{key}' in {source}")
    if isinstance(data["architecture"], str):
        data["architecture"] = {"name": data["architecture"]}
    datasets = {k: data.pop(k) for k in ("training_set", "validation_set", "test_set") if k in data}
    options = parse(Options, {**data, "training_set": None}, "", source)
    base = path.resolve().parent
    options.training_set = _datasets(datasets["training_set"], "training_set", base, source)
    options.validation_set = _fraction_or_datasets(
        datasets.get("validation_set", 0.1), "validation_set", base, source
    )
    options.test_set = _fraction_or_datasets(
        datasets.get("test_set", 0.0), "test_set", base, source
    )
    for key in ("validation_set", "test_set"):
        _inherit_targets(datasets.get(key), getattr(options, key), options.training_set)
    _check_sampling_weights(options, source)
    _resolve_finetune(options.architecture.training, options.training_set, base, source)
    fractions = [v for v in (options.validation_set, options.test_set) if isinstance(v, float)]
    if sum(fractions) >= 1.0:
        raise OptionsError(
            f"'validation_set' and 'test_set' fractions in {source} add up to "
            f"{sum(fractions)}, leaving no training data; make them sum to less than 1"
        )
    return options


def _inherit_targets(raw: Any, parsed: Any, training: list[DatasetOptions]) -> None:
    """A validation or test dataset given without ``targets`` (a bare path, or only
    ``systems``) is read with the training set's targets, when all training sets
    have the same, so that it is measured on everything the model learns (stress
    too)."""
    if isinstance(parsed, float):
        return
    first = training[0].targets
    if any(dataset.targets != first for dataset in training[1:]):
        return
    for value, dataset in zip(raw if isinstance(raw, list) else [raw], parsed):
        if isinstance(value, str) or (isinstance(value, dict) and "targets" not in value):
            dataset.targets = copy.deepcopy(first)


def _resolve_finetune(
    training: dict[str, Any], datasets: list[DatasetOptions], base: Path, source: str
) -> None:
    """In the raw training hypers, ``finetune.read_from`` and the replayed data become
    absolute (relative to ``base``, the options file's directory); the replayed data
    gets the training set's targets when it names none."""
    section = training.get("finetune")
    key = "architecture.training.finetune"
    if not isinstance(section, dict):
        return
    if isinstance(section.get("read_from"), str):
        path = Path(section["read_from"]).expanduser()
        path = path if path.is_absolute() else base / path
        if not path.exists():
            raise OptionsError(
                f"'{key}.read_from' in {source}: {str(path)!r} does not exist (relative "
                "paths start at the options file's directory); give the pretrained run's "
                "model.ckpt"
            )
        section["read_from"] = str(path.resolve())
    replay = section.get("replay")
    if isinstance(replay, dict) and "training_set" in replay:
        raw = replay["training_set"]
        dataset = _dataset(raw, f"{key}.replay.training_set", base, source)
        _inherit_targets(raw, [dataset], datasets)
        replay["training_set"] = to_dict(dataset)


def resolved_dict(options: Options) -> dict[str, Any]:
    """The fully resolved options as plain data, ready to be written as YAML."""
    return to_dict(options)


def write_resolved(options: Options, path: Union[str, Path]) -> None:
    """Write the resolved options next to the outputs (a file users can rerun)."""
    from .files import write_text_atomically

    write_text_atomically(path, yaml.safe_dump(resolved_dict(options), sort_keys=False))
