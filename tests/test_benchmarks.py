"""The scaling benchmark and the GPU check script in their tiny CPU modes, with real
launchers (mpiexec, torchrun) and real training steps; and the section timer."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from conftest import BIN, ROOT, clean_env

from hpctrain import timing

SCALING = ROOT / "benchmarks" / "scaling.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_timer_is_a_shared_no_op_until_enabled():
    timer = timing.SectionTimer()
    assert timer.section("forward") is timer.section("backward")  # nothing allocated
    with timer.section("forward"):
        time.sleep(0.01)
    assert timer.snapshot() == {}
    timer.enable(torch.device("cpu"))
    try:
        with timer.section("forward"):
            time.sleep(0.02)
        with timer.section("forward"):
            pass
    finally:
        timer.disable()
    with timer.section("forward"):
        time.sleep(0.02)
    totals = timer.snapshot()
    assert set(totals) == {"forward"}
    assert 0.02 <= totals["forward"] < 10  # one 0.02 s section, however busy the machine
    assert not timer.attach(torch.nn.Linear(2, 2))  # no DDP module: no hook


@pytest.mark.parametrize(
    "args, message",
    [
        (["--ranks", "0"], "--ranks must be positive"),
        (["--mode", "strong", "--ranks", "1", "8", "--batch-size", "4"], "at least one"),
        (["--data", "missing.xyz"], "missing.xyz does not exist"),
        (["--architectures", "nope"], "unknown architecture 'nope'"),
    ],
)
def test_scaling_rejects_bad_arguments(tmp_path, args, message):
    result = subprocess.run(
        [sys.executable, str(SCALING), "--out", str(tmp_path / "s.json"), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert not (tmp_path / "s.json").exists()


def _check_run_breakdown(entry: dict, ranks: int) -> None:
    summary = entry["summary"]
    parts = summary["breakdown_s"]
    per_rank = summary["per_rank_breakdown_s"]
    mean_step = sum(r["step_s"] for r in per_rank) / len(per_rank)
    assert sum(parts.values()) == pytest.approx(mean_step, rel=1e-6)
    assert mean_step == pytest.approx(summary["step_s"], rel=0.1)  # ranks meet every step
    assert all(v >= 0 for v in parts.values()), parts
    # the timed sections cover the step: the untimed rest is small
    assert parts["other"] < 0.25 * mean_step, parts
    for part in ("data", "forward", "backward", "optimizer"):
        assert parts[part] > 0, part
    assert parts["checkpoint"] > 0  # --checkpoint-every 2
    assert len(entry["ranks"]) == ranks
    assert sorted(r["rank"] for r in entry["ranks"]) == list(range(ranks))
    assert all(r["threads"] == 1 for r in entry["ranks"])
    assert all(len(r["step_times_s"]) == entry["steps"] for r in entry["ranks"])
    if ranks > 1:
        assert entry["backend"] == "gloo" and entry["comm_hook"]
        assert summary["allreduce_buckets_per_step"] >= 1
        assert summary["allreduce_bytes_per_step"] >= 4 * entry["parameters"]
        assert parts["allreduce"] > 0
        assert 0 < summary["allreduce_busy_s"] < mean_step
        assert 0 < summary["allreduce_alone_s"] < mean_step
    else:
        assert not entry["comm_hook"] and parts["allreduce"] == 0


@pytest.mark.slow
@pytest.mark.mpi
def test_scaling_quick_with_mpiexec(tmp_path):
    if not (BIN / "mpiexec").exists():
        pytest.skip("no mpiexec beside python")
    out = tmp_path / "scaling.json"
    command = [
        sys.executable,
        str(SCALING),
        "--quick",
        "--architectures",
        "mp_transformer",
        "--ranks",
        "1",
        "2",
        "--launcher",
        "mpiexec",
        "--checkpoint-every",
        "2",
        "--independent",
        "--workdir",
        str(tmp_path / "work"),
        "--out",
        str(out),
    ]
    result = subprocess.run(
        command, cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "mp_transformer weak" in result.stdout  # the table
    data = json.loads(out.read_text())
    machine = data["machine"]
    for key in ("hostname", "cpu_model", "cores_available", "torch", "cuda_devices"):
        assert key in machine
    assert machine["torch"] == torch.__version__
    assert data["launcher"] == "mpiexec" and "--quick" in data["command"]
    assert len(data["load_average_before"]) == len(data["load_average_after"]) == 3
    assert data["settings"]["dataset"]["n_structures"] == 24

    results = {(r["mode"], r["ranks"]): r for r in data["results"]}
    assert set(results) == {("weak", 1), ("weak", 2), ("strong", 1), ("strong", 2)}
    assert results["weak", 2]["global_batch"] == 8 and results["strong", 2]["global_batch"] == 4
    for (mode, ranks), r in results.items():
        # a ratio of times measured at different moments: bounded only by the formula below
        assert 0 < r["efficiency"] < float("inf"), (mode, ranks, r["efficiency"])
        if ranks == 1:
            assert r["efficiency"] == 1.0
        assert r["structures_per_s"] > 0
        assert r["atoms_per_s"] == pytest.approx(8 * r["structures_per_s"])  # 8 atoms each
        assert sum(r["breakdown_fraction"].values()) == pytest.approx(1.0, abs=1e-6)
        assert r["cpu_efficiency"] > 0 and 0 < r["cpu_utilisation"] <= 1.05
    # the formulas: strong from the time per step, weak from the throughput
    s1, s2 = results["strong", 1], results["strong", 2]
    assert s2["efficiency"] == pytest.approx(s1["step_s"] / (2 * s2["step_s"]))
    w1, w2 = results["weak", 1], results["weak", 2]
    assert w2["efficiency"] == pytest.approx(w2["structures_per_s"] / (2 * w1["structures_per_s"]))

    # --independent: two one-rank copies at once, the machine's ceiling for weak scaling
    (copies,) = [r for r in data["runs"] if r.get("independent")]
    assert copies["copies"] == 2 and copies["world_size"] == 1 and not copies["comm_hook"]
    assert [r["rank"] for r in copies["ranks"]] == [0, 1]
    (alone,) = [r for r in data["runs"] if r["world_size"] == 1 and not r.get("independent")]
    assert copies["structures"] == 2 * alone["structures"]  # each copy: the same steps
    together = copies["summary"]["structures_per_s"]
    assert w2["independent_structures_per_s"] == together
    assert w2["machine_efficiency"] == pytest.approx(together / (2 * w1["structures_per_s"]))
    assert w2["framework_efficiency"] == pytest.approx(w2["efficiency"] / w2["machine_efficiency"])
    assert "machine_efficiency" not in s2 and "machine_efficiency" not in w1

    together_with_ddp = [r for r in data["runs"] if not r.get("independent")]
    assert len(together_with_ddp) == 3  # the one-rank run serves both modes
    runs = {r["world_size"]: r for r in together_with_ddp}
    for entry in together_with_ddp:
        _check_run_breakdown(entry, entry["world_size"])
        assert entry["launcher"] == "mpi"
    assert runs[2]["ranks"][0]["local_atoms"] > 0

    assert "/" + tmp_path.name not in out.read_text()  # no machine paths in results
    png = out.with_suffix(".png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


@pytest.mark.slow
def test_gpu_script_cpu_quick_mode(tmp_path):
    out = tmp_path / "out"
    env = clean_env(DEVICE="cpu", QUICK="1", PYTHON=sys.executable)
    env["PATH"] = f"{BIN}{os.pathsep}{env['PATH']}"
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((out / "gpu.json").read_text())
    assert summary["failed"] == [] and summary["device"] == "cpu" and summary["ranks"] == 2
    rows = summary["scaling"]
    assert {r["architecture"] for r in rows} == {"mp_transformer", "soap_bpnn"}
    for row in rows:
        assert row["ranks"] == 2 and row["backend"] == "gloo"
        assert row["structures_per_s"] > 0
        assert sum(row["breakdown_fraction"].values()) == pytest.approx(1.0, abs=1e-6)
    assert summary["amp_run"]["ok"] and summary["amp_run"]["model_pt"]
    assert summary["amp_run"]["test_metrics"]


def test_step_counts_counts_operators_and_syncs(tmp_path):
    """The counter sees every operator call and every host-sync proxy of a step."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_counts
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    counter = step_counts.Counter()
    x = torch.ones(3)
    with counter:
        y = (x * 2).sum()
        y.item()
        torch.nonzero(x)
    assert counter.calls["aten::mul"] == 1 and counter.calls["aten::sum"] == 1
    assert counter.syncs == 2  # .item() and nonzero
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "step_counts.py"), "--data"]
        + [str(ROOT / "examples" / "rmd17_ethanol_100.xyz"), "--batch-sizes", "2", "4"]
        + ["--architectures", "mp_transformer", "--out", str(tmp_path / "c.json")],
        env=clean_env(PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "c.json").read_text())["results"]["mp_transformer"]
    small, large = data["steps"]
    assert (small["batch_size"], large["batch_size"]) == (2, 4)
    assert small["operator_calls"] > 1000
    assert (
        data["operator_calls_per_structure"]
        == (large["operator_calls"] - small["operator_calls"]) / 2
    )
    # the batch is made apart (gathered as arrays: its few torch calls do not grow
    # with it either)...
    assert large["loader_operator_calls"] == small["loader_operator_calls"] > 0
    # ...the step's calls do not grow, and the host reads the device once (the agreement)
    assert large["operator_calls"] == small["operator_calls"]
    assert small["host_syncs"] == large["host_syncs"] == small["agreement_reads"] == 1


def run_benchmark(script: str, *args: str, timeout: int = 300) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        env=clean_env(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_loader_benchmark_quick(tmp_path):
    """Every batch of an epoch is made at each thread count, and the shares add up."""
    out = tmp_path / "loader.json"
    run_benchmark("loader.py", "--quick", "--workers", "0", "2", "--out", str(out))
    data = json.loads(out.read_text())
    assert [(r["pairs"], r["workers"]) for r in data["rate"]] == [
        ("searched", 0),
        ("searched", 2),
        ("stored", 0),
        ("stored", 2),
    ]
    assert data["requests"] == [{"cutoff": 5.0, "full_list": True}]
    for row in data["rate"]:
        assert row["n_structures"] == 64 and row["structures_per_s"] > 0
        assert row["pairs_per_structure"] > 100  # 32 atoms within 5 Å of each other
    # the same pairs, searched or read
    assert len({r["pairs_per_structure"] for r in data["rate"]}) == 1
    for parts in data["breakdown"].values():
        assert parts["neighbor_lists_us"] > 0 and parts["read_us"] > 0
        assert parts["total_us"] == pytest.approx(
            parts["read_us"]
            + parts["neighbor_lists_us"]
            + parts["collate_without_neighbor_lists_us"]
        )
    assert [(r["pairs"], r["workers"]) for r in data["training"]] == [
        ("searched", 0),
        ("searched", 2),
        ("stored", 0),
        ("stored", 2),
    ]
    for row in data["training"]:
        assert 0 <= row["data_share"] < 1 and row["step_s"] > 0
    assert data["verdicts"]["best_structures_per_s"] == max(
        r["structures_per_s"] for r in data["rate"]
    )


def test_step_profile_quick(tmp_path):
    out, trace = tmp_path / "profile.json", tmp_path / "trace.json"
    run_benchmark(
        "step_profile.py", "--quick", "--device", "cpu", "--out", str(out), "--trace", str(trace)
    )
    data = json.loads(out.read_text())
    assert data["settings"]["batch_size"] == 4 and data["settings"]["steps"] == 2
    assert data["structures_per_s"] == pytest.approx(4 / data["step_s"])
    assert data["aten_events_per_step"] > 1000 and "device" not in data  # CPU: no kernels
    names = [row["name"] for row in data["top_host"]]
    assert "aten::mm" in names or "aten::addmm" in names
    assert json.loads(trace.read_text())["traceEvents"]


@pytest.mark.slow
def test_atom_budget_benchmark_quick(tmp_path):
    out = tmp_path / "budget.json"
    run_benchmark("atom_budget.py", "--quick", "--out", str(out))
    data = json.loads(out.read_text())
    budget, runs = data["budget"], data["runs"]
    assert budget == round(8 * data["mean_atoms"])
    by_count, by_atoms = runs["batch_size"]["steps"], runs["max_atoms_per_batch"]["steps"]
    assert all(step["structures"] == 8 for step in by_count[:-1])
    assert all(step["atoms"] <= budget for step in by_atoms)  # one rank: no merged tail
    # the atom budget evens out the atoms per step that a structure count leaves uneven
    spread = {
        k: max(s["atoms"] for s in v) - min(s["atoms"] for s in v[:-1])
        for k, v in (("count", by_count), ("atoms", by_atoms))
    }
    assert spread["atoms"] < spread["count"]
    for batching in ("batch_size", "max_atoms_per_batch"):
        for world in ("2", "4", "8"):
            ratio = data["rank_imbalance"][batching][world]
            assert 1.0 <= ratio["mean"] <= ratio["worst"]


@pytest.mark.slow
def test_finetune_benchmark_quick(tmp_path):
    """A pretraining, then one run from scratch and one LoRA fine-tuning, each scored
    on both test sets; the fine-tuned model starts from the pretrained one."""
    out = tmp_path / "finetune.json"
    run_benchmark(
        "finetune.py",
        *("--pretrain-epochs", "1", "--epochs", "1", "--n-small", "20", "--threads", "1"),
        *("--runs", "scratch", "lora, refit", "--workdir", str(tmp_path / "w"), "--out", str(out)),
    )
    results = json.loads(out.read_text())["results"]
    assert list(results) == [
        "pretrained, not fine-tuned",
        "20 ethanol: scratch",
        "20 ethanol: lora, refit",
    ]
    for row in results.values():
        for data in ("ethanol", "aspirin"):
            assert row[data]["forces_rmse_ev_per_a"] > 0
    log = (tmp_path / "w" / "20-lora-refit" / "run" / "train.log").read_text()
    assert "(method lora, rank 4): 13,312 parameters train" in log
