"""Structures and targets held as columnar arrays, read from any ASE format.

Units are converted on reading to those hpctrain trains in: positions in angstrom,
energies in eV, forces in eV/angstrom, stress in eV/angstrom^3 (ASE's sign).
A virial is turned into a stress (``stress = -virial / volume``).

:func:`extract_frame` is the one place where an ``ase.Atoms`` becomes arrays (keys,
units, shape and NaN checks); :func:`read_dataset` and ``hpctrain convert`` both use
it. :func:`read_dataset` also opens HDF5 shard directories (:mod:`.shards`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..architecture import DatasetInfo, TargetInfo
from ..errors import DataError
from ..options import DatasetOptions

LENGTH_UNIT = "angstrom"
ENERGY_UNIT = "eV"
PARSE_CHUNK = 256


@dataclasses.dataclass
class Structure:
    """One structure and its targets, as tensors.

    ``targets`` maps a target name to its value (shape ``[1]``, or ``[n_atoms]``
    per atom); ``forces`` and ``stress`` map target names to their gradients.
    """

    numbers: torch.Tensor  # [n_atoms] int32
    positions: torch.Tensor  # [n_atoms, 3]
    cell: torch.Tensor  # [3, 3], zero for non-periodic directions
    pbc: torch.Tensor  # [3] bool
    targets: dict[str, torch.Tensor]
    forces: dict[str, torch.Tensor]
    stress: dict[str, torch.Tensor]


class AtomisticDataset(torch.utils.data.Dataset):
    """A map-style dataset of structures: ``len``, ``dataset[i] -> Structure``.

    Every dataset hpctrain hands to ``Trainer.train`` is one of these. Besides the
    structures it knows ``info`` (types, targets and units), ``name`` (its source,
    for messages), ``dtype`` (of the tensors it returns), and, without reading the structures,
    ``n_atoms`` (atoms of every structure) and ``volumes`` (their cell volumes).
    """

    info: DatasetInfo
    name: str
    dtype: torch.dtype

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> Structure:
        raise NotImplementedError

    @property
    def n_atoms(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def volumes(self) -> np.ndarray:
        """Cell volume of every structure (in the dataset's length unit, cubed); NaN
        where a structure is not periodic in all three directions."""
        raise NotImplementedError

    def subset(self, indices: Sequence[int], name: str | None = None) -> Subset:
        """The structures at ``indices``, in that order, read lazily from this one."""
        return Subset(self, indices, name)


class Subset(AtomisticDataset):
    """Some structures of another dataset (a split), read lazily through it."""

    def __init__(self, dataset: AtomisticDataset, indices: Sequence[int], name: str | None):
        self.dataset = dataset
        self.indices = np.asarray(indices, dtype=np.int64)
        self.info = dataset.info
        self.name = name or dataset.name
        self.dtype = dataset.dtype

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> Structure:
        if not 0 <= index < len(self.indices):
            raise IndexError(f"structure {index} of a dataset of {len(self)}")
        return self.dataset[int(self.indices[index])]

    @property
    def n_atoms(self) -> np.ndarray:
        return self.dataset.n_atoms[self.indices]

    @property
    def volumes(self) -> np.ndarray:
        return self.dataset.volumes[self.indices]


class StructureDataset(AtomisticDataset):
    """Structures held in memory as columnar arrays (ragged per-atom data by offsets)."""

    def __init__(
        self,
        numbers: np.ndarray,
        positions: np.ndarray,
        offsets: np.ndarray,
        cells: np.ndarray,
        pbcs: np.ndarray,
        targets: dict[str, np.ndarray],
        forces: dict[str, np.ndarray],
        stress: dict[str, np.ndarray],
        info: DatasetInfo,
        name: str,
        dtype: torch.dtype = torch.float64,
    ):
        self.numbers = numbers
        self.positions = positions
        self.offsets = offsets
        self.cells = cells
        self.pbcs = pbcs
        self.targets = targets
        self.forces = forces
        self.stress = stress
        self.info = info
        self.name = name
        self.dtype = dtype

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_atoms(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def volumes(self) -> np.ndarray:
        return cell_volumes(self.cells, self.pbcs)

    def __getitem__(self, index: int) -> Structure:
        if not 0 <= index < len(self):
            raise IndexError(f"structure {index} of a dataset of {len(self)}")
        start, stop = self.offsets[index], self.offsets[index + 1]
        dtype = self.dtype

        def tensor(array: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(array)).to(dtype)

        targets = {}
        for name, values in self.targets.items():
            per_atom = self.info.targets[name].per_atom
            targets[name] = tensor(values[start:stop] if per_atom else values[index : index + 1])
        return Structure(
            numbers=torch.from_numpy(self.numbers[start:stop].astype(np.int32)),
            positions=tensor(self.positions[start:stop]),
            cell=tensor(self.cells[index]),
            pbc=torch.from_numpy(self.pbcs[index].copy()),
            targets=targets,
            forces={k: tensor(v[start:stop]) for k, v in self.forces.items()},
            stress={k: tensor(v[index]) for k, v in self.stress.items()},
        )


def cell_volumes(cells: np.ndarray, pbcs: np.ndarray) -> np.ndarray:
    """``|det(cell)|`` of ``[n, 3, 3]`` cells; NaN where ``[n, 3]`` pbc is not all true."""
    volumes = np.abs(np.linalg.det(np.asarray(cells, dtype=np.float64).reshape(-1, 3, 3)))
    return np.where(np.asarray(pbcs).reshape(-1, 3).all(axis=1), volumes, np.nan)


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
            if raw is None:
                raise DataError(
                    f"{where} has no '{skey}' for target '{name}'; {hints.get('stress', '')}"
                )
            if not pbc.all():
                raise DataError(
                    f"{where}: stress/virial needs a periodic structure (pbc = T T T); "
                    "this one is not"
                )
            s = _full_3x3(raw, skey, where)
            if target.virial_key:
                s = -s / abs(np.linalg.det(cell / length))
            frame.stress[name] = s * factor / length**3
    _check_finite(frame, where)
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
        from .shards import open_shards

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
    info = spec.info(np.unique(columns["numbers"]))
    return StructureDataset(**columns, info=info, name=path, dtype=dtype)
