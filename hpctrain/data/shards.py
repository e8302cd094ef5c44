"""HDF5 shard directories: the format, its writer, its checks, and a lazy reader.

A shard directory holds ``manifest.json`` and files ``shard-FFFF-NNNNN.h5`` (input
file ``FFFF``, ``NNNNN``-th shard of that input). Each shard stores its structures
as columnar ragged arrays: per-atom data concatenated, cut into structures by
``offsets``. A shard may also hold its structures' neighbour pairs
(:mod:`hpctrain.data.pairs`). Values are in eV and angstrom (stress in eV/angstrom^3, ASE's sign).
``docs/shards.rst`` specifies the format for other writers.

:class:`ShardDataset` opens files lazily in each process (after a fork too) and
reads blocks of consecutive structures, so that a sampler with read locality pays
one HDF5 read per block, not per structure.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..architecture import DatasetInfo, TargetInfo
from ..errors import DataError
from .pairs import GROUP, check_stored, pair_cutoff_of, read_stored
from .sampler import BLOCK, WINDOW
from .structures import (
    ENERGY_UNIT,
    LENGTH_UNIT,
    AtomisticDataset,
    Columns,
    Structure,
    StructureDataset,
    cell_volumes,
    checked_indices,
    stress_known,
)

FORMAT = "hpctrain-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ATOM_CHUNK = 65536  # rows per HDF5 chunk of per-atom datasets
STRUCTURE_CHUNK = 4096  # rows per HDF5 chunk of per-structure datasets
CHUNK_CACHE_BYTES = 4 * 2**20  # per dataset: one chunk of positions (1.5 MiB) fits
REMEDY = "re-run hpctrain convert, or copy the directory again if it was copied"


def shard_name(file_index: int, shard_index: int) -> str:
    """``shard-FFFF-NNNNN.h5``: independent of how many ranks converted."""
    return f"shard-{file_index:04d}-{shard_index:05d}.h5"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def _compression_args(compression: str | None) -> dict[str, Any]:
    """h5py arguments for ``none``, ``lzf``, ``gzip`` or ``gzip:LEVEL``."""
    if compression in (None, "none"):
        return {}
    if compression == "lzf":
        return {"compression": "lzf"}
    name, _, level = compression.partition(":")
    if name == "gzip" and (not level or (level.isdigit() and 0 <= int(level) <= 9)):
        return {"compression": "gzip", "compression_opts": int(level or 4)}
    raise DataError(f"unknown compression {compression!r}; use none, lzf, gzip or gzip:0-9")


def write_shard(path: Path, columns: dict[str, Any], compression: str | None = None) -> dict:
    """Write one shard from columnar arrays (as :meth:`FrameBuffer.columns` gives them).

    The file is written under a temporary name and renamed when complete. Datasets
    are created in a fixed order without timestamps, so the same data always gives
    the same bytes. Returns the shard's manifest record.
    """
    import h5py

    n = len(columns["offsets"]) - 1
    n_atoms = int(columns["offsets"][-1])
    filters = {"fletcher32": True, "track_times": False, **_compression_args(compression)}

    def put(file: h5py.File, name: str, array: np.ndarray, dtype: str, per_atom: bool) -> None:
        rows = min(len(array), ATOM_CHUNK if per_atom else STRUCTURE_CHUNK)
        chunks = (rows, *array.shape[1:])
        file.create_dataset(name, data=np.asarray(array, dtype=dtype), chunks=chunks, **filters)

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as file:
        file.attrs["format"] = FORMAT
        file.attrs["format_version"] = np.int64(FORMAT_VERSION)
        file.attrs["n_structures"] = np.int64(n)
        file.attrs["n_atoms"] = np.int64(n_atoms)
        put(file, "offsets", columns["offsets"], "int64", per_atom=False)
        put(file, "numbers", columns["numbers"], "int32", per_atom=True)
        put(file, "positions", columns["positions"], "float64", per_atom=True)
        put(file, "cells", columns["cells"], "float64", per_atom=False)
        put(file, "pbc", columns["pbcs"], "bool", per_atom=False)
        for name, values in sorted(columns["targets"].items()):
            put(file, f"targets/{name}", values, "float64", per_atom=len(values) == n_atoms)
        for name, values in sorted(columns["forces"].items()):
            put(file, f"forces/{name}", values, "float64", per_atom=True)
        for name, values in sorted(columns["stress"].items()):
            put(file, f"stress/{name}", values, "float64", per_atom=False)
        if GROUP in columns:  # neighbour pairs (pairs.shard_columns, with their cutoff)
            stored = columns["neighbors"]
            file.create_group(GROUP).attrs["cutoff"] = np.float64(stored["cutoff"])
            for name in ("offsets", "pairs", "shifts"):
                put(file, f"{GROUP}/{name}", stored[name], stored[name].dtype, name != "offsets")
    os.replace(tmp, path)
    return {
        "file": path.name,
        "n_structures": n,
        "n_atoms": n_atoms,
        "atomic_types": [int(z) for z in np.unique(columns["numbers"])],
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),
    }


_MANIFEST_FIELDS = ("length_unit", "targets", "n_structures", "n_atoms", "shards")
_TARGET_FIELDS = ("quantity", "per_atom", "gradients")
_SHARD_FIELDS = ("file", "n_structures", "n_atoms", "atomic_types", "bytes", "sha256")


def read_manifest(directory: Path) -> dict:
    """The manifest of a shard directory, with its format, version and fields checked."""
    if not Path(directory).is_dir():
        raise DataError(f"{directory} is not a directory (of HDF5 shards)")
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(
            f"{directory} holds no {MANIFEST}; it is not a shard directory, or its "
            "conversion did not finish: run hpctrain convert (again)"
        ) from None
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not valid JSON ({error}); {REMEDY}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{path} does not describe '{FORMAT}' (format field); {REMEDY}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {manifest.get('format_version')!r}; this hpctrain "
            f"reads version {FORMAT_VERSION}: re-run hpctrain convert with this version"
        )
    missing = [key for key in _MANIFEST_FIELDS if key not in manifest]
    for name, target in manifest.get("targets", {}).items():
        missing += [f"targets.{name}.{key}" for key in _TARGET_FIELDS if key not in target]
    for i, shard in enumerate(manifest.get("shards", [])):
        missing += [f"shards[{i}].{key}" for key in _SHARD_FIELDS if key not in shard]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; {REMEDY}")
    if manifest["length_unit"] != LENGTH_UNIT:
        raise DataError(f"{path}: length_unit must be '{LENGTH_UNIT}'; {REMEDY}")
    shards = manifest["shards"]
    for key in ("n_structures", "n_atoms"):
        total = sum(int(s[key]) for s in shards)
        if total != manifest[key]:
            raise DataError(
                f"{path}: its shards hold {total} {key[2:]} in all, but {key} is "
                f"{manifest[key]}; {REMEDY}"
            )
    if not shards:
        raise DataError(f"{path} lists no shards; {REMEDY}")
    return manifest


@dataclasses.dataclass(frozen=True)
class Selection:
    """A target of the manifest to read (``stored``) and which gradients to read with it."""

    stored: str
    forces: bool = False
    stress: bool = False


def check_shard(
    directory: Path,
    record: dict,
    stored: dict[str, dict],
    selections: dict[str, Selection],
    pair_cutoff: float | None = None,
) -> np.ndarray:
    """Cheap checks of one shard against its manifest record; returns its ``offsets``.

    ``stored`` is the manifest's ``targets``; ``selections`` say which are read;
    ``pair_cutoff``: the cutoff of the neighbour pairs it holds, if any.

    Catches missing, truncated and mismatched files, and offsets that do not cut the
    atoms into non-empty structures, without reading per-atom data.
    """
    import h5py

    path = Path(directory) / record["file"]
    if not path.is_file():
        raise DataError(f"shard {path} is missing; check the directory was copied completely")
    size = path.stat().st_size
    if size != record["bytes"]:
        raise DataError(
            f"shard {path} has {size} bytes, the manifest says {record['bytes']}: it is "
            f"truncated or was changed; {REMEDY}"
        )
    n, n_atoms = int(record["n_structures"]), int(record["n_atoms"])
    try:
        file = h5py.File(path, "r")
    except OSError as error:
        raise DataError(f"shard {path} is not a readable HDF5 file ({error}); {REMEDY}") from None
    with file, damage_named(path):
        offsets = _check_layout(file, path, n, n_atoms, stored, selections)
        if pair_cutoff is not None:
            check_stored(file, path, n, pair_cutoff, REMEDY)
    check_offsets(offsets, n_atoms, str(path))
    return offsets


@contextlib.contextmanager
def damage_named(path: Path) -> Iterator[None]:
    """Within: an HDF5 library error (a shard whose structure is damaged, not only its
    values) becomes a :class:`DataError` naming the shard."""
    try:
        yield
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as error:
        raise DataError(
            f"shard {path} is damaged: its HDF5 structure cannot be read ({error}); {REMEDY}"
        ) from None


def _check_layout(
    file, path: Path, n: int, n_atoms: int, stored: dict, selections: dict[str, Selection]
) -> np.ndarray:
    """The attributes and dataset shapes of an open shard; returns its ``offsets``."""
    import h5py

    attrs = {k: file.attrs.get(k) for k in ("format", "n_structures", "n_atoms")}
    if attrs["format"] != FORMAT or file.attrs.get("format_version") != FORMAT_VERSION:
        raise DataError(f"shard {path} is not a version {FORMAT_VERSION} '{FORMAT}' file")
    if (attrs["n_structures"], attrs["n_atoms"]) != (n, n_atoms):
        raise DataError(
            f"shard {path} holds {attrs['n_structures']} structures and "
            f"{attrs['n_atoms']} atoms, the manifest says {n} and {n_atoms}; {REMEDY}"
        )
    shapes = {
        "offsets": (n + 1,),
        "numbers": (n_atoms,),
        "positions": (n_atoms, 3),
        "cells": (n, 3, 3),
        "pbc": (n, 3),
    }
    for selection in selections.values():
        name = selection.stored
        shapes[f"targets/{name}"] = (n_atoms,) if stored[name]["per_atom"] else (n,)
        if selection.forces:
            shapes[f"forces/{name}"] = (n_atoms, 3)
        if selection.stress:
            shapes[f"stress/{name}"] = (n, 3, 3)
    for name, shape in shapes.items():
        dataset = file.get(name)
        if not isinstance(dataset, h5py.Dataset):
            raise DataError(f"shard {path} has no dataset '{name}'; {REMEDY}")
        if dataset.shape != shape:
            raise DataError(
                f"shard {path}: dataset '{name}' has shape {dataset.shape}, expected "
                f"{shape}; {REMEDY}"
            )
    return file["offsets"][:]


def check_offsets(offsets: np.ndarray, n_atoms: int, where: str) -> None:
    """``offsets`` start at 0, grow by at least one atom per structure, end at ``n_atoms``."""
    if offsets[0] != 0:
        raise DataError(f"shard {where}: offsets start at {offsets[0]}, not 0; {REMEDY}")
    bad = np.flatnonzero(np.diff(offsets) < 1)
    if len(bad):
        raise DataError(
            f"shard {where}, structure {bad[0]}: offsets go from {offsets[bad[0]]} to "
            f"{offsets[bad[0] + 1]} (every structure needs at least one atom); {REMEDY}"
        )
    if offsets[-1] != n_atoms:
        raise DataError(
            f"shard {where}: offsets end at {offsets[-1]} but the shard holds {n_atoms} "
            f"atoms; {REMEDY}"
        )


def all_selections(manifest: dict) -> dict[str, Selection]:
    """Every target of a manifest under its own name, with every gradient it stores."""
    return {
        name: Selection(name, "positions" in t["gradients"], "strain" in t["gradients"])
        for name, t in manifest["targets"].items()
    }


class OpenShard:
    """An open shard file whose datasets are looked up once: finding a dataset by
    name costs h5py several times what reading a block of it does."""

    def __init__(self, file: Any):
        self.file = file
        self.filename = file.filename
        self._found: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        found = self._found.get(name)
        if found is None:
            found = self._found[name] = self.file[name]
        return found

    def close(self) -> None:
        self.file.close()


class ShardDataset(AtomisticDataset):
    """Structures of a shard directory, read lazily in blocks.

    The constructor reads the manifest and checks every shard (cheaply: sizes,
    attributes, shapes, offsets), then closes the files. HDF5 files are opened on
    the first ``__getitem__`` of each process, and again after a fork.

    Blocks are those of the training sampler: ``block_size`` consecutive structures
    of the whole directory (index // block_size), a block that crosses from one shard
    into the next read as two pieces. The defaults hold the pieces of the
    ``sampler.WINDOW + 1`` blocks that the sampler's shuffle visits at a time, so
    each structure of an epoch is read once.

    :param targets: output target name -> what to read; default: everything stored
    :param block_size: consecutive structures read at once
    :param cache_blocks: block pieces kept in memory (least recently used dropped)
    :param max_open_files: shard files kept open at once per process
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        targets: dict[str, Selection] | None = None,
        dtype: torch.dtype = torch.float64,
        name: str | None = None,
        block_size: int = BLOCK,
        cache_blocks: int = 2 * (WINDOW + 1),
        max_open_files: int = WINDOW + 2,
    ):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory)
        self.selections = all_selections(self.manifest) if targets is None else dict(targets)
        stored = self.manifest["targets"]
        for s in self.selections.values():
            gradients = stored.get(s.stored, {}).get("gradients")
            if gradients is None:
                raise DataError(
                    f"{self.directory / MANIFEST} has no target '{s.stored}'; it holds "
                    f"{', '.join(stored)}"
                )
            for wanted, gradient in ((s.forces, "positions"), (s.stress, "strain")):
                if wanted and gradient not in gradients:
                    raise DataError(
                        f"{self.directory / MANIFEST} stores no '{gradient}' gradient "
                        f"(forces or stress) of target '{s.stored}'"
                    )
        records = self.manifest["shards"]
        self.pair_cutoff = pair_cutoff_of(self.manifest, self.directory / MANIFEST, REMEDY)
        self._offsets = [
            check_shard(self.directory, r, stored, self.selections, self.pair_cutoff)
            for r in records
        ]
        self._starts = np.cumsum([0] + [int(r["n_structures"]) for r in records])
        self.info = DatasetInfo(
            length_unit=LENGTH_UNIT,
            atomic_types=sorted({int(z) for r in records for z in r["atomic_types"]}),
            targets={
                out: TargetInfo(
                    quantity=stored[s.stored]["quantity"],
                    unit=ENERGY_UNIT,
                    per_atom=bool(stored[s.stored]["per_atom"]),
                    gradients=(["positions"] if s.forces else [])
                    + (["strain"] if s.stress else []),
                )
                for out, s in self.selections.items()
            },
        )
        self.name = name or str(self.directory)
        self.dtype = dtype
        self.block_size = block_size
        self.cache_blocks = cache_blocks
        self.max_open_files = max_open_files
        self._n_atoms: np.ndarray | None = None
        self._volumes: np.ndarray | None = None
        self._has_stress: np.ndarray | None = None
        self._forget_files()

    def _forget_files(self) -> None:
        self._pid: int | None = None
        self._files: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self._blocks: collections.OrderedDict[tuple[int, int], StructureDataset] = (
            collections.OrderedDict()
        )

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _files=collections.OrderedDict(), _blocks=collections.OrderedDict())
        return state

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def n_atoms(self) -> np.ndarray:
        if self._n_atoms is None:
            self._n_atoms = np.concatenate([np.diff(o) for o in self._offsets])
        return self._n_atoms

    @property
    def volumes(self) -> np.ndarray:
        """Read from every shard's cells on first use (9 + 3 numbers per structure)."""
        if self._volumes is None:
            self._volumes = self._per_shard(
                "cells", lambda file, n: cell_volumes(file["cells"][:], file["pbc"][:])
            )
        return self._volumes

    @property
    def has_stress(self) -> np.ndarray:
        """Read from every shard's stress on first use (9 numbers per structure)."""
        if self._has_stress is None:
            stressed = [(out, s.stored) for out, s in self.selections.items() if s.stress]

            def known(file: Any, n: int) -> np.ndarray:
                return stress_known({o: file[f"stress/{k}"][:] for o, k in stressed}, n)

            self._has_stress = self._per_shard("stress", known)
        return self._has_stress

    def _per_shard(self, what: str, read: Callable[[Any, int], np.ndarray]) -> np.ndarray:
        """``read(file, n_structures)`` of every shard, concatenated; a shard that cannot
        be read is named with ``what`` it held."""
        parts = []
        for shard in range(len(self._offsets)):
            file = self._file(shard)
            try:
                parts.append(read(file, int(self._starts[shard + 1] - self._starts[shard])))
            except OSError as error:
                raise DataError(
                    f"shard {file.filename}: cannot read its {what} ({error}); {REMEDY}"
                ) from None
        return np.concatenate(parts)

    def __getitem__(self, index: int) -> Structure:
        if not 0 <= index < len(self):
            raise IndexError(f"structure {index} of a dataset of {len(self)}")
        shard = int(self._starts.searchsorted(index, side="right")) - 1
        block = index // self.block_size
        piece = self._piece(shard, block)
        return piece[index - max(block * self.block_size, int(self._starts[shard]))]

    def columns(self, indices: np.ndarray) -> Columns:
        """The structures at ``indices`` as columns, picked from their blocks' pieces."""
        indices = checked_indices(indices, len(self))
        shards = (self._starts.searchsorted(indices, side="right") - 1).tolist()
        pieces: dict[tuple[int, int], Columns] = {}  # (each looked up once)
        sources, rows = [], []
        for index, shard in zip(indices.tolist(), shards):
            block = index // self.block_size
            piece = pieces.get((shard, block))
            if piece is None:
                piece = pieces[shard, block] = self._piece(shard, block).as_columns
            sources.append(piece)
            rows.append(index - max(block * self.block_size, int(self._starts[shard])))
        return Columns.pick(sources, rows)

    def close(self) -> None:
        """Close the files this process opened (they reopen on the next read)."""
        for file in self._files.values():
            file.close()
        self._files.clear()

    def _file(self, shard: int) -> Any:
        import h5py

        if self._pid != os.getpid():  # first use, or a forked child: never share handles
            self._forget_files()
            self._pid = os.getpid()
        file = self._files.get(shard)
        if file is None:
            path = self.directory / self.manifest["shards"][shard]["file"]
            try:
                file = OpenShard(h5py.File(path, "r", rdcc_nbytes=CHUNK_CACHE_BYTES))
            except OSError as error:
                raise DataError(f"cannot open shard {path} ({error}); {REMEDY}") from None
            self._files[shard] = file
            while len(self._files) > self.max_open_files:
                self._files.popitem(last=False)[1].close()
        self._files.move_to_end(shard)
        return file

    def _piece(self, shard: int, block: int) -> StructureDataset:
        """The structures of ``block`` (of the whole directory) that ``shard`` holds."""
        key = (shard, block)
        if self._pid == os.getpid() and key in self._blocks:
            self._blocks.move_to_end(key)
            return self._blocks[key]
        file = self._file(shard)
        offsets = self._offsets[shard]
        start = int(self._starts[shard])
        lo = max(block * self.block_size - start, 0)
        hi = min((block + 1) * self.block_size - start, len(offsets) - 1)
        a, b = int(offsets[lo]), int(offsets[hi])
        try:
            targets, forces, stress = {}, {}, {}
            for out, s in self.selections.items():
                rows = slice(a, b) if self.info.targets[out].per_atom else slice(lo, hi)
                targets[out] = file[f"targets/{s.stored}"][rows]
                if s.forces:
                    forces[out] = file[f"forces/{s.stored}"][a:b]
                if s.stress:
                    stress[out] = file[f"stress/{s.stored}"][lo:hi]
            data = StructureDataset(
                numbers=file["numbers"][a:b],
                positions=file["positions"][a:b],
                offsets=offsets[lo : hi + 1] - a,
                cells=file["cells"][lo:hi],
                pbcs=file["pbc"][lo:hi],
                targets=targets,
                forces=forces,
                stress=stress,
                info=self.info,
                name=self.name,
                dtype=self.dtype,
                neighbors=read_stored(file, lo, hi, offsets[lo : hi + 1] - a, REMEDY)
                if self.pair_cutoff is not None
                else None,
            )
        except OSError as error:
            raise DataError(
                f"shard {file.filename}: cannot read structures {lo}-{hi - 1} ({error}); "
                f"run 'hpctrain inspect {self.directory} --verify' and {REMEDY}"
            ) from None
        self._blocks[key] = data
        while len(self._blocks) > self.cache_blocks:
            self._blocks.popitem(last=False)
        return data
