"""The CPU threads of a rank: as many as it is given (``threads_per_rank``,
``OMP_NUM_THREADS``, ``SLURM_CPUS_PER_TASK``), else its share of the node's cores, and
never more than the cores the process may use (affinity, cgroup CPU quota)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from .report import plural

if TYPE_CHECKING:
    from .launch import LaunchEnv


@dataclasses.dataclass(frozen=True)
class Threads:
    """The CPU threads of a rank, where that number came from, and what to warn of."""

    count: int
    source: str
    warning: str | None = None


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """The CPUs that this process's cgroup may use (its CPU quota), or None: cgroup v2
    ``cpu.max`` or v1 ``cpu.cfs_quota_us``/``cpu.cfs_period_us`` (containers, some
    batch systems)."""
    for quota_file, period_file in (
        ("cpu.max", None),
        ("cpu/cpu.cfs_quota_us", "cpu/cpu.cfs_period_us"),
    ):
        try:
            with open(os.path.join(root, quota_file)) as file:
                fields = file.read().split()
            if period_file is not None:
                with open(os.path.join(root, period_file)) as file:
                    fields.append(file.read().strip())
            quota, period = fields[0], fields[1]
            if quota in ("max", "-1"):
                return None
            return int(quota) / int(period)
        except (OSError, ValueError, IndexError, ZeroDivisionError):
            continue
    return None


def usable_cores() -> int:
    """The cores this process may use: its CPU affinity, within its cgroup's quota."""
    cores = os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0)) or cores
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, max(1, int(limit)))
    return cores


def threads_per_rank(
    env: LaunchEnv, requested: int | None = None, environ: Mapping[str, str] | None = None
) -> Threads:
    """CPU threads for this rank: ``requested`` (``distributed.threads_per_rank``), else
    ``OMP_NUM_THREADS``, else ``SLURM_CPUS_PER_TASK``, else the usable cores shared by
    the ranks of the node; never more than the cores this process may use (affinity,
    cgroup quota), so that ranks and runs sharing a machine do not oversubscribe it."""
    environ = os.environ if environ is None else environ
    cores = usable_cores()
    omp = environ.get("OMP_NUM_THREADS", "").strip()
    omp_count = int(omp) if omp.isdigit() and int(omp) > 0 else None
    warning = None
    if requested:
        count, source = requested, "distributed.threads_per_rank"
        if omp_count is not None and omp_count != requested:
            warning = f"distributed.threads_per_rank {requested} overrides OMP_NUM_THREADS={omp}"
    elif omp_count is not None:
        count, source = omp_count, "OMP_NUM_THREADS"
    elif env.cpus_per_task:
        count, source = env.cpus_per_task, "SLURM_CPUS_PER_TASK"
    elif env.launcher == "slurm" and cores < (os.cpu_count() or 1):
        count, source = cores, "the cores srun bound this task to"
    else:
        ranks = max(1, env.local_world_size)
        count = max(1, cores // ranks)
        source = f"{cores} usable cores / {plural(ranks, 'rank')} on this node"
    if count > cores:
        warning = (
            f"{source} asks for {count} threads but this process may use {cores} "
            f"cores (CPU affinity or cgroup quota); using {cores}"
        )
        count, source = cores, f"{cores} usable cores"
    return Threads(count, source, warning)
