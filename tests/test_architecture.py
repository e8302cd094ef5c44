"""The architecture API: finding an architecture, checking it, merging its hypers,
choosing dtype and device, and the dataset description handed to models."""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
import textwrap
import types

import pytest
import torch

import architectures.mp_transformer as mp_transformer
from hpctrain.architecture import (
    Architecture,
    DatasetInfo,
    TargetInfo,
    choose_device_type,
    choose_dtype,
    import_architecture,
    resolve,
    validate_architecture,
)
from hpctrain.errors import ArchitectureError, HpctrainError, OptionsError

# -- helpers ------------------------------------------------------------------------------


class GoodModel:
    """The least that passes validation: the model API, nothing behind it."""

    __supported_devices__ = ["cuda", "cpu"]
    __supported_dtypes__ = [torch.float64, torch.float32]

    def __init__(self, hypers, dataset_info):
        pass

    @classmethod
    def load_checkpoint(cls, path):
        raise NotImplementedError

    def restart(self, dataset_info):
        return self

    def export(self):
        raise NotImplementedError


class GoodTrainer:
    def __init__(self, train_hypers):
        pass

    def train(self, model, devices, train_datasets, val_datasets, checkpoint_dir):
        pass

    def save_checkpoint(self, path):
        pass

    @classmethod
    def load_checkpoint(cls, path, train_hypers):
        return cls(train_hypers)


AUTHORS = [("Jane Doe <jane@example.org>", "@jane")]

_DELETE = object()


def fake_architecture(name: str = "fake_arch", **attributes) -> types.ModuleType:
    """A module with the four constants; ``attribute=_DELETE`` leaves one out."""
    module = types.ModuleType(name)
    values = {
        "__model__": GoodModel,
        "__trainer__": GoodTrainer,
        "__authors__": AUTHORS,
        "__maintainers__": AUTHORS,
    }
    values.update(attributes)
    for key, value in values.items():
        if value is not _DELETE:
            setattr(module, key, value)
    return module


def subclass(base: type, name: str, drop: tuple[str, ...] = (), **attributes) -> type:
    """``base`` with ``attributes`` set and the methods in ``drop`` hidden."""
    namespace = dict(attributes)
    for method in drop:
        namespace[method] = None  # not callable: absent for the checks
    return type(name, (base,), namespace)


@pytest.fixture
def clean_modules():
    """Forget, after the test, the modules it imported from tmp_path."""
    before = set(sys.modules)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("thirdparty_"):
            del sys.modules[name]
    importlib.invalidate_caches()


def write_package(root, dotted: str, init: str) -> None:
    """Packages for every part of ``dotted`` under ``root``; ``init`` is the last's."""
    directory = root
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        directory = directory / part
        directory.mkdir(exist_ok=True)
        text = textwrap.dedent(init) if i == len(parts) - 1 else ""
        (directory / "__init__.py").write_text(text)
    importlib.invalidate_caches()


REEXPORT = """
    from architectures.mp_transformer import (
        __authors__,
        __maintainers__,
        __model__,
        __trainer__,
    )
"""


# -- import_architecture / resolve --------------------------------------------------------


def test_builtin_architecture_is_found():
    module = import_architecture("mp_transformer")
    assert module is mp_transformer
    assert module.__name__ == "architectures.mp_transformer"
    validate_architecture(module)


def test_builtin_architecture_by_its_module_path():
    assert import_architecture("architectures.mp_transformer") is mp_transformer


def test_third_party_dotted_module_path(tmp_path, monkeypatch, clean_modules):
    write_package(tmp_path, "thirdparty_pkg_a.myarch", REEXPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = import_architecture("thirdparty_pkg_a.myarch")
    assert module.__name__ == "thirdparty_pkg_a.myarch"
    assert module.__file__.startswith(str(tmp_path))
    assert module.__model__ is mp_transformer.__model__
    validate_architecture(module)


def test_third_party_top_level_package(tmp_path, monkeypatch, clean_modules):
    write_package(tmp_path, "thirdparty_pkg_b", REEXPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = import_architecture("thirdparty_pkg_b")
    assert module.__name__ == "thirdparty_pkg_b"
    assert module.__trainer__ is mp_transformer.__trainer__


def test_resolve_third_party_merges_default_hypers(tmp_path, monkeypatch, clean_modules):
    write_package(tmp_path, "thirdparty_pkg_c.myarch", REEXPORT)
    monkeypatch.syspath_prepend(str(tmp_path))
    arch = resolve("thirdparty_pkg_c.myarch", {"cutoff": 4.0}, {"num_epochs": 3}, "opts.yaml")
    assert isinstance(arch, Architecture)
    assert arch.name == "thirdparty_pkg_c.myarch"
    assert arch.module.__name__ == "thirdparty_pkg_c.myarch"
    assert arch.model_class is mp_transformer.__model__
    assert arch.trainer_class is mp_transformer.__trainer__
    # the user's values win, the architecture's defaults fill the rest
    assert arch.model_hypers["cutoff"] == 4.0
    assert arch.model_hypers["d_model"] == 64
    assert arch.model_hypers["num_heads"] == 4
    assert arch.training_hypers["num_epochs"] == 3
    assert arch.training_hypers["learning_rate"] == 2e-3
    assert arch.training_hypers["warmup_epochs"] == 1.0
    # plain data, as written to the resolved options file
    assert json.loads(json.dumps(arch.model_hypers)) == arch.model_hypers


def test_resolve_builtin_defaults_and_bad_hypers():
    arch = resolve("mp_transformer", {}, {})
    assert arch.model_hypers["cutoff"] == 5.0
    assert arch.training_hypers["learning_rate"] == 2e-3
    with pytest.raises(OptionsError, match=r"architecture\.model\.cutof.*did you mean 'cutoff'"):
        resolve("mp_transformer", {"cutof": 4.0}, {}, "opts.yaml")
    with pytest.raises(OptionsError, match=r"architecture\.model.*num_heads.*d_model"):
        resolve("mp_transformer", {"d_model": 10, "num_heads": 4}, {}, "opts.yaml")


def test_resolve_without_hypers_schema_passes_hypers_through(tmp_path, monkeypatch, clean_modules):
    init = """
        import torch

        class Model:
            __supported_devices__ = ["cpu"]
            __supported_dtypes__ = [torch.float32]

            @classmethod
            def load_checkpoint(cls, path): ...
            def restart(self, info): ...
            def export(self): ...
            def save_checkpoint(self, path): ...

        class Trainer:
            def train(self, *args): ...
            @classmethod
            def load_checkpoint(cls, path, hypers): ...

        __model__, __trainer__ = Model, Trainer
        __authors__ = __maintainers__ = [("A <a@b.c>", "@a")]
    """
    write_package(tmp_path, "thirdparty_pkg_d", init)
    monkeypatch.syspath_prepend(str(tmp_path))
    given = {"anything": [1, 2]}
    arch = resolve("thirdparty_pkg_d", given, {"epochs": 2})
    assert arch.model_hypers == given and arch.model_hypers is not given
    assert arch.training_hypers == {"epochs": 2}


def test_resolve_validates():
    """An importable module that is not an architecture names what it lacks."""
    with pytest.raises(ArchitectureError) as error:
        resolve("json", {}, {})
    message = str(error.value)
    assert "'json'" in message
    for constant in ("__model__", "__trainer__", "__authors__", "__maintainers__"):
        assert constant in message


@pytest.mark.parametrize("name", ["mp_transfomer", "mp-transformer", "MP_transformer"])
def test_unknown_architecture_suggests_the_closest_builtin(name):
    with pytest.raises(ArchitectureError) as error:
        import_architecture(name)
    message = str(error.value)
    assert f"unknown architecture '{name}'" in message
    assert "architecture.name" in message
    assert "did you mean 'mp_transformer'?" in message
    assert "Built-in architectures: mp_transformer" in message


@pytest.mark.parametrize(
    "name", ["no_such_package_xyz.arch", "os.nothing", "architectures.nothing", ".relative"]
)
def test_unknown_module_paths(name):
    with pytest.raises(ArchitectureError, match="unknown architecture") as error:
        import_architecture(name)
    assert "mp_transformer" in str(error.value)
    assert "importable module path" in str(error.value)


def test_empty_architecture_name():
    with pytest.raises(ArchitectureError, match="empty"):
        import_architecture("")


def test_unknown_architecture_without_close_match_reads_well():
    with pytest.raises(ArchitectureError) as error:
        import_architecture("quantum_gnn")
    message = str(error.value)
    assert "valid keys" not in message
    assert message.count("mp_transformer") == 1


def test_architecture_error_is_an_hpctrain_error():
    assert issubclass(ArchitectureError, HpctrainError)


# -- validate_architecture ----------------------------------------------------------------


def test_minimal_fake_architecture_is_valid():
    validate_architecture(fake_architecture())


@pytest.mark.parametrize("constant", ["__model__", "__trainer__", "__authors__", "__maintainers__"])
def test_missing_constant(constant):
    module = fake_architecture("my_arch", **{constant: _DELETE})
    with pytest.raises(ArchitectureError) as error:
        validate_architecture(module)
    message = str(error.value)
    assert "'my_arch'" in message
    assert f"does not define {constant} " in message
    others = {"__model__", "__trainer__", "__authors__", "__maintainers__"} - {constant}
    assert not any(f" {other}" in message for other in others)


def test_all_missing_constants_are_named():
    module = fake_architecture("my_arch", __trainer__=_DELETE, __maintainers__=_DELETE)
    with pytest.raises(ArchitectureError, match="does not define __trainer__, __maintainers__"):
        validate_architecture(module)


@pytest.mark.parametrize("constant", ["__authors__", "__maintainers__"])
@pytest.mark.parametrize(
    "value",
    [
        "Jane Doe <jane@example.org>",
        ("Jane Doe <jane@example.org>", "@jane"),
        [("Jane Doe <jane@example.org>",)],
        [("Jane Doe <jane@example.org>", "@jane", "extra")],
        ["Jane Doe <jane@example.org>"],
        {"Jane Doe <jane@example.org>": "@jane"},
        None,
    ],
    ids=["string", "bare-pair", "one-item", "three-items", "list-of-strings", "dict", "none"],
)
def test_authors_in_a_wrong_shape(constant, value):
    module = fake_architecture("my_arch", **{constant: value})
    with pytest.raises(ArchitectureError) as error:
        validate_architecture(module)
    message = str(error.value)
    assert "'my_arch'" in message and constant in message
    assert "pairs" in message


def test_authors_as_lists_and_tuples_are_accepted():
    pairs = [["A <a@b.c>", "@a"], ("B <b@b.c>", "@b")]
    validate_architecture(fake_architecture(__authors__=pairs, __maintainers__=tuple(pairs)))


@pytest.mark.parametrize("method", ["export", "restart", "load_checkpoint"])
def test_model_lacking_a_method(method):
    model = subclass(GoodModel, "NoMethodModel", drop=(method,))
    with pytest.raises(ArchitectureError) as error:
        validate_architecture(fake_architecture("my_arch", __model__=model))
    message = str(error.value)
    assert "__model__ (NoMethodModel)" in message
    assert message.endswith(f"lacks {method}")


def test_model_lacking_export_really_absent():
    class NoExport:
        @classmethod
        def load_checkpoint(cls, path): ...

        def restart(self, info): ...

        def save_checkpoint(self, path): ...

    with pytest.raises(ArchitectureError, match=r"__model__ \(NoExport\) lacks export"):
        validate_architecture(fake_architecture(__model__=NoExport))


@pytest.mark.parametrize("method", ["train", "load_checkpoint"])
def test_trainer_lacking_a_method(method):
    trainer = subclass(GoodTrainer, "NoMethodTrainer", drop=(method,))
    with pytest.raises(ArchitectureError) as error:
        validate_architecture(fake_architecture("my_arch", __trainer__=trainer))
    message = str(error.value)
    assert "__trainer__ (NoMethodTrainer)" in message
    assert message.endswith(f"lacks {method}")


def test_trainer_lacking_train_and_load_checkpoint_names_both():
    class Empty:
        pass

    with pytest.raises(ArchitectureError, match="lacks train, load_checkpoint"):
        validate_architecture(fake_architecture(__trainer__=Empty))


def test_neither_save_checkpoint():
    trainer = subclass(GoodTrainer, "NoSaveTrainer", drop=("save_checkpoint",))
    with pytest.raises(ArchitectureError) as error:
        validate_architecture(fake_architecture("my_arch", __trainer__=trainer))
    message = str(error.value)
    assert "__trainer__.save_checkpoint" in message
    assert "__model__.save_checkpoint" in message


def test_save_checkpoint_on_the_model_is_enough():
    trainer = subclass(GoodTrainer, "NoSaveTrainer", drop=("save_checkpoint",))
    model = subclass(GoodModel, "SavingModel", save_checkpoint=lambda self, path: None)
    validate_architecture(fake_architecture(__trainer__=trainer, __model__=model))


@pytest.mark.parametrize(
    "attribute, value",
    [
        ("__supported_dtypes__", []),
        ("__supported_dtypes__", ["float32"]),
        ("__supported_dtypes__", [torch.float32, 64]),
        ("__supported_devices__", []),
        ("__supported_devices__", ["cpu", torch.device("cuda")]),
    ],
    ids=["dtypes-empty", "dtypes-strings", "dtypes-int", "devices-empty", "devices-object"],
)
def test_supported_lists_must_be_non_empty_and_typed(attribute, value):
    model = subclass(GoodModel, "BadModel", **{attribute: value})
    with pytest.raises(ArchitectureError) as error:
        validate_architecture(fake_architecture("my_arch", __model__=model))
    message = str(error.value)
    assert f"__model__.{attribute}" in message
    assert "non-empty list" in message


def test_supported_devices_as_a_bare_string():
    model = subclass(GoodModel, "StringDevicesModel", __supported_devices__="cpu")
    with pytest.raises(ArchitectureError, match="__supported_devices__"):
        validate_architecture(fake_architecture(__model__=model))


# -- choose_dtype / choose_device_type ----------------------------------------------------


class Prefers64:
    __supported_dtypes__ = [torch.float64, torch.float32]
    __supported_devices__ = ["cuda", "cpu"]


class Only32:
    __supported_dtypes__ = [torch.float32]
    __supported_devices__ = ["cpu"]


class PrefersCpu:
    __supported_devices__ = ["cpu", "cuda"]


class OnlyCuda:
    __supported_devices__ = ["cuda"]


def test_choose_dtype_order_of_preference():
    assert choose_dtype(Prefers64, None) is torch.float64
    assert choose_dtype(Only32, None) is torch.float32
    assert choose_dtype(mp_transformer.__model__, None) is torch.float32
    # a model that says nothing is taken to support float32
    assert choose_dtype(object, None) is torch.float32


def test_choose_dtype_requested_and_supported():
    assert choose_dtype(Prefers64, 32) is torch.float32
    assert choose_dtype(Prefers64, 64) is torch.float64
    assert choose_dtype(mp_transformer.__model__, 64) is torch.float64


@pytest.mark.parametrize(
    "model, bits, allowed",
    [(Prefers64, 16, "[32, 64]"), (Only32, 64, "[32]"), (object, 16, "[32]")],
)
def test_choose_dtype_requested_but_unsupported(model, bits, allowed):
    with pytest.raises(OptionsError) as error:
        choose_dtype(model, bits)
    message = str(error.value)
    assert f"'base_precision: {bits}' is not supported" in message
    assert f"use one of {allowed}" in message


@pytest.mark.parametrize(
    "model, cuda, device",
    [
        (Prefers64, True, "cuda"),
        (Prefers64, False, "cpu"),
        (PrefersCpu, True, "cpu"),
        (PrefersCpu, False, "cpu"),
        (OnlyCuda, True, "cuda"),
        (object, True, "cpu"),
    ],
)
def test_choose_device_auto_picks_first_available(model, cuda, device):
    assert choose_device_type(model, "auto", cuda) == device


def test_choose_device_auto_with_nothing_available():
    with pytest.raises(OptionsError, match=r"none of the architecture's devices \['cuda'\]"):
        choose_device_type(OnlyCuda, "auto", False)


def test_choose_device_requested():
    assert choose_device_type(Prefers64, "cpu", True) == "cpu"
    assert choose_device_type(Prefers64, "cuda", True) == "cuda"
    assert choose_device_type(PrefersCpu, "cuda", True) == "cuda"


def test_choose_device_cuda_requested_without_cuda():
    with pytest.raises(OptionsError) as error:
        choose_device_type(Prefers64, "cuda", False)
    message = str(error.value)
    assert "'device: cuda' was requested" in message
    assert "no cuda device" in message
    assert "torch.cuda.is_available()" in message


@pytest.mark.parametrize(
    "model, requested, supported",
    [(Only32, "cuda", "['cpu']"), (OnlyCuda, "cpu", "['cuda']")],
)
def test_choose_device_requested_but_unsupported(model, requested, supported):
    for cuda in (True, False):
        with pytest.raises(OptionsError) as error:
            choose_device_type(model, requested, cuda)
        message = str(error.value)
        assert f"'device: {requested}' is not supported by this architecture" in message
        assert supported in message


# -- DatasetInfo ----------------------------------------------------------------------------


def energy(*gradients: str, unit: str = "eV", per_atom: bool = False) -> TargetInfo:
    return TargetInfo(quantity="energy", unit=unit, per_atom=per_atom, gradients=list(gradients))


def test_union_of_types_targets_and_gradients():
    a = DatasetInfo(atomic_types=[6, 1], targets={"energy": energy("positions")})
    b = DatasetInfo(
        atomic_types=[8, 1],
        targets={
            "energy": energy("strain", "positions"),
            "dipole": TargetInfo(quantity="dipole", unit="D"),
        },
    )
    union = a.union(b)
    assert union.length_unit == "angstrom"
    assert union.atomic_types == [1, 6, 8]
    assert set(union.targets) == {"energy", "dipole"}
    assert union.targets["energy"] == energy("positions", "strain")
    assert union.targets["dipole"] == TargetInfo(quantity="dipole", unit="D")
    # both ways round, the same content
    other = b.union(a)
    assert other.atomic_types == union.atomic_types
    assert other.targets["energy"].gradients == ["positions", "strain"]
    # the inputs are left as they were
    assert a.atomic_types == [6, 1] and a.targets["energy"].gradients == ["positions"]
    assert b.targets["energy"].gradients == ["strain", "positions"]
    assert set(a.targets) == {"energy"}


def test_union_with_empty():
    a = DatasetInfo(atomic_types=[1, 8], targets={"energy": energy("positions")})
    assert DatasetInfo().union(a) == a
    assert a.union(DatasetInfo()) == a


@pytest.mark.parametrize(
    "theirs, what",
    [
        (energy(unit="kcal/mol"), "kcal/mol"),
        (energy(per_atom=True), "per_atom=True"),
        (TargetInfo(quantity="free_energy", unit="eV"), "free_energy"),
    ],
    ids=["unit", "per-atom", "quantity"],
)
def test_union_conflicting_target(theirs, what):
    a = DatasetInfo(atomic_types=[1], targets={"energy": energy()})
    b = DatasetInfo(atomic_types=[1], targets={"energy": theirs})
    with pytest.raises(ArchitectureError) as error:
        a.union(b)
    message = str(error.value)
    assert "target 'energy'" in message and what in message


def test_union_conflicting_length_units():
    a = DatasetInfo(length_unit="angstrom", atomic_types=[1])
    b = DatasetInfo(length_unit="bohr", atomic_types=[1])
    with pytest.raises(ArchitectureError, match="length units differ: angstrom and bohr"):
        a.union(b)


def test_to_dict_from_dict_round_trip():
    info = DatasetInfo(
        length_unit="angstrom",
        atomic_types=[1, 6, 8],
        targets={
            "energy": energy("positions", "strain"),
            "mtt::charges": TargetInfo(quantity="charge", unit="e", per_atom=True),
        },
    )
    data = info.to_dict()
    assert data == {
        "length_unit": "angstrom",
        "atomic_types": [1, 6, 8],
        "targets": {
            "energy": {
                "quantity": "energy",
                "unit": "eV",
                "per_atom": False,
                "gradients": ["positions", "strain"],
            },
            "mtt::charges": {
                "quantity": "charge",
                "unit": "e",
                "per_atom": True,
                "gradients": [],
            },
        },
    }
    # through JSON, as in a checkpoint or a resolved options file
    back = DatasetInfo.from_dict(json.loads(json.dumps(data)))
    assert back == info
    assert isinstance(back.targets["energy"], TargetInfo)
    assert list(back.targets) == ["energy", "mtt::charges"]
    # the copy shares no lists with the original
    back.targets["energy"].gradients.append("extra")
    back.atomic_types.append(92)
    assert info.targets["energy"].gradients == ["positions", "strain"]
    assert info.atomic_types == [1, 6, 8]


def test_round_trip_of_empty_dataset_info():
    assert DatasetInfo.from_dict(DatasetInfo().to_dict()) == DatasetInfo()
    assert dataclasses.asdict(DatasetInfo()) == DatasetInfo().to_dict()


def test_soap_bpnn_on_very_many_elements_is_refused_before_anything_is_allocated():
    """89 elements: 1.8 million SOAP features per atom and 5.4 billion parameters. The
    estimate is exact: it matches the parameters of a model that can be built."""
    import architectures.soap_bpnn.model as soap_bpnn

    def info(n_types):
        return DatasetInfo(
            length_unit="angstrom",
            atomic_types=list(range(1, n_types + 1)),
            targets={"energy": TargetInfo(gradients=["positions"])},
        )

    with pytest.raises(OptionsError) as raised:
        soap_bpnn.SoapBpnn({}, info(89))
    message = str(raised.value)
    assert "soap_bpnn for 89 elements with max_radial 7 and max_angular 6" in message
    assert "1,794,240 SOAP features per atom and 5,429,470,009 parameters" in message
    assert "lower architecture.model.soap.max_radial and max_angular" in message
    model = soap_bpnn.SoapBpnn({}, info(5))
    config = model.config
    assert soap_bpnn.check_size(config, 5, 1) == sum(p.numel() for p in model.parameters())
