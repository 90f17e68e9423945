"""Camera frames out of rosbag2 recordings (sqlite3 and MCAP storage), read with `rosbags` (pure Python,
no ROS install), one frame at a time: memory holds one message, however long the recording.

A recording's frames are split into shards of consecutive messages by their log time (the time the
recorder received them, ns), so that a work unit can read its shard alone (`read_frames` with a time
range), in this process or on a Ray worker that sees the same path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from mixclf_ros.evaluation.settings import EvaluationError

IMAGE_TYPES = {"sensor_msgs/msg/Image": False, "sensor_msgs/msg/CompressedImage": True}
"""The message types a camera topic may have -> whether the frames are compressed."""

RESULT_TYPE = "mixclf_ros/msg/CertifiedClassification"
MESSAGE_FILE = "CertifiedClassification.msg"


@dataclass(frozen=True)
class TopicInfo:
    """The camera topic of a recording: its message type, whether it is compressed, how many
    messages it holds, the storage format ("sqlite3" or "mcap") and the QoS it was recorded with."""

    path: Path
    topic: str
    msgtype: str
    compressed: bool
    count: int
    storage: str
    qos: Any = ()


@dataclass(frozen=True)
class BagFrame:
    """One message of the camera topic: its index in the topic (0-based), log time (ns), the raw CDR
    bytes, and the deserialized message, or None with `error` saying why it could not be read."""

    index: int
    log_time_ns: int
    raw: bytes
    message: Any | None
    error: str = ""


@dataclass(frozen=True)
class Shard:
    """Consecutive frames of the topic: log times in [start_ns, stop_ns) (stop None: to the end), the
    index of its first frame and its number of frames."""

    start_ns: int
    stop_ns: int | None
    first_index: int
    count: int


def message_definition_file() -> Path:
    """`msg/CertifiedClassification.msg`, the one definition of the result message: in this source
    checkout, else in an installed ROS package's share folder (AMENT_PREFIX_PATH)."""
    candidates = [Path(__file__).resolve().parents[2] / "msg" / MESSAGE_FILE]
    for prefix in filter(None, os.environ.get("AMENT_PREFIX_PATH", "").split(os.pathsep)):
        candidates.append(Path(prefix) / "share" / "mixclf_ros" / "msg" / MESSAGE_FILE)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise EvaluationError(f"cannot find {MESSAGE_FILE} (looked in {', '.join(map(str, candidates))})")


@cache
def typestore() -> Any:
    """rosbags' ROS 2 Kilted types, with `mixclf_ros/msg/CertifiedClassification` registered from
    msg/ (recordings that carry their own definitions are read with those)."""
    from rosbags.typesys import Stores, get_types_from_msg, get_typestore

    store = get_typestore(Stores.ROS2_KILTED)
    store.register(get_types_from_msg(message_definition_file().read_text(encoding="utf-8"), RESULT_TYPE))
    return store


def _open(path: Path) -> Any:
    from rosbags.highlevel import AnyReader, AnyReaderError

    if not path.exists():
        raise EvaluationError(f"{path}: no such recording")
    try:
        reader = AnyReader([path], default_typestore=typestore())
        reader.open()
    except (AnyReaderError, OSError, ValueError, KeyError) as error:
        raise EvaluationError(f"{path}: not a rosbag2 recording rosbags can read ({error})") from error
    return reader


def _connections(reader: Any, topic: str) -> list[Any]:
    return [connection for connection in reader.connections if connection.topic == topic]


def open_topic(path: str | Path, topic: str) -> TopicInfo:
    """The camera topic `topic` of the recording at `path` (a rosbag2 folder, or its .db3 / .mcap
    file); `EvaluationError` naming the image topics there is when it is missing or not an image."""
    path = Path(path)
    reader = _open(path)
    try:
        connections = _connections(reader, topic)
        images = sorted({f"{c.topic} ({c.msgtype})" for c in reader.connections if c.msgtype in IMAGE_TYPES})
        available = f"; image topics in it: {', '.join(images)}" if images else "; it has no image topic"
        if not connections:
            raise EvaluationError(f"{path}: no topic {topic}{available}")
        types = {connection.msgtype for connection in connections}
        if len(types) != 1 or not types <= set(IMAGE_TYPES):
            raise EvaluationError(f"{path}: topic {topic} has type {', '.join(sorted(types))}, not "
                                  f"{' or '.join(IMAGE_TYPES)}{available}")
        [msgtype] = types
        files = list(path.iterdir()) if path.is_dir() else [path]
        storage = "mcap" if any(file.suffix == ".mcap" for file in files) else "sqlite3"
        qos = getattr(connections[0].ext, "offered_qos_profiles", ())
        return TopicInfo(path, topic, msgtype, IMAGE_TYPES[msgtype], sum(c.msgcount for c in connections),
                         storage, qos)
    finally:
        reader.close()


def read_frames(info: TopicInfo, shard: Shard | None = None) -> Iterator[BagFrame]:
    """The frames of the topic (of `shard` only, when given) in log-time order, one at a time. A
    message that does not deserialize as the topic's type is yielded with `message` None and the
    reason in `error`; reading goes on."""
    reader = _open(info.path)
    try:
        connections = _connections(reader, info.topic)
        start, stop = (shard.start_ns, shard.stop_ns) if shard is not None else (None, None)
        index = shard.first_index if shard is not None else 0
        for connection, log_time, raw in reader.messages(connections=connections, start=start, stop=stop):
            try:
                message, error = reader.deserialize(raw, connection.msgtype), ""
            except Exception as problem:  # rosbags raises several types for truncated or garbled CDR
                message = None
                error = (f"corrupt message: {len(raw)} bytes are not a valid CDR {connection.msgtype} "
                         f"({type(problem).__name__}: {problem})")
            yield BagFrame(index, int(log_time), bytes(raw), message, error)
            index += 1
    finally:
        reader.close()


def plan_shards(info: TopicInfo, shard_size: int) -> list[Shard]:
    """Shards of about `shard_size` frames (0: one shard of all), cut between two different log times,
    so that every frame falls in exactly one shard. Reads the topic's log times once."""
    if shard_size <= 0 or info.count <= shard_size:
        return [Shard(0, None, 0, info.count)]
    reader = _open(info.path)
    starts: list[tuple[int, int]] = [(0, 0)]  # (start_ns, first index)
    try:
        previous, index = None, 0
        for _, log_time, _ in reader.messages(connections=_connections(reader, info.topic)):
            if index - starts[-1][1] >= shard_size and log_time != previous:
                starts.append((int(log_time), index))
            previous, index = log_time, index + 1
    finally:
        reader.close()
    counts = [following[1] - start[1] for start, following in zip(starts, [*starts[1:], (None, index)])]
    stops = [start[0] for start in starts[1:]] + [None]
    return [Shard(start[0] if i else 0, stop, start[1], count)
            for i, (start, stop, count) in enumerate(zip(starts, stops, counts))]


def recording_identity(path: str | Path) -> str:
    """Names, sizes and modification times of the recording's files: a checkpoint of another
    recording (or of this one rewritten) is not reused."""
    path = Path(path)
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return ";".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file())


def frame_header(message: Any) -> tuple[int, int, str]:
    """(stamp sec, stamp nanosec, frame_id) of an image message's header."""
    header = message.header
    return int(header.stamp.sec), int(header.stamp.nanosec), str(header.frame_id)
