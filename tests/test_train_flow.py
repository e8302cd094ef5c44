"""The real flow end to end: one process, mpiexec and torchrun, export, continue."""

import copy
import importlib.util
import json
import signal
import time

import ase.io
import numpy as np
import pytest
import torch
import yaml
from conftest import (
    EXAMPLE_XYZ,
    hpctrain,
    merged,
    paused_env,
    release,
    start,
    tiny_options,
    wait_until_paused,
    write_options,
)

from hpctrain.testing import evaluate_exported, predict_in_memory

pytestmark = pytest.mark.slow

# 2 epochs of 10 steps: 80 training structures in batches of 8
OPTIONS = tiny_options(
    seed=1234,
    base_precision=64,
    architecture={"model": {"num_layers": 2}},
    training_set={"targets": {"energy": {"key": "energy"}}},
    test_set=0.1,
)

FILES = {"options.resolved.yaml", "train.log", "metrics.csv", "model.ckpt", "model.pt"}
RUN_FILES = FILES | {"test_metrics.json", "extensions", "checkpoints"}
if importlib.util.find_spec("tensorboard") is not None:
    RUN_FILES |= {"tensorboard"}  # the same scalars as metrics.csv


def weights(run_dir):
    return torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]


@pytest.fixture(scope="module")
def flow_dir(tmp_path_factory):
    """The data and ``options.yaml`` that the runs of this module share."""
    path = tmp_path_factory.mktemp("flow")
    (path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    write_options(path, OPTIONS)
    return path


@pytest.fixture(scope="module")
def single_run(flow_dir):
    """`hpctrain train` in one process."""
    result = hpctrain("train", "options.yaml", "-o", "single", cwd=flow_dir)
    assert result.returncode == 0, result.stderr
    return flow_dir / "single", result


def test_single_process_writes_every_output(single_run):
    run_dir, result = single_run
    names = {p.name for p in run_dir.iterdir()}
    assert names == RUN_FILES, names
    steps = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert steps == ["step-000000010", "step-000000020"]  # one per epoch (10 steps each)
    test = json.loads((run_dir / "test_metrics.json").read_text())
    assert set(test) == {
        "energy RMSE [eV/atom]",
        "energy MAE [eV/atom]",
        "forces RMSE [eV/A]",
        "forces MAE [eV/A]",
    }
    assert 0 < test["forces MAE [eV/A]"] <= test["forces RMSE [eV/A]"]
    resolved = yaml.safe_load((run_dir / "options.resolved.yaml").read_text())
    assert resolved["seed"] == 1234
    assert resolved["architecture"]["model"]["d_model"] == 16
    assert resolved["architecture"]["training"]["learning_rate"] == 2e-3  # default merged
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,step,learning_rate,train_loss")
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert "1 rank via single" in result.stdout
    assert "80 training, 10 validation, 10 test structures" in result.stdout


def test_exported_model_matches_in_memory_model_in_fresh_process(single_run, tmp_path):
    run_dir, _ = single_run
    sample = tmp_path / "sample.xyz"
    ase.io.write(sample, ase.io.read(EXAMPLE_XYZ, "::25"))
    from architectures.mp_transformer import __model__ as Model

    model = Model.load_checkpoint(run_dir / "model.ckpt")
    expected = predict_in_memory(model, sample)
    exported = evaluate_exported(run_dir / "model.pt", sample, run_dir / "extensions")
    assert len(exported) == len(expected) == 4
    for mine, theirs in zip(expected, exported):
        assert theirs["energy"] == pytest.approx(mine["energy"], rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(theirs["forces"], mine["forces"], rtol=1e-9, atol=1e-9)
        # forces are the derivative of the energy: central differences agree
        for _, _, finite_difference, force in theirs["fd"]:
            assert finite_difference == pytest.approx(force, abs=1e-6)
    # and the model learned something non-trivial: forces are not all zero
    assert np.abs(np.array(expected[0]["forces"])).max() > 1e-3


def test_mpiexec_and_torchrun_train_the_same_model(flow_dir, single_run):
    mpi = hpctrain("options.yaml", "-o", "mpi", cwd=flow_dir, launcher="mpiexec")
    assert mpi.returncode == 0, mpi.stderr
    torchrun = hpctrain("options.yaml", "-o", "torchrun", cwd=flow_dir, launcher="torchrun")
    assert torchrun.returncode == 0, torchrun.stderr
    assert "2 ranks via mpi" in mpi.stdout
    assert "2 ranks via torchrun" in torchrun.stdout
    # the threads each launcher gives: mpiexec none (the cores shared by the ranks of
    # the node), torchrun OMP_NUM_THREADS=1
    assert "thread per rank (OMP_NUM_THREADS)" not in mpi.stdout
    assert "1 thread per rank (OMP_NUM_THREADS)" in torchrun.stdout
    for result, name in ((mpi, "mpi"), (torchrun, "torchrun")):
        # rank 0 alone reports: each epoch line printed once
        assert result.stdout.count("epoch    1/2") == 1, result.stdout
        assert {p.name for p in (flow_dir / name).iterdir()} == RUN_FILES
    a, b = weights(flow_dir / "mpi"), weights(flow_dir / "torchrun")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # a global batch split over ranks computes the single-process gradient
    single = weights(single_run[0])
    for key in a:
        torch.testing.assert_close(a[key], single[key], rtol=1e-7, atol=1e-10)


def test_continue_from_checkpoint_trains_the_remaining_epochs(flow_dir, single_run):
    write_options(
        flow_dir, merged(OPTIONS, {"architecture": {"training": {"num_epochs": 3}}}), "more.yaml"
    )
    result = hpctrain("more.yaml", "-o", "more", "--continue", "single/model.ckpt", cwd=flow_dir)
    assert result.returncode == 0, result.stderr
    rows = (flow_dir / "more" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3"]
    before, after = weights(single_run[0]), weights(flow_dir / "more")
    assert not torch.equal(before["readout.3.weight"], after["readout.3.weight"])
    torch.testing.assert_close(before["composition"], after["composition"])


def test_bad_options_exit_2_with_a_message_and_no_traceback(flow_dir):
    bad = copy.deepcopy(OPTIONS)
    training = bad["architecture"]["training"]
    training["num_epoch"] = training.pop("num_epochs")  # misspelt
    write_options(flow_dir, bad, "bad.yaml")
    result = hpctrain("bad.yaml", "-o", "bad", cwd=flow_dir)
    assert result.returncode == 2
    assert "hpctrain: error: unknown key 'architecture.training.num_epoch'" in result.stderr
    assert "did you mean 'num_epochs'?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (flow_dir / "bad").exists()


def test_an_error_after_the_run_directory_exists_is_also_in_train_log(flow_dir):
    nokey = merged(OPTIONS, {"training_set": {"targets": {"energy": {"key": "E_dft"}}}})
    write_options(flow_dir, nokey, "nokey.yaml")
    result = hpctrain("nokey.yaml", "-o", "nokey", cwd=flow_dir)
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("hpctrain: error: ") and "E_dft" in message
    assert message in (flow_dir / "nokey" / "train.log").read_text()


def test_a_killed_rank_does_not_leave_the_other_hanging(flow_dir, tmp_path):
    """Two ranks without a supervising launcher; rank 1 is SIGKILLed mid-training."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    pauses = tmp_path / "pauses"
    procs = []
    for rank in range(2):
        env = paused_env(
            pauses,
            12,
            RANK=str(rank),
            WORLD_SIZE="2",
            LOCAL_RANK=str(rank),
            LOCAL_WORLD_SIZE="2",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        procs.append(start("options.yaml", "-o", tmp_path / "run", cwd=flow_dir, env=env))
    try:
        wait_until_paused(pauses, 12, ranks=2, proc=procs[0])
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=60)
        killed_at = time.monotonic()
        release(pauses, 12)  # rank 0 goes on into step 13, whose all-reduce finds no peer
        out, err = procs[0].communicate(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert procs[0].returncode not in (0, None)
    assert elapsed < 75, elapsed
    assert "lost contact with another rank" in err, err[-2000:]


def test_fine_tuning_on_other_data_and_transfer_to_a_new_target(flow_dir, single_run):
    fine = merged(OPTIONS, {"architecture": {"training": {"num_epochs": 3}}, "validation_set": 0.2})
    write_options(flow_dir, fine, "fine.yaml")
    result = hpctrain("fine.yaml", "-o", "fine", "--continue", "single/model.ckpt", cwd=flow_dir)
    assert result.returncode == 0, result.stderr
    assert "starts the new data afresh" in result.stdout + result.stderr
    rows = (flow_dir / "fine" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3"]

    formation = {"key": "energy", "unit": "eV", "forces": False}
    transfer = merged(OPTIONS, {"training_set": {"targets": {"energy/formation": formation}}})
    write_options(flow_dir, transfer, "transfer.yaml")
    result = hpctrain(
        "transfer.yaml", "-o", "transfer", "--continue", "single/model.ckpt", cwd=flow_dir
    )
    assert result.returncode == 0, result.stderr
    assert "transfer learning" in result.stdout
    checkpoint = torch.load(flow_dir / "transfer" / "model.ckpt", weights_only=False)
    assert set(checkpoint["dataset_info"]["targets"]) == {"energy", "energy/formation"}
    rows = (flow_dir / "transfer" / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2"]
    assert "val energy/formation RMSE [eV/atom]" in rows[0]


def test_elements_the_training_set_lacks_are_refused_before_training(flow_dir):
    frames = ase.io.read(EXAMPLE_XYZ, ":4")
    for atoms in frames:
        atoms.numbers[atoms.numbers == 8] = 7  # the oxygen of ethanol becomes a nitrogen
    ase.io.write(flow_dir / "nitrogen.xyz", frames)
    write_options(flow_dir, merged(OPTIONS, {"validation_set": "nitrogen.xyz"}), "nitrogen.yaml")
    result = hpctrain("nitrogen.yaml", "-o", "nitrogen", cwd=flow_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert "nitrogen.xyz" in message and "elements (N)" in message, message
    assert "the training set has H, C, O" in message, message
    assert not (flow_dir / "nitrogen" / "checkpoints").exists()


def test_training_again_into_a_run_directory_is_refused_without_continue(flow_dir, single_run):
    run_dir, _ = single_run
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    rows = (run_dir / "metrics.csv").read_text()
    result = hpctrain("options.yaml", "-o", "single", cwd=flow_dir)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert "single holds a finished run already" in message, message
    assert "--continue auto" in message and "a new --output-dir" in message, message
    assert (run_dir / "metrics.csv").read_text() == rows  # nothing appended
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before
