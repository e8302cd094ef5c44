"""The training sets as the engine trains them: the labels each carries, and what it
cannot train (checked before training, so that the error comes before the banner)."""

from __future__ import annotations

from collections.abc import Sequence

from .data.sampler import DistributedBatchSampler, mixture_counts
from .data.structures import AtomisticDataset, labels_of
from .errors import OptionsError
from .hypers import TrainingHypers


def check_datasets(hypers: TrainingHypers, world_size: int, train_datasets: Sequence) -> None:
    """What the engine cannot train, found before training (the flow asks through
    :meth:`~hpctrain.trainer.EngineTrainer.check_datasets`, before its banner): fewer
    structures or a smaller batch than ranks, a structure larger than a rank's share of
    the atom budget. Training sets may carry different labels (other targets, forces
    or stress on some only): a label is learned from the structures that have it."""
    keys = [f"training_set[{i}]" for i in range(len(train_datasets))]
    if hypers.max_atoms_per_batch is None:
        n_samples = sum(len(d) for d in train_datasets)
        DistributedBatchSampler.check_fits(n_samples, hypers.batch_size, world_size)
        return
    for key, dataset in zip(keys, train_datasets):
        check_budget(key, dataset, hypers.max_atoms_per_batch, world_size)


def check_budget(key: str, dataset: AtomisticDataset, max_atoms: int, world_size: int) -> None:
    """Every structure fits a rank's share of an atom budget (a clear error if not)."""
    index = DistributedBatchSampler.check_budget(dataset.n_atoms, max_atoms, world_size)
    if index is None:
        return
    atoms = int(dataset.n_atoms[index])
    ranks = f"the {world_size} ranks" if world_size > 1 else "one rank"
    raise OptionsError(
        f"structure {index} of {key} ({dataset.name}) has {atoms} atoms, more than "
        f"'architecture.training.max_atoms_per_batch' ({max_atoms}) shared by {ranks} "
        f"allows ({max_atoms // world_size} per rank): raise max_atoms_per_batch to at "
        f"least {atoms * world_size}, or use fewer ranks"
    )


def mixture_of(datasets: Sequence[AtomisticDataset]) -> tuple | None:
    """The sizes and sampling weights of the training sets, when they have weights or
    one is replayed data (fine-tuning); with replayed data, the structures of an epoch:
    the other sets' structures and the replayed ones, ``replay_fraction`` of the whole."""
    weighted = any(d.sampling_weight is not None for d in datasets)
    fractions = [d.replay_fraction for d in datasets if d.replay_fraction is not None]
    sizes = [len(d) for d in datasets]
    if not fractions:
        return (sizes, [d.sampling_weight for d in datasets]) if weighted else None
    new = [d for d in datasets if d.replay_fraction is None]
    shares = {id(d): d.sampling_weight if weighted else len(d) for d in new}
    total_share, fraction = sum(shares.values()), fractions[0]
    weights = [
        fraction if d.replay_fraction is not None else (1 - fraction) * shares[id(d)] / total_share
        for d in datasets
    ]
    return sizes, weights, round(sum(len(d) for d in new) / (1 - fraction))


def mixture_in_words(datasets: Sequence[AtomisticDataset]) -> str | None:
    """``a.xyz: 700 from 1,000 (50.0 %), ...``: the structures each set gives an epoch,
    drawn from how many, and their share."""
    mixture = mixture_of(datasets)
    if mixture is None:
        return None
    counts = mixture_counts(mixture[0], mixture[1], mixture[2] if len(mixture) > 2 else None)
    total = int(counts.sum())
    return ", ".join(
        f"{d.name}: {int(k):,} from {len(d):,} ({100 * k / total:.1f} %)"
        for d, k in zip(datasets, counts)
    )


def labels_in_words(datasets: Sequence[AtomisticDataset]) -> str:
    """``a.xyz: energy, forces, stress; b.xyz: energy, forces``: what each set carries."""
    parts = []
    for d in datasets:
        names = [
            " ".join(x for x in ("" if t == "energy" and g else t, g) if x)
            for t, g in sorted(labels_of(d))
        ]
        parts.append(f"{d.name}: {', '.join(names)}")
    return "; ".join(parts)


def pairs_in_words(datasets: Sequence[AtomisticDataset], cutoff: float | None) -> str | None:
    """Where the training batches' neighbour pairs within ``cutoff`` (the model's
    largest) come from: each set's shards, or a search by the loader, with the
    command that stores them."""
    if cutoff is None:
        return None

    def source(d: AtomisticDataset) -> str:
        if d.pair_cutoff is not None and d.pair_cutoff >= cutoff:
            return f"read from the shards (stored within {d.pair_cutoff:g} A)"
        if d.pair_cutoff is not None:
            return f"searched: the shards' pairs stop at {d.pair_cutoff:g} A"
        return "searched by the loader"

    sources = [source(d) for d in datasets]
    if len(set(sources)) == 1:
        words = sources[0]
    else:
        words = "; ".join(f"{d.name}: {w}" for d, w in zip(datasets, sources))
    if any(w.startswith("searched") for w in sources):
        words += f" (hpctrain convert --neighbors {cutoff:g} stores them)"
    return words


def batch_in_words(hypers: TrainingHypers) -> str:
    """``16`` or ``of up to 2,000 atoms``: the global batch, as the log says it."""
    if hypers.max_atoms_per_batch is None:
        return str(hypers.batch_size)
    return f"of up to {hypers.max_atoms_per_batch:,} atoms"
