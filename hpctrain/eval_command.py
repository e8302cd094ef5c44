"""``hpctrain eval``: an exported model on a dataset, as an MD engine runs it.

The model is loaded with ``metatomic.torch.load_atomistic_model`` (and its
TorchScript extensions), never through the architecture's Python code, so that
the numbers are those of the file a simulation would use. Under mpiexec, srun or
torchrun every rank evaluates its own share of the structures; the metrics are
all-reduced (exact) and rank 0 gathers the predictions, in the order of the data,
to print, write and plot them.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import checkpoint, files, launch, run
from .data import AtomisticDataset, read_dataset
from .data.batch import Batch
from .data.structures import GRADIENT_NAMES
from .errors import CheckpointError, DataError, HpctrainError
from .evaluation import evaluate_exported_model, split_key
from .options import DatasetOptions, SystemsOptions, TargetOptions
from .report import plural

SOURCE = "the command line of hpctrain eval"


class ModelError(HpctrainError):
    """An exported model cannot be loaded, or cannot evaluate the data given."""


def load_exported(path: str | Path, extensions: str | Path | None = None) -> Any:
    """The ``AtomisticModel`` at ``path``, loaded as an MD engine loads it.

    :param extensions: directory of the TorchScript extensions; None: the
        ``extensions/`` next to the model when there is one
    """
    # vesin's own library first: the copy in extensions/ is then skipped, where loading
    # both would register its operators twice (a fatal error)
    import vesin.metatomic  # noqa: F401
    from metatomic.torch import load_atomistic_model

    path = Path(path)
    if not path.exists():
        raise ModelError(f"model {str(path)!r} does not exist")
    if extensions is None:
        found = path.parent / "extensions"
        extensions = found if found.is_dir() else None
    elif not Path(extensions).is_dir():
        raise ModelError(
            f"extensions directory {str(extensions)!r} (--extensions-directory) does not exist"
        )
    if path.is_dir() and (path / "model.pt").is_file():
        raise ModelError(f"{path} is a run directory: evaluate its model, {path / 'model.pt'}")
    if path.is_dir() or _is_checkpoint(path):
        raise ModelError(
            f"{path} is a training checkpoint, not an exported model; export it first: "
            f"hpctrain export {path} -o model.pt"
        )
    try:
        return load_atomistic_model(str(path), extensions_directory=extensions)
    except Exception as error:  # metatomic raises RuntimeError/ValueError
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(
            f"cannot load {path} as a metatomic model ({detail}); is it a model.pt written "
            "by hpctrain train or hpctrain export, with its extensions directory "
            "(--extensions-directory)?"
        ) from None


def _is_checkpoint(path: Path) -> bool:
    """Whether ``path`` holds a training checkpoint (an exported model does not)."""
    from .export_command import is_torchscript

    if is_torchscript(path):
        return False
    try:
        checkpoint.load(path)
    except CheckpointError:
        return False
    return True


def energy_output(capabilities: Any, variant: str | None, model_path: Path) -> str:
    """The model's energy output to evaluate: ``energy``, or ``energy/<variant>``
    (a level of theory of a model that has several)."""
    outputs = list(capabilities.outputs)
    energies = [name for name in outputs if name.partition("/")[0] == "energy"]
    wanted = "energy" if variant is None else f"energy/{variant}"
    if wanted in outputs:
        return wanted
    variants = [name.partition("/")[2] for name in energies if "/" in name]
    if variant is None and variants:
        raise ModelError(
            f"{model_path} has no plain 'energy' output but the levels of theory "
            f"{', '.join(variants)}: choose one with --variant {variants[0]}"
        )
    raise ModelError(
        f"{model_path} has no '{wanted}' output (it has {', '.join(outputs)})"
        + (f"; its levels of theory (--variant): {', '.join(variants)}" if variants else "")
    )


def dataset_options(
    data: str | Path,
    energy: str = "energy",
    forces: str = "auto",
    stress: str = "auto",
    reader: str | None = None,
    energy_unit: str = "eV",
    length_unit: str = "angstrom",
    output: str = "energy",
) -> DatasetOptions:
    """What to read from ``data`` (a file ASE reads, or a shard directory), as the
    target ``output`` (the model's energy output it is compared with).

    ``forces`` and ``stress`` are a key, ``"none"``, or ``"auto"``: used when the
    first structure has them (``forces``, and ``stress`` for a periodic structure);
    for shards, when the manifest stores them.
    """
    path = Path(data)
    if not path.exists():
        raise DataError(f"data {str(path)!r} does not exist")
    if path.is_dir():
        from .data.shards import read_manifest

        stored = read_manifest(path)["targets"]
        chosen = next((name for name in (energy, output) if name in stored), None)
        if chosen is None:
            raise DataError(
                f"{path} has no target '{energy}' (--energy); it holds {', '.join(sorted(stored))}"
            )
        gradients = stored[chosen]["gradients"]
        has_forces, has_stress = "positions" in gradients, "strain" in gradients
        use_forces = has_forces if forces == "auto" else forces != "none"
        use_stress = has_stress if stress == "auto" else stress != "none"
        target = TargetOptions(key=chosen, forces=use_forces, stress=use_stress)
    else:
        from .data.ase_reader import first_frame, keys_of, label_key, lookup

        atoms = first_frame(path, reader)
        if lookup(atoms, energy) is None:
            raise DataError(
                f"{path}, structure 0 has no '{energy}' (name the energy's key with --energy "
                f"KEY); its keys: {', '.join(sorted(keys_of(atoms)))}"
            )
        target = TargetOptions(
            key=energy,
            unit=energy_unit,
            forces=label_key(atoms, forces, "forces") or False,
            stress=label_key(atoms, stress, "stress", bool(atoms.pbc.all())) or False,
        )
    return DatasetOptions(
        systems=SystemsOptions(read_from=str(path), reader=reader, length_unit=length_unit),
        targets={output: target},
    )


def check_compatible(model: Any, dataset: AtomisticDataset, model_path: Path) -> None:
    """The model knows every element of the data."""
    capabilities = model.capabilities()
    unknown = sorted(set(dataset.info.atomic_types) - set(capabilities.atomic_types))
    if unknown:
        raise ModelError(
            f"{dataset.name} holds elements {unknown} that {model_path} was not trained on "
            f"(it knows {list(capabilities.atomic_types)})"
        )


@dataclasses.dataclass
class Prediction:
    """Reference and predicted values of one structure (energy in eV, forces in
    eV/A, stress in eV/A^3; None where the data has no reference)."""

    n_atoms: int
    energy: tuple[float, float]
    forces: tuple[np.ndarray, np.ndarray] | None = None
    stress: tuple[np.ndarray, np.ndarray] | None = None


class Collector:
    """The predictions of this rank's structures, by their index in the data, of the
    energy output ``target`` and its gradients."""

    def __init__(self, target: str = "energy") -> None:
        self.target = target
        self.records: dict[int, Prediction] = {}

    def __call__(
        self,
        dataset_index: int,
        indices: np.ndarray,
        batch: Batch,
        predictions: dict[str, torch.Tensor],
    ) -> None:
        def numpy(tensor: torch.Tensor) -> np.ndarray:
            return tensor.detach().to("cpu", torch.float64).numpy()

        values = {split_key(key)[1]: numpy(value) for key, value in predictions.items()}
        counts = batch.n_atoms.tolist()
        offsets = np.concatenate([[0], np.cumsum(counts)])
        target = self.target
        energies = numpy(batch.targets[target])
        forces = numpy(batch.forces[target]) if target in batch.forces else None
        stress = numpy(batch.stress[target]) if target in batch.stress else None
        for k, index in enumerate(indices):
            atoms = slice(offsets[k], offsets[k + 1])
            self.records[int(index)] = Prediction(
                n_atoms=int(counts[k]),
                energy=(float(energies[k]), float(values[""][k])),
                forces=None if forces is None else (forces[atoms], values["forces"][atoms]),
                stress=None if stress is None else (stress[k], values["stress"][k]),
            )

    def gather(self, count: int) -> list[Prediction] | None:
        """All predictions on rank 0, in the order of the data (None on other ranks)."""
        parts = [self.records]
        if launch.is_distributed():
            import torch.distributed as dist

            gathered: list[Any] | None = (
                [None] * dist.get_world_size() if run.current().is_main else None
            )
            dist.gather_object(self.records, gathered, dst=0)
            parts = gathered or []
        if not run.current().is_main:
            return None
        merged: dict[int, Prediction] = {}
        for part in parts:
            merged.update(part)
        if sorted(merged) != list(range(count)):
            raise HpctrainError(f"predictions of {count - len(merged)} structures are missing")
        return [merged[i] for i in range(count)]


def format_table(metrics: dict[str, float]) -> str:
    """The metrics as rows ``energy [eV/atom]  MAE  RMSE``, in the order given."""
    rows: dict[str, dict[str, float]] = {}
    for label, value in metrics.items():
        kind = "RMSE" if " RMSE [" in label else "MAE"
        name = label.replace(f" {kind} [", " [", 1)
        rows.setdefault(name, {})[kind] = value
    width = max([len(name) for name in rows] + [len("target")])
    lines = [f"{'target':<{width}}  {'MAE':>12}  {'RMSE':>12}"]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  {row['MAE']:>12.6g}  {row['RMSE']:>12.6g}")
    return "\n".join(lines)


def write_predictions(path: Path, dataset: AtomisticDataset, predictions: list[Prediction]) -> None:
    """An extxyz file, one frame per structure in the order of the data: the reference
    values as ``energy``, ``forces`` and ``stress`` (read back by ASE as its
    calculator's results) and the predictions as ``predicted_energy``,
    ``predicted_forces`` and ``predicted_stress`` (Voigt order, as ASE's stress)."""
    import ase
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.stress import full_3x3_to_voigt_6_stress

    def write(binary) -> None:
        file = io.TextIOWrapper(binary, encoding="utf-8")
        for index, prediction in enumerate(predictions):
            structure = dataset[index]
            atoms = ase.Atoms(
                numbers=structure.numbers.numpy(),
                positions=structure.positions.double().numpy(),
                cell=structure.cell.double().numpy(),
                pbc=structure.pbc.numpy(),
            )
            reference: dict[str, Any] = {"energy": prediction.energy[0]}
            atoms.info["predicted_energy"] = prediction.energy[1]
            if prediction.forces is not None:
                reference["forces"] = prediction.forces[0]
                atoms.arrays["predicted_forces"] = prediction.forces[1]
            if prediction.stress is not None:
                reference["stress"] = full_3x3_to_voigt_6_stress(prediction.stress[0])
                atoms.info["predicted_stress"] = full_3x3_to_voigt_6_stress(prediction.stress[1])
            atoms.calc = SinglePointCalculator(atoms, **reference)
            ase.io.write(file, atoms, format="extxyz", parallel=False)
        file.flush()
        file.detach()

    files.write_atomically(path, write)


def parity_series(predictions: list[Prediction]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference and predicted values per panel of a parity plot, labelled with units."""
    n_atoms = np.array([p.n_atoms for p in predictions], dtype=np.float64)
    energies = np.array([p.energy for p in predictions])
    series = {"energy [eV/atom]": (energies[:, 0] / n_atoms, energies[:, 1] / n_atoms)}
    for name, unit in (("forces", "eV/A"), ("stress", "eV/A^3")):
        pairs = [getattr(p, name) for p in predictions if getattr(p, name) is not None]
        if pairs:
            series[f"{name} [{unit}]"] = (
                np.concatenate([pair[0].reshape(-1) for pair in pairs]),
                np.concatenate([pair[1].reshape(-1) for pair in pairs]),
            )
    return series


def evaluate_file(args: argparse.Namespace) -> dict[str, float]:
    """The whole ``hpctrain eval`` on every rank; returns the metrics."""
    model_path = Path(args.model)
    model = load_exported(model_path, args.extensions_directory)
    output = energy_output(model.capabilities(), args.variant, model_path)
    options = dataset_options(
        args.data,
        energy=args.energy,
        forces=args.forces,
        stress=args.stress,
        reader=args.format,
        energy_unit=args.energy_unit,
        length_unit=args.length_unit,
        output=output,
    )
    if args.batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {args.batch_size}")
    capabilities = model.capabilities()
    env = launch.detect()
    device_type = _device_type(args.device, list(capabilities.supported_devices))
    from .options import DistributedOptions
    from .startup import launched

    distributed = DistributedOptions(timeout_s=args.timeout)
    context = run.RunContext(rank=env.rank, world_size=env.world_size)
    backend = launch.backend_for(device_type)
    with launched(env, device_type, backend, distributed) as rank, run.use(context):
        device = rank.device
        # references in float64, whatever the model's dtype: written files keep them exact
        dataset = read_dataset(options, "data", SOURCE, torch.float64)
        check_compatible(model, dataset, model_path)
        keep = args.output is not None or args.plot is not None
        collector = Collector(output) if keep else None
        metrics = evaluate_exported_model(
            model,
            dataset.info.targets,
            [dataset],
            device,
            batch_size=args.batch_size,
            on_batch=collector,
        )
        predictions = collector.gather(len(dataset)) if collector is not None else None
        if env.is_main:
            gradients = ", ".join(
                [output, *(GRADIENT_NAMES[g] for g in dataset.info.targets[output].gradients)]
            )
            print(
                f"{model_path} on {dataset.name}: {len(dataset)} structures ({gradients}), "
                f"{capabilities.dtype}, {plural(env.world_size, 'rank')}, {device_type}",
                flush=True,
            )
            print(format_table(metrics), flush=True)
            if args.output is not None and predictions is not None:
                write_predictions(Path(args.output), dataset, predictions)
                print(f"wrote {args.output}", flush=True)
            if args.plot is not None and predictions is not None:
                from .plots import parity_plot

                parity_plot(parity_series(predictions), Path(args.plot), title=str(model_path))
                print(f"wrote {args.plot}", flush=True)
        launch.barrier()
    return metrics


def _device_type(requested: str, supported: list[str]) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() and "cuda" in supported else "cpu"
    if requested not in supported:
        raise ModelError(f"--device {requested}: the model supports {', '.join(supported)}")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelError("--device cuda: no GPU is visible")
    return requested


def run_eval(args: argparse.Namespace) -> None:
    evaluate_file(args)
