"""Datasets of atomic structures (in memory or HDF5 shards), the sampler, and batches."""

from .batch import Batch, collate
from .reading import read_dataset
from .sampler import DistributedBatchSampler, split_indices
from .shards import ShardDataset
from .structures import AtomisticDataset, Structure, StructureDataset, Subset

__all__ = [
    "AtomisticDataset",
    "Batch",
    "DistributedBatchSampler",
    "ShardDataset",
    "Structure",
    "StructureDataset",
    "Subset",
    "collate",
    "read_dataset",
    "split_indices",
]
