"""Data loading benchmarks: loader throughput, peak memory, conversion speed (JSON + table).

    python benchmarks/data.py --out benchmarks/results/data.json      # 5-6 min on 2 cores
    python benchmarks/data.py --quick --out /tmp/data-quick.json      # smoke test, 20-35 s

Three measurements, each against a target of ``docs/benchmarks.rst``:

1. **Loader throughput** (structures/s, one process): an epoch read the way the
   engine reads it, ``DistributedBatchSampler`` (rank 0 of 1) and
   ``collate([dataset[i] for i in step.local])`` per step, for the bundled ethanol
   file and a generated EMT dataset (32-atom periodic fcc alloys, from
   ``make_emt_dataset.py``), each in memory (``read_dataset`` of the extxyz) and as
   shards (``hpctrain convert``, opened through the options as training does). Next
   to it, the structures/s that ``mp_transformer`` (default hypers) consumes in
   ``Engine.train_step`` on the same data; target: loader >= 20x the model.
2. **Peak RSS** of a fresh process that opens a shard directory and iterates one
   epoch, for two sizes (default 10,000 and 200,000 structures of 32 atoms); target:
   within 10% of each other. The shard sets are written directly with the shard
   writer from a pool of the EMT structures, each copy with small random
   displacements (labels copied unchanged: fine for I/O, not for training). An extra
   epoch over the largest set runs with a larger block cache and more open files
   (``--tuned``), to show what the reader's defaults cost.
3. **Conversion**: ``hpctrain convert`` (one process) of the EMT extxyz, against
   ``ase.io.read(path, ":")`` of the same file; target: conversion time <= 1.3x the
   parse time. Between the two: ``extract_frame`` alone, ``iter_frames`` (parsing and
   extraction as conversion does them), and the same calls extracting 256 parsed
   frames at a time (a candidate change). ``cProfile`` names the hot functions of
   conversion and of the loader.

Everything is written in a temporary directory that is removed at the end (unless
``--keep``). The machine is described in the JSON, with load averages: on a shared
machine other processes distort timings (torch's two intra-op threads suffer most).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import platform
import pstats
import re
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from hpctrain import host_memory  # noqa: E402

host_memory.configure()  # as the hpctrain command does, before the first tensor
ETHANOL = ROOT / "examples" / "rmd17_ethanol_100.xyz"
MIB = 1024.0  # ru_maxrss is in KiB on Linux

TARGETS = {"loader_over_model": 20.0, "rss_spread": 0.10, "convert_over_parse": 1.3}


# -- helpers -------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def machine() -> dict:
    import ase
    import h5py
    import numpy
    import torch

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError, IndexError):
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20  # GiB
    return {
        "hostname": platform.node(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "memory_gib": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "numpy": numpy.__version__,
        "h5py": h5py.__version__,
        "hdf5": h5py.version.hdf5_version,
        "ase": ase.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def write_results(path: Path, results: dict) -> None:
    """A benchmark's results as indented JSON at ``path`` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")


def hpctrain_command() -> list[str]:
    script = Path(sys.executable).parent / "hpctrain"
    if script.exists():
        return [str(script)]
    found = shutil.which("hpctrain")
    return [found] if found else [sys.executable, "-m", "hpctrain"]


def run(command: list[str]) -> tuple[float, str]:
    """Run ``command`` from the repository root; its wall time and stdout."""
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return wall, result.stdout


def hot_functions(profile: cProfile.Profile, top: int = 12) -> list[dict]:
    """The ``top`` functions by own time, with shortened file names."""
    stats = pstats.Stats(profile)
    total = sum(v[2] for v in stats.stats.values())
    rows = []
    for (file, line, name), (_, ncalls, tottime, cumtime, _) in stats.stats.items():
        for prefix in (str(ROOT) + "/", "site-packages/"):
            if prefix in file:
                file = file.split(prefix, 1)[1]
        where = f"{file}:{line}({name})" if line else name
        rows.append(
            {
                "function": where,
                "ncalls": ncalls,
                "tottime_s": round(tottime, 4),
                "cumtime_s": round(cumtime, 4),
                "share": round(tottime / total, 3) if total else None,
            }
        )
    rows.sort(key=lambda r: -r["tottime_s"])
    return rows[:top]


def dataset_options(path: Path, stress: bool, forces: bool = True):
    from hpctrain.config import parse
    from hpctrain.options import DatasetOptions

    targets = {"energy": {"forces": forces, "stress": stress}}
    return parse(DatasetOptions, {"systems": {"read_from": str(path)}, "targets": targets})


def open_dataset(path: Path, stress: bool, forces: bool = True):
    """The dataset as training opens it (``read_dataset``): float32, the default precision."""
    import torch

    from hpctrain.data import read_dataset

    options = dataset_options(path, stress, forces)
    return read_dataset(options, "training_set", "benchmark", torch.float32)


def training_engine(dataset, training: dict, device, workdir: Path, architecture="mp_transformer"):
    """The engine ``hpctrain train`` would make for a reference architecture (default
    model hypers, seed 0, ``training`` options), in training mode; 4 structures validate."""
    import importlib

    import torch

    from hpctrain.config import parse
    from hpctrain.engine import Engine

    package = importlib.import_module(f"architectures.{architecture}")
    torch.manual_seed(0)
    model = package.__model__({}, dataset.info)
    hypers = parse(package.__trainer__.__hypers__, training, "architecture.training")
    validation = [dataset.subset(range(4))]
    engine = Engine(hypers, model, torch.device(device), [dataset], validation, workdir, print)
    engine.model.train()
    return engine


def epoch(dataset, sampler) -> int:
    """One epoch read as ``Engine.train_step`` reads it; returns the structures seen."""
    from hpctrain.data import collate

    seen = 0
    for step in sampler:
        batch = collate([dataset[int(i)] for i in step.local])
        seen += len(batch)
    return seen


# -- 1. loader throughput and model consumption --------------------------------------------


def loader_throughput(
    name: str, path: Path, source: str, stress: bool, batch_size: int, min_s: float
) -> dict:
    """Epochs over a freshly opened dataset: the first (cold: HDF5 reads, caches empty)
    and then at least 3 more and ``min_s`` seconds of steady ones."""
    from hpctrain.data import DistributedBatchSampler

    start = time.perf_counter()
    dataset = open_dataset(path, stress)
    opened = time.perf_counter() - start
    sampler = DistributedBatchSampler(len(dataset), batch_size, rank=0, world_size=1, seed=0)
    times = []
    while len(times) < 4 or sum(times[1:]) < min_s:
        sampler.set_epoch(len(times))
        start = time.perf_counter()
        seen = epoch(dataset, sampler)
        times.append(time.perf_counter() - start)
        assert seen == len(dataset), (seen, len(dataset))
    steady = statistics.median(times[1:])
    n = len(dataset)
    return {
        "dataset": name,
        "source": source,
        "path": str(path),
        "n_structures": n,
        "atoms_per_structure": float(dataset.n_atoms.mean()),
        "batch_size": batch_size,
        "open_s": opened,
        "first_epoch_s": times[0],
        "epoch_s": steady,
        "epochs": len(times),
        "first_epoch_structures_per_s": n / times[0],
        "structures_per_s": n / steady,
        "load": load(),
    }


def profile_loader(path: Path, stress: bool, batch_size: int) -> list[dict]:
    """Hot functions of steady epochs over ``path`` (a shard directory)."""
    from hpctrain.data import DistributedBatchSampler

    dataset = open_dataset(path, stress)
    sampler = DistributedBatchSampler(len(dataset), batch_size, rank=0, world_size=1, seed=0)
    epoch(dataset, sampler)
    profile = cProfile.Profile()
    profile.enable()
    for e in (1, 2):
        sampler.set_epoch(e)
        epoch(dataset, sampler)
    profile.disable()
    return hot_functions(profile)


def model_consumption(
    name: str, path: Path, stress: bool, batch_size: int, steps: int, threads: int, workdir: Path
) -> dict:
    """Seconds per ``Engine.train_step`` of ``mp_transformer`` (default hypers, float32);
    the first step (warm-up) is not counted. The step includes its own data reading."""
    import torch

    from architectures.mp_transformer import __model__ as Model
    from architectures.mp_transformer import __trainer__ as Trainer
    from hpctrain.config import parse
    from hpctrain.engine import Engine

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        dataset = open_dataset(path, stress)
        torch.manual_seed(0)
        model = Model({}, dataset.info)
        hypers = parse(Trainer.__hypers__, {"batch_size": batch_size}, "architecture.training")
        validation = [dataset.subset(range(min(4, len(dataset))))]
        engine = Engine(
            hypers, model, torch.device("cpu"), [dataset], validation, workdir, lambda p: None
        )
        engine.model.train()
        times = []
        epoch_index = 0
        while len(times) < steps + 1:
            engine.sampler.set_epoch(epoch_index)
            for step in engine.sampler:
                if len(step.local) != batch_size:
                    continue  # a merged last batch: keep steps comparable
                start = time.perf_counter()
                engine.train_step(step.global_, engine.step_batches(step.local))
                times.append(time.perf_counter() - start)
                if len(times) == steps + 1:
                    break
            epoch_index += 1
    finally:
        torch.set_num_threads(previous)
    step_s = statistics.median(times[1:])
    return {
        "dataset": name,
        "model": "mp_transformer (default hypers)",
        "precision": 32,
        "threads": threads,
        "batch_size": batch_size,
        "steps_timed": steps,
        "warmup_step_s": times[0],
        "step_s": step_s,
        "s_per_structure": step_s / batch_size,
        "structures_per_s": batch_size / step_s,
        "load": load(),
    }


# -- 2. peak RSS over large shard sets ------------------------------------------------------


def write_synthetic_shards(
    pool_xyz: Path, output: Path, n: int, shard_size: int, pool_size: int, seed: int
) -> dict:
    """``n`` structures drawn from the first ``pool_size`` frames of ``pool_xyz``, each
    with Gaussian displacements (0.01 angstrom), written with hpctrain's shard writer
    and manifest functions. Energies, forces and stress are copied unchanged."""
    import numpy as np

    from hpctrain.data.ase_reader import FrameBuffer, iter_frames
    from hpctrain.data.convert import manifest_of, spec_from_args, write_manifest
    from hpctrain.data.shards import shard_name, write_shard

    spec = spec_from_args(stress="stress")
    buffer = FrameBuffer(spec)
    for frame in iter_frames(str(pool_xyz), spec):
        buffer.append(frame)
        if len(buffer) == pool_size:
            break
    pool = buffer.columns()
    offsets = pool["offsets"]
    rng = np.random.default_rng(seed)
    output.mkdir(parents=True)
    records = []
    start = time.perf_counter()
    for first in range(0, n, shard_size):
        picked = rng.integers(len(offsets) - 1, size=min(shard_size, n - first))
        counts = offsets[picked + 1] - offsets[picked]
        atoms = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in picked])
        columns = {
            "numbers": pool["numbers"][atoms],
            "positions": pool["positions"][atoms] + rng.normal(0.0, 0.01, (len(atoms), 3)),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "cells": pool["cells"][picked],
            "pbcs": pool["pbcs"][picked],
            "targets": {k: v[picked] for k, v in pool["targets"].items()},
            "forces": {k: v[atoms] for k, v in pool["forces"].items()},
            "stress": {k: v[picked] for k, v in pool["stress"].items()},
        }
        record = write_shard(output / shard_name(0, len(records)), columns)
        records.append({**record, "source": 0})
    n_atoms = sum(r["n_atoms"] for r in records)
    source = {"path": f"synthetic from {pool_xyz.name}", "bytes": 0, "n_structures": n}
    units = {"length_unit": "angstrom", "energy_unit": "eV"}
    conversion = {"reader": None, "shard_size": shard_size, "compression": "none"}
    manifest = manifest_of(spec, units, conversion, [{**source, "n_atoms": n_atoms}], records)
    write_manifest(output, manifest)
    return {
        "n_structures": n,
        "n_atoms": n_atoms,
        "shards": len(records),
        "bytes": sum(r["bytes"] for r in records),
        "write_s": time.perf_counter() - start,
    }


def rss_child(directory: str, batch_size: int, cache_blocks: int, max_open_files: int) -> None:
    """In a fresh process: open the shards as training does, iterate one epoch, print
    ``ru_maxrss`` (KiB) after the imports, after opening and after the epoch as JSON,
    with the HDF5 block reads and file opens of the epoch. ``cache_blocks`` and
    ``max_open_files`` (0: the reader's defaults) override the reader's settings."""

    def peak() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def high_water_mark() -> int | None:  # the kernel's own peak of this address space
        with contextlib.suppress(OSError, StopIteration):
            status = Path("/proc/self/status").read_text().splitlines()
            return int(next(x for x in status if x.startswith("VmHWM")).split()[1])
        return None

    from hpctrain.data import DistributedBatchSampler, ShardDataset

    imports = peak()
    start = time.perf_counter()
    dataset = open_dataset(Path(directory), stress=True)
    opened_s = time.perf_counter() - start
    opened = peak()
    assert isinstance(dataset, ShardDataset)
    dataset.cache_blocks = cache_blocks or dataset.cache_blocks
    dataset.max_open_files = max_open_files or dataset.max_open_files
    counts = {"block_reads": 0, "structures_read": 0, "file_opens": 0}
    read_piece, open_file = dataset._piece, dataset._file

    def counting_piece(shard: int, block: int):
        if (shard, block) not in dataset._blocks:
            counts["block_reads"] += 1
            counts["structures_read"] += len(read_piece(shard, block))
        return read_piece(shard, block)

    def counting_file(shard: int):
        counts["file_opens"] += shard not in dataset._files
        return open_file(shard)

    dataset._piece, dataset._file = counting_piece, counting_file
    sampler = DistributedBatchSampler(len(dataset), batch_size, rank=0, world_size=1, seed=0)
    start = time.perf_counter()
    seen = epoch(dataset, sampler)
    epoch_s = time.perf_counter() - start
    assert seen == len(dataset)
    result = {
        "n_structures": len(dataset),
        "maxrss_after_imports_kib": imports,
        "maxrss_after_open_kib": opened,
        "maxrss_after_epoch_kib": peak(),
        "vmhwm_after_epoch_kib": high_water_mark(),
        "open_s": opened_s,
        "epoch_s": epoch_s,
        "structures_per_s": len(dataset) / epoch_s,
        **counts,
        "block_size": dataset.block_size,
        "cache_blocks": dataset.cache_blocks,
        "max_open_files": dataset.max_open_files,
        "sampler_block": sampler.block,
        "sampler_window": sampler.window,
        "structures_read_per_used": counts["structures_read"] / len(dataset),
    }
    print("RESULT " + json.dumps(result), flush=True)


def peak_rss(directory: Path, batch_size: int, cache_blocks: int = 0, max_files: int = 0) -> dict:
    """``rss_child`` in a fresh process. On Linux, ``ru_maxrss`` survives ``execve``: a
    child exec'd straight from this (large) process would report this process's peak.
    A shell that forks the child first gives it a clean count."""
    child = [sys.executable, __file__, "--rss-child", str(directory), str(batch_size)]
    child += [str(cache_blocks), str(max_files)]
    wall, out = run(["/bin/sh", "-c", shlex.join(child) + "; exit $?"])
    line = next(x for x in out.splitlines() if x.startswith("RESULT "))
    result = json.loads(line[len("RESULT ") :])
    result.update(
        reader="defaults" if not (cache_blocks or max_files) else "tuned",
        child_wall_s=wall,
        peak_rss_mib=result["maxrss_after_epoch_kib"] / MIB,
        after_imports_mib=result["maxrss_after_imports_kib"] / MIB,
        growth_mib=(result["maxrss_after_epoch_kib"] - result["maxrss_after_imports_kib"]) / MIB,
        load=load(),
    )
    return result


# -- 3. conversion ---------------------------------------------------------------------------


def convert_in_process(xyz: Path, output: Path, profile: cProfile.Profile | None = None) -> float:
    """Seconds of ``convert()`` in this process (what the CLI runs after its imports)."""
    from hpctrain.data.convert import convert, spec_from_args

    units = {"length_unit": "angstrom", "energy_unit": "eV"}
    spec = spec_from_args(stress="stress")
    shutil.rmtree(output, ignore_errors=True)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        if profile is not None:
            profile.enable()
        convert([str(xyz)], output, spec, units)
        if profile is not None:
            profile.disable()
    return time.perf_counter() - start


PARTS = {
    "ASE parsing (iread)": ("ase/io/formats.py", "_iread"),
    "extract_frame": ("hpctrain/data/dataset.py", "extract_frame"),
    "FrameBuffer.columns": ("hpctrain/data/dataset.py", "columns"),
    "write_shard": ("hpctrain/data/shards.py", "write_shard"),
}


def breakdown(profile: cProfile.Profile) -> dict[str, float]:
    """Shares of the profiled time spent in (under) the main stages of conversion."""
    stats = pstats.Stats(profile).stats
    total = sum(v[2] for v in stats.values())
    shares = {}
    for part, (file, name) in PARTS.items():
        times = [v[3] for (f, _, n), v in stats.items() if f.endswith(file) and n == name]
        shares[part] = round(max(times, default=0.0) / total, 3) if total else 0.0
    return shares


CHUNK = 256


def extract_in_chunks(xyz: Path, spec, chunk: int):
    """What ``iter_frames`` yields, but parsing ``chunk`` frames before extracting them:
    a candidate change, measured next to ``iter_frames``."""
    import itertools

    import ase.io

    from hpctrain.data.ase_reader import extract_frame

    frames = ase.io.iread(str(xyz), index=":", parallel=False)
    count = 0
    while batch := list(itertools.islice(frames, chunk)):
        for atoms in batch:
            yield extract_frame(atoms, spec, f"{xyz}, structure {count}")
            count += 1


def conversion(xyz: Path, output: Path, repeats: int) -> dict:
    """``ase.io.read(xyz, ":")`` and ``convert()`` of the same file in this process (both
    warm: modules imported), and ``hpctrain convert`` as a user runs it, interleaved so
    that all see the same machine load."""
    import ase.io

    scratch = output.with_name(output.name + "-in-process")
    convert_in_process(xyz, scratch)  # warm-up: lazy imports (h5py, ...)
    command = [*hpctrain_command(), "convert", str(xyz), "-o", str(output), "--stress", "stress"]
    from hpctrain.data.ase_reader import extract_frame, iter_frames
    from hpctrain.data.convert import spec_from_args

    spec = spec_from_args(stress="stress")
    walls, printed, warm, parses, frames, extracts, chunked = [], [], [], [], [], [], []
    n = 0
    for i in range(repeats):
        start = time.perf_counter()
        atoms = ase.io.read(xyz, ":")
        parses.append(time.perf_counter() - start)
        n = len(atoms)
        start = time.perf_counter()  # extraction alone, on frames already parsed
        for index, one in enumerate(atoms):
            extract_frame(one, spec, f"{xyz}, structure {index}")
        extracts.append(time.perf_counter() - start)
        del atoms
        start = time.perf_counter()  # parsing and extraction as convert() does them
        for _ in iter_frames(str(xyz), spec):
            pass
        frames.append(time.perf_counter() - start)
        start = time.perf_counter()  # the same, extracting 256 parsed frames at a time
        for _ in extract_in_chunks(xyz, spec, CHUNK):
            pass
        chunked.append(time.perf_counter() - start)
        warm.append(convert_in_process(xyz, scratch))
        if i >= 3:
            continue  # the CLI costs seconds of imports each time: 3 runs are enough
        wall, out = run(command + (["--overwrite"] if i else []))
        match = re.search(r"converted (\d+) structures .* \((\d+) structures/s\)", out)
        if not match:
            raise RuntimeError(f"unexpected output of hpctrain convert: {out}")
        walls.append(wall)
        printed.append(int(match.group(1)) / int(match.group(2)))
    startup = None
    if repeats > 1:  # not in --quick: seconds
        startup, _ = run([sys.executable, "-c", "import hpctrain.cli, hpctrain.data.convert"])
    profile = cProfile.Profile()
    profiled = convert_in_process(xyz, scratch, profile)
    shutil.rmtree(scratch, ignore_errors=True)
    parse_s = min(parses)
    return {
        "command": " ".join(["hpctrain", *command[len(hpctrain_command()) :]]),
        "file": str(xyz),
        "bytes": xyz.stat().st_size,
        "n_structures": n,
        "parse_s": parses,
        "extract_frame_s": extracts,
        "iter_frames_s": frames,
        "chunked_s": chunked,
        "chunk": CHUNK,
        "convert_warm_s": warm,
        "convert_printed_s": printed,
        "convert_wall_s": walls,
        "startup_s": startup,
        "best_parse_s": parse_s,
        "best_extract_frame_s": min(extracts),
        "best_iter_frames_s": min(frames),
        "best_chunked_s": min(chunked),
        "best_convert_warm_s": min(warm),
        "best_convert_printed_s": min(printed),
        "best_convert_wall_s": min(walls),
        "parse_structures_per_s": n / parse_s,
        "convert_warm_structures_per_s": n / min(warm),
        "convert_printed_structures_per_s": n / min(printed),
        "convert_wall_structures_per_s": n / min(walls),
        "ratio": min(warm) / parse_s,
        "ratio_printed": min(printed) / parse_s,
        "ratio_wall": min(walls) / parse_s,
        "profiled_s": profiled,
        "hot_functions": hot_functions(profile),
        "breakdown": breakdown(profile),
        "load": load(),
    }


# -- report ----------------------------------------------------------------------------------


def verdicts(results: dict) -> dict:
    loader = {(r["dataset"], r["source"]): r for r in results["loader"]}
    ratios = []
    for dataset in sorted({r["dataset"] for r in results["model"]}):
        fastest = max(
            (m for m in results["model"] if m["dataset"] == dataset),
            key=lambda m: m["structures_per_s"],
        )
        for source in ("memory", "shards"):
            row = loader.get((dataset, source))
            if row is None:
                continue
            for kind in ("structures_per_s", "first_epoch_structures_per_s"):
                ratios.append(
                    {
                        "dataset": dataset,
                        "source": source,
                        "epoch": "steady" if kind == "structures_per_s" else "first",
                        "loader_structures_per_s": row[kind],
                        "model_structures_per_s": fastest["structures_per_s"],
                        "model_threads": fastest["threads"],
                        "ratio": row[kind] / fastest["structures_per_s"],
                    }
                )
    emt_model = max(
        (m["structures_per_s"] for m in results["model"] if m["dataset"] == "emt"), default=None
    )
    # epochs over the synthetic 32-atom sets, against the model on EMT structures
    for rss in results["rss"]:
        if emt_model:
            ratios.append(
                {
                    "dataset": f"synthetic {rss['n_structures']}",
                    "source": "shards",
                    "epoch": "fresh",
                    "loader_structures_per_s": rss["structures_per_s"],
                    "model_structures_per_s": emt_model,
                    "ratio": rss["structures_per_s"] / emt_model,
                }
            )
    worst_ratio = min(r["ratio"] for r in ratios)
    peaks = [r["peak_rss_mib"] for r in results["rss"]]
    spread = max(peaks) / min(peaks) - 1
    conv = results["convert"]
    return {
        "loader_over_model": ratios,
        "loader_over_model_worst": worst_ratio,
        "loader_over_model_met": worst_ratio >= TARGETS["loader_over_model"],
        "rss_spread": spread,
        "rss_met": spread <= TARGETS["rss_spread"],
        "convert_over_parse": conv["ratio"],
        "convert_over_parse_met": conv["ratio"] <= TARGETS["convert_over_parse"],
        "convert_printed_over_parse": conv["ratio_printed"],
        "convert_wall_over_parse": conv["ratio_wall"],
        "targets": TARGETS,
    }


def table(results: dict) -> str:
    lines = [
        "Loader (one process, DistributedBatchSampler + collate, float32)",
        f"  {'dataset':<10} {'source':<7} {'n':>6} {'first epoch/s':>14} {'steady/s':>10}",
    ]
    for r in results["loader"]:
        lines.append(
            f"  {r['dataset']:<10} {r['source']:<7} {r['n_structures']:>6} "
            f"{r['first_epoch_structures_per_s']:>14.0f} {r['structures_per_s']:>10.0f}"
        )
    lines += [
        "Model consumption (mp_transformer, Engine.train_step, float32)",
        f"  {'dataset':<10} {'threads':>7} {'batch':>5} {'s/step':>8} {'ms/struct':>10} "
        f"{'struct/s':>9}",
    ]
    for m in results["model"]:
        lines.append(
            f"  {m['dataset']:<10} {m['threads']:>7} {m['batch_size']:>5} {m['step_s']:>8.3f} "
            f"{1000 * m['s_per_structure']:>10.1f} {m['structures_per_s']:>9.1f}"
        )
    v = results["verdicts"]
    lines.append("Loader / model (fastest thread setting; target >= 20x)")
    for r in v["loader_over_model"]:
        lines.append(f"  {r['dataset']:<16} {r['source']:<7} {r['epoch']:<7} {r['ratio']:>8.0f}x")
    lines += [
        "Peak RSS, fresh process, one epoch over shards (target: within 10%)",
        f"  {'structures':>10} {'shards':>6} {'MiB on disk':>11} {'peak MiB':>9} "
        f"{'imports MiB':>11} {'growth MiB':>10} {'struct/s':>9} {'read/used':>9} "
        f"{'opens':>6}  reader cache",
    ]
    tuned = [results["rss_tuned"]] if results.get("rss_tuned") else []
    for r in results["rss"] + tuned:
        lines.append(
            f"  {r['n_structures']:>10} {r['shards']:>6} {r['bytes'] / 2**20:>11.0f} "
            f"{r['peak_rss_mib']:>9.1f} {r['after_imports_mib']:>11.1f} "
            f"{r['growth_mib']:>10.1f} {r['structures_per_s']:>9.0f} "
            f"{r['structures_read_per_used']:>9.2f} {r['file_opens']:>6}  "
            f"{r['cache_blocks']} blocks, {r['max_open_files']} files"
        )
    c = results["convert"]
    lines += [
        f"Conversion of {c['n_structures']} EMT structures (best of {len(c['parse_s'])}; "
        "target <= 1.3x parse)",
        f"  ase.io.read(path, ':'), warm         {c['best_parse_s']:7.2f} s "
        f"{c['parse_structures_per_s']:7.0f} structures/s",
        f"  extract_frame() of those frames      {c['best_extract_frame_s']:7.2f} s",
        f"  iter_frames() (parse + extract)      {c['best_iter_frames_s']:7.2f} s "
        f"{c['n_structures'] / c['best_iter_frames_s']:7.0f} structures/s  "
        f"{c['best_iter_frames_s'] / c['best_parse_s']:.2f}x",
        f"  {'the same, ' + str(c['chunk']) + ' frames at a time':<37}{c['best_chunked_s']:7.2f} s "
        f"{c['n_structures'] / c['best_chunked_s']:7.0f} structures/s  "
        f"{c['best_chunked_s'] / c['best_parse_s']:.2f}x",
        f"  convert(), warm                      {c['best_convert_warm_s']:7.2f} s "
        f"{c['convert_warm_structures_per_s']:7.0f} structures/s  {c['ratio']:.2f}x",
        f"  hpctrain convert, time it prints     {c['best_convert_printed_s']:7.2f} s "
        f"{c['convert_printed_structures_per_s']:7.0f} structures/s  {c['ratio_printed']:.2f}x",
        f"  hpctrain convert, wall               {c['best_convert_wall_s']:7.2f} s "
        f"{c['convert_wall_structures_per_s']:7.0f} structures/s  {c['ratio_wall']:.2f}x",
        f"  python -c 'import hpctrain.cli, hpctrain.data.convert': {c['startup_s']:.2f} s"
        if c["startup_s"] is not None
        else "  (interpreter start-up not measured in --quick)",
        "  profiled convert(), cumulative shares: "
        + ", ".join(f"{k} {100 * v:.0f}%" for k, v in c["breakdown"].items()),
        "Targets",
        f"  loader >= 20x model:     worst {v['loader_over_model_worst']:.0f}x  "
        f"{'met' if v['loader_over_model_met'] else 'NOT met'}",
        f"  peak RSS within 10%:     {100 * v['rss_spread']:+.1f}%  "
        f"{'met' if v['rss_met'] else 'NOT met'}",
        f"  convert <= 1.3x parse:   {v['convert_over_parse']:.2f}x  "
        f"{'met' if v['convert_over_parse_met'] else 'NOT met'}",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data-benchmark.json"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument("--emt", type=int, help="EMT structures to generate (default 3000)")
    parser.add_argument(
        "--rss-sizes", type=int, nargs="+", help="shard set sizes (default 10000 200000)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model-steps", type=int, help="timed train steps (default 5)")
    parser.add_argument(
        "--threads", type=int, nargs="+", help="torch threads of the model (default: 1 and all)"
    )
    parser.add_argument(
        "--repeats", type=int, help="conversion repeats (default 5; the CLI at most 3)"
    )
    parser.add_argument("--workdir", type=Path, help="scratch directory (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--tuned",
        type=int,
        nargs=2,
        default=[40, 32],
        metavar=("CACHE_BLOCKS", "MAX_OPEN_FILES"),
        help="reader settings of the extra epoch over the largest shard set (0 0: none)",
    )
    parser.add_argument("--rss-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # architectures/ when run from elsewhere
    if args.rss_child:
        directory, *numbers = args.rss_child
        rss_child(directory, *(int(x) for x in numbers))
        return

    import torch

    quick = args.quick
    n_emt = args.emt or (64 if quick else 3000)
    rss_sizes = args.rss_sizes or ([1000, 4000] if quick else [10000, 200000])
    steps = args.model_steps or (1 if quick else 5)
    threads = args.threads or sorted({1, torch.get_num_threads()})
    if quick:
        threads = threads[:1]
        args.tuned = [0, 0]
    repeats = args.repeats or (1 if quick else 5)
    min_s = 0.2 if quick else 1.0

    started = time.perf_counter()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="hpctrain-data-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": machine(),
        "load_start": load(),
        "settings": {
            "quick": quick,
            "batch_size": args.batch_size,
            "emt_structures": n_emt,
            "rss_sizes": rss_sizes,
            "model_steps": steps,
            "threads": threads,
            "conversion_repeats": repeats,
            "workdir": str(workdir),
        },
        "loader": [],
        "model": [],
        "rss": [],
        "rss_tuned": None,
    }
    log(f"scratch directory {workdir}; load average {results['load_start']}")
    try:
        # data: ethanol shards, EMT extxyz and its shards (the conversion benchmark)
        hpctrain = hpctrain_command()
        eth_shards = workdir / "ethanol-shards"
        run([*hpctrain, "convert", str(ETHANOL), "-o", str(eth_shards)])
        emt = workdir / "emt.xyz"
        log(f"generating {n_emt} EMT structures of 32 atoms")
        make = [sys.executable, str(ROOT / "benchmarks" / "make_emt_dataset.py")]
        generate_s, _ = run([*make, "-n", str(n_emt), "--atoms", "32", "-o", str(emt)])
        results["settings"]["emt_generate_s"] = generate_s
        emt_shards = workdir / "emt-shards"
        log("conversion: hpctrain convert against ase.io.read")
        results["convert"] = conversion(emt, emt_shards, repeats)

        log("loader throughput")
        cases = [
            ("ethanol", ETHANOL, "memory", False),
            ("ethanol", eth_shards, "shards", False),
            ("emt", emt, "memory", True),
            ("emt", emt_shards, "shards", True),
        ]
        for name, path, source, stress in cases:
            row = loader_throughput(name, path, source, stress, args.batch_size, min_s)
            results["loader"].append(row)
            log(f"  {name} {source}: {row['structures_per_s']:.0f} structures/s")
        results["loader_hot_functions"] = profile_loader(emt_shards, True, args.batch_size)

        log("model consumption")
        for name, path, stress in (("ethanol", ETHANOL, False), ("emt", emt, True)):
            for n_threads in threads:
                row = model_consumption(
                    name, path, stress, args.batch_size, steps, n_threads, workdir
                )
                results["model"].append(row)
                log(f"  {name} {n_threads} thread(s): {row['step_s']:.3f} s per step")

        log("peak RSS")
        for size in rss_sizes:
            directory = workdir / f"synthetic-{size}"
            written = write_synthetic_shards(
                emt, directory, size, shard_size=10000, pool_size=256, seed=size
            )
            row = {**written, **peak_rss(directory, args.batch_size)}
            results["rss"].append(row)
            log(f"  {size}: peak {row['peak_rss_mib']:.1f} MiB, {row['epoch_s']:.1f} s")
            if size == max(rss_sizes) and any(args.tuned):
                row = {**written, **peak_rss(directory, args.batch_size, *args.tuned)}
                results["rss_tuned"] = row
                log(f"  {size}, tuned reader: {row['epoch_s']:.1f} s")
            shutil.rmtree(directory)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results["verdicts"] = verdicts(results)
    results["load_end"] = load()
    results["total_s"] = time.perf_counter() - started
    write_results(args.out, results)
    print(table(results))
    log(f"wrote {args.out} in {results['total_s']:.0f} s; load average {results['load_end']}")


if __name__ == "__main__":
    main()
