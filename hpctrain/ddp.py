"""DistributedDataParallel as the engine wraps a model in it."""

from __future__ import annotations

import warnings

import torch


def wrap_ddp(network: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel without buffer syncs at each forward: the buffers
    (baseline, type map) are identical on all ranks by construction."""
    import inspect

    ddp = torch.nn.parallel.DistributedDataParallel
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(ddp.__init__).parameters
        else {"broadcast_buffers": False}
    )
    # a [1, n] head (one target) gets a [1, 1]-strided gradient; DDP warns about the
    # stride of a size-1 dimension, which changes no memory layout
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return ddp(
        network,
        device_ids=[device] if device.type == "cuda" else None,
        gradient_as_bucket_view=True,
        **no_sync,
    )
