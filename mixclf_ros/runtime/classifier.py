"""From decoded camera frames to certified classifications, with no ROS in sight.

`CertifiedClassifier` is what the node runs on every batch of frames: preprocessing on the
device, both forward passes, the mixture (eq. 4), the certificate of the configured robust model
(Theorem 1 or Theorem 2) and the `safe` decision. The node only decodes messages, checks their
age and copies `FrameResult` fields into `CertifiedClassification` messages.

Radii are in the certificate's norm, in pixel intensities scaled to [0, 1]: `certified_radius` at
the model input, `image_radius` in the source image (through the preprocessing's operator norm).

Numerics: the robust model and the certificate run inside `numerics.full_precision()` (no TF32 or
other reduced-precision paths), the standard model outside it (its fast paths and optional fp16
stay). A Lipschitz robust model's certificate forward runs with a rigorous bound of its rounding
error (`runtime.lipschitz_pass`: the bound engine's plan, one pass; float32 first where
`certificate_precision` is float32, or auto on CUDA; float64 for the frames whose float32 bound is
too loose), subtracted from the margin. Radii in `FrameResult`
are float32 values rounded towards zero, so the message's float32 fields carry them exactly.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import replace

import torch

from mixclf_ros.core import certify
from mixclf_ros.core.forward_error import ErrorBoundedForward, UnboundedForwardError, covered_kernels
from mixclf_ros.core.mixing import mix_log_probs
from mixclf_ros.core.numerics import full_precision, probabilities_with_error
from mixclf_ros.core.smoothing import Smooth, max_smoothing_radius
from mixclf_ros.runtime.frame_result import (  # noqa: F401 (re-exported: the results' names)
    NORM_CODES,
    ONE_GREY_LEVEL,
    CertificateMethod,
    FrameResult,
    LiveSettings,
    Status,
    _meets,
    is_safe,
)
from mixclf_ros.runtime.lipschitz_pass import LipschitzPass
from mixclf_ros.runtime.node_parameters import CERTIFICATE_PRECISIONS
from mixclf_ros.vision.decode import BadImageError, DecodedImage
from mixclf_ros.vision.preprocess import (
    PreprocessConfig,
    Preprocessor,
    image_radius,
    preprocessing_float_error,
    preprocessing_operator_norm,
)

FLOAT32_PROBABILITY_ERROR = 1e-4
"""Probability error assumed for a Lipschitz robust model that runs only in float32 (an estimate:
about 1 000 times the float32 unit roundoff)."""


def select_device(requested: str) -> torch.device:
    """`auto`: the first CUDA device if there is one, else the CPU; or `cpu`, `cuda`, `cuda:N`."""
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{requested}' requested but CUDA is not available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device '{requested}' (use auto, cpu or cuda:N)")
    return device


_PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def float32_route_first(certificate_precision: str, device: torch.device) -> bool:
    """Whether the Lipschitz certificate tries its float32 route first: float32, or auto on CUDA."""
    return certificate_precision == "float32" or (certificate_precision == "auto" and device.type == "cuda")


class _CastInput(torch.nn.Module):
    """Runs a model in a lower precision and returns float32 logits."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.model = model.to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype)).float()


def _model_config(model: torch.nn.Module) -> dict:
    """The model config of a loaded model (`models.LoadedModel.config`); a bare module must be
    given its preprocessing explicitly."""
    config = getattr(model, "config", None)
    if not config:
        raise ValueError("the standard model has no model config: give standard_preprocess")
    return config


class CertifiedClassifier:
    """Mixed classification with a certificate for a batch of camera frames.

    Args:
        standard: accurate model g, taking [0,1] pixels (N, C, H, W) and returning logits.
        robust: robust model h (a `models.LoadedModel`), with `kind` in {lipschitz, smoothing,
            empirical}; lipschitz models carry `lipschitz_constant` (probability outputs, in
            `norm`), smoothing models `sigma`, `n0`, `n`.
        preprocess: how frames become the robust model's input (None: from its config,
            `PreprocessConfig.for_model`). The certificate, `image_radius` and its operator norm go
            through this preprocessing only: by Lemma 1 the certified class and radius do not depend
            on the standard model's input.
        standard_preprocess: how frames become the standard model's input (None: from its config
            when `preprocess` is None, else `preprocess` at the standard model's input size and
            channels). Each model may take its own size, channels, crop and resize.
        device: where preprocessing, both models and the certificate run.
        standard_precision: float32, float16 or bfloat16 for g only (CUDA only; the certificate
            does not depend on g). The robust model runs in float32 (smoothing) or in float32
            and float64 (Lipschitz certificate), always inside `numerics.full_precision()`.
        certificate_precision: float64: a Lipschitz robust model's certificate pass runs in
            float64; float32: first in float32, with its own rigorous bound, and in float64 for the
            frames whose float32 bound could change `safe` or cost radius (`runtime.lipschitz_pass`);
            auto (default): float32 on CUDA, float64 on the CPU (`node_parameters.CERTIFICATE_PRECISIONS`).
            Where no float32 plan can be built, float64 (`lipschitz_pass.float32_refusal` says why).
        seed: seed of the smoothing noise; None (default) draws it from the OS's entropy, so an
            attacker cannot replay the noise. A fixed seed is for tests and replay only: it voids the
            1 - beta guarantee against an attacker who knows it (`seed_is_fixed` says so).

    Attributes:
        forward_error: how the floating-point error of a Lipschitz robust model's forward pass is
            accounted for: "bounded" (rigorous running error bound of a float32 or float64 forward),
            "estimated" (the network has layers `ErrorBoundedForward` cannot bound: a float64 copy
            of the model, with the float32/float64 disagreement taken as its error, an estimate
            with a wide safety factor, not a proof), "estimated-float32" (the model does not run
            in float64: float32 with `FLOAT32_PROBABILITY_ERROR` taken as its error, an estimate)
            or "" (not a Lipschitz certificate).
    """

    def __init__(
        self,
        standard: torch.nn.Module,
        robust: torch.nn.Module,
        preprocess: PreprocessConfig | None,
        device: torch.device,
        standard_precision: str = "float32",
        seed: int | None = None,
        standard_preprocess: PreprocessConfig | None = None,
        certificate_precision: str = CERTIFICATE_PRECISIONS[0],
    ):
        if standard_precision not in _PRECISIONS:
            raise ValueError(f"standard_precision must be one of {sorted(_PRECISIONS)}")
        if certificate_precision not in CERTIFICATE_PRECISIONS:
            raise ValueError(f"certificate_precision must be one of {', '.join(CERTIFICATE_PRECISIONS)}, got "
                             f"{certificate_precision!r}")
        self.certificate_precision = certificate_precision
        if standard_precision != "float32" and device.type != "cuda":
            # Half-precision convolutions on the CPU are slower than float32, not faster.
            standard_precision = "float32"
        self.standard_precision = standard_precision
        self.device = device
        self.kind = robust.kind
        self.norm = robust.norm if robust.kind == "lipschitz" else "l2"
        self.num_classes = robust.num_classes
        standard = standard.to(device).eval()
        if standard_precision != "float32":
            standard = _CastInput(standard, _PRECISIONS[standard_precision])
        self.robust = robust.to(device).eval()
        self.standard = standard
        self.forward_error = ""
        self.forward_error_bound = math.nan
        """The bounded forward's probability error bound at a grey frame (NaN when not bounded)."""
        self.robust_bounded: ErrorBoundedForward | None = None
        self.lipschitz_pass: LipschitzPass | None = None
        self.robust_float64: torch.nn.Module | None = None
        if self.kind == "lipschitz":
            try:
                self.robust_bounded = ErrorBoundedForward(getattr(robust, "network", robust),
                                                          input_shape=robust.input_shape,
                                                          plan=getattr(robust, "bound_plan", None)).to(device)
                self.forward_error = "bounded"
                self.forward_error_bound = self._probe_forward_error(device)
                float32, refusal = self._float32_bounded(device)
                self.lipschitz_pass = LipschitzPass(self.robust_bounded, robust.lipschitz_constant,
                                                    getattr(robust, "logit_lipschitz_constant", 0.0), self.norm,
                                                    float32, refusal)
            except UnboundedForwardError:
                self.forward_error = "estimated"
                try:
                    self.robust_float64 = copy.deepcopy(self.robust).to(torch.float64).eval()
                    with torch.inference_mode():
                        self.robust_float64(torch.zeros(1, *robust.input_shape, dtype=torch.float64, device=device))
                except Exception:  # e.g. a TorchScript model with float32 hard-wired inside
                    self.robust_float64 = None
                    self.forward_error = "estimated-float32"
        if standard_preprocess is None:
            if preprocess is None:
                standard_preprocess = PreprocessConfig.for_model(_model_config(standard))
            else:
                channels, height, width = getattr(standard, "input_shape", robust.input_shape)
                standard_preprocess = replace(preprocess, output_channels=channels, output_height=height,
                                              output_width=width)
        if preprocess is None:
            preprocess = PreprocessConfig.for_model(robust.config)
        self.preprocess_config = replace(preprocess, device=str(device))
        self.preprocess = Preprocessor(self.preprocess_config)
        self.standard_preprocess_config = replace(standard_preprocess, device=str(device))
        self.standard_preprocess = (self.preprocess if self.standard_preprocess_config == self.preprocess_config
                                    else Preprocessor(self.standard_preprocess_config))
        self.smooth = None
        if self.kind == "smoothing":
            self.smooth = Smooth(self.robust, self.num_classes, robust.sigma)
            self.smoothing_samples = (int(robust.n0), int(robust.n))
        self.seed_is_fixed = seed is not None
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def certificate_method(self) -> CertificateMethod:
        return {
            "lipschitz": CertificateMethod.LIPSCHITZ,
            "smoothing": CertificateMethod.RANDOMIZED_SMOOTHING,
        }.get(self.kind, CertificateMethod.NONE)

    def _float32_bounded(self, device: torch.device) -> tuple[ErrorBoundedForward | None, str]:
        """The robust model's float32 error-bounded forward (its float64 plan recast: compiled once,
        the same weights and operator norms), or None and why not."""
        if not float32_route_first(self.certificate_precision, device):
            return None, f"certificate_precision is {self.certificate_precision} on {device.type}"
        try:
            with covered_kernels(torch.float32, cuda=False):  # its checks run the model as the pass will
                plan = self.robust_bounded.plan.recast(torch.float32)
            network = getattr(self.robust, "network", self.robust)
            return ErrorBoundedForward(network, torch.float32, plan=plan).to(device), ""
        except UnboundedForwardError as error:
            return None, f"no float32 plan: {error}"

    def _probe_forward_error(self, device: torch.device) -> float:
        """The probability error bound of the bounded robust forward at a mid-grey input: deep
        networks compound the componentwise bound, and a bound this large comes off every margin."""
        probe = torch.full((1, *self.robust.input_shape), 0.5, device=device)
        with torch.inference_mode(), full_precision():
            return float(probabilities_with_error(*self.robust_bounded(probe))[1].max())

    def max_certified_radius(self, settings: LiveSettings) -> float:
        """The largest `certified_radius` any frame can get at these settings ([0,1] pixels at the
        model input, in `norm`): `certify.max_lipschitz_radius`, or Theorem 2 at the best
        Monte Carlo outcome of n samples. 0 for an empirical robust model or alpha < 1/2."""
        if self.kind == "lipschitz":
            return certify.max_lipschitz_radius(self.robust.lipschitz_constant, settings.alpha, self.num_classes,
                                                self.lipschitz_pass.logit_lipschitz_constant
                                                if self.lipschitz_pass is not None else 0.0)
        if self.kind == "smoothing":
            return max_smoothing_radius(self.robust.sigma, self.smoothing_samples[1], 1.0 - settings.confidence,
                                        settings.alpha, self.num_classes)
        return 0.0

    def max_image_radius(self, settings: LiveSettings, source_height: int, source_width: int,
                         channel_order: str) -> float:
        """`max_certified_radius` carried into a source image of this size and channel order (inf
        stays inf through a linear preprocessing: the logit-margin radius has no ceiling)."""
        operator_norm = preprocessing_operator_norm(source_height, source_width, channel_order,
                                                    self.preprocess_config, self.norm)
        largest = self.max_certified_radius(settings)
        if math.isinf(largest) and math.isfinite(operator_norm) and operator_norm > 0:
            return math.inf
        return image_radius(largest, operator_norm)

    def warm_up(self, settings: LiveSettings, repeats: int = 3) -> float:
        """Runs the full path on blank frames; returns the time of the first pass in ms."""
        configs = (self.preprocess_config, self.standard_preprocess_config)
        channels = max(config.output_channels for config in configs)
        height = max(64, *(config.crop_height for config in configs))
        width = max(64, *(config.crop_width for config in configs))
        order = "mono" if channels == 1 else "rgb"
        blank = DecodedImage(torch.zeros(height, width, channels, dtype=torch.uint8).numpy(), order, 1 / 255)
        first_ms = 0.0
        for index in range(repeats):
            start = time.perf_counter()
            results = self.classify([blank], settings)
            if index == 0:
                first_ms = (time.perf_counter() - start) * 1e3
            if results[0].status != Status.OK:
                raise RuntimeError(f"warm-up failed: {results[0].status_message}")
        self.restart_float32_trial()
        return first_ms

    def restart_float32_trial(self) -> None:
        """The float32 route's trial starts again with the next frame (blank warm-up frames say
        nothing of the camera's)."""
        if self.lipschitz_pass is not None:
            self.lipschitz_pass.restart_float32_trial()

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def classify(self, images: list[DecodedImage], settings: LiveSettings) -> list[FrameResult]:
        """Classifies and certifies a batch of frames. Never raises for a bad frame or a model
        failure: those frames get BAD_INPUT or MODEL_ERROR results with `safe = false`."""
        start = time.perf_counter()
        results: list[FrameResult | None] = [None] * len(images)
        x, x_standard, kept = self._preprocessed(images, settings, results)
        if kept:
            try:
                batch_results = self._classify_batch(x, x_standard, [images[i] for i in kept], settings)
            except Exception as error:  # a model failure must not take the node down
                message = f"model error: {type(error).__name__}: {error}"
                batch_results = [FrameResult.failure(Status.MODEL_ERROR, message, settings, self.norm)
                                 for _ in kept]
            self._synchronize()
            elapsed_ms = (time.perf_counter() - start) * 1e3
            for index, result in zip(kept, batch_results):
                result.inference_ms = elapsed_ms
                results[index] = result
        return results  # type: ignore[return-value]

    def _preprocessed(self, images: list[DecodedImage], settings: LiveSettings, results: list[FrameResult | None]
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[int]]:
        """(robust inputs, standard inputs, indices of the frames they hold): the whole batch at once
        (`Preprocessor`: frames of one geometry in one pass); where a frame is bad, frame by frame, so
        that each bad frame alone gets its BAD_INPUT result (written into `results`)."""
        shared = self.standard_preprocess is self.preprocess

        def run(batch: list[DecodedImage]) -> tuple[torch.Tensor, torch.Tensor]:
            robust_input = self.preprocess(batch)
            return robust_input, robust_input if shared else self.standard_preprocess(batch)

        if len(images) > 1:
            try:
                return *run(images), list(range(len(images)))
            except BadImageError:
                pass  # a bad frame among them: frame by frame below
        inputs, standard_inputs, kept = [], [], []
        for index, decoded in enumerate(images):
            try:
                robust_input, standard_input = run([decoded])
            except BadImageError as error:
                results[index] = FrameResult.failure(Status.BAD_INPUT, str(error), settings, self.norm)
                continue
            inputs.append(robust_input)
            standard_inputs.append(standard_input)
            kept.append(index)
        if not kept:
            return None, None, []
        x = torch.cat(inputs)
        return x, x if shared else torch.cat(standard_inputs), kept

    def _source_radius(self, decoded: DecodedImage, certified_radius: float) -> float:
        """`image_radius` of a frame: the certificate carried into its source pixels; 0 for frames
        converted from YUV/Bayer, which are no linear map of the message (no image-space claim)."""
        if not decoded.linear_in_message:
            return 0.0
        height, width = decoded.pixels.shape[0], decoded.pixels.shape[1]
        operator_norm = preprocessing_operator_norm(height, width, decoded.channel_order, self.preprocess_config,
                                                    self.norm)
        float_error = preprocessing_float_error(height, width, decoded.channel_order, self.preprocess_config,
                                                self.norm)
        return certify.float32_toward_zero(image_radius(certified_radius, operator_norm, float_error))

    def _meets_thresholds(self, radii: torch.Tensor, images: list[DecodedImage], settings: LiveSettings
                          ) -> torch.Tensor:
        """Per frame, whether these certified radii would meet the `safe` thresholds in force."""
        met = []
        for radius, decoded in zip(radii.tolist(), images):
            radius = certify.float32_toward_zero(max(radius, 0.0)) if math.isfinite(radius) else 0.0
            met.append(radius > 0.0 and _meets(radius, settings.safe_radius) and _meets(
                self._source_radius(decoded, radius), settings.safe_image_radius))
        return torch.tensor(met, dtype=torch.bool, device=radii.device)

    def _classify_batch(
        self, x: torch.Tensor, x_standard: torch.Tensor, images: list[DecodedImage], settings: LiveSettings
    ) -> list[FrameResult]:
        """`x`: the robust model's inputs (the certificate's space), `x_standard`: the standard model's."""
        alpha = settings.alpha
        probability_error = None
        with torch.inference_mode():
            logits_g = self.standard(x_standard)
            method = self.certificate_method
            with full_precision():
                if self.smooth is not None:
                    n0, n = self.smoothing_samples
                    certificate = self.smooth.certify(
                        x, n0=n0, n=n, beta=1.0 - settings.confidence, batch_size=max(n0, 1000),
                        alpha=alpha, generator=self.generator,
                    )
                    probs_h = certificate.probs
                    log_probs_h = probs_h.clamp_min(torch.finfo(torch.float64).tiny).log()
                elif self.lipschitz_pass is not None:
                    logits_h, probs_h, probability_error, radius = self.lipschitz_pass(
                        x, alpha, lambda radii: self._meets_thresholds(radii, images, settings))
                    log_probs_h = torch.log_softmax(logits_h, dim=1)
                else:
                    logits_h = (self.robust_float64(x.to(torch.float64)) if self.robust_float64 is not None
                                else self.robust(x).double())
                    probs_h = torch.softmax(logits_h, dim=1)
                    log_probs_h = torch.log_softmax(logits_h, dim=1)
                    if self.robust_float64 is not None:
                        probs_single = torch.softmax(self.robust(x).double(), dim=1)
                        probability_error = (probs_single - probs_h).abs().amax(dim=1) + 1e-12
                    elif self.forward_error:
                        probability_error = torch.full_like(probs_h[:, 0], FLOAT32_PROBABILITY_ERROR)
                finite = torch.isfinite(logits_g).all(dim=1) & torch.isfinite(probs_h).all(dim=1)
                if probability_error is not None:
                    finite &= torch.isfinite(probability_error)
                # One evaluation of the mixture (eq. 4), in float64 like the robust probabilities.
                mixed = mix_log_probs(logits_g.double(), log_probs_h, alpha).exp()
                mixed_probability, class_ids = mixed.max(dim=1)
                top2 = probs_h.topk(2, dim=1).values
                robust_margin = top2[:, 0] - top2[:, 1]
                robust_class = probs_h.argmax(dim=1)
                standard_class = logits_g.argmax(dim=1)

                if method == CertificateMethod.LIPSCHITZ:
                    if self.lipschitz_pass is None:
                        error = probability_error.nan_to_num(math.inf) if probability_error is not None else 0.0
                        radius = certify.lipschitz_radius(probs_h, self.robust.lipschitz_constant, alpha,
                                                          probability_error=error)
                    certified_class = robust_class
                    confidence = 1.0
                elif method == CertificateMethod.RANDOMIZED_SMOOTHING:
                    radius = certificate.radius
                    certified_class = certificate.predicted_class
                    confidence = settings.confidence
                else:
                    radius = torch.zeros(len(x), device=x.device)
                    certified_class = torch.full((len(x),), -1, device=x.device)
                    confidence = 0.0

        rows = zip(
            finite.tolist(), class_ids.tolist(), mixed_probability.tolist(), radius.tolist(),
            certified_class.tolist(), robust_class.tolist(), robust_margin.tolist(),
            standard_class.tolist(), images,
        )
        results = []
        for ok, class_id, probability, certified_radius, cert_class, h_class, margin, g_class, decoded in rows:
            if not ok:
                results.append(FrameResult.failure(
                    Status.MODEL_ERROR, "non-finite model output", settings, self.norm))
                continue
            if not math.isfinite(certified_radius) or certified_radius < 0.0:
                certified_radius = 0.0
            # Published as float32: rounded towards zero here, so the message carries exactly this.
            certified_radius = certify.float32_toward_zero(certified_radius)
            has_certificate = method != CertificateMethod.NONE and certified_radius > 0.0
            source_radius = self._source_radius(decoded, certified_radius) if has_certificate else 0.0
            results.append(FrameResult(
                status=Status.OK,
                class_id=int(class_id),
                probability=float(probability),
                alpha=alpha,
                # the message's "a certificate exists" is certificate_method != NONE
                certificate_method=method if has_certificate else CertificateMethod.NONE,
                norm=self.norm,
                certified_radius=certified_radius,
                image_radius=source_radius,
                confidence=confidence if has_certificate else 0.0,
                safe_radius=settings.safe_radius,
                safe_image_radius=settings.safe_image_radius,
                safe=is_safe(Status.OK, method, certified_radius, settings.safe_radius, class_id, cert_class,
                             source_radius, settings.safe_image_radius),
                robust_class_id=int(h_class),
                robust_margin=float(margin),
                standard_class_id=int(g_class),
            ))
        return results
