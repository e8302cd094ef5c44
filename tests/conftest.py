import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hpctrain.launch import without_launcher

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_XYZ = ROOT / "examples" / "rmd17_ethanol_100.xyz"
BIN = Path(sys.executable).parent


@pytest.fixture
def write_options(tmp_path):
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


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
