"""The options reference, rendered from the dataclasses that parse the options file.

Directives:

``.. hpctrain-options:: dotted.path.to.Dataclass``
    A table of every key of the dataclass (nested sections flattened), with its
    type, default and doc, as :func:`hpctrain.config.describe` returns them.
    ``:prefix:`` prepends a key path; ``:sections:`` gives each nested section its
    own subsection; ``:any-ref: label`` points fields typed ``Any`` at ``label``.

``.. hpctrain-architectures::``
    For every package of ``architectures/``, its model hypers (``architecture.model``)
    and training hypers (``architecture.training``).

``.. hpctrain-cli-help:: [command]``
    The ``--help`` text of the ``hpctrain`` command line.

The rendering functions return reStructuredText, so that tests can check them
without building the documentation.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import inspect
import os
import pkgutil
import sys
import typing
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import yaml
from docutils import nodes
from docutils.parsers.rst import directives
from sphinx.util.docutils import SphinxDirective

from hpctrain.config import describe

_MISSING = dataclasses.MISSING
_TITLE_CHARS = "-~^\"'"


def import_object(path: str) -> Any:
    """The object at a dotted path: a module, or an attribute of one."""
    try:
        return importlib.import_module(path)
    except ImportError:
        module_name, _, attribute = path.rpartition(".")
        if not module_name:
            raise
        return getattr(importlib.import_module(module_name), attribute)


def escape(text: str) -> str:
    """``text`` as literal reStructuredText (no markup)."""
    for char in "\\*`|_[]<>":
        text = text.replace(char, "\\" + char)
    return text


def format_default(value: Any) -> str:
    """A default as the YAML a user would write, or *required*."""
    if value is _MISSING:
        return "*required*"
    try:
        text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=2**31).strip()
    except yaml.YAMLError:
        text = repr(value)
    if text.endswith("..."):
        text = text[:-3].strip()
    return f"``{text}``"


def title(text: str, level: int) -> list[str]:
    return [text, _TITLE_CHARS[level] * len(text), ""]


def label_of(key: str) -> str:
    """The reference label of a key path's subsection."""
    return "option-" + key.replace(".", "-").replace("_", "-").replace("<", "").replace(">", "")


def _indent(text: str, spaces: int) -> list[str]:
    lines = inspect.cleandoc(text).splitlines() or [""]
    return [(" " * spaces + line) if line.strip() else "" for line in lines]


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    """A list-table of (key, type, default, doc) cells, already reStructuredText."""
    lines = [
        ".. list-table::",
        "   :header-rows: 1",
        "   :widths: 30 16 16 38",
        "   :class: hpctrain-options",
        "",
        "   * - Key",
        "     - Type",
        "     - Default",
        "     - Description",
    ]
    for key, type_cell, default, doc in rows:
        lines += [
            f"   * - ``{key}``",
            f"     - {type_cell}",
            f"     - {default}",
        ]
        doc_lines = _indent(doc, 7) if doc.strip() else ["       "]
        lines.append("     - " + doc_lines[0].lstrip())
        lines += doc_lines[1:]
    return lines + [""]


def _cells(
    row: tuple[str, str, Any, str], any_ref: str | None, section_ref: str | None
) -> tuple[str, str, str, str]:
    key, type_name, default, doc = row
    if type_name == "Any" and any_ref:
        type_cell = f"see :ref:`{any_ref}`"
    else:
        type_cell = escape(type_name)
    default_cell = f"see :ref:`{section_ref}`" if section_ref else format_default(default)
    return key, type_cell, default_cell, doc


def render_options(
    cls: type,
    prefix: str = "",
    *,
    sections: bool = False,
    any_ref: str | None = None,
    level: int = 0,
) -> str:
    """reStructuredText of every key of ``cls``, from :func:`hpctrain.config.describe`.

    With ``sections``, the table holds the keys of this level and each nested section
    (a field whose type is a dataclass) follows in a subsection of its own.
    """
    rows = describe(cls, prefix)
    if not sections:
        return "\n".join(_table([_cells(r, any_ref, None) for r in rows]))
    hints = typing.get_type_hints(cls)
    nested = {
        (f"{prefix}.{f.name}" if prefix else f.name): hints[f.name]
        for f in dataclasses.fields(cls)
        if dataclasses.is_dataclass(hints[f.name])
    }
    depth = prefix.count(".") + 1 if prefix else 0
    top = [r for r in rows if r[0].count(".") == depth]
    lines = _table([_cells(r, any_ref, label_of(r[0]) if r[0] in nested else None) for r in top])
    for key, section in nested.items():
        lines += [f".. _{label_of(key)}:", ""]
        lines += title(f"``{key}``", level)
        if section.__doc__ and not section.__doc__.startswith(f"{section.__name__}("):
            lines += _indent(section.__doc__, 0) + [""]
        lines += _table([_cells(r, any_ref, None) for r in rows if r[0].startswith(key + ".")])
    return "\n".join(lines)


def architectures() -> list[tuple[str, ModuleType]]:
    """Every package of ``architectures/``, imported, by name."""
    import architectures as package

    found = []
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda m: m.name):
        if info.ispkg:
            found.append((info.name, importlib.import_module(f"{package.__name__}.{info.name}")))
    return found


def _precisions(model: Any) -> list[int]:
    from hpctrain.architecture import DTYPES

    bits = {dtype: n for n, dtype in DTYPES.items()}
    return [bits[d] for d in getattr(model, "__supported_dtypes__", []) if d in bits]


def render_architecture(name: str, module: ModuleType, level: int = 0) -> str:
    """reStructuredText of one architecture: description, devices and both hypers."""
    model, trainer = module.__model__, module.__trainer__
    lines = [f".. _architecture-{name.replace('_', '-')}:", ""]
    lines += title(f"``{name}``", level)
    if module.__doc__:
        lines += _indent(module.__doc__, 0) + [""]
    model_module = sys.modules.get(getattr(model, "__module__", ""))
    if model_module is not None and model_module.__doc__ and model_module is not module:
        lines += _indent(model_module.__doc__, 0) + [""]
    devices = getattr(model, "__supported_devices__", None)
    if devices:
        lines += [
            "Devices, most preferred first: " + ", ".join(f"``{d}``" for d in devices) + ".",
            "",
        ]
    precisions = _precisions(model)
    if precisions:
        lines += [
            "``base_precision``: " + ", ".join(f"``{b}``" for b in precisions) + ".",
            "",
        ]
    for heading, cls, prefix in (
        ("Model hypers", model, "architecture.model"),
        ("Training hypers", trainer, "architecture.training"),
    ):
        lines += title(heading, level + 1)
        hypers = getattr(cls, "__hypers__", None)
        if hypers is None:
            lines += [
                f"``{name}`` declares no typed hypers; everything under ``{prefix}`` is "
                "passed to it unchecked.",
                "",
            ]
        else:
            lines += [render_options(hypers, prefix), ""]
    return "\n".join(lines)


def render_architectures(level: int = 0) -> str:
    """reStructuredText of every architecture of ``architectures/``."""
    return "\n".join(render_architecture(name, module, level) for name, module in architectures())


@contextlib.contextmanager
def _columns(width: int) -> Iterator[None]:
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        yield
    finally:
        if old is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = old


def cli_help(command: str | None = None, width: int = 88) -> str:
    """The ``--help`` text of ``hpctrain`` or of one of its commands."""
    from hpctrain.cli import parser

    main = parser()
    target = main
    if command:
        subparsers = [a for a in main._actions if isinstance(a, argparse._SubParsersAction)]
        target = subparsers[0].choices[command]
    with _columns(width):
        return target.format_help()


def _dataclasses_of(tp: Any, seen: set | None = None) -> set:
    """``tp`` and every dataclass it inherits from or nests, for rebuild dependencies."""
    seen = set() if seen is None else seen
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if tp in seen:
            return seen
        seen.update(c for c in tp.__mro__ if dataclasses.is_dataclass(c))
        for hint in typing.get_type_hints(tp).values():
            _dataclasses_of(hint, seen)
    for arg in typing.get_args(tp):
        _dataclasses_of(arg, seen)
    return seen


class _Generated(SphinxDirective):
    """Parses generated reStructuredText; rebuilds when the code it reads changes."""

    def depend_on(self, *objects: Any) -> None:
        for obj in objects:
            module = inspect.getmodule(obj)
            path = getattr(module, "__file__", None)
            if path:
                self.env.note_dependency(os.path.abspath(path))

    def parse(self, text: str) -> list[nodes.Node]:
        return self.parse_text_to_nodes(text, allow_section_headings=True)


class OptionsDirective(_Generated):
    required_arguments = 1
    option_spec = {
        "prefix": directives.unchanged,
        "sections": directives.flag,
        "any-ref": directives.unchanged_required,
    }

    def run(self) -> list[nodes.Node]:
        cls = import_object(self.arguments[0])
        if not dataclasses.is_dataclass(cls):
            raise self.error(f"{self.arguments[0]} is not a dataclass")
        self.depend_on(describe, *_dataclasses_of(cls))
        text = render_options(
            cls,
            self.options.get("prefix", ""),
            sections="sections" in self.options,
            any_ref=self.options.get("any-ref"),
        )
        return self.parse(text)


class ArchitecturesDirective(_Generated):
    def run(self) -> list[nodes.Node]:
        found = architectures()
        for _, module in found:
            self.depend_on(module, module.__model__, module.__trainer__)
            for cls in (module.__model__, module.__trainer__):
                self.depend_on(*_dataclasses_of(getattr(cls, "__hypers__", None)))
        return self.parse(render_architectures())


class CliHelpDirective(_Generated):
    optional_arguments = 1

    def run(self) -> list[nodes.Node]:
        from hpctrain import cli

        self.depend_on(cli)
        text = cli_help(self.arguments[0] if self.arguments else None)
        block = nodes.literal_block(text, text)
        block["language"] = "text"
        return [block]


def setup(app: Any) -> dict[str, Any]:
    app.add_directive("hpctrain-options", OptionsDirective)
    app.add_directive("hpctrain-architectures", ArchitecturesDirective)
    app.add_directive("hpctrain-cli-help", CliHelpDirective)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}
