"""Wall time of the sections of a training step, for benchmarks; off by default.

``with timing.section("forward"): ...`` costs one attribute check while disabled (it
returns a shared no-op context manager). A benchmark turns timing on with
``timing.TIMER.enable(device)`` after its warm-up steps; nothing in a training run
enables it. When enabled, CUDA is synchronised at each section boundary so that the
times are those of the work, not of its launch.

Gradient all-reduce. DistributedDataParallel all-reduces gradient buckets while
backward is still running, so its cost is not a section of its own.
:meth:`SectionTimer.attach` registers :meth:`SectionTimer.allreduce_hook` as the DDP
communication hook (the same averaging all-reduce as DDP's default). While timing
is enabled, the hook notes when each bucket is handed to the all-reduce; the time
from the last bucket of a section (all gradients computed) to the end of that
section is waiting for communication that computation did not hide, and is booked
as ``allreduce`` instead of the section (``backward``). The hook also adds up, on
CPU, how long each bucket's all-reduce took from launch to completion, overlapped
or not (:attr:`SectionTimer.comm`); on CUDA the launch is asynchronous and only the
count and bytes are recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import torch

_OFF = contextlib.nullcontext()


class SectionTimer:
    """Seconds spent in named sections since :meth:`enable`, in :attr:`totals`."""

    def __init__(self) -> None:
        self.enabled = False
        self.device: torch.device | None = None
        self.totals: dict[str, float] = defaultdict(float)
        self.comm: dict[str, float] = defaultdict(float)
        self._ready: Any = None  # when the last gradient bucket went to the all-reduce

    def enable(self, device: torch.device) -> None:
        """Start timing (after warm-up) from zero on ``device``."""
        self.enabled, self.device = True, device
        self.totals.clear()
        self.comm.clear()
        self._ready = None

    def disable(self) -> None:
        self.enabled = False

    def snapshot(self) -> dict[str, float]:
        """The totals so far (subtract two snapshots for the sections of one step)."""
        return dict(self.totals)

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def section(self, name: str) -> AbstractContextManager[None]:
        """Time the ``with`` block as ``name`` (no-op while disabled)."""
        if not self.enabled:
            return _OFF
        return self._timed(name)

    @contextlib.contextmanager
    def _timed(self, name: str) -> Iterator[None]:
        self._sync()
        self._ready = None
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            end = time.perf_counter()
            elapsed = end - start
            if self._ready is not None:
                exposed = min(elapsed, self._exposed_since_ready(end))
                self.totals["allreduce"] += exposed
                elapsed -= exposed
                self._ready = None
            self.totals[name] += elapsed

    def _exposed_since_ready(self, end: float) -> float:
        if isinstance(self._ready, float):
            return max(0.0, end - self._ready)
        stop = torch.cuda.Event(enable_timing=True)  # the stream is idle after _sync
        stop.record()
        stop.synchronize()
        return self._ready.elapsed_time(stop) / 1000.0

    # -- DDP communication hook ---------------------------------------------------------

    def attach(self, network: torch.nn.Module) -> bool:
        """Register :meth:`allreduce_hook` on ``network`` if it is a DDP module (before
        its first backward); returns whether it was."""
        if not isinstance(network, torch.nn.parallel.DistributedDataParallel):
            return False

        def hook(state, bucket):  # (DDP rejects the string annotations of this module)
            return self.allreduce_hook(state, bucket)

        network.register_comm_hook(None, hook)
        return True

    def allreduce_hook(
        self, process_group: Any, bucket: torch.distributed.GradBucket
    ) -> torch.futures.Future[torch.Tensor]:
        """DDP's averaging all-reduce of one gradient bucket, timed while enabled."""
        import torch.distributed as dist

        group = process_group if process_group is not None else dist.group.WORLD
        tensor = bucket.buffer()
        tensor.div_(dist.get_world_size(group))
        if not self.enabled:
            work = dist.all_reduce(tensor, group=group, async_op=True)
            return work.get_future().then(lambda fut: fut.value()[0])
        on_cuda = tensor.device.type == "cuda"
        if on_cuda:
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
            self._ready = ready
        else:
            self._ready = time.perf_counter()
        self.comm["buckets"] += 1
        self.comm["bytes"] += tensor.numel() * tensor.element_size()
        start = time.perf_counter()
        work = dist.all_reduce(tensor, group=group, async_op=True)

        def done(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            if not on_cuda:  # gloo completes the future when the reduction is done
                self.comm["busy_s"] += time.perf_counter() - start
            return fut.value()[0]

        return work.get_future().then(done)


TIMER = SectionTimer()
section = TIMER.section
