"""Training steps with the model core under ``torch.compile``, against eager.

    python benchmarks/compile.py --out benchmarks/results/compile.json     # 2-4 min, 2 cores

``mp_transformer`` (default hypers, float32, batch 16, ethanol) trains through
``Engine.train_step`` with its core (``atomic_outputs``) eager and compiled
(``torch.compile(dynamic=True)``, inductor and aot_eager backends), once on energies
and forces (forces by autograd, so the loss needs the gradient of a gradient) and
once on energies alone. Each run reports the median of its steps after the first
(which compiles), or the error that ended it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch._functorch.config

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data import load, log, machine, open_dataset, training_engine, write_results  # noqa: E402

ETHANOL = ROOT / "examples" / "rmd17_ethanol_100.xyz"


def steps(backend: str | None, forces: bool, n_steps: int, workdir: Path) -> dict:
    dataset = open_dataset(ETHANOL, stress=False, forces=forces)
    engine = training_engine(dataset, {"batch_size": 16}, "cpu", workdir)
    if backend is not None:
        torch._dynamo.reset()
        model = engine.model
        model.atomic_outputs = torch.compile(model.atomic_outputs, dynamic=True, backend=backend)
    row: dict = {"backend": backend or "eager", "forces": forces}
    times = []
    try:
        for step in list(engine.sampler.plan())[: n_steps + 1]:
            batches = engine.step_batches(step.local)
            start = time.perf_counter()
            loss = engine.train_step(step.global_, batches)
            times.append(time.perf_counter() - start)
    except Exception as error:  # the measurement is whether it runs at all
        row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0]}"
        row["where"] = traceback.extract_tb(error.__traceback__)[-1].filename.split("torch/")[-1]
        return row
    row.update(first_step_s=times[0], step_s=statistics.median(times[1:]), loss=float(loss))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("compile-benchmark.json"))
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    torch._functorch.config.donated_buffer = False  # (else a clearer error hides behind it)
    results: dict = {"machine": machine(), "load_start": load(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="hpctrain-compile-bench-") as scratch:
        for forces in (True, False):
            for backend in (None, "aot_eager", "inductor"):
                row = steps(backend, forces, args.steps, Path(scratch))
                results["runs"].append(row)
                what = row.get("error") or f"{1000 * row['step_s']:.1f} ms per step"
                log(f"{row['backend']:<9} forces={forces!s:<5}: {what}")
    results["load_end"] = load()
    write_results(args.out, results)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
