"""Which structures each rank sees, and in what order.

The order of an epoch is a pure function of ``(seed, epoch)``. A step consumes one
*global* batch of ``batch_size`` structures, split between the ranks; so the same
options train the same model at any world size (up to floating-point summation
order). No training structure is duplicated or dropped: a last global batch
too small to give every rank a structure is merged into the one before it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np


def _generator(seed: int, *salt: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, *salt])))


def split_indices(n: int, fractions: list[float], seed: int) -> list[np.ndarray]:
    """Disjoint random subsets of ``range(n)`` with the given fractions, and the rest.

    Returns one array per fraction, then the remainder (sorted), identical on every
    rank for a given seed.
    """
    order = _generator(seed, 0xDA7A).permutation(n)
    parts, start = [], 0
    for fraction in fractions:
        count = int(round(fraction * n))
        parts.append(np.sort(order[start : start + count]))
        start += count
    parts.append(np.sort(order[start:]))
    return parts


@dataclasses.dataclass(frozen=True)
class StepIndices:
    """The structures of one step: this rank's share, and the whole global batch."""

    local: np.ndarray
    global_: np.ndarray


class DistributedBatchSampler:
    """Global batches of training structures, each split across ranks.

    :param n_samples: structures in the (concatenated) training set
    :param batch_size: structures per optimizer step, summed over all ranks
    """

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
    ):
        if n_samples < world_size:
            raise ValueError(
                f"the training set has {n_samples} structures, fewer than the "
                f"{world_size} ranks; use fewer ranks or more data"
            )
        if batch_size < world_size:
            raise ValueError(
                f"batch_size {batch_size} is smaller than the {world_size} ranks; every "
                "rank needs at least one structure per step (batch_size is global)"
            )
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def order(self) -> np.ndarray:
        """The epoch's order of all structures, the same on every rank."""
        if not self.shuffle:
            return np.arange(self.n_samples)
        return _generator(self.seed, self.epoch).permutation(self.n_samples)

    def global_batches(self) -> list[np.ndarray]:
        order = self.order()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if len(batches) > 1 and len(batches[-1]) < self.world_size:
            batches[-2:] = [np.concatenate(batches[-2:])]
        return batches

    def __len__(self) -> int:
        return len(self.global_batches())

    def __iter__(self) -> Iterator[StepIndices]:
        for batch in self.global_batches():
            yield StepIndices(local=batch[self.rank :: self.world_size], global_=batch)


def shard_for_rank(n_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Evaluation share of a rank: every structure on exactly one rank, no padding."""
    return np.arange(rank, n_samples, world_size)
