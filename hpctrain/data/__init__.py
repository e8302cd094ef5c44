"""Datasets of atomic structures, the rank-aware sampler, and batches."""

from .batch import Batch, collate
from .dataset import Structure, StructureDataset, read_dataset
from .sampler import DistributedBatchSampler, split_indices

__all__ = [
    "Batch",
    "DistributedBatchSampler",
    "Structure",
    "StructureDataset",
    "collate",
    "read_dataset",
    "split_indices",
]
