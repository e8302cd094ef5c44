"""The train flow: options -> launch -> data -> architecture -> train -> export.

One pass, top to bottom, as the architecture API sketches it. Every rank runs it;
rank 0 alone writes files and exports.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import random
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from . import __version__, checkpoint, launch, progress, run
from .architecture import Architecture, DatasetInfo, choose_device_type, choose_dtype, resolve
from .data import AtomisticDataset, read_dataset, split_indices
from .data.sanity import check_data
from .errors import CheckpointError, DataError, HpctrainError, OptionsError, Preempted
from .evaluation import GRADIENT_NAMES, display_name, evaluate_model
from .options import DistributedOptions, Options, SlurmOptions, load_options, write_resolved
from .report import (
    best_and_final,
    block,
    end_status_line,
    errors_text,
    get_logger,
    log_to_file,
    plural,
    read_metrics,
    setup_logging,
    significant,
    validation_errors,
)
from .signals import StopRequest


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_datasets(
    options: Options, dtype: torch.dtype, source: str
) -> tuple[list[AtomisticDataset], list[AtomisticDataset], list[AtomisticDataset]]:
    """Training, validation and test datasets; fractions split from the training set."""
    train = [
        read_dataset(
            d,
            f"training_set[{i}]" if len(options.training_set) > 1 else "training_set",
            source,
            dtype,
        )
        for i, d in enumerate(options.training_set)
    ]
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
            *parts, rest = split_indices(
                len(dataset), [f for _, f in fractions], run.current().seed
            )
            for (key, _), indices in zip(fractions, parts):
                if len(indices):
                    sets[key].append(dataset.subset(indices, f"{dataset.name} ({key})"))
            split_train.append(dataset.subset(rest))
        train = split_train
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


def prepare(
    options_path: str | Path,
    continue_from: str | None = None,
    cuda_available: bool | None = None,
) -> tuple[Options, Architecture, torch.dtype, str]:
    """Everything that can be checked before launching: options, architecture and its
    hypers, dtype and device type. Fails fast, with the key path, on every rank."""
    source = str(options_path)
    options = load_options(options_path)
    if continue_from is not None:
        options.continue_from = continue_from
    if options.continue_from not in (None, "auto"):
        check_checkpoint_path(options.continue_from)  # before a run directory is made
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


BEFORE_TRAINING = "before training began: nothing was saved, nothing is lost"


def train(
    options_path: str | Path,
    output_dir: str | Path | None = None,
    continue_from: str | None = None,
    requeue: bool = False,
    max_requeues: int | None = None,
    stop: StopRequest | None = None,
) -> Path:
    """Run the whole flow; returns the run directory (on every rank).

    Stop signals are handled from start to end (see :mod:`hpctrain.signals`): before
    training they end the run at once, during training at the next step with a
    checkpoint, after training once the final checkpoint is written. Each ends with
    :class:`Preempted` (exit code 75) and, when asked, a requeue of the SLURM job.

    :param requeue: requeue the SLURM job after a stop signal (overrides
        ``checkpoint.requeue``), at most ``max_requeues`` times in all (overrides
        ``slurm.max_requeues``)
    :param stop: the handlers already installed by the caller (else installed here)
    """
    progress.TOTALS.reset()
    env = launch.detect()
    requeue_limit = SlurmOptions().max_requeues if max_requeues is None else max_requeues
    with contextlib.nullcontext(stop) if stop else StopRequest() as stop:
        try:
            with stop.immediately(BEFORE_TRAINING):
                try:
                    options, architecture, dtype, device_type = prepare(options_path, continue_from)
                    backend = launch.backend_for(device_type, options.distributed.backend)
                except HpctrainError as error:
                    if isinstance(error, Preempted) or not env.distributed:
                        raise
                    fail_together(env, error)
            if requeue:
                options.checkpoint.requeue = True
            if max_requeues is not None:
                options.slurm.max_requeues = max_requeues
            requeue, requeue_limit = options.checkpoint.requeue, options.slurm.max_requeues
            return run_training(
                options,
                architecture,
                dtype,
                (device_type, backend),
                env,
                stop,
                output_dir,
                str(options_path),
            )
        except Preempted:
            if requeue and stop.requeue and env.is_main:
                launch.requeue_slurm_job(env, requeue_limit)
            raise


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


def run_training(
    options: Options,
    architecture: Architecture,
    dtype: torch.dtype,
    launch_choice: tuple[str, str],
    env: launch.LaunchEnv,
    stop: StopRequest,
    output_dir: str | Path | None,
    source: str,
) -> Path:
    """Launch, load, build, train, then finish (:func:`finish`); see :func:`train`.

    :param launch_choice: the device type and the process-group backend

    Errors that ranks meet before training are agreed between them and reported once
    (:func:`launch.agree_on_errors`): rank 0 decides the run directory and the
    checkpoint to continue from; every rank loads and checks its data and builds.
    """
    started = time.perf_counter()
    device_type, backend = launch_choice
    with stop.immediately(BEFORE_TRAINING):
        device = launch.device_for(env, device_type)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        threads = launch.threads_per_rank(env, options.distributed.threads_per_rank)
        torch.set_num_threads(threads.count)
    with launch.ProcessGroup(env, backend, options.distributed.timeout_s):
        launch.agree_on_errors(None)  # (the options of every rank are good)
        with stop.immediately(BEFORE_TRAINING):
            run_dir = launch.decided_by_main(
                lambda: start_run_dir(output_dir, options.continue_from)
            )
            log = setup_logging(env.rank, run_dir / "train.log" if env.is_main else None)
            if threads.warning and env.is_main:
                log.warning(threads.warning)
            resume = launch.decided_by_main(
                lambda: resolve_continue(options.continue_from, run_dir, bool(output_dir))
            )
            with launch.errors_agreed():
                saved_seed = checkpoint.load(resume).get("seed") if resume else None
            options.seed = choose_seed(options.seed, saved_seed)
            run.set_current(
                run.RunContext(
                    rank=env.rank,
                    world_size=env.world_size,
                    seed=options.seed,
                    run_dir=run_dir,
                    checkpoint=options.checkpoint,
                    logging=options.logging,
                    stop=stop,
                    resume_from=Path(resume) if resume else None,
                )
            )
            seed_everything(options.seed)
            with launch.errors_agreed():
                train_sets, val_sets, test_sets = load_datasets(options, dtype, source)
                info = dataset_info_of(train_sets)
                _check_supported(architecture, info)
                check_elements(info, val_sets + test_sets)
                check_trainer(architecture, env.world_size, train_sets)
            with launch.errors_agreed():
                model, trainer, transfer = build(architecture, info, resume)
            if env.is_main:  # (a run that failed its checks leaves only train.log)
                write_resolved(options, run_dir / "options.resolved.yaml")
            devices = launch.all_gather_object((socket.gethostname(), describe_device(device)))
            if env.is_main:
                report_start(
                    architecture,
                    env,
                    backend,
                    threads,
                    devices,
                    dtype,
                    info,
                    options,
                    (train_sets, val_sets, test_sets),
                    model,
                    run_dir,
                )
            if resume:
                log.info(f"continuing from {resume}")
            if transfer:
                log.info(
                    "the model gained new targets (transfer learning): the optimizer and the "
                    "epoch count start afresh"
                )
        trainer.train(
            model=model,
            devices=[device],
            train_datasets=train_sets,
            val_datasets=val_sets,
            checkpoint_dir=str(run_dir),
        )
        finish(trainer, model, info, test_sets, device, run_dir, env, stop)
        if env.is_main:
            log.info(summary(run_dir, time.perf_counter() - started))
        del model, trainer  # (with DDP and its pending work) before the group goes
    return run_dir


RUN_FILES = ("options.resolved.yaml", "metrics.csv", "checkpoints", "model.ckpt", "model.pt")


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


def finish(
    trainer: Any,
    model: Any,
    info: DatasetInfo,
    test_sets: list[AtomisticDataset],
    device: torch.device,
    run_dir: Path,
    env: launch.LaunchEnv,
    stop: StopRequest,
) -> None:
    """After the last step: the final checkpoint first (a stop signal waits for it),
    then, unless a rank was asked to stop, the export and the test metrics, which a
    stop signal interrupts at once (the next job with ``--continue auto`` resumes
    after the last step and only does these)."""
    final = run_dir / "model.ckpt"
    if env.is_main:
        save_final_checkpoint(trainer, model, final)
    received = sorted({name for name in launch.all_gather_object(stop.received) if name})
    left = (
        f"the final checkpoint {final} is written; continue with --continue auto and the "
        "same --output-dir to export the model and compute the test metrics"
    )
    if received:
        raise Preempted(f"stopped by {' and '.join(received)} after training ended: {left}")
    with stop.immediately(f"while exporting the model or computing test metrics: {left}"):
        if env.is_main:
            export_model(model, run_dir)
        if test_sets:
            report_test_metrics(model, info, test_sets, device, run_dir, env.is_main)
        launch.barrier()


def report_start(
    architecture: Architecture,
    env: launch.LaunchEnv,
    backend: str,
    threads: launch.Threads,
    devices: list[tuple[str, str]],
    dtype: torch.dtype,
    info: DatasetInfo,
    options: Options,
    datasets: tuple[list[AtomisticDataset], ...],
    model: Any,
    run_dir: Path,
) -> None:
    """Rank 0's banner, with the model's size and a check of the training data
    (:mod:`hpctrain.data.sanity`), then a warning for each implausible figure."""
    log = get_logger()
    sanity = check_data(datasets[0], cutoff_of(model), options.seed)
    sizes = [sum(map(len, sets)) for sets in datasets]
    rows = [("parameters", parameters_of(model)), *sanity.lines()]
    log.info(
        banner(architecture.name, env, backend, threads, devices, dtype, info, sizes, run_dir, rows)
    )
    for warning in sanity.warnings():
        log.warning(warning)


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def banner(
    architecture: str,
    env: launch.LaunchEnv,
    backend: str,
    threads: launch.Threads,
    devices: list[tuple[str, str]],
    dtype: torch.dtype,
    info: DatasetInfo,
    sizes: list[int],
    run_dir: Path,
    model_rows: list[tuple[str, str]] = (),
) -> str:
    """The start-up block: what trains, where, on what, and where its outputs go.

    :param devices: (host, device) of every rank
    :param sizes: structures in the training, validation and test sets
    :param model_rows: about the model and the data it sees (parameters, data check)
    """
    hosts = sorted({host for host, _ in devices})
    counts: dict[str, int] = {}
    for _, device in devices:
        counts[device] = counts.get(device, 0) + 1
    on = ", ".join(f"{n} x {d}" if n > 1 else d for d, n in counts.items())
    group = f", {backend}" if env.distributed else ""
    targets = ", ".join(
        display_name(f"{name} {GRADIENT_NAMES.get(g, g)}".strip())
        for name, target in info.targets.items()
        for g in ["", *target.gradients]
    )
    return block(
        f"hpctrain {__version__}, architecture {architecture}",
        [
            (
                "ranks",
                f"{plural(env.world_size, 'rank')} via {env.launcher}{group}, "
                f"{plural(threads.count, 'thread')} per rank ({threads.source})",
            ),
            ("devices", f"{on} on {len(hosts)} node(s)" if len(hosts) > 1 else on),
            ("dtype", str(dtype).replace("torch.", "")),
            ("data", f"{sizes[0]} training, {sizes[1]} validation, {sizes[2]} test structures"),
            ("elements", str(info.atomic_types)),
            ("targets", targets),
            *model_rows,
            ("run directory", str(run_dir)),
            ("resolved options", str(run_dir / "options.resolved.yaml")),
        ],
    )


def summary(run_dir: Path, wall_s: float) -> str:
    """The end-of-run block: best and final validation errors (from ``metrics.csv``,
    over every restart of the run), time, throughput and where the model is."""
    best, final = best_and_final(read_metrics(run_dir / "metrics.csv"))
    rows = []
    if best is not None:
        step = int(best["step"])
        kept = dict(checkpoint.committed_steps(run_dir / "checkpoints")).get(step)
        where = f"; checkpoint {kept}" if kept is not None else ""
        rows.append(
            (
                "best epoch",
                f"{int(best['epoch'])} (step {step}, validation loss "
                f"{best['val_loss']:.4g}): {validation_errors(best)}{where}",
            )
        )
    if final is not None:
        rows.append(("final epoch", f"{int(final['epoch'])}: {validation_errors(final)}"))
    totals = progress.TOTALS
    rows.append(
        (
            "time",
            f"{wall_s:.1f} s in all, {totals.seconds:.1f} s in training steps "
            f"({totals.structures} structures, {significant(totals.rate)} structures/s)",
        )
    )
    rows.append(("model", f"{run_dir / 'model.pt'} (extensions in {run_dir / 'extensions'})"))
    rows.append(("checkpoint", str(run_dir / "model.ckpt")))
    return block("training finished", rows)


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


def build(
    architecture: Architecture, info: DatasetInfo, continue_from: str | None
) -> tuple[Any, Any, bool]:
    """A new model and trainer, or both loaded from a checkpoint and restarted; and
    whether the restarted model gained new targets (the trainer then starts afresh)."""
    Model, Trainer = architecture.model_class, architecture.trainer_class
    if continue_from is None:
        return Model(architecture.model_hypers, info), Trainer(architecture.training_hypers), False
    trainer = Trainer.load_checkpoint(continue_from, architecture.training_hypers)
    loaded = Model.load_checkpoint(continue_from)
    model = loaded.restart(info)
    if model is not loaded:
        return model, Trainer(architecture.training_hypers), True
    return model, trainer, False


def cutoff_of(model: Any) -> float | None:
    """The largest neighbour-list cutoff a metatomic model requests (None: none)."""
    requests = getattr(model, "requested_neighbor_lists", None)
    cutoffs = [float(r.cutoff) for r in requests()] if callable(requests) else []
    return max(cutoffs) if cutoffs else None


def parameters_of(model: Any) -> str:
    """``277,539`` (``, of which 1,024 frozen`` when some do not train)."""
    if not isinstance(model, torch.nn.Module):
        return "unknown (not a torch module)"
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    return f"{total:,}" + (f", of which {frozen:,} frozen" if frozen else "")


def report_test_metrics(
    model: Any,
    info: DatasetInfo,
    test_sets: list[AtomisticDataset],
    device: torch.device,
    run_dir: Path,
    is_main: bool,
) -> None:
    """Errors on the test set after training, logged and written to
    ``test_metrics.json``. Needs a model following metatomic's model interface."""
    log = get_logger()
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "requested_neighbor_lists")):
        log.info("test set: this model is no metatomic torch module; evaluate model.pt instead")
        return
    metrics = evaluate_model(model, info.targets, test_sets, device)
    log.info(f"test set: {errors_text(metrics)}")
    if is_main:
        checkpoint.write_text_atomically(
            run_dir / "test_metrics.json", json.dumps(metrics, indent=2) + "\n"
        )


def save_final_checkpoint(trainer: Any, model: Any, path: Path) -> None:
    """The trainer's checkpoint when it writes one, else the model's (both API forms)."""
    if callable(getattr(trainer, "save_checkpoint", None)):
        trainer.save_checkpoint(path)
    else:
        model.save_checkpoint(path)


def export_model(model: Any, run_dir: Path, metadata: Any = None, name: str = "model.pt") -> Path:
    """``model.pt`` (or ``name``) and the TorchScript extensions it needs, in
    ``run_dir``; ``metadata``: a metatomic ``ModelMetadata`` to carry."""
    from .export import with_metadata
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


EXIT_USER_ERROR = 2
EXIT_LOST_RANK = 3


def main_guard(function, *args: Any, **kwargs: Any) -> int:
    """Run ``function``; report hpctrain errors without a traceback, on stderr and in
    the run's ``train.log``: by rank 0 alone when the ranks agreed on it, else by every
    rank that has one (other ranks than 0 prefix theirs)."""

    def report(message: str, all_ranks: bool = False) -> None:
        rank = launch.rank_hint()
        if rank == 0 or all_ranks:
            print(("" if rank == 0 else f"[rank {rank}] ") + message, file=sys.stderr)
            launch.tell_launcher(message)
        else:
            launch.tell_launcher("hpctrain: stopped with rank 0, which says why")
        log_to_file(message)

    try:
        try:
            function(*args, **kwargs)
        finally:
            end_status_line()  # a progress bar on screen ends before any message
        return 0
    except Preempted as stop:
        report(f"hpctrain: {stop}")
        return stop.exit_code
    except HpctrainError as error:
        report(f"hpctrain: error: {error}", all_ranks=not error.agreed)
        return getattr(error, "exit_code", EXIT_USER_ERROR)
    except RuntimeError as error:
        if not launch.is_communication_failure(error):
            log_to_file(f"hpctrain: unexpected error\n{traceback.format_exc()}")
            raise
        report(
            f"hpctrain: error: rank {launch.rank_hint()} lost contact with another rank "
            "(it died, was killed, or hangs); its own output says why. Training stopped; "
            f"continue from the last checkpoint. Details: {str(error).splitlines()[0]}",
            all_ranks=True,
        )
        return EXIT_LOST_RANK
    except KeyboardInterrupt:
        report(
            "hpctrain: interrupted (a second Ctrl-C stops at once, without a checkpoint)",
            all_ranks=True,
        )
        return 130
    except Exception:
        log_to_file(f"hpctrain: unexpected error\n{traceback.format_exc()}")
        raise
    finally:
        sys.stdout.flush()
