"""HDF5 shards: conversion, byte-identical output, the lazy reader, checks and errors."""

import json
import os
import pickle
import runpy

import ase.io
import h5py
import numpy as np
import pytest
import torch
from conftest import EXAMPLE_XYZ, ROOT, hpctrain, merged, tiny_options, write_options

from hpctrain import cli
from hpctrain.data import ShardDataset, read_dataset
from hpctrain.data.convert import convert, spec_from_args
from hpctrain.data.inspection import summarize, verify
from hpctrain.errors import DataError
from hpctrain.options import DatasetOptions, GradientOptions, SystemsOptions, TargetOptions


def options_for(path, **target) -> DatasetOptions:
    return DatasetOptions(
        systems=SystemsOptions(read_from=str(path)), targets={"energy": TargetOptions(**target)}
    )


def convert_cli(*args) -> int:
    return cli.main(["convert", *map(str, args)])


def assert_same(a, b):
    """Two Structures are bitwise identical, field by field."""
    for field in ("numbers", "positions", "cell", "pbc"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.dtype == y.dtype and torch.equal(x, y), field
    for field in ("targets", "forces", "stress"):
        x, y = getattr(a, field), getattr(b, field)
        assert x.keys() == y.keys(), field
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (field, key)


def assert_same_dataset(reference, shards):
    assert len(reference) == len(shards)
    np.testing.assert_array_equal(reference.n_atoms, shards.n_atoms)
    assert reference.info == shards.info
    for i in range(len(reference)):
        assert_same(reference[i], shards[i])


def files_of(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def open_fds_under(directory) -> list[str]:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if link.startswith(str(directory))]


@pytest.fixture(scope="module")
def ethanol(tmp_path_factory):
    """The example converted into shards of 32 structures."""
    out = tmp_path_factory.mktemp("ethanol") / "shards"
    assert convert_cli(EXAMPLE_XYZ, "-o", out, "--shard-size", 32) == 0
    return out


@pytest.fixture(scope="module")
def emt_xyz(tmp_path_factory):
    """30 periodic EMT structures with energy, forces and stress (ASE's extxyz writer)."""
    make = runpy.run_path(str(ROOT / "benchmarks" / "make_emt_dataset.py"))["structures"]
    path = tmp_path_factory.mktemp("emt") / "emt.xyz"
    ase.io.write(path, list(make(30, 8, 0)), format="extxyz")
    return path


def test_round_trip_of_the_non_periodic_example(ethanol):
    assert sorted(p.name for p in ethanol.iterdir()) == [
        "manifest.json",
        "shard-0000-00000.h5",
        "shard-0000-00001.h5",
        "shard-0000-00002.h5",
        "shard-0000-00003.h5",
    ]
    manifest = json.loads((ethanol / "manifest.json").read_text())
    assert [s["n_structures"] for s in manifest["shards"]] == [32, 32, 32, 4]
    assert manifest["targets"]["energy"]["keys"] == {"value": "energy", "forces": "forces"}
    reference = read_dataset(options_for(EXAMPLE_XYZ), "training_set", "test")
    shards = read_dataset(options_for(ethanol), "training_set", "test")
    assert isinstance(shards, ShardDataset)
    assert_same_dataset(reference, shards)
    # the reference is the file itself, not only read_dataset
    atoms = ase.io.read(EXAMPLE_XYZ, 57)
    np.testing.assert_array_equal(shards[57].positions.numpy(), atoms.positions)
    assert shards[57].targets["energy"].item() == atoms.get_potential_energy()
    assert not shards[57].pbc.any() and not shards[57].cell.any()
    assert np.isnan(shards.volumes).all() and len(shards.volumes) == len(shards)


def test_round_trip_of_a_periodic_dataset_with_stress(emt_xyz, tmp_path):
    out = tmp_path / "shards"
    assert convert_cli(emt_xyz, "-o", out, "--stress", "stress", "--shard-size", 8) == 0
    wanted = {"forces": True, "stress": True}
    reference = read_dataset(options_for(emt_xyz, **wanted), "training_set", "test")
    shards = read_dataset(options_for(out, **wanted), "training_set", "test")
    assert shards.info.targets["energy"].gradients == ["positions", "strain"]
    assert_same_dataset(reference, shards)
    atoms = ase.io.read(emt_xyz, 29)
    assert shards[29].pbc.all()
    np.testing.assert_array_equal(shards[29].cell.numpy(), atoms.cell.array)
    np.testing.assert_array_equal(shards[29].stress["energy"].numpy(), atoms.get_stress(False))
    np.testing.assert_array_equal(shards[29].forces["energy"].numpy(), atoms.get_forces())
    # cell volumes, for sharing batches among ranks, without reading the structures
    np.testing.assert_allclose(shards.volumes, reference.volumes, rtol=1e-12)
    assert shards.volumes[29] == pytest.approx(atoms.get_volume(), rel=1e-12)
    # the options may ask for less than is stored
    energy_only = read_dataset(
        options_for(out, forces=False), "training_set", "test", torch.float32
    )
    assert energy_only[0].forces == {} and energy_only[0].stress == {}
    assert energy_only[0].positions.dtype == torch.float32


def test_units_and_extra_targets_convert_like_read_dataset(emt_xyz, tmp_path):
    out = tmp_path / "shards"
    flags = ["--energy-unit", "kcal/mol", "--length-unit", "bohr", "--virial", "stress"]
    assert convert_cli(emt_xyz, "-o", out, *flags, "--target", "again:energy") == 0
    options = options_for(emt_xyz, unit="kcal/mol", virial="stress")
    options.systems.length_unit = "bohr"
    options.targets["again"] = TargetOptions(key="energy", unit="kcal/mol", forces=False)
    reference = read_dataset(options, "training_set", "test")
    # the same options read the shards: their units are those the shards came from
    options.systems.read_from = str(out)
    assert_same_dataset(reference, read_dataset(options, "training_set", "test"))
    atoms = ase.io.read(emt_xyz, 3)
    energy = ShardDataset(out)[3].targets["energy"].item()
    assert energy == pytest.approx(atoms.get_potential_energy() * 0.0433641, rel=1e-5)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["converted_from"] == {"length_unit": "bohr", "energy_unit": "kcal/mol"}
    assert manifest["targets"]["energy"]["keys"]["virial"] == "stress"
    assert manifest["targets"]["again"]["gradients"] == []
    # units that are neither eV nor the original ones are refused
    options.targets["energy"].unit = "Hartree"
    with pytest.raises(DataError, match=r"'training_set.targets.energy.unit' .* 'Hartree'"):
        read_dataset(options, "training_set", "test")


def test_per_atom_targets_round_trip(tmp_path):
    frames = ase.io.read(EXAMPLE_XYZ, ":20")
    rng = np.random.default_rng(3)
    for atoms in frames:
        atoms.arrays["atomic_energy"] = rng.normal(size=len(atoms))
    path = tmp_path / "per_atom.xyz"
    ase.io.write(path, frames, format="extxyz")
    flags = ["--target", "local:atomic_energy:per-atom", "--shard-size", 6]
    assert convert_cli(path, "-o", tmp_path / "out", *flags) == 0
    options = options_for(path)
    options.targets["local"] = TargetOptions(key="atomic_energy", per_atom=True, forces=False)
    reference = read_dataset(options, "training_set", "test")
    options.systems.read_from = str(tmp_path / "out")
    shards = read_dataset(options, "training_set", "test")
    assert shards.info.targets["local"].per_atom
    assert_same_dataset(reference, shards)
    written = ase.io.read(path, 13).arrays["atomic_energy"]  # extxyz rounds to 8 decimals
    np.testing.assert_array_equal(shards[13].targets["local"].numpy(), written)


def test_ase_database_input_gives_the_same_shards(emt_xyz, tmp_path):
    db = tmp_path / "emt.db"
    ase.io.write(db, ase.io.read(emt_xyz, ":"))
    assert convert_cli(db, "-o", tmp_path / "db", "--stress", "stress") == 0
    assert convert_cli(emt_xyz, "-o", tmp_path / "xyz", "--stress", "stress") == 0
    assert_same_dataset(ShardDataset(tmp_path / "xyz"), ShardDataset(tmp_path / "db"))


def test_converting_twice_gives_the_same_bytes(emt_xyz, tmp_path):
    flags = ["--stress", "stress", "--shard-size", 7, "--compression", "gzip:6"]
    assert convert_cli(emt_xyz, "-o", tmp_path / "a", *flags) == 0
    assert convert_cli(emt_xyz, "-o", tmp_path / "b", *flags) == 0
    a, b = files_of(tmp_path / "a"), files_of(tmp_path / "b")
    assert list(a) == ["manifest.json"] + [f"shard-0000-0000{i}.h5" for i in range(5)]
    assert a == b
    with h5py.File(tmp_path / "a" / "shard-0000-00000.h5") as file:
        assert file["positions"].compression == "gzip" and file["positions"].fletcher32
        assert file.attrs["format"] == "hpctrain-shards" and file.attrs["n_structures"] == 7


def test_shard_boundaries_over_several_inputs(tmp_path):
    frames = ase.io.read(EXAMPLE_XYZ, ":")
    inputs = []
    for i, (start, stop) in enumerate([(0, 40), (40, 75), (75, 100), (100, None)][:3]):
        inputs.append(tmp_path / f"part{i}.xyz")
        ase.io.write(inputs[-1], frames[start:stop], format="extxyz")
    assert convert_cli(*inputs, "-o", tmp_path / "out", "--shard-size", 16) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [(s["file"], s["n_structures"], s["source"]) for s in manifest["shards"]] == [
        ("shard-0000-00000.h5", 16, 0),
        ("shard-0000-00001.h5", 16, 0),
        ("shard-0000-00002.h5", 8, 0),
        ("shard-0001-00000.h5", 16, 1),
        ("shard-0001-00001.h5", 16, 1),
        ("shard-0001-00002.h5", 3, 1),
        ("shard-0002-00000.h5", 16, 2),
        ("shard-0002-00001.h5", 9, 2),
    ]
    assert [s["n_structures"] for s in manifest["sources"]] == [40, 35, 25]
    assert manifest["n_structures"] == 100 and manifest["n_atoms"] == 900
    reference = read_dataset(options_for(EXAMPLE_XYZ), "training_set", "test")
    assert_same_dataset(reference, ShardDataset(tmp_path / "out"))
    # a file whose size divides evenly makes no empty shard
    assert convert_cli(inputs[0], "-o", tmp_path / "even", "--shard-size", 20) == 0
    assert sorted(p.name for p in (tmp_path / "even").glob("*.h5")) == [
        "shard-0000-00000.h5",
        "shard-0000-00001.h5",
    ]


def test_progress_is_one_plain_line_at_a_time_without_a_terminal(tmp_path, capsys):
    convert([str(EXAMPLE_XYZ)], tmp_path / "out", spec_from_args(), {}, progress_every=0.0)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("convert: 1 structures, ") and lines[0].endswith(" structures/s")
    assert lines[99].startswith("convert: 100 structures")
    assert lines[-1].startswith("converted 100 structures (900 atoms) from 1 file(s) into 1 shard")
    assert "\r" not in "".join(lines)


@pytest.mark.slow
@pytest.mark.mpi
def test_two_mpi_ranks_write_the_same_bytes_as_one(tmp_path, emt_xyz):
    frames = ase.io.read(emt_xyz, ":")
    for i, part in enumerate((frames[:5], frames[5:20], frames[20:])):
        ase.io.write(tmp_path / f"part{i}.xyz", part, format="extxyz")
    args = ["convert", "part0.xyz", "part1.xyz", "part2.xyz", "--stress", "stress"]
    args += ["--shard-size", "4", "--neighbors", "4.0"]  # (pairs: the same bytes too)
    single = hpctrain(*args, "-o", "one", cwd=tmp_path, timeout=120)
    assert single.returncode == 0, single.stderr
    mpi = hpctrain(*args, "-o", "two", cwd=tmp_path, launcher="mpiexec", timeout=120)
    assert mpi.returncode == 0, mpi.stderr
    assert mpi.stdout.count("converted 30 structures") == 1, mpi.stdout
    one, two = files_of(tmp_path / "one"), files_of(tmp_path / "two")
    assert len(one) == 1 + 2 + 4 + 3
    assert one == two
    # a bad structure in the file of one rank stops both, without a manifest or shards
    frames[3].calc.results["energy"] = np.inf
    ase.io.write(tmp_path / "part0.xyz", frames[:5], format="extxyz")
    failed = hpctrain(*args, "-o", "three", cwd=tmp_path, launcher="mpiexec", timeout=120)
    assert failed.returncode == 2, failed.stderr
    assert "part0.xyz, structure 3: target 'energy' holds NaN or inf values" in failed.stderr
    assert not (tmp_path / "three").exists()  # nor an empty folder


def test_a_truncated_shard_is_named(ethanol, copy_of):
    broken = copy_of(ethanol)
    shard = broken / "shard-0000-00001.h5"
    shard.write_bytes(shard.read_bytes()[:20000])
    with pytest.raises(DataError, match=r"shard-0000-00001.h5 has 20000 bytes, the manifest says"):
        ShardDataset(broken)
    # with a manifest that agrees on the size, HDF5 itself refuses the file
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["shards"][1]["bytes"] = 20000
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard-0000-00001.h5 is not a readable HDF5 file"):
        ShardDataset(broken)


def test_a_manifest_that_disagrees_with_a_shard_is_named(ethanol, copy_of):
    broken = copy_of(ethanol)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["shards"][2]["n_structures"] = 31
    manifest["n_structures"] = 99
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        DataError, match=r"shard-0000-00002.h5 holds 32 structures .* the manifest says 31"
    ):
        ShardDataset(broken)
    manifest["n_structures"] = 100
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shards hold 99 structures in all, but n_structures"):
        ShardDataset(broken)


def test_a_missing_shard_or_manifest_is_named(ethanol, copy_of):
    broken = copy_of(ethanol)
    (broken / "shard-0000-00003.h5").unlink()
    with pytest.raises(DataError, match=r"shard .*shard-0000-00003.h5 is missing; check"):
        ShardDataset(broken)
    (broken / "manifest.json").unlink()
    with pytest.raises(DataError, match=r"holds no manifest.json; .* run hpctrain convert"):
        read_dataset(options_for(broken), "training_set", "test")


def test_targets_the_shards_lack_are_named_with_the_options_key(ethanol):
    options = options_for(ethanol)
    options.targets = {"free_energy": TargetOptions(forces=False)}
    with pytest.raises(
        DataError, match=r"'training_set.targets.free_energy' in test: .*has no target"
    ):
        read_dataset(options, "training_set", "test")
    with pytest.raises(DataError, match=r"'validation_set.targets.energy.stress/virial' in test"):
        read_dataset(options_for(ethanol, stress=True), "validation_set", "test")
    options = options_for(ethanol, key="total_energy")
    with pytest.raises(DataError, match=r"read from key 'energy'"):
        read_dataset(options, "training_set", "test")
    # a key naming another input key is fine when it is the one the shards recorded
    options = options_for(ethanol, key="energy", forces=GradientOptions(key="forces"))
    assert len(read_dataset(options, "training_set", "test")) == 100


def test_forces_requested_but_not_converted(tmp_path):
    out = tmp_path / "out"
    assert convert_cli(EXAMPLE_XYZ, "-o", out, "--forces", "none") == 0
    with pytest.raises(DataError, match=r"'training_set.targets.energy.forces' .* asks for forces"):
        read_dataset(options_for(out), "training_set", "test")
    assert ShardDataset(out)[0].forces == {}


def test_nan_in_an_input_stops_conversion_naming_file_and_structure(tmp_path, capsys):
    frames = ase.io.read(EXAMPLE_XYZ, ":40")
    frames[37].info["energy"] = frames[37].get_potential_energy()
    frames[37].arrays["forces"] = frames[37].get_forces()
    frames[37].arrays["forces"][4, 1] = np.nan
    frames[37].calc = None
    bad = tmp_path / "bad.xyz"
    ase.io.write(bad, frames, format="extxyz")
    out = tmp_path / "out"
    assert convert_cli(bad, "-o", out, "--shard-size", 16) == 2
    err = capsys.readouterr().err
    assert f"{bad}, structure 37: forces of 'energy' holds NaN or inf values" in err
    assert not out.exists()  # no manifest, no partial shards, no empty folder
    # into a folder that was there: it stays, empty
    out.mkdir()
    assert convert_cli(bad, "-o", out, "--shard-size", 16) == 2
    assert out.is_dir() and sorted(p.name for p in out.iterdir()) == []


def test_missing_keys_and_bad_flags_name_the_flag(tmp_path, capsys):
    assert convert_cli(EXAMPLE_XYZ, "-o", tmp_path / "a", "--stress", "stress") == 2
    err = capsys.readouterr().err  # (molecules: no structure can have a stress)
    assert "no structure has a stress for target 'energy' (key 'stress'" in err
    assert not (tmp_path / "a").exists()
    assert convert_cli(EXAMPLE_XYZ, "-o", tmp_path / "b", "--energy", "E") == 2
    err = capsys.readouterr().err
    assert "structure 0 has no 'E' for target 'energy' (set with --energy KEY)" in err
    assert convert_cli(EXAMPLE_XYZ, "-o", tmp_path / "c", "--target", "x") == 2
    assert "expected NAME:KEY or NAME:KEY:per-atom" in capsys.readouterr().err
    assert convert_cli(EXAMPLE_XYZ, "-o", tmp_path / "d", "--energy-unit", "parsec") == 2
    assert "--energy-unit: cannot convert unit 'parsec'" in capsys.readouterr().err


def test_offsets_inconsistent_with_numbers_are_named(ethanol, copy_of):
    broken = copy_of(ethanol)
    with h5py.File(broken / "shard-0000-00002.h5", "r+") as file:
        file["offsets"][5] = file["offsets"][4]
    with pytest.raises(DataError, match=r"shard-0000-00002.h5, structure 4: offsets go from"):
        ShardDataset(broken)
    with h5py.File(broken / "shard-0000-00002.h5", "r+") as file:
        file["offsets"][5] = 45
        file["offsets"][32] = 287
    with pytest.raises(DataError, match=r"offsets end at 287 but the shard holds 288 atoms"):
        ShardDataset(broken)


def test_inspect_summarizes_and_verify_catches_a_flipped_byte(ethanol, copy_of, capsys):
    text = summarize(ethanol)
    energies = np.array([a.get_potential_energy() for a in ase.io.read(EXAMPLE_XYZ, ":")])
    assert "structures: 100 with 900 atoms, in 4 shard(s) from 1 input file(s)" in text
    assert "atoms per structure: min 9, mean 9.00, max 9" in text
    assert f"mean {energies.mean():.6g} eV, std {energies.std():.6g} eV" in text
    assert f"per atom mean {(energies / 9).mean():.6g} eV" in text
    assert verify(ethanol) == 100

    broken = copy_of(ethanol)
    shard = broken / "shard-0000-00001.h5"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    assert cli.main(["inspect", str(ethanol), "--verify"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("ok")
    bad = hpctrain("inspect", broken, "--verify", cwd=ROOT)
    assert bad.returncode == 2
    assert "shard-0000-00001.h5: sha256" in bad.stderr and "differs" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_verify_names_the_structure_of_a_nan_written_by_another_tool(ethanol, copy_of):
    broken = copy_of(ethanol)
    shard = broken / "shard-0000-00003.h5"
    with h5py.File(shard, "r+") as file:
        file["positions"][20, 2] = np.nan  # atom 20: structure 2 of this shard
    manifest = json.loads((broken / "manifest.json").read_text())
    from hpctrain.data.shards import sha256_of

    manifest["shards"][3].update(sha256=sha256_of(shard), bytes=shard.stat().st_size)
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"shard-0000-00003.h5, structure 2: 'positions' holds NaN"):
        verify(broken)


def test_output_directory_is_not_overwritten_without_asking(ethanol, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert convert_cli(EXAMPLE_XYZ, "-o", out) == 2
    assert "is not empty; choose another one, or pass --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    for name, data in files_of(ethanol).items():
        (out / name).write_bytes(data)
    assert convert_cli(EXAMPLE_XYZ, "-o", out, "--overwrite", "--shard-size", 50) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "notes.txt",
        "shard-0000-00000.h5",
        "shard-0000-00001.h5",
    ]
    assert len(ShardDataset(out)) == 100


def test_files_open_lazily_in_each_process(ethanol):
    reference = read_dataset(options_for(EXAMPLE_XYZ), "training_set", "test")
    dataset = ShardDataset(ethanol, block_size=8)
    assert open_fds_under(ethanol) == []  # the checks at creation closed every file
    assert_same(reference[40], dataset[40])
    assert len(open_fds_under(ethanol)) == 1
    # forked workers reopen the files themselves and read the same structures
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=10,
        num_workers=2,
        collate_fn=list,
        multiprocessing_context="fork",
    )
    structures = [s for batch in loader for s in batch]
    for i, structure in enumerate(structures):
        assert_same(reference[i], structure)
    # and so does a pickled copy (spawned workers)
    copy = pickle.loads(pickle.dumps(dataset))
    assert copy._files == {} and copy._blocks == {}
    assert_same(reference[99], copy[99])
    dataset.close()
    copy.close()
    assert open_fds_under(ethanol) == []


def test_the_command_line_still_trains_by_default():
    args = cli.parser().parse_args(["train", "options.yaml"])
    assert args.command == "train" and args.options == "options.yaml"
    with pytest.raises(SystemExit):
        cli.main(["inspect", "--help"])


TRAIN_OPTIONS = tiny_options(
    seed=1234,
    base_precision=64,
    architecture={"model": {"num_layers": 2}},
    training_set={"targets": {"energy": {"key": "energy"}}},
    test_set=0.1,
)
del TRAIN_OPTIONS["distributed"]  # the default timeout


@pytest.mark.slow
@pytest.mark.mpi
def test_training_from_shards_gives_the_same_weights_as_from_xyz(workdir):
    """One process on the xyz file and on one shard: the same weights, bit for bit.
    Two MPI ranks streaming seven shards of 15 structures: the same weights up to
    the order of the sums over ranks."""
    for name, size in (("shards", "10000"), ("small-shards", "15")):
        result = hpctrain("convert", "ethanol.xyz", "-o", name, "--shard-size", size, cwd=workdir)
        assert result.returncode == 0, result.stderr
    assert len(list((workdir / "small-shards").glob("*.h5"))) == 7
    runs = {}
    for name, data, launcher in (
        ("xyz", "ethanol.xyz", None),
        ("shards", "shards", None),
        ("mpi", "small-shards", "mpiexec"),
    ):
        options = merged(TRAIN_OPTIONS, {"training_set": {"systems": data}})
        write_options(workdir, options, f"{name}.yaml")
        result = hpctrain(f"{name}.yaml", "-o", name, cwd=workdir, launcher=launcher)
        assert result.returncode == 0, result.stderr
        assert "80 training, 10 validation, 10 test structures" in result.stdout
        runs[name] = torch.load(workdir / name / "model.ckpt", weights_only=False)["model_state"]
    assert "2 ranks" in result.stdout
    assert runs["xyz"].keys() == runs["shards"].keys() == runs["mpi"].keys()
    for key in runs["xyz"]:
        assert torch.equal(runs["xyz"][key], runs["shards"][key]), key
        torch.testing.assert_close(runs["mpi"][key], runs["xyz"][key], rtol=1e-7, atol=1e-10)


def test_an_epoch_reads_each_structure_once_across_unaligned_shards(tmp_path):
    """Shards of 13 structures (not a multiple of the sampler's blocks of 8): the
    reader's blocks are the sampler's, a block crossing two shards is read as two
    pieces, and a cache of the pieces of ``window + 1`` blocks never reads twice."""
    from hpctrain.data import DistributedBatchSampler

    out = tmp_path / "shards"
    convert([str(EXAMPLE_XYZ)], out, spec_from_args(), {}, shard_size=13, progress_every=0.0)
    window = 3
    dataset = ShardDataset(out, block_size=8, cache_blocks=2 * (window + 1))
    assert len(dataset._offsets) == 8  # 100 structures in shards of 13
    reads = []
    read_piece = dataset._piece

    def counting(shard, block):
        if (shard, block) not in dataset._blocks:
            reads.append(len(read_piece(shard, block)))
        return read_piece(shard, block)

    dataset._piece = counting
    reference = read_dataset(options_for(EXAMPLE_XYZ), "training_set", "test")
    sampler = DistributedBatchSampler(len(dataset), 10, 0, 1, seed=3, block=8, window=window)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        reads.clear()
        for step in sampler:
            for index in step.local:
                assert_same(reference[int(index)], dataset[int(index)])
        assert sum(reads) == len(dataset), f"epoch {epoch}: {sum(reads)} structures read"
    # a smaller cache than the window visits thrashes: the default is not arbitrary
    dataset.cache_blocks = window - 1
    dataset._blocks.clear()
    reads.clear()
    sampler.set_epoch(2)
    for step in sampler:
        for index in step.local:
            dataset[int(index)]
    assert sum(reads) > len(dataset)


def test_damaged_hdf5_metadata_is_named_never_a_traceback(ethanol, copy_of):
    """Bytes flipped in the first 4 KiB of a shard (superblock, groups, object headers
    and attributes): ``verify`` names the shard every time, ``summarize`` reports it
    or (when what it reads is intact) summarizes; no other exception escapes."""
    import random

    shard_name = "shard-0000-00001.h5"
    broken, unreadable = copy_of(ethanol), None
    for seed in range(24):
        shard = broken / shard_name
        data = bytearray((ethanol / shard_name).read_bytes())
        rng = random.Random(seed)
        for _ in range(8):
            data[rng.randrange(4096)] ^= 0xFF
        shard.write_bytes(bytes(data))
        with pytest.raises(DataError, match=shard_name):
            verify(broken)
        try:
            summarize(broken)
        except DataError as error:
            assert shard_name in str(error)
            if "HDF5 structure cannot be read" in str(error):
                unreadable = bytes(data)
    assert unreadable is not None  # the library's own errors were among those met
    (broken / shard_name).write_bytes(unreadable)
    for command in (["inspect", str(broken)], ["inspect", str(broken), "--verify"]):
        result = hpctrain(*command, cwd=ROOT)
        assert result.returncode == 2, result.stderr
        assert shard_name in result.stderr and "Traceback" not in result.stderr


def test_convert_stores_every_label_the_data_has_by_default(emt_xyz, tmp_path, capsys):
    assert convert_cli(emt_xyz, "-o", tmp_path / "default") == 0
    out = capsys.readouterr().out
    assert "storing energy ('energy'), forces ('forces'), stress ('stress')" in out
    assert "not storing virial (stress is stored)" in out
    assert convert_cli(emt_xyz, "-o", tmp_path / "explicit", "--stress", "stress") == 0
    assert files_of(tmp_path / "default") == files_of(tmp_path / "explicit")
    # molecules: forces, no stress
    assert convert_cli(EXAMPLE_XYZ, "-o", tmp_path / "molecules") == 0
    out = capsys.readouterr().out
    assert "storing energy ('energy'), forces ('forces'); not storing stress (structure 0" in out
    assert ShardDataset(tmp_path / "molecules").info.targets["energy"].gradients == ["positions"]
    # a virial instead of a stress is found and stored as stress
    frames = ase.io.read(emt_xyz, ":")
    for atoms in frames:
        virial = -atoms.get_stress(voigt=False) * atoms.get_volume()
        atoms.calc.results.pop("stress")
        atoms.info["virial"] = virial.reshape(9)
    ase.io.write(tmp_path / "virial.xyz", frames, format="extxyz")
    assert convert_cli(tmp_path / "virial.xyz", "-o", tmp_path / "from-virial") == 0
    assert "stress ('stress')" not in capsys.readouterr().out
    stored = ShardDataset(tmp_path / "from-virial")
    reference = ShardDataset(tmp_path / "default")
    for index in (0, 29):
        torch.testing.assert_close(
            stored[index].stress["energy"], reference[index].stress["energy"], rtol=1e-9, atol=1e-12
        )
