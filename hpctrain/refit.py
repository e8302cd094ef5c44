"""After training: the composition baseline refitted on what the trained network
leaves of the training energies (``refit_composition``; the fit itself is
:func:`hpctrain.composition.refit`), for the last weights and for the best ones."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import finetune
from .composition import refit
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
    """One pass over this rank's share of the training set with the model's present
    weights; the change of each baseline is logged."""
    ctx, model = engine.context, engine.model
    size = max(1, engine.hypers.batch_size // ctx.world_size)
    shares = shard_for_rank(len(engine.train_set), ctx.rank, ctx.world_size)
    batches = (
        engine.loader.make(shares[i : i + size]).to(engine.device)
        for i in range(0, len(shares), size)
    )
    model.eval()
    changes = refit(
        lambda batch: engine.energies(batch, batch.positions, None),
        batches,
        names,
        list(model.atomic_types),
    )
    for name, (change, per_atom, structures) in changes.items():
        i = model.target_names.index(name)
        model.set_baseline(name, model.composition[i].detach().double().cpu() + change)
        unit = engine.targets[name].unit
        engine.log.info(
            f"composition baseline of '{name}' refitted on {which} ({structures} training "
            f"structures): {per_atom:+.4g} {unit} per atom on their mean composition"
        )
