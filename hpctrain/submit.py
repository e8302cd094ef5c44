"""``hpctrain submit``: the whole flow as a SLURM job, through submitit.

Every task of the job runs the same code path as ``srun python -m hpctrain
options.yaml``, with ``continue_from: auto`` in a run directory fixed at submission.
When SLURM signals the job (time limit near, preemption: ``--signal=USR2@delay``)
or an ``scontrol requeue`` sends SIGTERM, all ranks write one checkpoint together
and rank 0 requeues the job, up to ``slurm.max_requeues`` times; a requeued,
preempted or restarted-after-node-failure job continues from the newest committed
checkpoint of the run directory, never from a path captured at submission.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .errors import OptionsError
from .options import SlurmOptions

#: seconds before the time limit at which SLURM sends USR2 (time to checkpoint)
SIGNAL_DELAY_S = 120


def minutes(time_limit: str) -> int:
    """SLURM time ``[D-]HH:MM:SS``, ``HH:MM`` or ``MM`` -> minutes (rounded up)."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", time_limit.strip())
    if not match:
        raise OptionsError(
            f"slurm time {time_limit!r} is not a SLURM time limit such as 12:00:00 or 1-00:00:00"
        )
    days, first, second, third = match.groups()
    if third is not None:
        hours, mins, secs = int(first), int(second), int(third)
    elif second is not None:
        hours, mins, secs = int(first), int(second), 0
        if days is None:  # MM:SS
            hours, mins, secs = 0, int(first), int(second)
    else:
        hours, mins, secs = 0, int(first), 0
    total = int(days or 0) * 24 * 60 + hours * 60 + mins + (1 if secs else 0)
    if total < 1:
        raise OptionsError(f"slurm time {time_limit!r} is shorter than a minute")
    return total


@dataclasses.dataclass
class JobRequest:
    """What the job asks SLURM for: the options' ``slurm`` section, flags applied."""

    slurm: SlurmOptions
    job_name: str = "hpctrain"

    @property
    def tasks_per_node(self) -> int:
        if self.slurm.tasks_per_node:
            return self.slurm.tasks_per_node
        return max(1, self.slurm.gpus_per_node)

    def executor_parameters(self) -> dict[str, Any]:
        """Parameters of ``submitit.SlurmExecutor`` (and of its sbatch script)."""
        slurm = self.slurm
        limit = minutes(slurm.time)
        params: dict[str, Any] = {
            "job_name": self.job_name,
            "nodes": slurm.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "time": limit,
            # leave time to checkpoint; short test jobs get a proportionally short delay
            "signal_delay_s": min(SIGNAL_DELAY_S, max(10, limit * 60 // 4)),
            "additional_parameters": {"requeue": True, **sbatch_extras(slurm.sbatch)},
        }
        if slurm.partition:
            params["partition"] = slurm.partition
        if slurm.account:
            params["account"] = slurm.account
        if slurm.gpus_per_node:
            params["gpus_per_node"] = slurm.gpus_per_node
        if slurm.cpus_per_task:
            params["cpus_per_task"] = slurm.cpus_per_task
        return params


def sbatch_extras(lines: list[str]) -> dict[str, Any]:
    """``["--qos=long", "--exclusive"]`` -> ``{"qos": "long", "exclusive": True}``."""
    extras: dict[str, Any] = {}
    for line in lines:
        text = line.strip()
        text = text[len("#SBATCH") :].strip() if text.startswith("#SBATCH") else text
        if not text.startswith("--"):
            raise OptionsError(
                f"slurm.sbatch entry {line!r} must be a long sbatch option such as --qos=long"
            )
        key, _, value = text[2:].partition("=")
        extras[key.replace("-", "_")] = value if value else True
    return extras


def sbatch_script(request: JobRequest, folder: str | Path, python: str = "python3") -> str:
    """The sbatch script ``submit`` would send (a pure function; ``--dry-run``)."""
    from submitit.slurm.slurm import _make_sbatch_string

    command = f"{python} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=command, folder=folder, **request.executor_parameters())


class TrainJob:
    """What each task of the job runs (pickled by submitit)."""

    def __init__(self, options_path: str, run_dir: str, max_requeues: int):
        self.options_path = options_path
        self.run_dir = run_dir
        self.max_requeues = max_requeues

    def __call__(self) -> str:
        from .flow import train

        train(
            self.options_path,
            output_dir=self.run_dir,
            continue_from="auto",
            requeue=True,
            max_requeues=self.max_requeues,
        )
        return str(Path(self.run_dir) / "model.pt")

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Called by submitit on rank 0 when USR2 arrives before training started:
        requeue as it is (the job continues with ``continue_from: auto``)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


def check_request(request: JobRequest) -> None:
    """Refuse, before submitting, what the partition can never run: an unknown
    partition, more nodes than it has, more cores or GPUs per node than its nodes
    have (SLURM itself would accept such a job and leave it pending forever)."""
    out = subprocess.run(["sinfo", "-h", "-o", "%P|%D|%c|%G"], capture_output=True, text=True)
    if out.returncode != 0:
        raise OptionsError(f"sinfo failed, is SLURM reachable? {out.stderr.strip()}")
    partitions = {}
    for line in out.stdout.split():
        name, nodes, cpus, gres = line.split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        entry = partitions.setdefault(name, {"nodes": 0, "cpus": 0, "gpus": 0, "default": False})
        entry["nodes"] += int(nodes)
        entry["cpus"] = max(entry["cpus"], int(cpus.rstrip("+")))
        gpus = re.search(r"gpu(?::[^:,()]+)?:(\d+)", gres)
        entry["gpus"] = max(entry["gpus"], int(gpus.group(1)) if gpus else 0)
        entry["default"] |= default
    slurm = request.slurm
    name = slurm.partition or next((n for n, p in partitions.items() if p["default"]), None)
    if name not in partitions:
        raise OptionsError(
            f"unknown SLURM partition '{name}'; this cluster has: {', '.join(sorted(partitions))}"
        )
    part = partitions[name]
    cores = request.tasks_per_node * (slurm.cpus_per_task or 1)
    problems = []
    if slurm.nodes > part["nodes"]:
        problems.append(f"{slurm.nodes} nodes, but it has {part['nodes']}")
    if cores > part["cpus"]:
        problems.append(f"{cores} cores per node, but its nodes have {part['cpus']}")
    if slurm.gpus_per_node > part["gpus"]:
        problems.append(f"{slurm.gpus_per_node} GPUs per node, but its nodes have {part['gpus']}")
    if problems:
        raise OptionsError(
            f"partition '{name}' can never run this job: it asks for " + "; ".join(problems)
        )


def default_run_dir() -> Path:
    now = datetime.datetime.now()
    return Path("outputs") / now.strftime("%Y-%m-%d") / now.strftime("%H-%M-%S")


def submit(options_path: Path, request: JobRequest, run_dir: Path) -> Any:
    """Send the job; on failure remove what was prepared and say why."""
    import submitit

    if shutil.which("sbatch") is None:
        raise OptionsError("sbatch is not on PATH: run hpctrain submit on a SLURM login node")
    check_request(request)
    run_dir.mkdir(parents=True, exist_ok=True)
    folder = run_dir / "slurm"
    existed = folder.exists()
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=request.slurm.max_requeues)
    executor.update_parameters(**request.executor_parameters())
    job_fn = TrainJob(str(options_path), str(run_dir), request.slurm.max_requeues)
    try:
        return executor.submit(job_fn)
    except subprocess.CalledProcessError as error:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        output = (error.output or b"").decode(errors="replace").strip()
        raise OptionsError(f"sbatch refused the job: {output or error}") from None
    except Exception as error:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        raise OptionsError(f"the job could not be submitted: {error}") from None


def wait(job: Any, run_dir: Path, poll_s: float = 10.0) -> bool:
    """Follow the job until it ends, printing state changes and new epoch lines.

    Returns whether the job finished with a model; a requeued job is followed on.
    """
    log = run_dir / "train.log"
    last_state, printed = None, 0
    while True:
        state = job.state
        if state != last_state:
            print(f"job {job.job_id}: {state}", flush=True)
            last_state = state
        if log.exists():
            lines = [line for line in log.read_text().splitlines() if " epoch " in line]
            for line in lines[printed:]:
                print(line, flush=True)
            printed = len(lines)
        if state in ENDED:
            break
        time.sleep(poll_s)
    return state == "COMPLETED" and (run_dir / "model.pt").exists()


ENDED = {
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "NODE_FAIL",
    "OUT_OF_MEMORY",
    "BOOT_FAIL",
    "DEADLINE",
}


def run_submit(args: Any) -> None:
    """``hpctrain submit``: validate everything here, then send (or print) the job."""
    from .errors import JobFailed
    from .startup import prepare

    slurm_flags = {
        "nodes": args.nodes,
        "gpus_per_node": args.gpus_per_node,
        "tasks_per_node": args.tasks_per_node,
        "cpus_per_task": args.cpus_per_task,
        "time": args.time,
        "partition": args.partition,
        "account": args.account,
        "max_requeues": args.max_requeues,
    }
    options, *_ = prepare(args.options, cuda_available=bool(args.gpus_per_node) or None)
    slurm = dataclasses.replace(
        options.slurm,
        **{k: v for k, v in slurm_flags.items() if v is not None},
        sbatch=options.slurm.sbatch + list(args.sbatch or []),
    )
    request = JobRequest(slurm, job_name=args.job_name)
    request.executor_parameters()  # fails here on a bad time or sbatch option
    run_dir = Path(args.output_dir or default_run_dir()).resolve()
    if args.dry_run:
        print(sbatch_script(request, run_dir / "slurm", python=sys.executable), end="")
        return
    job = submit(Path(args.options).resolve(), request, run_dir)
    print(
        f"submitted job {job.job_id}: {slurm.nodes} node(s) x {request.tasks_per_node} task(s)"
        f", time limit {slurm.time}\n"
        f"  run directory  {run_dir}\n"
        f"  job logs       {run_dir / 'slurm'}/{job.job_id}_<task>_log.{{out,err}}\n"
        f"  follow         tail -f {run_dir / 'train.log'}   (squeue -j {job.job_id})\n"
        f"  cancel         scancel {job.job_id}\n"
        f"  continue later hpctrain submit {args.options} --output-dir {run_dir}",
        flush=True,
    )
    if args.wait and not wait(job, run_dir):
        raise JobFailed(
            f"job {job.job_id} ended without a model; see {run_dir / 'slurm'} for its logs "
            f"and {run_dir / 'train.log'}"
        )
