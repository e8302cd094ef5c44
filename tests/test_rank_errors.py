"""Errors that ranks meet before training end the run once, with one message.

Every rank checks the options, data and checkpoint; when they fail, rank 0 alone
reports (the others would repeat it, their lines interleaved), and a rank that fails
alone ends the others instead of leaving them in their next collective. Real
launchers, real ranks.
"""

from conftest import hpctrain, launcher_command, tiny_options, write_options

TWO_SETS = tiny_options(
    training_set=[
        {"systems": "ethanol.xyz", "targets": {"energy": {"forces": True}}},
        {"systems": "ethanol.xyz", "targets": {"energy": {"forces": True}}},
    ],
    architecture={"training": {"num_epochs": 1, "batch_size": 4}},
)
MISSING_DATA = {"architecture": {"name": "soap_bpnn"}, "training_set": "nothere.xyz"}
NOT_FOUND = "'training_set.systems.read_from' in bad.yaml"


def test_an_options_error_is_reported_once_under_mpiexec(workdir):
    write_options(workdir, MISSING_DATA, "bad.yaml")
    result = hpctrain("bad.yaml", cwd=workdir, launcher="mpiexec")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpctrain: error:") == 1, result.stderr
    assert NOT_FOUND in result.stderr and "does not exist" in result.stderr
    assert "[rank 1]" not in result.stderr and "Traceback" not in result.stderr


def test_torchrun_shows_the_error_in_its_failure_summary(workdir):
    """torchrun ends with 1 whatever its ranks' exit codes (documented); its summary
    carries rank 0's message and says that rank 1 stopped with it."""
    write_options(workdir, MISSING_DATA, "bad.yaml")
    result = hpctrain("bad.yaml", cwd=workdir, launcher="torchrun")
    assert result.returncode == 1, result.stderr
    printed = [line for line in result.stderr.splitlines() if line.startswith("hpctrain: error")]
    assert len(printed) == 1 and NOT_FOUND in printed[0], result.stderr
    assert f"traceback : hpctrain: error: {NOT_FOUND}" in result.stderr, result.stderr
    assert "exitcode  : 2" in result.stderr
    assert "stopped with rank 0, which says why" in result.stderr


def test_a_rank_that_fails_alone_ends_every_rank_with_its_message(workdir):
    """Rank 1 reads other options (MPMD) that name a missing file; rank 0's are good:
    rank 0 reports rank 1's error, before any run directory is made."""
    write_options(workdir, TWO_SETS)
    write_options(workdir, MISSING_DATA, "bad.yaml")
    one_rank = launcher_command(None)
    result = hpctrain(
        *(["options.yaml", "-o", "run", ":", "-n", "1"] + one_rank + ["bad.yaml", "-o", "run"]),
        cwd=workdir,
        launcher="mpiexec",
        ranks=1,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpctrain: error:") == 1, result.stderr
    assert f"hpctrain: error: rank 1 of 2: {NOT_FOUND}" in result.stderr
    assert not (workdir / "run").exists()


def test_a_batch_smaller_than_the_ranks_is_refused_before_the_banner(workdir):
    """A check of the trainer, named once; the run directory keeps train.log only, so
    the same --output-dir takes the corrected run."""
    write_options(workdir, tiny_options(architecture={"training": {"batch_size": 1}}))
    result = hpctrain("options.yaml", "-o", "run", cwd=workdir, launcher="mpiexec")
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("hpctrain: error:") == 1, result.stderr
    assert "'architecture.training.batch_size' 1 is smaller than the 2 ranks" in result.stderr
    assert "architecture mp_transformer" not in result.stdout
    assert sorted(p.name for p in (workdir / "run").iterdir()) == ["train.log"]
    assert "is smaller than the 2 ranks" in (workdir / "run" / "train.log").read_text()

    write_options(workdir, TWO_SETS)
    again = hpctrain("options.yaml", "-o", "run", cwd=workdir, launcher="mpiexec")
    assert again.returncode == 0, again.stderr
    assert (workdir / "run" / "model.pt").is_file()
