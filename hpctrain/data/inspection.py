"""``hpctrain inspect``: what a shard directory holds, and a full integrity check.

The summary comes from the manifest and one streaming pass over the shards (one
chunk of rows in memory at a time). ``verify`` checks each file's sha256, the
offsets, atomic numbers and that every value is finite, and stops at the first
problem with a :class:`DataError` naming the shard and the structure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import DataError
from .pairs import GROUP, pair_cutoff_of, read_stored
from .shards import (
    ATOM_CHUNK,
    MANIFEST,
    REMEDY,
    all_selections,
    check_shard,
    damage_named,
    read_manifest,
    sha256_of,
)


class Moments:
    """Count, mean and variance of a stream of arrays, merged chunk by chunk (Chan et al.)."""

    def __init__(self) -> None:
        self.n, self.mean, self.m2 = 0, 0.0, 0.0

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        if not len(values):
            return
        n, mean = len(values), float(values.mean())
        m2 = float(((values - mean) ** 2).sum())
        total = self.n + n
        delta = mean - self.mean
        self.m2 += m2 + delta**2 * self.n * n / total
        self.mean += delta * n / total
        self.n = total

    @property
    def std(self) -> float:
        return (self.m2 / self.n) ** 0.5 if self.n else float("nan")

    @property
    def rms(self) -> float:
        return (self.std**2 + self.mean**2) ** 0.5


def _rows(dataset, step: int) -> Iterator[tuple[int, np.ndarray]]:
    for start in range(0, dataset.shape[0], step):
        yield start, dataset[start : start + step]


@dataclasses.dataclass
class Statistics:
    """What one streaming pass over a shard directory measured, per target."""

    counts: Moments  # atoms per structure
    smallest: int
    largest: int
    values: dict[str, Moments]
    per_atom: dict[str, Moments]
    forces: dict[str, Moments]
    stress: dict[str, Moments]
    stressed: dict[str, int] = dataclasses.field(default_factory=dict)  # with a stress


def statistics(directory: Path, manifest: dict) -> Statistics:
    """One pass over the shards, a chunk of rows at a time, each shard checked first."""
    import h5py

    stored = manifest["targets"]
    selections = all_selections(manifest)
    stats = Statistics(
        Moments(), 2**62, 0, *({name: Moments() for name in stored} for _ in range(4))
    )
    for record in manifest["shards"]:
        offsets = check_shard(directory, record, stored, selections)
        n_atoms = np.diff(offsets)
        stats.counts.add(n_atoms)
        stats.smallest = min(int(n_atoms.min()), stats.smallest)
        stats.largest = max(int(n_atoms.max()), stats.largest)
        path = directory / record["file"]
        with h5py.File(path, "r") as file, damage_named(path):
            for name, target in stored.items():
                data = file[f"targets/{name}"][:]
                stats.values[name].add(data)
                if not target["per_atom"]:
                    stats.per_atom[name].add(data / n_atoms)
                if "positions" in target["gradients"]:
                    for _, rows in _rows(file[f"forces/{name}"], ATOM_CHUNK):
                        stats.forces[name].add(rows)
                if "strain" in target["gradients"]:
                    stress = file[f"stress/{name}"][:]
                    known = np.isfinite(stress).all(axis=(1, 2))  # (NaN: no stress)
                    stats.stress[name].add(stress[known])
                    stats.stressed[name] = stats.stressed.get(name, 0) + int(known.sum())
    return stats


def summarize(directory: str | Path) -> str:
    """A readable summary: counts, atoms per structure, elements, target statistics."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    stored = manifest["targets"]
    stats = statistics(directory, manifest)
    counts, smallest, largest = stats.counts, stats.smallest, stats.largest
    values, per_atom, forces, stress = stats.values, stats.per_atom, stats.forces, stats.stress
    sources = manifest.get("sources", [])
    units = manifest.get("converted_from", {})
    lines = [
        f"shard directory {directory} ({manifest['format']} version "
        f"{manifest['format_version']}, {manifest.get('written_by', 'unknown writer')})",
        f"structures: {manifest['n_structures']} with {manifest['n_atoms']} atoms, in "
        f"{len(manifest['shards'])} shard(s) from {len(sources)} input file(s)",
        f"atoms per structure: min {smallest}, mean {counts.mean:.2f}, max {largest}",
        f"elements: {' '.join(map(str, manifest.get('atomic_types', [])))} (atomic numbers)",
        f"units: length angstrom, energy eV (converted from {units.get('length_unit', '?')} "
        f"and {units.get('energy_unit', '?')})",
    ]
    cutoff = pair_cutoff_of(manifest, directory / MANIFEST, REMEDY)
    if cutoff is not None:
        pairs = sum(_n_pairs(directory / s["file"]) for s in manifest["shards"])
        lines.append(
            f"neighbour pairs: stored within {cutoff:g} angstrom, "
            f"{pairs / manifest['n_structures']:.1f} per structure (each pair once)"
        )
    for name, target in stored.items():
        keys = ", ".join(f"{k} <- '{v}'" for k, v in target.get("keys", {}).items())
        kind = "per atom" if target["per_atom"] else "per structure"
        line = (
            f"target {name} ({target['quantity']} {kind}; {keys}): mean "
            f"{values[name].mean:.6g} eV, std {values[name].std:.6g} eV"
        )
        if not target["per_atom"]:
            line += f"; per atom mean {per_atom[name].mean:.6g} eV, std {per_atom[name].std:.6g} eV"
        lines.append(line)
        if forces[name].n:
            lines.append(f"  forces: RMS component {forces[name].rms:.6g} eV/angstrom")
        if name in stats.stressed:
            with_stress = stats.stressed[name]
            rms = f"RMS component {stress[name].rms:.6g} eV/angstrom^3, " if stress[name].n else ""
            lines.append(
                f"  stress: {rms}on {with_stress} of {manifest['n_structures']} structures"
            )
    lines.append("inputs:")
    lines += [
        f"  {s['path']}: {s['n_structures']} structures, {s['n_atoms']} atoms, {s['bytes']} bytes"
        for s in sources
    ]
    lines.append("shards:")
    shards = manifest["shards"]
    lines += [
        f"  {s['file']}: {s['n_structures']} structures, {s['n_atoms']} atoms, "
        f"{s['bytes']} bytes, elements {' '.join(map(str, s['atomic_types']))}"
        for s in shards[:20]
    ]
    if len(shards) > 20:
        lines.append(f"  ... and {len(shards) - 20} more")
    return "\n".join(lines)


def _n_pairs(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as file, damage_named(path):
        return int(file[f"{GROUP}/pairs"].shape[0])


def verify(directory: str | Path) -> int:
    """Check every shard completely; returns the number of structures checked.

    Raises :class:`DataError` naming the shard (and structure) of the first problem.
    """
    import h5py

    directory = Path(directory)
    manifest = read_manifest(directory)
    stored = manifest["targets"]
    selections = all_selections(manifest)
    cutoff = pair_cutoff_of(manifest, directory / MANIFEST, REMEDY)
    for record in manifest["shards"]:
        path = directory / record["file"]
        if not path.is_file():
            raise DataError(f"shard {path} is missing; check the directory was copied completely")
        digest = sha256_of(path)
        if digest != record["sha256"]:
            raise DataError(
                f"shard {path}: sha256 {digest} differs from {record['sha256']} in "
                f"{MANIFEST}; the file was damaged or changed: {REMEDY}"
            )
        offsets = check_shard(directory, record, stored, selections, cutoff)
        with h5py.File(path, "r") as file, damage_named(path):
            _verify_contents(file, path, offsets, record, stored)
            if cutoff is not None:
                read_stored(file, 0, len(offsets) - 1, offsets, REMEDY)
    return int(manifest["n_structures"])


def _verify_contents(file, path: Path, offsets: np.ndarray, record: dict, stored: dict) -> None:
    def structure_of(row: int, per_atom: bool) -> int:
        return int(np.searchsorted(offsets, row, side="right") - 1) if per_atom else row

    elements: set[int] = set()
    for start, numbers in _rows(file["numbers"], ATOM_CHUNK):
        bad = np.flatnonzero((numbers < 1) | (numbers > 118))
        if len(bad):
            structure = structure_of(start + int(bad[0]), True)
            raise DataError(
                f"shard {path}, structure {structure}: atomic number {numbers[bad[0]]} is not "
                f"an element; {REMEDY}"
            )
        elements.update(int(z) for z in np.unique(numbers))
    if sorted(elements) != sorted(record["atomic_types"]):
        raise DataError(
            f"shard {path} holds elements {sorted(elements)}, the manifest says "
            f"{record['atomic_types']}; {REMEDY}"
        )
    arrays = {"positions": True, "cells": False}
    for name, target in stored.items():
        arrays[f"targets/{name}"] = bool(target["per_atom"])
        if "positions" in target["gradients"]:
            arrays[f"forces/{name}"] = True
        if "strain" in target["gradients"]:
            arrays[f"stress/{name}"] = False
    for name, per_atom in arrays.items():
        for start, rows in _rows(file[name], ATOM_CHUNK):
            flat = rows.reshape(len(rows), -1)
            bad = ~np.isfinite(flat).all(axis=1)
            if name.startswith("stress/"):  # all NaN: a structure without a stress
                bad &= ~np.isnan(flat).all(axis=1)
            if bad.any():
                structure = structure_of(start + int(np.argmax(bad)), per_atom)
                raise DataError(
                    f"shard {path}, structure {structure}: '{name}' holds NaN or inf "
                    f"values; fix the input and {REMEDY}"
                )
