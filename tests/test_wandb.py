"""Weights & Biases logging (``logging.wandb``): real offline W&B runs of real training
processes, read back from the files W&B writes in the run directory; a continued run
continues the same W&B run; a missing ``wandb`` package ends the run before it starts.
"""

import importlib.util
import json
import os
import signal
import struct
import sys
from pathlib import Path

import pytest
from conftest import (
    BIN,
    EXAMPLE_XYZ,
    clean_env,
    hpctrain,
    paused_env,
    start,
    tiny_options,
    wait_until_paused,
    write_options,
)

from hpctrain import report, wandb_run
from hpctrain.errors import OptionsError
from hpctrain.options import WandbOptions
from hpctrain.startup import prepare

needs_wandb = pytest.mark.skipif(
    importlib.util.find_spec("wandb") is None, reason="the wandb package is not installed"
)

# 2 epochs of 12 steps (90 training structures in batches of 8); no checkpoint at the
# first epoch's end, one every 4 steps within it
OPTIONS = tiny_options(
    seed=5,
    architecture={"model": {"d_model": 8, "angular_channels": 2}},
    checkpoint={"every_n_epochs": 2, "every_n_steps": 4, "every_minutes": None},
    logging={
        "tensorboard": False,
        "wandb": {"project": "hpctrain-tests", "tags": ["tiny", "ci"], "mode": "offline"},
    },
)


def wandb_dirs(home: Path) -> dict[str, str]:
    """The variables that put W&B's own settings and caches under ``home`` (not the
    user's home)."""
    return {f"WANDB_{name}_DIR": str(home / name.lower()) for name in ("CONFIG", "CACHE", "DATA")}


def wandb_env(home: Path, **extra: str) -> dict[str, str]:
    """``clean_env`` with :func:`wandb_dirs`."""
    return clean_env(**wandb_dirs(home), **extra)


@pytest.fixture
def wandb_dir(tmp_path):
    """The data and options of this module's runs, and a home for W&B's settings."""
    (tmp_path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    write_options(tmp_path, OPTIONS)
    return tmp_path


# -- reading what W&B wrote --------------------------------------------------------------


def records(path: Path) -> list:
    """The records of a W&B transaction log (``run-ID.wandb``): after a 7-byte header
    (``:W&B``, a magic number, a version), LevelDB log blocks of 32 KiB whose chunks (a
    7-byte header: CRC-32, length, type full/first/middle/last) hold protobuf records."""
    from wandb.proto import wandb_internal_pb2

    data, block, header = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B", path
    found, chunks, pos = [], [], header
    while pos + header <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if left < header or (length, kind) == (0, 0):  # the padding at a block's end
            pos += left
            continue
        chunks.append(data[pos + header : pos + header + length])
        pos += header + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(chunks))
            found.append(record)
            chunks = []
    return found


class OfflineRun:
    """What one process logged to an offline W&B run (``wandb/offline-run-*-ID``)."""

    def __init__(self, directory: Path):
        self.directory = directory
        (log,) = directory.glob("run-*.wandb")
        self.records = records(log)

    def of(self, kind: str) -> list:
        return [getattr(r, kind) for r in self.records if r.WhichOneof("record_type") == kind]

    @property
    def run(self):
        (run,) = self.of("run")
        return run

    @property
    def history(self) -> list[dict]:
        """The logged rows, each with its ``_step``."""
        return [
            {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in h.item}
            for h in self.of("history")
        ]

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]

    @property
    def config(self) -> dict:
        updates = [u for r in self.of("config") for u in r.update] + list(self.run.config.update)
        return {u.key: json.loads(u.value_json) for u in updates if u.key != "_wandb"}

    @property
    def exit_code(self) -> int | None:
        exits = self.of("exit")
        return exits[-1].exit_code if exits else None


def offline_runs(run_dir: Path) -> list[OfflineRun]:
    """The offline W&B runs written in ``run_dir``, oldest first."""
    return [OfflineRun(d) for d in sorted((run_dir / "wandb").glob("offline-run-*"))]


# -- runs ------------------------------------------------------------------------------


@pytest.mark.slow
@needs_wandb
def test_rank_0_logs_the_metrics_csv_rows_and_the_config_to_one_wandb_run(wandb_dir):
    if not (BIN / "mpiexec").exists():
        pytest.skip("no mpiexec beside python")
    result = hpctrain(
        "options.yaml", "-o", "run", cwd=wandb_dir, launcher="mpiexec", env=wandb_env(wandb_dir)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = wandb_dir / "run"
    run_id = (run_dir / wandb_run.RUN_ID_FILE).read_text().strip()
    assert len(run_id) == 8 and f"W&B: run {run_id}, project hpctrain-tests" in result.stdout
    # one W&B run, rank 0's, in the run directory
    (logged,) = offline_runs(run_dir)
    assert logged.directory.name.endswith(f"-{run_id}")
    assert not (wandb_dir / "wandb").exists()
    assert (logged.run.run_id, logged.run.project) == (run_id, "hpctrain-tests")
    assert (logged.run.display_name, list(logged.run.tags)) == ("run", ["tiny", "ci"])
    # the rows of metrics.csv at their optimizer steps, keyed as in TensorBoard
    rows = report.read_metrics(run_dir / "metrics.csv")
    assert logged.steps == [int(row["step"]) for row in rows] == [12, 24]
    for row, history in zip(rows, logged.history):
        assert history.keys() - {"_step", "_runtime", "_timestamp"} == {
            report.scalar_tag(column) for column in row if column != "step"
        }
        assert history["val/forces RMSE [eV/A]"] == pytest.approx(row["val forces RMSE [eV/A]"])
        assert history["train_loss"] == pytest.approx(row["train_loss"])
    # the config: the resolved options and where the run ran
    config = logged.config
    assert config["options"]["seed"] == 5
    assert config["options"]["logging"]["wandb"]["mode"] == "offline"
    assert config["system"]["world_size"] == 2 and config["system"]["launcher"] == "mpi"
    assert config["system"]["devices"] == {"cpu": 2}
    assert {"hostname", "hpctrain", "torch", "python"} <= config["system"].keys()
    assert logged.exit_code == 0


@pytest.mark.slow
@needs_wandb
def test_a_stopped_run_continued_logs_to_the_same_wandb_run(wandb_dir):
    run_dir, pauses = wandb_dir / "run", wandb_dir / "pauses"
    env = paused_env(pauses, 15, **wandb_dirs(wandb_dir))
    proc = start("options.yaml", "-o", run_dir, cwd=wandb_dir, env=env)
    wait_until_paused(pauses, 15, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err[-3000:]
    run_id = (run_dir / wandb_run.RUN_ID_FILE).read_text().strip()
    (stopped,) = offline_runs(run_dir)
    assert stopped.steps == [12]
    assert stopped.of("preempting") and stopped.exit_code == 75  # (W&B: "preempted")

    result = hpctrain(
        "options.yaml", "-o", run_dir, "--continue", "auto", cwd=wandb_dir, env=wandb_env(wandb_dir)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step 16 " in result.stdout  # (the signal acts at the next step)
    assert f"W&B: run {run_id} (continued)" in result.stdout
    first, continued = offline_runs(run_dir)
    assert continued.run.run_id == first.run.run_id == run_id
    assert continued.steps == [24] and continued.exit_code == 0


@pytest.mark.slow
@needs_wandb
def test_a_killed_run_continued_logs_no_step_again(wandb_dir):
    """Killed at step 15, the run logged step 12 but checkpointed only up to step 8:
    continued from there, it trains step 12 again, which W&B would refuse."""
    run_dir, pauses = wandb_dir / "run", wandb_dir / "pauses"
    env = paused_env(pauses, 15, **wandb_dirs(wandb_dir))
    proc = start("options.yaml", "-o", run_dir, cwd=wandb_dir, env=env)
    wait_until_paused(pauses, 15, proc=proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    run_id = (run_dir / wandb_run.RUN_ID_FILE).read_text().strip()
    result = hpctrain(
        "options.yaml", "-o", run_dir, "--continue", "auto", cwd=wandb_dir, env=wandb_env(wandb_dir)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming at step " in result.stdout and "(epoch 1," in result.stdout
    assert "W&B: steps up to 12 were logged by an earlier process" in result.stdout
    killed, continued = offline_runs(run_dir)
    assert killed.directory.name.endswith(f"-{run_id}") and continued.run.run_id == run_id
    # W&B writes its file every few seconds: the killed process's may lack step 12 (or
    # everything); the continued one starts after it, so that the steps only go up
    assert killed.steps in ([], [12]) and continued.steps == [24]
    # metrics.csv holds both rows of step 12
    assert [row["step"] for row in report.read_metrics(run_dir / "metrics.csv")] == [12, 12, 24]


@needs_wandb
def test_a_wandb_run_that_cannot_start_ends_every_rank_before_training(wandb_dir):
    if not (BIN / "mpiexec").exists():
        pytest.skip("no mpiexec beside python")
    online = tiny_options(logging={"wandb": {"project": "hpctrain-tests"}})
    write_options(wandb_dir, online, "online.yaml")
    env = wandb_env(wandb_dir, HOME=str(wandb_dir), WANDB_BASE_URL="http://127.0.0.1:9")
    env.pop("WANDB_API_KEY", None)  # no login: W&B refuses before any connection
    result = hpctrain("online.yaml", "-o", "run", cwd=wandb_dir, launcher="mpiexec", env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.count("W&B could not start run") == 1, result.stderr[-3000:]
    assert "'mode: offline'" in result.stderr
    assert "training:" not in result.stdout and not (wandb_dir / "run" / "metrics.csv").exists()


# -- without the wandb package -----------------------------------------------------------

HIDE_WANDB = "import sys\nsys.modules['wandb'] = None  # import wandb fails, as if absent\n"


def test_without_the_package_the_run_fails_before_it_starts(wandb_dir):
    shim = wandb_dir / "no-wandb"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(HIDE_WANDB)
    path = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))
    result = hpctrain(
        "options.yaml", "-o", "run", cwd=wandb_dir, env=wandb_env(wandb_dir, PYTHONPATH=path)
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "'logging.wandb' in options.yaml asks for Weights & Biases logging" in result.stderr
    assert "pip install hpctrain[wandb]" in result.stderr
    assert not (wandb_dir / "run").exists()  # nothing started


def test_a_missing_package_is_named_on_every_path(wandb_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(OptionsError, match=r"pip install hpctrain\[wandb\]"):
        prepare(wandb_dir / "options.yaml")
    with pytest.raises(OptionsError, match=r"pip install hpctrain\[wandb\]"):
        wandb_run.start(WandbOptions(project="p", mode="offline"), wandb_dir, {}, "options.yaml")
    assert not (wandb_dir / wandb_run.RUN_ID_FILE).exists()
    # 'mode: disabled' and no section need no package
    wandb_run.check_installed(WandbOptions(project="p", mode="disabled"), "options.yaml")
    wandb_run.check_installed(None, "options.yaml")


def test_the_last_logged_step_is_the_last_of_metrics_csv(tmp_path):
    assert wandb_run.last_logged_step(tmp_path) == -1
    log = report.MetricsCSV(tmp_path / "metrics.csv")
    for step in (12, 24, 12):
        log.write({"epoch": step // 12, "step": step, "train_loss": 1.0})
    assert wandb_run.last_logged_step(tmp_path) == 24
