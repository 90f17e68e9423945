"""Test helpers: small rosbag2 recordings (sqlite3 or MCAP) written with rosbags, the library
`mixclf-eval bag` reads them with."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np


@dataclass
class Frame:
    """One message to record: an `Image` (encoding, pixels already in that encoding's layout), a
    `CompressedImage` (encoding 'jpeg' or 'png'), or raw bytes that are no valid message (`corrupt`)."""

    frame_id: str
    pixels: np.ndarray | None = None
    encoding: str = "rgb8"
    corrupt: bytes | None = None


def _types():
    from mixclf_ros.evaluation.bag_reader import typestore

    store = typestore()
    return store, store.types


def image_message(frame: Frame, sec: int, nanosec: int):
    """A rosbags sensor_msgs/Image or CompressedImage of `frame`, stamped sec.nanosec."""
    _, types = _types()
    header = types["std_msgs/msg/Header"](stamp=types["builtin_interfaces/msg/Time"](sec=sec, nanosec=nanosec),
                                          frame_id=frame.frame_id)
    if frame.encoding in ("jpeg", "png"):
        pixels = frame.pixels if frame.pixels.ndim == 2 else cv2.cvtColor(frame.pixels, cv2.COLOR_RGB2BGR)
        ok, data = cv2.imencode(f".{'jpg' if frame.encoding == 'jpeg' else 'png'}", pixels)
        assert ok
        return types["sensor_msgs/msg/CompressedImage"](header=header, format=frame.encoding,
                                                        data=np.asarray(data, np.uint8).ravel())
    pixels = frame.pixels if frame.pixels.ndim == 3 else frame.pixels[:, :, None]
    height, width = pixels.shape[:2]
    data = np.ascontiguousarray(pixels).view(np.uint8).ravel()
    return types["sensor_msgs/msg/Image"](header=header, height=height, width=width, encoding=frame.encoding,
                                          is_bigendian=0, step=data.size // height, data=data)


def write_recording(path: Path, topic: str, frames: Sequence[Frame], storage: str = "sqlite3",
                    compressed: bool = False, extra_topics: dict[str, str] | None = None,
                    start_sec: int = 1_700_000_000, period_ns: int = 33_333_333) -> Path:
    """A rosbag2 folder with `frames` on `topic` (Image, or CompressedImage when `compressed`), one every
    `period_ns` from `start_sec` (header stamps = log times), and `extra_topics` {topic: text} recorded
    as std_msgs/String (a topic of another type)."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    store, types = _types()
    msgtype = "sensor_msgs/msg/CompressedImage" if compressed else "sensor_msgs/msg/Image"
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        connection = writer.add_connection(topic, msgtype, typestore=store)
        others = {name: writer.add_connection(name, "std_msgs/msg/String", typestore=store)
                  for name in (extra_topics or {})}
        for number, frame in enumerate(frames):
            time_ns = start_sec * 10**9 + number * period_ns
            if frame.corrupt is not None:
                raw = frame.corrupt
            else:
                raw = store.serialize_cdr(image_message(frame, *divmod(time_ns, 10**9)), msgtype)
            writer.write(connection, time_ns, raw)
            for name, text in (extra_topics or {}).items():
                writer.write(others[name], time_ns + 1,
                             store.serialize_cdr(types["std_msgs/msg/String"](data=text), "std_msgs/msg/String"))
    return path
