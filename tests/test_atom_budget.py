"""``architecture.training.max_atoms_per_batch``: batches by atom budget in a real run."""

import pytest
import torch
from conftest import hpctrain, tiny_options, write_options

pytestmark = pytest.mark.slow


def final_weights(run_dir):
    return torch.load(run_dir / "model.ckpt", weights_only=False)["model_state"]


def train(workdir, name, training, launcher=None):
    options = tiny_options(architecture={"training": {"num_epochs": 2, **training}})
    write_options(workdir, options, f"{name}.yaml")
    return hpctrain("train", f"{name}.yaml", "-o", name, cwd=workdir, launcher=launcher)


def test_a_budget_of_eight_molecules_trains_as_a_batch_of_eight(workdir):
    """Ethanol has 9 atoms: a budget of 72 atoms makes the batches of batch_size 8."""
    by_count = train(workdir, "count", {"batch_size": 8})
    by_atoms = train(workdir, "atoms", {"max_atoms_per_batch": 72})
    assert by_count.returncode == 0, by_count.stderr
    assert by_atoms.returncode == 0, by_atoms.stderr
    assert "global batch of up to 72 atoms on 1 rank" in by_atoms.stdout
    count, atoms = final_weights(workdir / "count"), final_weights(workdir / "atoms")
    assert count.keys() == atoms.keys()
    for key in count:
        assert torch.equal(count[key], atoms[key]), key
    # and it is not the same as another budget
    other = train(workdir, "other", {"max_atoms_per_batch": 90})
    assert other.returncode == 0, other.stderr
    assert any(not torch.equal(count[k], v) for k, v in final_weights(workdir / "other").items())


def test_a_structure_larger_than_a_ranks_share_is_a_clear_error(workdir):
    result = train(workdir, "small", {"max_atoms_per_batch": 17}, "mpiexec")
    assert result.returncode != 0
    message = result.stdout + result.stderr
    assert "structure 0 of training_set[0]" in message, message[-2000:]
    assert "has 9 atoms, more than 'architecture.training.max_atoms_per_batch' (17)" in message
    assert "raise max_atoms_per_batch to at least 18" in message
    assert not (workdir / "small" / "model.pt").exists()
