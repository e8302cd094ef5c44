"""Which structures each rank sees, and in what order.

The order of an epoch is a pure function of ``(seed, epoch)``, with read locality:
blocks of consecutive structures are shuffled, then structures are shuffled inside
a bounded window of blocks, so a reader touches few places of a shard at a time.

A step consumes one *global* batch of ``batch_size`` structures, split between the
ranks, so the same options train the same model at any world size (up to
floating-point summation order). Within a global batch, ranks get equal shares of
the work, estimated from the structures' sizes and densities (:func:`work_estimates`),
since every step waits for its slowest rank. No training structure is duplicated or dropped:
a last global batch too small to give every rank a structure is merged into the one
before it. The sampler's state is the number of structures of the epoch already
consumed, so a run resumes mid-epoch exactly, at the same or at another world size.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import CheckpointError, DataError, OptionsError

BLOCK = 64
"""Consecutive structures that the shuffle keeps together (and readers read at once)."""
WINDOW = 16
"""Blocks that the shuffle mixes: a reader touching ``WINDOW + 1`` blocks at a time
sees no repeated reads."""
CONDENSED_DENSITY = 0.1
"""Atoms per cubic angstrom assumed around an atom of a non-periodic structure (dense
liquids and solids hold 0.03 to 0.15); a molecule smaller than its cutoff sphere
counts all its atoms as neighbours."""


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


def local_order(n_samples: int, seed: int, epoch: int, block: int, window: int) -> np.ndarray:
    """A permutation of ``range(n_samples)`` with read locality.

    Blocks of ``block`` consecutive indices are put in a random order, then indices are
    shuffled within consecutive windows of ``window`` blocks: any ``window * block``
    consecutive positions of the result come from at most ``window + 1`` blocks.
    """
    rng = _generator(seed, epoch)
    starts = np.arange(0, n_samples, block)
    rng.shuffle(starts)
    order = np.concatenate([np.arange(s, min(s + block, n_samples)) for s in starts])
    span = block * window
    for i in range(0, n_samples, span):
        rng.shuffle(order[i : i + span])
    return order


def mixture_counts(
    sizes: Sequence[int], weights: Sequence[float], total: int | None = None
) -> np.ndarray:
    """Structures each training set gives an epoch of ``total`` structures (by default
    ``sum(sizes)``): shares proportional to ``weights``, rounded so that they add up
    (largest remainders)."""
    total = int(sum(sizes)) if total is None else int(total)
    exact = total * np.asarray(weights, dtype=np.float64) / float(sum(weights))
    counts = np.floor(exact).astype(np.int64)
    short = total - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    return counts


def mixture_draw(
    sizes: Sequence[int],
    weights: Sequence[float],
    seed: int,
    epoch: int,
    total: int | None = None,
) -> np.ndarray:
    """The structures of an epoch mixing training sets by ``weights``, as indices into
    their concatenation, sorted. A set asked for ``k`` of its ``n`` structures gives
    ``k`` distinct ones drawn at random when ``k <= n``, else each structure ``k // n``
    times and ``k % n`` drawn at random once more: never one structure twice before
    every other has been seen as often."""
    parts, start = [], 0
    for i, (n, k) in enumerate(zip(sizes, mixture_counts(sizes, weights, total))):
        rng = _generator(seed, epoch, 1 + i)
        extra = rng.permutation(n)[: k % n]
        parts.append(start + np.concatenate([np.tile(np.arange(n), k // n), extra]))
        start += n
    return np.sort(np.concatenate(parts))


def work_estimates(n_atoms: np.ndarray, volumes: np.ndarray, cutoff: float) -> np.ndarray:
    """The relative cost of each structure for a model whose work grows with atoms and
    neighbour pairs within ``cutoff`` (angstrom): ``atoms * (1 + neighbours)``.

    Neighbours per atom are estimated without reading positions: the density of a
    periodic structure (``volumes``, NaN where not periodic) times the cutoff sphere,
    else at most ``n_atoms - 1`` (see :data:`CONDENSED_DENSITY`). With ``cutoff`` 0,
    the cost is the number of atoms.
    """
    n_atoms = np.asarray(n_atoms, dtype=np.float64)
    volumes = np.asarray(volumes, dtype=np.float64)
    sphere = 4.0 / 3.0 * np.pi * cutoff**3
    periodic = np.isfinite(volumes) & (volumes > 0)
    density = np.where(periodic, n_atoms / np.where(periodic, volumes, 1.0), CONDENSED_DENSITY)
    neighbours = density * sphere
    neighbours = np.where(periodic, neighbours, np.minimum(neighbours, n_atoms - 1))
    return n_atoms * (1.0 + neighbours)


def balanced_owners(costs: np.ndarray, world_size: int) -> np.ndarray:
    """The rank of each structure of a global batch, so that ranks' summed costs are
    close: the costliest structure first, each to the least loaded rank (ties to the
    lowest rank, so every rank gets one while there are as many structures as ranks)."""
    owners = np.empty(len(costs), dtype=np.int64)
    loads = np.zeros(world_size)
    for i in np.argsort(-np.asarray(costs), kind="stable"):
        rank = int(np.argmin(loads))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


@dataclasses.dataclass(frozen=True)
class StepIndices:
    """The structures of one step: this rank's share, and the whole global batch."""

    local: np.ndarray
    global_: np.ndarray


class DistributedBatchSampler:
    """Global batches of training structures, each split across ranks.

    :param n_samples: structures in the (concatenated) training set
    :param batch_size: structures per optimizer step, summed over all ranks
    :param block: consecutive structures kept together by the shuffle
    :param window: blocks mixed together by the shuffle
    :param costs: relative cost of every structure (:func:`work_estimates`); ranks
        get global batches' structures with equal summed costs, else every
        ``world_size``-th structure
    :param mixture: the sizes and sampling weights of the training sets concatenated
        into ``n_samples`` structures, and optionally the structures of an epoch (by
        default ``n_samples``): each epoch then draws every set's share
        (:func:`mixture_draw`) instead of taking every structure once
    :param max_atoms: batches by atom budget instead of ``batch_size``: each global
        batch takes the next structures of the order while their atoms fit in
        ``max_atoms`` (:func:`check_budget` makes sure that every batch then has a
        structure for every rank); ``n_atoms`` gives the atoms of every structure
    """

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        block: int = BLOCK,
        window: int = WINDOW,
        costs: np.ndarray | None = None,
        max_atoms: int | None = None,
        n_atoms: np.ndarray | None = None,
        mixture: tuple | None = None,
    ):
        self.mixture = None
        self.epoch_length = n_samples  # (structures of an epoch)
        if mixture is not None:
            if sum(mixture[0]) != n_samples:
                raise ValueError(f"the mixture's sets hold {sum(mixture[0])}, not {n_samples}")
            self.mixture = ([int(n) for n in mixture[0]], [float(w) for w in mixture[1]])
            if len(mixture) > 2:  # (an epoch of its own length; kept in the state)
                self.mixture += (int(mixture[2]),)
                self.epoch_length = int(mixture[2])
        if max_atoms is None:
            self.check_fits(self.epoch_length, batch_size, world_size)
        elif n_atoms is None or len(n_atoms) != n_samples:
            raise ValueError(f"batches by atom budget need n_atoms for all {n_samples} structures")
        self.max_atoms = max_atoms
        self.n_atoms = None if n_atoms is None else np.asarray(n_atoms, dtype=np.int64)
        self.n_samples = n_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.block = block
        self.window = window
        if costs is not None and (len(costs) != n_samples or not np.all(np.asarray(costs) > 0)):
            raise ValueError(f"costs must be {n_samples} positive numbers, one per structure")
        self.costs = costs
        self.epoch = 0
        self.consumed = 0  # structures of this epoch already handed out (all ranks)

    @staticmethod
    def check_fits(n_samples: int, batch_size: int, world_size: int) -> None:
        """Every rank gets at least one structure per step."""
        if n_samples < world_size:
            raise DataError(
                f"the training set has {n_samples} structures, fewer than the "
                f"{world_size} ranks; use fewer ranks or more data"
            )
        if batch_size < world_size:
            raise OptionsError(
                f"'architecture.training.batch_size' {batch_size} is smaller than the "
                f"{world_size} ranks; every rank needs at least one structure per step "
                "(batch_size is the global batch)"
            )

    @staticmethod
    def check_budget(n_atoms: np.ndarray, max_atoms: int, world_size: int) -> int | None:
        """The first structure too large for batches of ``max_atoms`` atoms shared by
        ``world_size`` ranks (more than ``max_atoms // world_size`` atoms), or None.
        Below that size, a batch that the next structure would overflow already holds
        more than ``max_atoms - max_atoms // world_size`` atoms: at least one structure
        per rank."""
        too_large = np.flatnonzero(np.asarray(n_atoms) > max_atoms // world_size)
        return int(too_large[0]) if len(too_large) else None

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is the one being resumed."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.consumed = 0

    def order(self) -> np.ndarray:
        """The epoch's order of all structures, the same on every rank."""
        if not self.shuffle:
            return np.arange(self.n_samples)
        order = local_order(self.epoch_length, self.seed, self.epoch, self.block, self.window)
        if self.mixture is None:
            return order
        sizes, weights = self.mixture[:2]
        return mixture_draw(sizes, weights, self.seed, self.epoch, self.epoch_length)[order]

    def global_batches(self, start: int = 0) -> list[np.ndarray]:
        """The global batches of the epoch from structure ``start`` of its order on."""
        order = self.order()[start:]
        if self.max_atoms is None:
            size = self.batch_size
            batches = [order[i : i + size] for i in range(0, len(order), size)]
        else:
            batches = np.split(order, budget_cuts(self.n_atoms[order], self.max_atoms))
        if len(batches) > 1 and len(batches[-1]) < self.world_size:
            batches[-2:] = [np.concatenate(batches[-2:])]
        return batches

    def __len__(self) -> int:
        """Steps in a whole epoch."""
        return len(self.global_batches())

    def remaining_steps(self) -> int:
        return len(self.global_batches(self.consumed)) if self.consumed < self.epoch_length else 0

    def plan(self) -> list[StepIndices]:
        """The steps left in the epoch, without handing them out: what a loader
        prepares ahead, while iterating hands out the same steps one by one."""
        return [
            StepIndices(local=self.share(batch), global_=batch)
            for batch in self.global_batches(self.consumed)
        ]

    def __iter__(self) -> Iterator[StepIndices]:
        """The rest of the epoch; ``consumed`` counts each batch as it is handed out."""
        for step in self.plan():
            self.consumed += len(step.global_)
            yield step

    def share(self, batch: np.ndarray) -> np.ndarray:
        """This rank's structures of a global batch, in the batch's order."""
        if self.costs is None or self.world_size == 1:
            return batch[self.rank :: self.world_size]
        return batch[balanced_owners(self.costs[batch], self.world_size) == self.rank]

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "consumed": self.consumed,
            "seed": self.seed,
            "n_samples": self.n_samples,
            "batch_size": self.batch_size,
            "block": self.block,
            "window": self.window,
            "max_atoms": self.max_atoms,
            "mixture": self.mixture,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where ``state`` stopped; the world size may differ."""
        keys = ["seed", "n_samples", "block", "window", "max_atoms", "mixture"]
        if self.max_atoms is None:  # (batch_size makes no batch by atom budget)
            keys.append("batch_size")
        for key in keys:
            if _plain(state.get(key)) != _plain(getattr(self, key)):
                raise CheckpointError(
                    f"cannot resume the data order: the checkpoint has {key}={state[key]}, "
                    f"this run has {getattr(self, key)} (the training set or options changed)"
                )
        self.epoch = state["epoch"]
        self.consumed = state["consumed"]


def budget_cuts(n_atoms: np.ndarray, max_atoms: int) -> list[int]:
    """Where a sequence of structures with ``n_atoms`` atoms is cut into batches of at
    most ``max_atoms`` atoms, each taking structures in order while they fit (a
    structure larger than the budget gets a batch of its own)."""
    cuts, total = [], 0
    for i, atoms in enumerate(n_atoms.tolist()):
        if total + atoms > max_atoms and total > 0:
            cuts.append(i)
            total = 0
        total += atoms
    return cuts


def _plain(value: Any) -> Any:
    """Tuples as lists: a state read back from a checkpoint compares equal."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def shard_for_rank(n_samples: int, rank: int, world_size: int) -> np.ndarray:
    """Evaluation share of a rank: every structure on exactly one rank, no padding."""
    return np.arange(rank, n_samples, world_size)
