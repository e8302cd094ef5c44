"""Starting a run, the same for ``hpctrain train`` and the benchmarks that time it.

1. :func:`prepare`: the options, the architecture and its hypers, dtype and device
   type, checked on every rank before anything is launched (a rank whose options
   fail meets the others first, :func:`fail_together`);
2. :func:`launched`: this rank's device and threads, then the process group;
3. :func:`open_run`: the run directory (rank 0 decides), logging, the checkpoint to
   continue from and the seed: the run's context, current while the run lasts;
4. :func:`build_run`: the datasets (split, and checked against the architecture and
   the trainer), then the model and the trainer, new or restarted.

Errors that ranks meet in steps 3 and 4 are agreed between them and reported once
(:func:`hpctrain.launch.agree_on_errors`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from . import checkpoint, finetune, launch, run, wandb_run
from .architecture import Architecture, DatasetInfo, choose_device_type, choose_dtype, resolve
from .data import AtomisticDataset, read_dataset, split_indices
from .errors import CheckpointError, DataError, HpctrainError, OptionsError
from .options import DistributedOptions, Options, load_options
from .report import get_logger, setup_logging
from .signals import StopRequest
from .threads import Threads, threads_per_rank


def prepare(
    options_path: str | Path,
    continue_from: str | None = None,
    cuda_available: bool | None = None,
) -> tuple[Options, Architecture, torch.dtype, str]:
    """Everything that can be checked before launching: options, architecture and its
    hypers, dtype and device type, and that the packages the options ask for are
    installed. Fails fast, with the key path, on every rank."""
    source = str(options_path)
    options = load_options(options_path)
    wandb_run.check_installed(options.logging.wandb, source)
    if continue_from is not None:
        options.continue_from = continue_from
    if options.continue_from not in (None, "auto"):
        check_checkpoint_path(options.continue_from)  # before a run directory is made
    tuned = finetune.options_of(options.architecture.training, source)
    if tuned is not None:  # the model is the pretrained one, with its hypers
        given = options.architecture.model
        options.architecture.model = finetune.pretrained_hypers(tuned, given, source)
    architecture = resolve(
        options.architecture.name, options.architecture.model, options.architecture.training, source
    )
    options.architecture.model = architecture.model_hypers
    options.architecture.training = architecture.training_hypers
    dtype = choose_dtype(architecture.model_class, options.base_precision)
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    device_type = choose_device_type(architecture.model_class, options.device, cuda_available)
    return options, architecture, dtype, device_type


def fail_together(env: launch.LaunchEnv, error: HpctrainError) -> NoReturn:
    """End a rank whose options failed once it has met the other ranks, so that the
    run ends with one message (:func:`launch.agree_on_errors`) rather than one per rank.

    Its own options being unreadable, it joins with the default backend of this
    machine (ranks that read different options files may then wait for the timeout).
    """
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(launch.device_for(env, device_type))
    timeout_s = DistributedOptions().timeout_s
    with launch.ProcessGroup(env, launch.backend_for(device_type), timeout_s):
        launch.agree_on_errors(error)
    raise error  # (agree_on_errors raised already)


@dataclasses.dataclass
class Launched:
    """This rank's device and CPU threads (see :func:`launched`)."""

    device: torch.device
    threads: Threads


@contextlib.contextmanager
def launched(
    env: launch.LaunchEnv, device_type: str, backend: str, distributed: DistributedOptions
) -> Iterator[Launched]:
    """This rank's device and threads, then the process group, held for the block.

    Ranks whose options failed meet here too (:func:`fail_together`): every rank agrees
    first that its options were good."""
    device = launch.device_for(env, device_type)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    threads = threads_per_rank(env, distributed.threads_per_rank)
    torch.set_num_threads(threads.count)
    with launch.ProcessGroup(env, backend, distributed.timeout_s):
        launch.agree_on_errors(None)
        yield Launched(device, threads)


def open_run(
    env: launch.LaunchEnv,
    options: Options,
    output_dir: str | Path | None,
    threads: Threads,
    stop: StopRequest | None = None,
) -> run.RunContext:
    """The run directory (made by rank 0) and the checkpoint to continue from (rank 0
    decides both); logging and the seed set up. Returns the run's context, which the
    caller makes current for the run (``with run.use(context):``)."""
    run_dir = launch.decided_by_main(lambda: start_run_dir(output_dir, options.continue_from))
    log = setup_logging(env.rank, run_dir / "train.log" if env.is_main else None)
    if threads.warning and env.is_main:
        log.warning(threads.warning)
    resume = launch.decided_by_main(
        lambda: resolve_continue(options.continue_from, run_dir, bool(output_dir))
    )
    with launch.errors_agreed():
        saved_seed = checkpoint.load(resume).get("seed") if resume else None
    options.seed = choose_seed(options.seed, saved_seed)
    seed_everything(options.seed)
    return run.RunContext(
        rank=env.rank,
        world_size=env.world_size,
        seed=options.seed,
        run_dir=run_dir,
        checkpoint=options.checkpoint,
        logging=options.logging,
        stop=stop,
        resume_from=Path(resume) if resume else None,
    )


@dataclasses.dataclass
class Built:
    """The datasets, the model and the trainer of a run (see :func:`build_run`)."""

    train_sets: list[AtomisticDataset]
    val_sets: list[AtomisticDataset]
    test_sets: list[AtomisticDataset]
    info: DatasetInfo
    model: Any
    trainer: Any
    transfer: bool  # a restarted model gained targets: the trainer starts afresh


def build_run(
    architecture: Architecture,
    options: Options,
    dtype: torch.dtype,
    source: str,
    context: run.RunContext,
) -> Built:
    """Load and check the datasets (split with the context's seed), then build the
    model and trainer, or restart them from the checkpoint the context continues."""
    with launch.errors_agreed():
        train_sets, val_sets, test_sets = load_datasets(options, dtype, source, context.seed)
        info = dataset_info_of(train_sets)
        _check_supported(architecture, info)
        check_elements(info, val_sets + test_sets)
        check_trainer(architecture, context.world_size, train_sets)
    resume = str(context.resume_from) if context.resume_from else None
    with launch.errors_agreed():
        model, trainer, transfer = build(architecture, info, resume)
    return Built(train_sets, val_sets, test_sets, info, model, trainer, transfer)


RUN_FILES = ("options.resolved.yaml", "metrics.csv", "checkpoints", "model.ckpt", "model.pt")


def new_run_dir(root: Path = Path("outputs")) -> Path:
    """``outputs/YYYY-MM-DD/HH-MM-SS`` (with a suffix if taken), created."""
    now = datetime.datetime.now()
    base = root / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")
    path, n = base, 1
    while True:
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            n += 1
            path = base.with_name(f"{base.name}-{n}")


def start_run_dir(output_dir: str | Path | None, continue_from: str | None) -> Path:
    """The run directory, made (by rank 0, see :func:`run_training`). One that holds
    a run already is refused unless the run continues (from any checkpoint)."""
    if output_dir is not None and continue_from is None:
        found = [name for name in RUN_FILES if (Path(output_dir) / name).exists()]
        if found:
            state = "a finished run" if "model.pt" in found else "a run"
            raise OptionsError(
                f"{output_dir} holds {state} already ({', '.join(found)}); training into "
                "it again would mix two runs. Continue it with --continue auto, or choose "
                "a new --output-dir"
            )
    run_dir = Path(output_dir) if output_dir else new_run_dir()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OptionsError(
            f"cannot create the run directory {run_dir}: {error.strerror}; choose another "
            "--output-dir"
        ) from None
    return run_dir.resolve()


def check_checkpoint_path(continue_from: str) -> Path:
    """An explicit ``continue_from`` exists and is a checkpoint file or step directory."""
    path = Path(continue_from)
    if not path.exists():
        raise CheckpointError(f"checkpoint {continue_from!r} (continue_from) does not exist")
    if path.is_dir() and not checkpoint.is_step_dir(path):
        raise CheckpointError(
            f"{path} (continue_from) is a directory, not a checkpoint: to continue the "
            f"run it holds, use {path / 'model.ckpt'} or a step checkpoint in "
            f"{path / 'checkpoints'}, or --output-dir {path} --continue auto"
        )
    return path


def resolve_continue(continue_from: str | None, run_dir: Path, fixed_dir: bool) -> str | None:
    """The checkpoint to continue from: an explicit path, or for ``auto`` the newest
    committed step checkpoint of the run directory that reads whole (None: start
    afresh). Rank 0 alone answers (its answer is shared): it sets aside, with a loud
    message, a newest checkpoint that cannot be read, and takes the one before.
    """
    log = get_logger()
    if continue_from is None:
        return None
    if continue_from != "auto":
        return str(check_checkpoint_path(continue_from).resolve())
    root = run_dir / "checkpoints"
    committed = checkpoint.committed_steps(root)
    set_aside = []
    for _, path in reversed(committed):
        try:
            checkpoint.verify(path)
        except CheckpointError as error:
            set_aside.append(checkpoint.set_aside(path))
            log.error(
                f"continue_from auto: checkpoint {path} cannot be read: {error}. Set aside as "
                f"{set_aside[-1]} (kept, not deleted); trying the one before"
            )
            continue
        log.info(f"continue_from auto: newest committed checkpoint is {path}")
        return str(path)
    if set_aside:
        raise CheckpointError(
            f"continue_from auto: no committed checkpoint in {root} can be read (set aside: "
            f"{', '.join(p.name for p in set_aside)}); continue from {run_dir / 'model.ckpt'} "
            "if it exists, or start a new run with another --output-dir"
        )
    if not fixed_dir:
        log.warning(
            "'continue_from: auto' without --output-dir: a new run directory never holds "
            "a checkpoint; give --output-dir so that a restarted job finds its own"
        )
    log.info(f"continue_from auto: no checkpoint in {root}, starting")
    return None


def choose_seed(seed: int | None, saved: int | None) -> int:
    """The options' seed; else ``saved``, the seed of the run being continued; else one
    drawn on rank 0 and shared, so that splits and order are identical on every rank."""
    if seed is None and saved is not None:
        return int(saved)
    if saved is not None and seed != saved:
        get_logger().warning(
            f"the options' seed {seed} differs from the checkpoint's {saved}: the data "
            "split and order change"
        )
    if seed is None:
        seed = launch.broadcast_object(random.SystemRandom().randrange(2**31))
    return seed


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_datasets(
    options: Options, dtype: torch.dtype, source: str, seed: int
) -> tuple[list[AtomisticDataset], list[AtomisticDataset], list[AtomisticDataset]]:
    """Training, validation and test datasets; fractions split from the training set
    (the split drawn from ``seed``, the same on every rank)."""
    train = []
    for i, d in enumerate(options.training_set):
        key = f"training_set[{i}]" if len(options.training_set) > 1 else "training_set"
        train.append(read_dataset(d, key, source, dtype))
        train[-1].sampling_weight, train[-1].loss_weight = d.sampling_weight, d.loss_weight
    sets: dict[str, list[AtomisticDataset]] = {}
    fractions = []
    for key in ("validation_set", "test_set"):
        value = getattr(options, key)
        if isinstance(value, float):
            fractions.append((key, value))
        else:
            sets[key] = [
                read_dataset(d, f"{key}[{i}]" if len(value) > 1 else key, source, dtype)
                for i, d in enumerate(value)
            ]
    if fractions:
        split_train = []
        for key, _ in fractions:
            sets[key] = []
        for dataset in train:
            *parts, rest = split_indices(len(dataset), [f for _, f in fractions], seed)
            for (key, _), indices in zip(fractions, parts):
                if len(indices):
                    sets[key].append(dataset.subset(indices, f"{dataset.name} ({key})"))
            split_train.append(dataset.subset(rest))
        train = split_train
    replay = finetune.replay_of(options.architecture.training, source)
    if replay is not None:
        train.append(read_dataset(replay[0], f"{finetune.KEY}.replay", source, dtype))
        train[-1].replay_fraction = replay[1]
    if not sets["validation_set"]:
        raise OptionsError(
            f"the validation set is empty; give 'validation_set' a dataset or a fraction "
            f"large enough to hold at least one structure (in {source})"
        )
    for dataset in train:
        if len(dataset) == 0:
            raise DataError(f"no training structures are left in {dataset.name} after splitting")
    return train, sets["validation_set"], sets.get("test_set", [])


def dataset_info_of(datasets: list[AtomisticDataset]) -> DatasetInfo:
    info = datasets[0].info
    for dataset in datasets[1:]:
        info = info.union(dataset.info)
    return info


def _check_supported(architecture: Architecture, info: DatasetInfo) -> None:
    """An architecture may declare ``supports(dataset_info)`` raising on what it cannot
    learn; hpctrain asks before any training."""
    check = getattr(architecture.model_class, "supports", None)
    if check is not None:
        check(info)


def check_trainer(
    architecture: Architecture, world_size: int, train_sets: list[AtomisticDataset]
) -> None:
    """A trainer may declare ``check_datasets(training_hypers, world_size, train_sets)``
    raising on what its ``train`` would refuse; hpctrain asks before the banner."""
    check = getattr(architecture.trainer_class, "check_datasets", None)
    if check is not None:
        check(architecture.training_hypers, world_size, train_sets)


def check_elements(info: DatasetInfo, datasets: list[AtomisticDataset]) -> None:
    """Every element of the validation and test sets is one the model learns from
    the training set (the model cannot predict the others)."""
    from ase.data import chemical_symbols

    known = set(info.atomic_types)
    for dataset in datasets:
        unknown = sorted(set(dataset.info.atomic_types) - known)
        if unknown:
            names = ", ".join(chemical_symbols[z] for z in unknown)
            trained = ", ".join(chemical_symbols[z] for z in sorted(known))
            raise DataError(
                f"{dataset.name} holds elements ({names}) that no training structure has "
                f"(the training set has {trained}); the model cannot predict them: add "
                "structures with these elements to the training set, or leave them out of "
                "the validation and test sets"
            )


def build(
    architecture: Architecture, info: DatasetInfo, continue_from: str | None
) -> tuple[Any, Any, bool]:
    """A new model and trainer, or both loaded from a checkpoint and restarted; and
    whether the restarted model gained new targets (the trainer then starts afresh).
    A new fine-tuning run (``architecture.training.finetune``) starts from the
    pretrained model with a new trainer."""
    Model, Trainer = architecture.model_class, architecture.trainer_class
    tuned = finetune.options_of(architecture.training_hypers)
    if continue_from is None and tuned is not None:
        model = finetune.pretrained_model(Model, tuned, info)
        return model, Trainer(architecture.training_hypers), False
    if continue_from is None:
        return Model(architecture.model_hypers, info), Trainer(architecture.training_hypers), False
    trainer = Trainer.load_checkpoint(continue_from, architecture.training_hypers)
    loaded = Model.load_checkpoint(continue_from)
    model = loaded.restart(info)
    if model is not loaded:
        return model, Trainer(architecture.training_hypers), True
    return model, trainer, False
