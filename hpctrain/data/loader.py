"""Batches prepared ahead of the steps that use them.

A :class:`BatchLoader` turns a plan (the index arrays of the coming steps, which the
sampler computes without moving its cursor) into batches on the device, in the
plan's order. With ``workers`` threads, up to ``ahead`` steps are read, given
their neighbour lists and collated while earlier steps compute: the neighbour lists
(vesin) and the concatenation (numpy) release Python's lock, and reads from a
dataset are serialised (its caches are not shared between threads). On a GPU the
batches are pinned in memory and copied without blocking the host. Which batches a
step gets does not depend on the workers: only when they are made.

An error in a worker (a damaged shard, a structure without neighbours' room) ends
the run with that error and its traceback, raised in the step that needed the batch.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .batch import Batch, collate


def default_workers(device: torch.device) -> int:
    """Loader threads when the options leave them out: 2 for a GPU, which waits
    for nothing else, and none on a CPU, whose cores the step already keeps busy."""
    return 2 if device.type == "cuda" else 0


class BatchLoader:
    """Makes the batches of a dataset's structures for a model's neighbour lists.

    :param dataset: an :class:`~hpctrain.data.structures.AtomisticDataset` (or a
        ``ConcatDataset`` of them): ``dataset.columns(indices)`` for the plan's indices
    :param requests: the neighbour lists the model requests (metatomic
        ``NeighborListOptions``)
    :param workers: threads preparing batches ahead; 0 makes each batch when the
        step asks for it
    :param ahead: steps prepared in advance (with ``workers``)
    """

    def __init__(
        self,
        dataset,
        requests: Sequence,
        device: torch.device,
        workers: int = 0,
        ahead: int = 2,
        loss_weights: np.ndarray | None = None,
    ):
        if workers < 0 or ahead < 1:
            raise ValueError(f"workers must be >= 0 and ahead >= 1, got {workers}, {ahead}")
        self.dataset = dataset
        self.requests = list(requests)
        self.device = torch.device(device)
        self.workers = workers
        self.ahead = ahead
        self.pin = self.device.type == "cuda"
        self.loss_weights = loss_weights
        self._reading = threading.Lock()

    def make(self, indices: np.ndarray) -> Batch:
        """The batch of ``indices`` on the host (pinned for a GPU)."""
        with self._reading:
            columns = self.dataset.columns(np.asarray(indices, dtype=np.int64))
        batch = collate(columns, self.requests)
        if self.loss_weights is not None:
            weights = torch.as_tensor(self.loss_weights[indices], dtype=batch.positions.dtype)
            batch = dataclasses.replace(batch, loss_weights=weights)
        return batch.pin_memory() if self.pin else batch

    def batches(self, plan: Iterable[Sequence[np.ndarray]]) -> Iterator[list[Batch]]:
        """For each step of ``plan`` (its micro-batches' indices), its batches on the
        device. Close the iterator (or exhaust it) to stop the workers."""
        if self.workers == 0:
            for chunks in plan:
                yield [self.make(c).to(self.device) for c in chunks]
            return
        pool = ThreadPoolExecutor(self.workers, thread_name_prefix="hpctrain-loader")
        pending: collections.deque[list[Future]] = collections.deque()
        steps = iter(plan)

        def submit_next() -> None:
            chunks = next(steps, None)
            if chunks is not None:
                pending.append([pool.submit(self.make, c) for c in chunks])

        try:
            for _ in range(self.ahead):
                submit_next()
            while pending:
                futures = pending.popleft()
                submit_next()
                yield [f.result().to(self.device, non_blocking=True) for f in futures]
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
