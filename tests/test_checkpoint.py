"""Checkpoints: atomic files, commit markers, versions, retention."""

import json
import os
import time

import pytest
import torch
from conftest import ROOT

from hpctrain import checkpoint
from hpctrain.errors import CheckpointError

FIXTURE_V1 = ROOT / "tests" / "fixtures" / "checkpoint-v1-mp_transformer.ckpt"
# a model of version 2 and what it predicted, computed by that version (json)
FIXTURE_V2 = ROOT / "tests" / "fixtures" / "checkpoint-v2-mp_transformer.ckpt"
FIXTURE_V3 = ROOT / "tests" / "fixtures" / "checkpoint-v3-mp_transformer.ckpt"


def test_an_interrupted_write_leaves_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    checkpoint.save({"architecture": "a", "value": 1}, path)

    def broken(data, file):
        file.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"architecture": "a", "value": 2}, path)
    monkeypatch.undo()
    assert checkpoint.load(path)["value"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]  # no temporary left


def test_version_1_checkpoints_are_upgraded(tmp_path):
    raw = torch.load(FIXTURE_V1, weights_only=False)
    assert raw["version"] == 1
    upgraded = checkpoint.upgrade(raw)
    assert raw["trainer_state"].get("scheduler") is not None  # the input is not modified
    state = upgraded["trainer_state"]
    assert upgraded["version"] == checkpoint.VERSION
    assert state["learning_rate"]["step_count"] == raw["trainer_state"]["scheduler"]["last_epoch"]
    assert state["sampler"] is None and "scheduler" not in state
    from architectures.mp_transformer import __model__ as Model
    from architectures.mp_transformer import __trainer__ as Trainer

    model = Model.load_checkpoint(FIXTURE_V1)
    torch.testing.assert_close(model.state_dict()["composition"], raw["model_state"]["composition"])
    trainer = Trainer.load_checkpoint(FIXTURE_V1, {"num_epochs": 3, "batch_size": 8})
    assert trainer._state["progress"]["epoch"] == 2


def test_mp_transformer_of_model_version_1_keeps_its_layout(tmp_path):
    """A model saved before the neighbour densities (model version 1) loads, and
    fine-tunes, with the layout it was trained with; saved again, it stays so. A new
    model has the densities, whose checkpoints load as such."""
    from architectures.mp_transformer import __model__ as Model
    from hpctrain import finetune

    old = Model.load_checkpoint(FIXTURE_V1)
    assert old.hypers["angular_messages"] == "attention"
    assert finetune.pretrained_summary(str(FIXTURE_V1))[0]["angular_messages"] == "attention"
    old.save_checkpoint(tmp_path / "again.ckpt")
    assert checkpoint.load(tmp_path / "again.ckpt")["model_version"] == 4
    again = Model.load_checkpoint(tmp_path / "again.ckpt")
    torch.testing.assert_close(again.state_dict(), old.state_dict())

    hypers = {k: v for k, v in old.hypers.items() if k != "angular_messages"}
    new = Model(hypers, old.dataset_info)
    layer, d_model, a = new.layers[0], hypers["d_model"], hypers["angular_channels"]
    assert layer.value.out_features == d_model + 3 * a  # l = 0, 1, 2 densities
    assert old.layers[0].value.out_features == d_model + 2 * a
    new.save_checkpoint(tmp_path / "new.ckpt")
    torch.testing.assert_close(
        Model.load_checkpoint(tmp_path / "new.ckpt").state_dict(), new.state_dict()
    )


def test_mp_transformer_of_model_version_2_predicts_as_it_did(tmp_path):
    """A model saved before the channel pairs and the radial normalisation (version 2)
    loads with its layout and gives the energies and forces that version computed;
    saved again, it is version 4 and keeps the layout. A new model has both."""
    from architectures.mp_transformer import __model__ as Model
    from hpctrain import finetune

    old = Model.load_checkpoint(FIXTURE_V2)
    assert old.hypers["angular_products"] == "norms" and old.hypers["normalize_radial"] is False
    summary = finetune.pretrained_summary(str(FIXTURE_V2))[0]  # what fine-tuning builds
    assert summary["angular_products"] == "norms" and summary["normalize_radial"] is False
    assert_predicts_as_it_did(old, FIXTURE_V2, tmp_path)

    old.save_checkpoint(tmp_path / "again.ckpt")
    assert checkpoint.load(tmp_path / "again.ckpt")["model_version"] == 4
    again = Model.load_checkpoint(tmp_path / "again.ckpt")
    assert again.hypers["angular_products"] == "norms" and again.hypers["normalize_radial"] is False
    torch.testing.assert_close(again.state_dict(), old.state_dict())
    again.export().save(str(tmp_path / "model.pt"))  # compiles to TorchScript

    hypers = {
        k: v for k, v in old.hypers.items() if k not in ("angular_products", "normalize_radial")
    }
    new = Model(hypers, old.dataset_info)
    d_model, a = hypers["d_model"], hypers["angular_channels"]
    degrees = new.config.max_angular  # every channel pair of every degree
    assert new.layers[0].out.in_features == d_model + a + degrees * a * a
    assert old.layers[0].out.in_features == d_model + 3 * a
    torch.testing.assert_close(old.radial_norm, torch.ones_like(old.radial_norm))
    assert (new.radial_norm > 4).all()


def assert_predicts_as_it_did(model, fixture, tmp_path):
    """``model`` gives the energies and forces stored beside ``fixture``."""
    import ase.io

    from hpctrain.testing import emt_structures, predict_in_memory

    ase.io.write(tmp_path / "frames.xyz", emt_structures(periodic=False, n=2, seed=3))
    expected = json.loads(fixture.with_suffix(".json").read_text())["predictions"]
    predicted = predict_in_memory(model, tmp_path / "frames.xyz")
    for got, want in zip(predicted, expected, strict=True):
        assert got["energy"] == pytest.approx(want["energy"], rel=1e-5)
        torch.testing.assert_close(torch.tensor(got["forces"]), torch.tensor(want["forces"]))


def test_mp_transformer_of_model_version_3_predicts_as_it_did(tmp_path):
    """A model saved before the readouts of every layer (version 3: the last layer's
    state alone, after a LayerNorm) loads with that readout and gives the energies
    and forces that version computed; saved again, it keeps it. A new model of two
    layers reads out both, without the LayerNorm."""
    from architectures.mp_transformer import __model__ as Model
    from hpctrain import finetune

    old = Model.load_checkpoint(FIXTURE_V3)
    assert old.hypers["readout_layers"] == "last" and old.hypers["readout_norm"] is True
    summary = finetune.pretrained_summary(str(FIXTURE_V3))[0]
    assert summary["readout_layers"] == "last" and summary["readout_norm"] is True
    assert_predicts_as_it_did(old, FIXTURE_V3, tmp_path)
    old.save_checkpoint(tmp_path / "again.ckpt")
    again = Model.load_checkpoint(tmp_path / "again.ckpt")
    assert checkpoint.load(tmp_path / "again.ckpt")["model_version"] == 4
    torch.testing.assert_close(again.state_dict(), old.state_dict())
    assert_predicts_as_it_did(again, FIXTURE_V3, tmp_path)

    hypers = {k: v for k, v in old.hypers.items() if k not in ("readout_layers", "readout_norm")}
    new = Model(hypers, old.dataset_info)
    assert len(old.layer_readouts) == 0 and isinstance(old.readout[0], torch.nn.LayerNorm)
    assert len(new.layer_readouts) == hypers["num_layers"] - 1 == 1
    assert isinstance(new.readout[0], torch.nn.Identity)
    assert new.output_layers() == ["readout.3", "layer_readouts.0.3"]
    new.export().save(str(tmp_path / "model.pt"))  # compiles to TorchScript


def test_unreadable_and_incompatible_checkpoints_are_named(tmp_path):
    newer = tmp_path / "newer.ckpt"
    torch.save({"format": checkpoint.FORMAT, "version": checkpoint.VERSION + 1}, newer)
    with pytest.raises(CheckpointError, match="newer than this hpctrain understands"):
        checkpoint.load(newer)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="foreign.ckpt is not an hpctrain checkpoint"):
        checkpoint.load(foreign)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(FIXTURE_V1.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.ckpt is not a readable checkpoint"):
        checkpoint.load(truncated)
    wrong = "written by architecture 'mp_transformer', not 'soap_bpnn': to continue"
    with pytest.raises(CheckpointError, match=wrong):
        checkpoint.load(FIXTURE_V1, architecture="architectures.soap_bpnn")


def manager(root, keep_last=2, keep_best=True):
    return checkpoint.CheckpointManager(root, 0, 1, keep_last, keep_best, lambda: None)


def write(m, step, loss=None):
    return m.save(
        step,
        lambda path: checkpoint.save({"architecture": "a", "step": step}, path),
        {"rng": checkpoint.rng_state()},
        {"validation_loss": loss},
    )


def test_the_newest_committed_step_wins_not_the_newest_file(tmp_path):
    m = manager(tmp_path, keep_last=5)
    for step in (10, 20, 30):
        write(m, step)
    # an interrupted write of a later step: no commit marker
    broken = tmp_path / "step-000000040"
    broken.mkdir()
    (broken / "replicated.pt").write_bytes(b"partial")
    # the oldest one touched last: mtime must not matter
    old = tmp_path / "step-000000010" / "COMMITTED"
    os.utime(old, (time.time() + 100, time.time() + 100))
    assert checkpoint.latest(tmp_path) == tmp_path / "step-000000030"
    assert checkpoint.load(checkpoint.latest(tmp_path))["step"] == 30
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        checkpoint.load(broken)
    record = json.loads((tmp_path / "step-000000030" / "COMMITTED").read_text())
    assert record["step"] == 30 and record["world_size"] == 1


def test_retention_keeps_the_newest_and_the_best(tmp_path):
    m = manager(tmp_path, keep_last=2)
    losses = {10: 0.5, 20: 0.1, 30: 0.4, 40: None, 50: 0.3}
    for step, loss in losses.items():
        write(m, step, loss)
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert kept == ["step-000000020", "step-000000040", "step-000000050"]
    assert m.best() == tmp_path / "step-000000020"


def test_rank_parts_and_rng_states_round_trip(tmp_path):
    m = manager(tmp_path)
    torch.manual_seed(123)
    path = write(m, 7)
    expected = torch.rand(3)
    torch.manual_seed(999)
    checkpoint.set_rng_state(checkpoint.load_rank_state(path, 0)["rng"])
    torch.testing.assert_close(torch.rand(3), expected)
    assert checkpoint.load_rank_state(path, 1) is None  # a rank that did not exist


DRIVERS = ROOT / "tests" / "drivers"


def check_checkpoint(path, step):
    """A whole checkpoint of ``step``: both parts present and of that same write."""
    data = checkpoint.load(path)
    assert data["step"] == step
    assert torch.equal(data["weights"], torch.full_like(data["weights"], float(step)))
    assert checkpoint.load_rank_state(path, 0) == {"step": step}


@pytest.mark.slow
def test_killed_at_random_moments_of_writes_the_newest_committed_always_loads(tmp_path):
    """SIGKILL lands at random points of back-to-back checkpoint writes (files,
    syncs, commit markers, removal of old ones); after every kill the newest
    committed checkpoint loads whole, is no older than the last one reported on
    disk, and the next writer continues after it."""
    import random
    import signal
    import subprocess
    import sys

    rng = random.Random(5)
    root, log = tmp_path / "checkpoints", tmp_path / "writer.log"
    newest_seen, kills_mid_write = 0, 0
    for trial in range(30):
        log.write_text("")
        proc = subprocess.Popen(
            [sys.executable, str(DRIVERS / "checkpoint_writer.py"), str(root), str(log)]
        )
        deadline = time.monotonic() + 120
        while "ready" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the writer died"
            time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        lines = log.read_text().splitlines()
        durable = [int(line.split()[1]) for line in lines if line.startswith("durable")]
        steps = checkpoint.committed_steps(root)
        newest = checkpoint.latest(root)
        assert newest is not None and newest == steps[-1][1]
        step = steps[-1][0]
        assert step >= max(durable, default=0) and step >= newest_seen, (trial, step)
        for committed_step, path in steps:  # every committed one, not only the newest
            check_checkpoint(path, committed_step)
        dirs = {p.name for p in root.iterdir()}
        kills_mid_write += any(name > newest.name for name in dirs)
        newest_seen = step
    # the kills fell inside writes, not only between them
    assert kills_mid_write >= 3, kills_mid_write


def test_within_read_once_a_checkpoint_is_read_from_disk_once(tmp_path, monkeypatch):
    path = tmp_path / "model.ckpt"
    checkpoint.save({"architecture": "a", "value": 1}, path)
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: reads.append(f) or load(f, **kw))
    with checkpoint.read_once():
        assert checkpoint.load(path, "a")["value"] == 1
        assert checkpoint.load(tmp_path / "." / "model.ckpt")["value"] == 1
        with pytest.raises(CheckpointError, match="written by architecture 'a', not 'b'"):
            checkpoint.load(path, "b")  # the checks still apply to a shared read
    assert len(reads) == 1
    checkpoint.load(path)
    assert len(reads) == 2  # outside the block, every load reads


def test_a_resumed_run_reads_its_checkpoint_once(workdir, monkeypatch):
    """The seed, the trainer and the model of a continued run come from one read."""
    from conftest import hpctrain, tiny_options, write_options

    from hpctrain import flow, launch

    write_options(workdir, tiny_options(architecture={"training": {"num_epochs": 1}}))
    first = hpctrain("train", "options.yaml", "-o", "first", cwd=workdir)
    assert first.returncode == 0, first.stderr
    saved = workdir / "first" / "model.ckpt"
    for key in list(os.environ):
        if key in launch.LAUNCHER_VARIABLES or key.startswith(launch.LAUNCHER_PREFIXES):
            monkeypatch.delenv(key)
    reads = []
    load = torch.load
    monkeypatch.setattr(torch, "load", lambda f, **kw: reads.append(str(f)) or load(f, **kw))
    monkeypatch.chdir(workdir)
    run_dir = flow.train("options.yaml", output_dir="second", continue_from=str(saved))
    assert (run_dir / "model.pt").exists()
    assert reads.count(str(saved)) == 1, reads
