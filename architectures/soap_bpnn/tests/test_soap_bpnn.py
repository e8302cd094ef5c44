"""SOAP-BPNN: its own checks (atom order, invariances, elements absent from a batch,
precision, TorchScript), then the conformance suite every architecture passes."""

from pathlib import Path

import ase.io
import numpy as np
import pytest
import torch
from metatomic.torch import ModelOutput, System

from architectures.soap_bpnn import __model__ as SoapBpnn
from hpctrain.architecture import DatasetInfo, TargetInfo
from hpctrain.model import batched_pairs
from hpctrain.systems import NeighborLists
from hpctrain.testing import ArchitectureTests

ROOT = Path(__file__).resolve().parents[3]
ETHANOL = ROOT / "examples" / "rmd17_ethanol_100.xyz"
SMALL = {
    "soap": {"cutoff": {"radius": 4.0, "width": 0.5}, "max_angular": 3, "max_radial": 3},
    "bpnn": {"num_neurons_per_layer": 16},
}
ENERGY = {"energy": ModelOutput(unit="eV", sample_kind="system")}


def make_model(types=(1, 6, 8), hypers=SMALL, dtype=torch.float64):
    info = DatasetInfo(
        atomic_types=list(types), targets={"energy": TargetInfo(gradients=["positions"])}
    )
    torch.manual_seed(0)
    return SoapBpnn(hypers, info).to(dtype)


def systems_of(model, frames, dtype=torch.float64):
    systems = [
        System(
            types=torch.tensor(atoms.numbers, dtype=torch.int32),
            positions=torch.tensor(atoms.positions, dtype=dtype),
            cell=torch.tensor(atoms.cell.array, dtype=dtype),
            pbc=torch.tensor(atoms.pbc),
        )
        for atoms in frames
    ]
    NeighborLists(model.requested_neighbor_lists()).add(systems)
    return systems


def energies(model, frames, dtype=torch.float64):
    output = model(systems_of(model, frames, dtype), ENERGY, None)
    return output["energy"].block().values.reshape(-1).detach()


def test_forward_gives_one_energy_per_structure_and_atoms_in_order():
    model = make_model()
    frames = ase.io.read(ETHANOL, ":4")
    systems = systems_of(model, frames)
    both = {"energy": ModelOutput(unit="eV", sample_kind="atom")}
    per_atom = model(systems, both, None)["energy"].block()
    total = model(systems, ENERGY, None)["energy"].block().values.reshape(-1)
    assert total.shape == (4,) and torch.isfinite(total).all()
    assert per_atom.samples.values[:, 0].tolist() == [i for i in range(4) for _ in range(9)]
    assert per_atom.samples.values[:, 1].tolist() == list(range(9)) * 4
    torch.testing.assert_close(per_atom.values.reshape(4, 9).sum(1), total)
    # structures are independent of their batch: each alone gives the same energy
    alone = torch.cat([energies(model, [atoms]) for atoms in frames])
    torch.testing.assert_close(alone, total.detach())


def test_energy_is_invariant_under_rotation_and_permutation():
    model = make_model()
    frames = ase.io.read(ETHANOL, ":3")
    reference = energies(model, frames)
    rng = np.random.default_rng(0)
    changed = []
    for atoms in frames:
        atoms = atoms.copy()
        atoms.rotate(rng.uniform(0, 360), rng.normal(size=3), center="COM")
        changed.append(atoms[rng.permutation(len(atoms))])
    torch.testing.assert_close(energies(model, changed), reference, rtol=1e-10, atol=1e-10)
    # per-atom energies follow their atoms through the permutation
    atoms = frames[0]
    order = rng.permutation(len(atoms))
    per_atom = {"energy": ModelOutput(unit="eV", sample_kind="atom")}
    a = model(systems_of(model, [atoms]), per_atom, None)["energy"].block().values
    b = model(systems_of(model, [atoms[order]]), per_atom, None)["energy"].block().values
    torch.testing.assert_close(b, a[torch.tensor(order)])


def test_elements_absent_from_a_batch_still_take_part_in_the_graph():
    """DDP needs every parameter in the graph of every step, on every rank."""
    model = make_model(types=(1, 6, 8, 9))  # no fluorine in ethanol
    systems = systems_of(model, ase.io.read(ETHANOL, ":2"))
    model(systems, ENERGY, None)["energy"].block().values.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_float32_matches_float64():
    frames = ase.io.read(ETHANOL, ":2")
    double = energies(make_model(), frames)
    single = energies(make_model(dtype=torch.float32), frames, torch.float32)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single.double(), double, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_types", range(1, 9))
def test_the_product_layout_holds_every_featomic_feature_once(n_types):
    from architectures.soap_bpnn.model import product_layout

    n, n_l = 3, 4
    source, scale = product_layout(n_types, n, n_l)
    assert sorted(source) == list(range(n_types * (n_types + 1) // 2 * n_l * n * n))
    assert len(scale) == len(source)


@pytest.mark.parametrize("n_l", range(1, 11))
def test_the_angular_groups_cover_every_l_once_in_order(n_l):
    """One batched product per group, each l padded to its group's largest: fewer
    padded values of m than one product over every l, where that pays."""
    from architectures.soap_bpnn.model import angular_groups

    groups = angular_groups(n_l)
    assert [ell for group in groups for ell in group] == list(range(n_l))
    padded = sum(len(group) * (2 * group[-1] + 1) for group in groups)
    assert padded <= n_l * (2 * n_l - 1)
    if n_l == 7:  # max_angular 6, the default: 59 values of m instead of 91
        assert groups == [[0, 1], [2, 3], [4, 5, 6]] and padded == 59


def test_networks_apply_their_featomic_order_weights_to_features_in_product_order():
    """The weights (what checkpoints hold) are in featomic's feature order: the model's
    atomic outputs are those of plain layers on the features in that order."""
    model = make_model(types=(1, 6, 8, 9))  # four elements: windows and half-way pairs
    systems = systems_of(model, ase.io.read(ETHANOL, ":2"))
    types, centers, neighbors, vectors = batched_pairs(systems, model.neighbor_options)
    type_index = model.type_map[types.long()]
    counts = [int((type_index == i).sum()) for i in range(4)]
    outputs = model.atomic_outputs(type_index, centers, neighbors, vectors, counts)

    features, rank = model.power_spectrum(type_index, centers, neighbors, vectors)
    featomic_order = torch.empty_like(features).index_copy_(1, model.feature_source, features)
    expected = []
    for chunk, network in zip(torch.split(featomic_order, counts), model.networks):
        norm, first = network[0], network[1]
        x = torch.nn.functional.layer_norm(chunk, [chunk.shape[1]], norm.weight, norm.bias)
        x = torch.nn.functional.linear(x, first.weight, first.bias)
        for layer in list(network)[2:]:
            x = layer(x)
        expected.append(x)
    assert sum(counts[:3]) == len(features) and counts[3] == 0
    torch.testing.assert_close(outputs, torch.cat(expected)[rank])


def test_torchscript_and_export(tmp_path):
    model = make_model()
    frames = ase.io.read(ETHANOL, ":2")
    scripted = torch.jit.script(model)
    result = scripted(systems_of(model, frames), ENERGY, None)["energy"].block().values
    torch.testing.assert_close(result.reshape(-1).detach(), energies(model, frames))
    model.export().save(str(tmp_path / "model.pt"), collect_extensions=str(tmp_path / "ext"))
    assert (tmp_path / "model.pt").stat().st_size > 0
    # the power spectrum is plain torch: the exported model needs no featomic extension
    assert not any((tmp_path / "ext").rglob("*featomic*"))


ALLOY = ROOT / "architectures" / "soap_bpnn" / "tests" / "alloy.xyz"
ALLOY_HYPERS = {
    "soap": {
        "cutoff": {"radius": 4.5, "width": 1.0},
        "density_width": 0.5,
        "center_atom_weight": 0.5,
        "scaling": {"rate": 2.0, "scale": 1.5, "exponent": 5.0},
        "max_angular": 4,
        "max_radial": 5,
    }
}


@pytest.mark.parametrize(
    ("data", "frames", "hypers"),
    [
        (ETHANOL, ":3", SMALL),
        (ETHANOL, ":3", {}),
        (ALLOY, ":3", ALLOY_HYPERS),
        (ALLOY, ":1", ALLOY_HYPERS),
        (ALLOY, "2:3", SMALL),
        (ALLOY, ":1", {"soap": {**ALLOY_HYPERS["soap"], "scaling": None}}),
    ],
    ids=[
        "ethanol-small",
        "ethanol-defaults",
        "alloy-seven-elements",
        "alloy-four-elements",
        "alloy-four-other-elements",
        "alloy-no-radial-scaling",
    ],
)
def test_power_spectrum_and_its_gradients_equal_featomics(data, frames, hypers):
    """The torch power spectrum is featomic's SoapPowerSpectrum (same hypers; the
    features put in featomic's order after keys_to_properties by ``feature_source``),
    values and position/cell gradients, for odd and even numbers of elements."""
    import featomic.torch

    frames = ase.io.read(data, frames)
    types = sorted({int(z) for atoms in frames for z in atoms.numbers})
    model = make_model(types=types, hypers=hypers)
    calculator = featomic.torch.SoapPowerSpectrum(**model.config.soap.featomic())
    systems = [
        System(
            types=torch.tensor(atoms.numbers, dtype=torch.int32),
            positions=torch.tensor(atoms.positions, requires_grad=True),
            cell=torch.tensor(atoms.cell.array, requires_grad=True),
            pbc=torch.tensor(atoms.pbc),
        )
        for atoms in frames
    ]
    requests = calculator.requested_neighbor_lists() + model.requested_neighbor_lists()
    NeighborLists(requests).add(systems)

    types, first_atoms, second_atoms, vectors = batched_pairs(systems, model.neighbor_options)
    ours, rank = model.power_spectrum(
        model.type_map[types.long()], first_atoms, second_atoms, vectors
    )
    ours = torch.empty_like(ours).index_copy_(1, model.feature_source, ours[rank])
    reference = calculator(systems).keys_to_properties(model.neighbor_pairs.to("cpu"))
    first = torch.cumsum(torch.tensor([0] + [len(a) for a in frames]), 0)
    expected = torch.zeros_like(ours)
    for block in reference.blocks():
        samples = block.samples.values.long()
        expected[first[samples[:, 0]] + samples[:, 1]] = block.values
    assert ours.shape == expected.shape and expected.abs().max() > 0.1
    torch.testing.assert_close(ours, expected, rtol=1e-7, atol=1e-7 * float(expected.abs().max()))

    weights = torch.randn(ours.shape[1], dtype=torch.float64)
    leaves = [s.positions for s in systems] + [s.cell for s in systems]
    mine = torch.autograd.grad((ours @ weights).square().sum(), leaves)
    theirs = torch.autograd.grad((expected @ weights).square().sum(), leaves)
    # featomic differentiates its own spline (accuracy 1e-8 on the values): the
    # derivatives agree to a few 1e-6
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


# -- real training through the CLI, then the exported model in a fresh process --------

OPTIONS = """
seed: 7
base_precision: 64
architecture:
  name: soap_bpnn
  model:
    soap: {{cutoff: {{radius: 4.0, width: 0.5}}, max_angular: 3, max_radial: 3}}
    bpnn: {{num_neurons_per_layer: 16}}
  training: {{num_epochs: 2, batch_size: {batch}, learning_rate: 0.01}}
training_set:
  systems: {data}
  targets:
    energy: {{unit: eV, forces: true, stress: {stress}}}
validation_set: 0.2
test_set: 0.0
"""


@pytest.mark.slow
class TestSoapBpnn(ArchitectureTests):
    """The conformance suite: training, checkpoints, restart, export in a fresh process
    (energies, forces, stress, finite differences), NVE energy conservation."""

    architecture = "soap_bpnn"
    model_hypers = SMALL
    training_hypers = {"num_epochs": 3, "batch_size": 4, "learning_rate": 0.01}
