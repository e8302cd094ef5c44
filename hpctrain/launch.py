"""The one place that reads the launcher's environment, and owns the process group.

Detects, in this order: torchrun (``TORCHELASTIC_RUN_ID`` or ``RANK``/``WORLD_SIZE``),
an MPI launcher (``PMI_RANK``, ``OMPI_COMM_WORLD_RANK``, ``PMIX_RANK``,
``MV2_COMM_WORLD_RANK``; mpi4py then gives local rank and the rendezvous address),
a SLURM job step started by ``srun`` (``SLURM_STEP_ID``; the batch shell of
``sbatch`` has ``SLURM_PROCID`` but no step and is *not* a task), else a single
process. Nothing else in hpctrain reads
these variables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import re
import socket
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import HpctrainError, LaunchError, Preempted

T = TypeVar("T")

# SLURM step ids of the batch shell and the extern step, which are not tasks
_NON_TASK_STEPS = {
    "batch",
    "extern",
    "interactive",
    "4294967290",
    "4294967291",
    "4294967292",
    "4294967293",
    "4294967294",
    "4294967295",
}


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """Where this process stands among the ranks of a run."""

    launcher: str  # "single", "torchrun", "mpi", "slurm"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    cpus_per_task: int | None = None
    job_id: str | None = None
    restart_count: int = 0  # how often SLURM restarted (requeued) this job

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def expand_hostlist(hostlist: str) -> list[str]:
    """SLURM's compressed host list, e.g. ``gpu[01-03,7],login1`` -> hosts, in order."""
    hosts = []
    for part in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", part)
        if not match:
            hosts.append(part)
            continue
        prefix, ranges, suffix = match.groups()
        for item in ranges.split(","):
            if "-" in item:
                start, end = item.split("-")
                width = len(start)
                hosts.extend(
                    f"{prefix}{i:0{width}d}{suffix}" for i in range(int(start), int(end) + 1)
                )
            else:
                hosts.append(f"{prefix}{item}{suffix}")
    return hosts


def expand_tasks_per_node(value: str) -> list[int]:
    """SLURM's ``2(x3),1`` -> ``[2, 2, 2, 1]``."""
    counts = []
    for item in value.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise LaunchError(f"cannot read SLURM tasks per node {value!r}")
        counts.extend([int(match.group(1))] * int(match.group(2) or 1))
    return counts


def slurm_port(job_id: str, step_id: str) -> int:
    """A rendezvous port derived from the job and step, below the ephemeral range,
    so that concurrent jobs (and steps of one job) on a node do not collide."""
    digits = int(re.sub(r"\D", "", job_id) or 0)
    step = int(step_id) if step_id.isdigit() else 0
    return 15000 + (digits * 31 + step) % 10000


def _resolve_host(host: str) -> str:
    """An address for ``host``; SLURM's NodeAddr when the name does not resolve."""
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", host], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    match = re.search(r"NodeAddr=(\S+)", out)
    if match:
        return match.group(1)
    raise LaunchError(
        f"the first node of the job, {host!r}, does not resolve and SLURM gives no "
        "address for it; set MASTER_ADDR in the job script"
    )


def _int(environ: Mapping[str, str], key: str, default: int | None = None) -> int:
    if key not in environ and default is not None:
        return default
    try:
        return int(environ[key])
    except (KeyError, ValueError):
        raise LaunchError(f"environment variable {key} is missing or not an integer") from None


def _torchrun(environ: Mapping[str, str]) -> LaunchEnv:
    return LaunchEnv(
        launcher="torchrun",
        rank=_int(environ, "RANK"),
        world_size=_int(environ, "WORLD_SIZE"),
        local_rank=_int(environ, "LOCAL_RANK"),
        local_world_size=_int(environ, "LOCAL_WORLD_SIZE", _int(environ, "WORLD_SIZE")),
        master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
        master_port=_int(environ, "MASTER_PORT", 29500),
        job_id=environ.get("TORCHELASTIC_RUN_ID"),
    )


def _slurm(environ: Mapping[str, str]) -> LaunchEnv:
    rank = _int(environ, "SLURM_PROCID")
    world_size = (
        _int(environ, "SLURM_NTASKS")
        if "SLURM_NTASKS" in environ
        else _int(environ, "SLURM_NPROCS")
    )
    node = _int(environ, "SLURM_NODEID", 0)
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    local_world_size = 1
    if per_node:
        counts = expand_tasks_per_node(per_node)
        if not 0 <= node < len(counts):
            raise LaunchError(
                f"SLURM_NODEID={node} but tasks per node {per_node!r} list {len(counts)} nodes"
            )
        local_world_size = counts[node]
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "")
    job_id = environ.get("SLURM_JOB_ID", "0")
    if "MASTER_ADDR" in environ:
        master_addr = environ["MASTER_ADDR"]
    elif world_size == 1:
        master_addr = "127.0.0.1"
    else:
        hosts = expand_hostlist(nodelist) if nodelist else []
        if not hosts:
            raise LaunchError("SLURM_STEP_NODELIST and SLURM_JOB_NODELIST are both empty")
        master_addr = _resolve_host(hosts[0])
    cpus = environ.get("SLURM_CPUS_PER_TASK")
    return LaunchEnv(
        launcher="slurm",
        rank=rank,
        world_size=world_size,
        local_rank=_int(environ, "SLURM_LOCALID"),
        local_world_size=local_world_size,
        master_addr=master_addr,
        master_port=_int(
            environ, "MASTER_PORT", slurm_port(job_id, environ.get("SLURM_STEP_ID", "0"))
        ),
        cpus_per_task=int(cpus) if cpus and cpus.isdigit() else None,
        job_id=job_id,
        restart_count=_int(environ, "SLURM_RESTART_COUNT", 0),
    )


def _mpi(environ: Mapping[str, str]) -> LaunchEnv:
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise LaunchError(
            f"started by an MPI launcher but mpi4py cannot be imported ({error}); "
            "install hpctrain with its dependencies (pip install mpi4py mpich)"
        ) from None
    comm = MPI.COMM_WORLD
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    address = port = None
    if comm.rank == 0:
        # one node: loopback always works; several: the peers resolve rank 0's name
        # (gethostbyname(hostname) can give 127.0.1.1 on Debian-style hosts)
        multi_node = local.size < comm.size
        address = environ.get("MASTER_ADDR") or (socket.getfqdn() if multi_node else "127.0.0.1")
        port = int(environ.get("MASTER_PORT") or _free_port())
    address, port = comm.bcast((address, port), root=0)
    env = LaunchEnv(
        launcher="mpi",
        rank=comm.rank,
        world_size=comm.size,
        local_rank=local.rank,
        local_world_size=local.size,
        master_addr=address,
        master_port=port,
        cpus_per_task=int(environ["SLURM_CPUS_PER_TASK"])
        if environ.get("SLURM_CPUS_PER_TASK", "").isdigit()
        else None,
        job_id=environ.get("SLURM_JOB_ID"),
    )
    local.Free()
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


MPI_RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")


MPI_SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")

# what launchers set for their ranks: by prefix (SLURM, MPI, torchrun) and by name
LAUNCHER_PREFIXES = ("SLURM_", "PMI_", "PMIX_", "OMPI_", "MV2_", "TORCHELASTIC_")
LAUNCHER_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def without_launcher(
    environ: Mapping[str, str] | None = None, keep_slurm_allocation: bool = False
) -> dict[str, str]:
    """``environ`` without what a launcher told this process (for a fresh launch from
    inside a job: tests, benchmarks). ``SLURM_CONF`` stays; with
    ``keep_slurm_allocation`` every ``SLURM_`` variable stays (``srun`` inside the job's
    allocation needs them)."""
    environ = os.environ if environ is None else environ
    kept = {}
    for key, value in environ.items():
        if key in LAUNCHER_VARIABLES:
            continue
        if key.startswith(LAUNCHER_PREFIXES) and key != "SLURM_CONF":
            if not (keep_slurm_allocation and key.startswith("SLURM_")):
                continue
        kept[key] = value
    return kept


def _srun_task(environ: Mapping[str, str]) -> bool:
    step = environ.get("SLURM_STEP_ID")
    return step is not None and step not in _NON_TASK_STEPS and "SLURM_PROCID" in environ


def launcher_of(environ: Mapping[str, str]) -> str:
    """Which launcher started this process: 'torchrun', 'mpi', 'slurm' or 'single'.

    ``srun --mpi=pmi2|pmix`` sets MPI variables too; when they agree with SLURM's
    task numbering, the task is treated as a SLURM task (no MPI start-up needed).
    """
    if "TORCHELASTIC_RUN_ID" in environ or ("RANK" in environ and "WORLD_SIZE" in environ):
        return "torchrun"
    mpi_rank = next((environ[v] for v in MPI_RANK_VARIABLES if v in environ), None)
    if mpi_rank is not None:
        mpi_size = next((environ[v] for v in MPI_SIZE_VARIABLES if v in environ), None)
        same_numbering = _srun_task(environ) and mpi_rank == environ["SLURM_PROCID"]
        same_size = mpi_size is None or mpi_size == environ.get("SLURM_NTASKS")
        return "slurm" if same_numbering and same_size else "mpi"
    if _srun_task(environ):
        return "slurm"
    return "single"


def rank_hint(environ: Mapping[str, str] | None = None) -> int:
    """This process's rank as the launcher's variables tell it, without starting MPI
    (for messages printed before the process group exists)."""
    environ = os.environ if environ is None else environ
    for key in ("RANK", *MPI_RANK_VARIABLES, "SLURM_PROCID"):
        if environ.get(key, "").isdigit():
            if key == "SLURM_PROCID" and launcher_of(environ) != "slurm":
                continue
            return int(environ[key])
    return 0


def tell_launcher(message: str, environ: Mapping[str, str] | None = None) -> None:
    """Give torchrun the message that ends this rank: its failure summary shows it
    (in place of a pointer to its documentation). Other launchers print what the rank
    printed, and need nothing."""
    environ = os.environ if environ is None else environ
    path = environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        with open(path, "w") as file:
            json.dump({"message": message, "timestamp": int(time.time())}, file)
    except OSError:
        pass  # (the message is printed anyway)


def detect(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """The launch environment of this process."""
    environ = os.environ if environ is None else environ
    launcher = launcher_of(environ)
    if launcher == "torchrun":
        env = _torchrun(environ)
    elif launcher == "mpi":
        env = _mpi(environ)
    elif launcher == "slurm":
        env = _slurm(environ)
    else:
        env = LaunchEnv(launcher="single", cpus_per_task=None)
    if not 0 <= env.rank < env.world_size:
        raise LaunchError(f"rank {env.rank} is outside a world of {env.world_size} ranks")
    return env


def device_for(env: LaunchEnv, device_type: str) -> torch.device:
    """This rank's device: ``cuda:{local_rank % visible GPUs}`` on CUDA.

    With one GPU bound per task (``--gpus-per-task``), each rank sees only its own
    GPU as ``cuda:0``.
    """
    if device_type == "cpu":
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if count == 0:
        raise LaunchError(f"rank {env.rank}: CUDA was chosen but no GPU is visible")
    if count < env.local_world_size and count > 1:
        warnings.warn(f"{env.local_world_size} ranks share {count} GPUs on this node", stacklevel=2)
    return torch.device("cuda", env.local_rank % count)


class ProcessGroup:
    """The torch.distributed process group of a run: created once, destroyed once.

    A single process runs without one; the collective helpers below then do nothing.
    """

    def __init__(self, env: LaunchEnv, backend: str, timeout_s: float):
        self.env = env
        self.backend = backend
        self._owned = False
        if env.distributed and not dist.is_initialized():
            dist.init_process_group(
                backend=backend,
                init_method=f"tcp://{env.master_addr}:{env.master_port}",
                rank=env.rank,
                world_size=env.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )
            self._owned = True

    def close(self, together: bool = False) -> None:
        """Destroy the group; ``together``: once every rank is here (a normal end), so
        that no rank tears its connections down while another still uses them.

        Objects that hold its pending work (DDP's reducer, in reference cycles with the
        engine) are collected first: destroyed later, while the interpreter shuts
        down, such work aborts the process (gloo: "terminate called without an active
        exception")."""
        if self._owned and dist.is_initialized():
            gc.collect()
            if together:
                dist.barrier()
            dist.destroy_process_group()
            gc.collect()
        self._owned = False

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, kind: Any, *exc: Any) -> None:
        self.close(together=kind is None)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj: Any) -> list[Any]:
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (CPU tensors work with NCCL too)."""
    return start_all_reduce_sum(tensor).wait()


class PendingSum:
    """An all-reduce in flight (see :func:`start_all_reduce_sum`)."""

    def __init__(self, tensor: torch.Tensor, work: Any = None, staged: torch.Tensor | None = None):
        self.tensor = tensor
        self.work = work
        self.staged = staged

    def wait(self) -> torch.Tensor:
        """The tensor, summed over ranks, once the all-reduce is done."""
        if self.work is not None:
            self.work.wait()
        if self.staged is not None:
            self.tensor.copy_(self.staged)
        return self.tensor


def start_all_reduce_sum(tensor: torch.Tensor) -> PendingSum:
    """Start summing ``tensor`` over ranks, in place, and return at once: the work
    between this and :meth:`PendingSum.wait` overlaps the communication. Every rank
    must start its collectives in the same order. CPU tensors work with NCCL too
    (staged through the GPU)."""
    if not is_distributed():
        return PendingSum(tensor)
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        return PendingSum(tensor, dist.all_reduce(staged, async_op=True), staged)
    return PendingSum(tensor, dist.all_reduce(tensor, async_op=True))


def agree_on_errors(error: HpctrainError | None) -> None:
    """Raise on every rank when any rank has an error (``error`` is this rank's).

    Checks run by every rank (options, data, checkpoints) then end a run once, with one
    message that rank 0 reports: the message when all ranks agree, else each distinct
    message with the ranks that hold it. A rank that fails alone no longer leaves the
    others waiting in their next collective. Every rank must call this at the same point.
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    gathered = all_gather_object(error)
    failed = [(rank, e) for rank, e in enumerate(gathered) if e is not None]
    if not failed:
        return
    by_message: dict[str, list[int]] = {}
    for rank, e in failed:
        by_message.setdefault(str(e), []).append(rank)
    world = len(gathered)
    if len(by_message) == 1 and len(failed) == world:
        message = str(failed[0][1])
    else:
        message = "\n".join(f"{_ranks(ranks, world)}: {text}" for text, ranks in by_message.items())
    agreed = type(failed[0][1])(message)
    agreed.agreed = True
    raise agreed


def _ranks(ranks: list[int], world: int) -> str:
    """``rank 3 of 4`` or ``ranks 1, 2 of 4``."""
    word = "rank" if len(ranks) == 1 else "ranks"
    return f"{word} {', '.join(map(str, ranks))} of {world}"


@contextlib.contextmanager
def errors_agreed() -> Iterator[None]:
    """Run the block on every rank, then :func:`agree_on_errors` on what it raised.

    The block must not itself call collectives that a failing rank would skip. A stop
    signal (:class:`~hpctrain.errors.Preempted`) is not agreed: it ends the run at once.
    """
    error = None
    try:
        yield
    except HpctrainError as raised:
        if isinstance(raised, Preempted):
            raise
        error = raised
    agree_on_errors(error)


def decided_by_main(function: Callable[[], T]) -> T:
    """``function()`` run by rank 0 alone, its result (or its error) on every rank."""
    result: Any = None
    if rank_of_group() == 0:
        try:
            result = ("ok", function())
        except HpctrainError as error:
            if isinstance(error, Preempted):
                raise
            result = ("error", error)
    kind, value = broadcast_object(result)
    if kind == "error":
        value.agreed = True
        raise value
    return value


def rank_of_group() -> int:
    """This process's rank in the run's process group (0 without one)."""
    return dist.get_rank() if is_distributed() else 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def requeue_slurm_job(env: LaunchEnv, max_requeues: int) -> None:
    """``scontrol requeue`` this job, so that it starts again (and continues from its
    checkpoint with ``continue_from: auto``), unless it was requeued ``max_requeues``
    times already. Needs ``#SBATCH --requeue``."""
    from .report import get_logger

    log = get_logger()
    if not env.job_id or env.launcher not in ("slurm", "mpi"):
        log.warning("checkpoint.requeue is set but this run is not a SLURM job; not requeued")
        return
    if env.restart_count >= max_requeues:
        log.error(
            f"SLURM job {env.job_id} was requeued {env.restart_count} times, the limit "
            f"(slurm.max_requeues = {max_requeues}); not requeued again. Continue it with "
            "--continue auto and the same --output-dir"
        )
        return
    result = subprocess.run(
        ["scontrol", "requeue", env.job_id], capture_output=True, text=True, timeout=60
    )
    if result.returncode != 0:
        log.warning(f"scontrol requeue {env.job_id} failed: {result.stderr.strip()}")
    else:
        log.info(f"requeued SLURM job {env.job_id}")


_COMMUNICATION_ERRORS = (
    "gloo",
    "NCCL",
    "ProcessGroup",
    "Connection reset by peer",
    "Connection closed by peer",
)


def is_communication_failure(error: BaseException) -> bool:
    """Whether ``error`` comes from a collective whose peer died or hung."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return any(marker in str(error) for marker in _COMMUNICATION_ERRORS)


def backend_for(device_type: str, requested: str = "auto") -> str:
    if requested != "auto":
        if requested == "nccl" and device_type != "cuda":
            raise LaunchError("'distributed.backend: nccl' needs CUDA devices; use gloo")
        return requested
    return "nccl" if device_type == "cuda" else "gloo"
