"""The blocks a run prints on rank 0: the banner at its start (what trains, where, on
what, the model's size and a check of its data) and the summary at its end; and where
the run runs as plain data (:func:`system`), for the config of a W&B run."""

from __future__ import annotations

import platform
import socket
from pathlib import Path
from typing import Any

import torch

from . import __version__, checkpoint, launch, progress
from .architecture import DatasetInfo
from .data.sanity import check_data
from .data.structures import GRADIENT_NAMES, labels_of
from .evaluation import display_name
from .options import Options
from .report import (
    best_and_final,
    block,
    get_logger,
    plural,
    read_metrics,
    significant,
    validation_errors,
)
from .startup import Built, Launched
from .threads import Threads
from .training_sets import labels_in_words, mixture_in_words, pairs_in_words


def report_start(
    architecture: str,
    env: launch.LaunchEnv,
    backend: str,
    launched: Launched,
    dtype: torch.dtype,
    options: Options,
    built: Built,
    run_dir: Path,
    resume: Path | None,
) -> dict[str, Any]:
    """The banner (rank 0), with the model's size and a check of the training data
    (:mod:`hpctrain.data.sanity`), a warning for each implausible figure, and where the
    run continues from. Every rank calls it (the ranks' devices are gathered); each
    gets where the run runs (:func:`system`)."""
    devices = launch.all_gather_object((socket.gethostname(), describe_device(launched.device)))
    log = get_logger()
    if env.is_main:
        sanity = check_data(built.train_sets, cutoff_of(built.model), options.seed)
        sets = (built.train_sets, built.val_sets, built.test_sets)
        sizes = [sum(map(len, datasets)) for datasets in sets]
        rows = [("parameters", parameters_of(built.model)), *sanity.lines()]
        mixture = mixture_in_words(built.train_sets)
        if mixture:
            rows.append(("per epoch", mixture))
        pairs = pairs_in_words(built.train_sets, cutoff_of(built.model))
        if pairs:
            rows.append(("neighbour pairs", pairs))
        labels = [sorted(labels_of(d)) for d in built.train_sets]
        if any(mine != labels[0] for mine in labels):
            rows.append(("labels", labels_in_words(built.train_sets)))
        if any(d.loss_weight != 1.0 for d in built.train_sets):
            weights = ", ".join(f"{d.name}: {d.loss_weight:g}" for d in built.train_sets)
            rows.append(("loss weights", weights))
        log.info(
            banner(
                architecture,
                env,
                backend,
                launched.threads,
                devices,
                dtype,
                built.info,
                sizes,
                run_dir,
                rows,
            )
        )
        for warning in sanity.warnings():
            log.warning(warning)
    if resume:
        log.info(f"continuing from {resume}")
    if built.transfer:
        log.info(
            "the model gained new targets (transfer learning): the optimizer and the epoch "
            "count start afresh"
        )
    return system(env, backend, launched.threads, devices, dtype)


def describe_device(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H100 80GB HBM3)``."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def banner(
    architecture: str,
    env: launch.LaunchEnv,
    backend: str,
    threads: Threads,
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
    on = ", ".join(f"{n} x {d}" if n > 1 else d for d, n in device_counts(devices).items())
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


def device_counts(devices: list[tuple[str, str]]) -> dict[str, int]:
    """How many ranks use each kind of device, from (host, device) of every rank."""
    counts: dict[str, int] = {}
    for _, device in devices:
        counts[device] = counts.get(device, 0) + 1
    return counts


def system(
    env: launch.LaunchEnv,
    backend: str,
    threads: Threads,
    devices: list[tuple[str, str]],
    dtype: torch.dtype,
) -> dict[str, Any]:
    """Where the run runs, as the banner says it, in plain data: rank 0's host, every
    host, ranks, launcher (and SLURM job), devices, threads, dtype and versions.

    :param devices: (host, device) of every rank
    """
    return {
        "hostname": devices[0][0],
        "hosts": sorted({host for host, _ in devices}),
        "world_size": env.world_size,
        "launcher": env.launcher,
        "job_id": env.job_id,
        "backend": backend if env.distributed else None,
        "devices": device_counts(devices),
        "threads_per_rank": threads.count,
        "dtype": str(dtype).replace("torch.", ""),
        "hpctrain": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def summary(
    run_dir: Path, wall_s: float, exported: str = "", stopped_early: str | None = None
) -> str:
    """The end-of-run block: best and final validation errors (from ``metrics.csv``,
    over every restart of the run), whether training stopped early, time, throughput
    and where the model is."""
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
    if stopped_early:
        rows.append(("stopped early", stopped_early))
    totals = progress.TOTALS
    rows.append(
        (
            "time",
            f"{wall_s:.1f} s in all, {totals.seconds:.1f} s in training steps "
            f"({totals.structures} structures, {significant(totals.rate)} structures/s)",
        )
    )
    rows.append(("model", f"{run_dir / 'model.pt'} (extensions in {run_dir / 'extensions'})"))
    if exported:
        rows.append(("exported", exported))
    rows.append(("checkpoint", str(run_dir / "model.ckpt")))
    return block("training finished", rows)


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
