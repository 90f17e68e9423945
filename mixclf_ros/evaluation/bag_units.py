"""The work unit of `mixclf-eval bag`: one shard of a recording's frames, each frame through the node's
own path at every alpha.

The node's path: `vision.decode.decode_frame` (what the node's `ros.messages.decode_message` calls), then
`runtime.classifier.CertifiedClassifier.classify` on that one frame (the node classifies the oldest frame
of each camera per batch: one frame for one camera), with the node's preprocessing of each model from its
config and the `LiveSettings` of the parameters file at each alpha. `safe` is the classifier's
(`runtime.frame_result.is_safe`), copied. Frames the node would never see (a message that does not
deserialize) are refused with the reason; frames it would answer with BAD_INPUT get that result.
Offline there is no `max_image_age` check: recorded frames are old by nature.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import torch

from mixclf_ros.evaluation.bag_reader import Shard, TopicInfo, frame_header, read_frames
from mixclf_ros.evaluation.units import Unit, UnitContext
from mixclf_ros.runtime.classifier import CertifiedClassifier, FrameResult, LiveSettings, Status
from mixclf_ros.runtime.node_parameters import CERTIFICATE_PRECISIONS
from mixclf_ros.vision.decode import BadImageError, decode_frame

RESULT_FIELDS = tuple(field for field in FrameResult.__dataclass_fields__ if field != "inference_ms")
"""The fields of a frame's result kept per alpha (`inference_ms`, a timing, is kept apart)."""

_CLASSIFIERS: dict[tuple, CertifiedClassifier] = {}


def _classifier(context: UnitContext, precision: str, certificate_precision: str) -> CertifiedClassifier:
    """One classifier per process for these models, device and precisions (as the node has one)."""
    key = (id(context.models.standard), id(context.models.robust), str(context.device), precision,
           certificate_precision)
    if key not in _CLASSIFIERS:
        _CLASSIFIERS.clear()
        _CLASSIFIERS[key] = CertifiedClassifier(context.models.standard, context.models.robust, None,
                                                context.device, standard_precision=precision, seed=0,
                                                certificate_precision=certificate_precision)
    return _CLASSIFIERS[key]


def bag_unit(context: UnitContext, unit: Unit, dependency: Any = None) -> dict[str, Any]:
    """Classifies the frames of `unit.params["shard"]` at each of `unit.params["alphas"]`.

    Returns columns (lists, one entry per frame in log-time order): `frames` (index, log_time_ns,
    stamp_sec, stamp_nanosec, frame_id, refused: '' or why the frame could not be read), `results` (per
    alpha, the `RESULT_FIELDS` of each frame's `FrameResult`, None for a refused frame),
    `inference_ms` per alpha, and the seconds spent decoding and classifying at each alpha."""
    params = unit.params
    info: TopicInfo = params["topic"]
    settings: LiveSettings = params["settings"]
    alphas: tuple[float, ...] = params["alphas"]
    precision = params.get("certificate_precision", CERTIFICATE_PRECISIONS[0])
    classifier = _classifier(context, params["standard_precision"], precision)
    seed = params["seed"] if params["seed"] is not None else context.runtime_for(unit).seed
    classifier.generator.manual_seed(int(seed))  # smoothing noise: reproducible per unit, on any worker
    frames: dict[str, list] = {name: [] for name in ("index", "log_time_ns", "stamp_sec", "stamp_nanosec",
                                                     "frame_id", "refused")}
    results: list[dict[str, list]] = [{name: [] for name in RESULT_FIELDS} for _ in alphas]
    inference_ms: list[list[float]] = [[] for _ in alphas]
    decode_seconds, classify_seconds = 0.0, [0.0] * len(alphas)
    for frame in read_frames(info, params["shard"]):
        header = frame_header(frame.message) if frame.message is not None else (0, 0, "")
        for name, value in zip(frames, (frame.index, frame.log_time_ns, *header, frame.error)):
            frames[name].append(value)
        if frame.message is None:
            for alpha_results, timings in zip(results, inference_ms):
                for name in RESULT_FIELDS:
                    alpha_results[name].append(None)
                timings.append(0.0)
            continue
        started = time.perf_counter()
        try:
            decoded, failure = decode_frame(frame.message, info.compressed, params["input_kind"]), ""
        except BadImageError as error:
            decoded, failure = None, str(error)
        decode_seconds += time.perf_counter() - started
        for position, alpha in enumerate(alphas):
            live = replace(settings, alpha=alpha)
            started = time.perf_counter()
            if decoded is None:
                result = FrameResult.failure(Status.BAD_INPUT, failure, live)
            else:
                [result] = classifier.classify([decoded], live)
            classify_seconds[position] += time.perf_counter() - started
            values = asdict(result)
            for name in RESULT_FIELDS:
                value = values[name]
                results[position][name].append(int(value) if name in ("status", "certificate_method") else value)
            inference_ms[position].append(result.inference_ms)
    return {"frames": frames, "results": results, "inference_ms": inference_ms,
            "decode_seconds": decode_seconds, "classify_seconds": classify_seconds,
            "forward_error": classifier.forward_error}


def shard_units(info: TopicInfo, shards: list[Shard], params: dict[str, Any], identity: str) -> list[Unit]:
    """One unit per shard; `labels` carries the shard's frame indices (its size, for the throughput
    report and the checkpoint's fingerprint), `identity` the recording's files (`recording_identity`)."""
    return [Unit(key=f"bag/shard={position}", function=bag_unit, images=torch.zeros(0),
                 labels=torch.arange(shard.first_index, shard.first_index + shard.count),
                 params={**params, "topic": info, "shard": shard, "recording": identity})
            for position, shard in enumerate(shards)]
