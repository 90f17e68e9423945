"""Sound upper bounds of spectral norms (largest singular values, the l2 -> l2 operator norm) of
batches of matrices: dense layers and the per-frequency matrices of convolutions.

Method: certified thresholds. `sigma_max(A)^2 = lambda_max(G)` for the Gram matrix `G = A^H A`, and
`lambda_max(G) <= t` iff `t I - G` is positive semidefinite, which a Cholesky factorisation decides at
about a sixth of the cost of one matrix product. Done in floating point, a Cholesky factorisation of
`M = fl(t I - G_hat)` that runs to completion proves `lambda_max(G) <= t + margin`, with an explicit
margin (Demmel 1989; Rump, "Verification of positive definiteness", BIT 46, 2006; `_certify`):

    R^H R = M + E,  |E| <= g |R^H| |R|  with  g = gamma_{4(n+2)}  (Cholesky's backward error,
    Higham 2002, Thm 10.3; 4(n+2) instead of n+1 covers complex arithmetic, Higham 2002 section 3.6),
    so ||R||_F^2 = tr(M + E) <= tr(M) + g ||R||_F^2, and ||E||_2 <= g ||R||_F^2 <= g / (1 - g) tr(M);
    M >= -||E||_2 I, and M differs from t I - G_hat by the rounding of its diagonal (u max |M_ii|),
    so lambda_max(G_hat) <= t + g / (1 - g) tr(M) + u max |M_ii|,

and `lambda_max(G) <= lambda_max(G_hat) + ||G_hat - G||_2` (Weyl), the Gram matrix's own rounding
error, bounded a priori for each way of computing it (`gram_error`, `_conv_grams`). Everything is
computed in float64 (complex128) on matrices scaled by a power of two (exact) to entries of order 1,
so underflow is confined to terms below 1e-300 of the bound (`_UNDERFLOW` covers them). For n = 512
the margin is about 1e-10 relative, below the callers' `NUMERIC_SLACK`.

The thresholds come from `torch.linalg.eigvalsh` on the matrix that two power steps rank highest:
t = (its computed top eigenvalue) (1 + `THRESHOLD_GAP`), and every matrix of the batch is certified
against it; where certificates fail, the highest ranked failure's top eigenvalue raises t, and the
failures are certified again, until none is left. The eigen solver only proposes thresholds (its
error costs time, never soundness). The bound is the largest `t + margin + error` met, within about
`THRESHOLD_GAP / 2` relative of the exact largest norm (plus the margins, ~1e-10).

Why not Gram iteration (Delattre et al., "Efficient bound of Lipschitz constant for convolutional
layers by Gram iteration", ICML 2023), `sigma_max(A) <= ||G_k||_F^(1/2^k)` with `G_{k+1} = G_k^H G_k`:
its bound is the Schatten-2^(k+1) norm, within 1e-3 of sigma_max only after about 8 squarings for
matrices with many singular values near the top (randomly initialised layers), and on a CPU one
squaring costs a fifth of an SVD, a Cholesky factorisation a twentieth.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from scipy.linalg import lapack

from mixclf_ros.core.numerics import FLOAT64_UNIT_ROUNDOFF, gamma

THRESHOLD_GAP = 1e-9
"""Relative gap of a threshold above the computed top eigenvalue it is taken from: well above the
certificate's rounding (about n^2 u relative) for n up to ~3000 (beyond, certificates fail and the gap
widens tenfold per try, `_MAX_TRIES`)."""
GRAM_MEMORY = 1 << 27
"""Bytes of Gram matrices certified at once (chunks of frequencies or of a batch); a convolution's
autocorrelation (`_conv_grams`) holds at most 4 times as much."""
_MAX_TRIES = 8
_UNDERFLOW = 2.0 ** -1000
"""Absolute term (scaled units, where the bound is >= 1/4) above any sum of underflow errors."""

_pool = threading.local()


@contextmanager
def reused_buffers() -> Iterator[None]:
    """Within this scope (per thread), the Gram matrices of successive convolutions share their
    buffers, released at its end: fresh memory costs page faults, about as much as the products that
    fill it (a `BoundPlan` computes its norms within one scope)."""
    outer = getattr(_pool, "buffers", None)
    _pool.buffers = {} if outer is None else outer
    try:
        yield
    finally:
        _pool.buffers = outer


def _buffer(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """`numel` uninitialised elements of `like`'s dtype and device: the scope's buffer `name`
    (`reused_buffers`), grown where needed, or a new tensor outside a scope."""
    buffers = getattr(_pool, "buffers", None)
    if buffers is None:
        return like.new_empty(numel)
    held = buffers.get(name)
    if held is None or held.numel() < numel or held.dtype != like.dtype or held.device != like.device:
        held = buffers[name] = like.new_empty(numel)
    return held[:numel]


class MaxEigenvalueBound:
    """Running sound upper bound `value` of `max lambda_max(G)` over Hermitian positive semidefinite
    matrices G given in batches as computed approximations (see the module docstring)."""

    def __init__(self, cap: float = math.inf) -> None:
        self.threshold = 0.0
        self.value = 0.0
        self.cap = cap
        self.exceeded = False

    def add(self, negated_grams: Callable[[torch.Tensor], torch.Tensor], error: torch.Tensor) -> None:
        """Bounds a batch of `error.shape[0]` matrices: `negated_grams(index)` computes `-G_hat` (k, n, n),
        float64 or complex128, of the batch's matrices `index` (k,) in a new tensor (it is overwritten),
        and `error` (b,) bounds `||G_hat - G||_2` for the exact G of each, with `G_hat` the Hermitian
        matrix of the lower triangle (and the real part of the diagonal) of the computed one. Stops,
        with `exceeded` set, at a computed eigenvalue above `cap` (the caller has a bound at least as
        good then)."""
        index = torch.arange(error.shape[0], device=error.device)
        negated = negated_grams(index)
        tries, propose = 0, self.threshold == 0.0
        while True:
            if propose:
                tries = self._propose(negated, tries)
                if self.exceeded:
                    return
            certified, margin = _certify(negated, self.threshold)
            if bool(certified.any()):
                self.value = max(self.value, self.threshold + float((margin + error[index])[certified].max()))
            index = index[~certified]
            if not index.numel():
                return
            negated, propose = negated_grams(index), True

    def _propose(self, negated: torch.Tensor, tries: int) -> int:
        """Raises the threshold to the computed top eigenvalue (plus `THRESHOLD_GAP`) of the highest
        ranked of the matrices `negated` (those that failed it, or at first all of a batch); returns
        the count of `tries` where that did not raise it. Sets `exceeded` above `cap`."""
        top = float(torch.linalg.eigvalsh(-negated[int(_power_estimates(negated).argmax())])[-1])
        if not math.isfinite(top):  # (no certificate holds for non-finite entries either)
            raise ValueError("non-finite matrix entries: no spectral norm bound")
        proposal = max(top, _UNDERFLOW) * (1.0 + THRESHOLD_GAP)
        if proposal <= self.threshold:  # the certificate failed where the solver says it holds
            tries += 1
            # an unreliable solver costs tightness, never a refusal: past _MAX_TRIES the threshold
            # doubles until the factorisation certifies it (it does once above the true maximum)
            proposal = self.threshold * (2.0 if tries > _MAX_TRIES else 1.0 + THRESHOLD_GAP * 10.0 ** tries)
        self.threshold = proposal
        self.exceeded = proposal > self.cap
        return tries


def _power_estimates(negated: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """Estimates (lower bounds, in exact arithmetic) of each matrix's top eigenvalue, `||G v|| / ||v||`
    after `steps` power steps from its column of largest diagonal entry: to rank them."""
    vectors = negated[torch.arange(negated.shape[0]), :, negated.diagonal(dim1=-2, dim2=-1).real.argmin(dim=-1)]
    for _ in range(steps):
        images = (negated @ vectors.unsqueeze(-1)).squeeze(-1)
        estimates = torch.linalg.vector_norm(images, dim=-1) / torch.linalg.vector_norm(vectors, dim=-1)
        vectors = images / torch.linalg.vector_norm(images, dim=-1, keepdim=True).clamp_min(1e-300)
    return estimates.nan_to_num(0.0)


def _certify(negated: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(certified (b,) bool, margin (b,)) for the negated Gram matrices `negated` (overwritten): where
    certified, `lambda_max(G_hat) <= threshold + margin` (module docstring; the factor 2 covers the
    rounding of the margin's own sums)."""
    negated.diagonal(dim1=-2, dim2=-1).add_(threshold)
    diagonal = negated.diagonal(dim1=-2, dim2=-1).real
    g = gamma(4 * (negated.shape[-1] + 2), FLOAT64_UNIT_ROUNDOFF)
    largest = diagonal.abs().max(dim=-1).values
    margin = 2.0 * (g / (1.0 - g) * diagonal.sum(dim=-1) + FLOAT64_UNIT_ROUNDOFF * largest)
    return _cholesky_completes(negated), margin + _UNDERFLOW


def _cholesky_completes(matrices: torch.Tensor) -> torch.Tensor:
    """Whether the Cholesky factorisation of each matrix (b, n, n) (of its lower triangle; the
    matrices are overwritten) runs to completion."""
    if matrices.shape[-1] == 1:  # (many 1 x 1 matrices: depthwise convolutions)
        return matrices[:, 0, 0].real > 0
    if matrices.device.type != "cpu":
        return torch.linalg.cholesky_ex(matrices)[1] == 0
    # LAPACK in place on the column-major transposes (upper = our lower): torch's cholesky_ex copies
    # and zeroes the other triangle, which costs more than the factorisation for complex matrices
    potrf = lapack.zpotrf if matrices.is_complex() else lapack.dpotrf
    return torch.tensor([potrf(matrix.T, lower=0, clean=0, overwrite_a=1)[1] == 0
                         for matrix in matrices.resolve_conj().contiguous().numpy()], dtype=torch.bool)


def _scaled(tensor: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor / 2^e, e) with max |entry| in [2^(e-1), 2^e): exact (a power of two, applied in two
    halves so that neither factor overflows, even for subnormal entries), entries below 1."""
    exponent = int(torch.frexp(tensor.abs().max().to(torch.float64)).exponent)
    half = exponent // 2
    return tensor * 2.0 ** -half * 2.0 ** (half - exponent), exponent


def gram_error(matrices: torch.Tensor, terms: int) -> torch.Tensor:
    """Bound of `||G_hat - B^H B||_2` for each B (b, r, n) of which `matrices` holds the entries'
    moduli `|B|` (or sums of the moduli of B's parts), where each entry of `G_hat` is within
    `gamma_terms` of the sum of its products' moduli, `|B|^H |B|` (`terms` = r + 2 for a complex
    product, Higham 2002 section 3.6): `|| |B|^H |B| ||_2 = || |B| ||_2^2 <= || |B| ||_1 || |B| ||_inf`;
    the factor 4 covers sqrt(2) for complex moduli and the rounding of these sums."""
    column_sums = matrices.sum(dim=-2).max(dim=-1).values
    row_sums = matrices.sum(dim=-1).max(dim=-1).values
    return 4.0 * gamma(terms, FLOAT64_UNIT_ROUNDOFF) * column_sums * row_sums


def spectral_norm_bound(matrices: torch.Tensor) -> float:
    """Sound upper bound of `max_b sigma_max(A_b)` (the l2 operator norm) over a batch `matrices`
    (..., m, n), real or complex, within about 1e-9 relative of the exact value; 0 for zero matrices."""
    a = matrices.detach()
    a = a.to(torch.complex128 if a.is_complex() else torch.float64).reshape(-1, *a.shape[-2:])
    if a.numel() == 0:
        return 0.0
    if not bool(torch.isfinite(a).all()):
        raise ValueError("non-finite matrix entries: no spectral norm bound")
    if not bool((a != 0).any()):
        return 0.0
    a, exponent = _scaled(a)
    if a.shape[-2] < a.shape[-1]:  # the smaller Gram matrix: A A^H has A^H A's nonzero eigenvalues
        a = a.mH
    bound = MaxEigenvalueBound()
    per_chunk = max(1, GRAM_MEMORY // (16 * a.shape[-1] ** 2))
    for start in range(0, a.shape[0], per_chunk):
        chunk = a[start:start + per_chunk]
        bound.add(lambda index, chunk=chunk: (-chunk[index].mH) @ chunk[index],
                  gram_error(chunk.abs(), chunk.shape[-2] + 2))
    return math.ldexp(math.sqrt(bound.value) * (1.0 + 2.0 * FLOAT64_UNIT_ROUNDOFF), exponent)


def circular_conv_norm_bound(weight: torch.Tensor, canvas: tuple[int, int], groups: int = 1,
                             dilation: tuple[int, int] = (1, 1), *, at_most: float = math.inf) -> float:
    """Sound upper bound of `max_{u,v} sigma_max(W_hat(u, v))`, the l2 operator norm of the circular
    2-D convolution with `weight` (out, in/groups, kh, kw) on the `canvas` torus, within about 1e-9
    relative (see `layer_bounds.circular_conv_spectral_norm` for the operator and its spectrum), or
    `at_most` (a bound the caller has) where that is smaller: computing stops at the first
    frequency whose norm is found above it.

    Real weights make `W_hat(-u, -v)` the conjugate of `W_hat(u, v)` (same singular values), so half
    the frequencies suffice; a 1-tap dimension makes the spectrum constant along it. The Gram
    matrices come from the kernel's autocorrelation (`_conv_grams`) where that is cheaper than the
    spectrum's products (`_spectrum_grams`)."""
    out_channels, in_per_group, kh, kw = weight.shape
    w = weight.detach().to(torch.float64).reshape(groups, out_channels // groups, in_per_group, kh, kw)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("non-finite weights: no spectral norm bound")
    if not bool((w != 0).any()):
        return 0.0
    w, exponent = _scaled(w)
    bound = MaxEigenvalueBound(cap=math.ldexp(at_most, -exponent) ** 2 if math.isfinite(at_most) else math.inf)
    n1, n2 = (canvas[0] if kh > 1 else 1), (canvas[1] if kw > 1 else 1)
    u, v = torch.meshgrid(torch.arange(n1), torch.arange(n2 // 2 + 1), indexing="ij")
    self_conjugate = (v == 0) | (2 * v == n2)  # columns v = -v: keep u <= n1 / 2
    keep = ~self_conjugate | (u <= n1 // 2)
    frequencies = torch.stack([u[keep], v[keep]], dim=1).to(w.device)
    # B_a: the factor whose columns index the smaller Gram matrix; G(w) = sum_{a,a'} B_a^T B_a' e^{...}
    factors = w.permute(0, 3, 4, 1, 2) if in_per_group <= out_channels // groups else w.permute(0, 3, 4, 2, 1)
    factors = factors.contiguous()
    size, inner = factors.shape[-1], factors.shape[-2]
    # the autocorrelation costs ~taps^2 / 2 real products and holds 1 + 2 D complex matrices per group
    # (D offsets); the spectrum's Gram matrices one complex product (4 real ones) per frequency
    offsets = ((2 * kh - 1) * (2 * kw - 1) - 1) // 2
    per_chunk = min(frequencies.shape[0], max(1, GRAM_MEMORY // (16 * groups * size ** 2)))
    if (kh * kw) ** 2 < 8 * frequencies.shape[0] and 16 * (1 + 2 * offsets) * groups * size ** 2 <= 4 * GRAM_MEMORY:
        negated_grams = _conv_grams(factors, canvas, dilation, per_chunk)
        terms = inner + kh * kw + 2 * offsets + 80
    else:
        negated_grams, terms = _spectrum_grams(factors, canvas, dilation), inner + kh * kw + 112
    error = gram_error(factors.abs().sum(dim=(1, 2)), terms)  # per group, from sum_a |B_a|
    for start in range(0, frequencies.shape[0], per_chunk):
        chunk = frequencies[start:start + per_chunk]

        def chunk_grams(index: torch.Tensor, chunk: torch.Tensor = chunk) -> torch.Tensor:
            if index.numel() == chunk.shape[0] * groups:  # all of them (index only ever shrinks)
                return negated_grams(chunk).reshape(-1, size, size)
            if groups == 1:
                return negated_grams(chunk[index]).reshape(-1, size, size)
            wanted, position = torch.unique(index // groups, return_inverse=True)
            return negated_grams(chunk[wanted])[position, index % groups]

        bound.add(chunk_grams, error.repeat(chunk.shape[0]))
        if bound.exceeded:
            return at_most
    return min(math.ldexp(math.sqrt(bound.value) * (1.0 + 2.0 * FLOAT64_UNIT_ROUNDOFF), exponent), at_most)


def _phases(frequencies: torch.Tensor, offsets: torch.Tensor, canvas: tuple[int, int]) -> torch.Tensor:
    """Angles `2 pi (u d1 / n1 + v d2 / n2)` (F, D) for integer offsets (D, 2), reduced mod n exactly
    first: in [0, 4 pi), with 4 roundings, an error below 16 pi u (so their cosines and sines, correct
    to an ulp, are within 51 u)."""
    n1, n2 = canvas
    first = (frequencies[:, :1] * offsets[:, 0]) % n1
    second = (frequencies[:, 1:] * offsets[:, 1]) % n2
    return 2.0 * math.pi * (first.to(torch.float64) / n1 + second.to(torch.float64) / n2)


def _spectrum_grams(factors: torch.Tensor, canvas: tuple[int, int],
                    dilation: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of frequencies (F, 2) -> the negated Gram matrices `-B_hat^H B_hat` (F, groups, n, n)
    of the spectrum `B_hat(w) = sum_a B_a e^{-i w.p_a}`.

    Error: `|B_hat - B| <= g S_abs` entrywise with `g = gamma_{taps+80}` (the phases' error, below
    73 u in modulus, and the sum) and `S_abs = sum_a |B_a|`, so with `S = ||S_abs||_2 >= ||B||_2`,
    `||B_hat^H B_hat - B^H B||_2 <= (2 g + g^2) S^2 + gamma_{r+2} (1 + g)^2 S^2 <= 4 gamma_N S^2` for
    `N = r + taps + 112` terms (`gram_error`)."""
    kh, kw = factors.shape[1:3]
    taps = torch.stack(torch.meshgrid(torch.arange(kh) * dilation[0], torch.arange(kw) * dilation[1],
                                      indexing="ij"), dim=-1).reshape(-1, 2).to(factors.device)
    flat = factors.flatten(1, 2).to(torch.complex128)

    def negated_grams(frequencies: torch.Tensor) -> torch.Tensor:
        angles = -_phases(frequencies, taps, canvas)
        spectrum = torch.einsum("ft,gtrn->fgrn", torch.polar(torch.ones_like(angles), angles), flat)
        return (-spectrum.mH) @ spectrum

    return negated_grams


def _conv_grams(factors: torch.Tensor, canvas: tuple[int, int], dilation: tuple[int, int],
                capacity: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function of at most `capacity` frequencies (F, 2) -> the negated Gram matrices -G
    (F, groups, n, n), each time in the same buffer (fresh memory costs page faults, about as much as
    the product that fills it), from the autocorrelation `C_e = sum_a B_a^T B_{a+e}` of the taps:

        G(w) = sum_{a,a'} B_a^T B_a' e^{-i w.(p_a' - p_a)} = C_0 + sum_{e > 0} (C_e + C_e^T) cos(w.d_e)
               - i sum_{e > 0} (C_e - C_e^T) sin(w.d_e)

    (`e > 0`: half the D tap offsets, `d_e` their canvas offsets; `C_{-e} = C_e^T`). Its singular
    values at w are those of `W_hat(w)^H W_hat(w)` or, transposed, at -w. Rounding: an entry of G is a
    sum of the products `B_a[k, i] B_a'[k, j]`, each rounded once, in at most `r` (one product of
    taps) + `taps` (their sum) + 1 (symmetrisation) + `2 D + 1` (the sum over offsets) additions, and
    multiplied (one more rounding) by a cosine or sine with an error below 51 u (`_phases`): within
    `gamma_N` of the sum of their moduli, `sum_{a,a'} |B_a|^T |B_a'|`, for `N = r + taps + 2 D + 80`
    (`gram_error`)."""
    groups, kh, kw, _, size = factors.shape
    offsets = [(0, 0)] + [(0, e2) for e2 in range(1, kw)] + \
        [(e1, e2) for e1 in range(1, kh) for e2 in range(1 - kw, kw)]
    count = len(offsets)
    # rows: C_0 and the C_e + C_e^T as real parts, the C_e - C_e^T as imaginary parts (interleaved
    # as complex numbers), so that one product with [-1, -cos, sin] writes the complex -G
    right = _buffer("offsets", (2 * count - 1) * groups * size * size * 2, factors).zero_()
    right = right.view(2 * count - 1, groups, size, size, 2)
    lagged = factors.new_empty(groups, size, size)
    for index, (e1, e2) in enumerate(offsets):
        lagged.zero_()
        for a1 in range(kh - e1):
            for a2 in range(max(0, -e2), min(kw, kw - e2)):
                lagged.baddbmm_(factors[:, a1, a2].mT, factors[:, a1 + e1, a2 + e2])
        if index == 0:
            right[0, ..., 0] = lagged
        else:
            right[index, ..., 0] = lagged + lagged.mT
            right[count - 1 + index, ..., 1] = lagged - lagged.mT
    right = right.reshape(2 * count - 1, -1)
    canvas_offsets = torch.tensor(offsets[1:], device=factors.device).reshape(-1, 2) * \
        torch.tensor(dilation, device=factors.device)

    buffer = _buffer("grams", capacity * right.shape[1], factors).view(capacity, right.shape[1])

    def negated_grams(frequencies: torch.Tensor) -> torch.Tensor:
        angles = _phases(frequencies, canvas_offsets, canvas)
        left = torch.cat([angles.new_full((frequencies.shape[0], 1), -1.0), -torch.cos(angles), torch.sin(angles)], 1)
        product = torch.mm(left, right, out=buffer[:frequencies.shape[0]])
        return torch.view_as_complex(product.view(frequencies.shape[0], groups, size, size, 2))

    return negated_grams
