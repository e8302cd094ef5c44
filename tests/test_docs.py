"""The documentation builds without warnings and documents every option."""

import dataclasses
import importlib
import importlib.util
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import architectures
from hpctrain.config import describe
from hpctrain.options import DatasetOptions, GradientOptions, Options, TargetOptions

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _extension():
    spec = importlib.util.spec_from_file_location(
        "options_reference", DOCS / "_ext" / "options_reference.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _architecture_hypers():
    """(prefix, hypers dataclass) of every architecture package, found independently."""
    found = []
    for info in pkgutil.iter_modules(architectures.__path__):
        if not info.ispkg:
            continue
        module = importlib.import_module(f"architectures.{info.name}")
        for attribute, prefix in (
            ("__model__", "architecture.model"),
            ("__trainer__", "architecture.training"),
        ):
            hypers = getattr(getattr(module, attribute), "__hypers__", None)
            if hypers is not None:
                found.append((prefix, hypers))
    return found


def _keys(cls, prefix=""):
    return [row[0] for row in describe(cls, prefix)]


def _missing(keys, text):
    return [key for key in keys if f"``{key}``" not in text]


def test_reference_renders_every_key():
    ext = _extension()
    top = ext.render_options(Options, sections=True, any_ref="dataset-options")
    assert not _missing(_keys(Options), top)
    dataset = ext.render_options(DatasetOptions)
    assert not _missing(_keys(DatasetOptions), dataset)
    target = ext.render_options(TargetOptions, "targets.<name>")
    assert not _missing(_keys(TargetOptions, "targets.<name>"), target)
    gradient = ext.render_options(GradientOptions, "targets.<name>.forces")
    assert not _missing(_keys(GradientOptions, "targets.<name>.forces"), gradient)

    hypers = _architecture_hypers()
    assert hypers, "no architecture declares typed hypers"
    rendered = ext.render_architectures()
    for prefix, cls in hypers:
        assert not _missing(_keys(cls, prefix), rendered), (prefix, cls)


def test_any_fields_point_at_the_dataset_section():
    ext = _extension()
    top = ext.render_options(Options, sections=True, any_ref="dataset-options")
    any_fields = [row[0] for row in describe(Options) if row[1] == "Any"]
    assert set(any_fields) >= {"training_set", "validation_set", "test_set"}
    for key in any_fields:
        row = top.split(f"``{key}``", 1)[1].splitlines()[1]
        assert "see :ref:`dataset-options`" in row, (key, row)


def test_options_page_uses_the_generated_reference():
    text = (DOCS / "options.rst").read_text()
    assert ".. _dataset-options:" in text
    for cls in (Options, DatasetOptions, TargetOptions, GradientOptions):
        assert dataclasses.is_dataclass(cls)
        assert f".. hpctrain-options:: {cls.__module__}.{cls.__name__}" in text
    assert ".. hpctrain-architectures::" in text


def test_defaults_are_yaml():
    ext = _extension()
    assert ext.format_default(None) == "``null``"
    assert ext.format_default(True) == "``true``"
    assert ext.format_default("01:00:00") == "``01:00:00``"
    assert ext.format_default([]) == "``[]``"
    assert ext.format_default(dataclasses.MISSING) == "*required*"


@pytest.mark.slow
def test_docs_build_without_warnings(tmp_path):
    out = tmp_path / "html"
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    html = (out / "options.html").read_text()
    for key in _keys(Options) + [key for p, cls in _architecture_hypers() for key in _keys(cls, p)]:
        assert key in html, key


def test_every_module_is_in_the_table_of_concepts_and_says_what_it_holds():
    import ast

    text = (DOCS / "concepts.rst").read_text()
    table = text[text.index("Where things are") : text.index("The run directory")]
    for path in sorted((ROOT / "hpctrain").rglob("*.py")):
        parts = path.relative_to(ROOT / "hpctrain").with_suffix("").parts
        if parts[-1] in ("__init__", "__main__"):
            continue
        assert f"``{'.'.join(parts)}``" in table, path
        assert ast.get_docstring(ast.parse(path.read_text())), f"{path} has no docstring"
