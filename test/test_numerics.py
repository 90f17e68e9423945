"""Rounding of radii, precision switches and forward-pass error bounds."""

from __future__ import annotations

from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

from mixclf_ros.core import certify
from mixclf_ros.core.forward_error import ErrorBoundedForward, UnboundedForwardError
from mixclf_ros.core.layers import GroupSort, Normalize, Residual
from mixclf_ros.core.numerics import (
    full_precision,
    full_precision_flags,
    precision_flags,
    probabilities_with_error,
)
from mixclf_ros.models.loading import load_model, zoo_config
from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
from mixclf_ros.vision.decode import DecodedImage
from mixclf_ros.vision.preprocess import (
    PreprocessConfig,
    Preprocessor,
    colour_matrix,
    image_radius,
    preprocessing_float_error,
    preprocessing_operator_norm,
)

pytestmark = pytest.mark.usefixtures("both_rounding_domains")

# ----------------------------------------------------------------------------- exact references


def exact_lipschitz_radius(probs: list[float], lipschitz: list[float], alpha: float) -> Fraction:
    """Theorem 1 in rational arithmetic on the given float values (clipped at 0)."""
    p = [Fraction(v) for v in probs]
    lip = [Fraction(v) for v in lipschitz]
    a = Fraction(alpha)
    y = max(range(len(p)), key=lambda i: p[i])
    best = None
    for i in range(len(p)):
        if i == y:
            continue
        value = (a * (p[y] - p[i]) + a - 1) / (a * (lip[y] + lip[i]))
        best = value if best is None else min(best, value)
    return max(best, Fraction(0))


def exact_ndtri(p: mpmath.mpf) -> mpmath.mpf:
    """Phi^-1(p) to the working precision: Newton steps on ncdf(x) = p from the float64 value."""
    if p <= 0:
        return -mpmath.inf
    if p >= 1:
        return mpmath.inf
    x = mpmath.mpf(float(torch.special.ndtri(torch.tensor(float(p), dtype=torch.float64))))
    for _ in range(6):
        x -= (mpmath.ncdf(x) - p) / mpmath.npdf(x)
    return x


def exact_smoothing_radius(lower: float, upper: float, sigma: float, alpha: float) -> mpmath.mpf:
    """Theorem 2 at 60 digits on the given float values (clipped at 0)."""
    with mpmath.workdps(60):
        a, lo, up, s = (mpmath.mpf(Fraction(v).numerator) / Fraction(v).denominator
                        for v in (alpha, lower, upper, sigma))
        # a up + (1 - a), never (a up + 1) - a: at alpha 1 and up = 4e-55 the latter kept 5 digits
        # of up at 60-digit precision, and the reference radius was 4e-10 too small
        first, second = a * lo, a * up + (1 - a)
        if first <= 0 or second >= 1:  # Phi^-1 = -inf or +inf: no certificate
            return mpmath.mpf(0)
        return max(s / 2 * (exact_ndtri(first) - exact_ndtri(second)), mpmath.mpf(0))


# ----------------------------------------------------------------------------- Theorem 1 rounding

alphas = st.one_of(
    st.floats(0.5, 0.5 + 1e-6), st.floats(0.5, 1.0), st.floats(0.999999, 1.0),
    st.sampled_from([0.5, 0.6, 0.75, 0.9, 1.0]))


@st.composite
def near_threshold_cases(draw):
    """alpha, probabilities with alpha (p_y - p_i) + alpha - 1 within ~1e-9 of 0, constants."""
    alpha = draw(alphas)
    classes = draw(st.integers(2, 5))
    runner_up = draw(st.floats(0.0, 0.3))
    gap = (1.0 - alpha) / alpha + draw(st.floats(-1e-12, 1e-8))
    top = runner_up + gap
    if not (0 < top <= 1.0 and top > runner_up):
        top = min(1.0, runner_up + abs(gap) + 1e-12)
    others = [draw(st.floats(0.0, runner_up)) for _ in range(classes - 2)]
    probs = [top, runner_up, *others]
    lipschitz = [draw(st.floats(1e-3, 10.0)) for _ in range(classes)]
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    if dtype == torch.float32:
        probs = [float(np.float32(v)) for v in probs]
    return alpha, probs, lipschitz, dtype


@pytest.mark.slow
@settings(max_examples=400, deadline=None)
@given(near_threshold_cases())
def test_lipschitz_radius_never_exceeds_exact_value(case):
    alpha, probs, lipschitz, dtype = case
    radius = certify.lipschitz_radius(torch.tensor([probs], dtype=dtype),
                                      torch.tensor(lipschitz, dtype=torch.float64), alpha)
    assert radius.dtype == dtype
    assert Fraction(float(radius[0])) <= exact_lipschitz_radius(probs, lipschitz, alpha)


@settings(max_examples=200, deadline=None)
@given(near_threshold_cases(), st.floats(0.0, 1e-6))
def test_lipschitz_radius_with_probability_error_is_a_lower_bound_over_the_error_box(case, error):
    """With |computed - exact| <= e the radius is at most the exact radius of every probability
    vector in the box; the worst corner lowers p_y and raises every other p_i by e."""
    alpha, probs, lipschitz, _ = case
    radius = certify.lipschitz_radius(torch.tensor([probs], dtype=torch.float64),
                                      torch.tensor(lipschitz, dtype=torch.float64), alpha, probability_error=error)
    y = max(range(len(probs)), key=lambda i: probs[i])
    e = Fraction(error)
    worst = [Fraction(v) - e if i == y else Fraction(v) + e for i, v in enumerate(probs)]
    lip = [Fraction(v) for v in lipschitz]
    a = Fraction(alpha)
    exact = min((a * (worst[y] - worst[i]) + a - 1) / (a * (lip[y] + lip[i])) for i in range(len(probs)) if i != y)
    assert Fraction(float(radius[0])) <= max(exact, Fraction(0))


@pytest.mark.slow
def test_lipschitz_radius_rounds_the_cancelling_numerator_down():
    """alpha = 0.6, a numerator of about 2e-12 after cancellation: the old relative 1e-12 shrink did
    not cover the float64 rounding of alpha (h_y - h_i) (about 3e-17 absolute)."""
    found = 0
    rng = np.random.default_rng(1)
    for _ in range(2000):
        runner_up = float(rng.uniform(0, 0.3))
        top = runner_up + (1 - 0.6) / 0.6 + float(rng.uniform(0, 1e-11))
        probs = [top, runner_up]
        radius = certify.lipschitz_radius(torch.tensor([probs], dtype=torch.float64), 0.5, 0.6)
        exact = exact_lipschitz_radius(probs, [0.5, 0.5], 0.6)
        assert Fraction(float(radius[0])) <= exact
        found += exact > 0
    assert found > 100


# ----------------------------------------------------------------------------- Theorem 2 rounding


@st.composite
def smoothing_cases(draw):
    alpha = draw(alphas)
    upper = draw(st.floats(0.0, 0.45))
    # alpha lower = alpha upper + 1 - alpha, up to a tiny offset: the two ndtri values cancel.
    lower = min(1.0, (alpha * upper + 1 - alpha) / alpha + draw(st.floats(-1e-12, 1e-7)))
    sigma = draw(st.floats(0.01, 2.0))
    return alpha, lower, upper, sigma


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(smoothing_cases())
@example((1.0, 1.9360094381012244e-08, 4.013265864450823e-55, 1.0))  # a tiny p_upper at alpha 1
def test_smoothing_radius_never_exceeds_exact_value(case):
    alpha, lower, upper, sigma = case
    radius = certify.smoothing_radius(torch.tensor([lower], dtype=torch.float64),
                                      torch.tensor([upper], dtype=torch.float64), sigma, alpha)
    assert mpmath.mpf(float(radius[0])) <= exact_smoothing_radius(lower, upper, sigma, alpha)


def test_ndtri_error_is_within_the_stated_bound():
    points = np.concatenate([np.geomspace(1e-300, 0.5, 300), 1 - np.geomspace(1e-16, 0.5, 300),
                             np.linspace(0.01, 0.99, 300)])
    values = torch.special.ndtri(torch.tensor(points, dtype=torch.float64)).tolist()
    with mpmath.workdps(50):
        for p, value in zip(points.tolist(), values):
            exact = exact_ndtri(mpmath.mpf(p))
            assert abs(mpmath.mpf(value) - exact) <= certify.NDTRI_RELATIVE_ERROR * abs(exact) + mpmath.mpf(1e-300)


# ----------------------------------------------------------------------------- float32 publication


@settings(max_examples=500, deadline=None)
@given(st.floats(0.0, 1e30) | st.floats(0.0, 1e-30))
def test_float32_toward_zero(value):
    single = certify.float32_toward_zero(value)
    assert single <= value and float(np.float32(single)) == single
    assert float(np.nextafter(np.float32(single), np.float32(np.inf))) > value or single == value


def test_reported_overstated_values_are_rounded_down():
    assert certify.float32_toward_zero(0.17740311863154093) < 0.17740311863154093
    assert float(np.float32(0.17740311863154093)) > 0.17740311863154093  # what nearest rounding gave


@settings(max_examples=300, deadline=None)
@given(st.floats(1e-12, 10.0), st.floats(1e-6, 10.0), st.floats(0.0, 1e-3))
def test_image_radius_never_exceeds_exact_value(radius, norm, error):
    value = image_radius(radius, norm, error)
    exact = max(Fraction(0), (Fraction(radius) - Fraction(error)) / Fraction(norm))
    assert Fraction(value) <= exact


# ----------------------------------------------------------------------------- precision switches


def test_full_precision_sets_and_restores_switches():
    before = precision_flags()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        changed = precision_flags()
        with full_precision():
            assert precision_flags() == full_precision_flags()
        assert precision_flags() == changed
        with pytest.raises(RuntimeError), full_precision():
            raise RuntimeError("boom")
        assert precision_flags() == changed
    finally:
        torch.backends.cuda.matmul.fp32_precision = before["cuda.matmul.fp32_precision"]


class FlagRecorder(nn.Module):
    """A model whose forward records the precision switches in force."""

    def __init__(self, inner: nn.Module, **attributes):
        super().__init__()
        self.inner = inner
        self.seen: list[dict] = []
        for key, value in attributes.items():
            setattr(self, key, value)

    def forward(self, x):
        self.seen.append(precision_flags())
        return self.inner(x)


@pytest.mark.parametrize("kind", ["lipschitz", "smoothing"])
def test_robust_pass_runs_in_full_precision_and_standard_keeps_fast_paths(kind):
    """The robust pass (and the smoothing base model) sees every reduced-precision path off; the
    standard model sees the process settings (here TF32 allowed for matmuls), restored afterwards."""
    torch.manual_seed(0)
    standard = FlagRecorder(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)))
    attributes = dict(kind=kind, norm="l2", num_classes=3, lipschitz_constant=1.0, sigma=0.25, n0=4, n=8,
                      input_shape=(1, 4, 4))
    # tanh: no rounding-error rule, so the robust pass runs the model's own forward (float64 copy and float32)
    robust = FlagRecorder(nn.Sequential(nn.Flatten(), nn.Linear(16, 3), nn.Tanh()), **attributes)
    before = precision_flags()
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        process = precision_flags()
        assert process != full_precision_flags()
        classifier = CertifiedClassifier(standard, robust, PreprocessConfig(1, 4, 4), torch.device("cpu"))
        assert classifier.forward_error == ("estimated" if kind == "lipschitz" else "")
        robust.seen.clear()  # the trace at construction calls forward once, outside any pass
        frame = DecodedImage(np.full((4, 4, 1), 0.5, np.float32), "mono", 1.0)
        results = classifier.classify([frame], LiveSettings(alpha=0.75, safe_radius=0.0))
        assert results[0].status == 0
        assert robust.seen and all(flags == full_precision_flags() for flags in robust.seen)
        assert standard.seen and all(flags == process for flags in standard.seen)
        assert precision_flags() == process
    finally:
        torch.backends.cuda.matmul.fp32_precision = before["cuda.matmul.fp32_precision"]


# ----------------------------------------------------------------------------- forward error bound


def _network_with_every_layer() -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(
        Normalize((0.3,), (0.4,)), nn.Conv2d(1, 8, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        Residual(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU())), GroupSort(2),
        nn.AvgPool2d(2), nn.AdaptiveAvgPool2d(3), nn.Flatten(), nn.Dropout(0.1),
        nn.Linear(72, 32), nn.Hardtanh(), nn.Linear(32, 5)).eval()


@pytest.mark.parametrize("network", ["zoo", "every_layer"])
def test_float32_error_bound_covers_the_float32_error(network):
    """The bound, run in float32, contains the float32 logits' distance to the float64 ones (which
    are exact to about 1e-13 here, far below the float32 errors)."""
    model = load_model(zoo_config("robust_lipschitz")).network if network == "zoo" else _network_with_every_layer()
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    logits32, bound32 = ErrorBoundedForward(model, torch.float32, input_shape=(1, 28, 28))(x)
    logits64, bound64 = ErrorBoundedForward(model, input_shape=(1, 28, 28))(x)
    error = (logits32.double() - logits64).abs()
    assert (error > 0).any()
    assert (error <= bound32.double() + bound64).all()
    assert float(bound64.max()) < 1e-8  # float64: negligible against the certified margins
    torch.testing.assert_close(logits64, model.double()(x.double()), rtol=1e-12, atol=1e-12)


def test_zoo_lipschitz_model_gets_the_rigorous_bound():
    classifier = CertifiedClassifier(load_model(zoo_config("standard")), load_model(zoo_config("robust_lipschitz")),
                                     PreprocessConfig(1, 28, 28), torch.device("cpu"))
    assert classifier.forward_error == "bounded"


def test_probability_error_bound():
    logits = torch.randn(32, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 5
    error = torch.full_like(logits, 1e-3)
    probs, bound = probabilities_with_error(logits, error)
    for _ in range(20):
        moved = logits + (2 * torch.rand_like(logits) - 1) * error
        assert ((torch.softmax(moved, 1) - probs).abs().amax(1) <= bound).all()


@pytest.mark.parametrize("layers, match", [
    ((nn.ELU(),), "ELU"),
    ((nn.BatchNorm2d(1, track_running_stats=False).eval(),), "batch statistics"),
    ((nn.Conv2d(1, 1, 3, padding=2, padding_mode="circular"), nn.Conv2d(1, 1, 3)), "circular padding"),
    ((nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"),), "reflect")])
def test_unbounded_layers_are_refused(layers, match):
    with pytest.raises(UnboundedForwardError, match=match):
        ErrorBoundedForward(nn.Sequential(*layers, nn.Flatten(), nn.Linear(784, 2)), input_shape=(1, 28, 28))


def test_instance_forward_override_is_refused():
    network = nn.Sequential(nn.Flatten(), nn.Linear(784, 2))
    network[1].forward = lambda x: 2 * x
    with pytest.raises(UnboundedForwardError):
        ErrorBoundedForward(network, input_shape=(1, 28, 28))


# ----------------------------------------------------------------------------- preprocessing


def _float_frames(shape, count, seed):
    rng = np.random.default_rng(seed)
    return [DecodedImage(rng.random(shape, dtype=np.float32), "rgb" if shape[2] == 3 else "mono", 1.0)
            for _ in range(count)]


@pytest.mark.parametrize("config", [
    PreprocessConfig(1, 5, 7, resize="bilinear"), PreprocessConfig(1, 5, 7, resize="area"),
    PreprocessConfig(3, 4, 4, crop_height=10, resize="bilinear")])
def test_preprocessing_bound_holds_for_the_float32_map(config):
    """||P^(x) - P^(x')|| <= ||P|| ||x - x'|| + e for the preprocessing as computed, on random
    frame pairs, in both norms; and ||P|| bounds the float32 map's explicit Jacobian."""
    height, width = 13, 17
    preprocess = Preprocessor(config)
    frames = _float_frames((height, width, 3), 40, 0)
    outputs = preprocess(frames).double().flatten(1)
    sources = torch.tensor(np.stack([f.pixels for f in frames]), dtype=torch.float64).flatten(1)
    basis = np.eye(height * width * 3, dtype=np.float32).reshape(-1, height, width, 3)
    jacobian = preprocess([DecodedImage(b, "rgb", 1.0) for b in basis]).double().flatten(1).T.numpy()
    for norm, order in (("l2", 2), ("linf", np.inf)):
        operator_norm = preprocessing_operator_norm(height, width, "rgb", config, norm)
        error = preprocessing_float_error(height, width, "rgb", config, norm)
        assert operator_norm >= np.linalg.norm(jacobian, ord=order)
        for i in range(0, 40, 2):
            out_gap = torch.linalg.vector_norm(outputs[i] - outputs[i + 1], ord=order)
            source_gap = torch.linalg.vector_norm(sources[i] - sources[i + 1], ord=order)
            assert out_gap <= operator_norm * source_gap + error


def _exact_area_map(frame: np.ndarray, order: str, config: PreprocessConfig) -> np.ndarray:
    """The exact linear preprocessing P of a uint8 frame (centre crop, whole-number area
    down-scaling, colour matrix, scale 1/255), in float64 from exact integer block sums."""
    height, width, channels = frame.shape
    crop_h, crop_w = config.crop_height or height, config.crop_width or width
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    crop = frame[top: top + crop_h, left: left + crop_w].astype(np.int64)
    rows, cols = crop_h // config.output_height, crop_w // config.output_width
    sums = crop.reshape(config.output_height, rows, config.output_width, cols, channels).sum(axis=(1, 3))
    means = sums / (rows * cols) / 255.0
    return np.einsum("oc,yxc->oyx", colour_matrix(order, config.output_channels), means)


@pytest.mark.parametrize(("shape", "order", "config"), [
    ((480, 640, 3), "rgb", PreprocessConfig(1, 28, 28, 476, 476)),  # the demo camera
    ((480, 640, 3), "bgr", PreprocessConfig(3, 28, 28, 476, 476)),
    ((64, 96, 4), "bgra", PreprocessConfig(1, 8, 12)),
    ((60, 60, 1), "mono", PreprocessConfig(3, 20, 10, crop_width=50)),
    ((33, 35, 3), "rgb", PreprocessConfig(1, 33, 35)),  # no resize
])
def test_uint8_area_path_within_the_float_error_bound(shape, order, config):
    """uint8 frames with whole-number area down-scaling: the Preprocessor's output is within half
    of `preprocessing_float_error` of the exact map P (so any pair is within the whole bound), in
    both norms, including the saturated extremes 0 and 255."""
    rng = np.random.default_rng(11)
    frames = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(6)]
    frames += [np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)]
    outputs = Preprocessor(config)([DecodedImage(f, order, 1 / 255) for f in frames]).double().numpy()
    for frame, output in zip(frames, outputs):
        gap = output - np.clip(_exact_area_map(frame, order, config), 0.0, 1.0)
        for norm, ord_ in (("l2", None), ("linf", np.inf)):
            error = preprocessing_float_error(shape[0], shape[1], order, config, norm)
            assert np.linalg.norm(gap.ravel(), ord=ord_) <= error / 2


def test_uint8_whole_number_area_resize_skips_the_float_resize(monkeypatch):
    """The demo camera geometry (476 -> 28, 17 x 17 blocks) runs on exact integer block sums, not
    through the float64 interpolation, and gives the same tensor."""
    from mixclf_ros.vision import preprocess as preprocess_module

    frame = np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    config = PreprocessConfig(1, 28, 28, 476, 476)
    expected = _exact_area_map(frame, "rgb", config)

    def refuse(x, size, mode):
        if tuple(x.shape[-2:]) != tuple(size):
            raise AssertionError("float resize used for a whole-number uint8 area resize")
        return x

    monkeypatch.setattr(preprocess_module, "_resize", refuse)
    out = Preprocessor(config)([DecodedImage(frame, "rgb", 1 / 255)])
    np.testing.assert_allclose(out[0].double().numpy(), expected, atol=1e-6)


@pytest.mark.slow
def test_bilinear_norm_covers_the_float32_weights_at_camera_size():
    """640x480 -> 28x28 bilinear, no crop: the norm of the map the preprocessing applies (explicit
    Jacobian of the float32 Preprocessor on the source pixels it reads) is within the library's norm."""
    config = PreprocessConfig(1, 28, 28, resize="bilinear")
    height, width = 480, 640
    probe = np.zeros((height, width, 1), np.float32)
    rows, columns = set(), set()
    for axis, count, found in ((0, height, rows), (1, width, columns)):
        for index in range(count):  # a source row/column is read iff a line of ones there shows up
            probe[:] = 0
            if axis == 0:
                probe[index] = 1
            else:
                probe[:, index] = 1
            if float(Preprocessor(config)([DecodedImage(probe, "mono", 1.0)]).abs().sum()) > 0:
                found.add(index)
    pixels = [(r, c) for r in sorted(rows) for c in sorted(columns)]
    columns_out = []
    preprocess = Preprocessor(config)
    for start in range(0, len(pixels), 64):
        frames = []
        for r, c in pixels[start:start + 64]:
            frame = np.zeros((height, width, 1), np.float32)
            frame[r, c] = 1
            frames.append(DecodedImage(frame, "mono", 1.0))
        columns_out.append(preprocess(frames).double().flatten(1))
    jacobian = torch.cat(columns_out).T.numpy()
    assert np.linalg.norm(jacobian, ord=2) <= preprocessing_operator_norm(height, width, "mono", config, "l2")
