"""Neighbour pairs of structures: searched once and kept in shards, or searched when
a batch is made, and turned into the pairs of a batch (:func:`batch_pairs`).

Every structure's pairs are a half list within a cutoff (each pair once, as vesin
gives it): ``hpctrain convert --neighbors CUTOFF`` stores them in the shards, so
that the loader reads them with the positions instead of searching. A batch's pairs
for a model's request come from those: the pairs within the request's cutoff
(distances in float64, as the search computes them) when it is shorter than the
stored one, and both directions of each pair for a full list. A structure whose
stored cutoff is shorter than the request, or without stored pairs, is searched.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

GROUP = "neighbors"  # the shard's HDF5 group of stored pairs


@dataclasses.dataclass
class HalfList:
    """The pairs of one structure within ``cutoff``: ``pairs[p] = (i, j)`` (indices of
    its atoms) with cell shift ``shifts[p]``, each pair once."""

    cutoff: float
    pairs: np.ndarray  # [n_pairs, 2] integers
    shifts: np.ndarray  # [n_pairs, 3] integers


def search(positions: np.ndarray, cell: np.ndarray, pbc: np.ndarray, cutoff: float) -> HalfList:
    """The half list of one structure (vesin, one thread, in float64)."""
    from vesin import NeighborList

    pbc = np.asarray(pbc, dtype=bool)
    cell = np.asarray(cell, dtype=np.float64) if pbc.any() else np.zeros((3, 3))
    i, j, shifts = NeighborList(cutoff=cutoff, full_list=False, n_threads=1).compute(
        np.asarray(positions, dtype=np.float64), cell, pbc, quantities="ijS", copy=True
    )
    pairs = np.stack([i, j], axis=1).astype(np.int64)
    return HalfList(cutoff, pairs, np.asarray(shifts, dtype=np.int64).reshape(-1, 3))


def narrowest(array: np.ndarray) -> np.ndarray:
    """``array`` in the narrowest signed integer type that holds its values."""
    for dtype in (np.int8, np.int16, np.int32):
        info = np.iinfo(dtype)
        if len(array) == 0 or (array.min() >= info.min and array.max() <= info.max):
            return array.astype(dtype)
    return array.astype(np.int64)


def shard_columns(columns: dict[str, Any], cutoff: float) -> dict[str, np.ndarray]:
    """The stored pairs of a shard's structures (columns as ``write_shard`` takes
    them): ``offsets`` ``[n + 1]`` into ``pairs`` ``[P, 2]`` and ``shifts`` ``[P, 3]``."""
    offsets = columns["offsets"]
    lists = [
        search(columns["positions"][a:b], cell, pbc, cutoff)
        for a, b, cell, pbc in zip(offsets[:-1], offsets[1:], columns["cells"], columns["pbcs"])
    ]
    counts = [len(h.pairs) for h in lists]
    return {
        "offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        "pairs": narrowest(np.concatenate([h.pairs for h in lists]).reshape(-1, 2)),
        "shifts": narrowest(np.concatenate([h.shifts for h in lists]).reshape(-1, 3)),
    }


def check_stored(file: Any, path: Path, n: int, cutoff: float, remedy: str) -> None:
    """The stored pairs of an open shard have the manifest's cutoff and fitting shapes."""
    group = file.get(GROUP)
    if group is None or float(group.attrs.get("cutoff", -1.0)) != cutoff:
        raise DataError(
            f"shard {path}: the manifest lists neighbour pairs within {cutoff} A, but the "
            f"shard has {'none' if group is None else 'another cutoff'}; {remedy}"
        )
    n_pairs = group["pairs"].shape[0]
    expected = {"offsets": (n + 1,), "pairs": (n_pairs, 2), "shifts": (n_pairs, 3)}
    for name, shape in expected.items():
        if group[name].shape != shape:
            raise DataError(
                f"shard {path}: dataset '{GROUP}/{name}' has shape {group[name].shape}, "
                f"expected {shape}; {remedy}"
            )


def read_stored(
    file: Any, lo: int, hi: int, atom_offsets: np.ndarray, remedy: str
) -> list[HalfList]:
    """The stored half lists of structures ``lo`` to ``hi - 1`` of an open shard;
    ``atom_offsets`` cut those structures' atoms (from 0). An index outside its
    structure is an error naming the shard and structure."""
    cutoff = float(file[GROUP].attrs["cutoff"])
    offsets = file[f"{GROUP}/offsets"][lo : hi + 1]
    pairs = file[f"{GROUP}/pairs"][offsets[0] : offsets[-1]]
    shifts = file[f"{GROUP}/shifts"][offsets[0] : offsets[-1]]
    counts = np.diff(offsets)
    local = offsets - offsets[0]
    outside = (pairs < 0) | (pairs >= np.repeat(np.diff(atom_offsets), counts)[:, None])
    if outside.any():
        bad = np.flatnonzero(outside.any(axis=1))
        structure = lo + int(np.searchsorted(local, bad[0], side="right")) - 1
        raise DataError(
            f"shard {file.filename}, structure {structure}: a stored neighbour pair "
            f"{pairs[bad[0]].tolist()} names an atom it does not have; {remedy}"
        )
    return [HalfList(cutoff, pairs[a:b], shifts[a:b]) for a, b in zip(local[:-1], local[1:])]


def batch_pairs(
    columns: Any,
    atom_offsets: np.ndarray,
    cutoff: float,
    full_list: bool,
    float_dtype: Any = np.float64,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The pairs of the structures of ``columns`` (:class:`hpctrain.data.structures.
    Columns`: ``positions``, ``cells``, ``pbcs`` and ``neighbors``, a :class:`HalfList`
    or None per structure) strictly within ``cutoff``: ``centers``, ``neighbors``
    (indices into the batch's atoms from ``atom_offsets``), ``cell_shifts``
    ``[pairs, 3]`` (each pair's whole cell shift times its structure's cell, computed
    in float64, given in ``float_dtype``) and each pair's ``system``. A full list is
    the half list followed by its mirror image."""
    lists = []
    for k, stored in enumerate(columns.neighbors):
        if stored is None or stored.cutoff < cutoff:
            positions = columns.positions[atom_offsets[k] : atom_offsets[k + 1]]
            stored = search(positions, columns.cells[k], columns.pbcs[k], cutoff)
        lists.append(stored)
    counts = [len(h.pairs) for h in lists]
    system = np.repeat(np.arange(len(lists)), counts)
    ij = np.concatenate([h.pairs for h in lists]).reshape(-1, 2)
    cells = columns.cells.astype(np.float64)
    shifted = np.concatenate([h.shifts @ cell for h, cell in zip(lists, cells)]).reshape(-1, 3)
    if any(h.cutoff > cutoff for h in lists):
        positions = columns.positions.astype(np.float64)
        first = atom_offsets[system]
        vectors = positions[ij[:, 1] + first] - positions[ij[:, 0] + first] + shifted
        within = np.sqrt((vectors**2).sum(axis=1)) < cutoff
        ij, shifted, system = ij[within], shifted[within], system[within]
    offsets = atom_offsets[system]
    n = len(system)
    copies = 2 if full_list else 1
    centers = np.empty(copies * n, dtype=np.int64)
    neighbors = np.empty(copies * n, dtype=np.int64)
    np.add(ij[:, 0], offsets, out=centers[:n])
    np.add(ij[:, 1], offsets, out=neighbors[:n])
    cell_shifts = np.empty((copies * n, 3), dtype=float_dtype)
    cell_shifts[:n] = shifted
    if full_list:
        centers[n:], neighbors[n:] = neighbors[:n], centers[:n]
        np.negative(cell_shifts[:n], out=cell_shifts[n:])
        system = np.concatenate([system, system])
    return centers, neighbors, cell_shifts, system


def pair_cutoff_of(manifest: dict, path: Path, remedy: str) -> float | None:
    """The cutoff of the neighbour pairs a shard manifest says its shards hold
    (``conversion.neighbors.cutoff``), or None."""
    stored = (manifest.get("conversion") or {}).get(GROUP)
    if stored is None:
        return None
    cutoff = stored.get("cutoff") if isinstance(stored, dict) else None
    if not isinstance(cutoff, (int, float)) or not cutoff > 0:
        raise DataError(
            f"{path}: 'conversion.{GROUP}' needs a positive 'cutoff', got {stored!r}; {remedy}"
        )
    return float(cutoff)
