"""Errors that ranks meet before training end the run once, with one message.

Every rank checks the options, data and checkpoint; when they fail, rank 0 alone
reports (the others would repeat it, their lines interleaved), and a rank that fails
alone ends the others instead of leaving them in their next collective. Real
launchers, real ranks.
"""

import subprocess

from conftest import BIN, clean_env

MPIEXEC = [str(BIN / "mpiexec")]
HPCTRAIN = [str(BIN / "python"), "-m", "hpctrain"]

GOOD = """\
architecture:
  name: soap_bpnn
  training: {num_epochs: 1, batch_size: 4}
training_set:
  - systems: ethanol.xyz
    targets: {energy: {forces: true}}
  - systems: ethanol.xyz
    targets: {energy: {forces: true}}
validation_set: 0.1
seed: 1
"""
MISSING_DATA = "architecture: {name: soap_bpnn}\ntraining_set: nothere.xyz\n"
NOT_FOUND = "'training_set.systems.read_from' in bad.yaml"


def launch(args: list[str], cwd, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )


def test_an_options_error_is_reported_once_under_mpiexec(write_options, tmp_path):
    write_options(MISSING_DATA, "bad.yaml")
    result = launch(MPIEXEC + ["-n", "2"] + HPCTRAIN + ["bad.yaml"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpctrain: error:") == 1, result.stderr
    assert NOT_FOUND in result.stderr and "does not exist" in result.stderr
    assert "[rank 1]" not in result.stderr and "Traceback" not in result.stderr


def test_torchrun_shows_the_error_in_its_failure_summary(write_options, tmp_path):
    """torchrun ends with 1 whatever its ranks' exit codes (documented); its summary
    carries rank 0's message and says that rank 1 stopped with it."""
    write_options(MISSING_DATA, "bad.yaml")
    command = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "hpctrain"]
    result = launch(command + ["bad.yaml"], tmp_path)
    assert result.returncode == 1, result.stderr
    printed = [line for line in result.stderr.splitlines() if line.startswith("hpctrain: error")]
    assert len(printed) == 1 and NOT_FOUND in printed[0], result.stderr
    assert f"traceback : hpctrain: error: {NOT_FOUND}" in result.stderr, result.stderr
    assert "exitcode  : 2" in result.stderr
    assert "stopped with rank 0, which says why" in result.stderr


def test_a_rank_that_fails_alone_ends_every_rank_with_its_message(write_options, tmp_path):
    """Rank 1 reads other options (MPMD) that name a missing file; rank 0's are good:
    rank 0 reports rank 1's error, before any run directory is made."""
    write_options(GOOD)
    write_options(MISSING_DATA, "bad.yaml")
    result = launch(
        MPIEXEC
        + ["-n", "1"]
        + HPCTRAIN
        + ["options.yaml", "-o", "run", ":", "-n", "1"]
        + HPCTRAIN
        + ["bad.yaml", "-o", "run"],
        tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpctrain: error:") == 1, result.stderr
    assert f"hpctrain: error: rank 1 of 2: {NOT_FOUND}" in result.stderr
    assert not (tmp_path / "run").exists()


def test_training_sets_with_different_labels_are_refused_before_the_banner(write_options, tmp_path):
    """Named with their keys and the label; once; the run directory keeps train.log
    only, so the same --output-dir takes the corrected run."""
    path = write_options(
        GOOD.replace("{forces: true}}\nvalidation", "{forces: false}}\nvalidation")
    )
    result = launch(MPIEXEC + ["-n", "2"] + HPCTRAIN + ["options.yaml", "-o", "run"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpctrain: error:") == 1, result.stderr
    message = result.stderr.split("hpctrain: error: ")[1]
    assert message.startswith("the training sets carry different labels: training_set[0]")
    assert "has 'energy' forces, training_set[1]" in message
    assert "targets.energy.forces" in message
    assert "architecture soap_bpnn" not in result.stdout  # (the banner)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.log"]
    assert "different labels" in (tmp_path / "run" / "train.log").read_text()

    path.write_text(GOOD)
    again = launch(MPIEXEC + ["-n", "2"] + HPCTRAIN + ["options.yaml", "-o", "run"], tmp_path)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "run" / "model.pt").is_file()


def test_a_batch_smaller_than_the_ranks_is_refused_before_the_banner(write_options, tmp_path):
    write_options(GOOD.replace("batch_size: 4", "batch_size: 1"))
    result = launch(MPIEXEC + ["-n", "2"] + HPCTRAIN + ["options.yaml", "-o", "run"], tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpctrain: error:") == 1, result.stderr
    assert "'architecture.training.batch_size' 1 is smaller than the 2 ranks" in result.stderr
    assert "architecture soap_bpnn" not in result.stdout
