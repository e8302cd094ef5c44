"""Time from a stop signal to a committed checkpoint, and from a restart to training.

    python benchmarks/preemption.py OPTIONS.yaml RUN_DIR

Starts ``python -m hpctrain OPTIONS.yaml -o RUN_DIR``, sends SIGUSR2 a second into
training, and reports when the checkpoint it causes is committed and when the process
exits (status 75); then restarts with ``--continue auto`` and reports when training
resumes. Under SLURM, add the requeue delay of the cluster (``cred_expire``).
"""

import pathlib
import signal
import subprocess
import sys
import time

from hpctrain import checkpoint


def main() -> None:
    options, root = sys.argv[1], pathlib.Path(sys.argv[2])
    command = [sys.executable, "-m", "hpctrain", options, "-o", str(root)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not (root / "metrics.csv").exists():
        time.sleep(0.05)
    time.sleep(1.0)
    before = {p for _, p in checkpoint.committed_steps(root / "checkpoints")}
    start = time.monotonic()
    proc.send_signal(signal.SIGUSR2)
    while not {p for _, p in checkpoint.committed_steps(root / "checkpoints")} - before:
        time.sleep(0.005)
    committed = time.monotonic() - start
    proc.wait()
    exited = time.monotonic() - start
    print(f"signal -> committed checkpoint {committed:.3f} s; -> exit {exited:.3f} s")
    print(f"exit status {proc.returncode}")
    start = time.monotonic()
    proc = subprocess.Popen(
        command + ["--continue", "auto"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        if "resuming at step" in line:
            print(f"restart -> training resumed {time.monotonic() - start:.2f} s")
            break
    proc.kill()


if __name__ == "__main__":
    main()
