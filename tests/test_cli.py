"""hpctrain eval, export and plot, as real processes on a tiny trained run."""

import json
import os
import re
import subprocess
import sys

import ase.io
import numpy as np
import pytest
from conftest import EXAMPLE_XYZ, hpctrain, tiny_options, write_options

from hpctrain import cli
from hpctrain.data import split_indices
from hpctrain.testing import evaluate_exported, predict_in_memory

SEED = 1234
OPTIONS = tiny_options(
    seed=SEED,
    base_precision=64,
    architecture={"training": {"num_epochs": 3, "batch_size": 10}},
    training_set={"targets": {"energy": {"key": "energy"}}},
    test_set=0.1,
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def table(stdout: str) -> dict[str, float]:
    """``{"energy RMSE [eV/atom]": ..., ...}`` from the table that eval prints."""
    metrics = {}
    for line in stdout.splitlines():
        match = re.match(r"^(.+?) \[(.+)\]\s+(\S+)\s+(\S+)$", line)
        if match:
            name, unit, mae, rmse = match.groups()
            metrics[f"{name} MAE [{unit}]"] = float(mae)
            metrics[f"{name} RMSE [{unit}]"] = float(rmse)
    return metrics


def assert_png(path):
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 200
    assert image.std() > 0  # not a blank canvas


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny training; its test set written out as test.xyz."""
    path = tmp_path_factory.mktemp("cli")
    (path / "ethanol.xyz").symlink_to(EXAMPLE_XYZ)
    write_options(path, OPTIONS)
    result = hpctrain("train", "options.yaml", "-o", "run", cwd=path)
    assert result.returncode == 0, result.stderr
    frames = ase.io.read(EXAMPLE_XYZ, ":")
    _, test, _ = split_indices(len(frames), [0.1, 0.1], SEED)
    ase.io.write(path / "test.xyz", [frames[i] for i in test])
    return path


@pytest.fixture(scope="module")
def evaluated(trained):
    """`hpctrain eval` of the exported model on the test set, with -o and --plot."""
    result = hpctrain(
        *("eval", "run/model.pt", "test.xyz", "-o", "predictions.xyz"),
        *("--plot", "parity.png", "--batch-size", "3"),
        cwd=trained,
    )
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_eval_table_matches_the_test_metrics_of_training(trained, evaluated):
    printed = table(evaluated.stdout)
    expected = json.loads((trained / "run" / "test_metrics.json").read_text())
    assert set(expected) < set(printed)
    for label, value in expected.items():
        assert printed[label] == pytest.approx(value, rel=1e-5), label
    assert {"energy RMSE [eV]", "energy MAE [eV]"} < set(printed)  # totals too
    assert "10 structures (energy, forces)" in evaluated.stdout


@pytest.mark.slow
def test_eval_writes_predictions_in_order_with_references(trained, evaluated):
    from architectures.mp_transformer import __model__ as Model

    written = ase.io.read(trained / "predictions.xyz", ":")
    original = ase.io.read(trained / "test.xyz", ":")
    model = Model.load_checkpoint(trained / "run" / "model.ckpt")
    expected = predict_in_memory(model, trained / "test.xyz")
    assert len(written) == len(original) == len(expected) == 10
    for atoms, source, mine in zip(written, original, expected):
        np.testing.assert_array_equal(atoms.numbers, source.numbers)
        np.testing.assert_allclose(atoms.positions, source.positions, atol=1e-8)
        assert atoms.get_potential_energy() == pytest.approx(source.get_potential_energy())
        np.testing.assert_allclose(atoms.get_forces(), source.get_forces(), atol=1e-8)
        assert atoms.info["predicted_energy"] == pytest.approx(mine["energy"], rel=1e-10)
        np.testing.assert_allclose(atoms.arrays["predicted_forces"], mine["forces"], atol=1e-8)
    # the printed total-energy errors are those of the written predictions
    errors = np.array([a.info["predicted_energy"] - a.get_potential_energy() for a in written])
    printed = table(evaluated.stdout)
    assert printed["energy RMSE [eV]"] == pytest.approx(np.sqrt(np.mean(errors**2)), rel=1e-5)
    assert printed["energy MAE [eV]"] == pytest.approx(np.abs(errors).mean(), rel=1e-5)


@pytest.mark.slow
def test_eval_compares_stress_of_periodic_structures(trained):
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    from architectures.mp_transformer import __model__ as Model

    rng = np.random.default_rng(0)
    periodic = []
    for atoms in ase.io.read(trained / "test.xyz", ":4"):
        boxed = atoms.copy()
        boxed.cell, boxed.pbc = np.diag([9.0, 10.0, 11.0]), True
        boxed.calc = SinglePointCalculator(
            boxed,
            energy=atoms.get_potential_energy(),
            forces=atoms.get_forces(),
            stress=rng.normal(size=6) * 1e-3,
        )
        periodic.append(boxed)
    ase.io.write(trained / "periodic.xyz", periodic)
    result = hpctrain(
        "eval", "run/model.pt", "periodic.xyz", "-o", "periodic-predictions.xyz", cwd=trained
    )
    assert result.returncode == 0, result.stderr
    assert "(energy, forces, stress)" in result.stdout
    written = ase.io.read(trained / "periodic-predictions.xyz", ":")
    model = Model.load_checkpoint(trained / "run" / "model.ckpt")
    expected = predict_in_memory(model, trained / "periodic.xyz")
    errors = []
    for atoms, source, mine in zip(written, periodic, expected):
        np.testing.assert_allclose(atoms.get_stress(), source.get_stress(), atol=1e-12)
        stress = full_3x3_to_voigt_6_stress(np.array(mine["stress"]))
        assert np.abs(stress).max() > 1e-6
        np.testing.assert_allclose(atoms.info["predicted_stress"], stress, atol=1e-10)
        errors.append(atoms.info["predicted_stress"] - source.get_stress())
    printed = table(result.stdout)
    # the table counts all nine components of each stress tensor
    full = [np.abs(e[[0, 1, 2, 3, 4, 5, 3, 4, 5]]) for e in errors]
    assert printed["stress MAE [eV/A^3]"] == pytest.approx(np.mean(full), rel=1e-5)
    # and with --stress none, no stress
    result = hpctrain("eval", "run/model.pt", "periodic.xyz", "--stress", "none", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "stress" not in result.stdout


@pytest.mark.slow
def test_eval_on_a_shard_directory_gives_the_same_metrics(trained, evaluated):
    converted = hpctrain("convert", "test.xyz", "-o", "shards", "--shard-size", "4", cwd=trained)
    assert converted.returncode == 0, converted.stderr
    result = hpctrain("eval", "run/model.pt", "shards", cwd=trained)
    assert result.returncode == 0, result.stderr
    from_shards, from_xyz = table(result.stdout), table(evaluated.stdout)
    assert from_shards.keys() == from_xyz.keys()
    for label, value in from_xyz.items():
        assert from_shards[label] == pytest.approx(value, rel=1e-9), label


@pytest.mark.slow
def test_eval_under_mpiexec_matches_one_process(trained, evaluated):
    result = hpctrain(
        *("eval", "run/model.pt", "test.xyz", "-o", "predictions-mpi.xyz", "--batch-size", "3"),
        cwd=trained,
        launcher="mpiexec",
    )
    assert result.returncode == 0, result.stderr
    assert "2 ranks" in result.stdout
    assert result.stdout.count("target") == 1  # rank 0 alone prints
    mpi, single = table(result.stdout), table(evaluated.stdout)
    assert mpi.keys() == single.keys()
    for label, value in single.items():
        assert mpi[label] == pytest.approx(value, rel=1e-9), label
    one = ase.io.read(trained / "predictions.xyz", ":")
    two = ase.io.read(trained / "predictions-mpi.xyz", ":")
    assert len(two) == len(one) == 10
    for a, b in zip(one, two):  # the original order, not rank by rank
        np.testing.assert_array_equal(a.positions, b.positions)
        assert b.info["predicted_energy"] == pytest.approx(a.info["predicted_energy"], rel=1e-12)
        np.testing.assert_allclose(b.arrays["predicted_forces"], a.arrays["predicted_forces"])


@pytest.mark.slow
def test_parity_and_learning_curve_plots_are_pngs(trained, evaluated):
    assert_png(trained / "parity.png")
    result = hpctrain("plot", "run", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert_png(trained / "run" / "learning_curves.png")
    result = hpctrain("plot", "run", "-o", "plots/curves.png", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert_png(trained / "plots" / "curves.png")


def test_plots_write_angstrom(trained, monkeypatch, tmp_path):
    """Units in plots as people write them: Å and Å³, not A and A^3."""
    from hpctrain import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: figures.append(figure) or path)
    plots.learning_curves(trained / "run")
    titles = [ax.get_title() for ax in figures[0].axes]
    assert "forces [eV/Å]" in titles and "energy [eV/atom]" in titles, titles
    values = np.linspace(0.0, 1.0, 9)
    plots.parity_plot({"stress [eV/A^3]": (values, values)}, tmp_path / "parity.png")
    (axes,) = figures[1].axes
    assert (axes.get_title(), axes.get_xlabel()) == ("stress", "reference [eV/Å³]")


@pytest.mark.slow
def test_plots_and_predictions_get_the_permissions_of_the_run_files(trained, evaluated):
    """Written through temporary files, yet as readable as what the run wrote itself."""
    expected = (trained / "run" / "metrics.csv").stat().st_mode & 0o777
    assert expected & 0o044  # the umask of the tests lets others read
    for name in ("parity.png", "predictions.xyz", "run/model.pt", "run/test_metrics.json"):
        assert (trained / name).stat().st_mode & 0o777 == expected, name


def best_step(run_dir):
    records = [
        json.loads((step / "COMMITTED").read_text()) for step in (run_dir / "checkpoints").iterdir()
    ]
    best = min(records, key=lambda r: r["validation_loss"])
    last = max(r["step"] for r in records)
    return run_dir / "checkpoints" / f"step-{best['step']:09d}", best["step"] == last


@pytest.mark.slow
def test_export_of_model_ckpt_predicts_like_the_runs_model_and_has_metadata(trained):
    import metatomic.torch

    result = hpctrain(
        *("export", "run/model.ckpt", "-o", "exported/ethanol.pt"),
        *("--name", "ethanol test", "--author", "A. Person", "--author", "B. Person"),
        *("--reference", "https://doi.org/10.1/x", "--description", "a tiny model"),
        cwd=trained,
    )
    assert result.returncode == 0, result.stderr
    assert (trained / "exported" / "extensions").is_dir()
    metadata = metatomic.torch.read_model_metadata(str(trained / "exported" / "ethanol.pt"))
    assert metadata.name == "ethanol test"
    assert metadata.authors == ["A. Person", "B. Person"]
    assert metadata.references == {"model": ["https://doi.org/10.1/x"]}
    assert metadata.description == "a tiny model"
    sample = trained / "test.xyz"
    exported = evaluate_exported(
        trained / "exported" / "ethanol.pt", sample, trained / "exported" / "extensions"
    )
    original = evaluate_exported(
        trained / "run" / "model.pt", sample, trained / "run" / "extensions"
    )
    for mine, theirs in zip(exported, original):
        assert mine["energy"] == pytest.approx(theirs["energy"], rel=1e-12)
        np.testing.assert_allclose(mine["forces"], theirs["forces"], rtol=1e-10, atol=1e-12)
    # both require the same TorchScript extensions: none (the training process loaded
    # vesin's for its neighbour lists; the model's code does not use it)
    required = [required_extensions(trained / d) for d in ("exported/ethanol.pt", "run/model.pt")]
    assert required == [[], []]


def required_extensions(path) -> list[str]:
    """The TorchScript libraries an exported model says it requires."""
    import zipfile

    with zipfile.ZipFile(path) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith("/extra/extensions")]
        return [e["name"] for e in json.loads(archive.read(name))]


@pytest.mark.slow
def test_export_of_the_best_step_directory(trained):
    from architectures.mp_transformer import __model__ as Model

    step_dir, is_last = best_step(trained / "run")
    result = hpctrain("export", step_dir, "-o", "best/model.pt", cwd=trained)
    assert result.returncode == 0, result.stderr
    sample = trained / "test.xyz"
    exported = evaluate_exported(
        trained / "best" / "model.pt", sample, trained / "best" / "extensions"
    )
    expected = predict_in_memory(Model.load_checkpoint(step_dir), sample)
    final = predict_in_memory(Model.load_checkpoint(trained / "run" / "model.ckpt"), sample)
    for mine, theirs in zip(expected, exported):
        assert theirs["energy"] == pytest.approx(mine["energy"], rel=1e-12)
    if not is_last:  # the best step is not the last: its model differs from the final one
        assert exported[0]["energy"] != pytest.approx(final[0]["energy"], rel=1e-9)
    # and eval reads it as it reads any exported model
    result = hpctrain("eval", "best/model.pt", "test.xyz", cwd=trained)
    assert result.returncode == 0, result.stderr
    assert "energy [eV/atom]" in result.stdout


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, named",
    [
        (["eval", "missing.pt", "test.xyz"], "missing.pt"),
        (["eval", "run/model.pt", "missing.xyz"], "missing.xyz"),
        (["eval", "run/model.ckpt", "test.xyz"], "run/model.ckpt"),
        (["eval", "run/model.pt", "options.yaml"], "options.yaml"),
        (["eval", "run/model.pt", "test.xyz", "--energy", "E_dft"], "E_dft"),
        (["export", "missing.ckpt", "-o", "x.pt"], "missing.ckpt"),
        (["export", "run/model.pt", "-o", "x.pt"], "run/model.pt"),
        (["export", "run", "-o", "x.pt"], "run/model.ckpt"),
        (["plot", "run/checkpoints"], "run/checkpoints/metrics.csv"),
        (["plot", "missing-run"], "missing-run"),
        # paths of the wrong kind: the message says which path was meant
        (["eval", "run", "test.xyz"], "run is a run directory: evaluate its model, run/model.pt"),
        (["plot", "run/metrics.csv"], "hpctrain plot takes a run directory"),
        (["train", "run"], "run is a directory, not an options file; to repeat the run"),
        (
            ["train", "options.yaml", "-o", "again", "--continue", "run"],
            "is a directory, not a checkpoint: to continue the run it holds, use",
        ),
    ],
)
def test_bad_inputs_exit_2_naming_the_file(trained, args, named):
    result = hpctrain(*args, cwd=trained)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "hpctrain: error:" in result.stderr
    assert named in result.stderr
    assert not (trained / "x.pt").exists() and not (trained / "again").exists()


@pytest.mark.parametrize(
    "command", ["train", "convert", "inspect", "submit", "eval", "export", "plot"]
)
def test_every_command_help_shows_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.parser().parse_args([command, "--help"])
    assert exit.value.code == 0
    text = capsys.readouterr().out
    example = text.split("example:", 1)[1]
    assert f"hpctrain {command} " in example


def test_learning_curves_keep_the_latest_row_of_a_repeated_epoch(tmp_path):
    from hpctrain.plots import learning_curves, read_metrics_csv

    (tmp_path / "metrics.csv").write_text(
        "epoch,step,learning_rate,train_loss,val energy RMSE [eV/atom],epoch_time_s\n"
        "1,10,0.003,1.5,0.02,1.0\n"
        "2,20,0.002,1.2,0.015,1.0\n"
        "2,20,0.002,1.1,0.014,1.0\n"  # a restart repeated epoch 2
        "3,30,0.001,0.9,0.010,1.0\n"
    )
    rows = read_metrics_csv(tmp_path / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert rows[1]["train_loss"] == 1.1
    assert_png(learning_curves(tmp_path))


@pytest.mark.slow
def test_eval_under_mpiexec_writes_predictions_of_a_shard_directory(trained, evaluated):
    """Only rank 0 writes the predictions; ASE's writers must not wait for the others."""
    converted = hpctrain(
        "convert", "test.xyz", "-o", "shards-mpi", "--shard-size", "4", cwd=trained
    )
    assert converted.returncode == 0, converted.stderr
    result = hpctrain(
        *("eval", "run/model.pt", "shards-mpi", "-o", "predictions-shards-mpi.xyz"),
        cwd=trained,
        launcher="mpiexec",
        timeout=180,
    )
    assert result.returncode == 0, result.stderr
    one = ase.io.read(trained / "predictions.xyz", ":")
    two = ase.io.read(trained / "predictions-shards-mpi.xyz", ":")
    assert len(two) == len(one) == 10
    for a, b in zip(one, two):
        np.testing.assert_allclose(b.positions, a.positions, atol=1e-12)
        assert b.info["predicted_energy"] == pytest.approx(a.info["predicted_energy"], rel=1e-9)


def damaged_checkpoint(trained, kind: str) -> str:
    """A copy of the run's model.ckpt, damaged as ``kind`` says; its name."""
    good = (trained / "run" / "model.ckpt").read_bytes()
    data = {
        "truncated": good[: len(good) // 3],
        "garbage": bytes(range(256)) * 40,
        "empty": b"",
        "flipped": good[:2000] + bytes(b ^ 0xFF for b in good[2000:2100]) + good[2100:],
    }[kind]
    name = f"{kind}.ckpt"
    (trained / name).write_bytes(data)
    return name


@pytest.mark.parametrize("kind", ["truncated", "garbage", "empty", "flipped"])
def test_a_damaged_checkpoint_is_named_without_a_traceback(trained, kind):
    """--continue and export: exit 2, the file named, the run it came from untouched."""
    name = damaged_checkpoint(trained, kind)
    before = (trained / "run" / "model.ckpt").read_bytes()
    for command in (
        ["train", "options.yaml", "--continue", name, "-o", f"from-{kind}"],
        ["export", name, "-o", f"{kind}.pt"],
    ):
        result = hpctrain(*command, cwd=trained)
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        assert f"{name} is not a readable checkpoint" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
    assert not (trained / f"{kind}.pt").exists()
    assert (trained / "run" / "model.ckpt").read_bytes() == before


def test_a_checkpoint_of_another_architecture_names_both(trained):
    # another architecture, with its own default model hypers
    soap = {**OPTIONS, "architecture": {**OPTIONS["architecture"], "name": "soap_bpnn"}}
    del soap["architecture"]["model"]
    write_options(trained, soap, "soap.yaml")
    result = hpctrain(
        "train", "soap.yaml", "--continue", "run/model.ckpt", "-o", "soap-run", cwd=trained
    )
    assert result.returncode == 2, result.stderr
    assert (
        "run/model.ckpt was written by architecture 'mp_transformer', not 'soap_bpnn': to "
        "continue or fine-tune it, set 'architecture.name: mp_transformer'"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (trained / "soap-run").iterdir()) == ["train.log"]


HOST_MEMORY_PROBE = """
import os, resource, sys
from hpctrain import cli
cli.main(["inspect", sys.argv[1]])  # a command that fails: main has run all the same
import torch
mib = 2**20 // 4
x = torch.ones(64 * mib)  # 64 MiB, touched
huge = sum(
    int(line.split()[1])
    for line in open("/proc/self/smaps")
    if line.startswith("AnonHugePages:")
)
del x
for i in range(6):  # the last three where freed blocks were, or in fresh memory
    if i == 3:
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = torch.ones(64 * mib)
    del y
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), huge, faults)
"""


@pytest.mark.parametrize("user_settings", ["none", "no huge pages", "malloc and no huge pages"])
def test_the_command_keeps_freed_memory_and_uses_huge_pages_unless_told_not_to(
    tmp_path, user_settings
):
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    if user_settings != "none":
        env["THP_MEM_ALLOC_ENABLE"] = "0"
    if user_settings == "malloc and no huge pages":  # blocks over 1 MiB unmapped when freed
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    probe = [sys.executable, "-c", HOST_MEMORY_PROBE, str(tmp_path / "missing.xyz")]
    result = subprocess.run(probe, env=env, capture_output=True, text=True, check=True)
    variable, huge_kib, faults = result.stdout.split()
    assert variable == ("1" if user_settings == "none" else "0")
    # 64 MiB of fresh 4 KiB pages fault 16,384 times on first touch; the freed block
    # reused, hardly at all
    if user_settings == "malloc and no huge pages":
        assert int(faults) >= 3 * 16_000, result.stdout
    else:
        assert int(faults) < 1_000, result.stdout
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            mode = f.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = "never"
    if mode == "madvise":  # huge pages only where asked for: asked for by torch or not
        assert (int(huge_kib) >= 32 * 1024) == (user_settings == "none"), result.stdout
