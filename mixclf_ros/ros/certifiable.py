"""What the node can certify at its current settings, for the log and /diagnostics: the largest radius
the robust model can ever certify (at the model input, and in each camera's image), whether each
`safe` threshold can be met at all, the smoothing seed, the declared Lipschitz constant, and what
beta per frame means over the measured frame rate. The radii come from the runtime
(`CertifiedClassifier.max_certified_radius` / `max_image_radius`), the wording from
`runtime.reachability`; nothing is computed here but bookkeeping.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

from mixclf_ros.runtime.classifier import CertifiedClassifier, FrameResult, LiveSettings, Status
from mixclf_ros.runtime.reachability import unreachable_warning
from mixclf_ros.vision.decode import DecodedImage

DECLARED_CONSTANT_NOTE = "certificate rests on a declared Lipschitz constant (not computed from the weights)"
"""Added to every OK result's status_message when the robust model's constant is declared."""

FORWARD_ERROR_NOTICEABLE = 1e-3
"""A forward rounding-error bound (probability) above this is a WARN: it visibly shrinks radii."""

FrameSize = tuple[int, int, str]
"""(height, width, channel order) of a camera's frames."""


class CertificateMonitor:
    """Bookkeeping of what the configured classifier can certify; thread-safe (the parameter
    callback, the inference thread and the diagnostics timer call it).

    Args:
        classifier: the configured classifier.
        fixed_seed: the smoothing seed when fixed (None: OS entropy).
        warn: logs a warning (the node's logger).
    """

    def __init__(self, classifier: CertifiedClassifier, fixed_seed: int | None, warn: Callable[[str], None]):
        self._classifier = classifier
        self._fixed_seed = fixed_seed
        self._warn = warn
        self._lock = threading.Lock()
        self._settings: LiveSettings | None = None
        self._max_certified = 0.0
        self._frame_sizes: dict[str, FrameSize] = {}
        self._max_image: dict[str, float] = {}
        self._warnings: dict[str, str] = {}
        self._rate_sample: tuple[float, int] | None = None
        self._frame_rate_hz = math.nan

    @property
    def declared_constant(self) -> bool:
        return self._classifier.kind == "lipschitz" and self._classifier.robust.lipschitz_source == "declared"

    def settings_changed(self, settings: LiveSettings) -> None:
        """At configure and on every live change: recomputes the largest certifiable radii at these
        settings (model input, and each camera's last frame size) and warns when no frame can be safe."""
        with self._lock:
            if settings == self._settings:
                return
            self._settings = settings
            self._max_certified = self._classifier.max_certified_radius(settings)
            for topic, size in self._frame_sizes.items():
                self._max_image[topic] = self._classifier.max_image_radius(settings, *size)
            self._update_warnings()

    def frame_seen(self, topic: str, image: DecodedImage) -> None:
        """Per decoded frame; computes the image-space radius only when a camera's frame size is new."""
        size = (int(image.pixels.shape[0]), int(image.pixels.shape[1]), image.channel_order)
        if self._frame_sizes.get(topic) == size:
            return
        with self._lock:
            self._frame_sizes[topic] = size
            if self._settings is not None:
                self._max_image[topic] = self._classifier.max_image_radius(self._settings, *size)
                self._update_warnings()

    def _update_warnings(self) -> None:
        """Under the lock: the warnings at the current settings; logs the ones that are new."""
        settings, norm = self._settings, self._classifier.norm
        warnings = {"model input": unreachable_warning(
            "model input", self._max_certified, "safe_radius", settings.safe_radius, norm)}
        for topic, (height, width, order) in self._frame_sizes.items():
            warnings[topic] = unreachable_warning(
                f"image of camera {topic} ({width}x{height} {order})", self._max_image.get(topic, 0.0),
                "safe_image_radius", settings.safe_image_radius, norm)
        warnings = {key: text for key, text in warnings.items() if text}
        for key, text in warnings.items():
            if self._warnings.get(key) != text:
                self._warn(text)
        self._warnings = warnings

    def annotate(self, result: FrameResult) -> FrameResult:
        """Notes on the certificate in an OK result's status_message."""
        if result.status == Status.OK and self.declared_constant:
            result.status_message = DECLARED_CONSTANT_NOTE
        return result

    def measure_rate(self, now: float, frames_classified: int) -> None:
        """Frame rate over the last diagnostics period; `now` time.monotonic(), a running count."""
        if self._rate_sample is not None and now > self._rate_sample[0]:
            self._frame_rate_hz = (frames_classified - self._rate_sample[1]) / (now - self._rate_sample[0])
        self._rate_sample = (now, frames_classified)

    def status(self, node: str) -> DiagnosticStatus:
        """The certificate's diagnostic status: WARN when no frame can be safe, when the smoothing
        seed is fixed, or when the certificate rests on a declared Lipschitz constant."""
        with self._lock:
            settings, warnings = self._settings, list(self._warnings.values())
            max_image = dict(self._max_image)
            sizes = dict(self._frame_sizes)
        classifier = self._classifier
        smoothing = classifier.kind == "smoothing"
        problems = list(warnings)
        values = {"certificate_norm": classifier.norm,
                  "max_certified_radius": f"{self._max_certified:.6g}",
                  "safe_radius": f"{settings.safe_radius:.6g}" if settings else "",
                  "safe_image_radius": f"{settings.safe_image_radius:.6g}" if settings else ""}
        for topic, radius in max_image.items():
            height, width, order = sizes[topic]
            values[f"max_image_radius {topic} ({width}x{height} {order})"] = f"{radius:.6g}"
        if classifier.kind == "lipschitz":
            values["lipschitz_source"] = classifier.robust.lipschitz_source
            values["forward_error"] = classifier.forward_error
            if self.declared_constant:
                problems.append(DECLARED_CONSTANT_NOTE)
            if classifier.forward_error == "bounded":
                bound = classifier.forward_error_bound
                values["forward_error_bound"] = f"{bound:.3g}"
                if not bound <= FORWARD_ERROR_NOTICEABLE:
                    problems.append(f"the robust forward's rounding-error bound is {bound:.3g} in probability"
                                    " at a grey frame and comes off every margin: few or no frames "
                                    "can be certified (the componentwise bound compounds over deep networks)")
            certificate = classifier.lipschitz_pass
            if certificate is not None:  # which rounding bound certified the frames so far, and why a route is off
                frames = certificate.frames.items()
                values["certificate_routes"] = ", ".join(f"{route} {count}" for route, count in frames)
                refusals = {"float32": certificate.float32_refusal, "float64 cheap": certificate.cheap_refusal}
                values.update({f"{route} route off": why for route, why in refusals.items() if why})
            if classifier.forward_error.startswith("estimated"):
                problems.append(f"the robust model's floating-point error is {classifier.forward_error}, not bounded "
                                "(layers the error-bounded forward does not cover)")
        if smoothing:
            if self._fixed_seed is None:
                values["smoothing_seed"] = "os entropy (fresh in every process)"
            else:
                values["smoothing_seed"] = f"fixed {self._fixed_seed}"
                problems.append(f"smoothing seed fixed to {self._fixed_seed}: the 1 - beta guarantee is void "
                                "against anyone who knows it")
            beta = 1.0 - settings.confidence if settings else math.nan
            values["smoothing_beta_per_frame"] = f"{beta:.6g}"
            values["frame_rate_hz"] = f"{self._frame_rate_hz:.3f}"
            values["smoothing_worst_case_wrong_certificates_per_hour"] = f"{beta * self._frame_rate_hz * 3600:.3f}"
        status = DiagnosticStatus(name=f"{node}: certificate", hardware_id=node)
        status.level = DiagnosticStatus.WARN if problems else DiagnosticStatus.OK
        status.message = "; ".join(problems) if problems else "thresholds reachable"
        status.values = [KeyValue(key=key, value=str(value)) for key, value in values.items()]
        return status
