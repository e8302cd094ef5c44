"""The launch environment: launcher detection from variable tables, SLURM helpers,
threads and devices, and a real two-process gloo group.

Every table is a plain dict handed to the functions as ``environ``; no test starts
MPI in this process (mpi4py with fake PMI variables would wait for a process
manager), so MPI tables go only through ``launcher_of`` and ``rank_hint``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from hpctrain import launch
from hpctrain import threads as threads_module
from hpctrain.errors import HpctrainError, LaunchError
from hpctrain.launch import (
    LaunchEnv,
    backend_for,
    detect,
    device_for,
    expand_hostlist,
    expand_tasks_per_node,
    launcher_of,
    rank_hint,
    slurm_port,
)
from hpctrain.threads import threads_per_rank

ROOT = Path(__file__).resolve().parents[1]

# -- tables -------------------------------------------------------------------------------


def torchrun_table(rank: int, local_rank: int) -> dict[str, str]:
    """What torchrun gives rank ``rank`` of 4 ranks, 2 per node on 2 nodes."""
    return {
        "RANK": str(rank),
        "WORLD_SIZE": "4",
        "LOCAL_RANK": str(local_rank),
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node1",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "run-17",
        "GROUP_RANK": str(rank // 2),
    }


def srun_table(procid: int, localid: int, nodeid: int, **extra: str) -> dict[str, str]:
    """What ``srun -n4 --ntasks-per-node=2 -c8`` gives task ``procid`` (step 3 of
    job 81234), with a node list that resolves without DNS."""
    table = {
        "SLURM_JOB_ID": "81234",
        "SLURM_JOBID": "81234",
        "SLURM_STEP_ID": "3",
        "SLURM_STEPID": "3",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(localid),
        "SLURM_NODEID": str(nodeid),
        "SLURM_NTASKS": "4",
        "SLURM_NPROCS": "4",
        "SLURM_STEP_NUM_TASKS": "4",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_JOB_NODELIST": "localhost",
        "SLURM_STEP_TASKS_PER_NODE": "2(x2)",
        "SLURM_TASKS_PER_NODE": "2(x2)",
        "SLURM_CPUS_PER_TASK": "8",
    }
    table.update(extra)
    return table


# the environment of the batch shell of ``sbatch -n4``: it has SLURM_PROCID but no step
BATCH_SHELL = {
    "SLURM_JOB_ID": "81234",
    "SLURM_JOBID": "81234",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NTASKS": "4",
    "SLURM_NPROCS": "4",
    "SLURM_JOB_NODELIST": "gpu[01-02]",
    "SLURM_TASKS_PER_NODE": "2(x2)",
    "SLURM_CPUS_PER_TASK": "8",
}

MPICH_HYDRA = {"PMI_RANK": "2", "PMI_SIZE": "4", "PMI_FD": "7", "MPIR_CVAR_CH3_INTERFACE": ""}
OPEN_MPI = {
    "OMPI_COMM_WORLD_RANK": "1",
    "OMPI_COMM_WORLD_SIZE": "4",
    "OMPI_COMM_WORLD_LOCAL_RANK": "1",
    "OMPI_COMM_WORLD_LOCAL_SIZE": "2",
}
PMIX = {"PMIX_RANK": "3", "PMIX_NAMESPACE": "prterun-host-12345@1"}


# -- launcher_of / detect -------------------------------------------------------------------


def test_no_variables_is_a_single_process():
    assert launcher_of({}) == "single"
    env = detect({})
    assert env == LaunchEnv(launcher="single")
    assert (env.rank, env.world_size, env.local_rank, env.local_world_size) == (0, 1, 0, 1)
    assert env.is_main and not env.distributed
    assert env.cpus_per_task is None and env.job_id is None


def test_unrelated_variables_are_a_single_process():
    table = {"HOME": "/home/me", "PATH": "/usr/bin", "CUDA_VISIBLE_DEVICES": "0,1"}
    assert launcher_of(table) == "single"
    assert detect(table).launcher == "single"


@pytest.mark.parametrize("rank, local_rank", [(0, 0), (3, 1)], ids=["rank0-node0", "rank3-node1"])
def test_torchrun(rank, local_rank):
    table = torchrun_table(rank, local_rank)
    assert launcher_of(table) == "torchrun"
    env = detect(table)
    assert env == LaunchEnv(
        launcher="torchrun",
        rank=rank,
        world_size=4,
        local_rank=local_rank,
        local_world_size=2,
        master_addr="node1",
        master_port=29400,
        cpus_per_task=None,
        job_id="run-17",
    )
    assert env.is_main is (rank == 0)
    assert env.distributed


def test_torchrun_without_run_id_and_optional_variables():
    """RANK and WORLD_SIZE alone are torchrun's; the rest takes defaults."""
    table = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert launcher_of(table) == "torchrun"
    env = detect(table)
    assert (env.rank, env.world_size, env.local_rank) == (1, 2, 1)
    # without LOCAL_WORLD_SIZE all ranks are taken to be on one node
    assert env.local_world_size == 2
    assert (env.master_addr, env.master_port) == ("127.0.0.1", 29500)
    assert env.job_id is None


def test_rank_alone_is_not_torchrun():
    assert launcher_of({"RANK": "1"}) == "single"
    assert launcher_of({"WORLD_SIZE": "2"}) == "single"


def test_torchrun_missing_rank_is_a_launch_error():
    with pytest.raises(LaunchError, match="RANK"):
        detect({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})


@pytest.mark.parametrize(
    "procid, localid, nodeid", [(0, 0, 0), (3, 1, 1)], ids=["task0-node0", "task3-node1"]
)
def test_srun_step(procid, localid, nodeid):
    table = srun_table(procid, localid, nodeid)
    assert launcher_of(table) == "slurm"
    env = detect(table)
    assert env.launcher == "slurm"
    assert (env.rank, env.world_size) == (procid, 4)
    assert (env.local_rank, env.local_world_size) == (localid, 2)
    assert env.master_addr == "localhost"  # the first host of the step's node list
    assert env.master_port == slurm_port("81234", "3")
    assert env.cpus_per_task == 8
    assert env.job_id == "81234"
    assert env.is_main is (procid == 0) and env.distributed


def test_srun_step_master_addr_and_port_from_the_job_script():
    table = srun_table(
        2,
        0,
        1,
        SLURM_STEP_NODELIST="gpu[07-08]",
        SLURM_JOB_NODELIST="gpu[07-08]",
        MASTER_ADDR="10.0.0.7",
        MASTER_PORT="23456",
    )
    env = detect(table)
    assert (env.master_addr, env.master_port) == ("10.0.0.7", 23456)


def test_srun_step_uneven_tasks_per_node():
    """Node 1 of ``3,1`` runs one task; SLURM_TASKS_PER_NODE is used without a step's."""
    table = srun_table(3, 0, 1, SLURM_TASKS_PER_NODE="3,1")
    del table["SLURM_STEP_TASKS_PER_NODE"]
    env = detect(table)
    assert env.local_world_size == 1
    table = srun_table(1, 1, 0, SLURM_STEP_TASKS_PER_NODE="3,1")
    assert detect(table).local_world_size == 3


def test_srun_step_with_nprocs_only():
    table = srun_table(1, 1, 0)
    del table["SLURM_NTASKS"]
    assert detect(table).world_size == 4


def test_srun_single_task_needs_no_node_list():
    table = {
        "SLURM_JOB_ID": "5",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NTASKS": "1",
    }
    env = detect(table)
    assert env.launcher == "slurm"
    assert (env.world_size, env.master_addr, env.local_world_size) == (1, "127.0.0.1", 1)
    assert env.cpus_per_task is None
    assert not env.distributed


def test_srun_step_without_node_list_is_a_launch_error():
    table = srun_table(1, 1, 0)
    del table["SLURM_STEP_NODELIST"], table["SLURM_JOB_NODELIST"]
    with pytest.raises(LaunchError, match="NODELIST"):
        detect(table)


def test_srun_step_first_node_from_scontrol(monkeypatch):
    """A first node whose name does not resolve is looked up with scontrol."""

    def no_dns(host, *args, **kwargs):
        if host == "nid000123":
            raise socket.gaierror("no such host")
        raise AssertionError(f"unexpected lookup of {host}")

    calls = []

    def scontrol(args, **kwargs):
        calls.append(args)
        out = "NodeName=nid000123 Arch=x86_64 CoresPerSocket=64\n   NodeAddr=10.100.0.123 "
        return subprocess.CompletedProcess(args, 0, stdout=out + "NodeHostName=nid000123\n")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(subprocess, "run", scontrol)
    table = srun_table(1, 1, 0, SLURM_STEP_NODELIST="nid[000123-000124]")
    env = detect(table)
    assert env.master_addr == "10.100.0.123"
    assert calls == [["scontrol", "show", "node", "nid000123"]]


def test_srun_step_unresolvable_first_node_is_a_launch_error(monkeypatch):
    def no_dns(host, *args, **kwargs):
        raise socket.gaierror("no such host")

    def no_scontrol(args, **kwargs):
        raise FileNotFoundError("scontrol")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(subprocess, "run", no_scontrol)
    table = srun_table(1, 1, 0, SLURM_STEP_NODELIST="nid[000123-000124]")
    with pytest.raises(LaunchError, match="MASTER_ADDR") as error:
        detect(table)
    assert "nid000123" in str(error.value)


def test_sbatch_batch_shell_is_a_single_process():
    """The batch shell has SLURM_PROCID=0 and SLURM_NTASKS=4 but is not a task."""
    assert launcher_of(BATCH_SHELL) == "single"
    env = detect(BATCH_SHELL)
    assert env.launcher == "single"
    assert (env.rank, env.world_size, env.local_world_size) == (0, 1, 1)


@pytest.mark.parametrize(
    "step",
    [
        "4294967294",  # batch step, SLURM < 20.11
        "4294967291",  # batch step, SLURM >= 20.11
        "4294967292",  # extern step
        "batch",
        "extern",
    ],
)
def test_non_task_steps_are_a_single_process(step):
    table = dict(BATCH_SHELL, SLURM_STEP_ID=step, SLURM_STEPID=step)
    assert launcher_of(table) == "single"
    assert detect(table).world_size == 1


def test_salloc_interactive_step_is_a_single_process():
    # as printed in the shell of ``salloc -n4`` with LaunchParameters=use_interactive_step
    table = {
        "SLURM_JOB_ID": "1731344",
        "SLURM_STEP_ID": "4294967290",
        "SLURM_STEPID": "4294967290",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "SLURM_NTASKS": "4",
        "SLURM_STEP_NUM_TASKS": "1",
        "SLURM_STEP_TASKS_PER_NODE": "1",
        "SLURM_TASKS_PER_NODE": "4",
        "SLURM_STEP_NODELIST": "localhost",
        "SLURM_JOB_NODELIST": "localhost",
    }
    assert launcher_of(table) == "single"


@pytest.mark.parametrize(
    "table, rank",
    [(MPICH_HYDRA, 2), (OPEN_MPI, 1), (PMIX, 3), ({"MV2_COMM_WORLD_RANK": "5"}, 5)],
    ids=["mpich-hydra", "open-mpi", "pmix", "mvapich2"],
)
def test_mpi_launchers(table, rank):
    assert launcher_of(table) == "mpi"
    assert rank_hint(table) == rank


def test_mpi_wins_over_the_slurm_step_of_its_proxies():
    """mpiexec inside an allocation starts its proxies with srun: one per node, so
    SLURM_PROCID is the node, not the rank."""
    table = dict(srun_table(1, 0, 1, SLURM_NTASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)"))
    table.update(PMI_RANK="3", PMI_SIZE="4")
    assert launcher_of(table) == "mpi"
    assert rank_hint(table) == 3
    table = dict(srun_table(1, 0, 1), OMPI_COMM_WORLD_RANK="2")
    assert launcher_of(table) == "mpi"
    assert rank_hint(table) == 2


def test_torchrun_inside_srun():
    """One torchrun per node started by srun: torchrun's variables are the ranks."""
    table = dict(srun_table(1, 0, 1, SLURM_NTASKS="2", SLURM_STEP_TASKS_PER_NODE="1(x2)"))
    table.update(torchrun_table(3, 1))
    assert launcher_of(table) == "torchrun"
    env = detect(table)
    assert (env.launcher, env.rank, env.world_size, env.local_rank) == ("torchrun", 3, 4, 1)
    assert rank_hint(table) == 3


def test_torchrun_wins_over_mpi():
    table = dict(torchrun_table(3, 1), PMI_RANK="0", PMI_SIZE="1")
    assert launcher_of(table) == "torchrun"


# -- rank_hint ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, rank",
    [
        ({}, 0),
        (torchrun_table(0, 0), 0),
        (torchrun_table(3, 1), 3),
        (srun_table(0, 0, 0), 0),
        (srun_table(3, 1, 1), 3),
        (BATCH_SHELL, 0),
        (MPICH_HYDRA, 2),
        (OPEN_MPI, 1),
        (PMIX, 3),
    ],
    ids=[
        "single",
        "torchrun0",
        "torchrun3",
        "srun0",
        "srun3",
        "batch-shell",
        "mpich",
        "openmpi",
        "pmix",
    ],
)
def test_rank_hint(table, rank):
    assert rank_hint(table) == rank


def test_rank_hint_ignores_slurm_procid_outside_a_task():
    """SLURM_PROCID of a non-task step (or no step) is not a rank."""
    assert rank_hint(dict(BATCH_SHELL, SLURM_PROCID="2")) == 0
    table = dict(BATCH_SHELL, SLURM_PROCID="2", SLURM_STEP_ID="4294967294")
    assert rank_hint(table) == 0
    assert rank_hint(dict(BATCH_SHELL, SLURM_PROCID="2", SLURM_STEP_ID="0")) == 2


def test_rank_hint_and_detect_read_os_environ_by_default(monkeypatch):
    for key in list(os.environ):
        if key.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_", "MV2_", "TORCHELASTIC_")) or (
            key in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
        ):
            monkeypatch.delenv(key)
    assert rank_hint() == 0
    assert detect().launcher == "single"
    monkeypatch.setenv("RANK", "5")
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert rank_hint() == 5
    env = detect()
    assert (env.launcher, env.rank, env.world_size) == ("torchrun", 5, 8)


# -- invalid tables -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, words",
    [
        (srun_table(0, 0, 0, SLURM_PROCID="zero"), "SLURM_PROCID"),
        (srun_table(0, 0, 0, SLURM_LOCALID=""), "SLURM_LOCALID"),
        (srun_table(0, 0, 0, SLURM_NTASKS="four"), "SLURM_NTASKS"),
        (srun_table(4, 0, 1), "rank 4 is outside a world of 4"),
        (srun_table(0, 0, 0, SLURM_STEP_TASKS_PER_NODE="2(x2"), "tasks per node"),
        (dict(torchrun_table(0, 0), RANK="4"), "rank 4 is outside a world of 4"),
        (dict(torchrun_table(0, 0), RANK="-1"), "rank -1 is outside"),
        (dict(torchrun_table(0, 0), WORLD_SIZE="0", RANK="0"), "outside a world of 0"),
        (dict(torchrun_table(0, 0), WORLD_SIZE="four"), "WORLD_SIZE"),
        (dict(torchrun_table(0, 0), LOCAL_RANK="x"), "LOCAL_RANK"),
    ],
    ids=[
        "procid-not-int",
        "localid-empty",
        "ntasks-not-int",
        "slurm-rank-too-large",
        "bad-tasks-per-node",
        "torchrun-rank-too-large",
        "torchrun-negative-rank",
        "torchrun-empty-world",
        "world-size-not-int",
        "local-rank-not-int",
    ],
)
def test_invalid_tables_are_launch_errors(table, words):
    with pytest.raises(LaunchError, match=words):
        detect(table)


@pytest.mark.parametrize("key", ["MASTER_PORT", "LOCAL_WORLD_SIZE"])
def test_torchrun_non_integer_optional_variables_are_launch_errors(key):
    with pytest.raises(LaunchError, match=key):
        detect(dict(torchrun_table(0, 0), **{key: "abc"}))


@pytest.mark.parametrize(
    "extra",
    [{"SLURM_NODEID": "one"}, {"SLURM_NODEID": "2"}, {"MASTER_PORT": "abc"}],
    ids=["nodeid-not-int", "nodeid-beyond-tasks-per-node", "master-port-not-int"],
)
def test_slurm_inconsistent_optional_variables_are_launch_errors(extra):
    with pytest.raises(LaunchError):
        detect(srun_table(3, 1, 1, **extra))


def test_launch_error_is_an_hpctrain_error():
    assert issubclass(LaunchError, HpctrainError)


# -- SLURM helpers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("n[1-3]", ["n1", "n2", "n3"]),
        ("gpu[01-03,07],login1", ["gpu01", "gpu02", "gpu03", "gpu07", "login1"]),
        ("a-b[1-2]c", ["a-b1c", "a-b2c"]),
        ("login1", ["login1"]),
        ("localhost", ["localhost"]),
        ("node[8-10]", ["node8", "node9", "node10"]),
        ("nid[000998-001001]", ["nid000998", "nid000999", "nid001000", "nid001001"]),
        ("a[1],b[2-3],c", ["a1", "b2", "b3", "c"]),
        ("x1,x2", ["x1", "x2"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    assert expand_hostlist(hostlist) == hosts


@pytest.mark.parametrize(
    "value, counts",
    [
        ("2(x3),1", [2, 2, 2, 1]),
        ("4", [4]),
        ("1,2(x2)", [1, 2, 2]),
        ("16(x1)", [16]),
        (" 2(x2), 3", [2, 2, 3]),
    ],
)
def test_expand_tasks_per_node(value, counts):
    assert expand_tasks_per_node(value) == counts


@pytest.mark.parametrize("value", ["", "2(x)", "x2", "2(3)", "2(x2", "two", "2,,1", "-1"])
def test_expand_tasks_per_node_malformed(value):
    with pytest.raises(LaunchError, match="tasks per node"):
        expand_tasks_per_node(value)


def test_slurm_port():
    port = slurm_port("81234", "3")
    assert 15000 <= port <= 24999
    assert slurm_port("81234", "3") == port  # deterministic
    assert slurm_port("81235", "3") != port  # another job
    assert slurm_port("81234", "4") != port  # another step of the job
    # every step of a job below 100 gets its own port
    assert len({slurm_port("81234", str(step)) for step in range(100)}) == 100
    # a run of consecutive jobs gets distinct ports
    assert len({slurm_port(str(job), "0") for job in range(1000, 1300)}) == 300


@pytest.mark.parametrize(
    "job, step",
    [("0", "0"), ("99999999", "12"), ("1234_7", "0"), ("", ""), ("81234", "batch")],
)
def test_slurm_port_range(job, step):
    port = slurm_port(job, step)
    assert isinstance(port, int)
    assert 15000 <= port <= 24999


# -- threads, devices, backends -------------------------------------------------------------


@pytest.fixture
def cores(monkeypatch):
    """Pretend this process may use ``n`` of the machine's 64 cores."""

    def pretend(n: int, limit: float | None = None) -> None:
        monkeypatch.setattr(launch.os, "cpu_count", lambda: 64)
        monkeypatch.setattr(
            launch.os, "sched_getaffinity", lambda pid: set(range(n)), raising=False
        )
        monkeypatch.setattr(threads_module, "cgroup_cpu_limit", lambda: limit)

    return pretend


def test_threads_per_rank_explicit_request_wins(cores):
    cores(16)
    env = LaunchEnv(launcher="slurm", world_size=4, local_world_size=2, cpus_per_task=8)
    assert threads_per_rank(env, 3, {}) == threads_module.Threads(3, "distributed.threads_per_rank")
    assert threads_per_rank(env, None, {}).count == 8
    overridden = threads_per_rank(env, 3, {"OMP_NUM_THREADS": "4"})
    assert overridden.count == 3
    assert overridden.warning == "distributed.threads_per_rank 3 overrides OMP_NUM_THREADS=4"


def test_threads_per_rank_respects_omp_num_threads(cores):
    cores(16)
    env = LaunchEnv(launcher="slurm", world_size=4, local_world_size=2, cpus_per_task=8)
    assert threads_per_rank(env, None, {"OMP_NUM_THREADS": "3"}) == threads_module.Threads(
        3, "OMP_NUM_THREADS"
    )
    # a value that is no count is ignored, as OpenMP ignores it
    assert threads_per_rank(env, None, {"OMP_NUM_THREADS": "three"}).count == 8


@pytest.mark.parametrize("requested, omp", [(32, None), (None, "32")])
def test_threads_never_exceed_the_cores_this_process_may_use(cores, requested, omp):
    cores(64, limit=4.5)  # a cgroup quota of 4.5 CPUs
    env = LaunchEnv(launcher="mpi", world_size=2, local_world_size=2)
    threads = threads_per_rank(env, requested, {"OMP_NUM_THREADS": omp} if omp else {})
    assert threads.count == 4 and threads.source == "4 usable cores"
    assert "asks for 32 threads but this process may use 4 cores" in threads.warning


def test_usable_cores_follow_affinity_and_cgroup_quota(cores, tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert threads_module.cgroup_cpu_limit(str(tmp_path)) == 2.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads_module.cgroup_cpu_limit(str(tmp_path)) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads_module.cgroup_cpu_limit(str(tmp_path)) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads_module.cgroup_cpu_limit(str(tmp_path)) is None
    assert threads_module.cgroup_cpu_limit(str(tmp_path / "none")) is None
    cores(8, limit=2.5)
    assert threads_module.usable_cores() == 2
    cores(8, limit=None)
    assert threads_module.usable_cores() == 8


def test_threads_per_rank_from_slurm_cpus_per_task(cores):
    cores(16)
    env = detect(srun_table(3, 1, 1, SLURM_CPUS_PER_TASK="6"))
    assert env.cpus_per_task == 6
    assert threads_per_rank(env, None, {}).count == 6
    # a value SLURM did not write as a count is ignored
    env = detect(srun_table(3, 1, 1, SLURM_CPUS_PER_TASK="6x"))
    assert env.cpus_per_task is None


@pytest.mark.parametrize(
    "n_cores, local_world_size, threads", [(8, 1, 8), (8, 2, 4), (8, 3, 2), (8, 16, 1), (1, 4, 1)]
)
def test_threads_per_rank_from_cores(cores, n_cores, local_world_size, threads):
    cores(n_cores)
    env = LaunchEnv(launcher="torchrun", world_size=16, local_world_size=local_world_size)
    assert threads_per_rank(env, None, {}).count == threads


def test_device_for_cpu():
    env = LaunchEnv(launcher="torchrun", rank=3, world_size=4, local_rank=1, local_world_size=2)
    assert device_for(env, "cpu") == torch.device("cpu")


def test_device_for_cuda_without_gpu_is_a_launch_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    env = LaunchEnv(launcher="torchrun", rank=3, world_size=4, local_rank=1, local_world_size=2)
    with pytest.raises(LaunchError, match="rank 3.*no GPU"):
        device_for(env, "cuda")


def test_device_for_cuda_by_local_rank(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    env = LaunchEnv(launcher="slurm", rank=6, world_size=8, local_rank=2, local_world_size=4)
    assert device_for(env, "cuda") == torch.device("cuda", 2)
    # one GPU bound per task: every rank sees its own as cuda:0, without a warning
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert device_for(env, "cuda") == torch.device("cuda", 0)


def test_device_for_more_ranks_than_gpus_warns(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    env = LaunchEnv(launcher="slurm", rank=3, world_size=4, local_rank=3, local_world_size=4)
    with pytest.warns(UserWarning, match="4 ranks share 2 GPUs"):
        assert device_for(env, "cuda") == torch.device("cuda", 1)


@pytest.mark.parametrize(
    "device_type, requested, backend",
    [
        ("cpu", "auto", "gloo"),
        ("cuda", "auto", "nccl"),
        ("cuda", "nccl", "nccl"),
        ("cuda", "gloo", "gloo"),
        ("cpu", "gloo", "gloo"),
    ],
)
def test_backend_for(device_type, requested, backend):
    assert backend_for(device_type, requested) == backend


def test_backend_for_default_is_auto():
    assert backend_for("cpu") == "gloo"
    assert backend_for("cuda") == "nccl"


def test_backend_nccl_on_cpu_is_a_launch_error():
    with pytest.raises(LaunchError, match="nccl.*gloo"):
        backend_for("cpu", "nccl")


# -- process group --------------------------------------------------------------------------


def test_single_process_group_and_collectives_do_nothing():
    env = LaunchEnv(launcher="single")
    with launch.ProcessGroup(env, "gloo", 5.0) as group:
        assert group.env is env and group.backend == "gloo"
        assert not torch.distributed.is_initialized()
        assert not launch.is_distributed()
        payload = {"seed": 7}
        assert launch.broadcast_object(payload) is payload
        assert launch.all_gather_object(3) == [3]
        tensor = torch.tensor([1.0, 2.0])
        assert launch.all_reduce_sum(tensor) is tensor
        assert tensor.tolist() == [1.0, 2.0]
        launch.barrier()
    assert not torch.distributed.is_initialized()


WORKER = textwrap.dedent(
    """
    import json, sys

    import torch
    import torch.distributed as dist

    from hpctrain import launch

    rank, port = int(sys.argv[1]), int(sys.argv[2])
    env = launch.LaunchEnv(
        launcher="torchrun", rank=rank, world_size=2, local_rank=rank, local_world_size=2,
        master_addr="127.0.0.1", master_port=port,
    )
    out = {}
    with launch.ProcessGroup(env, "gloo", 30.0) as group:
        out["initialized"] = dist.is_initialized()
        out["distributed"] = launch.is_distributed()
        out["world"] = dist.get_world_size()
        out["rank"] = dist.get_rank()
        out["backend"] = str(dist.get_backend())
        out["seed"] = launch.broadcast_object({"seed": 1234} if rank == 0 else None)
        out["from_1"] = launch.broadcast_object(f"hello from {rank}", src=1)
        tensor = torch.tensor([rank + 1.0, 10.0 * rank])
        result = launch.all_reduce_sum(tensor)
        out["sum"] = tensor.tolist()
        out["in_place"] = result is tensor
        out["gathered"] = launch.all_gather_object(rank * 100)
        # a group made while one exists does not own it, and leaves it alone
        launch.ProcessGroup(env, "gloo", 30.0).close()
        out["still_initialized"] = dist.is_initialized()
        launch.barrier()
    out["after_close"] = dist.is_initialized()
    group.close()  # closing twice is harmless
    print("RESULT " + json.dumps(out), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_group(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "PMI_", "OMPI_", "PMIX_", "MV2_", "TORCHELASTIC_"))
        and k not in {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(rank), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    results = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=60)
            assert proc.returncode == 0, stderr[-3000:]
            lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
            assert lines, stdout + stderr
            results.append(json.loads(lines[-1][len("RESULT ") :]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, out in enumerate(results):
        assert out["initialized"] and out["distributed"]
        assert (out["world"], out["rank"], out["backend"]) == (2, rank, "gloo")
        assert out["seed"] == {"seed": 1234}
        assert out["from_1"] == "hello from 1"
        assert out["sum"] == [3.0, 10.0]
        assert out["in_place"] is True
        assert out["gathered"] == [0, 100]
        assert out["still_initialized"] is True
        assert out["after_close"] is False


def test_srun_with_an_mpi_plugin_is_a_slurm_task():
    """`srun --mpi=pmi2` also sets PMI variables; numbering that agrees with SLURM's
    means a plain srun task, not an mpiexec rank."""
    table = {
        "SLURM_JOB_ID": "77",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "1",
        "SLURM_LOCALID": "1",
        "SLURM_NTASKS": "2",
        "PMI_RANK": "1",
        "PMI_SIZE": "2",
    }
    assert launch.launcher_of(table) == "slurm"
    # mpiexec (hydra) inside an allocation: proxies are srun tasks numbered by node
    hydra = {**table, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "PMI_RANK": "3", "PMI_SIZE": "4"}
    assert launch.launcher_of(hydra) == "mpi"


def test_threads_of_a_bound_srun_task_are_its_own_cores(cores):
    cores(8)
    bound = launch.LaunchEnv(launcher="slurm", world_size=8, local_world_size=8, rank=0)
    assert threads_per_rank(bound, None, {}).count == 8
    # torchrun processes share their task's cores
    shared = launch.LaunchEnv(launcher="torchrun", world_size=4, local_world_size=4, rank=0)
    assert threads_per_rank(shared, None, {}).count == 2


def test_a_fresh_launch_leaves_out_what_launchers_set():
    environ = {
        "PATH": "/bin",
        "SLURM_CONF": "/etc/slurm.conf",
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "1",
        "PMI_RANK": "1",
        "OMPI_COMM_WORLD_RANK": "1",
        "TORCHELASTIC_RUN_ID": "x",
        "RANK": "1",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_PORT": "29500",
    }
    assert launch.without_launcher(environ) == {"PATH": "/bin", "SLURM_CONF": "/etc/slurm.conf"}
    inside = launch.without_launcher(environ, keep_slurm_allocation=True)
    assert inside == {
        "PATH": "/bin",
        "SLURM_CONF": "/etc/slurm.conf",
        "SLURM_JOB_ID": "7",
        "SLURM_PROCID": "1",
    }
