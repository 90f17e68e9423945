"""The `safe` rule and what it may never do: thresholds in both units, meaningless certificates,
the largest radius a model can certify, and unpredictable smoothing noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixclf_ros.core import certify
from mixclf_ros.core.smoothing import Smooth, best_case_bounds, max_smoothing_radius
from mixclf_ros.models import load_model, zoo_config
from mixclf_ros.runtime.classifier import (
    ONE_GREY_LEVEL,
    CertificateMethod,
    CertifiedClassifier,
    LiveSettings,
    Status,
    is_safe,
)
from mixclf_ros.vision.decode import DecodedImage
from mixclf_ros.vision.preprocess import PreprocessConfig

radii = st.floats(min_value=0.0, max_value=10.0, allow_nan=False)


@given(radius=radii, image=radii, threshold=radii, image_threshold=radii)
def test_safe_needs_every_threshold_that_is_set(radius, image, threshold, image_threshold):
    safe = is_safe(Status.OK, CertificateMethod.LIPSCHITZ, radius, threshold, 3, 3, image, image_threshold)
    expected = (radius > 0 and (threshold == 0 or radius >= threshold)
                and (image_threshold == 0 or image >= image_threshold))
    assert safe == expected


def test_safe_is_false_for_nan_thresholds_and_missing_image_guarantee():
    assert not is_safe(Status.OK, CertificateMethod.LIPSCHITZ, 1.0, math.nan, 3, 3, 1.0, 0.0)
    assert not is_safe(Status.OK, CertificateMethod.LIPSCHITZ, 1.0, 0.0, 3, 3, 1.0, math.nan)
    # image_radius 0 = no image-space guarantee (e.g. an encoding whose conversion is not linear)
    assert not is_safe(Status.OK, CertificateMethod.LIPSCHITZ, 1.0, 0.0, 3, 3, 0.0, ONE_GREY_LEVEL)
    assert LiveSettings(alpha=0.6, safe_radius=0.0).safe_image_radius == ONE_GREY_LEVEL


@settings(max_examples=200, deadline=None)
@given(logits=st.lists(st.floats(-20, 20), min_size=2, max_size=12),
       lipschitz=st.floats(1e-3, 1e3), alpha=st.floats(0.0, 1.0))
def test_no_output_gets_a_larger_lipschitz_radius_than_the_maximum(logits, lipschitz, alpha):
    probs = torch.softmax(torch.tensor([logits], dtype=torch.float64), dim=1)
    radius = float(certify.lipschitz_radius(probs, lipschitz, alpha)[0])
    assert radius <= certify.max_lipschitz_radius(lipschitz, alpha, len(logits))


def test_max_lipschitz_radius_is_theorem_1_at_margin_one():
    for alpha in (0.5, 0.6, 0.8, 1.0):
        expected = (2 * alpha - 1) / (2 * alpha * 404.0)
        assert certify.max_lipschitz_radius(404.0, alpha, 10) == pytest.approx(expected, rel=1e-12)
    assert certify.max_lipschitz_radius(1.0, 0.49, 10) == 0.0


@pytest.mark.parametrize("bound", ["bernstein", "hoeffding"])
def test_no_frame_beats_the_best_case_smoothing_bounds(bound):
    """A base model that always answers class 0 with certainty reaches exactly the best case."""
    class Certain(torch.nn.Module):
        def forward(self, x):
            logits = torch.full((len(x), 10), -1e4)
            logits[:, 0] = 1e4
            return logits

    smooth = Smooth(Certain(), 10, sigma=0.25)
    generator = torch.Generator().manual_seed(1)
    certificate = smooth.certify(torch.rand(2, 1, 28, 28), n0=8, n=200, beta=1e-3, alpha=0.7,
                                 generator=generator, bound=bound)
    p_lower, p_upper = best_case_bounds(200, 1e-3, 10, bound)
    assert certificate.p_lower.tolist() == pytest.approx([p_lower] * 2)
    assert certificate.p_upper.tolist() == pytest.approx([p_upper] * 2)
    best = max_smoothing_radius(0.25, 200, 1e-3, 0.7, 10, bound)
    assert float(certificate.radius.max()) <= best
    assert float(certificate.radius.min()) == pytest.approx(best, rel=1e-6)


@pytest.fixture(scope="module")
def standard_model():
    return load_model(zoo_config("standard"))


@pytest.fixture(scope="module")
def fashion_frames():
    from mixclf_ros.data import load_fashion_mnist

    images, _ = load_fashion_mnist("test")
    return [DecodedImage(np.ascontiguousarray(images[i])[:, :, None], "mono", 1 / 255) for i in range(24)]


def test_meaningless_lipschitz_certificates_are_not_safe_by_default(tmp_path, standard_model, fashion_frames):
    """A linear robust model with a large direction shared by every logit (it moves no logit
    difference, but the sound bound must count it) has positive radii far below one grey level, by
    Theorem 1 and by the logit margin alike: with the shipped defaults no frame may be marked safe."""
    from faulty_models import flat_linear

    torch.manual_seed(0)
    network = flat_linear()
    with torch.no_grad():
        network[1].weight.add_(5000.0 * torch.randn(1, network[1].weight.shape[1]))
    weights = tmp_path / "flat_linear.pt"
    torch.save(network.state_dict(), weights)
    robust = load_model({**zoo_config("robust_lipschitz"), "architecture": "faulty_models:flat_linear",
                         "weights": str(weights), "sha256": "", "mean": [0.0], "std": [1.0]})
    classifier = CertifiedClassifier(standard_model, robust, PreprocessConfig(1, 28, 28), torch.device("cpu"))
    settings_default = LiveSettings(alpha=1.0, safe_radius=0.0)
    results = classifier.classify(fashion_frames, settings_default)
    radii = [r.certified_radius for r in results]
    assert max(radii) > 0.0, "the test needs positive (if tiny) certificates"
    assert max(r.image_radius for r in results) < ONE_GREY_LEVEL
    assert not any(r.safe for r in results)
    assert max(radii) <= classifier.max_certified_radius(settings_default)
    # the logit margin has no ceiling, so no frame size can be ruled out in advance here
    assert classifier.max_image_radius(settings_default, 28, 28, "mono") >= max(r.image_radius for r in results)
    # The same frames with the image threshold switched off are marked safe: the default decides.
    assert any(r.safe for r in classifier.classify(fashion_frames, LiveSettings(1.0, 0.0, safe_image_radius=0.0)))


def test_smoothing_noise_is_unpredictable_unless_seeded(standard_model, fashion_frames):
    robust = load_model({**zoo_config("robust_smoothing"), "n0": 16, "n": 64})
    config = PreprocessConfig(1, 28, 28)
    settings_default = LiveSettings(alpha=0.6, safe_radius=0.0)
    frame = fashion_frames[:1]

    def lower_bound(seed):
        classifier = CertifiedClassifier(standard_model, robust, config, torch.device("cpu"), seed=seed)
        result = classifier.classify(frame, settings_default)[0]
        return classifier.seed_is_fixed, (result.robust_margin, result.probability, result.certified_radius)

    fixed = [lower_bound(7) for _ in range(2)]
    assert fixed[0] == fixed[1] and fixed[0][0] is True
    fresh = [lower_bound(None) for _ in range(3)]
    assert all(not is_fixed for is_fixed, _ in fresh)
    assert len({outcome for _, outcome in fresh}) == 3, "fresh OS entropy must give different noise per process"


def test_a_result_without_a_certificate_has_certificate_method_none(standard_model, fashion_frames):
    """The message defines "a certificate exists" as certificate_method != NONE: below alpha 0.5 (no
    certificate) every result says NONE; above, exactly the frames with a positive radius say LIPSCHITZ."""
    robust = load_model(zoo_config("robust_lipschitz"))
    classifier = CertifiedClassifier(standard_model, robust, PreprocessConfig(1, 28, 28), torch.device("cpu"))
    low = classifier.classify(fashion_frames, LiveSettings(alpha=0.3, safe_radius=0.0))
    assert all(r.status == Status.OK and r.certificate_method == CertificateMethod.NONE for r in low)
    assert all((r.certified_radius, r.confidence, r.safe) == (0.0, 0.0, False) for r in low)
    high = classifier.classify(fashion_frames, LiveSettings(alpha=1.0, safe_radius=0.0))
    assert any(r.certified_radius > 0 for r in high)
    for result in high:
        expected = CertificateMethod.LIPSCHITZ if result.certified_radius > 0 else CertificateMethod.NONE
        assert result.certificate_method == expected


def test_a_bad_frame_in_a_batch_fails_alone_and_the_others_are_classified_as_alone(standard_model,
                                                                                     fashion_frames):
    """The batch is preprocessed at once; a bad frame among good ones (too small for the crop, NaN
    samples) gets BAD_INPUT and `safe = false` by itself, and every other frame the result it gets
    alone."""
    robust = load_model(zoo_config("robust_lipschitz_gnp"))
    classifier = CertifiedClassifier(standard_model, robust, PreprocessConfig(1, 28, 28, 20, 20), torch.device("cpu"))
    settings = LiveSettings(alpha=0.75, safe_radius=0.0)
    tiny = DecodedImage(np.zeros((8, 8, 1), np.uint8), "mono", 1 / 255)
    nan = DecodedImage(np.full((28, 28, 1), np.nan, np.float32), "mono", 1.0)
    frames = [fashion_frames[0], tiny, fashion_frames[1], nan, fashion_frames[2]]
    results = classifier.classify(frames, settings)
    assert [r.status for r in results] == [Status.OK, Status.BAD_INPUT, Status.OK, Status.BAD_INPUT, Status.OK]
    assert not results[1].safe and "crop" in results[1].status_message
    assert not results[3].safe and "NaN" in results[3].status_message
    good = classifier.classify(fashion_frames[:3], settings)  # one batch, all good
    for index, result in enumerate([results[0], results[2], results[4]]):
        [alone] = classifier.classify([fashion_frames[index]], settings)
        for other in (good[index], alone):
            assert (result.class_id, result.safe) == (other.class_id, other.safe)
            assert result.certified_radius == pytest.approx(other.certified_radius, rel=1e-9)
