"""`mixclf-eval bag --write-results OUT`: a rosbag2 recording (the input's storage format) with the frames'
topic, copied as recorded, and beside it the `mixclf_ros/msg/CertifiedClassification` messages the node
would have published for them, each with its frame's header and log time.

The message type is registered from `msg/CertifiedClassification.msg` (`bag_reader.typestore`) and its
fields are filled by `runtime.result_fields`, the node's own conversion. A frame the node would never
have received (a message that does not deserialize) is copied without a result. With one alpha the results
are on `/certified_classification`, the node's topic; with several, one topic per alpha,
`/certified_classification/alpha_0_6` for 0.6.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mixclf_ros.evaluation.bag_reader import RESULT_TYPE, TopicInfo, read_frames, typestore
from mixclf_ros.evaluation.bag_units import RESULT_FIELDS
from mixclf_ros.evaluation.settings import EvaluationError
from mixclf_ros.runtime.frame_result import CertificateMethod, FrameResult, Status
from mixclf_ros.runtime.result_fields import result_fields

RESULTS_TOPIC = "/certified_classification"


def results_topic(alpha: float, alphas: tuple[float, ...]) -> str:
    """`/certified_classification` for a single alpha, else `/certified_classification/alpha_<alpha>`."""
    return RESULTS_TOPIC if len(alphas) == 1 else f"{RESULTS_TOPIC}/alpha_{alpha:g}".replace(".", "_")


def result_message(row: dict[str, Any], class_names: list[str]) -> Any:
    """The rosbags `CertifiedClassification` of one frame's row (`bag_command.frame_rows`)."""
    store = typestore()
    types = store.types
    values = {name: row[name] for name in RESULT_FIELDS}
    result = FrameResult(**{**values, "status": Status(values["status"]),
                            "certificate_method": CertificateMethod(values["certificate_method"])},
                         inference_ms=row["inference_ms"])
    sec, nanosec = (int(part) for part in row["stamp"].split("."))
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                          frame_id=row["frame_id"])
    return types[RESULT_TYPE](header=header, **result_fields(result, class_names))


class ResultsWriter:
    """Writes the results recording frame by frame (`add`), reading the frames' raw messages alongside."""

    def __init__(self, path: Path, info: TopicInfo, alphas: tuple[float, ...], class_names: list[str]):
        from rosbags.rosbag2 import StoragePlugin, Writer, WriterError

        store = typestore()
        plugin = StoragePlugin.MCAP if info.storage == "mcap" else StoragePlugin.SQLITE3
        try:
            self.writer = Writer(path, version=9, storage_plugin=plugin)
            self.writer.open()
        except (WriterError, OSError) as error:
            raise EvaluationError(f"--write-results {path}: {error}") from error
        self.frames = self.writer.add_connection(info.topic, info.msgtype, typestore=store,
                                                 offered_qos_profiles=list(info.qos))
        self.results = [self.writer.add_connection(results_topic(alpha, alphas), RESULT_TYPE, typestore=store)
                        for alpha in alphas]
        self.class_names = class_names
        self.source = read_frames(info)

    def add(self, rows: list[dict[str, Any]]) -> None:
        """One frame: its rows, one per alpha, in recording order."""
        frame = next(self.source)
        if frame.index != rows[0]["index"]:
            raise RuntimeError(f"results recording: frame {frame.index} read, row of frame {rows[0]['index']} given")
        self.writer.write(self.frames, frame.log_time_ns, frame.raw)
        if rows[0]["refused"]:
            return
        store = typestore()
        for connection, row in zip(self.results, rows):
            self.writer.write(connection, frame.log_time_ns,
                              store.serialize_cdr(result_message(row, self.class_names), RESULT_TYPE))

    def close(self) -> None:
        self.source.close()
        self.writer.close()
