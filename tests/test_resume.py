"""A stopped, killed or diverged run: real processes, real signals."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import BIN, EXAMPLE_XYZ, clean_env, run

from hpctrain import checkpoint

pytestmark = pytest.mark.slow

OPTIONS = """
seed: 77
base_precision: 64
architecture:
  name: mp_transformer
  model: {d_model: 8, num_heads: 2, num_layers: 1, num_radial: 4, angular_channels: 2}
  training: {num_epochs: 12, batch_size: 8, learning_rate: 0.005}
training_set: ethanol.xyz
validation_set: 0.1
test_set: 0.1
checkpoint: {every_n_steps: 4, keep_last: 2}
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("resume")
    (path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    (path / "options.yaml").write_text(OPTIONS)
    return path


@pytest.fixture(scope="module")
def uninterrupted(workdir):
    result = run([sys.executable, "-m", "hpctrain", "options.yaml", "-o", "straight"], workdir)
    assert result.returncode == 0, result.stderr
    return torch.load(workdir / "straight" / "model.ckpt", weights_only=False)["model_state"]


MPIEXEC_2 = (str(BIN / "mpiexec"), "-n", "2")
DRIVERS = Path(__file__).parent / "drivers"


@pytest.fixture(scope="module")
def uninterrupted_on_two_ranks(workdir):
    result = run(
        [*MPIEXEC_2, sys.executable, "-m", "hpctrain", "options.yaml", "-o", "straight-2"], workdir
    )
    assert result.returncode == 0, result.stderr
    return torch.load(workdir / "straight-2" / "model.ckpt", weights_only=False)["model_state"]


def start(workdir, output, *extra, launcher=(), program=("-m", "hpctrain"), env=None):
    return subprocess.Popen(
        [*launcher, sys.executable, *program, "options.yaml", "-o", output, *extra],
        cwd=workdir,
        env=env or clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def rank_pids(proc, output) -> list[int]:
    """The ranks that ``mpiexec`` (``proc``) started for the run writing to ``output``."""
    found = subprocess.run(
        ["pgrep", "-f", f"options.yaml -o {output}"], capture_output=True, text=True
    ).stdout.split()
    return [int(pid) for pid in found if int(pid) != proc.pid]


def wait_for_checkpoint(root, minimum_step=1, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = checkpoint.committed_steps(root)
        if steps and steps[-1][0] >= minimum_step:
            return steps[-1][0]
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint appeared in {root}")


def assert_same_weights(run_dir, expected):
    final = torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


def test_sigusr1_checkpoints_exits_75_and_resumes_bitwise(workdir, uninterrupted):
    proc = start(workdir, "signalled")
    wait_for_checkpoint(workdir / "signalled" / "checkpoints", 4)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    assert "stopped by SIGUSR1" in err and "continue_from: auto" in err
    stopped_at = checkpoint.committed_steps(workdir / "signalled" / "checkpoints")[-1][0]
    assert 4 <= stopped_at < 120  # mid-training
    result = run(
        [sys.executable, "-m", "hpctrain", "options.yaml", "-o", "signalled"]
        + ["--continue", "auto"],
        workdir,
    )
    assert result.returncode == 0, result.stderr
    assert f"newest committed checkpoint is {workdir / 'signalled' / 'checkpoints'}" in (
        result.stdout
    )
    assert_same_weights(workdir / "signalled", uninterrupted)
    rows = (workdir / "signalled" / "metrics.csv").read_text().splitlines()
    epochs = [row.split(",")[0] for row in rows]
    assert epochs[0] == "epoch" and epochs[1:] == [str(e) for e in range(1, 13)]


def test_sigkill_resumes_from_the_last_committed_checkpoint(workdir, uninterrupted):
    proc = start(workdir, "killed")
    step = wait_for_checkpoint(workdir / "killed" / "checkpoints", 8)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "killed" / "model.ckpt").exists()
    result = run(
        [sys.executable, "-m", "hpctrain", "options.yaml", "-o", "killed", "--continue", "auto"],
        workdir,
    )
    assert result.returncode == 0, result.stderr
    assert step >= 8
    assert_same_weights(workdir / "killed", uninterrupted)


def test_auto_with_nothing_to_continue_starts_afresh(workdir, uninterrupted):
    result = run(
        [sys.executable, "-m", "hpctrain", "options.yaml", "-o", "fresh", "--continue", "auto"],
        workdir,
    )
    assert result.returncode == 0, result.stderr
    assert "no checkpoint in" in result.stdout
    assert_same_weights(workdir / "fresh", uninterrupted)


def test_stopped_on_two_ranks_resumed_on_one(workdir, uninterrupted):
    proc = start(workdir, "elastic", launcher=(str(BIN / "mpiexec"), "-n", "2"))
    wait_for_checkpoint(workdir / "elastic" / "checkpoints", 4)
    # the signal reaches one rank; the ranks agree and stop together
    ranks = subprocess.run(
        ["pgrep", "-f", "hpctrain options.yaml -o elastic"], capture_output=True, text=True
    ).stdout.split()
    ranks = [int(pid) for pid in ranks if int(pid) != proc.pid]
    assert len(ranks) == 2, ranks
    os.kill(ranks[-1], signal.SIGUSR1)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    stopped = checkpoint.committed_steps(workdir / "elastic" / "checkpoints")[-1][0]
    record = checkpoint.latest(workdir / "elastic" / "checkpoints") / "COMMITTED"
    assert '"world_size": 2' in record.read_text()
    result = run(
        [sys.executable, "-m", "hpctrain", "options.yaml", "-o", "elastic", "--continue", "auto"],
        workdir,
    )
    assert result.returncode == 0, result.stderr
    assert stopped < 120
    # the same global batches in the same order: the weights agree up to summation order
    final = torch.load(workdir / "elastic" / "model.ckpt", weights_only=False)["model_state"]
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, rtol=1e-7, atol=1e-10)


SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


@pytest.mark.parametrize("trial", range(5))
def test_stopped_at_a_random_step_resumes_bitwise(
    workdir, uninterrupted, uninterrupted_on_two_ranks, trial
):
    """Three runs on one process and two on two MPI ranks, each stopped by a signal
    at a random moment (so at a random step, mid-epoch or not), then continued with
    the same number of ranks: the final weights equal the uninterrupted run's."""
    rng = random.Random(trial)
    ranks = 1 if trial < 3 else 2
    launcher = MPIEXEC_2 if ranks == 2 else ()
    expected = uninterrupted if ranks == 1 else uninterrupted_on_two_ranks
    output, sig = f"random-{trial}", SIGNALS[trial % 3]
    proc = start(workdir, output, launcher=launcher)
    wait_for_checkpoint(workdir / output / "checkpoints", 1)
    time.sleep(rng.uniform(0.0, 2.0))
    target = proc.pid if ranks == 1 else rng.choice(rank_pids(proc, output))
    os.kill(target, sig)
    out, err = proc.communicate(timeout=300)
    assert f"stopped by {sig.name}" in err, err[-3000:]
    if ranks == 1:
        assert proc.returncode == 75
    stopped = checkpoint.committed_steps(workdir / output / "checkpoints")[-1][0]
    assert 1 <= stopped < 120, stopped  # 12 epochs of 10 steps: stopped during training
    result = run(
        [*launcher, sys.executable, "-m", "hpctrain", "options.yaml", "-o", output]
        + ["--continue", "auto"],
        workdir,
    )
    assert result.returncode == 0, result.stderr
    assert f"resuming at step {stopped} " in result.stdout
    assert_same_weights(workdir / output, expected)


def traced_epochs(trace_dir: Path) -> dict[int, Counter]:
    """How often each training structure was handed out, per epoch, over all runs."""
    seen: dict[int, Counter] = {}
    for path in trace_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            seen.setdefault(record["epoch"], Counter()).update(record["local"])
    return seen


def test_elastic_two_ranks_then_one_then_two_trains_each_structure_once_per_epoch(workdir):
    trace = workdir / "elastic-trace"
    trace.mkdir()
    env = clean_env(SAMPLE_TRACE_DIR=str(trace))
    traced = (str(DRIVERS / "sample_trace.py"),)
    output = "elastic-212"
    checkpoints = workdir / output / "checkpoints"
    stops = []
    for launcher, minimum_step in ((MPIEXEC_2, 15), ((), 0)):
        proc = start(
            workdir, output, "--continue", "auto", launcher=launcher, program=traced, env=env
        )
        newest = checkpoint.committed_steps(checkpoints)
        wait_for_checkpoint(checkpoints, max(minimum_step, newest[-1][0] + 12 if newest else 0))
        target = rank_pids(proc, output)[-1] if launcher else proc.pid
        os.kill(target, signal.SIGUSR1)
        out, err = proc.communicate(timeout=300)
        assert "stopped by SIGUSR1" in err, err[-3000:]
        stops.append(checkpoint.committed_steps(checkpoints)[-1][0])
    assert any(step % 10 for step in stops), stops  # an epoch split between world sizes
    last = start(workdir, output, "--continue", "auto", launcher=MPIEXEC_2, program=traced, env=env)
    out, err = last.communicate(timeout=300)
    assert last.returncode == 0, err[-3000:]
    assert f"resuming at step {stops[-1]} " in out
    n_train = 80  # 100 structures, 10 % validation, 10 % test
    seen = traced_epochs(trace)
    assert sorted(seen) == list(range(12))
    for epoch, counts in seen.items():
        assert sorted(counts) == list(range(n_train)), f"epoch {epoch}: not every structure"
        assert set(counts.values()) == {1}, f"epoch {epoch}: some structures trained twice"
