"""The test kit: data and options for tiny runs, and one way to run the command line
(or a driver script of ``tests/drivers``) under no launcher, mpiexec or torchrun:
``hpctrain(...)`` to its end, ``start(...)`` for a run the test pauses or signals.

A new end-to-end test is a few lines::

    def test_something(workdir):
        write_options(workdir, tiny_options(seed=7))
        result = hpctrain("train", "options.yaml", "-o", "run", cwd=workdir, launcher="mpiexec")
        assert result.returncode == 0, result.stderr
"""

import copy
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from hpctrain.launch import without_launcher

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_XYZ = ROOT / "examples" / "rmd17_ethanol_100.xyz"
BIN = Path(sys.executable).parent


TINY_MP_TRANSFORMER = {
    "d_model": 16,
    "num_heads": 2,
    "num_layers": 1,
    "num_radial": 4,
    "angular_channels": 4,
}


def tiny_options(**changes: Any) -> dict[str, Any]:
    """Options of a tiny run on ``ethanol.xyz`` (the example data, see ``workdir``):
    mp_transformer with a small model, 2 epochs of batch 8, 10 % validation, seed 1;
    ``changes`` are merged in, section by section (``architecture={"training":
    {"num_epochs": 1}}`` changes that key alone)."""
    base = {
        "seed": 1,
        "architecture": {
            "name": "mp_transformer",
            "model": dict(TINY_MP_TRANSFORMER),
            "training": {"num_epochs": 2, "batch_size": 8},
        },
        "training_set": {
            "systems": "ethanol.xyz",
            "targets": {"energy": {"forces": True}},
        },
        "validation_set": 0.1,
        "distributed": {"timeout_s": 60},
    }
    return merged(base, changes)


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes``: dictionaries merged key by key, other values replaced."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_options(directory: Path, options: dict[str, Any], name: str = "options.yaml") -> Path:
    """``options`` as a YAML file in ``directory``."""
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(options, sort_keys=False))
    return path


@pytest.fixture
def workdir(tmp_path) -> Path:
    """A fresh directory holding the example data as ``ethanol.xyz``."""
    (tmp_path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    return tmp_path


HPCTRAIN = ("-m", "hpctrain")


def launcher_command(
    launcher: str | None = None, ranks: int = 2, program: Any = HPCTRAIN
) -> list[str]:
    """The start of a command line running ``program`` in one process (None), or in
    ``ranks`` ranks under ``mpiexec`` or ``torchrun``. ``program`` is what Python runs:
    ``-m hpctrain`` (the default), or a script such as ``tests/drivers/sample_trace.py``
    (a path, or a list of arguments)."""
    if isinstance(program, (str, os.PathLike)):
        program = [program]
    program = [str(part) for part in program]
    if launcher is None:
        return [sys.executable, *program]
    if launcher == "mpiexec":
        return [str(BIN / "mpiexec"), "-n", str(ranks), sys.executable, *program]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", str(ranks), *program]
    raise ValueError(f"unknown launcher {launcher!r}")


def hpctrain(
    *args: Any,
    cwd: Path,
    launcher: str | None = None,
    ranks: int = 2,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    program: Any = HPCTRAIN,
) -> subprocess.CompletedProcess:
    """``hpctrain ARGS...`` run to its end in ``cwd`` (see :func:`launcher_command`),
    in a fresh launch environment (or ``env``); its output captured as text."""
    return subprocess.run(
        launcher_command(launcher, ranks, program) + [str(a) for a in args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start(
    *args: Any,
    cwd: Path,
    launcher: str | None = None,
    ranks: int = 2,
    env: dict[str, str] | None = None,
    program: Any = HPCTRAIN,
    **popen: Any,
) -> subprocess.Popen:
    """``hpctrain ARGS...`` started as :func:`hpctrain` runs it, not waited for: for
    tests that pause or signal the run. Its stdout and stderr are text pipes unless
    ``popen`` says otherwise (other ``subprocess.Popen`` arguments, e.g. ``stdout=``
    a terminal)."""
    options = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen(
        launcher_command(launcher, ranks, program) + [str(a) for a in args],
        cwd=cwd,
        env=clean_env() if env is None else env,
        **{**options, **popen},
    )


@pytest.fixture
def write_yaml(tmp_path):
    """Write an options file (dedented YAML) next to a copy of the example data."""
    data = tmp_path / "ethanol.xyz"
    if not data.exists():
        data.symlink_to(EXAMPLE_XYZ)

    def write(text: str, name: str = "options.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return path

    return write


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh launch: no launcher variables of an outer job."""
    env = without_launcher()
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


HOOKS = ROOT / "tests" / "hooks"
DRIVERS = ROOT / "tests" / "drivers"  # scripts for the program= of start() and hpctrain()


def paused_env(pause_dir: Path, *points: int | str, **extra: str) -> dict[str, str]:
    """``clean_env`` for runs that pause at ``points`` (steps, ``load``,
    ``last-validation``, ``export``) until a stop signal or a release: see
    ``tests/hooks/sitecustomize.py``."""
    pause_dir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(filter(None, [str(HOOKS), os.environ.get("PYTHONPATH")]))
    return clean_env(
        PYTHONPATH=path,
        HPCTRAIN_TEST_PAUSE_AT=",".join(map(str, points)),
        HPCTRAIN_TEST_PAUSE_DIR=str(pause_dir),
        **extra,
    )


def wait_until_paused(
    pause_dir: Path, point: int | str, ranks: int = 1, proc=None, timeout: float = 300
) -> list[int]:
    """Wait until ``ranks`` ranks pause at ``point``; their process ids, by rank.
    Fails at once if ``proc`` (the run) ends first."""
    markers = [pause_dir / f"paused-{point}-rank-{rank}" for rank in range(ranks)]
    deadline = time.monotonic() + timeout
    while not all(marker.exists() and marker.read_text() for marker in markers):
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the run ended before pausing at {point}:\n{err[-3000:]}")
        assert time.monotonic() < deadline, f"no pause at {point} within {timeout} s"
        time.sleep(0.02)
    return [int(marker.read_text()) for marker in markers]


def release(pause_dir: Path, point: int | str) -> None:
    """Let the ranks paused at ``point`` go on."""
    (pause_dir / f"release-{point}").touch()


@pytest.fixture
def copy_of(tmp_path):
    """A fresh copy of a shard directory, to damage."""

    def copy(directory: Path) -> Path:
        target = tmp_path / f"copy-{directory.name}"
        target.mkdir()
        for path in sorted(directory.iterdir()):
            (target / path.name).write_bytes(path.read_bytes())
        return target

    return copy
