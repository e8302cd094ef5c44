"""The training order: deterministic, local, disjoint across ranks, resumable."""

import numpy as np
import pytest

from hpctrain.data.sampler import (
    DistributedBatchSampler,
    balanced_owners,
    local_order,
    mixture_counts,
    split_indices,
    work_estimates,
)
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


def heterogeneous_costs(n: int, seed: int = 0) -> np.ndarray:
    """Structure sizes of a mixed dataset: small molecules to large cells."""
    rng = np.random.default_rng(seed)
    return rng.integers(3, 200, n).astype(float) ** 1.5


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_costs_balance_ranks_and_keep_every_structure_once(world_size):
    n, batch = 203, 16
    costs = heterogeneous_costs(n)
    steps = {}
    for rank in range(world_size):
        sampler = DistributedBatchSampler(n, batch, rank, world_size, seed=2, costs=costs)
        steps[rank] = epoch_steps(sampler, 1)
    seen = [i for rank in steps for step in steps[rank] for i in step.local.tolist()]
    assert sorted(seen) == list(range(n))
    plain = DistributedBatchSampler(n, batch, 0, world_size, seed=2)
    balanced_worst, plain_worst = [], []
    for k, step in enumerate(epoch_steps(plain, 1)):
        # the global batches are those without costs; only their split differs
        np.testing.assert_array_equal(steps[0][k].global_, step.global_)
        loads = [costs[steps[r][k].local].sum() for r in range(world_size)]
        assert min(len(steps[r][k].local) for r in range(world_size)) >= 1
        balanced_worst.append(max(loads) / (sum(loads) / world_size))
        plain_loads = [costs[step.global_[r::world_size]].sum() for r in range(world_size)]
        plain_worst.append(max(plain_loads) / (sum(plain_loads) / world_size))
    # the slowest rank's excess over the mean, which every step waits for, shrinks
    assert np.mean(balanced_worst) - 1 < 0.5 * (np.mean(plain_worst) - 1)


def test_balanced_owners_give_each_rank_a_structure_and_equal_costs_round_robin():
    owners = balanced_owners(np.array([1.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), 2)
    assert owners[1] == 0 and (owners == 1).sum() == 9  # 9 against 9
    np.testing.assert_array_equal(balanced_owners(np.ones(7), 3), [0, 1, 2, 0, 1, 2, 0])
    assert set(balanced_owners(np.array([100.0, 1.0, 1.0]), 3)) == {0, 1, 2}


def test_balanced_split_resumes_exactly_at_another_world_size():
    n, batch, costs = 150, 12, heterogeneous_costs(150, seed=4)
    first = [DistributedBatchSampler(n, batch, r, 3, seed=9, costs=costs) for r in range(3)]
    for sampler in first:
        sampler.set_epoch(2)
    iterators = [iter(s) for s in first]
    consumed = [i for it in iterators for _ in range(5) for i in next(it).local.tolist()]
    state = first[0].state_dict()
    rest = []
    for rank in range(2):
        resumed = DistributedBatchSampler(n, batch, rank, 2, seed=9, costs=costs)
        resumed.load_state_dict(state)
        rest.extend(i for step in epoch_steps(resumed, 2) for i in step.local.tolist())
    assert sorted(consumed + rest) == list(range(n))


def test_work_estimates_follow_density_and_size():
    cutoff = 5.0
    sphere = 4 / 3 * np.pi * cutoff**3
    # periodic: atoms times neighbours in the cutoff sphere at the cell's density
    dense, sparse = work_estimates(np.array([16, 16]), np.array([160.0, 320.0]), cutoff)
    assert dense == pytest.approx(16 * (1 + 0.1 * sphere))
    assert sparse == pytest.approx(16 * (1 + 0.05 * sphere))
    # a small molecule: every other atom is a neighbour
    (water,) = work_estimates(np.array([3]), np.array([np.nan]), cutoff)
    assert water == 3 * 3
    # a large molecule: no more neighbours than condensed matter holds
    (protein,) = work_estimates(np.array([5000]), np.array([np.nan]), cutoff)
    assert protein == pytest.approx(5000 * (1 + 0.1 * sphere))
    # without neighbour lists: the number of atoms
    np.testing.assert_allclose(work_estimates(np.array([4, 9]), np.array([1.0, np.nan]), 0), [4, 9])


def test_costs_must_cover_every_structure():
    with pytest.raises(ValueError, match="10 positive numbers"):
        DistributedBatchSampler(10, 4, 0, 2, seed=0, costs=np.ones(9))


def budget_sampler(n_atoms, max_atoms, rank=0, world_size=1, seed=5, costs=None):
    return DistributedBatchSampler(
        len(n_atoms), 1, rank, world_size, seed, max_atoms=max_atoms, n_atoms=n_atoms, costs=costs
    )


# 9-atom molecules and 200-atom cells, mixed
MIXED = np.array([9] * 300 + [200] * 40)


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_atom_budget_batches_fit_and_cover_the_epoch_once(world_size):
    budget = 800
    assert DistributedBatchSampler.check_budget(MIXED, budget, world_size) is None
    ranks = [budget_sampler(MIXED, budget, r, world_size) for r in range(world_size)]
    for epoch in (0, 1):
        per_rank = [epoch_steps(s, epoch) for s in ranks]
        seen = []
        for step, steps in enumerate(zip(*per_rank)):
            batch = steps[0].global_
            assert all(np.array_equal(s.global_, batch) for s in steps)
            if step + 1 < len(per_rank[0]):
                assert MIXED[batch].sum() <= budget
            else:  # an epoch's tail of fewer structures than ranks joins the last batch
                fitting = np.searchsorted(np.cumsum(MIXED[batch]), budget, side="right")
                assert len(batch) - fitting < world_size
            locals_ = [s.local for s in steps]
            assert all(len(local) >= 1 for local in locals_)  # every rank has a structure
            assert sorted(np.concatenate(locals_).tolist()) == sorted(batch.tolist())
            seen.extend(batch.tolist())
        assert sorted(seen) == list(range(len(MIXED)))
        # greedy: a batch ends only where the next structure would not fit
        batches = [s.global_ for s in per_rank[0]]
        for batch, following in zip(batches, batches[1:]):
            assert MIXED[batch].sum() + MIXED[following[0]] > budget
    # the global batches do not depend on the number of ranks (but for that tail)
    one = [s.global_ for s in epoch_steps(budget_sampler(MIXED, budget), 1)]
    many = [s.global_ for s in epoch_steps(budget_sampler(MIXED, budget, 0, world_size), 1)]
    assert len(many) in (len(one), len(one) - 1)
    assert all(np.array_equal(a, b) for a, b in zip(one, many[:-1]))
    np.testing.assert_array_equal(np.concatenate(one[len(many) - 1 :]), many[-1])


def test_atom_budget_batches_resume_mid_epoch_exactly():
    whole = epoch_steps(budget_sampler(MIXED, 800), 2)
    first = budget_sampler(MIXED, 800)
    first.set_epoch(2)
    it = iter(first)
    done = [next(it) for _ in range(5)]
    state = first.state_dict()
    resumed = budget_sampler(MIXED, 800)
    resumed.load_state_dict(state)
    rest = list(resumed)
    assert [s.global_.tolist() for s in done + rest] == [s.global_.tolist() for s in whole]
    # another budget is another data order: refused, as a changed batch size is
    with pytest.raises(CheckpointError, match="max_atoms=800, this run has 900"):
        budget_sampler(MIXED, 900).load_state_dict(state)
    # batch_size makes no budget batch: another one changes nothing and is accepted
    other_size = DistributedBatchSampler(len(MIXED), 16, 0, 1, 5, max_atoms=800, n_atoms=MIXED)
    other_size.load_state_dict(state)
    assert [s.global_.tolist() for s in other_size] == [s.global_.tolist() for s in rest]


def test_a_structure_larger_than_a_ranks_share_of_the_budget_is_found():
    assert DistributedBatchSampler.check_budget(MIXED, 400, 1) is None
    assert DistributedBatchSampler.check_budget(MIXED, 400, 2) is None  # 200 per rank
    assert DistributedBatchSampler.check_budget(MIXED, 399, 2) == 300  # the first cell


SIZES, WEIGHTS = [1000, 300, 100], [0.5, 0.3, 0.2]


def mixture_sampler(rank=0, world_size=1, batch_size=32):
    return DistributedBatchSampler(
        sum(SIZES), batch_size, rank, world_size, seed=9, mixture=(SIZES, WEIGHTS)
    )


def test_sampling_weights_give_each_set_its_share_of_every_epoch():
    assert mixture_counts(SIZES, WEIGHTS).tolist() == [700, 420, 280]
    assert mixture_counts([10, 10, 10], [1, 1, 1]).tolist() == [10, 10, 10]
    assert mixture_counts([7, 5], [1, 2]).sum() == 12  # (rounded to add up)
    starts = np.cumsum([0] + SIZES)
    draws = []
    for epoch in range(3):
        steps = epoch_steps(mixture_sampler(), epoch)
        drawn = np.concatenate([s.global_ for s in steps])
        assert len(drawn) == sum(SIZES)
        per_set = [drawn[(drawn >= a) & (drawn < b)] - a for a, b in zip(starts, starts[1:])]
        for part, size, weight in zip(per_set, SIZES, WEIGHTS):
            assert abs(len(part) / len(drawn) - weight) < 0.01
            times = np.bincount(part, minlength=size)
            # never a structure twice before every other has been seen as often
            assert times.max() - times.min() <= 1
        assert len(set(per_set[0].tolist())) == 700  # a subset without repeats
        draws.append(per_set[0])
    assert not np.array_equal(np.sort(draws[0]), np.sort(draws[1]))  # another subset


def test_sampling_weights_give_the_same_batches_on_any_number_of_ranks():
    one = [s.global_ for s in epoch_steps(mixture_sampler(), 1)]
    for world in (2, 4):
        ranks = [epoch_steps(mixture_sampler(r, world), 1) for r in range(world)]
        for i, batch in enumerate(one):
            assert all(np.array_equal(steps[i].global_, batch) for steps in ranks)
            shares = np.concatenate([steps[i].local for steps in ranks])
            assert sorted(shares.tolist()) == sorted(batch.tolist())


def test_sampling_weights_resume_mid_epoch_and_refuse_other_weights():
    whole = epoch_steps(mixture_sampler(), 2)
    first = mixture_sampler()
    first.set_epoch(2)
    it = iter(first)
    done = [next(it) for _ in range(7)]
    state = first.state_dict()
    resumed = mixture_sampler(world_size=2)  # elastic: on 2 ranks, the same batches
    resumed.load_state_dict(state)
    rest = [s.global_.tolist() for s in resumed]
    assert [s.global_.tolist() for s in done] + rest == [s.global_.tolist() for s in whole]
    other = DistributedBatchSampler(1400, 32, 0, 1, seed=9, mixture=(SIZES, [0.4, 0.4, 0.2]))
    with pytest.raises(CheckpointError, match="mixture"):
        other.load_state_dict(state)


def test_replayed_data_takes_its_fraction_of_an_epoch_that_grows_by_it():
    """Fine-tuning's replay: the new sets (30 and 10 structures, no sampling weights)
    are each seen once per epoch, the replayed set (500) gives a quarter of the epoch,
    a fresh draw without repeats each epoch; the sampler resumes such an epoch."""
    from hpctrain.training_sets import mixture_of

    class Sized:
        def __init__(self, n, replay_fraction=None):
            self.n, self.sampling_weight, self.replay_fraction = n, None, replay_fraction

        def __len__(self):
            return self.n

    sets = [Sized(30), Sized(10), Sized(500, replay_fraction=0.25)]
    sizes, weights, total = mixture_of(sets)
    assert sizes == [30, 10, 500] and total == 53  # 40 / 0.75, rounded
    assert mixture_counts(sizes, weights, total).tolist() == [30, 10, 13]
    draws = []
    for epoch in range(2):
        sampler = DistributedBatchSampler(540, 8, 0, 1, seed=4, mixture=(sizes, weights, total))
        sampler.set_epoch(epoch)
        drawn = np.concatenate([s.global_ for s in sampler])
        assert len(drawn) == 53 == sampler.epoch_length
        assert sorted(drawn[drawn < 40].tolist()) == list(range(40))  # the new data once
        replayed = drawn[drawn >= 40]
        assert len(replayed) == len(set(replayed.tolist())) == 13
        draws.append(set(replayed.tolist()))
    assert draws[0] != draws[1]
    # resumed mid-epoch on another number of ranks: the same batches
    first = DistributedBatchSampler(540, 8, 0, 1, seed=4, mixture=(sizes, weights, total))
    expected = [s.global_.tolist() for s in first.plan()]
    it = iter(first)
    done = [next(it).global_.tolist() for _ in range(3)]
    again = DistributedBatchSampler(540, 8, 1, 2, seed=4, mixture=(sizes, weights, total))
    again.load_state_dict(first.state_dict())
    assert done + [s.global_.tolist() for s in again.plan()] == expected
