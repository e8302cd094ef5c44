"""Opening the dataset an options entry names: a shard directory or a file ASE reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import DataError
from ..options import DatasetOptions
from .ase_reader import FrameBuffer, iter_frames, spec_from_options
from .shards import open_shards
from .structures import AtomisticDataset, StructureDataset


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
