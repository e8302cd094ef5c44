"""Concatenation for models whose forces come from autograd.

Training differentiates twice: forces are the gradient of the energy, and the loss
on forces is differentiated again for the weights. ``torch.cat``'s gradient takes
each piece as a slice of the incoming gradient, and the gradient of a slice, in
that second pass, is a zero-filled tensor of the whole concatenation per piece,
summed: with ``soap_bpnn``'s 12,544 features per atom, three pieces cost three
full-size fills and two full-size sums per step. Here the gradient is one
``split``, whose own gradient is one ``torch.cat`` again.
"""

import torch


class _Concatenate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, dim: int, *pieces: torch.Tensor) -> torch.Tensor:
        ctx.dim = dim
        ctx.sizes = [piece.shape[dim] for piece in pieces]
        return torch.cat(pieces, dim)

    @staticmethod
    def backward(ctx, gradient: torch.Tensor):
        # differentiable (a split), so that a second pass through it is a cat
        return (None, *gradient.split(ctx.sizes, ctx.dim))


@torch.jit.unused
def concatenate(pieces: list[torch.Tensor], dim: int) -> torch.Tensor:
    """``torch.cat(pieces, dim)`` whose gradient is a ``split`` (see the module doc).
    TorchScript cannot compile it: call it under ``if not torch.jit.is_scripting()``
    and ``torch.cat`` otherwise (an exported model is differentiated once)."""
    return _Concatenate.apply(dim, *pieces)
