"""The loader: batches made ahead by threads are the batches made in line, from real
shards; a worker's error ends the loop with that error; training with loader threads
gives the same model as without."""

import runpy
import threading

import ase.io
import numpy as np
import pytest
import torch
from conftest import ROOT, hpctrain, tiny_options, write_options
from metatomic.torch import NeighborListOptions

from hpctrain import cli
from hpctrain.config import parse
from hpctrain.data import read_dataset
from hpctrain.data.batch import Batch, collate
from hpctrain.data.loader import BatchLoader
from hpctrain.data.sampler import DistributedBatchSampler
from hpctrain.data.structures import Columns, ConcatDataset
from hpctrain.errors import DataError
from hpctrain.options import DatasetOptions

REQUESTS = [
    NeighborListOptions(cutoff=5.0, full_list=False, strict=True),
    NeighborListOptions(cutoff=3.0, full_list=True, strict=True),
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """40 periodic EMT structures with stress, in shards of 8."""
    make = runpy.run_path(str(ROOT / "benchmarks" / "make_emt_dataset.py"))["structures"]
    folder = tmp_path_factory.mktemp("loader")
    ase.io.write(folder / "emt.xyz", list(make(40, 8, 0)), format="extxyz")
    out = folder / "shards"
    assert cli.main(["convert", str(folder / "emt.xyz"), "-o", str(out), "--shard-size", "8"]) == 0
    options = parse(
        DatasetOptions,
        {
            "systems": {"read_from": str(out)},
            "targets": {"energy": {"forces": True, "stress": True}},
        },
    )
    return read_dataset(options, "training_set", "test", torch.float32)


def plan_of(dataset, batch_size=6, accumulation=2):
    sampler = DistributedBatchSampler(len(dataset), batch_size, 0, 1, seed=3)
    plan = [np.array_split(step.local, accumulation) for step in sampler.plan()]
    assert sampler.consumed == 0  # (a plan hands nothing out)
    return plan


def assert_same_batch(a: Batch, b: Batch) -> None:
    for field in ("types", "positions", "system", "cells", "pbcs", "n_atoms"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    for kind in ("targets", "forces", "stress"):
        x, y = getattr(a, kind), getattr(b, kind)
        assert x.keys() == y.keys(), kind
        for k in x:  # (NaN: a label a structure does not have)
            torch.testing.assert_close(x[k], y[k], rtol=0, atol=0, equal_nan=True)
    assert a.sizes == b.sizes and a.element_counts == b.element_counts
    assert len(a.pairs) == len(b.pairs) == len(REQUESTS)
    for p, q in zip(a.pairs, b.pairs):
        assert len(p) > 0
        for field in ("centers", "neighbors", "cell_shifts", "system"):
            assert torch.equal(getattr(p, field), getattr(q, field)), field


def loader_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hpctrain-loader")]


def test_batches_made_ahead_by_threads_are_the_batches_made_in_line(shards):
    plan = plan_of(shards)
    inline = list(BatchLoader(shards, REQUESTS, torch.device("cpu")).batches(plan))
    ahead = list(BatchLoader(shards, REQUESTS, torch.device("cpu"), 3, ahead=2).batches(plan))
    assert [len(step) for step in inline] == [len(step) for step in ahead] == [2] * len(plan)
    for step_inline, step_ahead, chunks in zip(inline, ahead, plan):
        for a, b, indices in zip(step_inline, step_ahead, chunks):
            assert_same_batch(a, b)
            assert a.sizes == [len(shards[int(i)].numbers) for i in indices]
    # the pairs are those within each cutoff: every pair vector is shorter, and a
    # half list holds each pair once
    batch = inline[0][0]
    for pairs, request in zip(batch.pairs, REQUESTS):
        vectors = batch.positions[pairs.neighbors] - batch.positions[pairs.centers]
        vectors = vectors + pairs.cell_shifts
        assert float(vectors.norm(dim=1).max()) < request.cutoff
        assert bool((batch.system[pairs.centers] == pairs.system).all())
    full, half = batch.pairs[1], batch.pairs[0]
    assert len(half) > len(full)  # (5 A half list, 3 A full list: more pairs at 5 A)
    assert not loader_threads()


def dataset_of(read_from, targets):
    options = parse(DatasetOptions, {"systems": {"read_from": str(read_from)}, "targets": targets})
    return read_dataset(options, "training_set", "test", torch.float32)


def test_a_batch_taken_as_columns_is_the_batch_of_its_structures(shards, tmp_path):
    """Every kind of dataset gathers a batch's arrays at once (across shards and
    blocks, from stored pairs, with labels one set lacks) exactly as its structures
    one by one give them."""
    make = runpy.run_path(str(ROOT / "benchmarks" / "make_emt_dataset.py"))["structures"]
    ase.io.write(tmp_path / "emt.xyz", list(make(40, 8, 0)), format="extxyz")
    ase.io.write(tmp_path / "other.xyz", list(make(12, 6, 1)), format="extxyz")
    stored = tmp_path / "stored"
    convert = ["convert", str(tmp_path / "emt.xyz"), "-o", str(stored), "--shard-size", "16"]
    assert cli.main([*convert, "--neighbors", "4"]) == 0
    everything = {"energy": {"forces": True, "stress": True}}
    in_memory = dataset_of(tmp_path / "emt.xyz", everything)
    no_stress = dataset_of(tmp_path / "other.xyz", {"energy": {"forces": True}})
    datasets = {
        "shards": shards,
        "stored pairs, block size 5": dataset_of(stored, everything),
        "in memory": in_memory,
        "a subset": in_memory.subset(np.arange(40)[::-3]),
        "two sets, one without stress": ConcatDataset([shards, no_stress]),
    }
    datasets["stored pairs, block size 5"].block_size = 5
    rng = np.random.default_rng(0)
    for name, dataset in datasets.items():
        for size in (1, 7, len(dataset)):
            indices = rng.permutation(len(dataset))[:size]
            columns = dataset.columns(indices)
            sizes = [len(dataset[int(i)].numbers) for i in indices]
            assert columns.sizes.tolist() == sizes, name
            one_by_one = collate([dataset[int(i)] for i in indices], REQUESTS)
            assert_same_batch(collate(columns, REQUESTS), one_by_one)
        with pytest.raises(IndexError):
            dataset.columns(np.array([0, len(dataset)]))
    mixed = datasets["two sets, one without stress"].columns(np.array([41, 0, 45]))
    assert np.isnan(mixed.stress["energy"][[0, 2]]).all()
    assert np.isfinite(mixed.stress["energy"][1]).all()


class Damaged:
    """A dataset whose structure ``bad`` cannot be read."""

    def __init__(self, dataset, bad: int):
        self.dataset, self.bad = dataset, bad

    def __getitem__(self, index: int):
        if index == self.bad:
            raise DataError(f"structure {index} of damaged.h5 cannot be read: checksum mismatch")
        return self.dataset[index]

    def columns(self, indices):
        return Columns.of([self[int(i)] for i in indices])


@pytest.mark.parametrize("workers", [0, 2])
def test_an_error_in_a_worker_ends_the_loop_with_that_error(shards, workers):
    plan = plan_of(shards)
    bad = int(plan[3][1][0])  # in the fourth step
    loader = BatchLoader(Damaged(shards, bad), REQUESTS, torch.device("cpu"), workers)
    delivered = 0
    with pytest.raises(DataError, match=f"structure {bad} of damaged.h5"):
        for _ in loader.batches(plan):
            delivered += 1
    assert delivered == 3
    assert not loader_threads()


def test_closing_the_loop_early_stops_its_workers(shards):
    batches = BatchLoader(shards, REQUESTS, torch.device("cpu"), 2).batches(plan_of(shards))
    next(batches)
    assert loader_threads()
    batches.close()
    assert not loader_threads()


def test_training_with_loader_threads_gives_the_same_model(workdir):
    """The batches, and so every weight, do not depend on the loader threads."""
    states = []
    for workers in (0, 2):
        options = tiny_options(architecture={"training": {"num_workers": workers}})
        path = write_options(workdir, options, f"options-{workers}.yaml")
        out = workdir / f"run-{workers}"
        result = hpctrain("train", path, "--output-dir", out, cwd=workdir)
        assert result.returncode == 0, result.stderr
        states.append(torch.load(out / "model.ckpt", weights_only=False))
    first, second = (s["model_state"] for s in states)
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
