"""The concatenation with a split for gradient: torch.cat's values and derivatives,
first and second, without its slices' zero fills in the second pass."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hpctrain.concatenate import concatenate


def pieces(dtype=torch.float64):
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 2), (3, 5), (3, 1)]
    return [torch.randn(s, generator=generator, dtype=dtype, requires_grad=True) for s in shapes]


def test_values_and_first_and_second_derivatives_are_those_of_cat():
    a, b = pieces(), pieces()
    torch.testing.assert_close(concatenate(a, 1), torch.cat(b, 1), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda *x: concatenate(list(x), 1), a)
    assert torch.autograd.gradgradcheck(lambda *x: concatenate(list(x), 1), a)

    def forces_loss(xs, cat):  # a function of a gradient, differentiated again
        y = cat(xs)
        energy = (torch.tanh(y) ** 2).sum()
        grads = torch.autograd.grad(energy, xs, create_graph=True)
        return sum((g**2).sum() for g in grads)

    ours = torch.autograd.grad(forces_loss(a, lambda x: concatenate(x, 1)), a)
    torchs = torch.autograd.grad(forces_loss(b, lambda x: torch.cat(x, 1)), b)
    for got, want in zip(ours, torchs, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


class Calls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def second_pass_operators(cat) -> list[str]:
    xs = pieces(torch.float32)
    energy = (torch.tanh(cat(xs)) ** 2).sum()
    grads = torch.autograd.grad(energy, xs, create_graph=True)
    loss = sum((g**2).sum() for g in grads)
    with Calls() as calls:
        loss.backward()
    return calls.names


def test_the_second_pass_makes_no_full_size_zero_fill():
    assert "aten::slice_backward" in second_pass_operators(lambda x: torch.cat(x, 1))
    ours = second_pass_operators(lambda x: concatenate(x, 1))
    assert "aten::slice_backward" not in ours and "aten::cat" in ours
