"""Training sets mixed by ``sampling_weight`` in real runs: the banner says each set's
share, and a run stopped mid-epoch resumes bit for bit."""

import csv
import math
import signal

import ase.io
import pytest
import torch
from conftest import hpctrain, paused_env, start, tiny_options, wait_until_paused, write_options

pytestmark = pytest.mark.slow

OPTIONS = tiny_options(
    seed=3,
    base_precision=64,
    architecture={"training": {"num_epochs": 3, "batch_size": 8}},
    training_set=[
        {"systems": "first.xyz", "sampling_weight": 0.7},
        {"systems": "second.xyz", "sampling_weight": 0.3},
    ],
    validation_set=0.1,
    checkpoint={"every_n_steps": 3},
)


@pytest.fixture
def mixed(workdir):
    frames = ase.io.read(workdir / "ethanol.xyz", ":")
    ase.io.write(workdir / "first.xyz", frames[:30])
    ase.io.write(workdir / "second.xyz", frames[30:])
    write_options(workdir, OPTIONS)
    return workdir


def final_weights(run_dir):
    return torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]


def test_a_mixed_run_says_each_share_and_resumes_mid_epoch_bitwise(mixed):
    straight = hpctrain("train", "options.yaml", "-o", "straight", cwd=mixed)
    assert straight.returncode == 0, straight.stderr
    # 27 and 63 training structures (after the validation split), 90 per epoch: 63 and 27
    assert "first.xyz: 63 from 27 (70.0 %)" in straight.stdout
    assert "second.xyz: 27 from 63 (30.0 %)" in straight.stdout

    pauses = mixed / "pauses"
    proc = start("options.yaml", "-o", "stopped", cwd=mixed, env=paused_env(pauses, 4))
    wait_until_paused(pauses, 4, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    resumed = hpctrain("options.yaml", "-o", "stopped", "--continue", "auto", cwd=mixed)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at step 5 " in resumed.stdout
    expected, got = final_weights(mixed / "straight"), final_weights(mixed / "stopped")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def run_with_second_set(workdir, name, second, loss_weight):
    options = {
        **OPTIONS,
        "training_set": [
            {"systems": "first.xyz", "sampling_weight": 0.7},
            {"systems": second, "sampling_weight": 0.3, "loss_weight": loss_weight},
        ],
    }
    write_options(workdir, options, f"{name}.yaml")
    result = hpctrain("train", f"{name}.yaml", "-o", name, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return final_weights(workdir / name), result.stdout


def test_a_set_of_loss_weight_zero_does_not_train_the_model(mixed):
    """The second set with its forces reversed: the same loss scales (RMS forces) and
    batches, so with loss_weight 0 the weights are bit for bit those of the true
    forces; with weight 1 they differ."""
    frames = ase.io.read(mixed / "second.xyz", ":")
    for atoms in frames:
        atoms.calc.results["forces"] = -atoms.get_forces()
    ase.io.write(mixed / "reversed.xyz", frames)
    true_forces, stdout = run_with_second_set(mixed, "true", "second.xyz", 0.0)
    assert "loss weights:" in stdout and "second.xyz: 0" in stdout
    reversed_forces, _ = run_with_second_set(mixed, "reversed", "reversed.xyz", 0.0)
    for key, value in true_forces.items():
        assert torch.equal(reversed_forces[key], value), key
    counted, _ = run_with_second_set(mixed, "counted", "reversed.xyz", 1.0)
    assert any(not torch.equal(counted[k], v) for k, v in true_forces.items())


def test_each_validation_set_has_its_own_metrics(mixed):
    frames = ase.io.read(mixed / "ethanol.xyz", ":")
    ase.io.write(mixed / "val-a.xyz", frames[:6])
    ase.io.write(mixed / "val-b.xyz", frames[80:])
    options = {**OPTIONS, "validation_set": ["val-a.xyz", "val-b.xyz"]}
    write_options(mixed, options, "two.yaml")
    result = hpctrain("train", "two.yaml", "-o", "two", cwd=mixed)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader((mixed / "two" / "metrics.csv").open()))
    assert len(rows) == 3
    column = "val {}energy RMSE [eV/atom]"
    for row in rows:
        total, a, b = (float(row[column.format(p)]) for p in ("", "[0] ", "[1] "))
        # the total is over both sets' structures (6 and 20): a mean of squares
        assert total**2 == pytest.approx((6 * a**2 + 20 * b**2) / 26, rel=1e-9)
        assert float(row["val [1] forces RMSE [eV/A]"]) > 0
    assert "validation_set[0]: energy RMSE" in result.stdout
    assert "validation_set[1]: energy RMSE" in result.stdout
    # the summary speaks of the totals only
    summary = result.stdout[result.stdout.index("training finished") :]
    assert "[0]" not in summary and "validation_set[" not in summary


def test_a_set_with_a_stress_and_one_without_train_together(workdir):
    from hpctrain.testing import emt_structures

    ase.io.write(workdir / "bulk.xyz", emt_structures(True, 40, seed=1))
    ase.io.write(workdir / "molecules.xyz", emt_structures(False, 40, seed=2))
    options = tiny_options(
        architecture={"training": {"num_epochs": 2, "batch_size": 8}},
        training_set=[
            {"systems": "bulk.xyz", "targets": {"energy": {"forces": True, "stress": True}}},
            {"systems": "molecules.xyz", "targets": {"energy": {"forces": True}}},
        ],
        validation_set=0.2,
    )
    write_options(workdir, options)
    result = hpctrain("train", "options.yaml", "-o", "run", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert "stress: on 32 of 64 training structures (32 without" in result.stdout
    assert "bulk.xyz: energy, forces, stress;" in result.stdout  # the banner's labels row
    assert "molecules.xyz: energy, forces" in result.stdout
    rows = list(csv.DictReader((workdir / "run" / "metrics.csv").open()))
    assert len(rows) == 2
    for row in rows:
        assert math.isfinite(float(row["train_loss"]))
        # over the bulk structures only: the molecules' stress is unknown, not zero
        assert float(row["val stress RMSE [eV/A^3]"]) == float(row["val [0] stress RMSE [eV/A^3]"])
        assert not row.get("val [1] stress RMSE [eV/A^3]")  # (no stress in that set)
        assert float(row["val [1] forces RMSE [eV/A]"]) > 0
