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
from hpctrain.data.batch import Batch
from hpctrain.data.loader import BatchLoader
from hpctrain.data.sampler import DistributedBatchSampler
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
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), kind
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


class Damaged:
    """A dataset whose structure ``bad`` cannot be read."""

    def __init__(self, dataset, bad: int):
        self.dataset, self.bad = dataset, bad

    def __getitem__(self, index: int):
        if index == self.bad:
            raise DataError(f"structure {index} of damaged.h5 cannot be read: checksum mismatch")
        return self.dataset[index]


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
