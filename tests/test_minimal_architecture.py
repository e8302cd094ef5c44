"""The minimal architecture of docs/adding-an-architecture.rst (examples/minimal_architecture):
it passes the conformance suite and trains through the command line."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, clean_env, hpctrain, tiny_options, write_options

from hpctrain.testing import ArchitectureTests

EXAMPLE = ROOT / "examples" / "minimal_architecture"

# the way the documentation tells users: the package's parent directory on the path
if str(EXAMPLE) not in sys.path:
    sys.path.insert(0, str(EXAMPLE))


@pytest.mark.slow
class TestPairMLP(ArchitectureTests):
    architecture = "pair_mlp"
    model_hypers = {"cutoff": 4.0, "num_radial": 4, "hidden": 16}
    training_hypers = {"num_epochs": 3, "batch_size": 4, "learning_rate": 0.01}


def options_for(name: str) -> dict:
    """A tiny run of architecture ``name`` with the hypers of pair_mlp (in place of
    the kit's mp_transformer ones)."""
    options = tiny_options(
        architecture={"name": name, "training": {"batch_size": 10}}, test_set=0.1
    )
    options["architecture"]["model"] = {"cutoff": 3.5, "num_radial": 4, "hidden": 8}
    del options["distributed"]  # the default timeout
    return options


def _train(workdir: Path, name: str, cwd: Path, pythonpath: str | None, *args: str):
    options = write_options(workdir, options_for(name))
    env = clean_env()
    env.pop("PYTHONPATH", None)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    return hpctrain(options, *args, cwd=cwd, env=env)


@pytest.mark.slow
def test_trains_through_the_command_line(workdir):
    run_dir = workdir / "run"
    result = _train(workdir, "pair_mlp", workdir, str(EXAMPLE), "--output-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (run_dir / "train.log").read_text()
    assert "architecture pair_mlp" in log
    assert "epoch    2/2" in log
    for name in ("model.ckpt", "model.pt", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    metrics = json.loads((run_dir / "test_metrics.json").read_text())
    assert all(v == v and v >= 0 for v in metrics.values()), metrics  # finite, not NaN
    resolved = yaml.safe_load((run_dir / "options.resolved.yaml").read_text())
    # the user's hypers, merged over the typed defaults of ModelHypers
    assert resolved["architecture"]["model"] == {"cutoff": 3.5, "num_radial": 4, "hidden": 8}
    assert resolved["architecture"]["training"]["learning_rate"] == 1e-3


def test_without_the_path_the_architecture_is_unknown(workdir):
    result = _train(workdir, "pair_mlp", workdir, None)
    assert result.returncode == 2
    assert "unknown architecture 'pair_mlp' (at 'architecture.name')" in result.stderr
    assert not (workdir / "outputs").exists()


def test_dotted_module_path_from_the_repository_root(tmp_path):
    """``python -m`` puts the working directory on the path: the package is found by
    its dotted path from the repository root (checked before training starts)."""
    code = (
        "from hpctrain.architecture import resolve\n"
        "arch = resolve('examples.minimal_architecture.pair_mlp', {}, {})\n"
        "print(arch.model_class.__name__, arch.model_hypers['cutoff'])\n"
    )
    env = clean_env()
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["PairMLP", "4.0"]
    assert os.sep not in result.stdout
