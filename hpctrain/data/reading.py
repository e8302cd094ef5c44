"""Opening the dataset an options entry names: a shard directory or a file ASE reads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..options import DatasetOptions, TargetOptions
from .ase_reader import FrameBuffer, iter_frames, spec_from_options, unit_factor
from .shards import MANIFEST, Selection, ShardDataset, read_manifest
from .structures import ENERGY_UNIT, LENGTH_UNIT, AtomisticDataset, StructureDataset


def read_dataset(
    options: DatasetOptions,
    path_in_options: str,
    source: str,
    dtype: torch.dtype = torch.float64,
) -> AtomisticDataset:
    """The dataset ``options.systems.read_from`` names, with the targets the options ask for.

    A directory holding ``manifest.json`` is a shard directory (see
    :mod:`hpctrain.data.shards`), read lazily; any other path is a file that ASE reads,
    loaded into memory and converted to eV and angstrom.

    :param path_in_options: where ``options`` sits in the options file, for messages
    :param source: the options file, for messages
    """
    path = options.systems.read_from
    if Path(path).is_dir():
        return open_shards(options, path_in_options, source, dtype)
    spec = spec_from_options(options, path_in_options, source)
    buffer = FrameBuffer(spec)
    for frame in iter_frames(
        path, spec, options.systems.reader, f"at '{path_in_options}.systems.read_from'"
    ):
        buffer.append(frame)
    if not buffer:
        raise DataError(f"{path} holds no structures (at '{path_in_options}.systems.read_from')")
    columns = buffer.columns()
    for target in spec.targets:
        stress = columns["stress"].get(target.name)
        if stress is not None and not np.isfinite(stress).any():
            key = target.stress_key or target.virial_key
            periodic = int(columns["pbcs"].all(axis=1).sum())
            raise DataError(
                f"{path}: no structure has a stress for target '{target.name}' (key "
                f"'{key}'; {periodic} of {len(buffer)} structures are periodic); "
                f"{target.hints.get('stress', '')}"
            )
    info = spec.info(np.unique(columns["numbers"]))
    return StructureDataset(**columns, info=info, name=path, dtype=dtype)


def _same_unit(unit: str, candidates: Sequence[str], where: str) -> bool:
    return any(abs(unit_factor(unit, c, where) - 1.0) < 1e-12 for c in candidates)


def open_shards(
    options: DatasetOptions, path_in_options: str, source: str, dtype: torch.dtype
) -> ShardDataset:
    """The shard directory at ``options.systems.read_from``, with the options' targets.

    Each target of the options must be stored (under its name, or its ``key``), with
    the gradients the options ask for. Units in the options describe the original
    data: they must be eV/angstrom or the units the shards were converted from.
    """
    directory = Path(options.systems.read_from)
    manifest = read_manifest(directory)
    where = f"{directory / MANIFEST}"
    stored = manifest["targets"]
    converted_from = manifest.get("converted_from", {})
    at = f"'{path_in_options}.systems.length_unit' in {source}"
    if not _same_unit(
        options.systems.length_unit, [LENGTH_UNIT, converted_from.get("length_unit", "")], at
    ):
        raise DataError(
            f"{at} is {options.systems.length_unit!r}, but {where} holds lengths in "
            f"{LENGTH_UNIT} converted from {converted_from.get('length_unit')!r}; drop the "
            "setting or make it match"
        )
    selections = {
        name: _select(
            name, target, stored, converted_from, f"{path_in_options}.targets.{name}", source, where
        )
        for name, target in options.targets.items()
    }
    return ShardDataset(directory, selections, dtype=dtype, name=str(directory))


def _select(
    name: str,
    target: TargetOptions,
    stored: dict[str, Any],
    converted_from: dict[str, str],
    key: str,
    source: str,
    where: str,
) -> Selection:
    """The stored target that the options' target ``name`` (at ``key``) reads, checked
    for its quantity, unit and gradients."""
    candidates = [c for c in (target.key, name) if c in stored]
    if not candidates:
        raise DataError(
            f"'{key}' in {source}: {where} has no target '{target.key or name}'; it "
            f"holds {', '.join(sorted(stored))} (re-run hpctrain convert with --target "
            "to add one)"
        )
    chosen = candidates[0]
    info = stored[chosen]
    read_from = info.get("keys", {}).get("value")
    if target.key not in (None, chosen, read_from):
        raise DataError(
            f"'{key}.key' in {source} is '{target.key}', but {where} has no target of "
            f"that name, and its target '{chosen}' was read from key '{read_from}'; "
            "name a stored target, or re-run hpctrain convert with that key"
        )
    if info["quantity"] != target.quantity or bool(info["per_atom"]) != target.per_atom:
        raise DataError(
            f"'{key}' in {source} asks for a {target.quantity} target "
            f"{'per atom' if target.per_atom else 'per structure'}, but '{chosen}' in "
            f"{where} is a {info['quantity']} "
            f"{'per atom' if info['per_atom'] else 'per structure'}"
        )
    unit_at = f"'{key}.unit' in {source}"
    if not _same_unit(target.unit, [ENERGY_UNIT, converted_from.get("energy_unit", "")], unit_at):
        raise DataError(
            f"{unit_at} is {target.unit!r}, but {where} holds energies in {ENERGY_UNIT} "
            f"converted from {converted_from.get('energy_unit')!r}; make them match"
        )
    wants = {
        "forces": (target.gradient_key("forces"), "positions", "--forces KEY"),
        "stress": (
            target.gradient_key("stress") or target.gradient_key("virial"),
            "strain",
            "--stress KEY or --virial KEY",
        ),
    }
    for gradient, (asked, stored_as, flag) in wants.items():
        if asked and stored_as not in info["gradients"]:
            option = "stress/virial" if gradient == "stress" else gradient
            raise DataError(
                f"'{key}.{option}' in {source} asks for {gradient}, but {where} holds "
                f"none for target '{chosen}'; set it to false, or re-run hpctrain "
                f"convert with {flag}"
            )
    return Selection(chosen, bool(wants["forces"][0]), bool(wants["stress"][0]))
