"""A stopped, killed or diverged run: real processes, real signals.

Runs pause at a step the test chooses (``tests/hooks``) and the signal or kill is sent
there, so that each test stops its run at a known step on a fast or a slow machine.
"""

import json
import os
import random
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import (
    DRIVERS,
    EXAMPLE_XYZ,
    hpctrain,
    paused_env,
    release,
    start,
    tiny_options,
    wait_until_paused,
    write_options,
)

from hpctrain import checkpoint

pytestmark = pytest.mark.slow

# 12 epochs of 10 steps (80 training structures in batches of 8), a checkpoint every
# 4 steps and at each epoch's end
OPTIONS = tiny_options(
    seed=77,
    base_precision=64,
    architecture={
        "model": {"d_model": 8, "angular_channels": 2},
        "training": {"num_epochs": 12, "learning_rate": 0.005},
    },
    test_set=0.1,
    checkpoint={"every_n_steps": 4, "keep_last": 2},
)
del OPTIONS["distributed"]  # the default timeout


@pytest.fixture(scope="module")
def resume_dir(tmp_path_factory):
    """The data and ``options.yaml`` that every run of this module shares."""
    path = tmp_path_factory.mktemp("resume")
    (path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    write_options(path, OPTIONS)
    return path


def final_weights(run_dir):
    return torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]


@pytest.fixture(scope="module")
def uninterrupted(resume_dir):
    result = hpctrain("options.yaml", "-o", "straight", cwd=resume_dir)
    assert result.returncode == 0, result.stderr
    return final_weights(resume_dir / "straight")


@pytest.fixture(scope="module")
def uninterrupted_on_two_ranks(resume_dir):
    result = hpctrain("options.yaml", "-o", "straight-2", cwd=resume_dir, launcher="mpiexec")
    assert result.returncode == 0, result.stderr
    return final_weights(resume_dir / "straight-2")


def stopped_at(resume_dir, run_dir, step, sig) -> subprocess.Popen:
    """A run into ``run_dir`` paused after ``step`` and sent ``sig`` there; ended."""
    pauses = run_dir.parent / f"pauses-{run_dir.name}"
    proc = start("options.yaml", "-o", run_dir, cwd=resume_dir, env=paused_env(pauses, step))
    wait_until_paused(pauses, step, proc=proc)
    proc.send_signal(sig)
    proc.communicate(timeout=120)
    return proc


def continue_auto(resume_dir, run_dir, launcher=None) -> subprocess.CompletedProcess:
    """``--continue auto`` in ``run_dir``, to its end."""
    return hpctrain(
        "options.yaml", "-o", run_dir, "--continue", "auto", cwd=resume_dir, launcher=launcher
    )


def assert_same_weights(run_dir, expected):
    final = final_weights(run_dir)
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


def test_sigusr1_checkpoints_exits_75_and_resumes_bitwise(resume_dir, uninterrupted, tmp_path):
    run_dir, pauses = tmp_path / "run", tmp_path / "pauses"
    proc = start("options.yaml", "-o", run_dir, cwd=resume_dir, env=paused_env(pauses, 4))
    wait_until_paused(pauses, 4, proc=proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGUSR1 at step 5;" in err and "continue_from: auto" in err
    assert checkpoint.committed_steps(run_dir / "checkpoints")[-1][0] == 5
    result = continue_auto(resume_dir, run_dir)
    assert result.returncode == 0, result.stderr
    assert f"newest committed checkpoint is {run_dir / 'checkpoints'}" in result.stdout
    assert "resuming at step 5 " in result.stdout
    assert_same_weights(run_dir, uninterrupted)
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    epochs = [row.split(",")[0] for row in rows]
    assert epochs[0] == "epoch" and epochs[1:] == [str(e) for e in range(1, 13)]


def test_sigkill_resumes_from_the_last_committed_checkpoint(resume_dir, uninterrupted, tmp_path):
    run_dir, pauses = tmp_path / "run", tmp_path / "pauses"
    proc = start("options.yaml", "-o", run_dir, cwd=resume_dir, env=paused_env(pauses, 12))
    wait_until_paused(pauses, 12, proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run_dir / "model.ckpt").exists()
    # checkpoints at steps 4, 8 and 10 (an epoch's end), each committed at a later step
    # once its files are on disk: the newest committed is 10, or an older one on a slow disk
    step = checkpoint.committed_steps(run_dir / "checkpoints")[-1][0]
    assert step in (4, 8, 10), step
    result = continue_auto(resume_dir, run_dir)
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {step} " in result.stdout
    assert_same_weights(run_dir, uninterrupted)


def test_auto_with_nothing_to_continue_starts_afresh(resume_dir, uninterrupted, tmp_path):
    result = continue_auto(resume_dir, tmp_path / "run")
    assert result.returncode == 0, result.stderr
    assert "no checkpoint in" in result.stdout
    assert_same_weights(tmp_path / "run", uninterrupted)


def test_stopped_on_two_ranks_resumed_on_one(resume_dir, uninterrupted, tmp_path):
    run_dir, pauses = tmp_path / "run", tmp_path / "pauses"
    proc = start(
        "options.yaml", "-o", run_dir, cwd=resume_dir, launcher="mpiexec", env=paused_env(pauses, 4)
    )
    ranks = wait_until_paused(pauses, 4, ranks=2, proc=proc)
    # the signal reaches one rank; the ranks agree and stop together
    os.kill(ranks[-1], signal.SIGUSR1)
    release(pauses, 4)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert "stopped by SIGUSR1 at step 5;" in err, err[-3000:]
    record = checkpoint.latest(run_dir / "checkpoints") / "COMMITTED"
    assert '"world_size": 2' in record.read_text() and '"step": 5' in record.read_text()
    result = continue_auto(resume_dir, run_dir)
    assert result.returncode == 0, result.stderr
    assert "resuming at step 5 " in result.stdout
    # the same global batches in the same order: the weights agree up to summation order
    final = torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, rtol=1e-7, atol=1e-10)


SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@pytest.mark.parametrize("trial", range(5))
def test_stopped_at_a_random_step_resumes_bitwise(
    resume_dir, uninterrupted, uninterrupted_on_two_ranks, tmp_path, trial
):
    """Three runs on one process and two on two MPI ranks, each stopped by a signal
    at a random step (mid-epoch or at an epoch's end), then continued with the same
    number of ranks: the final weights equal the uninterrupted run's."""
    rng = random.Random(trial)
    ranks = 1 if trial < 3 else 2
    launcher = "mpiexec" if ranks == 2 else None
    expected = uninterrupted if ranks == 1 else uninterrupted_on_two_ranks
    sig = SIGNALS[trial % 3]
    pause_at = rng.randint(1, 118)  # 12 epochs of 10 steps: the run stops at the next step
    run_dir, pauses = tmp_path / "run", tmp_path / "pauses"
    env = paused_env(pauses, pause_at)
    proc = start("options.yaml", "-o", run_dir, cwd=resume_dir, launcher=launcher, env=env)
    pids = wait_until_paused(pauses, pause_at, ranks=ranks, proc=proc)
    os.kill(rng.choice(pids), sig)
    release(pauses, pause_at)
    out, err = proc.communicate(timeout=300)
    assert f"stopped by {sig.name} at step {pause_at + 1};" in err, err[-3000:]
    if ranks == 1:
        assert proc.returncode == 75
    assert checkpoint.committed_steps(run_dir / "checkpoints")[-1][0] == pause_at + 1
    result = continue_auto(resume_dir, run_dir, launcher)
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {pause_at + 1} " in result.stdout
    assert_same_weights(run_dir, expected)


def traced_epochs(trace_dir: Path) -> dict[int, Counter]:
    """How often each training structure was handed out, per epoch, over all runs."""
    seen: dict[int, Counter] = {}
    for path in trace_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            seen.setdefault(record["epoch"], Counter()).update(record["local"])
    return seen


def test_elastic_two_ranks_then_one_then_two_trains_each_structure_once_per_epoch(
    resume_dir, tmp_path
):
    trace = tmp_path / "trace"
    trace.mkdir()
    env = paused_env(tmp_path / "pauses", 15, 28, SAMPLE_TRACE_DIR=str(trace))
    traced = DRIVERS / "sample_trace.py"
    output, pauses = tmp_path / "run", tmp_path / "pauses"
    checkpoints = output / "checkpoints"
    # stopped on two ranks mid-epoch (after step 16), then on one (after step 29)
    for launcher, ranks, pause_at in (("mpiexec", 2, 15), (None, 1, 28)):
        proc = start(
            *("options.yaml", "-o", output, "--continue", "auto"),
            cwd=resume_dir,
            launcher=launcher,
            program=traced,
            env=env,
        )
        pids = wait_until_paused(pauses, pause_at, ranks=ranks, proc=proc)
        os.kill(pids[-1], signal.SIGUSR1)
        release(pauses, pause_at)
        out, err = proc.communicate(timeout=300)
        assert f"stopped by SIGUSR1 at step {pause_at + 1};" in err, err[-3000:]
        assert checkpoint.committed_steps(checkpoints)[-1][0] == pause_at + 1
    last = start(
        *("options.yaml", "-o", output, "--continue", "auto"),
        cwd=resume_dir,
        launcher="mpiexec",
        program=traced,
        env=env,
    )
    out, err = last.communicate(timeout=300)
    assert last.returncode == 0, err[-3000:]
    assert "resuming at step 29 " in out
    n_train = 80  # 100 structures, 10 % validation, 10 % test
    seen = traced_epochs(trace)
    assert sorted(seen) == list(range(12))
    for epoch, counts in seen.items():
        assert sorted(counts) == list(range(n_train)), f"epoch {epoch}: not every structure"
        assert set(counts.values()) == {1}, f"epoch {epoch}: some structures trained twice"


@pytest.mark.parametrize(
    "point, sig, ranks",
    [
        ("load", signal.SIGTERM, 1),
        ("last-validation", signal.SIGUSR2, 1),
        ("last-validation", signal.SIGTERM, 2),
        ("export", signal.SIGUSR1, 1),
    ],
)
def test_a_stop_signal_outside_training_exits_75_and_auto_completes_the_run(
    resume_dir, uninterrupted, uninterrupted_on_two_ranks, tmp_path, point, sig, ranks
):
    """While the data loads: the run ends at once, nothing to save. During the last
    validation: training ends, the final checkpoint is written, then the run stops.
    During the export: the export is abandoned, the final checkpoint stays. Each time
    ``--continue auto`` completes the run directory with the uninterrupted weights."""
    run_dir, pauses = tmp_path / "run", tmp_path / "pauses"
    launcher = "mpiexec" if ranks == 2 else None
    env = paused_env(pauses, point)
    proc = start("options.yaml", "-o", run_dir, cwd=resume_dir, launcher=launcher, env=env)
    pids = wait_until_paused(pauses, point, ranks=ranks, proc=proc)
    os.kill(pids[-1], sig)  # one rank only: the ranks agree
    release(pauses, point)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75 if ranks == 1 else proc.returncode != 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    if point == "load":
        assert f"stopped by {sig.name} before training began" in err, err[-3000:]
        assert not (run_dir / "checkpoints").exists() and not (run_dir / "model.ckpt").exists()
    else:
        expected = "after training ended" if point == "last-validation" else "while exporting"
        assert f"stopped by {sig.name} {expected}" in err, err[-3000:]
        assert f"the final checkpoint {run_dir / 'model.ckpt'} is written" in err
        assert (run_dir / "model.ckpt").exists() and not (run_dir / "model.pt").exists()
        assert not list(run_dir.glob(".model.pt*"))
    result = continue_auto(resume_dir, run_dir, launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    if point != "load":
        assert "training already ended at step 120 (epoch 12)" in result.stdout
    for name in ("model.ckpt", "model.pt", "test_metrics.json", "options.resolved.yaml"):
        assert (run_dir / name).exists(), name
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == [str(e) for e in range(1, 13)]
    assert_same_weights(run_dir, uninterrupted if ranks == 1 else uninterrupted_on_two_ranks)


def test_ctrl_c_checkpoints_like_sigterm_and_a_second_one_stops_at_once(
    resume_dir, uninterrupted, tmp_path
):
    run_dir, pauses = tmp_path / "run", tmp_path / "pauses"
    proc = start("options.yaml", "-o", run_dir, cwd=resume_dir, env=paused_env(pauses, 4))
    wait_until_paused(pauses, 4, proc=proc)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    assert "stopped by SIGINT at step 5;" in err and "Traceback" not in err
    assert checkpoint.committed_steps(run_dir / "checkpoints")[-1][0] == 5
    result = continue_auto(resume_dir, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 5 " in result.stdout
    assert_same_weights(run_dir, uninterrupted)

    # pressed twice: the second one ends the run at once, without a checkpoint
    run_dir, pauses = tmp_path / "twice", tmp_path / "pauses-twice"
    proc = start("options.yaml", "-o", run_dir, cwd=resume_dir, env=paused_env(pauses, "12!"))
    wait_until_paused(pauses, 12, proc=proc)
    proc.send_signal(signal.SIGINT)
    received = pauses / "received-12-rank-0"  # the first is handled (a flag) ...
    deadline = time.monotonic() + 120
    while not received.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert received.read_text() == "SIGINT"
    proc.send_signal(signal.SIGINT)  # ... before the second comes
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "hpctrain: interrupted" in err and "Traceback" not in err, err[-3000:]
    assert not (run_dir / "model.ckpt").exists()
    assert checkpoint.committed_steps(run_dir / "checkpoints")[-1][0] <= 12


def test_auto_sets_a_damaged_newest_checkpoint_aside_and_continues_the_one_before(
    resume_dir, uninterrupted, tmp_path
):
    run_dir = tmp_path / "run"
    assert stopped_at(resume_dir, run_dir, 12, signal.SIGTERM).returncode == 75
    steps = checkpoint.committed_steps(run_dir / "checkpoints")
    (newest_step, newest), (before, _) = steps[-1], steps[-2]
    assert newest_step == 13
    shared = newest / "replicated.pt"
    shared.write_bytes(shared.read_bytes()[: shared.stat().st_size // 2])  # truncated
    explicit = hpctrain(
        "options.yaml", "-o", tmp_path / "strict", "--continue", newest, cwd=resume_dir
    )
    assert explicit.returncode == 2 and "not a readable checkpoint" in explicit.stderr
    result = continue_auto(resume_dir, run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    aside = run_dir / "checkpoints" / "step-000000013.damaged"
    assert f"checkpoint {newest} cannot be read" in result.stdout
    assert f"Set aside as {aside} (kept, not deleted)" in result.stdout
    assert "cannot be read" in (run_dir / "train.log").read_text()
    assert (aside / "replicated.pt").exists() and (aside / "COMMITTED").exists()
    assert f"resuming at step {before} " in result.stdout
    assert_same_weights(run_dir, uninterrupted)


def test_auto_with_every_checkpoint_damaged_stops_naming_them(resume_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert stopped_at(resume_dir, run_dir, 5, signal.SIGTERM).returncode == 75
    for _, path in checkpoint.committed_steps(run_dir / "checkpoints"):
        (path / "replicated.pt").write_bytes(b"garbage")
    result = continue_auto(resume_dir, run_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "no committed checkpoint in" in message and "step-000000006.damaged" in message
    assert "Traceback" not in result.stderr
