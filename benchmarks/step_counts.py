"""Operator calls and host synchronisations per optimizer step, by batch size.

    python benchmarks/step_counts.py --data examples/rmd17_ethanol_100.xyz \
        --batch-sizes 8 32 --out counts.json

Each reference architecture (default hypers, float32, one process, CPU) trains
through its trainer's engine; after one warm-up step, one ``Engine.train_step`` is
counted with a ``TorchDispatchMode``: every ATen operator call (forward, double
backward, optimizer: on a GPU each is at least one kernel launch) and every call that
makes the host wait for the device, the CPU proxies of a sync: ``_local_scalar_dense``
(``.item()``, ``bool()``, ``int()``, ``float()`` of a tensor), data-dependent
shapes (``nonzero``, ``masked_select``, ``unique``...) and the read of the ranks'
agreement after the step (``StepAgreement.finish``, by design the step's one read
from the device, which a ``.tolist()`` makes without an operator call). The batch
is made before (training makes it ahead, in the loader): its operator calls are
reported apart (``loader_operator_calls``, on the CPU, none on a GPU). Per extra
structure in a batch is the difference between two batch sizes divided by the
difference of their sizes.
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ARCHITECTURES = ["mp_transformer", "soap_bpnn"]
SYNCS = {
    "aten::_local_scalar_dense",
    "aten::nonzero",
    "aten::nonzero_static",
    "aten::masked_select",
    "aten::unique",
    "aten::_unique2",
    "aten::unique_consecutive",
    "aten::unique_dim",
    "aten::repeat_interleave",
}


class Counter(TorchDispatchMode):
    """Counts the ATen operators dispatched while it is active."""

    def __init__(self):
        super().__init__()
        self.calls: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[func._schema.name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.calls.items() if name in SYNCS)


def count_calls(owner: object, method: str) -> list[int]:
    """Count the calls of ``owner.method`` from now on (in the returned list)."""
    calls = [0]
    original = getattr(owner, method)

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    setattr(owner, method, counted)
    return calls


def count_step(architecture: str, data: Path, stress: bool, batch_size: int) -> dict:
    """The operator calls and syncs of one training step (after one warm-up step)."""
    from hpctrain import run
    from hpctrain.architecture import resolve
    from hpctrain.config import parse
    from hpctrain.data import read_dataset
    from hpctrain.options import DatasetOptions

    options = parse(
        DatasetOptions,
        {
            "systems": {"read_from": str(data)},
            "targets": {"energy": {"forces": True, "stress": stress}},
        },
    )
    dataset = read_dataset(options, "training_set", str(data), torch.float32)
    arch = resolve(architecture, {}, {"batch_size": batch_size}, "step_counts")
    torch.manual_seed(0)
    model = arch.model_class(arch.model_hypers, dataset.info)
    trainer = arch.trainer_class(arch.training_hypers)
    with tempfile.TemporaryDirectory() as workdir, run.use(run.RunContext(seed=0)):
        validation = [dataset.subset(range(4))]
        engine = trainer.make_engine(model, torch.device("cpu"), [dataset], validation, workdir)
        engine.model.train()
        engine.sampler.set_epoch(0)
        steps = iter(engine.sampler)
        step = next(steps)
        engine.train_step(step.global_, engine.step_batches(step.local))  # warm-up
        step = next(steps)
        loader = Counter()
        with loader:
            batches = engine.step_batches(step.local)
        counter = Counter()
        reads = count_calls(engine.agreement, "finish")
        with counter:
            engine.train_step(step.global_, batches)
    return {
        "batch_size": len(step.global_),
        "operator_calls": sum(counter.calls.values()),
        "host_syncs": counter.syncs + reads[0],
        "agreement_reads": reads[0],
        "loader_operator_calls": sum(loader.calls.values()),
        "syncs_by_operator": {k: v for k, v in counter.calls.items() if k in SYNCS},
        "top_operators": dict(counter.calls.most_common(15)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--stress", action="store_true", help="train the stress too")
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[8, 32])
    parser.add_argument("--architectures", nargs="+", default=ARCHITECTURES)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    small, large = args.batch_sizes
    results = {}
    for architecture in args.architectures:
        counts = [count_step(architecture, args.data, args.stress, b) for b in (small, large)]
        a, b = counts
        extra = b["batch_size"] - a["batch_size"]
        results[architecture] = {
            "steps": counts,
            "operator_calls_per_structure": (b["operator_calls"] - a["operator_calls"]) / extra,
            "host_syncs_per_structure": (b["host_syncs"] - a["host_syncs"]) / extra,
            "operator_calls_fixed": a["operator_calls"]
            - a["batch_size"] * (b["operator_calls"] - a["operator_calls"]) / extra,
        }
    report = {
        "machine": {"node": platform.node(), "torch": torch.__version__},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "data": args.data.name,
        "stress": args.stress,
        "results": results,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(f"{'architecture':<16}{'batch':>6}{'op calls':>10}{'syncs':>7}")
    for architecture, r in results.items():
        for step in r["steps"]:
            print(
                f"{architecture:<16}{step['batch_size']:>6}{step['operator_calls']:>10}"
                f"{step['host_syncs']:>7}"
            )
        print(
            f"{architecture:<16}{'per structure':>6}{r['operator_calls_per_structure']:>10.1f}"
            f"{r['host_syncs_per_structure']:>7.2f}"
        )


if __name__ == "__main__":
    main()
