"""Tests of `core.spectral_norms`: every result is an upper bound of the exact spectral norm (SVD
reference), within 1e-6 of it, on random and adversarial matrices and convolutions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixclf_ros.core import spectral_norms
from mixclf_ros.core.spectral_norms import circular_conv_norm_bound, reused_buffers, spectral_norm_bound

BELOW = 1e-15  # the bound may sit below the SVD reference only by the reference's own rounding
ABOVE = 1e-6


def exact_norm(matrices: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrices.to(torch.complex128), ord=2).max())


def exact_conv_norm(weight: torch.Tensor, canvas: tuple[int, int], groups: int = 1,
                    dilation: tuple[int, int] = (1, 1)) -> float:
    """SVD of the spectrum at every frequency of the torus (no symmetry used)."""
    out_channels, in_per_group, kh, kw = weight.shape
    w = weight.to(torch.complex128).reshape(groups, out_channels // groups, in_per_group, kh, kw)
    def phases(size: int, taps: int, step: int) -> torch.Tensor:
        frequencies, offsets = torch.arange(size, dtype=torch.float64), torch.arange(taps, dtype=torch.float64)
        return torch.exp(-2j * math.pi * torch.outer(frequencies, offsets * step) / size)

    phase_h, phase_w = phases(canvas[0], kh, dilation[0]), phases(canvas[1], kw, dilation[1])
    spectrum = torch.einsum("ua,goiab,vb->guvoi", phase_h, w, phase_w)
    return exact_norm(spectrum)


def assert_tight_upper_bound(bound: float, exact: float, below: float = BELOW) -> None:
    assert bound >= exact * (1.0 - below)
    assert bound <= exact * (1.0 + ABOVE)


def _orthogonal(n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]


def _structured() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    u, v = _orthogonal(30, g), _orthogonal(20, g)
    close = torch.zeros(30, 20, dtype=torch.float64)
    close[range(20), range(20)] = torch.tensor([1.0, 1.0 - 1e-12, 1.0 - 2e-12] + [0.5] * 17, dtype=torch.float64)
    hadamard = torch.ones(1, 1, dtype=torch.float64)
    for _ in range(6):
        hadamard = torch.cat([torch.cat([hadamard, hadamard], 1), torch.cat([hadamard, -hadamard], 1)], 0)
    mixed = torch.randn(12, 9, generator=g, dtype=torch.float64)
    mixed[::2] *= 1e200
    mixed[1::2] *= 1e-200
    return {
        "random": torch.randn(7, 5, generator=g, dtype=torch.float64),
        "wide": torch.randn(3, 200, generator=g, dtype=torch.float64),
        "one entry": torch.tensor([[-3.5]], dtype=torch.float64),
        "rank one": torch.outer(torch.randn(40, generator=g, dtype=torch.float64),
                                torch.randn(25, generator=g, dtype=torch.float64)),
        "complex rank one": torch.outer(torch.randn(8, generator=g, dtype=torch.complex128),
                                        torch.randn(6, generator=g, dtype=torch.complex128)),
        "top three within 2e-12": u @ close @ v.T,
        "orthogonal (all equal)": _orthogonal(64, g),
        "identity": torch.eye(50, dtype=torch.float64),
        "hadamard (cancellation)": hadamard,
        "complex batch": torch.randn(5, 6, 9, generator=g, dtype=torch.complex128),
        "batch, largest last": torch.eye(6, dtype=torch.float64) * torch.tensor([1.0, 1.0, 1.0, 2.0]).view(4, 1, 1),
        "tiny": torch.randn(10, 10, generator=g, dtype=torch.float64) * 1e-200,
        "huge": torch.randn(10, 10, generator=g, dtype=torch.float64) * 1e200,
        "near overflow": torch.randn(6, 6, generator=g, dtype=torch.float64) * 1e307,
        "subnormal": torch.randn(4, 4, generator=g, dtype=torch.float64) * 1e-310,
        "rows 1e200 and 1e-200": mixed,
        "float32": torch.randn(9, 4, generator=g),
    }


@pytest.mark.parametrize("name", list(_structured()))
def test_matrix_bound_is_a_tight_upper_bound(name):
    matrices = _structured()[name]
    assert_tight_upper_bound(spectral_norm_bound(matrices), exact_norm(matrices))


def test_zero_empty_and_non_finite_matrices():
    assert spectral_norm_bound(torch.zeros(4, 3)) == 0.0
    assert spectral_norm_bound(torch.zeros(2, 5, 5, dtype=torch.complex128)) == 0.0
    assert spectral_norm_bound(torch.zeros(0, 3, 3)) == 0.0
    for bad in (math.nan, math.inf):
        matrix = torch.ones(3, 3, dtype=torch.float64)
        matrix[1, 2] = bad
        with pytest.raises(ValueError, match="non-finite"):
            spectral_norm_bound(matrix)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 40), st.integers(1, 40), st.booleans(), st.integers(-250, 250),
       st.integers(0, 3), st.integers(0, 2 ** 31))
def test_matrix_bound_on_random_shapes(batch, rows, columns, complex_entries, scale, rank_cut, seed):
    g = torch.Generator().manual_seed(seed)
    dtype = torch.complex128 if complex_entries else torch.float64
    matrices = torch.randn(batch, rows, columns, generator=g, dtype=dtype)
    if rank_cut:  # low rank: many zero singular values
        rank = max(1, min(rows, columns) // (rank_cut + 1))
        matrices = matrices[..., :rank] @ torch.randn(batch, rank, columns, generator=g, dtype=dtype)
    matrices = matrices * 10.0 ** scale
    assert_tight_upper_bound(spectral_norm_bound(matrices), exact_norm(matrices))


def test_the_eigen_solver_only_proposes(monkeypatch):
    """A solver that errs (too low, too high) costs tightness or time, never soundness."""
    g = torch.Generator().manual_seed(3)
    matrices = torch.randn(6, 20, 15, generator=g, dtype=torch.float64)
    exact = exact_norm(matrices)
    solver = torch.linalg.eigvalsh
    for factor in (0.999, 1.5):
        monkeypatch.setattr(torch.linalg, "eigvalsh", lambda m, factor=factor: solver(m) * factor)
        assert spectral_norm_bound(matrices) >= exact
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda m: solver(m) * 1e-6)  # far off: looser, still a bound
    assert exact <= spectral_norm_bound(matrices) <= 1.5 * exact
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda m: solver(m) * math.nan)
    with pytest.raises(ValueError, match="non-finite"):
        spectral_norm_bound(matrices)


# ----------------------------------------------------------------------------- convolutions


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 3), st.integers(1, 4), st.integers(1, 4),
       st.integers(1, 2), st.integers(1, 2), st.integers(0, 5), st.integers(0, 5), st.integers(0, 2 ** 31))
def test_conv_bound_on_random_shapes(out_per_group, in_per_group, groups, kh, kw, dh, dw, extra_h, extra_w, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_per_group * groups, in_per_group, kh, kw, generator=g, dtype=torch.float64)
    canvas = (dh * (kh - 1) + 1 + extra_h, dw * (kw - 1) + 1 + extra_w)
    assert_tight_upper_bound(circular_conv_norm_bound(weight, canvas, groups, (dh, dw)),
                             exact_conv_norm(weight, canvas, groups, (dh, dw)), 1e-13)


@pytest.mark.parametrize("shape, canvas, groups", [
    ((6, 4, 3, 3), (9, 8), 1),  # autocorrelation
    ((4, 6, 4, 4), (4, 5), 1),  # spectrum products (few frequencies for many taps)
    ((6, 2, 3, 3), (7, 7), 3),  # groups: certificates of some groups of a frequency fail
    ((8, 1, 3, 3), (6, 6), 8),  # depthwise: 1 x 1 Gram matrices
])
@pytest.mark.parametrize("gram_memory", [1, 1 << 27])
def test_conv_bound_in_chunks_and_rounds(monkeypatch, shape, canvas, groups, gram_memory):
    """One frequency per chunk makes most chunks raise the threshold: failed certificates, again."""
    monkeypatch.setattr(spectral_norms, "GRAM_MEMORY", gram_memory)
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    assert_tight_upper_bound(circular_conv_norm_bound(weight, canvas, groups), exact_conv_norm(weight, canvas, groups),
                             1e-13)


def test_conv_bound_where_all_frequencies_tie():
    """A shift (every W_hat(u, v) unitary) and a 1 x 1 kernel (W_hat constant): every frequency is the maximum."""
    shift = torch.zeros(8, 8, 3, 3, dtype=torch.float64)
    shift[range(8), range(8), 0, 2] = 1.0
    assert_tight_upper_bound(circular_conv_norm_bound(shift, (10, 10)), 1.0)
    pointwise = torch.randn(16, 12, 1, 1, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert_tight_upper_bound(circular_conv_norm_bound(pointwise, (7, 7)), exact_norm(pointwise[..., 0, 0]))


def test_conv_bound_realistic_layer_and_scales():
    weight = torch.randn(64, 32, 3, 3, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.05
    exact = exact_conv_norm(weight, (12, 12))
    for scale in (1.0, 1e-200, 1e200):
        assert_tight_upper_bound(circular_conv_norm_bound(weight * scale, (12, 12)), exact * scale, 1e-13)
    assert circular_conv_norm_bound(torch.zeros(3, 2, 3, 3), (5, 5)) == 0.0
    bad = weight.clone()
    bad[0, 0, 0, 0] = math.nan
    with pytest.raises(ValueError, match="non-finite"):
        circular_conv_norm_bound(bad, (12, 12))


def test_conv_bound_stops_at_a_smaller_bound_of_the_callers():
    weight = torch.randn(8, 5, 3, 3, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    norm = circular_conv_norm_bound(weight, (9, 9))
    assert circular_conv_norm_bound(weight, (9, 9), at_most=0.5 * norm) == 0.5 * norm
    assert circular_conv_norm_bound(weight, (9, 9), at_most=2.0 * norm) == norm


def test_reused_buffers_give_the_same_bounds_and_are_released():
    g = torch.Generator().manual_seed(9)
    weights = [torch.randn(12, 10, 3, 3, generator=g, dtype=torch.float64), torch.randn(6, 4, 2, 2, generator=g)]
    alone = [circular_conv_norm_bound(w, (8, 8)) for w in weights]
    with reused_buffers():
        shared = [circular_conv_norm_bound(w, (8, 8)) for w in weights]
        assert spectral_norms._pool.buffers
    assert shared == alone
    assert spectral_norms._pool.buffers is None
