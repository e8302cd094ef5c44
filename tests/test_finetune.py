"""Fine-tuning (``architecture.training.finetune``): a run starts from another run's
model and trains all of it, its heads, or LoRA adapters merged at export; what does not
train stays bit for bit as pretrained, and a stopped fine-tuning resumes bit for bit."""

import re
import signal

import ase.io
import numpy as np
import pytest
import torch
from conftest import (
    EXAMPLE_XYZ,
    hpctrain,
    paused_env,
    start,
    tiny_options,
    wait_until_paused,
    write_options,
)

from architectures.mp_transformer import __model__ as MpTransformer
from architectures.soap_bpnn import __model__ as SoapBpnn
from hpctrain import finetune
from hpctrain.architecture import DatasetInfo, TargetInfo
from hpctrain.errors import CheckpointError, OptionsError
from hpctrain.finetune import FinetuneOptions, LoraOptions
from hpctrain.testing import emt_structures, evaluate_exported, predict_in_memory

ETHANOL = [1, 6, 8]


def info(*targets, types=ETHANOL):
    return DatasetInfo(
        length_unit="angstrom",
        atomic_types=list(types),
        targets={name: TargetInfo(quantity="energy", unit="eV") for name in targets},
    )


def energies(model, frames, target="energy"):
    from metatomic.torch import ModelOutput, System

    from hpctrain.systems import NeighborLists

    neighbors = NeighborLists(model.requested_neighbor_lists())
    systems = []
    for atoms in frames:
        systems.append(
            System(
                types=torch.tensor(atoms.numbers, dtype=torch.int32),
                positions=torch.tensor(atoms.positions, dtype=torch.float64),
                cell=torch.zeros(3, 3, dtype=torch.float64),
                pbc=torch.zeros(3, dtype=torch.bool),
            )
        )
    neighbors.add(systems)
    output = model(systems, {target: ModelOutput(unit="eV", sample_kind="system")}, None)
    return output[target].block().values.detach().squeeze(1)


def adapter_count(model, rank):
    heads = tuple(model.head_modules())
    return sum(
        rank * (m.in_features + m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not name.startswith(heads)
    )


def test_lora_trains_under_five_percent_of_a_foundation_size_model():
    """At a width of 256 (a foundation model's), rank-4 adapters on every linear layer
    of the body are under 5 % of the weights; each adapter has rank * (in + out)."""
    torch.manual_seed(0)
    model = MpTransformer({"d_model": 256, "num_heads": 8, "num_layers": 3}, info("energy"))
    total = sum(p.numel() for p in model.parameters())
    finetune.add_adapters(model, LoraOptions(rank=4))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == adapter_count(model, 4)
    assert trainable < 0.05 * total
    # the heads and every other weight are frozen: only adapters train
    for name, parameter in model.named_parameters():
        assert parameter.requires_grad == name.endswith(finetune.ADAPTERS), name
    # soap_bpnn: the adapters go on the hidden layers of each element's network
    soap = SoapBpnn({}, info("energy"))
    finetune.add_adapters(soap, LoraOptions(rank=2))
    trainable = sum(p.numel() for p in soap.parameters() if p.requires_grad)
    assert trainable == adapter_count(soap, 2) and trainable > 0


def test_adapters_start_at_the_pretrained_model_and_merge_into_a_plain_model():
    torch.manual_seed(0)
    frames = ase.io.read(EXAMPLE_XYZ, ":4")
    pretrained = MpTransformer({"d_model": 16, "num_heads": 2}, info("energy")).double()
    adapted = MpTransformer({"d_model": 16, "num_heads": 2}, info("energy")).double()
    adapted.load_state_dict(pretrained.state_dict())
    finetune.add_adapters(adapted, LoraOptions(rank=2, alpha=3.0))
    # B = 0: the adapted model is the pretrained one until it trains
    assert torch.equal(energies(adapted, frames), energies(pretrained, frames))
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if name.endswith(".lora_b"):
                parameter.normal_()
    changed = energies(adapted, frames)
    assert not torch.allclose(changed, energies(pretrained, frames))
    # the plain state (what checkpoints hold as the model) predicts the same
    plain = MpTransformer({"d_model": 16, "num_heads": 2}, info("energy")).double()
    plain.load_state_dict(finetune.plain_state(adapted))
    assert torch.equal(energies(plain, frames), changed)
    # and so does the adapted model once its adapters are merged
    finetune.finish(adapted, engine=None)
    assert not finetune.has_adapters(adapted)
    assert set(adapted.state_dict()) == set(plain.state_dict())
    assert torch.equal(energies(adapted, frames), changed)


def test_an_inherited_head_predicts_what_its_source_predicts(tmp_path):
    torch.manual_seed(0)
    frames = ase.io.read(EXAMPLE_XYZ, ":3")
    pretrained = MpTransformer({"d_model": 16, "num_heads": 2}, info("energy")).double()
    pretrained.set_baseline("energy", torch.tensor([-13.6, -1029.0, -2041.0]), 0.7)
    pretrained.save_checkpoint(tmp_path / "pre.ckpt")
    options = FinetuneOptions(
        read_from=str(tmp_path / "pre.ckpt"), inherit_heads={"energy/r2scan": "energy"}
    )
    model = finetune.pretrained_model(
        MpTransformer, options, info("energy", "energy/r2scan")
    ).double()
    assert model.target_names == ["energy", "energy/r2scan"]
    expected = energies(pretrained, frames)
    assert torch.equal(energies(model, frames, "energy/r2scan"), expected)
    assert torch.equal(energies(model, frames, "energy"), expected)
    assert finetune.pretrained_targets(options) == {"energy", "energy/r2scan"}


def test_what_does_not_fit_the_pretrained_model_is_named(tmp_path):
    MpTransformer({"d_model": 16, "num_heads": 2}, info("energy")).save_checkpoint(
        tmp_path / "pre.ckpt"
    )
    path = str(tmp_path / "pre.ckpt")

    def build(model_class=MpTransformer, data=None, **options):
        options = FinetuneOptions(read_from=path, **options)
        return finetune.pretrained_model(model_class, options, data or info("energy"))

    with pytest.raises(
        CheckpointError, match=r"knows the elements H, C, O, the training set also has Cu"
    ):
        build(data=info("energy", types=[1, 6, 8, 29]))
    with pytest.raises(
        CheckpointError, match="written by architecture 'mp_transformer', not 'soap_bpnn'"
    ):
        build(SoapBpnn)
    with pytest.raises(
        OptionsError,
        match=r"inherit_heads.energy/pbe': the pretrained model .* has no target 'forces'",
    ):
        build(data=info("energy", "energy/pbe"), inherit_heads={"energy/pbe": "forces"})
    with pytest.raises(OptionsError, match="the training set has no target 'energy/pbe'"):
        build(inherit_heads={"energy/pbe": "energy"})
    with pytest.raises(OptionsError, match="has a head for 'energy' already"):
        build(inherit_heads={"energy": "energy"})
    with pytest.raises(OptionsError, match=r"new target 'energy/pbe' would keep an untrained head"):
        build(data=info("energy", "energy/pbe"), method="lora")
    inherited = build(
        data=info("energy", "energy/pbe"), method="lora", inherit_heads={"energy/pbe": "energy"}
    )
    assert inherited.target_names == ["energy", "energy/pbe"]
    model = MpTransformer({"d_model": 16, "num_heads": 2}, info("energy"))
    with pytest.raises(
        OptionsError,
        match=r"'layerz' matches no parameter of the model; its modules are embedding, .*layers.0",
    ):
        finetune.freeze(model, ["layerz"])
    heads = ["readout", "layer_readouts"]
    everything = FinetuneOptions(read_from=path, method="heads", freeze=heads)
    with pytest.raises(OptionsError, match="leaves no parameter to train"):
        finetune.prepare(model, everything, None)


# -- real runs --------------------------------------------------------------------------

PRETRAIN = tiny_options(base_precision=64, architecture={"training": {"num_epochs": 2}})


def finetuning(method, **changes):
    section = {"read_from": "pre/model.ckpt", "method": method, **changes}
    options = tiny_options(
        seed=5,
        base_precision=64,
        architecture={"training": {"num_epochs": 2, "learning_rate": 0.01, "finetune": section}},
        training_set={"systems": "small.xyz", "targets": {"energy": {"forces": True}}},
        checkpoint={"every_n_steps": 2},
    )
    del options["architecture"]["model"]  # (the pretrained model's)
    return options


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A run on the first 70 structures; fine-tuning on 30 others."""
    root = tmp_path_factory.mktemp("pretrained")
    frames = ase.io.read(EXAMPLE_XYZ, ":")
    ase.io.write(root / "ethanol.xyz", frames[:70])
    ase.io.write(root / "small.xyz", frames[70:])
    write_options(root, PRETRAIN)
    result = hpctrain("train", "options.yaml", "-o", "pre", cwd=root)
    assert result.returncode == 0, result.stderr
    return root


def state(run_dir, name="model.ckpt"):
    return torch.load(run_dir / name, weights_only=False)["model_state"]


def run(root, name, options, *args, launcher=None):
    write_options(root, options, f"{name}.yaml")
    result = hpctrain("train", f"{name}.yaml", "-o", name, *args, cwd=root, launcher=launcher)
    assert result.returncode == 0, result.stderr
    return result


@pytest.mark.slow
def test_lora_changes_the_body_by_low_rank_updates_and_exports_the_merged_model(
    pretrained, tmp_path
):
    result = run(pretrained, "lora", finetuning("lora", lora={"rank": 2}))
    assert "method lora, rank 2): " in result.stdout
    assert "composition baseline of 'energy': the pretrained model's" in result.stdout
    assert "per atom away from the one fitted" not in result.stdout  # (the same reference)
    before, after = state(pretrained / "pre"), state(pretrained / "lora")
    assert set(after) == set(before)  # a plain model: no adapters in the model's state
    adapted = 0
    for key, old in before.items():
        new = after[key]
        linear = key.endswith(".weight") and new.dim() == 2 and not key.startswith("readout")
        if linear and key != "embedding.weight":
            delta = new - old
            assert 0 < torch.linalg.matrix_rank(delta) <= 2, key
            adapted += 1
        else:  # heads, norms, embedding, biases, baseline: as pretrained
            assert torch.equal(new, old), key
    assert adapted == 8  # the six linear layers of the attention layer, two of its feed-forward
    # the exported model is the merged one: same predictions in a fresh process
    sample = tmp_path / "sample.xyz"
    ase.io.write(sample, ase.io.read(pretrained / "small.xyz", "::10"))
    merged = MpTransformer.load_checkpoint(pretrained / "lora" / "model.ckpt")
    expected = predict_in_memory(merged, sample)
    exported = evaluate_exported(
        pretrained / "lora" / "model.pt", sample, pretrained / "lora" / "extensions"
    )
    for mine, theirs in zip(expected, exported, strict=True):
        assert theirs["energy"] == pytest.approx(mine["energy"], rel=1e-12, abs=1e-9)
        np.testing.assert_allclose(theirs["forces"], mine["forces"], rtol=1e-9, atol=1e-9)
    pretrained_model = MpTransformer.load_checkpoint(pretrained / "pre" / "model.ckpt")
    assert predict_in_memory(pretrained_model, sample)[0]["energy"] != expected[0]["energy"]


@pytest.mark.slow
def test_heads_replay_and_freeze_train_only_what_they_say(pretrained):
    # with a quarter of each epoch replayed from the pretraining data (70 structures)
    replay = {"training_set": "ethanol.xyz", "fraction": 0.25}
    heads = run(pretrained, "heads", finetuning("heads", replay=replay))
    assert "method heads): " in heads.stdout
    assert "small.xyz: 27 from 27 (75.0 %), " in heads.stdout
    assert "ethanol.xyz: 9 from 70 (25.0 %)" in heads.stdout
    before, after = state(pretrained / "pre"), state(pretrained / "heads")
    for key, old in before.items():
        if key.startswith("readout."):
            assert not torch.equal(after[key], old), key
        else:
            assert torch.equal(after[key], old), key
    # full, with the embedding and the first layer's attention frozen
    frozen = ["embedding", "layers.0.query", "layers.*.key"]
    run(pretrained, "full", finetuning("full", freeze=frozen, composition="refit"))
    after = state(pretrained / "full")
    parameters = dict(
        MpTransformer.load_checkpoint(pretrained / "pre" / "model.ckpt").named_parameters()
    )
    for key in parameters:
        same = key.startswith(("embedding.", "layers.0.query.", "layers.0.key."))
        assert torch.equal(after[key], before[key]) == same, key
    # refit: the composition baseline anew, the network's output scale as pretrained
    assert not torch.equal(after["composition"], before["composition"])
    assert torch.equal(after["scale"], before["scale"])


@pytest.mark.slow
def test_a_stopped_lora_finetuning_resumes_bitwise(pretrained):
    options = finetuning("lora", lora={"rank": 2})
    run(pretrained, "straight", options)
    pauses = pretrained / "pauses"
    proc = start("straight.yaml", "-o", "stopped", cwd=pretrained, env=paused_env(pauses, 3))
    wait_until_paused(pauses, 3, proc=proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err
    # the step checkpoint holds the plain model and the adapters
    saved = torch.load(
        sorted((pretrained / "stopped" / "checkpoints").glob("step-*"))[-1] / "replicated.pt",
        weights_only=False,
    )
    assert not any(".parametrizations." in k for k in saved["model_state"])
    assert any(k.endswith(".lora_a") for k in saved["trainer_state"]["adapters"])
    resumed = hpctrain("straight.yaml", "-o", "stopped", "--continue", "auto", cwd=pretrained)
    assert resumed.returncode == 0, resumed.stderr
    expected, got = state(pretrained / "straight"), state(pretrained / "stopped")
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_a_new_element_in_the_finetuning_data_is_refused_before_training(pretrained):
    ase.io.write(pretrained / "metal.xyz", emt_structures(True, 8, seed=1))
    options = finetuning("full")
    options["training_set"]["systems"] = "metal.xyz"
    write_options(pretrained, options, "metal.yaml")
    result = hpctrain("train", "metal.yaml", "-o", "metal", cwd=pretrained)
    assert result.returncode != 0
    message = "the pretrained model knows the elements H, C, O, the training set also has Cu, Au"
    assert message in result.stderr
    assert not (pretrained / "metal" / "checkpoints").exists()


@pytest.mark.slow
def test_lora_finetuning_on_two_ranks_trains_the_single_process_model(pretrained):
    options = finetuning("lora", lora={"rank": 2})
    run(pretrained, "one", options)
    two = run(pretrained, "two", options, launcher="mpiexec")
    assert "2 ranks via mpi" in two.stdout
    single, ranks = state(pretrained / "one"), state(pretrained / "two")
    for key, value in single.items():
        torch.testing.assert_close(ranks[key], value, rtol=1e-7, atol=1e-10)
    assert not torch.equal(
        single["layers.0.query.weight"], state(pretrained / "pre")["layers.0.query.weight"]
    )


@pytest.mark.slow
def test_a_kept_baseline_of_another_reference_energy_is_warned_about(pretrained):
    frames = ase.io.read(pretrained / "small.xyz", ":")
    for atoms in frames:  # another code's reference: 2 eV per atom lower
        atoms.calc.results["energy"] -= 2.0 * len(atoms)
    ase.io.write(pretrained / "shifted.xyz", frames)
    options = finetuning("full")
    options["training_set"]["systems"] = "shifted.xyz"
    options["architecture"]["training"]["num_epochs"] = 1
    result = run(pretrained, "shifted", options)
    # (2 eV and the small difference between the pretraining and fine-tuning fits)
    found = re.search(r"baseline of 'energy' is (\S+) eV per atom away", result.stdout)
    assert found and float(found.group(1)) == pytest.approx(2.0, abs=0.05)
    assert "Set 'architecture.training.finetune.composition: refit'" in result.stdout


@pytest.mark.slow
def test_a_new_variant_inherits_a_head_and_the_old_target_is_kept(pretrained):
    """Fine-tuning data labelled only with a new level of theory: its head and
    baseline start as the old target's; the old target, which no structure labels
    now, stays in the model with its own output row and baseline untouched."""
    options = finetuning("heads", inherit_heads={"energy/r2scan": "energy"})
    options["training_set"]["targets"] = {"energy/r2scan": {"key": "energy"}}
    options["architecture"]["training"]["num_epochs"] = 1
    result = run(pretrained, "variant", options)
    assert "composition baseline of 'energy/r2scan': the pretrained model's" in result.stdout
    before, after = state(pretrained / "pre"), state(pretrained / "variant")
    assert torch.equal(after["composition"][1], before["composition"][0])
    assert torch.equal(after["composition"][0], before["composition"][0])
    head = "readout.3.weight"
    assert torch.equal(after[head][0], before[head][0])  # the old head: not trained
    assert not torch.equal(after[head][1], before[head][0])  # the new one trained
    model = MpTransformer.load_checkpoint(pretrained / "variant" / "model.ckpt")
    assert model.target_names == ["energy", "energy/r2scan"]
