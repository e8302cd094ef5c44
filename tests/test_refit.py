"""The composition baseline refitted after training, on what the trained network
leaves of the training energies (``refit_composition``)."""

import re

import ase.io
import pytest
import torch

from architectures.mp_transformer import __model__ as Model
from hpctrain import run
from hpctrain.composition import residual_fits
from hpctrain.config import parse
from hpctrain.data import read_dataset
from hpctrain.data.loader import BatchLoader
from hpctrain.data.sampler import shard_for_rank
from hpctrain.engine import Engine, TrainingHypers
from hpctrain.evaluation import predict
from hpctrain.options import DatasetOptions
from hpctrain.refit import refit_baselines
from hpctrain.testing import emt_structures

TINY = {"d_model": 8, "num_heads": 2, "num_layers": 1, "num_radial": 4, "angular_channels": 2}


@pytest.fixture(scope="module")
def alloys(tmp_path_factory):
    """Cu/Au cells of varying composition, with energies, forces and stress."""
    path = tmp_path_factory.mktemp("alloys") / "alloys.xyz"
    ase.io.write(path, emt_structures(True, 30, seed=5), parallel=False)
    options = parse(
        DatasetOptions,
        {"systems": {"read_from": str(path)}, "targets": {"energy": {"stress": True}}},
    )
    dataset = read_dataset(options, "training_set", "test", torch.float64)
    return dataset.subset(range(24)), dataset.subset(range(24, 30))


@pytest.fixture(autouse=True)
def context():
    with run.use(run.RunContext(seed=11)):
        yield


def trained(alloys, tmp_path, **hypers) -> Engine:
    train_set, val_set = alloys
    torch.manual_seed(0)
    model = Model(TINY, train_set.info)
    config = parse(TrainingHypers, {"num_epochs": 2, "batch_size": 8, **hypers})
    engine = Engine(
        config, model, torch.device("cpu"), [train_set], [val_set], tmp_path, lambda p: None
    )
    engine.train()
    return engine


def training_batches(engine: Engine) -> list:
    shares = shard_for_rank(len(engine.train_set), 0, 1)
    return [engine.loader.make(shares[i : i + 8]) for i in range(0, len(shares), 8)]


def energy_errors(engine: Engine) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-atom energy error of every training structure, and its fraction of each
    element."""
    errors, fractions = [], []
    types = torch.tensor(engine.model.atomic_types)
    for batch in training_batches(engine):
        with torch.no_grad():
            energy = engine.energies(batch, batch.positions, None)["energy"]
        errors.append((energy - batch.targets["energy"]) / batch.n_atoms)
        one_hot = batch.types.unsqueeze(0) == types.unsqueeze(1)  # [elements, atoms]
        counts = torch.stack(
            [(one_hot & (batch.system == i)).sum(1) for i in range(len(batch))]
        ).double()
        fractions.append(counts / batch.n_atoms.unsqueeze(1))
    return torch.cat(errors), torch.cat(fractions)


def training_fit(engine: Engine):
    energies = lambda batch: engine.energies(batch, batch.positions, None)  # noqa: E731
    types = list(engine.model.atomic_types)
    return residual_fits(energies, training_batches(engine), ["energy"], types)["energy"]


def forces_and_stress(engine: Engine) -> list[torch.Tensor]:
    batch = training_batches(engine)[0]
    out = predict(batch, engine.energies, create_graph=False)
    return [out["energy forces"].detach(), out["energy stress"].detach()]


def test_the_refit_lowers_the_energy_error_and_keeps_forces_and_stress(alloys, tmp_path):
    engine = trained(alloys, tmp_path)
    engine.val_sets = []  # (nothing to check the refit against: it applies)
    model = engine.model
    before = model.composition.clone()
    (errors, fractions), gradients = energy_errors(engine), forces_and_stress(engine)
    # the change that fits the per-atom errors by least squares (two elements whose
    # fractions vary: one solution)
    expected = torch.linalg.lstsq(fractions, -errors.unsqueeze(1)).solution.squeeze(1)

    refit_baselines(engine)

    torch.testing.assert_close(model.composition[0] - before[0], expected)
    after, _ = energy_errors(engine)
    assert (after**2).sum() < (errors**2).sum()
    for new, old in zip(forces_and_stress(engine), gradients, strict=True):
        torch.testing.assert_close(new, old, rtol=0, atol=1e-12)
    # a least-squares fit: another one changes nothing
    fit = training_fit(engine)
    change = fit.change()
    assert fit.structures == 24 and abs(fit.per_atom(change)) < 1e-9
    torch.testing.assert_close(change, torch.zeros_like(change), rtol=0, atol=1e-8)
    assert fit.rmse() == pytest.approx(float((after**2).mean().sqrt()), rel=1e-9)
    # once per training: a resumed run that ends at once does not refit again
    assert engine.progress.baseline_refit and engine.state_dict()["progress"]["baseline_refit"]
    shifted = model.composition.add_(1.0).clone()
    refit_baselines(engine)
    assert torch.equal(model.composition, shifted)


def test_the_best_weights_get_their_own_refit(alloys, tmp_path):
    engine = trained(alloys, tmp_path)
    # pretend an earlier validation was the best: other weights than the last
    best_state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    for name, value in best_state.items():
        if name.endswith("readout.3.weight"):
            value.mul_(0.5)
    engine.best = {"epoch": 1, "step": 1, "validation_loss": 1.0, "model_state": best_state}
    engine.val_sets = []
    last_composition = engine.model.composition.clone()

    refit_baselines(engine)

    refitted_best = engine.best["model_state"]["composition"]
    assert not torch.equal(refitted_best, last_composition)
    assert not torch.equal(refitted_best, engine.model.composition)
    # the last weights are back in the model, with their own refit
    torch.testing.assert_close(
        engine.model.state_dict()["readout.3.weight"], best_state["readout.3.weight"] * 2
    )
    engine.model.load_state_dict(engine.best["model_state"])
    change = training_fit(engine).change()
    torch.testing.assert_close(change, torch.zeros_like(change), rtol=0, atol=1e-8)


def test_no_refit_when_switched_off_or_without_a_fitted_baseline(alloys, tmp_path):
    from hpctrain.refit import baseline_targets

    engine = trained(alloys, tmp_path, fit_composition=False)
    assert baseline_targets(engine) == []
    before = engine.model.composition.clone()
    refit_baselines(engine)
    assert torch.equal(engine.model.composition, before) and not engine.progress.baseline_refit


def test_the_log_gives_the_change_and_the_validation_error_before_and_after(
    alloys, tmp_path, caplog
):
    """Validation energies that the trained model predicts exactly: the refit raises
    their error from zero, and the log says so (the refit applies all the same: it
    is least squares on the training set)."""
    import logging

    from hpctrain.report import LOGGER_NAME

    engine = trained(alloys, tmp_path)
    frames = emt_structures(True, 30, seed=5)[24:]
    path = tmp_path / "validation.xyz"
    ase.io.write(path, frames, parallel=False)
    options = parse(DatasetOptions, {"systems": {"read_from": str(path)}})
    validation = read_dataset(options, "validation_set", "test", torch.float64)
    loader = BatchLoader(validation, engine.requests, engine.device)
    with torch.no_grad():
        batch = loader.make(list(range(len(validation))))
        predicted = engine.energies(batch, batch.positions, None)["energy"]
    for atoms, energy in zip(frames, predicted.tolist(), strict=True):
        atoms.info["energy"] = energy
    ase.io.write(path, frames, parallel=False)
    engine.val_sets = [read_dataset(options, "validation_set", "test", torch.float64)]
    expected = training_fit(engine).change()
    before = engine.model.composition.clone()
    with caplog.at_level(logging.INFO, logger=LOGGER_NAME):
        refit_baselines(engine)
    torch.testing.assert_close(engine.model.composition[0] - before[0], expected)
    found = re.search(
        r"composition baseline of 'energy' refitted on the trained weights \(24 training "
        r"structures\): \S+ eV per atom on their mean composition; validation energy "
        r"RMSE (\S+) -> (\S+) eV/atom",
        caplog.text,
    )
    assert found, caplog.text
    assert float(found.group(1)) < 1e-6 < float(found.group(2))
