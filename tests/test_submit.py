"""`hpctrain submit`: the sbatch script (golden files), and real jobs on a real SLURM.

The SLURM tests need a running cluster (`bash launch/slurm-dev-cluster.sh up 2`, then
SLURM_CONF and PATH as it prints); CI starts one and sets HPCTRAIN_REQUIRE_SLURM=1,
which turns their skip into a failure.
"""

import os
import shutil
import signal
import subprocess
import time

import pytest
import torch
from conftest import (
    EXAMPLE_XYZ,
    ROOT,
    hpctrain,
    merged,
    paused_env,
    release,
    tiny_options,
    write_options,
)

from hpctrain import checkpoint
from hpctrain.errors import OptionsError
from hpctrain.options import SlurmOptions
from hpctrain.submit import JobRequest, minutes, sbatch_extras, sbatch_script

GOLDEN = ROOT / "tests" / "golden"


@pytest.mark.parametrize(
    "text, expected",
    [("12:00:00", 720), ("1-00:00:00", 1440), ("90", 90), ("00:01:30", 2), ("2:30", 3)],
)
def test_time_limits(text, expected):
    assert minutes(text) == expected


def test_bad_time_and_sbatch_options_are_refused():
    with pytest.raises(OptionsError, match="not a SLURM time limit"):
        minutes("tomorrow")
    with pytest.raises(OptionsError, match="must be a long sbatch option"):
        sbatch_extras(["-q long"])
    assert sbatch_extras(["--qos=long", "#SBATCH --exclusive"]) == {
        "qos": "long",
        "exclusive": True,
    }


@pytest.mark.parametrize(
    "name, slurm",
    [
        (
            "gpu-2x4",
            SlurmOptions(
                nodes=2,
                gpus_per_node=4,
                time="12:00:00",
                partition="gpu",
                account="X",
                cpus_per_task=8,
                sbatch=["--qos=long"],
            ),
        ),
        ("cpu-1x2", SlurmOptions(nodes=1, tasks_per_node=2, time="00:30:00")),
    ],
)
def test_dry_run_script_matches_the_golden_file(name, slurm):
    script = sbatch_script(JobRequest(slurm), "/RUN/slurm")
    golden = GOLDEN / f"submit-{name}.sh"
    if os.environ.get("HPCTRAIN_UPDATE_GOLDEN"):
        golden.write_text(script)
    assert script == golden.read_text()


# -- real SLURM --------------------------------------------------------------------------

# the epochs and the time limit are set by options()
OPTIONS = tiny_options(
    seed=21,
    base_precision=64,
    architecture={
        "model": {"d_model": 8, "angular_channels": 2},
        "training": {"learning_rate": 0.005},
    },
    test_set=0.1,
    checkpoint={"every_n_steps": 5, "keep_last": 2},
    slurm={"nodes": 2, "tasks_per_node": 1, "cpus_per_task": 1},
)
del OPTIONS["distributed"]  # the default timeout
LONG = 30  # epochs; the runs that a test interrupts pause at chosen steps (tests/hooks)


def slurm_available() -> bool:
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


needs_slurm = pytest.mark.skipif(
    not slurm_available() and not os.environ.get("HPCTRAIN_REQUIRE_SLURM"),
    reason="no SLURM cluster (bash launch/slurm-dev-cluster.sh up 2)",
)


@pytest.fixture(scope="module")
def submit_dir(tmp_path_factory):
    """The data, options files and run directories that this module's jobs share."""
    path = tmp_path_factory.mktemp("submit")
    (path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    return path


def options(submit_dir, name, epochs, time_limit="00:10:00"):
    """``OPTIONS`` for ``epochs`` epochs in jobs of ``time_limit``, as ``name.yaml``."""
    changes = {"architecture": {"training": {"num_epochs": epochs}}, "slurm": {"time": time_limit}}
    return write_options(submit_dir, merged(OPTIONS, changes), f"{name}.yaml")


def submit(submit_dir, options_path, run_dir, *extra, env=None):
    """``hpctrain submit``; the job gets the environment ``env`` (default: clean)."""
    return hpctrain(
        *("submit", options_path, "--output-dir", run_dir, *extra),
        cwd=submit_dir,
        env=env,
        timeout=900,
    )


def job_id(result) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    for line in result.stdout.splitlines():
        if line.startswith("submitted job "):
            return line.split()[2].rstrip(":")
    raise AssertionError(result.stdout + result.stderr)


def wait_for(predicate, timeout=600, what="a condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def job_state(job: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job, "-o", "%T"], capture_output=True, text=True
    )
    return out.stdout.strip()


def newest_step(run_dir) -> int:
    steps = checkpoint.committed_steps(run_dir / "checkpoints")
    return steps[-1][0] if steps else -1


@pytest.fixture(scope="module")
def reference(submit_dir):
    """The same training on 2 ranks without any interruption (mpiexec)."""
    path = options(submit_dir, "reference", LONG)
    result = hpctrain(path, "-o", "reference", cwd=submit_dir, launcher="mpiexec")
    assert result.returncode == 0, result.stderr
    return torch.load(submit_dir / "reference" / "model.ckpt", weights_only=False)["model_state"]


def assert_same_weights(run_dir, expected):
    final = torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]
    for key, value in expected.items():
        assert torch.equal(final[key], value), key


@pytest.mark.slow
@needs_slurm
def test_two_nodes_train_and_export_a_model_ase_can_run(submit_dir, tmp_path):
    import ase.io

    from hpctrain.testing import evaluate_exported

    run_dir = submit_dir / "small"
    result = submit(submit_dir, options(submit_dir, "small", 2), run_dir, "--wait")
    job = job_id(result)
    assert "scancel" in result.stdout and "done" not in result.stderr
    assert "2 ranks via slurm" in (run_dir / "train.log").read_text()
    # one task on each node, rank 0 on n1 and rank 1 on n2
    assert {p.name for p in (run_dir / "slurm").glob(f"{job}_*_log.out")} == {
        f"{job}_0_log.out",
        f"{job}_1_log.out",
    }
    sample = tmp_path / "sample.xyz"
    ase.io.write(sample, ase.io.read(EXAMPLE_XYZ, ":3"))
    exported = evaluate_exported(run_dir / "model.pt", sample, run_dir / "extensions")
    for structure in exported:
        for _, _, finite_difference, force in structure["fd"]:
            assert finite_difference == pytest.approx(force, abs=1e-6)


@pytest.mark.slow
@needs_slurm
def test_preemption_and_time_limit_requeue_and_end_with_the_same_weights(submit_dir, reference):
    """The first job is preempted while it pauses after step 5; the requeued one pauses
    after step 20 until the one-minute time limit's signal comes; the third finishes."""
    run_dir, pauses = submit_dir / "interrupted", submit_dir / "pauses-interrupted"
    path = options(submit_dir, "interrupted", LONG, "00:01:00")
    job = job_id(submit(submit_dir, path, run_dir, env=paused_env(pauses, 5, 20)))
    wait_for(lambda: paused(pauses, 5, ranks=2), what="the job to pause after step 5")
    # a job of the higher-priority partition that needs every core preempts ours
    cpus = os.cpu_count()
    high = subprocess.run(
        ["sbatch", "-p", "high", "-N", "2", f"--ntasks-per-node={cpus}", "-o", "/dev/null"]
        + ["--wrap", "sleep 3"],
        capture_output=True,
        text=True,
    )
    assert high.returncode == 0, high.stderr
    wait_for(lambda: (run_dir / "model.pt").exists(), what="the job to finish")
    # (then the test metrics and the job's end: minutes on a loaded machine)
    wait_for(lambda: job_state(job) == "COMPLETED", timeout=300, what="COMPLETED")
    log = (run_dir / "train.log").read_text()
    # started, preempted, cut by the time limit: three starts, two continuations
    assert log.count("continue_from auto: newest committed checkpoint") >= 2, log
    # the ranks checkpointed on each signal
    assert "stop requested at step 6" in log and "stop requested at step 21" in log, log
    assert "resuming at step 6 " in log and "resuming at step 21 " in log, log
    assert_same_weights(run_dir, reference)


@pytest.mark.slow
@needs_slurm
def test_external_requeue_and_a_killed_task_continue_from_the_last_checkpoint(
    submit_dir, reference
):
    path = options(submit_dir, "requeued", LONG)
    run_dir, pauses = submit_dir / "requeued", submit_dir / "pauses-requeued"
    job = job_id(submit(submit_dir, path, run_dir, env=paused_env(pauses, 5, 15)))
    wait_for(lambda: paused(pauses, 5, ranks=2), what="the job to pause after step 5")
    subprocess.run(["scontrol", "requeue", job], check=True)  # SIGTERM to every task
    wait_for(lambda: paused(pauses, 15, ranks=2), what="the requeued job to pause after step 15")
    log = (run_dir / "train.log").read_text()
    assert "resuming at step 6 " in log, log
    # SIGKILL one task: the job fails (SLURM does not requeue a failure) ...
    os.kill(int((pauses / "paused-15-rank-1").read_text()), signal.SIGKILL)
    release(pauses, 15)  # rank 0 goes on into a step whose all-reduce finds no peer
    wait_for(lambda: job_state(job) in {"FAILED", "CANCELLED", "COMPLETED"}, what="the end")
    assert not (run_dir / "model.pt").exists()
    # ... and submitting again continues from the last committed checkpoint
    again = submit(submit_dir, path, run_dir, "--wait", env=paused_env(pauses))
    assert again.returncode == 0, again.stdout + again.stderr
    log = (run_dir / "train.log").read_text()
    assert log.count("newest committed checkpoint") >= 2
    assert_same_weights(run_dir, reference)


def paused(pauses, point, ranks) -> bool:
    """Whether ``ranks`` ranks pause at ``point`` (see ``tests/hooks``)."""
    return all((pauses / f"paused-{point}-rank-{rank}").exists() for rank in range(ranks))


@pytest.mark.slow
@needs_slurm
def test_bad_requests_fail_before_anything_is_submitted(submit_dir):
    path = options(submit_dir, "bad", 2)
    unknown = submit(submit_dir, path, submit_dir / "bad1", "--partition", "nope")
    assert unknown.returncode == 2
    assert "unknown SLURM partition 'nope'; this cluster has: debug, high" in unknown.stderr
    assert not (submit_dir / "bad1" / "slurm").exists()
    impossible = submit(
        submit_dir, path, submit_dir / "bad2", "--nodes", "5", "--cpus-per-task", "64"
    )
    assert impossible.returncode == 2
    assert "partition 'debug' can never run this job: it asks for 5 nodes, but it has 2" in (
        impossible.stderr
    )
    assert "64 cores per node" in impossible.stderr
    assert not (submit_dir / "bad2" / "slurm").exists()
    missing = submit(submit_dir, submit_dir / "missing.yaml", submit_dir / "bad3")
    assert missing.returncode == 2 and "missing.yaml' does not exist" in missing.stderr
