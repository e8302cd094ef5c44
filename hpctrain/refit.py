"""After training: the composition baseline refitted on what the trained network
leaves of the training energies (``refit_composition``; the fit itself is
:func:`hpctrain.composition.residual_fits`), for the last weights and for the best
ones."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import torch

from . import finetune
from .composition import residual_fits
from .data.batch import Batch
from .data.loader import BatchLoader
from .data.sampler import shard_for_rank

if TYPE_CHECKING:
    from .engine import Engine


def baseline_targets(engine: Engine) -> list[str]:
    """The energy targets whose composition baseline the training fitted: labelled in
    the training set, and not kept from a pretrained model."""
    hp = engine.hypers
    if not hp.fit_composition or not hasattr(engine.model, "set_baseline"):
        return []
    tuned = hp.finetune
    kept = finetune.pretrained_targets(tuned) if tuned and tuned.composition == "keep" else set()
    labelled = {name for d in engine.train_set.datasets for name in d.info.targets}
    return [
        name
        for name, target in engine.targets.items()
        if target.quantity == "energy" and not target.per_atom and name in labelled
        if name not in kept
    ]


def refit_baselines(engine: Engine) -> None:
    """Refit the baselines of :func:`baseline_targets` once, after the last step, on
    this rank's share of the training set; the best weights get theirs too (they are
    the last ones when the last validation was the best)."""
    names = baseline_targets(engine)
    if engine.progress.baseline_refit or not names:
        return
    model = engine.model
    best = engine.best
    if best is not None and best["step"] != engine.progress.step:
        last = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(best["model_state"])
        refit_model(engine, names, "the best weights")
        best["model_state"]["composition"] = model.composition.detach().to("cpu", copy=True)
        model.load_state_dict(last)
        refit_model(engine, names, "the last weights")
    else:
        refit_model(engine, names, "the trained weights")
        if best is not None:
            best["model_state"]["composition"] = model.composition.detach().to("cpu", copy=True)
    engine.progress.baseline_refit = True


def refit_model(engine: Engine, names: list[str], which: str) -> None:
    """Fit the change of each baseline on this rank's share of the training set with
    the model's present weights and apply it; the log gives the change and the
    validation energy RMSE before and after."""
    model = engine.model
    model.eval()
    types = list(model.atomic_types)
    train = residual_fits(
        predicted_energies(engine), shares(engine, [engine.train_set]), names, types
    )
    checks = residual_fits(
        predicted_energies(engine), shares(engine, engine.val_sets), names, types
    )
    for name in names:
        fit, check = train[name], checks[name]
        change = fit.change()
        i = model.target_names.index(name)
        model.set_baseline(name, model.composition[i].detach().double().cpu() + change)
        unit = engine.targets[name].unit
        validation = ""
        if check.structures:
            before, after = check.rmse(), check.rmse(change)
            validation = f"; validation energy RMSE {before:.4g} -> {after:.4g} {unit}/atom"
        engine.log.info(
            f"composition baseline of '{name}' refitted on {which} ({fit.structures} "
            f"training structures): {fit.per_atom(change):+.4g} {unit} per atom on their "
            f"mean composition{validation}"
        )


def predicted_energies(engine: Engine) -> Callable[[Batch], dict[str, torch.Tensor]]:
    """The model's energies of a batch (no forces)."""
    return lambda batch: engine.energies(batch, batch.positions, None)


def shares(engine: Engine, datasets: list) -> Iterator[Batch]:
    """This rank's share of each of ``datasets``, in batches on the device."""
    ctx = engine.context
    size = max(1, engine.hypers.batch_size // ctx.world_size)
    for dataset in datasets:
        loader = BatchLoader(dataset, engine.requests, engine.device)
        indices = shard_for_rank(len(dataset), ctx.rank, ctx.world_size)
        for i in range(0, len(indices), size):
            yield loader.make(indices[i : i + size]).to(engine.device)
