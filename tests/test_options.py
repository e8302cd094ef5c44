"""Options files: defaults, resolution, and one clear message per kind of mistake."""

import pytest
import yaml

from hpctrain.errors import HpctrainError
from hpctrain.options import load_options, write_resolved
from hpctrain.startup import prepare

GOOD = """
architecture:
  name: mp_transformer
training_set:
  systems: ethanol.xyz
"""


def test_defaults_and_shorthands(write_yaml):
    path = write_yaml(
        """
        architecture: mp_transformer
        training_set: ethanol.xyz
        """
    )
    options, architecture, dtype, device = prepare(path)
    dataset = options.training_set[0]
    assert dataset.systems.read_from == str((path.parent / "ethanol.xyz").resolve())
    assert list(dataset.targets) == ["energy"]
    assert dataset.targets["energy"].forces is True
    assert options.validation_set == 0.1 and options.test_set == 0.0
    # architecture defaults merged under the (empty) user hypers
    assert architecture.model_hypers["cutoff"] == 5.0
    assert architecture.training_hypers["num_epochs"] == 100
    assert device == "cpu" or device == "cuda"
    assert str(dtype) == "torch.float32"


def test_user_values_win_over_defaults(write_yaml):
    path = write_yaml(
        GOOD
        + """
architecture:
  name: mp_transformer
  model: {cutoff: 4.0}
  training: {num_epochs: 3}
base_precision: 64
"""
    )
    options, architecture, dtype, _ = prepare(path)
    assert architecture.model_hypers["cutoff"] == 4.0
    assert architecture.model_hypers["d_model"] == 64
    assert architecture.training_hypers["num_epochs"] == 3
    assert str(dtype) == "torch.float64"


def test_resolved_options_load_again(write_yaml, tmp_path):
    options, *_ = prepare(write_yaml(GOOD + "seed: 7\n"))
    out = tmp_path / "resolved.yaml"
    write_resolved(options, out)
    data = yaml.safe_load(out.read_text())
    assert data["seed"] == 7
    assert data["architecture"]["model"]["cutoff"] == 5.0
    assert data["training_set"][0]["targets"]["energy"]["unit"] == "eV"
    again = load_options(out)
    assert again.training_set[0].systems.read_from == options.training_set[0].systems.read_from


GOOD_FINETUNE = """
architecture:
  name: mp_transformer
  training: {{finetune: {}}}
training_set: ethanol.xyz
"""

MALFORMED = {
    "not yaml": ("architecture: [mp_transformer\n", "is not valid YAML"),
    "not a mapping": ("- architecture\n- training_set\n", "must hold a mapping"),
    "top-level typo": (GOOD + "sed: 3\n", "unknown key 'sed'", "did you mean 'seed'?"),
    "misspelt required key": (
        "architecture: mp_transformer\ntrainig_set: ethanol.xyz\n",
        "unknown key 'trainig_set'",
        "did you mean 'training_set'?",
    ),
    "no architecture": ("training_set: ethanol.xyz\n", "missing required key 'architecture'"),
    "no training set": ("architecture: mp_transformer\n", "missing required key 'training_set'"),
    "unknown architecture": (
        "architecture: mp_transfomer\ntraining_set: ethanol.xyz\n",
        "unknown architecture 'mp_transfomer'",
        "did you mean 'mp_transformer'?",
    ),
    "seed not an integer": (GOOD + "seed: abc\n", "'seed'", "must be integer"),
    "bad precision": (GOOD + "base_precision: 8\n", "'base_precision'", "one of 16, 32, 64"),
    "bad device": (GOOD + "device: gpu\n", "'device'", "'auto', 'cpu', 'cuda'"),
    "hyper typo": (
        "architecture: {name: mp_transformer, training: {num_epoch: 3}}\n"
        "training_set: ethanol.xyz\n",
        "unknown key 'architecture.training.num_epoch'",
        "did you mean 'num_epochs'?",
    ),
    "hyper wrong type": (
        "architecture: {name: mp_transformer, model: {cutoff: five}}\ntraining_set: ethanol.xyz\n",
        "'architecture.model.cutoff'",
        "must be number",
    ),
    "hyper inconsistent": (
        "architecture: {name: mp_transformer, model: {d_model: 30, num_heads: 4}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.model.num_heads' (4) must divide",
    ),
    "density scale zero": (
        "architecture: {name: mp_transformer, model: {density_scale: 0}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.model.density_scale' must be positive, got 0",
        "the default is 0.3",
    ),
    "batch size zero": (
        "architecture: {name: mp_transformer, training: {batch_size: 0}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.training.batch_size'",
        "at least 1",
    ),
    "negative loader threads": (
        "architecture: {name: mp_transformer, training: {num_workers: -1}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.training.num_workers'",
        "must not be negative",
    ),
    "sampling weight zero": (
        "architecture: mp_transformer\n"
        "training_set: [{systems: ethanol.xyz, sampling_weight: 0}]\n",
        "'training_set[0].sampling_weight'",
        "positive number",
    ),
    "sampling weight on some sets only": (
        "architecture: mp_transformer\n"
        "training_set: [{systems: ethanol.xyz, sampling_weight: 2}, ethanol.xyz]\n",
        "'training_set[1]'",
        "give every training set a sampling_weight",
    ),
    "sampling weight on a validation set": (
        GOOD + "validation_set: {systems: ethanol.xyz, sampling_weight: 1}\n",
        "'validation_set[0].sampling_weight'",
        "only training sets are sampled",
    ),
    "negative loss weight": (
        "architecture: mp_transformer\ntraining_set: [{systems: ethanol.xyz, loss_weight: -1}]\n",
        "'training_set[0].loss_weight'",
        "0 or more",
    ),
    "loss weight on a test set": (
        GOOD + "test_set: [{systems: ethanol.xyz, loss_weight: 2}]\n",
        "'test_set[0].loss_weight'",
        "only training sets",
    ),
    "atom budget zero": (
        "architecture: {name: mp_transformer, training: {max_atoms_per_batch: 0}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.training.max_atoms_per_batch'",
        "at least 1",
    ),
    "early stopping patience zero": (
        "architecture: {name: mp_transformer, training: {early_stopping: {patience: 0}}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.training.early_stopping.patience'",
        "at least 1",
    ),
    "early stopping negative min_delta": (
        "architecture:\n  name: mp_transformer\n"
        "  training: {early_stopping: {patience: 3, min_delta: -0.1}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.training.early_stopping.min_delta'",
        "0 or more",
    ),
    "early stopping typo": (
        "architecture: {name: mp_transformer, training: {early_stopping: {patients: 3}}}\n"
        "training_set: ethanol.xyz\n",
        "unknown key 'architecture.training.early_stopping.patients'",
        "did you mean 'patience'?",
    ),
    "early stopping not a section": (
        "architecture: {name: mp_transformer, training: {early_stopping: 5}}\n"
        "training_set: ethanol.xyz\n",
        "'architecture.training.early_stopping'",
        "mapping",
    ),
    "finetune unknown method": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, method: partial}"),
        "'architecture.training.finetune.method'",
        "full",
    ),
    "finetune lora rank zero": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, method: lora, lora: {rank: 0}}"),
        "'architecture.training.finetune.lora.rank'",
        "at least 1",
    ),
    "finetune lora alpha zero": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, method: lora, lora: {alpha: 0}}"),
        "'architecture.training.finetune.lora.alpha'",
        "positive",
    ),
    "finetune without read_from": (
        GOOD_FINETUNE.format("{method: heads}"),
        "'architecture.training.finetune.read_from'",
    ),
    "finetune missing checkpoint": (
        GOOD_FINETUNE.format("{read_from: pretrained/model.ckpt}"),
        "'architecture.training.finetune.read_from'",
        "does not exist",
    ),
    "finetune not a checkpoint": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz}"),
        "'architecture.training.finetune.read_from'",
        "is not a readable checkpoint",
    ),
    "finetune freeze not a list": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, freeze: layers.0}"),
        "'architecture.training.finetune.freeze'",
    ),
    "finetune inherit_heads not a mapping": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, inherit_heads: [energy]}"),
        "'architecture.training.finetune.inherit_heads'",
    ),
    "finetune typo": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, methd: lora}"),
        "unknown key 'architecture.training.finetune.methd'",
        "did you mean 'method'?",
    ),
    "finetune composition": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, composition: fit}"),
        "'architecture.training.finetune.composition'",
        "refit",
    ),
    "finetune replay fraction": (
        GOOD_FINETUNE.format(
            "{read_from: ethanol.xyz, replay: {training_set: ethanol.xyz, fraction: 1.5}}"
        ),
        "'architecture.training.finetune.replay.fraction'",
        "between 0 and 1",
    ),
    "finetune replay missing data": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, replay: {training_set: old.xyz}}"),
        "'architecture.training.finetune.replay.training_set.systems.read_from'",
        "does not exist",
    ),
    "finetune replay without data": (
        GOOD_FINETUNE.format("{read_from: ethanol.xyz, replay: {fraction: 0.1}}"),
        "'architecture.training.finetune.replay.training_set'",
    ),
    "missing data file": (
        "architecture: mp_transformer\ntraining_set: missing.xyz\n",
        "'training_set.systems.read_from'",
        "missing.xyz' does not exist",
    ),
    "target typo": (
        "architecture: mp_transformer\ntraining_set:\n  systems: ethanol.xyz\n"
        "  targets: {energy: {froces: false}}\n",
        "unknown key 'training_set.targets.energy.froces'",
        "did you mean 'forces'?",
    ),
    "empty targets": (
        "architecture: mp_transformer\ntraining_set: {systems: ethanol.xyz, targets: {}}\n",
        "'training_set.targets'",
        "is empty",
    ),
    "stress and virial": (
        "architecture: mp_transformer\ntraining_set:\n  systems: ethanol.xyz\n"
        "  targets: {energy: {stress: true, virial: true}}\n",
        "sets both 'stress' and 'virial'",
    ),
    "fraction out of range": (GOOD + "validation_set: 1.5\n", "'validation_set'", "[0, 1)"),
    "fractions leave nothing": (
        GOOD + "validation_set: 0.6\ntest_set: 0.5\n",
        "add up to 1.1",
    ),
    "empty dataset list": (
        "architecture: mp_transformer\ntraining_set: []\n",
        "'training_set' in",
        "empty list",
    ),
    "distributed typo": (
        GOOD + "distributed: {timeout: 10}\n",
        "unknown key 'distributed.timeout'",
        "did you mean 'timeout_s'?",
    ),
    "timeout wrong type": (
        GOOD + "distributed: {timeout_s: long}\n",
        "'distributed.timeout_s'",
        "number",
    ),
    "dataset entry typo": (
        "architecture: mp_transformer\ntraining_set: {sytems: ethanol.xyz}\n",
        "unknown key 'training_set.sytems'",
        "did you mean 'systems'?",
    ),
    "target name not an output name": (
        "architecture: mp_transformer\ntraining_set:\n  systems: ethanol.xyz\n"
        "  targets: {formation: {key: energy}}\n",
        "target name 'formation' at 'training_set.targets'",
        "'energy/formation'",
    ),
    "checkpoint wrong type": (
        GOOD + "checkpoint: {keep_last: [1]}\n",
        "'checkpoint.keep_last'",
        "must be integer",
    ),
    "wandb not a mapping": (
        GOOD + "logging: {wandb: true}\n",
        "'logging.wandb' in",
        "must be a mapping",
    ),
    "wandb without project": (
        GOOD + "logging: {wandb: {mode: offline}}\n",
        "missing required key 'logging.wandb.project'",
    ),
    "wandb empty project": (
        GOOD + "logging: {wandb: {project: ' '}}\n",
        "'logging.wandb.project' in",
        "must not be empty",
    ),
    "wandb project not a string": (
        GOOD + "logging: {wandb: {project: 3}}\n",
        "'logging.wandb.project' in",
        "must be string",
    ),
    "wandb unknown mode": (
        GOOD + "logging: {wandb: {project: p, mode: cloud}}\n",
        "'logging.wandb.mode' in",
        "'online', 'offline', 'disabled'",
    ),
    "wandb tags not a list": (
        GOOD + "logging: {wandb: {project: p, tags: nice}}\n",
        "'logging.wandb.tags' in",
        "must be list of string",
    ),
    "wandb tag not a string": (
        GOOD + "logging: {wandb: {project: p, tags: [ok, 1]}}\n",
        "'logging.wandb.tags[1]' in",
        "must be string",
    ),
    "wandb tag too long": (
        GOOD + f"logging: {{wandb: {{project: p, tags: [{'t' * 65}]}}}}\n",
        "'logging.wandb.tags[0]' in",
        "1 to 64 characters",
    ),
    "wandb key typo": (
        GOOD + "logging: {wandb: {project: p, entitty: me}}\n",
        "unknown key 'logging.wandb.entitty'",
        "did you mean 'entity'?",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_options(case, write_yaml):
    text, *expected = MALFORMED[case]
    path = write_yaml(text)
    with pytest.raises(HpctrainError) as error:
        prepare(path)
    message = str(error.value)
    for fragment in expected:
        assert fragment in message, message
    # every message about a file names the file
    if "architecture '" not in message:
        assert "options.yaml" in message, message


def test_missing_options_file(tmp_path):
    with pytest.raises(HpctrainError, match="nothing.yaml' does not exist"):
        prepare(tmp_path / "nothing.yaml")


def test_validation_and_test_sets_without_targets_inherit_the_training_targets(write_yaml):
    path = write_yaml(
        """
        architecture: mp_transformer
        training_set:
          systems: ethanol.xyz
          targets:
            energy: {key: E_dft, unit: kcal/mol, forces: {key: F_dft}, stress: true}
        validation_set: ethanol.xyz
        test_set:
          - {systems: ethanol.xyz}
          - {systems: ethanol.xyz, targets: {energy: {key: energy}}}
        """
    )
    options = load_options(path)
    trained = options.training_set[0].targets
    assert options.validation_set[0].targets == trained
    assert options.test_set[0].targets == trained
    assert options.test_set[0].targets is not trained  # a copy
    assert options.test_set[1].targets["energy"].key == "energy"  # given: kept
    assert options.test_set[1].targets["energy"].unit == "eV"


def test_wandb_is_off_unless_given_and_its_defaults_fill_the_rest(write_yaml):
    assert load_options(write_yaml(GOOD)).logging.wandb is None
    assert load_options(write_yaml(GOOD + "logging: {wandb: null}\n")).logging.wandb is None
    path = write_yaml(GOOD + "logging: {wandb: {project: mlip, tags: [ethanol]}}\n")
    wandb = load_options(path).logging.wandb
    assert (wandb.project, wandb.entity, wandb.name) == ("mlip", None, None)
    assert (wandb.tags, wandb.mode) == (["ethanol"], "online")
