"""The training order: deterministic, local, disjoint across ranks, resumable."""

import numpy as np
import pytest

from hpctrain.data.sampler import DistributedBatchSampler, local_order, split_indices
from hpctrain.errors import CheckpointError, DataError, OptionsError


def epoch_steps(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_order_is_a_pure_function_of_seed_and_epoch():
    a = local_order(1000, seed=3, epoch=2, block=16, window=4)
    b = local_order(1000, seed=3, epoch=2, block=16, window=4)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(1000))
    assert not np.array_equal(a, local_order(1000, seed=3, epoch=3, block=16, window=4))
    assert not np.array_equal(a, local_order(1000, seed=4, epoch=2, block=16, window=4))


@pytest.mark.parametrize("n", [1000, 1003, 64])
def test_order_keeps_read_locality(n):
    block, window = 16, 4
    order = local_order(n, seed=0, epoch=0, block=block, window=window)
    span = block * window
    for i in range(0, n, span):
        touched = {int(x) // block for x in order[i : i + span]}
        assert len(touched) <= window + 1
    # and it is shuffled, not the identity
    assert not np.array_equal(order, np.arange(n))


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [97, 100])
def test_every_structure_once_per_epoch_on_exactly_one_rank(world_size, n):
    seen = []
    steps = None
    for rank in range(world_size):
        sampler = DistributedBatchSampler(n, 8, rank, world_size, seed=1, block=4, window=3)
        batches = epoch_steps(sampler, 5)
        steps = len(batches) if steps is None else steps
        assert len(batches) == steps  # all ranks take the same number of steps
        for step in batches:
            assert len(step.local) >= 1
            seen.extend(step.local.tolist())
    assert sorted(seen) == list(range(n))


def test_global_batches_do_not_depend_on_the_world_size():
    one = DistributedBatchSampler(100, 10, 0, 1, seed=7)
    four = DistributedBatchSampler(100, 10, 0, 4, seed=7)
    for a, b in zip(epoch_steps(one, 1), epoch_steps(four, 1)):
        np.testing.assert_array_equal(a.global_, b.global_)


def test_a_last_batch_smaller_than_the_world_is_merged():
    sampler = DistributedBatchSampler(21, 10, 0, 2, seed=0)
    sizes = [len(s.global_) for s in epoch_steps(sampler, 0)]
    assert sizes == [10, 11]


def test_resume_mid_epoch_gives_the_remaining_steps_exactly():
    full = DistributedBatchSampler(200, 16, 1, 2, seed=5)
    expected = epoch_steps(full, 3)
    interrupted = DistributedBatchSampler(200, 16, 1, 2, seed=5)
    interrupted.set_epoch(3)
    it = iter(interrupted)
    done = [next(it) for _ in range(4)]
    state = interrupted.state_dict()
    resumed = DistributedBatchSampler(200, 16, 1, 2, seed=5)
    resumed.load_state_dict(state)
    rest = epoch_steps(resumed, 3)
    got = done + rest
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(a.local, b.local)
    # the next epoch starts from its beginning
    np.testing.assert_array_equal(
        epoch_steps(resumed, 4)[0].global_, epoch_steps(full, 4)[0].global_
    )


@pytest.mark.parametrize("old, new", [(2, 3), (4, 1), (1, 2)])
def test_resume_at_another_world_size_trains_each_remaining_structure_once(old, new):
    n, batch = 203, 12
    consumed = []
    states = []
    for rank in range(old):
        sampler = DistributedBatchSampler(n, batch, rank, old, seed=9)
        sampler.set_epoch(2)
        it = iter(sampler)
        for _ in range(5):
            consumed.extend(next(it).local.tolist())
        states.append(sampler.state_dict())
    assert all(s == states[0] for s in states)
    remaining = []
    for rank in range(new):
        sampler = DistributedBatchSampler(n, batch, rank, new, seed=9)
        sampler.load_state_dict(states[0])
        for step in epoch_steps(sampler, 2):
            remaining.extend(step.local.tolist())
    assert len(consumed) == 5 * batch
    assert sorted(consumed + remaining) == list(range(n))


def test_resume_refuses_a_changed_training_set():
    state = DistributedBatchSampler(100, 10, 0, 1, seed=0).state_dict()
    other = DistributedBatchSampler(120, 10, 0, 1, seed=0)
    with pytest.raises(CheckpointError, match="n_samples=100"):
        other.load_state_dict(state)


def test_too_many_ranks_is_a_clear_error():
    with pytest.raises(DataError, match="fewer than the 8 ranks"):
        DistributedBatchSampler(5, 16, 0, 8, seed=0)
    with pytest.raises(OptionsError, match="batch_size' 4 is smaller than the 8 ranks"):
        DistributedBatchSampler(100, 4, 0, 8, seed=0)


def test_splits_are_disjoint_complete_and_seeded():
    val, test, rest = split_indices(100, [0.1, 0.2], seed=3)
    assert (len(val), len(test), len(rest)) == (10, 20, 70)
    assert sorted(np.concatenate([val, test, rest]).tolist()) == list(range(100))
    again = split_indices(100, [0.1, 0.2], seed=3)
    for a, b in zip((val, test, rest), again):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(val, split_indices(100, [0.1, 0.2], seed=4)[0])
