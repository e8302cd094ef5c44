"""Writes step checkpoints back to back, the way the engine does, until killed.

    python checkpoint_writer.py ROOT LOG

Continues after the newest committed checkpoint under ROOT. Each checkpoint's
shared part holds a tensor filled with its step and its rank part the step, so a
reader can tell a checkpoint mixed from two writes. LOG gets "ready" once the
imports are done, then "durable N" each time checkpoint N is known to be
committed on disk (what a run may rely on after a kill).
"""

import json
import sys
import time
from pathlib import Path

import torch

from hpctrain import checkpoint

root, log_path = Path(sys.argv[1]), Path(sys.argv[2])
manager = checkpoint.CheckpointManager(root, 0, 1, 2, True, lambda: None)
latest = checkpoint.latest(root)
step = json.loads((latest / checkpoint.COMMITTED).read_text())["step"] + 1 if latest else 1
with log_path.open("a", buffering=1) as log:
    log.write("ready\n")
    while True:
        weights = torch.full((2_000_000,), float(step))

        def write_shared(path: Path, weights=weights, step=step) -> None:
            checkpoint.save({"architecture": "writer", "step": step, "weights": weights}, path)

        # a validation loss that goes up and down, so that "keep the best" matters
        info = {"validation_loss": float((step * 7919) % 13)}
        manager.start(step, write_shared, {"step": step}, info)
        while not manager.flushed():  # the engine trains on meanwhile
            time.sleep(0.001)
        manager.commit()
        if step % 3 == 0:
            manager.wait()
            log.write(f"durable {step}\n")
        step += 1
