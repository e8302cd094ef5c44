"""What users see while training: progress, banner, TensorBoard, end summary.

Fast tests drive :class:`~hpctrain.progress.ProgressMeter` with a fake clock; slow
ones run real training processes with stdout a pipe, a pseudo-terminal, or under
``mpiexec -n 2``.
"""

import csv
import fcntl
import io
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch
from conftest import EXAMPLE_XYZ, clean_env, hpctrain, merged, start, tiny_options, write_options

from hpctrain import __version__, progress, report
from hpctrain.errors import OptionsError
from hpctrain.options import LoggingOptions, load_options

# -- the meter, in process ------------------------------------------------------------


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingLoss:
    """Stands for the loss tensor: counts how often its value is read (a device sync)."""

    def __init__(self, value: float) -> None:
        self.value, self.reads = value, 0

    def __float__(self) -> float:
        self.reads += 1
        return self.value


@pytest.fixture
def console(monkeypatch):
    """Rank 0's logging set up on a fake stdout; returns that stream."""

    def make(stream):
        monkeypatch.setattr(sys, "stdout", stream)
        report.setup_logging(0)
        return stream

    yield make
    logging.getLogger(report.LOGGER_NAME).handlers.clear()
    report._console = None


def run_epoch(meter, clock, loss, steps=10, seconds_per_step=1.0, validating=True):
    meter.start_epoch(1, 3, steps, steps)
    for _ in range(steps):
        clock.now += seconds_per_step
        meter.step(8, loss)
    return meter.end_epoch(validating)


def test_lines_mode_prints_on_the_interval_and_reads_the_loss_only_then(console):
    out = console(io.StringIO())
    clock = Clock()
    meter = progress.ProgressMeter(LoggingOptions(progress_every_seconds=3.5), True, clock)
    assert meter.mode == "lines"  # not a terminal
    loss = CountingLoss(2.0)
    structures, seconds = run_epoch(meter, clock, loss)
    lines = out.getvalue().splitlines()
    # due at 4 s and 8 s (steps 4 and 8), at 1 s per step and 8 structures per step
    assert [re.sub(r"^\S+ ", "", line) for line in lines] == [
        "epoch 1/3  step 4/10  8 structures/s  ETA 6s (run 26s)  loss 0.5",
        "epoch 1/3  step 8/10  8 structures/s  ETA 2s (run 22s)  loss 0.25",
    ]
    assert "\r" not in out.getvalue()
    assert loss.reads == 2  # once per printed line, not once per step
    assert (structures, seconds) == (80, 10.0)


def test_the_run_eta_counts_the_last_epoch_with_its_validation(console):
    """Epoch 1: 10 steps of 1 s, then 5 s of validation; in epoch 2 of 3, at step 4,
    6 s are left in the epoch and 6 + 15 s in the run. The last epoch shows no run ETA."""
    out = console(io.StringIO())
    clock = Clock()
    meter = progress.ProgressMeter(LoggingOptions(progress_every_seconds=3.5), True, clock)
    run_epoch(meter, clock, torch.tensor(1.0))
    clock.now += 5.0
    meter.start_epoch(2, 3, 10, 10)
    for _ in range(4):
        clock.now += 1
        meter.step(8, torch.tensor(1.0))
    assert (
        out.getvalue()
        .splitlines()[-1]
        .endswith("step 4/10  8 structures/s  ETA 6s (run 21s)  loss 0.25")
    )
    meter.start_epoch(3, 3, 10, 10)
    for _ in range(4):
        clock.now += 1
        meter.step(8, torch.tensor(1.0))
    assert out.getvalue().splitlines()[-1].endswith("step 4/10  8 structures/s  ETA 6s  loss 0.25")


@pytest.mark.parametrize(
    "value, text",
    [
        (1234.0, "1200"),
        (72.1, "72"),
        (7.06, "7.1"),
        (0.01234, "0.012"),
        (0.0, "0"),
        (99.6, "100"),
        (8.0, "8"),
    ],
)
def test_throughput_has_two_significant_digits(value, text):
    assert report.significant(value) == text


def test_one_format_for_errors_in_epoch_test_and_summary_lines():
    row = {
        "val energy RMSE [eV/atom]": 0.01234,
        "val forces RMSE [eV/A]": 0.5,
        "val forces MAE [eV/A]": 0.4,
    }
    assert report.errors_text(row) == "energy RMSE 0.01234 eV/atom  forces RMSE 0.5 eV/A"
    assert report.validation_errors(row) == "energy RMSE 0.01234 eV/atom, forces RMSE 0.5 eV/A"
    test = {k.removeprefix("val "): v for k, v in row.items()}
    assert report.errors_text(test) == report.errors_text(row)
    assert [report.plural(n, "epoch") for n in (1, 2)] == ["1 epoch", "2 epochs"]


def test_lines_every_n_steps_count_from_the_start_of_the_epoch(console):
    out = console(io.StringIO())
    clock = Clock()
    options = LoggingOptions(progress_every_seconds=1e6, progress_every_n_steps=3)
    meter = progress.ProgressMeter(options, True, clock)
    meter.start_epoch(2, 3, 10, 6)  # continuing mid-epoch: steps 5..10 left
    for _ in range(6):
        clock.now += 1
        meter.step(8, torch.tensor(1.0))
    steps = re.findall(r"step (\d+)/10", out.getvalue())
    assert steps == ["6", "9"]


def test_bar_on_a_terminal_redraws_in_place_and_the_epoch_line_replaces_it(console):
    out = console(Terminal())
    clock = Clock()
    meter = progress.ProgressMeter(LoggingOptions(), True, clock)
    assert meter.mode == "bar"
    loss = CountingLoss(1.0)
    run_epoch(meter, clock, loss, steps=4, seconds_per_step=0.05)
    report.get_logger().info("epoch    1/3  loss 0.25")
    text = out.getvalue()
    # drawn at the first and last steps (redraws are at least 0.2 s apart), then
    # "validating"; never a newline before the epoch's line wipes it
    draws = text.split("\r")[1:-2]
    assert [d.split("]")[0] for d in draws] == [
        "epoch 1/3 [######------------------",
        "epoch 1/3 [########################",
        "epoch 1/3 [########################",
    ]
    assert "4/4  160 structures/s  ETA 0s (run 0s)  loss 0.25" in draws[1]
    assert "validating" in draws[2] and "\n" not in "".join(draws)
    assert re.search(r"\r +\r\S+ epoch    1/3  loss 0.25\n$", text), repr(text)
    assert loss.reads == 3


def test_bar_fits_the_terminal_width(console, monkeypatch):
    monkeypatch.setenv("COLUMNS", "40")
    out = console(Terminal())
    clock = Clock()
    meter = progress.ProgressMeter(LoggingOptions(), True, clock)
    run_epoch(meter, clock, torch.tensor(3.0), steps=2)
    assert max(len(d) for d in out.getvalue().split("\r")) <= 39


def test_a_bar_left_on_screen_ends_its_line_before_an_error(console):
    out = console(Terminal())
    clock = Clock()
    meter = progress.ProgressMeter(LoggingOptions(), True, clock)
    meter.start_epoch(1, 1, 5, 5)
    meter.step(8, torch.tensor(1.0))
    report.end_status_line()
    assert out.getvalue().endswith("loss 1\n")
    report.end_status_line()  # nothing drawn: nothing written
    assert out.getvalue().endswith("loss 1\n")


@pytest.mark.parametrize("mode", ["lines", "bar", "auto"])
def test_other_ranks_and_off_print_nothing(console, mode):
    out = console(Terminal())
    clock = Clock()
    loss = CountingLoss(1.0)
    other = progress.ProgressMeter(
        LoggingOptions(progress=mode, progress_every_seconds=0.1), False, clock
    )
    run_epoch(other, clock, loss)
    off = progress.ProgressMeter(LoggingOptions(progress="off"), True, clock)
    run_epoch(off, clock, loss)
    assert out.getvalue() == "" and loss.reads == 0


def test_totals_add_up_the_epochs(console):
    console(io.StringIO())
    progress.TOTALS.reset()
    clock = Clock()
    meter = progress.ProgressMeter(LoggingOptions(progress="off"), True, clock)
    run_epoch(meter, clock, torch.tensor(1.0), steps=10, seconds_per_step=0.5)
    run_epoch(meter, clock, torch.tensor(1.0), steps=5, seconds_per_step=1.0)
    assert progress.TOTALS.structures == 120
    assert progress.TOTALS.seconds == pytest.approx(10.0)
    assert progress.TOTALS.rate == pytest.approx(12.0)


@pytest.mark.parametrize(
    "seconds, text", [(0.4, "0s"), (59.4, "59s"), (187, "3:07"), (3723, "1:02:03")]
)
def test_format_duration(seconds, text):
    assert progress.format_duration(seconds) == text
    assert progress.format_duration(float("nan")) == "?"


@pytest.mark.parametrize(
    "logging_section, message",
    [
        ("{progress_every_seconds: 0}", "'logging.progress_every_seconds' in"),
        ("{progress_every_n_steps: 0}", "'logging.progress_every_n_steps' in"),
        ("{every_n_epochs: 0}", "'logging.every_n_epochs' in"),
        ("{progress: fancy}", "'logging.progress' in"),
        ("{tensorboard: maybe}", "'logging.tensorboard' in"),
    ],
)
def test_bad_logging_options_name_the_key_and_the_file(write_yaml, logging_section, message):
    path = write_yaml(f"architecture: x\ntraining_set: ethanol.xyz\nlogging: {logging_section}\n")
    with pytest.raises(OptionsError) as error:
        load_options(path)
    assert message in str(error.value) and str(path) in str(error.value)


# -- metrics files ----------------------------------------------------------------------


def test_best_and_final_take_the_latest_row_of_a_repeated_epoch(tmp_path):
    log = report.MetricsCSV(tmp_path / "metrics.csv")
    for epoch, step, loss in [(1, 10, 3.0), (2, 20, 1.0), (2, 20, 2.5), (3, 30, 2.0)]:
        log.write({"epoch": epoch, "step": step, "val e RMSE [eV]": loss**0.5, "val_loss": loss})
    best, final = report.best_and_final(report.read_metrics(tmp_path / "metrics.csv"))
    assert (best["epoch"], best["val_loss"]) == (3, 2.0)  # epoch 2 was redone: 2.5
    assert final["epoch"] == 3
    assert report.validation_errors(best) == "e RMSE 1.414 eV"
    # a metrics.csv of an older run, without the validation loss: no best epoch
    rows = [{"epoch": 1.0, "step": 5.0}]
    assert report.best_and_final(rows) == (None, rows[0])
    assert report.best_and_final([]) == (None, None)


def test_without_tensorboard_metrics_go_to_csv_and_one_note_is_logged(
    tmp_path, monkeypatch, console
):
    out = console(io.StringIO())
    for name in list(sys.modules):
        if name.startswith(("tensorboard", "torch.utils.tensorboard")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import fails as if absent
    metrics = report.MetricsLog(tmp_path, tensorboard=True)
    metrics.write({"epoch": 1, "step": 10, "train_loss": 0.5})
    metrics.close()
    assert metrics.tensorboard is None and not (tmp_path / "tensorboard").exists()
    assert out.getvalue().count("'tensorboard' package is not installed") == 1
    assert (tmp_path / "metrics.csv").read_text().splitlines() == [
        "epoch,step,train_loss",
        "1,10,0.5",
    ]


def test_tensorboard_off_writes_no_event_files_and_says_nothing(tmp_path, console):
    out = console(io.StringIO())
    report.MetricsLog(tmp_path, tensorboard=False).write({"epoch": 1, "step": 1, "x": 1.0})
    assert out.getvalue() == "" and not (tmp_path / "tensorboard").exists()


# -- real training processes ------------------------------------------------------------

# 2 epochs of 10 steps: 80 training structures in batches of 8
OPTIONS = tiny_options(
    seed=1234, base_precision=64, architecture={"model": {"d_model": 8}}, test_set=0.1
)
PROGRESS_LINE = re.compile(
    r"^\d\d:\d\d:\d\d epoch (\d)/2  step (\d+)/10  [\d.]+ structures/s  ETA \S+(?: \(run \S+\))?"
    r"  loss \S+$",
    re.M,
)
HIDE_TENSORBOARD = "raise ModuleNotFoundError(\"No module named 'tensorboard'\")\n"


def has_tensorboard() -> bool:
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def progress_dir(tmp_path_factory):
    """The data and options files that the runs of this module share."""
    path = tmp_path_factory.mktemp("progress")
    (path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    every_time = {"logging": {"progress_every_seconds": 0.001}}
    write_options(path, merged(OPTIONS, every_time), "options.yaml")
    every_step = {"logging": {"progress_every_n_steps": 1, "tensorboard": False}}
    write_options(path, merged(OPTIONS, every_step), "every_step.yaml")
    write_options(path, OPTIONS, "plain.yaml")
    (path / "hidden" / "tensorboard").mkdir(parents=True)
    (path / "hidden" / "tensorboard" / "__init__.py").write_text(HIDE_TENSORBOARD)
    return path


@pytest.fixture(scope="module")
def piped(progress_dir):
    """stdout a pipe (as in a SLURM output file), progress lines due at every step."""
    result = hpctrain("options.yaml", "-o", "piped", cwd=progress_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return progress_dir / "piped", result.stdout


@pytest.fixture(scope="module")
def on_terminal(progress_dir):
    """stdout a pseudo-terminal of 120 columns; TensorBoard hidden (not installed)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    env = clean_env(PYTHONPATH=str(progress_dir / "hidden"))
    env.pop("COLUMNS", None)
    process = start(
        "plain.yaml",
        "-o",
        "terminal",
        cwd=progress_dir,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=follower,
        text=False,
    )
    os.close(follower)
    chunks = []
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)  # keep reading: a full terminal blocks the writer
        except OSError:  # EIO: the child closed its side
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    stderr = process.stderr.read().decode()
    assert process.wait(timeout=60) == 0, stderr[-3000:]
    # the terminal turns "\n" into "\r\n"; undo that to see the carriage returns hpctrain wrote
    return progress_dir / "terminal", b"".join(chunks).decode().replace("\r\n", "\n")


@pytest.mark.slow
def test_without_a_terminal_progress_lines_come_on_the_interval_without_carriage_returns(piped):
    run_dir, stdout = piped
    assert "\r" not in stdout
    seen = [(int(e), int(s)) for e, s in PROGRESS_LINE.findall(stdout)]
    # a step takes far longer than 1 ms: a line after every step of both epochs
    assert seen == [(e, s) for e in (1, 2) for s in range(1, 11)], stdout
    assert stdout.count("epoch    1/2") == stdout.count("epoch    2/2") == 1
    log = (run_dir / "train.log").read_text()
    assert len(re.findall(r" INFO epoch \d/2  step \d+/10  ", log)) == 20


@pytest.mark.slow
def test_banner_names_version_architecture_ranks_data_and_paths(piped):
    run_dir, stdout = piped
    banner = stdout[: stdout.index("composition baseline")]
    for text in (
        f"hpctrain {__version__}, architecture mp_transformer\n",
        "  ranks: 1 rank via single,",
        "  devices: cpu\n",
        "  dtype: float64\n",
        "  data: 80 training, 10 validation, 10 test structures\n",
        "  targets: energy, forces\n",
        "  parameters: ",
        "  data check: mean energy -467.7 eV/atom, RMS force ",
        "  distances: shortest 0.",
        f"  run directory: {run_dir}\n",
        f"  resolved options: {run_dir / 'options.resolved.yaml'}\n",
    ):
        assert text in banner, banner
    assert (run_dir / "options.resolved.yaml").is_file()
    assert stdout.count("architecture mp_transformer") == 1  # one banner, no repeats


@pytest.mark.slow
def test_summary_names_the_best_epoch_its_errors_time_and_model_files(piped):
    run_dir, stdout = piped
    summary = stdout[stdout.index("training finished") :]
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    best = min(rows, key=lambda row: float(row["val_loss"]))
    rmse = float(best["val forces RMSE [eV/A]"])
    match = re.search(r"best epoch: (\d) \(step (\d+), validation loss \S+\): (.*)", summary)
    assert match, summary
    assert match.group(1) == best["epoch"] and match.group(2) == best["step"]
    assert f"forces RMSE {rmse:.4g} eV/A" in match.group(3)
    kept = run_dir / "checkpoints" / f"step-{int(best['step']):09d}"
    assert f"checkpoint {kept}" in summary
    final = rows[-1]
    assert f"final epoch: 2: energy RMSE {float(final['val energy RMSE [eV/atom]']):.4g}" in summary
    time_line = re.search(
        r"time: ([\d.]+) s in all, ([\d.]+) s in training steps \(160 structures, "
        r"([\d.]+) structures/s\)",
        summary,
    )
    assert time_line, summary
    wall, steps, rate = map(float, time_line.groups())
    assert 0 < steps < wall
    # the rate is 160 structures over the unrounded time (printed rounded to 0.1 s),
    # with two significant digits
    assert 160 / (steps + 0.05) * 0.95 <= rate <= 160 / max(steps - 0.05, 1e-9) * 1.05
    assert len(time_line.group(3).replace(".", "").strip("0")) <= 2
    assert f"model: {run_dir / 'model.pt'} (extensions in {run_dir / 'extensions'})" in summary
    assert f"checkpoint: {run_dir / 'model.ckpt'}" in summary


@pytest.mark.slow
def test_tensorboard_event_files_hold_the_metrics_csv_scalars(piped):
    if not has_tensorboard():
        pytest.skip("the tensorboard package is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, stdout = piped
    assert "TensorBoard" not in stdout
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train_loss", "learning_rate", "val_loss", "val/forces RMSE [eV/A]"} <= tags
    with open(run_dir / "metrics.csv") as file:
        rows = list(csv.DictReader(file))
    scalars = events.Scalars("val/forces RMSE [eV/A]")
    assert [s.step for s in scalars] == [int(r["step"]) for r in rows] == [10, 20]
    for scalar, row in zip(scalars, rows):
        assert scalar.value == pytest.approx(float(row["val forces RMSE [eV/A]"]), rel=1e-6)


@pytest.mark.slow
def test_on_a_terminal_a_bar_with_rate_and_eta_is_redrawn_in_place(on_terminal):
    _, stdout = on_terminal
    draws = re.findall(r"\r(epoch \d/2 \[[#-]{24}\][^\r\n]*)", stdout)
    assert len(draws) >= 4, repr(stdout)
    for draw in draws:
        assert re.search(
            r"  \d+/10  [\d.]+ structures/s  (ETA \S+(?: \(run \S+\))?|validating)  loss \S+", draw
        ), draw
        assert len(draw) <= 119
    assert any("ETA" in d for d in draws) and any("[" + "#" * 24 + "]" for d in draws)
    # the bar never turns into lines of their own: no progress log lines, and the
    # epoch's line starts where the wiped bar was
    assert not PROGRESS_LINE.findall(stdout)
    assert re.search(r"\] [^\n]*\r +\r\d\d:\d\d:\d\d epoch    1/2  loss", stdout), repr(stdout)
    assert "best epoch: " in stdout


@pytest.mark.slow
def test_a_run_without_tensorboard_succeeds_with_one_note(on_terminal):
    run_dir, stdout = on_terminal
    assert stdout.count("'tensorboard' package is not installed") == 1
    assert not (run_dir / "tensorboard").exists()
    assert (run_dir / "metrics.csv").read_text().count("\n") == 3  # header, 2 epochs
    assert (run_dir / "model.pt").is_file()


@pytest.mark.slow
@pytest.mark.mpi
def test_under_mpiexec_only_rank_0_prints_progress(progress_dir):
    result = hpctrain("every_step.yaml", "-o", "mpi", cwd=progress_dir, launcher="mpiexec")
    assert result.returncode == 0, result.stderr[-3000:]
    seen = [(int(e), int(s)) for e, s in PROGRESS_LINE.findall(result.stdout)]
    assert seen == [(e, s) for e in (1, 2) for s in range(1, 11)], result.stdout
    assert "2 ranks via mpi, gloo" in result.stdout
    assert "  devices: 2 x cpu\n" in result.stdout
    assert result.stdout.count("training finished") == 1
    assert "structures/s" not in result.stderr and "[rank 1]" not in result.stdout
    assert not (progress_dir / "mpi" / "tensorboard").exists()  # logging.tensorboard: false
