"""Where a training step's time goes on its device: a profile of a few steps.

    python benchmarks/step_profile.py --device cuda --data emt.xyz --batch-size 64 \\
        --out profile.json --trace trace.json                 # on a GPU node, ~1 min
    python benchmarks/step_profile.py --quick --out /tmp/profile.json    # CPU smoke test

A reference architecture (default hypers, float32, seed 0) trains through
``Engine.train_step`` fed by the engine's own loader (its default threads for the
device), as ``hpctrain train`` runs it. After warm-up steps, ``torch.profiler`` records
``--steps`` steps and the script reports:

- the wall time per step and structures/s;
- ATen events per step (nested calls counted, unlike ``step_counts.py``), and on
  CUDA the kernels launched per step;
- on CUDA, the device's busy time (kernels) against the wall time, and the idle gaps
  between consecutive kernels: their total, how many are longer than 50 µs and the
  longest ones with the kernels around them: the host-bound parts of the step;
- the operators with the most time of their own (host, and device on CUDA).

``--trace`` also writes the Chrome/Perfetto trace to read it in detail.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from data import load, log, machine, open_dataset, training_engine, write_results  # noqa: E402

LONG_GAP_US = 50.0


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profiled_steps(engine, steps: int, warmup: int, activities: list) -> tuple[profile, float]:
    """Run ``warmup`` steps, then profile ``steps`` more; returns the profile and wall s."""
    plan = [engine.micro_batches(s.local) for s in engine.sampler.plan()]
    if len(plan) < steps + warmup:
        raise SystemExit(f"the data has {len(plan)} steps per epoch; need {steps + warmup}")
    prepared = engine.loader.batches(plan[: steps + warmup])
    schedule = iter(engine.sampler)
    try:
        for _ in range(warmup):
            engine.train_step(next(schedule).global_, next(prepared))
        synchronize(engine.device)
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                with record_function("train_step"):
                    engine.train_step(next(schedule).global_, next(prepared))
            synchronize(engine.device)
            wall = time.perf_counter() - start
    finally:
        prepared.close()
    return prof, wall


def top_operators(prof: profile, key: str, steps: int, top: int = 15) -> list[dict]:
    rows = []
    for e in prof.key_averages():
        own = getattr(e, key, 0.0)
        if own > 0 and e.key != "train_step":
            row = {"name": e.key, "calls_per_step": e.count / steps, "us_per_step": own / steps}
            rows.append(row)
    rows.sort(key=lambda r: -r["us_per_step"])
    return rows[:top]


def device_timeline(prof: profile, steps: int, wall_s: float) -> dict:
    """Busy time and idle gaps of the device, from its kernels in start order."""
    kernels = sorted(
        (e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    if not kernels:
        return {"kernels_per_step": 0}
    busy, gaps, end, previous = 0.0, [], kernels[0].time_range.start, kernels[0].name
    for k in kernels:
        start, stop = k.time_range.start, k.time_range.end
        if start > end:
            gaps.append({"us": start - end, "after": previous, "before": k.name})
        busy += max(0.0, stop - max(start, end))
        if stop > end:
            end, previous = stop, k.name
    gaps.sort(key=lambda g: -g["us"])
    wall_us = 1e6 * wall_s
    return {
        "kernels_per_step": len(kernels) / steps,
        "busy_share": busy / wall_us,
        "gap_us_per_step": sum(g["us"] for g in gaps) / steps,
        "long_gaps_per_step": sum(g["us"] > LONG_GAP_US for g in gaps) / steps,
        "longest_gaps": gaps[:10],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT / "examples" / "rmd17_ethanol_100.xyz")
    parser.add_argument("--architecture", default="mp_transformer")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--stress", action="store_true", help="learn the stress too")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="2 steps at batch 4")
    parser.add_argument("--trace", type=Path, help="also write the Chrome trace here")
    parser.add_argument("--out", type=Path, default=Path("step-profile.json"))
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.batch_size = 2, 1, 4
    device = torch.device(args.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    dataset = open_dataset(args.data, args.stress)
    with tempfile.TemporaryDirectory(prefix="hpctrain-step-profile-") as scratch:
        training = {"batch_size": args.batch_size}
        engine = training_engine(dataset, training, device, Path(scratch), args.architecture)
        prof, wall = profiled_steps(engine, args.steps, args.warmup, activities)
    aten = sum(e.count for e in prof.key_averages() if e.key.startswith("aten::"))
    results = {
        "machine": machine(),
        "load": load(),
        "settings": {
            "data": args.data.name,
            "architecture": args.architecture,
            "device": str(device),
            "batch_size": args.batch_size,
            "steps": args.steps,
            "warmup": args.warmup,
            "loader_threads": engine.workers,
        },
        "step_s": wall / args.steps,
        "structures_per_s": args.batch_size * args.steps / wall,
        "aten_events_per_step": aten / args.steps,
        "top_host": top_operators(prof, "self_cpu_time_total", args.steps),
    }
    if device.type == "cuda":
        results["device"] = device_timeline(prof, args.steps, wall)
        results["top_device"] = top_operators(prof, "self_device_time_total", args.steps)
    if args.trace:
        prof.export_chrome_trace(str(args.trace))
    write_results(args.out, results)
    log(
        f"{args.architecture} on {device}, batch {args.batch_size}: "
        f"{1000 * results['step_s']:.1f} ms per step, {results['structures_per_s']:.0f} "
        f"structures/s, {results['aten_events_per_step']:.0f} ATen events per step"
    )
    if "device" in results:
        d = results["device"]
        log(
            f"device busy {100 * d['busy_share']:.0f}% of the wall time, "
            f"{d['kernels_per_step']:.0f} kernels and {d['gap_us_per_step']:.0f} us of gaps "
            f"per step ({d['long_gaps_per_step']:.1f} gaps > {LONG_GAP_US:.0f} us)"
        )
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
