"""Strong and weak scaling of hpctrain over ranks, with a breakdown of the step.

    python benchmarks/scaling.py --ranks 1 2 4 --architectures mp_transformer soap_bpnn \
        --structures 256 --atoms 32 --out scaling.json        # also writes scaling.png

Each measurement is a multi-process training run started by a launcher (``srun``
inside a SLURM allocation, else ``mpiexec`` when there is one, else ``torchrun``;
``--launcher`` chooses). Every rank runs this file with ``--worker``: it goes through
hpctrain's own launch detection, thread and device choice, process group, options,
datasets, model and trainer, builds the architecture's engine (DDP across ranks)
and calls ``Engine.train_step`` (plus step checkpoints with ``--checkpoint-every``)
on the sampler's global batches, as ``Engine.train`` does. After ``--warmup`` steps
it enables :mod:`hpctrain.timing` and times ``--steps`` steps.

*Strong scaling* keeps the global batch (``--batch-size``) fixed:
efficiency ``T_1 / (N T_N)`` with ``T`` the time per step. *Weak scaling* keeps the
batch per rank fixed (global batch ``N * --batch-size``): efficiency
``throughput_N / (N throughput_1)``. With ``--ranks`` not starting at 1, the
smallest count is the reference.

The breakdown of a step, per rank, in seconds per step: ``data`` (reading this
rank's structures, their neighbour lists and collating them into a batch, made in
line, as training does with ``num_workers: 0``; with loader threads it is the wait
for a batch made ahead), ``forward`` (energies, and forces/stress by autograd),
``backward`` (gradient computation not overlapped with communication),
``allreduce`` (gradient all-reduce
not hidden behind backward: from the moment DDP hands the last gradient bucket to
the all-reduce until backward returns, timed by a DDP communication hook, see
:mod:`hpctrain.timing`), ``agree`` (the small per-step all-reduce of stop and NaN
flags), ``optimizer`` (clipping, Adam, schedule, EMA), ``checkpoint`` and ``other``
(the rest of the step). The full duration of each bucket's all-reduce, overlapped
or not, is reported apart as ``allreduce_busy_s`` (CPU/gloo only), and
``allreduce_alone_s`` is an all-reduce of one step's gradient bytes after a barrier
(the cost of the communication itself, without waiting for a slower rank).

``cpu eff`` in the table is the same ratio in CPU time per structure (user and
system time of all threads of all ranks) and ``on-cpu`` the share of the ranks' wall
time they were running. On a machine shared with other jobs, a wall-clock efficiency
below 1 with ``cpu eff`` near 1 and ``on-cpu`` well below 100 % means that other
processes took the cores, not that the ranks did more work.

Output: a JSON file (machine, command, load averages, per-rank data and a
summary per measurement), a table on stdout, and a PNG plot (efficiency against
ranks; breakdown) beside the JSON. ``--quick`` is a tiny CPU configuration for
smoke tests (about half a minute per launch on two cores).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ARCHITECTURES = ("mp_transformer", "soap_bpnn")
PARTS = (
    "data",
    "forward",
    "backward",
    "allreduce",
    "agree",
    "optimizer",
    "checkpoint",
    "other",
)
# tiny models for --quick: the same code paths in a fraction of the time
QUICK_HYPERS: dict[str, dict[str, Any]] = {
    "mp_transformer": {"d_model": 16, "num_heads": 2, "num_layers": 1, "cutoff": 4.0},
    "soap_bpnn": {
        "soap": {"max_angular": 2, "max_radial": 2, "cutoff": {"radius": 4.0}},
        "bpnn": {"num_neurons_per_layer": 8, "num_hidden_layers": 1},
    },
}
SCALING_DEFAULTS = {"structures": 128, "atoms": 16, "batch_size": 8, "steps": 12, "warmup": 3}
QUICK_DEFAULTS = {"structures": 24, "atoms": 8, "batch_size": 4, "steps": 4, "warmup": 2}


class BenchmarkError(Exception):
    """A problem with the arguments or a failed run; printed without a traceback."""


# -- machine -------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cores_available": cores,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "slurm_nodelist": os.environ.get("SLURM_JOB_NODELIST"),
    }
    with contextlib.suppress(OSError, ValueError):
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        info["memory_gib"] = round(pages / 2**30, 1)
    return info


def without_paths(value: Any, replacements: dict[str, str]) -> Any:
    """``value`` (JSON-like) with the given path prefixes replaced in every string, so
    that results name no directories of the machine they ran on."""
    if isinstance(value, str):
        for old, new in replacements.items():
            value = value.replace(old, new)
        return value
    if isinstance(value, dict):
        return {k: without_paths(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [without_paths(v, replacements) for v in value]
    return value


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- launching -----------------------------------------------------------------------


def find_mpiexec() -> str | None:
    beside = Path(sys.executable).parent / "mpiexec"
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def choose_launcher(requested: str) -> str:
    """``auto``: srun inside a SLURM allocation, else mpiexec if there is one, else
    torchrun."""
    if requested != "auto":
        if requested == "srun" and not shutil.which("srun"):
            raise BenchmarkError("--launcher srun: srun is not on PATH")
        if requested == "mpiexec" and not find_mpiexec():
            raise BenchmarkError("--launcher mpiexec: no mpiexec beside python or on PATH")
        return requested
    if os.environ.get("SLURM_JOB_ID") and shutil.which("srun"):
        return "srun"
    if find_mpiexec():
        return "mpiexec"
    return "torchrun"


def launch_command(
    launcher: str, ranks: int, threads: int, extra: list[str], per_node: int | None = None
) -> list[str]:
    """The command prefix that starts ``ranks`` copies of a Python program (srun: on
    ``ceil(ranks / per_node)`` nodes when ``per_node`` is given)."""
    if launcher == "srun":
        nodes = []
        if per_node:
            count = -(-ranks // per_node)
            nodes = [f"--nodes={count}", f"--ntasks-per-node={min(ranks, per_node)}"]
        return [
            "srun",
            f"--ntasks={ranks}",
            *nodes,
            f"--cpus-per-task={threads}",
            "--kill-on-bad-exit=1",
            *extra,
            sys.executable,
        ]
    if launcher == "mpiexec":
        return [find_mpiexec() or "mpiexec", "-n", str(ranks), *extra, sys.executable]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={ranks}",
        *extra,
    ]


def launch_env(launcher: str, threads: int) -> dict[str, str]:
    """The environment of the ranks: the launcher variables of an enclosing job step
    removed (srun keeps the allocation's), one thread count for every library."""
    from hpctrain.launch import without_launcher

    env = without_launcher(keep_slurm_allocation=launcher == "srun")
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


# -- one measurement -----------------------------------------------------------------


def options_for(args: argparse.Namespace, architecture: str, global_batch: int) -> dict:
    model = dict(QUICK_HYPERS[architecture]) if args.quick else {}
    model.update(args.model_hypers.get(architecture, {}))
    training: dict[str, Any] = {"batch_size": global_batch, "num_epochs": 1}
    if args.mixed_precision:
        training["mixed_precision"] = True
    return {
        "seed": 0,
        "device": args.device,
        "base_precision": args.precision,
        "architecture": {"name": architecture, "model": model, "training": training},
        "training_set": {
            "systems": str(args.data.resolve()),
            "targets": {"energy": {"forces": True, "stress": args.stress}},
        },
        # one structure, only because the options require a validation set
        "validation_set": 1.0 / args.n_structures,
        "test_set": 0.0,
        "distributed": {"threads_per_rank": args.threads_per_rank},
        "checkpoint": {"every_n_epochs": 0, "every_minutes": None, "keep_last": 2},
    }


def measure(
    args: argparse.Namespace,
    launcher: str,
    architecture: str,
    ranks: int,
    global_batch: int,
    workdir: Path,
    repeat: int = 0,
    copies: int = 1,
) -> dict[str, Any]:
    """Launch one training run on ``ranks`` ranks; its results (rank 0's JSON).

    With ``copies`` > 1, that many independent runs start at the same time (each in
    its own process group); their results are combined as one run whose ranks are
    the copies' (see :func:`combine_copies`).
    """
    import yaml

    name = f"{architecture}-n{ranks}-b{global_batch}" + (f"-x{copies}" if copies > 1 else "")
    name += f"-r{repeat}" if repeat else ""
    prefix = launch_command(
        launcher, ranks, args.threads_per_rank, args.launcher_args, args.ranks_per_node
    )
    started = []
    for copy in range(copies):
        run_dir = workdir / name / f"copy-{copy}" if copies > 1 else workdir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        options_path = run_dir / "options.yaml"
        options_path.write_text(yaml.safe_dump(options_for(args, architecture, global_batch)))
        config = {
            "options": str(options_path),
            "run_dir": str(run_dir),
            "warmup": args.warmup,
            "steps": args.steps,
            "checkpoint_every": args.checkpoint_every,
            "out": str(run_dir / "result.json"),
        }
        (run_dir / "worker.json").write_text(json.dumps(config))
        command = prefix + [str(Path(__file__).resolve()), "--worker", str(run_dir / "worker.json")]
        started.append((run_dir, command))
    print(f"  {name}: {shlex.join(started[0][1][:6])} ...", flush=True)
    before = load_average()
    start = time.perf_counter()
    results = []
    with contextlib.ExitStack() as stack:
        processes = []
        for run_dir, command in started:
            process = subprocess.Popen(
                command,
                env=launch_env(launcher, args.threads_per_rank),
                cwd=run_dir,
                stdout=stack.enter_context((run_dir / "stdout.txt").open("w")),
                stderr=stack.enter_context((run_dir / "stderr.txt").open("w")),
            )
            processes.append(process)
            # a failed or timed-out copy stops the others too
            stack.callback(lambda p=process: p.poll() is None and p.kill())
        for process, (run_dir, command) in zip(processes, started):
            try:
                code = process.wait(timeout=max(1.0, args.timeout - (time.perf_counter() - start)))
            except subprocess.TimeoutExpired:
                raise BenchmarkError(
                    f"{name}: no result after {args.timeout:.0f} s (--timeout); output so far "
                    f"in {run_dir / 'stderr.txt'}"
                ) from None
            out = run_dir / "result.json"
            if code != 0 or not out.exists():
                stderr = (run_dir / "stderr.txt").read_text()
                raise BenchmarkError(
                    f"{name}: the launch exited with status {code} (command: "
                    f"{shlex.join(command)}); its output ends with:\n{stderr[-3000:]}"
                )
            results.append(json.loads(out.read_text()))
    wall = time.perf_counter() - start
    data = results[0] if copies == 1 else combine_copies(results)
    data.update(
        name=name,
        command=shlex.join(started[0][1]),
        copies=copies,
        launch_wall_s=round(wall, 2),
        load_average_before=before,
        load_average_after=load_average(),
    )
    return summarise(data)


def combine_copies(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Independent one-rank runs measured together, as one run: their ranks side by
    side, structures and atoms summed. The copies do not wait for each other, so the
    time of the combined run is the mean of theirs (see :func:`summarise`)."""
    data = dict(results[0])
    data["ranks"] = [dict(r["ranks"][0], rank=i) for i, r in enumerate(results)]
    data["structures"] = sum(r["structures"] for r in results)
    data["atoms"] = sum(r["atoms"] for r in results)
    data["independent"] = True
    return data


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Throughput and the mean breakdown over ranks from the per-rank results."""
    ranks = data["ranks"]
    steps = data["steps"]
    if data.get("independent"):  # copies that never wait for each other
        wall = sum(r["measured_s"] for r in ranks) / len(ranks)
    else:
        wall = max(r["measured_s"] for r in ranks)  # ranks meet at every step
    per_rank = []
    for r in ranks:
        step = r["measured_s"] / steps
        parts = {p: r["sections"].get(p, 0.0) / steps for p in PARTS if p != "other"}
        parts["other"] = step - sum(parts.values())
        per_rank.append({"step_s": step, **parts})
    breakdown = {p: sum(r[p] for r in per_rank) / len(per_rank) for p in PARTS}
    step_s = wall / steps
    model_work = sum(breakdown[p] for p in ("forward", "backward", "allreduce", "optimizer"))
    mean_step = sum(r["step_s"] for r in per_rank) / len(per_rank)
    busy = [r["comm"].get("busy_s") for r in ranks if "busy_s" in r["comm"]]
    cpu = sum(r["cpu_s"] for r in ranks)
    data["summary"] = {
        "world_size": data["world_size"],
        "global_batch": data["global_batch"],
        "step_s": step_s,
        "median_step_s": sorted(r["median_step_s"] for r in ranks)[len(ranks) // 2],
        "structures_per_s": data["structures"] / wall,
        "atoms_per_s": data["atoms"] / wall,
        "breakdown_s": breakdown,
        "breakdown_fraction": {p: v / mean_step for p, v in breakdown.items()},
        "per_rank_breakdown_s": per_rank,
        "data_fraction": breakdown["data"] / mean_step,
        # everything but the model's own work (forward, backward, gradient all-reduce,
        # optimizer): data (made in line here) included
        "framework_overhead": 1 - model_work / mean_step,
        "allreduce_buckets_per_step": ranks[0]["comm"].get("buckets", 0) / steps,
        "allreduce_bytes_per_step": ranks[0]["comm"].get("bytes", 0) / steps,
        "allreduce_busy_s": sum(busy) / len(busy) / steps if busy else None,
        "allreduce_alone_s": max((r.get("allreduce_alone_s") or 0.0) for r in ranks),
        "cpu_s_per_structure": cpu / data["structures"],
        "cpu_utilisation": cpu / sum(r["measured_s"] for r in ranks),
        "involuntary_switches_per_step": sum(r["involuntary_switches"] for r in ranks)
        / len(ranks)
        / steps,
    }
    return data


def efficiencies(results: list[dict[str, Any]]) -> None:
    """Strong: T_ref N_ref / (N T_N); weak: thr_N N_ref / (N thr_ref), in place."""
    for entry in results:
        base = min(
            (
                r
                for r in results
                if (r["architecture"], r["mode"]) == (entry["architecture"], entry["mode"])
            ),
            key=lambda r: r["ranks"],
        )
        n, n0 = entry["ranks"], base["ranks"]
        if entry["mode"] == "strong":
            value = base["step_s"] * n0 / (n * entry["step_s"])
        else:
            value = entry["structures_per_s"] * n0 / (n * base["structures_per_s"])
        entry["efficiency"] = value
        entry["speedup"] = value * n / n0
        # weak, with --independent: what n one-rank copies reach together on this
        # machine (its ceiling), and the part of the efficiency lost to training together
        together = entry.get("independent_structures_per_s")
        if together:
            entry["machine_efficiency"] = together * n0 / (n * base["structures_per_s"])
            entry["framework_efficiency"] = value / entry["machine_efficiency"]
        # the same in CPU time: 1 when N ranks spend no more CPU per structure than
        # the reference, whatever other processes on the machine take from them
        entry["cpu_efficiency"] = base["cpu_s_per_structure"] / entry["cpu_s_per_structure"]


# -- worker (one rank) ---------------------------------------------------------------


def allreduce_alone(comm: dict[str, float], steps: int, device: Any) -> float:
    """Median time of an all-reduce of one step's gradient bytes in one tensor, the
    ranks started together by a barrier: the communication cost without waiting for
    a slower rank (compare with the step's ``allreduce`` part)."""
    import torch

    from hpctrain import launch

    tensor = torch.zeros(max(1, int(comm.get("bytes", 0) / steps) // 4), device=device)
    samples = []
    for _ in range(11):
        launch.barrier()
        start = time.perf_counter()
        launch.all_reduce_sum(tensor)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def worker(config_path: Path) -> None:
    import numpy as np
    import torch

    from hpctrain import host_memory, launch, run, startup, timing

    host_memory.configure()  # as the hpctrain command does, before the first tensor
    config = json.loads(config_path.read_text())
    # the same start as hpctrain train: options, launch, run directory, data, model
    options, architecture, dtype, device_type = startup.prepare(config["options"])
    env = launch.detect()
    backend = launch.backend_for(device_type, options.distributed.backend)
    with startup.launched(env, device_type, backend, options.distributed) as launched:
        device = launched.device
        context = startup.open_run(env, options, config["run_dir"], launched.threads)
        with run.use(context):  # the engine reads it, as under hpctrain train
            run_dir = context.run_dir
            built = startup.build_run(architecture, options, dtype, config["options"], context)
            model, trainer = built.model, built.trainer
            engine = trainer.make_engine(model, device, built.train_sets, built.val_sets, run_dir)
            del built
            hooked = timing.TIMER.attach(engine.network)
            n_atoms = engine.train_set.n_atoms
            sampler = engine.sampler

            def batches():
                epoch = 0
                while True:
                    sampler.set_epoch(epoch)
                    yield from sampler
                    epoch += 1

            warmup, steps, every = config["warmup"], config["steps"], config["checkpoint_every"]
            times, structures, atoms, local_atoms = [], 0, 0, 0
            start = 0.0
            for i, step in zip(range(warmup + steps), batches()):
                if i == warmup:
                    launch.barrier()
                    timing.TIMER.enable(device)
                    usage = resource.getrusage(resource.RUSAGE_SELF)
                    start = time.perf_counter()
                t0 = time.perf_counter()
                n_step_atoms = int(n_atoms[step.global_].sum())
                with timing.section("data"):
                    batches = engine.step_batches(step.local)
                engine.train_step(step.global_, batches)
                if i >= warmup and every and (i - warmup + 1) % every == 0:
                    engine.write_checkpoint()
                if i >= warmup:
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                    structures += len(step.global_)
                    atoms += n_step_atoms
                    local_atoms += int(n_atoms[step.local].sum())
            measured = time.perf_counter() - start
            used = resource.getrusage(resource.RUSAGE_SELF)
            timing.TIMER.disable()
            finish = getattr(engine.checkpoints, "finish", None)
            if finish is not None:  # a checkpoint written in the background, if any
                finish()
            alone = allreduce_alone(timing.TIMER.comm, steps, device) if hooked else None
            mine = {
                "rank": env.rank,
                "host": socket.gethostname(),
                "device": str(device),
                "threads": torch.get_num_threads(),
                "measured_s": measured,
                # CPU time of all this process's threads, and how often the OS took the
                # CPU away from it while it could run (other processes on its cores)
                "cpu_s": used.ru_utime + used.ru_stime - usage.ru_utime - usage.ru_stime,
                "involuntary_switches": used.ru_nivcsw - usage.ru_nivcsw,
                "median_step_s": float(np.median(times)),
                "step_times_s": times,
                "sections": timing.TIMER.snapshot(),
                "comm": dict(timing.TIMER.comm),
                "allreduce_alone_s": alone,
                "local_atoms": local_atoms,
            }
            gathered = launch.all_gather_object(mine)
            if env.is_main:
                result = {
                    "architecture": architecture.name,
                    "launcher": env.launcher,
                    "backend": backend if env.distributed else None,
                    "world_size": env.world_size,
                    "global_batch": trainer.hypers.batch_size,
                    "mixed_precision": trainer.hypers.mixed_precision,
                    "dtype": str(dtype).replace("torch.", ""),
                    "warmup": warmup,
                    "steps": steps,
                    "checkpoint_every": every,
                    "comm_hook": hooked,
                    "parameters": sum(p.numel() for p in model.parameters()),
                    "structures": structures,
                    "atoms": atoms,
                    "ranks": gathered,
                }
                Path(config["out"]).write_text(json.dumps(result, indent=1))
            del engine, trainer, model  # DDP and its pending work go before the group
            launch.barrier()


# -- report --------------------------------------------------------------------------


def table(results: list[dict[str, Any]]) -> str:
    header = (
        f"{'architecture':<15}{'mode':<7}{'ranks':>5}{'batch':>6}{'step ms':>9}"
        f"{'struct/s':>10}{'atoms/s':>9}{'eff':>6}{'cpu eff':>8}{'machine':>8}{'frame':>6}"
        f"{'on-cpu':>7}  " + "".join(f"{p[:7]:>8}" for p in PARTS) + "   load before/after"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        frac = r["breakdown_fraction"]
        lines.append(
            f"{r['architecture']:<15}{r['mode']:<7}{r['ranks']:>5}{r['global_batch']:>6}"
            f"{1000 * r['step_s']:>9.1f}{r['structures_per_s']:>10.1f}{r['atoms_per_s']:>9.0f}"
            f"{r['efficiency']:>6.2f}{r['cpu_efficiency']:>8.2f}"
            + (
                f"{r['machine_efficiency']:>8.2f}{r['framework_efficiency']:>6.2f}"
                if "machine_efficiency" in r
                else f"{'-':>8}{'-':>6}"
            )
            + f"{100 * r['cpu_utilisation']:>6.0f}%  "
            + "".join(f"{100 * frac[p]:>7.1f}%" for p in PARTS)
            + f"   {r['load_average_before'][0]:.1f}/{r['load_average_after'][0]:.1f}"
        )
    return "\n".join(lines)


def plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        series.setdefault((r["architecture"], r["mode"]), []).append(r)
    all_ranks = sorted({r["ranks"] for r in results})
    for (arch, mode), rows in series.items():
        rows = sorted(rows, key=lambda r: r["ranks"])
        left.plot(
            [r["ranks"] for r in rows],
            [r["efficiency"] for r in rows],
            marker="o",
            linestyle="-" if mode == "weak" else "--",
            label=f"{arch} ({mode})",
        )
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.axhline(0.9, color="grey", linewidth=0.8, linestyle=":")
    left.set_xscale("log", base=2)
    left.set_xticks(all_ranks, [str(n) for n in all_ranks])
    left.set_xlabel("ranks")
    left.set_ylabel("parallel efficiency")
    left.set_ylim(0, 1.15)
    left.legend(fontsize=8)
    left.set_title("efficiency (weak: throughput; strong: time per step)", fontsize=9)
    labels = [f"{r['architecture'][:8]} {r['mode'][0]} N={r['ranks']}" for r in results]
    bottom = [0.0] * len(results)
    for part in PARTS:
        values = [r["breakdown_fraction"][part] for r in results]
        right.bar(range(len(results)), values, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_xticks(range(len(results)), labels, rotation=60, ha="right", fontsize=7)
    right.set_ylabel("fraction of the step (mean over ranks)")
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1, 1))
    right.set_title("where a step's time goes", fontsize=9)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--mode", nargs="+", choices=["weak", "strong"], default=["weak", "strong"])
    parser.add_argument("--architectures", nargs="+", default=list(ARCHITECTURES), metavar="NAME")
    parser.add_argument(
        "--launcher", choices=["auto", "srun", "mpiexec", "torchrun"], default="auto"
    )
    parser.add_argument(
        "--launcher-args",
        default="",
        help="extra arguments of the launcher, one string (e.g. '--gpus-per-task=1')",
    )
    parser.add_argument(
        "--ranks-per-node",
        type=int,
        help="srun: put the ranks on ceil(ranks / K) nodes, K per node",
    )
    parser.add_argument("--threads-per-rank", type=int, default=1)
    parser.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    parser.add_argument("--precision", type=int, choices=[32, 64], default=32)
    parser.add_argument("--mixed-precision", action="store_true", help="bf16 autocast (CUDA)")
    parser.add_argument("--data", type=Path, help="training data (default: generated EMT)")
    parser.add_argument("--structures", type=int, help="EMT structures to generate")
    parser.add_argument("--atoms", type=int, help="atoms per generated EMT structure")
    parser.add_argument(
        "--no-stress", dest="stress", action="store_false", help="learn energies and forces only"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="strong scaling: the global batch; weak scaling: the batch of each rank",
    )
    parser.add_argument("--steps", type=int, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, help="untimed steps before them")
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=0,
        help="write a step checkpoint every N timed steps (0: never)",
    )
    parser.add_argument(
        "--model-hypers",
        type=json.loads,
        default={},
        help='JSON: model hypers per architecture, e.g. \'{"mp_transformer": {"d_model": 32}}\'',
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="measure each run this many times, interleaved, and keep the fastest "
        "(all are in the JSON): for machines shared with other jobs",
    )
    parser.add_argument(
        "--independent",
        action="store_true",
        help="weak scaling: also run N independent one-rank copies at once, the "
        "machine's own ceiling, and report the efficiency relative to it",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per launch")
    parser.add_argument("--quick", action="store_true", help="tiny models and data (smoke test)")
    parser.add_argument("--workdir", type=Path, help="keep run directories here")
    parser.add_argument("--plot", type=Path, help="PNG path (default: --out with .png)")
    parser.add_argument("--out", type=Path, help="JSON result path")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    if args.out is None:
        parser.error("--out is required")
    defaults = QUICK_DEFAULTS if args.quick else SCALING_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.launcher_args = shlex.split(args.launcher_args)
    problems = []
    if min(args.ranks) < 1:
        problems.append("--ranks must be positive")
    if args.repeat < 1:
        problems.append("--repeat must be at least 1")
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.threads_per_rank < 1:
        problems.append(
            "--batch-size, --steps and --threads-per-rank must be at least 1, --warmup at least 0"
        )
    if "strong" in args.mode and args.batch_size < max(args.ranks):
        problems.append(
            f"strong scaling splits the global batch --batch-size {args.batch_size} between "
            f"up to {max(args.ranks)} ranks: give at least one structure per rank"
        )
    for name in args.architectures:
        if name not in ARCHITECTURES and "." not in name:
            problems.append(f"unknown architecture {name!r}; reference ones: {ARCHITECTURES}")
    if not isinstance(args.model_hypers, dict):
        problems.append("--model-hypers must be a JSON object keyed by architecture")
    if args.data is not None and not args.data.exists():
        problems.append(f"--data {args.data} does not exist")
    if args.ranks_per_node is not None and args.ranks_per_node < 1:
        problems.append("--ranks-per-node must be at least 1")
    if args.mixed_precision and args.device == "cpu":
        problems.append("--mixed-precision needs --device cuda")
    if problems:
        parser.error("; ".join(problems))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    launcher = choose_launcher(args.launcher)
    started = datetime.datetime.now().astimezone()
    info = {
        "machine": machine(),
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "launcher": launcher,
        "load_average_before": load_average(),
    }
    print(
        f"{info['machine']['cpu_model']}, {info['machine']['cores_available']} cores, torch "
        f"{info['machine']['torch']}, launcher {launcher}, load {info['load_average_before']}",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        if args.workdir:
            workdir = args.workdir.resolve()
            workdir.mkdir(parents=True, exist_ok=True)
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="scaling-")))
        if args.data is None:
            args.data = workdir / f"emt-{args.structures}x{args.atoms}.xyz"
            if not args.data.exists():
                subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / "benchmarks" / "make_emt_dataset.py"),
                        "-n",
                        str(args.structures),
                        "--atoms",
                        str(args.atoms),
                        "-o",
                        str(args.data),
                    ],
                    check=True,
                )
            dataset = {
                "generated": "make_emt_dataset.py",
                "structures": args.structures,
                "atoms": args.atoms,
            }
        else:
            dataset = {"path": str(args.data)}
        if args.data.is_dir():  # shards (with neighbour pairs, for the loader's rate)
            manifest = json.loads((args.data / "manifest.json").read_text())
            args.n_structures = int(manifest["n_structures"])
        else:
            import ase.io

            args.n_structures = sum(1 for _ in ase.io.iread(str(args.data), ":"))
        dataset["n_structures"] = args.n_structures
        cases = []  # (architecture, mode, ranks, global batch)
        for architecture in args.architectures:
            for mode in args.mode:
                for ranks in sorted(set(args.ranks)):
                    batch = args.batch_size if mode == "strong" else args.batch_size * ranks
                    if batch + 1 > args.n_structures:
                        raise BenchmarkError(
                            f"a global batch of {batch} needs more than {args.n_structures} "
                            "structures (one is kept for validation): raise --structures"
                        )
                    cases.append((architecture, mode, ranks, batch))
        # each distinct run once per repeat (the one-rank run serves both modes),
        # repeats interleaved so that a busy spell of the machine hits all of them
        keys = list(dict.fromkeys((a, n, b, 1) for a, _, n, b in cases))
        if args.independent:  # N one-rank copies at once beside each weak N-rank run
            keys += [
                (a, 1, args.batch_size, n) for a, mode, n, _ in cases if mode == "weak" and n > 1
            ]
        runs: dict[tuple[str, int, int, int], list[dict[str, Any]]] = {k: [] for k in keys}
        for repeat in range(args.repeat):
            for architecture, ranks, batch, copies in keys:
                runs[architecture, ranks, batch, copies].append(
                    measure(args, launcher, architecture, ranks, batch, workdir, repeat, copies)
                )
        best = {k: min(v, key=lambda r: r["summary"]["step_s"]) for k, v in runs.items()}
        results = []
        for architecture, mode, ranks, batch in cases:
            data = best[architecture, ranks, batch, 1]
            data["chosen"] = True
            independent = None
            if mode == "weak" and ranks > 1:
                independent = best.get((architecture, 1, args.batch_size, ranks))
            if independent is not None:
                independent["chosen"] = True
            results.append(
                {
                    "architecture": architecture,
                    "mode": mode,
                    "ranks": ranks,
                    "run": data["name"],
                    **data["summary"],
                    "repeats_step_s": [
                        r["summary"]["step_s"] for r in runs[architecture, ranks, batch, 1]
                    ],
                    "independent_structures_per_s": (
                        independent["summary"]["structures_per_s"] if independent else None
                    ),
                    "load_average_before": data["load_average_before"],
                    "load_average_after": data["load_average_after"],
                }
            )
        efficiencies(results)
    info["load_average_after"] = load_average()
    report = {
        **info,
        "settings": {
            "ranks": sorted(set(args.ranks)),
            "modes": args.mode,
            "threads_per_rank": args.threads_per_rank,
            "device": args.device,
            "precision": args.precision,
            "mixed_precision": args.mixed_precision,
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "checkpoint_every": args.checkpoint_every,
            "stress": args.stress,
            "quick": args.quick,
            "dataset": dataset,
        },
        "results": results,
        "runs": [r for v in runs.values() for r in v],
    }
    paths = {str(workdir): "WORKDIR", str(ROOT): ".", str(Path.cwd()): "."}
    paths = {k: paths[k] for k in sorted(paths, key=len, reverse=True) if k != "/"}
    report = without_paths(report, paths)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(results))
    png = args.plot or args.out.with_suffix(".png")
    plot(
        results,
        png,
        f"{info['machine']['cpu_model']} ({info['machine']['cores_available']} cores), "
        f"{args.threads_per_rank} thread(s)/rank, {launcher}, {info['date']}",
    )
    print(f"wrote {args.out} and {png}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except BenchmarkError as error:
        print(f"scaling.py: error: {error}", file=sys.stderr)
        sys.exit(2)
