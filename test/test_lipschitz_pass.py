"""The certificate at the price of one pass (issue 21): the cheap per-sample l2 rounding bound, and
the switch to the componentwise bound where the cheap one would change `safe` or cost more than
`RADIUS_FRACTION` of the radius. Every radius is checked against Theorem 1 recomputed from the
same probabilities with the componentwise bound, so a radius from a bound that does not hold, or
a switch that does not happen, fails."""

from __future__ import annotations

import pytest
import torch

from mixclf_ros.core import certify, forward_error
from mixclf_ros.core.forward_error import ErrorBoundedForward, covered_kernels
from mixclf_ros.core.numerics import full_precision_flags, precision_flags, probabilities_with_error
from mixclf_ros.models.loading import load_model, zoo_config
from mixclf_ros.runtime import lipschitz_pass
from mixclf_ros.runtime.lipschitz_pass import LipschitzPass

ALPHA = 0.6


@pytest.fixture(scope="module")
def robust():
    model = load_model(zoo_config("robust_lipschitz"))
    bounded = ErrorBoundedForward(model.network, input_shape=model.input_shape, plan=model.bound_plan)
    return model, bounded


@pytest.fixture(scope="module")
def frames():
    from mixclf_ros.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return torch.from_numpy(images[:64]).float().div(255).unsqueeze(1)


def componentwise_radius(model, bounded, x):
    logits, error = bounded(x, componentwise=True)
    probs, probability_error = probabilities_with_error(logits, error)
    return certify.lipschitz_radius(probs, model.lipschitz_constant, ALPHA, probability_error=probability_error)


def never(radii: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(radii, dtype=torch.bool)


def test_the_cheap_bound_holds_and_costs_less_than_the_stated_fraction(robust, frames):
    model, bounded = robust
    cheap_logits, cheap_error = bounded(frames, componentwise=False)
    full_logits, full_error = bounded(frames, componentwise=True)
    assert torch.equal(cheap_logits, full_logits)  # one pass computes the logits; only the bound differs
    assert (cheap_error >= full_error).all()  # the componentwise result is the smaller of both bounds
    certificate = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        _, probs, _, radius = certificate(frames, ALPHA, never)
    best = certify.lipschitz_radius(probs, model.lipschitz_constant, ALPHA)
    assert certificate.componentwise_frames == 0  # the zoo model's cheap bound is 1e-11: no frame needs more
    assert (radius <= best).all() and (radius >= (1 - lipschitz_pass.RADIUS_FRACTION) * best).all()
    assert (radius > 0).sum() > 10


def test_frames_whose_radius_the_cheap_bound_lowers_too_much_get_the_componentwise_bound(robust, frames,
                                                                                         monkeypatch):
    model, bounded = robust
    monkeypatch.setattr(lipschitz_pass, "RADIUS_FRACTION", 0.0)  # any loss at all is too much
    certificate = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        _, _, _, radius = certificate(frames, ALPHA, never)
        expected = componentwise_radius(model, bounded, frames)
    certified = int((expected > 0).sum())
    assert certificate.componentwise_frames >= certified > 10
    torch.testing.assert_close(radius, expected, rtol=0, atol=0)


def test_a_frame_whose_safe_the_cheap_bound_would_change_gets_the_componentwise_bound(robust, frames):
    model, bounded = robust
    certificate = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        cheap = certificate(frames, ALPHA, never)[3]
        tight = componentwise_radius(model, bounded, frames)
    gaps = (tight - cheap).clamp_min(0)
    frame = int(gaps.argmax())
    assert float(gaps[frame]) > 0
    with torch.inference_mode():  # as the pass computes it: the frame alone (float64 logits may differ in the
        alone = float(componentwise_radius(model, bounded, frames[frame:frame + 1])[0])  # last bit with the batch)
    threshold = float(cheap[frame] + alone) / 2  # met by the tight radius only
    assert float(cheap[frame]) < threshold <= alone

    def meets(radii: torch.Tensor) -> torch.Tensor:
        return radii >= threshold

    switched = LipschitzPass(bounded, model.lipschitz_constant)
    with torch.inference_mode():
        _, _, _, radius = switched(frames, ALPHA, meets)
    assert switched.componentwise_frames == 1
    assert float(radius[frame]) == alone >= threshold


def test_with_the_logits_bound_the_radius_is_the_larger_sound_one(frames):
    """The 1-Lipschitz zoo model, whose logit bound is computed: the pass issues the logit-margin
    radius where it is larger, never above the error-free radius of the same logits, and never
    below Theorem 1 with the componentwise bound."""
    model = load_model(zoo_config("robust_lipschitz_gnp"))
    bounded = ErrorBoundedForward(model.network, input_shape=model.input_shape, plan=model.bound_plan)
    certificate = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm)
    with torch.inference_mode():
        logits, probs, _, radius = certificate(frames, ALPHA, never)
    error_free = certify.best_lipschitz_radius(probs, 0.0, model.lipschitz_constant, ALPHA, logits=logits,
                                               logit_lipschitz=model.logit_lipschitz_constant)
    assert (radius <= error_free).all() and (radius >= (1 - lipschitz_pass.RADIUS_FRACTION) * error_free).all()
    assert (radius >= componentwise_radius(model, bounded, frames)).all()
    assert (radius > 2 * componentwise_radius(model, bounded, frames)).sum() > 10


class CheapRefused:
    """A bounded forward whose cheap domain fails, as a rule that breaks only there would."""

    def __init__(self, bounded: ErrorBoundedForward):
        self.bounded = bounded

    def __call__(self, x: torch.Tensor, componentwise: bool = True):
        if not componentwise:
            raise lipschitz_pass.UnboundedForwardError("a rule fails in the cheap domain")
        return self.bounded(x, componentwise=True)


def test_a_model_the_cheap_domain_fails_on_gets_the_componentwise_bound_on_every_frame(robust, frames):
    model, bounded = robust
    certificate = LipschitzPass(CheapRefused(bounded), model.lipschitz_constant)
    with torch.inference_mode():
        _, _, _, radius = certificate(frames, ALPHA, never)
        _, _, _, again = certificate(frames, ALPHA, never)
    assert "cheap domain" in certificate.cheap_refusal
    assert torch.equal(radius, componentwise_radius(model, bounded, frames)) and torch.equal(radius, again)


# ----------------------------------------------------------------------------- the float32 route


@pytest.fixture(scope="module", params=["robust_lipschitz", "robust_lipschitz_gnp"])
def both_precisions(request):
    """A zoo model with its float64 bounded forward and the float32 one of its recast plan."""
    model = load_model(zoo_config(request.param))
    bounded = ErrorBoundedForward(model.network, input_shape=model.input_shape, plan=model.bound_plan)
    float32 = ErrorBoundedForward(model.network, torch.float32, plan=model.bound_plan.recast(torch.float32))
    return model, bounded, float32


def hard_inputs(frames: torch.Tensor) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (16, *frames.shape[1:])  # 16 frames: torch would pick NNPACK for them, were it on
    return {"fashion-mnist": frames, "zeros": torch.zeros(shape), "ones": torch.ones(shape),
            "uniform": torch.rand(shape, generator=generator),
            "binary": torch.randint(0, 2, shape, generator=generator).float()}


def test_the_float32_bound_covers_the_exact_logits(both_precisions, frames):
    """|logits32 - exact| <= bound32 and |logits64 - exact| <= bound64, so the two computed logits
    are within the sum of the bounds: checked on real and on extreme inputs, in both domains."""
    _, bounded, float32 = both_precisions
    with torch.inference_mode():
        for name, x in hard_inputs(frames).items():
            logits, error = bounded(x, componentwise=True)
            for componentwise in (False, True):
                logits32, error32 = float32(x, componentwise=componentwise)
                assert logits32.dtype == torch.float32
                gap = (logits32.double() - logits).abs()
                assert (gap <= error32.double() + error).all(), (name, componentwise)
                assert (error32 < 1.0).all() and float(error32.max()) > 100 * float(gap.max()), name


def test_the_float32_plan_shares_the_weights_and_the_operator_norms(both_precisions):
    model, bounded, float32 = both_precisions
    assert float32.plan.norm_store is model.bound_plan.norm_store
    assert float32.unit_roundoff == 2.0 ** -24 and bounded.unit_roundoff == 2.0 ** -53
    for (name, value), other in zip(bounded.plan.network.state_dict().items(),
                                    float32.plan.network.state_dict().values()):
        assert torch.equal(other.double(), value), name


def test_the_float32_route_is_sound_and_keeps_frames_only_within_the_fraction(both_precisions, frames, monkeypatch):
    """Its radius is never above the error-free radius of the float64 logits; where no frame falls
    back, it is within RADIUS_FRACTION of the error-free radius of its own logits. With the fraction
    at 20 % some certified frames keep the float32 certificate."""
    model, bounded, float32 = both_precisions
    with torch.inference_mode():
        logits64, _ = bounded(frames, componentwise=True)
        logits32 = float32(frames, componentwise=False)[0].double()
    for fraction in (lipschitz_pass.RADIUS_FRACTION, 0.2):
        monkeypatch.setattr(lipschitz_pass, "RADIUS_FRACTION", fraction)
        certificate = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm,
                                    float32)
        with torch.inference_mode():
            logits, _, _, radius = certificate(frames, ALPHA, never)
        error_free = {name: certify.best_lipschitz_radius(torch.softmax(z, dim=1), 0.0, model.lipschitz_constant,
                                                          ALPHA, logits=z,
                                                          logit_lipschitz=model.logit_lipschitz_constant)
                      for name, z in (("64", logits64), ("32", logits32))}
        assert (radius <= error_free["64"]).all()
        kept = certificate.last_routes == lipschitz_pass.ROUTES.index("float32")
        assert int(kept.sum()) == certificate.frames["float32"] and sum(certificate.frames.values()) == len(frames)
        assert torch.equal(logits[kept], logits32[kept])
        # the frames that went on were evaluated as a smaller batch: float64 may differ in the last bit
        torch.testing.assert_close(logits[~kept], logits64[~kept], rtol=1e-12, atol=1e-12)
        assert (radius[kept] >= (1 - fraction) * error_free["32"][kept]).all()
        # short partial sums (`partial_sums`) keep the float32 bound near 1e-3 on these logits: certified
        # frames keep the float32 certificate even at 0.1 %, and some go on to float64
        assert ((radius > 0) & kept).sum() > (10 if fraction == 0.2 else 5)
        assert fraction == 0.2 or not kept.all()


def test_a_frame_whose_safe_the_float32_bound_would_change_falls_back_to_float64(both_precisions, frames,
                                                                                  monkeypatch):
    model, bounded, float32 = both_precisions
    monkeypatch.setattr(lipschitz_pass, "RADIUS_FRACTION", 1.0)  # no frame falls back for its radius alone
    args = (bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm)
    with torch.inference_mode():
        loose = LipschitzPass(*args, float32)(frames, ALPHA, never)[3]
        tight = LipschitzPass(*args)(frames, ALPHA, never)[3]
    frame = int((tight - loose).argmax())
    assert float(tight[frame]) > float(loose[frame])
    threshold = float(loose[frame] + tight[frame]) / 2  # met by the float64 radius only

    def meets(radii: torch.Tensor) -> torch.Tensor:
        met = torch.zeros_like(radii, dtype=torch.bool)
        met[frame] = radii[frame] >= threshold
        return met

    certificate = LipschitzPass(*args, float32)
    with torch.inference_mode():
        _, _, _, radius = certificate(frames, ALPHA, meets)
    assert certificate.frames["float32"] == len(frames) - 1
    assert certificate.frames["float64"] + certificate.frames["componentwise"] == 1
    assert certificate.last_routes[frame] != lipschitz_pass.ROUTES.index("float32")
    with torch.inference_mode():  # the frame alone: float64 logits may differ in the last bit with the batch size
        alone = LipschitzPass(*args)(frames[frame:frame + 1], ALPHA, never)[3]
    assert float(radius[frame]) == float(alone[0]) >= threshold


def test_the_float32_route_is_given_up_where_it_keeps_too_few_frames(both_precisions, frames, monkeypatch):
    """Where most frames need float64 (here: at alpha 1 every frame is certified, and with the
    fraction at 1e-9 every one loses more than that in float32): after the trial, float64 alone, one
    pass per frame."""
    model, bounded, float32 = both_precisions
    monkeypatch.setattr(lipschitz_pass, "RADIUS_FRACTION", 1e-9)
    certificate = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm,
                                float32)
    with torch.inference_mode():
        first = certificate(frames, 1.0, never)[3]
        float64_frames = certificate.frames["float64"] + certificate.frames["componentwise"]
        assert certificate.frames["float32"] == 0 and float64_frames == len(frames)
        assert certificate.float32_refusal.startswith(lipschitz_pass.LOOSE)
        again = certificate(frames, 1.0, never)[3]
        assert certificate.frames["float32"] == 0 and torch.equal(first, again)
        assert certificate.frames["float64"] + certificate.frames["componentwise"] == 2 * len(frames)
        certificate.restart_float32_trial()  # as after warm-up: tried again
        assert certificate.float32_refusal == ""
        certificate(frames[:8], 1.0, never)
    assert certificate.float32_tried == 8 and certificate.float32_refusal == ""
    float64_only = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm)
    assert float64_only.float32_refusal == "no float32 plan"


@pytest.mark.parametrize(("float32_ms", "float64_ms", "given_up"), [(0.1, 10.0, False), (5.0, 3.0, True)])
def test_the_float32_route_stays_where_it_pays_on_the_device(both_precisions, frames, monkeypatch, float32_ms,
                                                             float64_ms, given_up):
    """The trial measures both routes on this device: float32 first stays where it costs less than
    float64 alone (a device with slow float64: 0.1 against 10 ms a frame, though at most half the frames
    keep it at a 1e-6 fraction), and is given up where it costs more (this CPU's 5 against 3 ms),
    whatever share of frames it keeps. Simulated times, real passes."""
    model, bounded, float32 = both_precisions
    monkeypatch.setattr(lipschitz_pass, "RADIUS_FRACTION", 1e-6)
    clock = [0.0]
    evaluate = LipschitzPass._evaluate

    def timed(self, route, x):
        clock[0] += 1e-3 * len(x) * (float32_ms if route == "float32" else float64_ms)
        return evaluate(self, route, x)

    monkeypatch.setattr(LipschitzPass, "_evaluate", timed)
    monkeypatch.setattr(lipschitz_pass, "_clock", lambda x: clock[0])
    certificate = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm,
                                float32)
    with torch.inference_mode():
        radius = certificate(frames, ALPHA, never)[3]
    kept = certificate.frames["float32"]
    assert 0 < kept <= len(frames) // 2
    assert certificate.route_seconds["float32"] == [pytest.approx(1e-3 * float32_ms * len(frames)), len(frames)]
    assert certificate.float32_refusal.startswith(lipschitz_pass.LOOSE) == given_up
    if given_up:
        assert f"{float32_ms:.2f} ms a frame, against {float64_ms:.2f} ms" in certificate.float32_refusal
    float64_only = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm)
    with torch.inference_mode():
        assert (radius <= float64_only(frames, ALPHA, never)[3] * (1 + 1e-9)).all()


def test_the_float32_pass_runs_only_covered_kernels_and_restores_the_switches():
    """No oneDNN (its float32 convolutions follow ONEDNN_DEFAULT_FPMATH_MODE, bf16 included), no
    NNPACK (FFT, Winograd), no TF32: inside only; float64 passes change no CPU switch."""
    before = (torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled(), precision_flags())
    with covered_kernels(torch.float32, cuda=False):
        assert not torch.backends.mkldnn.enabled and not torch._C._get_nnpack_enabled()
        assert precision_flags() == full_precision_flags()
    assert (torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled(), precision_flags()) == before
    with covered_kernels(torch.float64, cuda=False):
        assert (torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled(), precision_flags()) == before


def test_the_float32_bound_holds_where_onednn_would_round_to_bfloat16(tmp_path):
    """ONEDNN_DEFAULT_FPMATH_MODE=BF16 makes oneDNN's float32 convolutions round to bfloat16, even
    inside full_precision(), beyond the float32 dot-product bound gamma_n |W| |x|: the float32 pass
    runs none (`covered_kernels`), and its convolutions and the model's bound hold."""
    script = tmp_path / "bf16.py"
    script.write_text(
        "import torch, torch.nn.functional as F\n"
        "from mixclf_ros.core.forward_error import ErrorBoundedForward, covered_kernels\n"
        "from mixclf_ros.core.numerics import full_precision, gamma\n"
        "from mixclf_ros.models.loading import load_model, zoo_config\n"
        "torch.set_num_threads(1)\n"
        "x, w = torch.rand(16, 64, 28, 28), torch.rand(64, 64, 3, 3) - 0.5\n"
        "exact = F.conv2d(x.double(), w.double())\n"
        "bound = gamma(64 * 9, 2.0 ** -24) * F.conv2d(x.double(), w.double().abs())\n"
        "with full_precision():\n"
        "    onednn = bool(((F.conv2d(x, w).double() - exact).abs() <= bound).all())\n"
        "with covered_kernels(torch.float32, cuda=False):\n"
        "    native = bool(((F.conv2d(x, w).double() - exact).abs() <= bound).all())\n"
        "with covered_kernels(torch.float32, cuda=False):  # loading checks the float32 model against its plan\n"
        "    model = load_model(zoo_config('robust_lipschitz_gnp'))\n"
        "    float32 = ErrorBoundedForward(model.network, torch.float32, plan=model.bound_plan.recast(torch.float32))\n"
        "exact = ErrorBoundedForward(model.network, plan=model.bound_plan)\n"
        "frames = torch.rand(16, 1, 28, 28)\n"
        "(logits, error), (logits32, error32) = exact(frames), float32(frames, componentwise=False)\n"
        "print(onednn, native, bool(((logits32.double() - logits).abs() <= error32.double() + error).all()))\n")
    import os
    import subprocess
    import sys

    env = {**os.environ, "ONEDNN_DEFAULT_FPMATH_MODE": "BF16", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    # oneDNN breaks the bound where it honours the mode (it did on the machine this test was written on,
    # not on every CPU); the native convolutions and the pass hold everywhere
    assert result.stdout.split()[-2:] == ["True", "True"]


def test_on_cpus_where_torch_runs_winograd_convolutions_the_float32_route_is_refused(both_precisions, frames,
                                                                                    monkeypatch):
    model, bounded, float32 = both_precisions
    monkeypatch.setattr(forward_error.platform, "machine", lambda: "armv7l")
    certificate = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant, model.norm,
                                float32)
    with torch.inference_mode():
        radius = certificate(frames, ALPHA, never)[3]
        expected = LipschitzPass(bounded, model.lipschitz_constant, model.logit_lipschitz_constant,
                                 model.norm)(frames, ALPHA, never)[3]
    assert "Winograd" in certificate.float32_refusal and certificate.frames["float32"] == 0
    assert torch.equal(radius, expected)


def test_certificate_precision_is_a_checked_choice():
    """auto (the default) takes the float64 routes on the CPU and the float32 route first on CUDA;
    float32 and float64 say which; a misspelled value is refused by the classifier and by the one
    check of the node's (and mixclf-eval's) parameters."""
    from mixclf_ros.runtime.classifier import CertifiedClassifier, float32_route_first
    from mixclf_ros.runtime.node_parameters import BY_NAME, CERTIFICATE_PRECISIONS, refused_parameters
    from mixclf_ros.vision.preprocess import PreprocessConfig

    standard, robust = load_model(zoo_config("standard")), load_model(zoo_config("robust_lipschitz_gnp"))
    preprocess = PreprocessConfig(1, 28, 28, 476, 476)
    cpu = torch.device("cpu")
    default = CertifiedClassifier(standard, robust, preprocess, cpu, seed=0)
    assert default.lipschitz_pass.float32 is None
    assert default.lipschitz_pass.float32_refusal == "certificate_precision is auto on cpu"
    assert [float32_route_first(precision, torch.device(kind)) for kind in ("cpu", "cuda")
            for precision in CERTIFICATE_PRECISIONS] == [False, False, True, True, False, True]
    float32 = CertifiedClassifier(standard, robust, preprocess, cpu, seed=0, certificate_precision="float32")
    assert float32.lipschitz_pass.float32 is not None and float32.lipschitz_pass.float32_refusal == ""
    refusal = "certificate_precision must be one of auto, float64, float32, got 'flaot32'"
    with pytest.raises(ValueError, match=refusal):
        CertifiedClassifier(standard, robust, preprocess, cpu, seed=0, certificate_precision="flaot32")
    assert BY_NAME["certificate_precision"].default == CERTIFICATE_PRECISIONS[0] == "auto"
    assert refused_parameters({"certificate_precision": "float64"}) == []
    assert refused_parameters({"certificate_precision": "flaot32"}) == [
        "certificate_precision: 'flaot32' is not one of auto, float64, float32 (nearest known: float32)"]
