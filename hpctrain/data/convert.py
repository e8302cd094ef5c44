"""``hpctrain convert``: ASE-readable files -> a directory of HDF5 shards.

Inputs are streamed with ``ase.io.iread`` through the same frame extraction as
:func:`hpctrain.data.read_dataset` (keys, units, NaN checks); one shard's worth of
structures is held in memory at a time. Under ``mpiexec`` the input files are
spread over the ranks; shard names and contents depend only on the inputs, so any
number of ranks writes the same bytes. Rank 0 writes ``manifest.json`` last, via a
temporary file and a rename: a directory with a manifest is complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__, launch
from ..errors import DataError, LaunchError
from .ase_reader import FrameBuffer, FrameSpec, TargetSpec, iter_frames, unit_factor
from .pairs import GROUP, shard_columns
from .shards import FORMAT, FORMAT_VERSION, MANIFEST, shard_name, write_shard
from .structures import ENERGY_UNIT, LENGTH_UNIT


@dataclasses.dataclass
class Ranks:
    """The ranks converting together: MPI's when started by an MPI launcher, else one."""

    rank: int = 0
    size: int = 1
    comm: Any = None

    def gather(self, obj: Any) -> list[Any] | None:
        return self.comm.gather(obj, root=0) if self.comm else [obj]

    def bcast(self, obj: Any) -> Any:
        return self.comm.bcast(obj, root=0) if self.comm else obj


def ranks() -> Ranks:
    """This process's rank. mpi4py is imported only when an MPI launcher (or ``srun``
    with several tasks) started us; torchrun is not supported here."""
    launcher = launch.launcher_of(os.environ)
    if launcher == "single":
        return Ranks()
    if launcher == "slurm" and launch.detect().world_size == 1:
        return Ranks()
    if launcher == "torchrun":
        raise LaunchError(
            "hpctrain convert does not run under torchrun; run it as one process, or "
            "under mpiexec/srun to spread input files over ranks"
        )
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if launcher == "slurm" and comm.size != launch.detect().world_size:
        raise LaunchError(
            "srun started several tasks but MPI sees each alone; use srun --mpi=pmix "
            "(or pmi2), or mpiexec"
        )
    return Ranks(comm.rank, comm.size, comm if comm.size > 1 else None)


def assign(sizes: list[int], n_ranks: int) -> list[list[int]]:
    """Input file indices per rank: largest files first, each to the least loaded rank."""
    loads = [0] * n_ranks
    mine: list[list[int]] = [[] for _ in range(n_ranks)]
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(n_ranks), key=lambda r: (loads[r], r))
        loads[rank] += sizes[index]
        mine[rank].append(index)
    return [sorted(m) for m in mine]


class Progress:
    """Structures converted so far, printed every ``every`` seconds (one line each when
    stdout is not a terminal, an updated line when it is)."""

    def __init__(self, enabled: bool, label: str = "", every: float | None = None):
        self.enabled = enabled
        self.label = label
        self.tty = sys.stdout.isatty()
        self.every = every if every is not None else (0.5 if self.tty else 5.0)
        self.start = self.last = time.monotonic()
        self.count = 0

    def add(self, n: int = 1) -> None:
        self.count += n
        now = time.monotonic()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            rate = self.count / max(now - self.start, 1e-9)
            line = f"convert{self.label}: {self.count} structures, {rate:.0f} structures/s"
            print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)

    def done(self) -> None:
        if self.enabled and self.tty and self.count:
            print(flush=True)


def _convert_file(
    file_index: int,
    path: str,
    spec: FrameSpec,
    output: Path,
    shard_size: int,
    compression: str | None,
    reader: str | None,
    progress: Progress,
    pair_cutoff: float | None = None,
) -> tuple[list[dict], int, int, dict[str, int]]:
    """Shards of one input file, with their neighbour pairs within ``pair_cutoff``;
    returns their records, structures, atoms and, per target with a stress, the
    structures that have one. On an error, the shards of this file written so far
    are removed."""
    buffer = FrameBuffer(spec)
    records: list[dict] = []
    stressed: dict[str, int] = {}

    def flush() -> None:
        path_out = output / shard_name(file_index, len(records))
        columns = buffer.columns()
        if pair_cutoff is not None:
            columns[GROUP] = {"cutoff": pair_cutoff, **shard_columns(columns, pair_cutoff)}
        record = write_shard(path_out, columns, compression)
        records.append({**record, "source": file_index})
        for name, stress in columns["stress"].items():
            known = int(np.isfinite(stress).all(axis=(1, 2)).sum())
            stressed[name] = stressed.get(name, 0) + known
        buffer.clear()

    try:
        for frame in iter_frames(path, spec, reader):
            buffer.append(frame)
            progress.add()
            if len(buffer) == shard_size:
                flush()
        if buffer:
            flush()
    except BaseException:
        _remove(output, records + [{"file": shard_name(file_index, len(records))}])
        raise
    if not records:
        raise DataError(f"{path} holds no structures")
    n, n_atoms = sum(r["n_structures"] for r in records), sum(r["n_atoms"] for r in records)
    return records, n, n_atoms, stressed


def _remove(output: Path, records: list[dict]) -> None:
    for record in records:
        for name in (record["file"], record["file"] + ".tmp"):
            (output / name).unlink(missing_ok=True)


def _describe(error: Exception) -> tuple[str, bool]:
    """An error as (message, unexpected), its traceback printed when unexpected."""
    if isinstance(error, DataError):
        return str(error), False
    traceback.print_exc()
    return f"{type(error).__name__}: {error}", True


def _raise(message: str, unexpected: bool) -> None:
    """The same error on every rank: a DataError (exit 2), else a RuntimeError (exit 1)."""
    if unexpected:
        raise RuntimeError(f"hpctrain convert failed: {message} (traceback above)")
    raise DataError(message)


def _on_rank_0(group: Ranks, check: Callable[[], None]) -> None:
    """Run ``check`` on rank 0; every rank raises its error, or none does."""
    failure = None
    if group.rank == 0:
        try:
            check()
        except Exception as error:  # every rank must reach the broadcast below
            failure = _describe(error)
    failure = group.bcast(failure)
    if failure:
        _raise(*failure)


def _prepare_output(output: Path, inputs: list[str], overwrite: bool) -> None:
    for path in inputs:
        if not Path(path).is_file():
            raise DataError(f"input {path} does not exist or is not a file")
    if output.exists() and not output.is_dir():
        raise DataError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise DataError(
                f"output directory {output} is not empty; choose another one, or pass "
                "--overwrite to replace the shards in it"
            )
        (output / MANIFEST).unlink(missing_ok=True)  # first: never a stale complete-looking dir
        for old in [*output.glob("shard-*.h5"), *output.glob("*.tmp")]:
            old.unlink()
    output.mkdir(parents=True, exist_ok=True)


def manifest_of(
    spec: FrameSpec,
    units: dict[str, str],
    conversion: dict[str, Any],
    sources: list[dict],
    shards: list[dict],
) -> dict:
    """The manifest: format, units, targets with their input keys, sources, shards."""
    targets = {}
    for t in spec.targets:
        keys = {"value": t.key, "forces": t.forces_key, "stress": t.stress_key}
        keys["virial"] = t.virial_key
        targets[t.name] = {
            "quantity": t.quantity,
            "unit": ENERGY_UNIT,
            "per_atom": t.per_atom,
            "gradients": t.gradients,
            "keys": {k: v for k, v in keys.items() if v},
        }
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "written_by": f"hpctrain {__version__}",
        "length_unit": LENGTH_UNIT,
        "converted_from": units,
        "conversion": conversion,
        "targets": targets,
        "n_structures": sum(s["n_structures"] for s in shards),
        "n_atoms": sum(s["n_atoms"] for s in shards),
        "atomic_types": sorted({z for s in shards for z in s["atomic_types"]}),
        "sources": sources,
        "shards": shards,
    }


def write_manifest(output: Path, manifest: dict) -> None:
    """Write ``manifest.json`` atomically: a temp file, fsync, rename, fsync the directory."""
    tmp = output / (MANIFEST + ".tmp")
    with open(tmp, "w") as file:
        file.write(json.dumps(manifest, indent=2) + "\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, output / MANIFEST)
    fd = os.open(output, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def convert(
    inputs: list[str],
    output: str | os.PathLike,
    spec: FrameSpec,
    units: dict[str, str],
    shard_size: int = 10000,
    compression: str | None = None,
    reader: str | None = None,
    overwrite: bool = False,
    progress_every: float | None = None,
    pair_cutoff: float | None = None,
) -> dict | None:
    """Convert ``inputs`` into shards in ``output`` on every rank of this launch.

    ``units`` are those of the inputs (``length_unit``, ``energy_unit``), already folded
    into ``spec``'s factors; they are recorded in the manifest. With ``pair_cutoff``,
    each structure's neighbour pairs within it are stored too. Returns the manifest
    on rank 0 (None elsewhere). On an error no manifest is written and the shards
    written so far are removed.
    """
    conversion = _settings(reader, shard_size, compression, pair_cutoff)
    output = Path(output)
    group = ranks()
    started = time.monotonic()
    existed = output.exists()  # (rank 0's answer is the one used)
    _on_rank_0(group, lambda: _prepare_output(output, inputs, overwrite))
    sizes = [Path(p).stat().st_size for p in inputs]
    label = f" (rank 0 of {group.size})" if group.size > 1 else ""
    progress = Progress(group.rank == 0, label, progress_every)
    result: dict[str, Any] = {"records": [], "sources": {}, "error": None, "stressed": {}}
    for index in assign(sizes, group.size)[group.rank]:
        try:
            records, n, n_atoms, stressed = _convert_file(
                index,
                inputs[index],
                spec,
                output,
                shard_size,
                compression,
                reader,
                progress,
                pair_cutoff,
            )
        except Exception as error:  # reported by rank 0, so that no rank waits forever
            result["error"] = (index, *_describe(error))
            break
        result["records"] += records
        for name, count in stressed.items():
            result["stressed"][name] = result["stressed"].get(name, 0) + count
        source = {"path": inputs[index], "bytes": sizes[index], "n_structures": n}
        result["sources"][index] = {**source, "n_atoms": n_atoms}
    progress.done()
    gathered = group.gather(result)
    first_error = None
    if group.rank == 0:
        first_error = min((r["error"] for r in gathered if r["error"]), default=None)
        first_error = first_error or _no_stress(spec, gathered)
    first_error = group.bcast(first_error)
    if first_error:
        _abandon(group, output, result["records"], existed)
        _raise(*first_error[1:])
    _on_rank_0(
        group,
        lambda: result.update(
            manifest=_write_manifest(output, spec, units, conversion, inputs, gathered, started)
        ),
    )
    return result.get("manifest")


def _settings(
    reader: str | None, shard_size: int, compression: str | None, pair_cutoff: float | None
) -> dict[str, Any]:
    """The manifest's ``conversion`` record of these settings, checked."""
    if shard_size < 1:
        raise DataError(f"--shard-size must be at least 1, got {shard_size}")
    if pair_cutoff is not None and not pair_cutoff > 0:
        raise DataError(f"--neighbors must be a cutoff above 0 (angstrom), got {pair_cutoff}")
    conversion = {"reader": reader, "shard_size": shard_size, "compression": compression or "none"}
    if pair_cutoff is not None:
        conversion[GROUP] = {"cutoff": pair_cutoff, "list": "half"}
    return conversion


def _no_stress(spec: FrameSpec, gathered: list[dict[str, Any]]) -> tuple | None:
    """The error of a target whose stress no structure has (a wrong key, or no
    periodic structure), as ``convert`` reports errors; None if every one has some."""
    for target in spec.targets:
        key = target.stress_key or target.virial_key
        if key and sum(r["stressed"].get(target.name, 0) for r in gathered) == 0:
            message = (
                f"no structure has a stress for target '{target.name}' (key '{key}', "
                f"or not periodic); {target.hints.get('stress', '')}"
            )
            return (0, message, False)
    return None


def _abandon(group: Ranks, output: Path, records: list[dict], existed: bool) -> None:
    """After an error on some rank: every rank removes its shards; rank 0 removes the
    output directory if the conversion made it and it is empty."""
    _remove(output, records)
    group.gather(None)  # every rank has removed its shards
    if group.rank == 0 and not existed:
        with contextlib.suppress(OSError):  # only an empty directory goes
            output.rmdir()


def _write_manifest(
    output: Path,
    spec: FrameSpec,
    units: dict[str, str],
    conversion: dict[str, Any],
    inputs: list[str],
    gathered: list[dict[str, Any]],
    started: float,
) -> dict:
    """Rank 0: the manifest of every rank's shards, written last; a line saying so."""
    # a stable sort: each rank lists the shards of a file in order
    records = sorted((rec for r in gathered for rec in r["records"]), key=lambda rec: rec["source"])
    sources = {i: s for r in gathered for i, s in r["sources"].items()}
    manifest = manifest_of(
        spec, units, conversion, [sources[i] for i in range(len(inputs))], records
    )
    write_manifest(output, manifest)
    elapsed = time.monotonic() - started
    print(
        f"converted {manifest['n_structures']} structures ({manifest['n_atoms']} atoms) "
        f"from {len(inputs)} file(s) into {len(records)} shard(s) in {elapsed:.1f} s "
        f"({manifest['n_structures'] / max(elapsed, 1e-9):.0f} structures/s): {output}",
        flush=True,
    )
    return manifest


def choose_labels(
    first_input: str,
    reader: str | None,
    energy: str,
    forces: str,
    stress: str,
    virial: str,
) -> tuple[str | None, str | None, str | None, str]:
    """The forces, stress and virial keys to store (``auto`` resolved on the first
    structure of the first input) and a line saying what is stored and what is not."""
    from .ase_reader import first_frame, keys_of, label_key

    if not Path(first_input).is_file():
        raise DataError(f"input {first_input} does not exist or is not a file")
    atoms = first_frame(Path(first_input), reader)
    periodic = bool(atoms.pbc.all())
    forces_key = label_key(atoms, forces, "forces")
    virial_given = virial not in (None, "", "none", "auto")
    stress_key = (
        None if virial_given and stress == "auto" else label_key(atoms, stress, "stress", periodic)
    )
    virial_key = None if stress_key else label_key(atoms, virial, "virial", periodic)
    chosen = {"forces": forces_key, "stress": stress_key, "virial": virial_key}
    flags = {"forces": forces, "stress": stress, "virial": virial}

    def why_not(label: str) -> str:
        if flags[label] in (None, "", "none"):
            return f"--{label} none"
        if label == "virial" and stress_key:
            return "stress is stored"
        if label == "stress" and virial_key:
            return "the virial is stored as stress"
        if label != "forces" and not periodic:
            return "structure 0 is not periodic"
        return "not in the data"

    stored = [f"energy ('{energy}')"] + [f"{k} ('{v}')" for k, v in chosen.items() if v]
    skipped = [f"{label} ({why_not(label)})" for label, key in chosen.items() if key is None]
    read = {energy, "numbers", "positions", *filter(None, chosen.values())}
    others = ", ".join(sorted(keys_of(atoms) - read))
    line = f"storing {', '.join(stored)}; not storing {', '.join(skipped) or 'anything else'}"
    if others:
        line += f"; other keys of {first_input}: {others}"
    return forces_key, stress_key, virial_key, line


def spec_from_args(
    energy: str = "energy",
    forces: str | None = "forces",
    stress: str | None = None,
    virial: str | None = None,
    energy_unit: str = ENERGY_UNIT,
    length_unit: str = LENGTH_UNIT,
    targets: list[str] | None = None,
) -> FrameSpec:
    """The :class:`FrameSpec` of ``hpctrain convert``'s flags.

    ``energy`` names the key of target ``energy``, which ``forces``, ``stress`` or
    ``virial`` keys belong to (``None`` or ``"none"``: not stored). ``targets`` adds
    energies without gradients, each ``NAME:KEY`` or ``NAME:KEY:per-atom``.
    """

    def key(value: str | None) -> str | None:
        return None if value in (None, "", "none") else value

    if key(stress) and key(virial):
        raise DataError("--stress and --virial both given; a dataset provides one of them")
    factor = unit_factor(energy_unit, ENERGY_UNIT, "--energy-unit")
    length = unit_factor(length_unit, LENGTH_UNIT, "--length-unit")
    specs = [
        TargetSpec(
            name="energy",
            key=energy,
            forces_key=key(forces),
            stress_key=key(stress),
            virial_key=key(virial),
            energy_factor=factor,
            hints={
                "key": "set with --energy KEY",
                "forces": "pass --forces none to store energies only, or name the key "
                "with --forces KEY",
                "stress": "drop --stress/--virial, or name the right key",
            },
        )
    ]
    for text in targets or []:
        name, _, rest = text.partition(":")
        target_key, _, kind = rest.partition(":")
        if not name or not target_key or kind not in ("", "per-atom") or "/" in name:
            raise DataError(
                f"--target {text!r}: expected NAME:KEY or NAME:KEY:per-atom (NAME without '/')"
            )
        if name in {s.name for s in specs}:
            raise DataError(f"--target {text!r}: a target named '{name}' is already stored")
        specs.append(
            TargetSpec(
                name=name,
                key=target_key,
                per_atom=kind == "per-atom",
                energy_factor=factor,
                hints={"key": f"set with --target {text}"},
            )
        )
    return FrameSpec(targets=tuple(specs), length_factor=length)
