"""Wall time of the sections of a training step, for benchmarks; off by default.

``with timing.section("forward"): ...`` costs one attribute check while disabled.
When enabled (``timing.TIMER.enable(device)``), CUDA is synchronised at each
section boundary so that the times are those of the work, not of its launch.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator

import torch


class SectionTimer:
    def __init__(self) -> None:
        self.enabled = False
        self.device: torch.device | None = None
        self.totals: dict[str, float] = defaultdict(float)

    def enable(self, device: torch.device) -> None:
        self.enabled, self.device = True, device
        self.totals.clear()

    def disable(self) -> None:
        self.enabled = False

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - start


TIMER = SectionTimer()
section = TIMER.section
