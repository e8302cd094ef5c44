"""``architecture.training.early_stopping``: training ends when the validation loss
stops improving, the run says so, and a continued run keeps the count."""

import csv
import math

import ase.io
import pytest
import torch
from conftest import hpctrain, merged, tiny_options, write_options

from hpctrain.early_stopping import EarlyStoppingOptions


def test_a_validation_improves_when_it_beats_the_best_by_more_than_min_delta():
    options = EarlyStoppingOptions(patience=2, min_delta=0.1)
    assert options.count(5, 0.95, best_before=1.0) == 6  # better, but by less than 0.1
    assert options.count(5, 0.85, best_before=1.0) == 0
    assert options.count(0, 3.0, best_before=math.inf) == 0  # the first validation
    assert options.count(1, math.nan, best_before=1.0) == 2  # a NaN never improves
    assert options.note(1, epoch=4, num_epochs=10, best=0.5) is None
    note = options.note(2, epoch=4, num_epochs=10, best=0.5)
    assert note.startswith("after epoch 4 of 10") and "by more than 0.1 in 2 validations" in note
    assert options.note(2, epoch=10, num_epochs=10, best=0.5) is None  # not early: the end
    assert EarlyStoppingOptions().note(100, epoch=4, num_epochs=10, best=0.5) is None  # off


# validated on structures whose forces are reversed: the better the model learns the
# training forces, the worse its validation, so the first epoch stays the best
OPTIONS = tiny_options(
    base_precision=64,
    architecture={
        "training": {
            "num_epochs": 8,
            "learning_rate": 0.01,
            "energy_weight": 0,
            "early_stopping": {"patience": 2},
        }
    },
    validation_set={"systems": "reversed.xyz", "targets": {"energy": {"forces": True}}},
)


def write_reversed(workdir):
    frames = ase.io.read(workdir / "ethanol.xyz", "90:")
    for atoms in frames:
        atoms.calc.results["forces"] = -atoms.get_forces()
    ase.io.write(workdir / "reversed.xyz", frames)


def epochs_of(run_dir):
    return [int(row["epoch"]) for row in csv.DictReader((run_dir / "metrics.csv").open())]


def progress_of(run_dir):
    saved = torch.load(run_dir / "model.ckpt", weights_only=False)
    return saved["trainer_state"]["progress"]


@pytest.mark.slow
def test_training_stops_early_and_a_continued_run_keeps_the_count(workdir):
    write_reversed(workdir)
    write_options(workdir, OPTIONS)
    result = hpctrain("train", "options.yaml", "-o", "run", cwd=workdir)
    assert result.returncode == 0, result.stderr
    run_dir = workdir / "run"
    assert epochs_of(run_dir) == [1, 2, 3]  # best at 1, then 2 without improvement
    progress = progress_of(run_dir)
    assert progress["epoch"] == 3 and progress["validations_without_improvement"] == 2
    assert "stopped early: after epoch 3 of 8" in result.stdout
    assert "in 2 validations (patience 2;" in result.stdout
    assert "exported: the best validation's weights (epoch 1," in result.stdout
    assert (run_dir / "model.pt").exists()
    # the last epoch's checkpoint is written, as at the end of any training
    assert (run_dir / "checkpoints" / "step-000000039").is_dir()

    # continued with the same options: nothing left to train
    again = hpctrain("train", "options.yaml", "-o", "run", "--continue", "auto", cwd=workdir)
    assert again.returncode == 0, again.stderr
    assert epochs_of(run_dir) == [1, 2, 3]
    assert "early stopping: training ended after epoch 3 of 8" in again.stdout

    # with more patience, the count goes on from the checkpoint's (2), not from 0
    write_options(
        workdir,
        merged(OPTIONS, {"architecture": {"training": {"early_stopping": {"patience": 4}}}}),
    )
    more = hpctrain("train", "options.yaml", "-o", "run", "--continue", "auto", cwd=workdir)
    assert more.returncode == 0, more.stderr
    assert epochs_of(run_dir) == [1, 2, 3, 4, 5]
    assert progress_of(run_dir)["validations_without_improvement"] == 4
    assert "stopped early: after epoch 5 of 8" in more.stdout


@pytest.mark.slow
def test_without_patience_training_runs_every_epoch(workdir):
    write_reversed(workdir)
    options = merged(
        OPTIONS,
        {"architecture": {"training": {"num_epochs": 4, "early_stopping": {"patience": None}}}},
    )
    write_options(workdir, options)
    result = hpctrain("train", "options.yaml", "-o", "run", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert epochs_of(workdir / "run") == [1, 2, 3, 4]
    assert progress_of(workdir / "run")["validations_without_improvement"] == 3
    assert "stopped early" not in result.stdout
