"""``python -m hpctrain`` that also records which training structures each rank
gets at each step: one JSON line ``{"epoch": e, "local": [...]}`` per step, in
``$SAMPLE_TRACE_DIR/rank-R-PID.jsonl``, written before the step is trained."""

import json
import os
import sys
from pathlib import Path

from hpctrain import cli
from hpctrain.data.sampler import DistributedBatchSampler

iterate = DistributedBatchSampler.__iter__


def traced(self):
    path = Path(os.environ["SAMPLE_TRACE_DIR"]) / f"rank-{self.rank}-{os.getpid()}.jsonl"
    with path.open("a", buffering=1) as trace:
        for step in iterate(self):
            trace.write(json.dumps({"epoch": self.epoch, "local": step.local.tolist()}) + "\n")
            yield step


DistributedBatchSampler.__iter__ = traced
sys.exit(cli.main(sys.argv[1:]))
