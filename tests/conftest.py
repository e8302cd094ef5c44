import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

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
    env = {
        k: v
        for k, v in os.environ.items()
        if (
            not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_", "TORCHELASTIC_"))
            or k == "SLURM_CONF"
        )
        and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
