"""Neighbour pairs stored in shards (``hpctrain convert --neighbors``): the pairs a
batch gets from them equal a fresh search's, training reads them, and damaged or
mismatched stores are named."""

import json
import runpy

import ase.build
import ase.io
import h5py
import numpy as np
import pytest
import torch
from conftest import EXAMPLE_XYZ, ROOT, hpctrain, merged, tiny_options, write_options
from metatomic.torch import NeighborListOptions
from vesin import NeighborList

from hpctrain import cli
from hpctrain.data import ShardDataset
from hpctrain.data.batch import collate
from hpctrain.data.inspection import summarize, verify
from hpctrain.data.shards import sha256_of
from hpctrain.errors import DataError


def convert_cli(*args) -> int:
    return cli.main(["convert", *map(str, args)])


def awkward_structures() -> list:
    """Periodic EMT alloys, a one-atom cell whose images are its own neighbours, a
    slab periodic in two directions, a molecule, and a lone atom."""
    emt = runpy.run_path(str(ROOT / "benchmarks" / "make_emt_dataset.py"))["structures"]
    structures = list(emt(4, 8, 0))
    tiny = ase.build.bulk("Cu", "fcc", a=3.6)
    slab = ase.build.fcc111("Cu", size=(2, 2, 3), vacuum=5.0)
    slab.pbc = (True, True, False)
    slab.info.clear()
    molecule = ase.build.molecule("CH3CH2OH")
    lone = ase.Atoms("Cu", positions=[[0.0, 0.0, 0.0]])
    for atoms in (tiny, slab, molecule, lone):
        atoms.rattle(0.05, seed=3)
        atoms.info["energy"] = -1.0
        atoms.arrays["forces"] = np.zeros((len(atoms), 3))
        structures.append(atoms)
    return structures


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    """The awkward structures as shards without and with pairs within 5 A."""
    root = tmp_path_factory.mktemp("pairs")
    ase.io.write(root / "data.xyz", awkward_structures(), format="extxyz")
    assert convert_cli(root / "data.xyz", "-o", root / "plain", "--stress", "none") == 0
    args = ("--stress", "none", "--neighbors", 5.0)
    assert convert_cli(root / "data.xyz", "-o", root / "stored", *args) == 0
    return root


def triples(centers, neighbors, shifts) -> list[tuple]:
    return sorted(zip(centers.tolist(), neighbors.tolist(), map(tuple, shifts.tolist())))


def whole_shifts(pairs, structures) -> torch.Tensor:
    """The integer cell shifts behind a batch's ``cell_shifts`` (shift times cell),
    recovered through each structure's cell (zero rows: non-periodic directions)."""
    inverse = torch.stack([torch.linalg.pinv(s.cell.double()) for s in structures])
    shifts = torch.bmm(pairs.cell_shifts.double().unsqueeze(1), inverse[pairs.system])
    whole = shifts.squeeze(1).round()
    assert float((shifts.squeeze(1) - whole).abs().max()) < 1e-6
    return whole.long()


def vesin_full_list(structures, cutoff) -> list[tuple]:
    """Every (i, j, shift) of a batch by vesin's own full list, the reference."""
    out, offset = [], 0
    for s in structures:
        pbc = s.pbc.numpy()
        cell = s.cell.numpy().astype(np.float64) if pbc.any() else np.zeros((3, 3))
        i, j, shift = NeighborList(cutoff=cutoff, full_list=True).compute(
            s.positions.numpy().astype(np.float64), cell, pbc, quantities="ijS"
        )
        out += triples(i + offset, j + offset, np.asarray(shift).reshape(-1, 3))
        offset += len(s.numbers)
    return sorted(out)


@pytest.mark.parametrize("cutoff", [5.0, 3.2])
@pytest.mark.parametrize("source", ["plain", "stored"])
def test_a_batch_gets_the_pairs_of_a_fresh_search(awkward, source, cutoff):
    """Full lists equal vesin's full list; half lists hold each of its pairs once, in
    one direction; stored pairs of a longer cutoff are cut to the request's."""
    dataset = ShardDataset(awkward / source)
    structures = [dataset[i] for i in range(len(dataset))]
    assert all((s.neighbors is None) == (source == "plain") for s in structures)
    reference = vesin_full_list(structures, cutoff)
    assert any(i == j for i, j, _ in reference)  # the one-atom cell's own images
    full = collate(structures, [NeighborListOptions(cutoff, True, True)]).pairs[0]
    assert triples(full.centers, full.neighbors, whole_shifts(full, structures)) == reference
    batch = collate(structures, [NeighborListOptions(cutoff, True, True)])
    assert torch.equal(full.system, batch.system[full.centers])
    assert torch.equal(full.system, batch.system[full.neighbors])
    half = collate(structures, [NeighborListOptions(cutoff, False, True)]).pairs[0]
    both = (
        np.concatenate([half.centers, half.neighbors]),
        np.concatenate([half.neighbors, half.centers]),
    )
    shifts = torch.cat([whole_shifts(half, structures), -whole_shifts(half, structures)])
    assert triples(*both, shifts) == reference
    assert 2 * len(half) == len(reference)


def test_stored_pairs_longer_than_asked_are_cut_on_positions_in_the_batch(awkward):
    """A request beyond the stored cutoff is searched, not truncated."""
    dataset = ShardDataset(awkward / "stored")
    structures = [dataset[i] for i in range(4)]
    pairs = collate(structures, [NeighborListOptions(6.0, True, True)]).pairs[0]
    shifts = whole_shifts(pairs, structures)
    assert triples(pairs.centers, pairs.neighbors, shifts) == vesin_full_list(structures, 6.0)


def test_training_reads_the_stored_pairs_and_trains_the_same_weights(workdir):
    """float64, the model's cutoff stored: bit for bit the weights of searching each
    batch; a longer stored cutoff, cut per batch: the same up to the order of sums."""
    for name, extra in (
        ("plain", ()),
        ("stored", ("--neighbors", 5.0)),
        ("longer", ("--neighbors", 6.5)),
    ):
        result = hpctrain("convert", "ethanol.xyz", "-o", name, *extra, cwd=workdir)
        assert result.returncode == 0, result.stderr
    weights = {}
    for name in ("plain", "stored", "longer"):
        options = tiny_options(base_precision=64, training_set={"systems": name})
        options = merged(options, {"architecture": {"model": {"cutoff": 5.0}}})
        write_options(workdir, options, f"{name}.yaml")
        result = hpctrain(f"{name}.yaml", "-o", f"run-{name}", cwd=workdir)
        assert result.returncode == 0, result.stderr
        row = next(line for line in result.stdout.splitlines() if "neighbour pairs" in line)
        if name == "plain":
            assert "searched by the loader (hpctrain convert --neighbors 5 stores them)" in row
        else:
            assert (
                f"read from the shards (stored within {'5' if name == 'stored' else '6.5'} A)"
                in row
            )
        checkpoint = torch.load(workdir / f"run-{name}" / "model.ckpt", weights_only=False)
        weights[name] = checkpoint["model_state"]
    for key, value in weights["plain"].items():
        assert torch.equal(weights["stored"][key], value), key
        torch.testing.assert_close(weights["longer"][key], value, rtol=1e-9, atol=1e-12)


def test_inspect_and_verify_read_the_stored_pairs(awkward):
    text = summarize(awkward / "stored")
    line = next(x for x in text.splitlines() if x.startswith("neighbour pairs"))
    assert "stored within 5 angstrom" in line and "per structure (each pair once)" in line
    assert "neighbour pairs" not in summarize(awkward / "plain")
    assert verify(awkward / "stored") == len(awkward_structures())
    manifest = json.loads((awkward / "stored" / "manifest.json").read_text())
    assert manifest["conversion"]["neighbors"] == {"cutoff": 5.0, "list": "half"}


def rewrite(directory, change) -> None:
    """Apply ``change(file)`` to the first shard and record its new checksum, as
    another writer would have written it."""
    shard = directory / "shard-0000-00000.h5"
    with h5py.File(shard, "r+") as file:
        change(file)
    manifest = json.loads((directory / "manifest.json").read_text())
    manifest["shards"][0].update(sha256=sha256_of(shard), bytes=shard.stat().st_size)
    (directory / "manifest.json").write_text(json.dumps(manifest))


def test_a_pair_naming_an_atom_outside_its_structure_is_named(awkward, copy_of):
    broken = copy_of(awkward / "stored")

    def damage(file):
        offsets = file["neighbors/offsets"][:]
        pairs = file["neighbors/pairs"]
        pairs[offsets[2], 1] = 8  # structure 2 has atoms 0-7

    rewrite(broken, damage)
    message = r"shard-0000-00000.h5, structure 2: a stored neighbour pair \[\d+, 8\] names an atom"
    with pytest.raises(DataError, match=message):
        verify(broken)
    dataset = ShardDataset(broken)
    with pytest.raises(DataError, match=message):
        dataset[0]


def test_a_manifest_promising_pairs_a_shard_lacks_is_named(awkward, copy_of):
    broken = copy_of(awkward / "stored")
    rewrite(broken, lambda file: file["neighbors"].attrs.modify("cutoff", 4.0))
    with pytest.raises(DataError, match="pairs within 5.0 A, but the shard has another cutoff"):
        ShardDataset(broken)
    rewrite(broken, lambda file: file.__delitem__("neighbors"))
    with pytest.raises(DataError, match="shard-0000-00000.h5: the manifest lists neighbour pairs"):
        ShardDataset(broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["conversion"]["neighbors"] = {"cutoff": "five"}
    (broken / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="'conversion.neighbors' needs a positive 'cutoff'"):
        ShardDataset(broken)


def test_a_cutoff_that_is_not_positive_is_refused(tmp_path, capsys):
    assert convert_cli(EXAMPLE_XYZ, "-o", tmp_path / "out", "--neighbors", 0) == 2
    assert "--neighbors must be a cutoff above 0 (angstrom), got 0.0" in capsys.readouterr().err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_the_banner_says_where_each_sets_pairs_come_from(awkward):
    from hpctrain.training_sets import pairs_in_words

    stored, plain = ShardDataset(awkward / "stored"), ShardDataset(awkward / "plain")
    assert pairs_in_words([stored], 5.0) == "read from the shards (stored within 5 A)"
    assert (
        pairs_in_words([stored.subset([0, 1])], 4.0) == "read from the shards (stored within 5 A)"
    )
    assert pairs_in_words([stored], 6.0) == (
        "searched: the shards' pairs stop at 5 A (hpctrain convert --neighbors 6 stores them)"
    )
    mixed = pairs_in_words([stored, plain], 5.0)
    assert mixed == (
        f"{stored.name}: read from the shards (stored within 5 A); {plain.name}: searched by "
        "the loader (hpctrain convert --neighbors 5 stores them)"
    )
    assert pairs_in_words([stored], None) is None  # a model without neighbour lists
