"""The train flow: options -> launch -> data -> architecture -> train -> export.

One pass, top to bottom, as the architecture API sketches it (the steps up to the
trainer are :mod:`hpctrain.startup`'s). Every rank runs it; rank 0 alone writes
files and exports.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch

from . import banner, checkpoint, export, files, launch, progress, run, startup, wandb_run
from .architecture import Architecture, DatasetInfo
from .data import AtomisticDataset
from .errors import HpctrainError, Preempted
from .evaluation import evaluate_model
from .options import Options, SlurmOptions, resolved_dict, write_resolved
from .report import errors_text, get_logger
from .signals import StopRequest

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
                    options, architecture, dtype, device_type = startup.prepare(
                        options_path, continue_from
                    )
                    backend = launch.backend_for(device_type, options.distributed.backend)
                except HpctrainError as error:
                    if isinstance(error, Preempted) or not env.distributed:
                        raise
                    startup.fail_together(env, error)
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
    checkpoint to continue from, and starts the W&B run (``logging.wandb``); every
    rank loads and checks its data and builds.
    """
    started = time.perf_counter()
    device_type, backend = launch_choice
    with contextlib.ExitStack() as held:
        launched = held.enter_context(
            startup.launched(env, device_type, backend, options.distributed)
        )
        with stop.immediately(BEFORE_TRAINING), checkpoint.read_once():
            context = startup.open_run(env, options, output_dir, launched.threads, stop)
            held.enter_context(run.use(context))
            built = startup.build_run(architecture, options, dtype, source, context)
            run_dir, resume = context.run_dir, context.resume_from
            if env.is_main:  # (a run that failed its checks leaves only train.log)
                write_resolved(options, run_dir / "options.resolved.yaml")
            system = banner.report_start(
                architecture.name, env, backend, launched, dtype, options, built, run_dir, resume
            )
            config = {"options": resolved_dict(options), "system": system}
            context.wandb = held.enter_context(
                wandb_run.opened(options.logging.wandb, run_dir, env.is_main, config, source)
            )
        built.trainer.train(
            model=built.model,
            devices=[launched.device],
            train_datasets=built.train_sets,
            val_datasets=built.val_sets,
            checkpoint_dir=str(run_dir),
        )
        exported = finish(built, launched.device, run_dir, env, stop, options.export)
        if env.is_main:
            wall_s = time.perf_counter() - started
            stopped = getattr(built.trainer, "stopped_early", None)
            get_logger().info(banner.summary(run_dir, wall_s, exported, stopped))
        del built  # (the model and trainer, with DDP and its pending work) before the group goes
    return run_dir


def finish(
    built: startup.Built,
    device: torch.device,
    run_dir: Path,
    env: launch.LaunchEnv,
    stop: StopRequest,
    which: str = "best",
) -> str:
    """After the last step: the final checkpoint first (a stop signal waits for it),
    then, unless a rank was asked to stop, the export and the test metrics of the
    ``which`` weights (``best`` or ``last``), which a stop signal interrupts at once
    (the next job with ``--continue auto`` resumes after the last step and only does
    these). Returns what was exported, in words."""
    final = run_dir / "model.ckpt"
    if env.is_main:
        save_final_checkpoint(built.trainer, built.model, final)
    received = sorted({name for name in launch.all_gather_object(stop.received) if name})
    left = (
        f"the final checkpoint {final} is written; continue with --continue auto and the "
        "same --output-dir to export the model and compute the test metrics"
    )
    if received:
        raise Preempted(f"stopped by {' and '.join(received)} after training ended: {left}")
    model, exported = exported_model(built, which)
    with stop.immediately(f"while exporting the model or computing test metrics: {left}"):
        if env.is_main:
            export.export_model(model, run_dir)
        if built.test_sets:
            report_test_metrics(model, built.info, built.test_sets, device, run_dir, env.is_main)
        launch.barrier()
    return exported


def exported_model(built: startup.Built, which: str) -> tuple[Any, str]:
    """The model to export (``which``: ``best`` or ``last`` weights), and in words
    what it is. A trainer that keeps no best weights gives the last ones."""
    if which == "last":
        return built.model, "the last weights (export: last)"
    keeps_best = callable(getattr(built.trainer, "best_model", None))
    best = built.trainer.best_model() if keeps_best else None
    if best is not None:
        model, where = best
        return model, (
            f"the best validation's weights (epoch {where['epoch']}, step {where['step']}, "
            f"validation loss {where['validation_loss']:.4g})"
        )
    return built.model, "the last weights (the trainer kept no best ones)"


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
        files.write_text_atomically(
            run_dir / "test_metrics.json", json.dumps(metrics, indent=2) + "\n"
        )


def save_final_checkpoint(trainer: Any, model: Any, path: Path) -> None:
    """The trainer's checkpoint when it writes one, else the model's (both API forms)."""
    if callable(getattr(trainer, "save_checkpoint", None)):
        trainer.save_checkpoint(path)
    else:
        model.save_checkpoint(path)
