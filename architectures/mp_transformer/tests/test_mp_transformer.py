"""mp_transformer against the conformance suite, with small hypers."""

import pytest

from hpctrain.testing import ArchitectureTests


@pytest.mark.slow
class TestMessagePassingTransformer(ArchitectureTests):
    architecture = "mp_transformer"
    model_hypers = {"d_model": 16, "num_heads": 2, "num_layers": 2, "num_radial": 4}
    training_hypers = {"num_epochs": 3, "batch_size": 4, "learning_rate": 0.01}


@pytest.mark.parametrize("cutoff", [3.0, 5.0, 6.5])
def test_the_radial_basis_has_unit_mean_square_within_the_cutoff(cutoff):
    """With ``normalize_radial``, each radial function (faded by the cutoff) has mean
    square 1 over neighbours spread evenly in the cutoff sphere; without it, far
    less (what slowed learning)."""
    import torch

    from architectures.mp_transformer import __model__ as Model
    from hpctrain.architecture import DatasetInfo, TargetInfo

    info = DatasetInfo(atomic_types=[1, 8], targets={"energy": TargetInfo()})
    generator = torch.Generator().manual_seed(0)
    # |x| of points uniform in a ball: cutoff * u**(1/3)
    distances = cutoff * torch.rand(400_000, generator=generator).pow(1 / 3)
    hypers = {"cutoff": cutoff, "num_radial": 6}
    radial, _ = Model(hypers, info).radial_basis(distances, distances)
    torch.testing.assert_close(radial.pow(2).mean(0), torch.ones(6), rtol=0.03, atol=0.0)
    plain, _ = Model({**hypers, "normalize_radial": False}, info).radial_basis(distances, distances)
    assert (plain.pow(2).mean(0) < 0.2).all()


def test_the_angular_basis_gives_legendre_polynomials_of_the_angle():
    """Within each degree k, the dot product of two unit vectors' harmonics is
    P_k of their cosine (the angular terms of a power spectrum), exactly: the
    coefficients are a closed form, the same in every process."""
    import torch

    from architectures.mp_transformer.model import spherical_harmonics_basis

    exponents, projection, degrees = spherical_harmonics_basis(5)
    assert [stop - start for start, stop in degrees] == [3, 5, 7, 9, 11]
    generator = torch.Generator().manual_seed(1)
    points = torch.randn(50, 3, generator=generator, dtype=torch.float64)
    unit = torch.nn.functional.normalize(points, dim=1)
    harmonics = unit.unsqueeze(1).pow(exponents).prod(-1) @ projection.t()
    cosine = unit @ unit.t()
    legendre = [torch.ones_like(cosine), cosine]
    for k in range(2, 6):
        legendre.append(((2 * k - 1) * cosine * legendre[-1] - (k - 1) * legendre[-2]) / k)
    for k, (start, stop) in enumerate(degrees, start=1):
        block = harmonics[:, start:stop]
        torch.testing.assert_close(block @ block.t(), legendre[k], atol=1e-12, rtol=0)
