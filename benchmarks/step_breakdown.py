"""Where the time of a training step goes, for a reference architecture, on one process.

    python benchmarks/step_breakdown.py --architecture mp_transformer \
        --data examples/rmd17_ethanol_100.xyz --steps 60 --out breakdown.json

Trains in-process with the shared engine and ``hpctrain.timing`` enabled, then
reports the share of each section of a step: data (reading and collating the
batch), systems (metatomic Systems and neighbour lists), forward (energies, and
forces/stress by autograd), backward, agree (the per-step all-reduce of flags),
optimizer, and the rest. "Framework overhead" is everything but forward, backward
and optimizer; the target on CPU is under 5 % of the step.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from hpctrain import run, timing
from hpctrain.architecture import resolve
from hpctrain.config import parse
from hpctrain.data import read_dataset
from hpctrain.options import DatasetOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--architecture", default="mp_transformer")
    parser.add_argument("--data", type=Path, default=Path("examples/rmd17_ethanol_100.xyz"))
    parser.add_argument("--stress", action="store_true", help="learn the stress too")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    options = parse(
        DatasetOptions,
        {
            "systems": {"read_from": str(args.data)},
            "targets": {"energy": {"forces": True, "stress": args.stress}},
        },
    )
    dataset = read_dataset(options, "training_set", str(args.data), torch.float32)
    architecture = resolve(args.architecture, {}, {"batch_size": args.batch_size})
    run.set_current(run.RunContext(seed=0))
    torch.manual_seed(0)
    model = architecture.model_class(architecture.model_hypers, dataset.info)
    trainer = architecture.trainer_class(architecture.training_hypers)
    engine = trainer.engine_class(
        trainer.hypers,
        model,
        torch.device("cpu"),
        [dataset],
        [dataset.subset(range(4))],
        Path("."),
        save_checkpoint=lambda path: None,
    )
    order = engine.sampler
    order.set_epoch(0)
    batches = []
    while len(batches) < args.steps + 5:
        batches.extend(iter(order))
        order.set_epoch(order.epoch + 1)
    n_atoms = dataset.n_atoms
    for step in batches[:5]:  # warm-up
        engine.train_step(step.local, len(step.global_), int(n_atoms[step.global_].sum()))
    timing.TIMER.enable(torch.device("cpu"))
    start = time.perf_counter()
    for step in batches[5 : 5 + args.steps]:
        engine.train_step(step.local, len(step.global_), int(n_atoms[step.global_].sum()))
    total = time.perf_counter() - start
    sections = dict(timing.TIMER.totals)
    sections["other"] = total - sum(sections.values())
    model_time = sections.get("forward", 0) + sections.get("backward", 0) + sections["optimizer"]
    result = {
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "architecture": args.architecture,
        "data": str(args.data),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "step_s": total / args.steps,
        "structures_per_s": args.steps * args.batch_size / total,
        "fraction": {k: v / total for k, v in sorted(sections.items())},
        "framework_overhead": 1 - model_time / total,
        "framework_overhead_without_neighbour_lists": 1
        - (model_time + sections.get("systems", 0)) / total,
    }
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
