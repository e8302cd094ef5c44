"""Training sets mixed by ``sampling_weight`` in real runs: the banner says each set's
share, and a run stopped mid-epoch resumes bit for bit."""

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
