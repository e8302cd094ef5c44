"""Reading structures from any ASE format into arrays, in eV and angstrom.

Units are converted on reading; a virial is turned into a stress
(``stress = -virial / volume``). A structure without a stress (not periodic, or no
value under the key) holds NaN in its place: it is left out of the stress term of
the loss and of the stress metrics, never compared with zero.

:func:`extract_frame` is the one place where an ``ase.Atoms`` becomes arrays (keys,
units, shape and NaN checks); reading a dataset (:mod:`.reading`) and ``hpctrain
convert`` both use it, and ``hpctrain eval`` picks its labels with :func:`first_frame`,
:func:`keys_of`, :func:`label_key` and :func:`lookup`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..architecture import DatasetInfo, TargetInfo
from ..errors import DataError
from ..options import DatasetOptions
from .structures import ENERGY_UNIT, LENGTH_UNIT

PARSE_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """How one target and its gradients are read from ASE frames.

    ``energy_factor`` converts the file's energies to eV. ``hints`` say, for messages,
    where the user chose each key: ``"key"``, ``"forces"`` and ``"stress"`` map to a
    phrase such as ``"at 'training_set.targets.energy.key'"`` or ``"set with --energy"``.
    """

    name: str
    key: str
    quantity: str = "energy"
    per_atom: bool = False
    forces_key: str | None = None
    stress_key: str | None = None  # energy/length^3, ASE sign
    virial_key: str | None = None  # energy; stored as stress = -virial / volume
    energy_factor: float = 1.0
    hints: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def gradients(self) -> list[str]:
        """Gradient names as :class:`TargetInfo` spells them."""
        strain = self.stress_key is not None or self.virial_key is not None
        return (["positions"] if self.forces_key else []) + (["strain"] if strain else [])


@dataclasses.dataclass(frozen=True)
class FrameSpec:
    """Targets to read from each frame, and the factor that turns lengths into angstrom."""

    targets: tuple[TargetSpec, ...]
    length_factor: float = 1.0

    def info(self, atomic_types: Sequence[int]) -> DatasetInfo:
        """What the converted data holds (units eV and angstrom)."""
        return DatasetInfo(
            length_unit=LENGTH_UNIT,
            atomic_types=sorted(int(z) for z in atomic_types),
            targets={
                t.name: TargetInfo(
                    quantity=t.quantity,
                    unit=ENERGY_UNIT,
                    per_atom=t.per_atom,
                    gradients=t.gradients,
                )
                for t in self.targets
            },
        )


@dataclasses.dataclass
class Frame:
    """One structure as arrays in eV and angstrom, checked to be finite."""

    numbers: np.ndarray  # [n_atoms] int32
    positions: np.ndarray  # [n_atoms, 3] float64
    cell: np.ndarray  # [3, 3], zero rows for non-periodic directions
    pbc: np.ndarray  # [3] bool
    targets: dict[str, np.ndarray]  # [1] or [n_atoms] per atom
    forces: dict[str, np.ndarray]  # [n_atoms, 3]
    stress: dict[str, np.ndarray]  # [3, 3]


def lookup(atoms, key: str):
    """The value stored under ``key`` in an ASE structure (info, arrays or calculator
    results), or None."""
    if key in atoms.info:
        return atoms.info[key]
    if key in atoms.arrays:
        return atoms.arrays[key]
    if atoms.calc is not None and key in atoms.calc.results:
        return atoms.calc.results[key]
    return None


def _full_3x3(value, what: str, where: str) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.shape == (6,):
        from ase.stress import voigt_6_to_full_3x3_stress

        return voigt_6_to_full_3x3_stress(array)
    if array.size == 9:
        return array.reshape(3, 3)
    raise DataError(f"{where}: {what} must have 6 (Voigt) or 9 values, got shape {array.shape}")


def unit_factor(unit: str, to: str, where: str) -> float:
    """The factor from ``unit`` to ``to``; ``where`` names the setting for messages."""
    from metatomic.torch import unit_conversion_factor

    try:
        return float(unit_conversion_factor(unit, to))
    except Exception as error:  # metatomic raises RuntimeError/ValueError on unknown units
        raise DataError(f"{where}: cannot convert unit {unit!r} to {to!r}: {error}") from None


def extract_frame(atoms, spec: FrameSpec, where: str) -> Frame:
    """The arrays and targets of one ``ase.Atoms``, converted to eV and angstrom.

    Every reader of ASE data goes through here (:func:`read_dataset` and
    ``hpctrain convert``), so that both see the same keys, units and checks.
    ``where`` names the structure in messages (file and index).
    """
    length = spec.length_factor
    n = len(atoms)
    if n == 0:
        raise DataError(f"{where} has no atoms")
    cell = np.asarray(atoms.cell.array, dtype=np.float64) * length
    pbc = np.asarray(atoms.pbc, dtype=bool)
    cell[~pbc] = 0.0
    frame = Frame(
        numbers=atoms.numbers.astype(np.int32),
        positions=np.asarray(atoms.positions, dtype=np.float64) * length,
        cell=cell,
        pbc=pbc,
        targets={},
        forces={},
        stress={},
    )
    unlabelled = []  # targets whose stress this structure lacks (not periodic, or no key)
    for target in spec.targets:
        name, factor, hints = target.name, target.energy_factor, target.hints
        value = lookup(atoms, target.key)
        if value is None:
            raise DataError(
                f"{where} has no '{target.key}' for target '{name}' ({hints.get('key', '')}); "
                f"available keys: {sorted(keys_of(atoms))}"
            )
        value = np.asarray(value, dtype=np.float64) * factor
        if value.size != (n if target.per_atom else 1):
            raise DataError(
                f"{where}: target '{name}' has shape {value.shape}, expected "
                f"{'one value per atom' if target.per_atom else 'one value'}"
            )
        frame.targets[name] = value.reshape(n if target.per_atom else 1)
        if target.forces_key:
            f = lookup(atoms, target.forces_key)
            if f is None:
                raise DataError(
                    f"{where} has no forces '{target.forces_key}' for target '{name}'; "
                    f"{hints.get('forces', '')}"
                )
            f = np.asarray(f, dtype=np.float64)
            if f.shape != (n, 3):
                raise DataError(f"{where}: forces have shape {f.shape}, expected ({n}, 3)")
            frame.forces[name] = f * factor / length
        skey = target.stress_key or target.virial_key
        if skey:
            raw = lookup(atoms, skey)
            if raw is None or not pbc.all():
                unlabelled.append(name)  # no stress here: left out of the loss
                continue
            s = _full_3x3(raw, skey, where)
            if target.virial_key:
                s = -s / abs(np.linalg.det(cell / length))
            frame.stress[name] = s * factor / length**3
    _check_finite(frame, where)
    for name in unlabelled:
        frame.stress[name] = np.full((3, 3), np.nan)
    return frame


def keys_of(atoms) -> set[str]:
    """Every key an ASE structure stores a value under."""
    keys = set(atoms.info) | set(atoms.arrays)
    if atoms.calc is not None:
        keys |= set(getattr(atoms.calc, "results", {}))
    return keys


def first_frame(path: Path, reader: str | None) -> Any:
    """The first structure of a file ASE reads, or a :class:`DataError` naming it."""
    import ase.io

    try:
        return ase.io.read(path, 0, format=reader, parallel=False)
    except Exception as error:
        raise DataError(
            f"cannot read {path} with ASE ({type(error).__name__}: {error}); give a file ASE "
            "reads (extxyz, ...; --format names its format) or a shard directory"
        ) from None


def label_key(atoms, requested: str | None, default: str, usable: bool = True) -> str | None:
    """The key of a label (forces, stress, virial) from a flag: ``none`` or None ->
    not read; ``auto`` -> ``default`` when ``atoms`` (a first structure) has it and the
    label is ``usable`` there (stress: a periodic structure); else ``requested``."""
    if requested in (None, "", "none"):
        return None
    if requested == "auto":
        return default if usable and lookup(atoms, default) is not None else None
    return requested


def _check_finite(frame: Frame, where: str) -> None:
    arrays = {
        "positions": frame.positions,
        "cell": frame.cell,
        **{f"target '{k}'": v for k, v in frame.targets.items()},
        **{f"forces of '{k}'": v for k, v in frame.forces.items()},
        **{f"stress of '{k}'": v for k, v in frame.stress.items()},
    }
    if math.isfinite(sum(float(array.sum()) for array in arrays.values())):
        return  # (a NaN or inf anywhere makes the sum non-finite)
    for what, array in arrays.items():
        if not np.isfinite(array).all():
            raise DataError(f"{where}: {what} holds NaN or inf values")


def iter_frames(
    path: str, spec: FrameSpec, reader: str | None = None, setting: str = ""
) -> Iterator[Frame]:
    """Stream the frames of one ASE-readable file through :func:`extract_frame`.

    ``setting`` says where the path was given (e.g. ``"at 'training_set.systems.
    read_from'"``), for messages. At most ``PARSE_CHUNK`` parsed structures are held
    at a time: ASE parses a chunk, then its frames are extracted (parsing runs
    markedly slower when it alternates with extraction frame by frame).
    """
    import ase.io

    at = f" ({setting})" if setting else ""
    count = 0  # structures parsed
    try:
        # parallel=False: under MPI, ASE would otherwise read on rank 0 and broadcast,
        # a collective that hangs when ranks read different files
        parsed = ase.io.iread(path, index=":", format=reader, parallel=False)
        while True:
            chunk = []
            for atoms in itertools.islice(parsed, PARSE_CHUNK):
                chunk.append(atoms)
                count += 1
            if not chunk:
                break
            first = count - len(chunk)
            for i, atoms in enumerate(chunk):
                yield extract_frame(atoms, spec, f"{path}, structure {first + i}")
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path} does not exist{at}") from None
    except Exception as error:
        after = f" after {count} structures" if count else ""
        raise DataError(f"cannot read {path}{at}{after}: {error}") from error


class FrameBuffer:
    """Frames collected into columnar arrays (per-atom data concatenated, by offsets)."""

    def __init__(self, spec: FrameSpec):
        self.spec = spec
        self.frames: list[Frame] = []
        self.n_atoms = 0

    def __len__(self) -> int:
        return len(self.frames)

    def append(self, frame: Frame) -> None:
        self.frames.append(frame)
        self.n_atoms += len(frame.numbers)

    def clear(self) -> None:
        self.frames.clear()
        self.n_atoms = 0

    def columns(self) -> dict[str, Any]:
        """The arrays of :class:`StructureDataset` (and of a shard), by argument name."""
        frames = self.frames
        counts = [len(f.numbers) for f in frames]
        names = [t.name for t in self.spec.targets]
        return {
            "numbers": np.concatenate([f.numbers for f in frames]),
            "positions": np.concatenate([f.positions for f in frames]),
            "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "cells": np.stack([f.cell for f in frames]),
            "pbcs": np.stack([f.pbc for f in frames]),
            "targets": {k: np.concatenate([f.targets[k] for f in frames]) for k in names},
            "forces": {
                k: np.concatenate([f.forces[k] for f in frames])
                for k in names
                if k in frames[0].forces
            },
            "stress": {
                k: np.stack([f.stress[k] for f in frames]) for k in names if k in frames[0].stress
            },
        }


def spec_from_options(options: DatasetOptions, path_in_options: str, source: str) -> FrameSpec:
    """The :class:`FrameSpec` that a dataset section of the options file asks for."""
    at = f"{path_in_options}.targets"
    length = unit_factor(
        options.systems.length_unit,
        LENGTH_UNIT,
        f"'{path_in_options}.systems.length_unit' in {source}",
    )
    targets = []
    for name, t in options.targets.items():
        targets.append(
            TargetSpec(
                name=name,
                key=t.key or name,
                quantity=t.quantity,
                per_atom=t.per_atom,
                forces_key=t.gradient_key("forces"),
                stress_key=t.gradient_key("stress"),
                virial_key=t.gradient_key("virial"),
                energy_factor=unit_factor(t.unit, ENERGY_UNIT, f"'{at}.{name}.unit' in {source}"),
                hints={
                    "key": f"at '{at}.{name}.key'",
                    "forces": f"set '{at}.{name}.forces: false' to learn energies only, "
                    "or name the right key",
                    "stress": f"remove '{at}.{name}.stress/virial' or name the key",
                },
            )
        )
    return FrameSpec(targets=tuple(targets), length_factor=length)
