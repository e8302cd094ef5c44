"""The bases of ``soap_bpnn``'s neighbour density: the splined radial integral of a
Gaussian on featomic's orthonormalised GTO basis, and real spherical harmonics, both
twice differentiable in plain torch."""

import math
from typing import List, Tuple

import numpy as np
import torch

# Spacing (angstrom) of the radial spline: its error is far below featomic's own
# spline accuracy (1e-8) for the default hypers
SPLINE_STEP = 0.005


def radial_spline(
    radius: float, density_width: float, max_angular: int, max_radial: int, step: float
) -> Tuple[np.ndarray, np.ndarray]:
    """Values and derivatives ``[points, max_angular + 1, max_radial + 1]`` of the
    radial integral on a grid of spacing ``step`` from 0 to ``radius``.

    The integral of a Gaussian density (width ``sigma``) at distance ``r`` with the
    GTO ``r^n exp(-b_n r^2)`` and a modified spherical Bessel function ``i_l`` has a
    closed form in the confluent hypergeometric function ``1F1`` (used through Kummer's
    transformation, so that nothing overflows); the GTOs are then orthonormalised as
    featomic does (Loewdin, from the analytic Gram matrix).
    """
    from scipy.special import gamma, hyp1f1

    n_radial = max_radial + 1
    sigmas = radius / n_radial * np.sqrt(np.maximum(np.arange(n_radial), 1.0))
    b = 1.0 / (2.0 * sigmas**2)
    a = 1.0 / (2.0 * density_width**2)

    n = np.arange(n_radial)
    power = (n[:, None] + n[None, :] + 3) / 2.0
    gram = gamma(power) / (2.0 * (b[:, None] + b[None, :]) ** power)
    norms = 1.0 / np.sqrt(np.diag(gram))
    eigenvalues, eigenvectors = np.linalg.eigh(gram * norms[:, None] * norms[None, :])
    ortho = eigenvectors @ np.diag(eigenvalues**-0.5) @ eigenvectors.T * norms[None, :]

    r = np.arange(0.0, radius + step / 2, step)
    if r[-1] < radius:
        r = np.append(r, r[-1] + step)
    prefactor = 4.0 * np.pi / (np.pi * density_width**2) ** 0.75 * np.sqrt(np.pi)
    values = np.zeros((len(r), max_angular + 1, n_radial))
    derivatives = np.zeros_like(values)
    for ell in range(max_angular + 1):
        primitive = np.zeros((n_radial, len(r)))
        derivative = np.zeros_like(primitive)
        for i in range(n_radial):
            alpha = a + b[i]
            big_a, big_b = (i + ell + 3) / 2.0, ell + 1.5
            constant = prefactor * gamma(big_a) / (2.0 ** (ell + 2) * alpha**big_a * gamma(big_b))
            c = 2.0 * a * r
            z = a * a * r * r / alpha
            envelope = np.exp(-a * b[i] * r * r / alpha)
            kummer = hyp1f1(big_b - big_a, big_b, -z)
            d_kummer = -(big_b - big_a) / big_b * hyp1f1(big_b - big_a + 1, big_b + 1, -z)
            c_l = c**ell
            d_c_l = ell * 2.0 * a * c ** (ell - 1) if ell > 0 else np.zeros_like(r)
            primitive[i] = constant * c_l * envelope * kummer
            derivative[i] = constant * (
                d_c_l * envelope * kummer
                + c_l
                * envelope
                * (-2.0 * a * b[i] * r / alpha * kummer + d_kummer * 2.0 * a * a * r / alpha)
            )
        values[:, ell, :] = (ortho @ primitive).T
        derivatives[:, ell, :] = (ortho @ derivative).T
    return values, derivatives


def harmonics_constants(max_angular: int) -> List[float]:
    """Normalisation of the real spherical harmonics, ``sqrt((2l+1)/4pi (l-m)!/(l+m)!)``
    for ``m = 0..l``, times ``sqrt(2)`` for ``m > 0`` and ``(2m-1)!!``, flattened by
    ``l``."""
    constants: List[float] = []
    for ell in range(max_angular + 1):
        for m in range(ell + 1):
            value = (
                (2 * ell + 1) / (4 * math.pi) * math.factorial(ell - m) / math.factorial(ell + m)
            )
            # (2m-1)!!: the recursion below starts from 1 instead
            double_factorial = math.prod(range(2 * m - 1, 0, -2))
            constants.append(
                math.sqrt(value) * (math.sqrt(2.0) if m > 0 else 1.0) * double_factorial
            )
    return constants


def spherical_harmonics(
    unit: torch.Tensor, max_angular: int, constants: List[float]
) -> torch.Tensor:
    """Real spherical harmonics ``[n, (max_angular + 1)^2]`` of unit vectors, ordered by
    ``l`` then ``m = -l..l``; orthonormal on the sphere, twice differentiable."""
    x, y, z = unit[:, 0], unit[:, 1], unit[:, 2]
    # cos(m phi) sin^m(theta) and sin(m phi) sin^m(theta)
    cosines = [torch.ones_like(x)]
    sines = [torch.zeros_like(x)]
    for m in range(1, max_angular + 1):
        cosines.append(x * cosines[m - 1] - y * sines[m - 1])
        sines.append(x * sines[m - 1] + y * cosines[m - 1])
    # associated Legendre polynomials divided by sin^m(theta) and (2m-1)!!, by (l, m)
    legendre: List[torch.Tensor] = []
    for ell in range(max_angular + 1):
        for m in range(ell + 1):
            if m == ell:
                value = torch.ones_like(z)
            elif m == ell - 1:
                value = (2 * m + 1) * z * legendre[ell * (ell - 1) // 2 + m]
            else:
                value = (
                    (2 * ell - 1) * z * legendre[ell * (ell - 1) // 2 + m]
                    - (ell + m - 1) * legendre[(ell - 1) * (ell - 2) // 2 + m]
                ) / (ell - m)
            legendre.append(value)
    columns: List[torch.Tensor] = []
    for ell in range(max_angular + 1):
        first = ell * (ell + 1) // 2
        for m in range(-ell, ell + 1):
            k = m if m >= 0 else -m
            angle = cosines[k] if m >= 0 else sines[k]
            columns.append(constants[first + k] * legendre[first + k] * angle)
    return torch.stack(columns, dim=1)
