"""The shared engine in one process: accumulation, clipping, EMA, schedules."""

import math

import pytest
import torch
from conftest import EXAMPLE_XYZ

from architectures.mp_transformer import __model__ as Model
from hpctrain import run
from hpctrain.config import parse
from hpctrain.data import read_dataset
from hpctrain.engine import Engine, TrainingHypers
from hpctrain.errors import OptionsError
from hpctrain.optim import LearningRate
from hpctrain.options import DatasetOptions

TINY = {"d_model": 8, "num_heads": 2, "num_layers": 1, "num_radial": 4, "angular_channels": 2}


@pytest.fixture(scope="module")
def ethanol():
    options = parse(DatasetOptions, {"systems": {"read_from": str(EXAMPLE_XYZ)}})
    dataset = read_dataset(options, "training_set", "test", torch.float64)
    return dataset.subset(range(24)), dataset.subset(range(90, 96))


@pytest.fixture(autouse=True)
def context():
    with run.use(run.RunContext(seed=11)):
        yield


def train(ethanol, tmp_path, **hypers):
    train_set, val_set = ethanol
    torch.manual_seed(0)
    model = Model(TINY, train_set.info)
    config = parse(TrainingHypers, {"num_epochs": 1, "batch_size": 8, **hypers})
    engine = Engine(
        config, model, torch.device("cpu"), [train_set], [val_set], tmp_path, lambda p: None
    )
    steps = []
    engine.optimizer.register_step_pre_hook(
        lambda opt, args, kwargs: steps.append(
            {
                "grad_norm": torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in model.parameters() if p.grad is not None])
                ).item(),
                "weights": [p.detach().clone() for p in model.parameters()],
            }
        )
    )
    engine.trajectory = []
    engine.optimizer.register_step_post_hook(
        lambda opt, args, kwargs: engine.trajectory.append(
            [p.detach().clone() for p in model.parameters()]
        )
    )
    engine.train()
    return model, engine, steps


def test_gradient_accumulation_does_not_change_the_result(ethanol, tmp_path):
    one, *_ = train(ethanol, tmp_path)
    three, *_ = train(ethanol, tmp_path, accumulation_steps=3)
    for a, b in zip(one.parameters(), three.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_gradient_clipping_bounds_the_norm_seen_by_the_optimizer(ethanol, tmp_path):
    _, _, free = train(ethanol, tmp_path)
    limit = 0.5 * min(step["grad_norm"] for step in free)
    _, _, clipped = train(ethanol, tmp_path, grad_clip=limit)
    assert all(step["grad_norm"] <= limit * (1 + 1e-9) for step in clipped)
    assert max(step["grad_norm"] for step in free) > limit


def test_ema_weights_are_the_average_of_the_trajectory(ethanol, tmp_path):
    decay = 0.6
    model, engine, steps = train(ethanol, tmp_path, ema_decay=decay, learning_rate=0.05)
    after = engine.trajectory  # weights after each optimizer step
    assert len(after) == len(steps) == 3
    expected = steps[0]["weights"]  # the weights before training
    for weights in after:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights)]
    for e, p in zip(expected, model.parameters()):
        torch.testing.assert_close(p.detach(), e, rtol=1e-12, atol=1e-12)
    assert any(not torch.allclose(p, last) for p, last in zip(model.parameters(), after[-1]))


def test_a_nan_loss_stops_before_the_update_and_keeps_good_checkpoints(ethanol, tmp_path):
    from hpctrain import checkpoint
    from hpctrain.errors import TrainingDiverged
    from hpctrain.options import CheckpointOptions

    context = run.RunContext(
        seed=11, run_dir=tmp_path, checkpoint=CheckpointOptions(every_n_steps=1)
    )
    with run.use(context):  # the engine reads it when made
        train_set, val_set = ethanol
        model = Model(TINY, train_set.info)
        config = parse(TrainingHypers, {"num_epochs": 3, "batch_size": 8})
        engine = Engine(
            config,
            model,
            torch.device("cpu"),
            [train_set],
            [val_set],
            tmp_path,
            lambda path: checkpoint.save(
                {**model.checkpoint_payload(), "trainer_state": engine.state_dict()}, path
            ),
        )
        compute_loss = engine.compute_loss
        calls = []

        def poisoned(*args, **kwargs):
            loss, parts = compute_loss(*args, **kwargs)
            calls.append(1)
            return (loss * float("nan"), parts) if len(calls) == 5 else (loss, parts)

        engine.compute_loss = poisoned
        after = []
        engine.optimizer.register_step_post_hook(
            lambda *a: after.append({k: v.clone() for k, v in model.state_dict().items()})
        )
        with pytest.raises(TrainingDiverged, match="at step 5 .epoch 2.; the weights were not"):
            engine.train()
    # the optimizer stepped 4 times: the weights are those after step 4
    assert len(after) == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, after[-1][key]), key
    latest = checkpoint.latest(tmp_path / "checkpoints")
    assert latest.name == "step-000000004"
    state = checkpoint.load(latest)["model_state"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_mixed_precision_needs_cuda(ethanol, tmp_path):
    with pytest.raises(OptionsError, match="mixed_precision' needs a CUDA device"):
        train(ethanol, tmp_path, mixed_precision=True)


def optimizer():
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    opt = optimizer()
    lr = LearningRate(
        opt, 1.0, "cosine", total_steps=110, warmup_steps=10, min_ratio=0.1, patience=1
    )
    values = []
    for _ in range(110):
        values.append(opt.param_groups[0]["lr"])
        lr.step()
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert values[10] == pytest.approx(1.0)
    assert values[60] == pytest.approx(0.1 + 0.9 * 0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))


def test_plateau_schedule_halves_after_patience_and_resumes_exactly():
    opt = optimizer()
    lr = LearningRate(
        opt, 1.0, "plateau", total_steps=100, warmup_steps=0, min_ratio=0.2, patience=2
    )
    for loss in (1.0, 0.5, 0.6, 0.6):
        lr.observe(loss)
    assert opt.param_groups[0]["lr"] == 1.0
    lr.observe(0.7)  # third validation without improvement
    assert opt.param_groups[0]["lr"] == 0.5
    state = lr.state_dict()
    other = LearningRate(optimizer(), 1.0, "plateau", 100, 0, 0.2, 2)
    other.load_state_dict(state)
    assert other.value() == 0.5
    for _ in range(9):
        lr.observe(1.0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.2)  # floor
    assert math.isfinite(lr.best)


def test_composition_fit_and_output_scale(ethanol):
    """Least-squares element energies, the residual per atom, and the network's output
    scale: the RMS force component when forces are trained, else the residual."""
    import ase.io
    import numpy as np

    from hpctrain.composition import fit_composition

    train_set, _ = ethanol
    types = train_set.info.atomic_types
    fit = fit_composition(train_set, "energy", types, run.current())
    frames = ase.io.read(EXAMPLE_XYZ, ":24")
    counts = np.array([[np.sum(f.numbers == z) for z in types] for f in frames], dtype=float)
    energies = np.array([f.get_potential_energy() for f in frames])
    # ethanol: every structure has the same composition, so only the total is fixed
    np.testing.assert_allclose(counts @ fit.weights.numpy(), energies.mean(), rtol=1e-10)
    residual = (energies - counts @ fit.weights.numpy()) / counts.sum(axis=1)
    assert fit.energy_scale == pytest.approx(np.sqrt(np.mean(residual**2)), rel=1e-8)
    forces = np.concatenate([f.get_forces() for f in frames])
    assert fit.forces_scale == pytest.approx(np.sqrt(np.mean(forces**2)), rel=1e-8)
    assert fit.output_scale == fit.forces_scale
    options = parse(
        DatasetOptions,
        {"systems": {"read_from": str(EXAMPLE_XYZ)}, "targets": {"energy": {"forces": False}}},
    )
    energy_only = read_dataset(options, "training_set", "test", torch.float64).subset(range(24))
    fit = fit_composition(energy_only, "energy", types, run.current())
    assert fit.forces_scale is None and fit.output_scale == fit.energy_scale


def test_geometry_keeps_its_precision_under_autocast():
    """Mixed precision runs the network in bfloat16, never the positions and cells:
    the strain product for stress would otherwise round positions to three digits
    (the CPU's autocast casts matrix products as CUDA's does)."""
    import dataclasses

    from metatomic.torch import NeighborListOptions

    from hpctrain.data.batch import collate, pair_vectors
    from hpctrain.systems import NeighborLists, make_systems

    options = parse(
        DatasetOptions,
        {"systems": {"read_from": str(EXAMPLE_XYZ)}, "targets": {"energy": {"forces": True}}},
    )
    dataset = read_dataset(options, "training_set", "test", torch.float32)
    request = NeighborListOptions(cutoff=4.0, full_list=False, strict=True)
    batch = collate([dataset[i] for i in range(3)], [request])
    # periodic, so that stress applies
    batch = dataclasses.replace(
        batch, cells=torch.eye(3).repeat(3, 1, 1) * 20.0, pbcs=torch.ones(3, 3, dtype=torch.bool)
    )
    neighbors = NeighborLists([request])
    strain = torch.zeros(3, 3, 3, requires_grad=True)
    plain = make_systems(batch, batch.positions, strain, neighbors)
    vectors = pair_vectors(batch.pairs[0], batch.positions, strain)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = make_systems(batch, batch.positions, strain, neighbors)
        mixed_vectors = pair_vectors(batch.pairs[0], batch.positions, strain)
    for a, b in zip(plain, mixed):
        assert b.positions.dtype == b.cell.dtype == torch.float32
        assert torch.equal(a.positions, b.positions) and torch.equal(a.cell, b.cell)
    # (the batch path computes its pair vectors under the same rule)
    assert mixed_vectors.dtype == torch.float32 and torch.equal(vectors, mixed_vectors)


def test_the_loss_scales_are_measured_once_and_kept_in_the_checkpoint(ethanol, tmp_path):
    """A new training measures the scales of its loss; a resumed one keeps the
    checkpoint's, even on other data (so that it trains the same loss)."""
    from hpctrain.composition import fit_composition
    from hpctrain.loss import ENERGY_LENGTH

    train_set, val_set = ethanol
    model, engine, _ = train(ethanol, tmp_path)
    fit = fit_composition(train_set, "energy", model.atomic_types, run.current())
    scales = engine.state_dict()["loss"]["scales"]
    # ethanol: one composition, a residual energy below 0.3 A times the RMS force
    assert fit.energy_scale < ENERGY_LENGTH * fit.forces_scale
    assert scales == {
        "energy": ENERGY_LENGTH * fit.forces_scale,
        "energy forces": fit.forces_scale,
    }
    other = train_set.dataset.subset(range(40, 64))  # other structures, other scales
    config = parse(TrainingHypers, {"num_epochs": 2, "batch_size": 8})
    resumed = Engine(
        config,
        model,
        torch.device("cpu"),
        [other],
        [val_set],
        tmp_path,
        lambda p: None,
        state=engine.state_dict(),
    )
    assert resumed.loss.scales == scales
    fresh = Engine(config, model, torch.device("cpu"), [other], [val_set], tmp_path, lambda p: None)
    assert fresh.loss.scales != scales
