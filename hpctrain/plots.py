"""PNG figures: parity plots of predictions and learning curves of a run.

Drawn with matplotlib's Agg backend on figures of their own (no pyplot state), so
that they work on nodes without a display and inside any program.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import DataError
from .report import read_metrics

# "val forces RMSE [eV/A]" -> ("val", "forces", "RMSE", "eV/A")
_ERROR_COLUMN = re.compile(r"^(val|train) (.+) (RMSE|MAE) \[(.+)\]$")


def typeset(unit: str) -> str:
    """A unit as plots show it: ``eV/A^3`` -> ``eV/Å³``, ``eV/A`` -> ``eV/Å``."""
    return re.sub(r"\bA\b", "Å", unit).replace("^3", "³").replace("^2", "²")


def _figure(rows: int, columns: int, size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(size[0] * columns, size[1] * rows), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False)
    return figure, axes


def _save(figure, path: Path) -> Path:
    """Write the PNG atomically: a reader never sees half a file."""
    from .files import write_atomically

    write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=120))
    return path


def parity_plot(
    series: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str = ""
) -> Path:
    """Predicted against reference values, one panel per entry of ``series``
    (``"forces [eV/A]": (reference, predicted)``), with the diagonal, MAE and RMSE."""
    if not series:
        raise DataError(f"nothing to plot in {path}: no predictions")
    figure, axes = _figure(1, len(series), (4.2, 4.0))
    for ax, (label, (reference, predicted)) in zip(axes[0], series.items()):
        reference = np.asarray(reference, dtype=np.float64).reshape(-1)
        predicted = np.asarray(predicted, dtype=np.float64).reshape(-1)
        error = predicted - reference
        low = float(min(reference.min(), predicted.min()))
        high = float(max(reference.max(), predicted.max()))
        pad = 0.05 * (high - low) or 1e-3 * max(abs(low), 1.0)
        ax.plot([low - pad, high + pad], [low - pad, high + pad], color="0.6", lw=1, zorder=0)
        ax.scatter(reference, predicted, s=6, alpha=0.6, linewidths=0)
        ax.set_xlim(low - pad, high + pad)
        ax.set_ylim(low - pad, high + pad)
        ax.set_aspect("equal")
        ax.locator_params(nbins=5)
        ax.tick_params(axis="x", labelrotation=30)
        name, _, unit = label.partition(" [")
        ax.set_title(name)
        ax.set_xlabel(f"reference [{typeset(unit)}")
        ax.set_ylabel(f"predicted [{typeset(unit)}")
        rmse = math.sqrt(float(np.mean(error**2)))
        mae = float(np.mean(np.abs(error)))
        ax.text(
            0.04,
            0.96,
            f"MAE {mae:.4g}\nRMSE {rmse:.4g}\nN = {len(error)}",
            transform=ax.transAxes,
            va="top",
            fontsize=9,
        )
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def read_metrics_csv(path: Path) -> list[dict[str, float]]:
    """The rows of a run's ``metrics.csv`` as numbers, one per epoch: when a restart
    repeated an epoch, its latest row. Empty cells are left out."""
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: give a run directory (outputs/<date>/<time>) of "
            "hpctrain train that logged at least one epoch"
        )
    by_epoch = {row["epoch"]: row for row in read_metrics(path) if "epoch" in row}
    if not by_epoch:
        raise DataError(f"{path} holds no epoch yet; plot again after the first epoch")
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def _log_if_positive(ax, values: Sequence[np.ndarray]) -> None:
    finite = np.concatenate([v[np.isfinite(v)] for v in values]) if values else np.array([])
    if finite.size and (finite > 0).all() and finite.max() > 2 * finite.min():
        ax.set_yscale("log")


def learning_curves(run_dir: Path, output: Path | None = None) -> Path:
    """One PNG of a run's ``metrics.csv``: the losses, each validation RMSE (and
    MAE, dashed) per target against the epoch, and the learning rate in its own
    panel; log scales where the values are positive and span a range.

    :param output: default ``<run_dir>/learning_curves.png``
    """
    from matplotlib.ticker import MaxNLocator

    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise DataError(
            f"{run_dir} is a file; hpctrain plot takes a run directory (the one holding "
            f"metrics.csv), e.g. hpctrain plot {run_dir.parent}"
        )
    if not run_dir.is_dir():
        raise DataError(f"run directory {str(run_dir)!r} does not exist")
    rows = read_metrics_csv(run_dir / "metrics.csv")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    epochs = np.array([row["epoch"] for row in rows])

    def column(name: str) -> np.ndarray:
        return np.array([row.get(name, np.nan) for row in rows])

    panels: dict[str, list[tuple[str, str, str]]] = {}  # title -> (column, legend, style)
    losses = [c for c in columns if c in ("train_loss", "val_loss")]
    if losses:
        panels["loss"] = [(c, c.replace("_", " "), "-") for c in losses]
    for name in columns:
        match = _ERROR_COLUMN.match(name)
        if match:
            split, target, kind, unit = match.groups()
            legend = f"{'validation' if split == 'val' else 'training'} {kind}"
            panels.setdefault(f"{target} [{typeset(unit)}]", []).append(
                (name, legend, "-" if kind == "RMSE" else "--")
            )
    if "learning_rate" in columns:
        panels["learning rate"] = [("learning_rate", "learning rate", "-")]
    if not panels:
        raise DataError(
            f"{run_dir / 'metrics.csv'} has no loss, error or learning-rate column to plot "
            f"(columns: {', '.join(columns)})"
        )
    n_columns = min(2, len(panels))
    n_rows = math.ceil(len(panels) / n_columns)
    figure, axes = _figure(n_rows, n_columns, (5.0, 3.4))
    flat = list(axes.reshape(-1))
    for ax, (title, lines) in zip(flat, panels.items()):
        values = []
        for name, legend, style in lines:
            y = column(name)
            values.append(y)
            ax.plot(epochs, y, style, marker="o", markersize=3, label=legend)
        _log_if_positive(ax, values)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in flat[len(panels) :]:
        ax.set_visible(False)
    figure.suptitle(str(run_dir), fontsize=10)
    return _save(figure, Path(output) if output else run_dir / "learning_curves.png")
