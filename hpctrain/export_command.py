"""``hpctrain export``: any checkpoint of a run to a metatomic model.

A checkpoint is ``model.ckpt`` or a committed step directory
(``checkpoints/step-N/``, the best one included). The architecture comes from the
checkpoint itself (or, for a checkpoint that does not record it, from the run's
``options.resolved.yaml``); its model class loads the checkpoint and exports it,
with the metadata given, through :func:`hpctrain.export.export_model`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from . import checkpoint
from .architecture import import_architecture, validate_architecture
from .errors import CheckpointError


def _resolved_options(path: Path) -> Path | None:
    """``options.resolved.yaml`` of the run a checkpoint belongs to, if any."""
    run_dir = path.parent.parent if checkpoint.is_step_dir(path) else path.parent
    found = run_dir / "options.resolved.yaml"
    return found if found.is_file() else None


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive, such as an exported ``model.pt``."""
    import zipfile

    if not (path.is_file() and zipfile.is_zipfile(path)):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def architecture_of_checkpoint(path: Path) -> str:
    """The architecture (module path) that wrote the checkpoint at ``path``."""
    if path.is_dir() and not checkpoint.is_step_dir(path):
        steps = checkpoint.committed_steps(path / "checkpoints") or checkpoint.committed_steps(path)
        found = [str(p) for p in (path / "model.ckpt",) if p.is_file()]
        found += [str(steps[-1][1])] if steps else []
        hint = f", such as {' or '.join(found)}" if found else ""
        raise CheckpointError(
            f"{path} is a directory, not a checkpoint: give a model.ckpt file or a "
            f"committed step directory{hint}"
        )
    if is_torchscript(path):
        raise CheckpointError(
            f"{path} is an exported (TorchScript) model, not a checkpoint; export from the "
            "run's model.ckpt or checkpoints/step-N/"
        )
    data = checkpoint.load(path)
    name = data.get("architecture")
    if name:
        return str(name)
    resolved = _resolved_options(path)
    if resolved is not None:
        import yaml

        name = (yaml.safe_load(resolved.read_text()) or {}).get("architecture", {}).get("name")
        if name:
            return str(name)
    raise CheckpointError(
        f"{path} does not record its architecture, and no options.resolved.yaml of its run "
        "says which; export it with the architecture's own tools"
    )


def load_model(path: str | Path, best: bool = False) -> tuple[Any, str]:
    """The model of the checkpoint at ``path`` (with the weights of its best
    validation when ``best``) and the name of its architecture."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    name = architecture_of_checkpoint(path)
    module = import_architecture(name)
    validate_architecture(module)
    model = module.__model__.load_checkpoint(path)
    if best:
        kept = (checkpoint.load(path).get("trainer_state") or {}).get("best")
        if not kept:
            raise CheckpointError(
                f"{path} keeps no best weights (its trainer keeps none, or no validation "
                "had run when it was written); export it without --best"
            )
        model.load_state_dict(kept["model_state"])
    return model, name


def metadata(
    name: str | None = None,
    authors: list[str] | None = None,
    references: list[str] | None = None,
    description: str | None = None,
) -> Any:
    """A metatomic ``ModelMetadata``; references are those of the model itself."""
    from metatomic.torch import ModelMetadata

    return ModelMetadata(
        name=name or "",
        description=description or "",
        authors=list(authors or []),
        references={"model": list(references or [])} if references else {},
    )


def export_checkpoint(
    path: str | Path, output: str | Path, model_metadata: Any = None, best: bool = False
) -> Path:
    """Export the checkpoint at ``path`` (its best weights when ``best``) to ``output``
    (e.g. ``model.pt``), with the TorchScript extensions it needs in ``extensions/``
    next to it."""
    from .export import export_model

    model, _ = load_model(path, best)
    output = Path(output)
    if output.is_dir():
        raise CheckpointError(f"-o {output} is a directory; give the model's file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    return export_model(model, output.parent, model_metadata, output.name)


def run_export(args: argparse.Namespace) -> None:
    model_metadata = metadata(args.name, args.author, args.reference, args.description)
    path = export_checkpoint(args.checkpoint, args.output, model_metadata, args.best)
    print(f"wrote {path} and {path.parent / 'extensions'}", flush=True)
    if args.name or args.author or args.reference or args.description:
        print(str(model_metadata).strip(), flush=True)
