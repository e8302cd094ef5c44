"""Datasets of atomic structures, the rank-aware sampler, and batches."""

from .batch import Batch, collate
from .dataset import AtomisticDataset, Structure, StructureDataset, Subset, read_dataset
from .sampler import DistributedBatchSampler, split_indices

__all__ = [
    "AtomisticDataset",
    "Batch",
    "DistributedBatchSampler",
    "Structure",
    "StructureDataset",
    "Subset",
    "collate",
    "read_dataset",
    "split_indices",
]
