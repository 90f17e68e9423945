"""`mixclf-eval bag`: recordings written here with rosbags (both storage formats; rgb8, bgr8, mono8,
yuv422 and JPEG frames; a corrupt message, a frame with a wrong data length, a topic of another type)
through the node's own path with the shipped models and parameters file; the results recording; Ray
units equal to the in-process run; and the node over real DDS agreeing with the rows frame by frame."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from bagutil import Frame, write_recording
from conftest import REPO_ROOT

from mixclf_ros.evaluation import cli

CONFIG = REPO_ROOT / "config" / "mixclf.yaml"
TOPIC = "/image"
COMMON = ["--params", str(CONFIG), "--threads", "1", "--device", "cpu", "--no-progress"]
TIMING = ("command", "arguments", "execution", "wall_seconds", "frames_per_second_wall")


@pytest.fixture(scope="module")
def articles() -> tuple[list[np.ndarray], list[int]]:
    """Demo camera frames (480x640 RGB) of the first Fashion-MNIST test images, and their labels."""
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import embed_article

    images, labels = load_fashion_mnist("test")
    return [embed_article(images[i]) for i in range(8)], [int(labels[i]) for i in range(8)]


def uyvy(rgb: np.ndarray) -> np.ndarray:
    """A grey frame as yuv422 (UYVY): chroma 128, luma the grey level."""
    out = np.empty((*rgb.shape[:2], 2), np.uint8)
    out[:, :, 0] = 128
    out[:, :, 1] = rgb[:, :, 0]
    return out


def raw_frames(articles) -> list[Frame]:
    frames, _ = articles
    wrong_length = Frame("short", frames[4][:, :, 0], "rgb8")  # 1 byte per pixel for a 3-byte encoding
    return [Frame("rgb", frames[0]), Frame("bgr", np.ascontiguousarray(frames[0][:, :, ::-1]), "bgr8"),
            Frame("mono", np.ascontiguousarray(frames[1][:, :, 0]), "mono8"), Frame("yuv", uyvy(frames[2]), "yuv422"),
            Frame("corrupt", corrupt=b"\x00\x01\x00\x00not an image"), wrong_length, Frame("rgb2", frames[3])]


def comparable(report: dict) -> dict:
    """The JSON report without what differs between runs by design (timing, what ran where)."""
    kept = {key: value for key, value in report.items() if key not in TIMING}
    kept["alphas"] = [{k: v for k, v in alpha.items() if k != "frames_per_second"} for alpha in report["alphas"]]
    return kept


def run(arguments: list[str], out: Path) -> tuple[dict, list[dict], bytes]:
    assert cli.main([*arguments, *COMMON, "--out", str(out)]) == 0
    [report] = out.glob("*.json")
    lines = (out / f"{report.stem}_frames.jsonl").read_text().splitlines()
    return (json.loads(report.read_text()), [json.loads(line) for line in lines],
            (out / f"{report.stem}.csv").read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_a_recording_of_every_encoding_gives_the_report(articles, tmp_path, storage, capsys):
    path = write_recording(tmp_path / f"rec_{storage}", TOPIC, raw_frames(articles), storage=storage,
                           extra_topics={"/chatter": "not an image"})
    labels = tmp_path / "labels.csv"
    labels.write_text("index,class\n0,{0}\n1,{0}\n2,{1}\n3,{2}\n6,{3}\n".format(*articles[1][:4]))
    report, rows, _ = run(["bag", str(path), "--topic", TOPIC, "--alphas", "0.4,0.6,1", "--labels", str(labels)],
                          tmp_path / "out")
    assert report["recording"]["storage"] == storage and report["recording"]["messages"] == 7
    by = {(row["frame_id"] or "corrupt", row["alpha"]): row for row in rows}
    assert len(rows) == 7 * 3
    corrupt = by[("corrupt", 0.6)]
    assert "corrupt message" in corrupt["refused"] and corrupt["status"] is None and corrupt["safe"] is None
    short = by[("short", 0.6)]
    assert short["status"] == 2 and "bytes" in short["status_message"] and short["safe"] is False
    for alpha in (0.4, 0.6, 1.0):
        rgb, bgr = by[("rgb", alpha)], by[("bgr", alpha)]
        for key in ("class_id", "certified_radius", "image_radius", "safe"):  # the same pixels, either order
            assert rgb[key] == bgr[key]
        assert all(by[(f, alpha)]["status"] == 0 for f in ("rgb", "bgr", "mono", "yuv", "rgb2"))
    assert by[("rgb", 1.0)]["certified_radius"] > 0 and by[("rgb", 1.0)]["image_radius"] > 0
    assert by[("yuv", 1.0)]["certified_radius"] > 0 and by[("yuv", 1.0)]["image_radius"] == 0  # not linear
    assert not any(row["safe"] for row in rows if row["alpha"] == 0.4)  # no certificate below 1/2
    for summary in report["alphas"]:
        mine = [row for row in rows if row["alpha"] == summary["alpha"]]
        ok = [row for row in mine if row["status"] == 0]
        assert summary["frames_read"] == 7 and summary["frames_classified"] == len(ok) == 5
        assert summary["frames_refused"] == 2 and sum(summary["refused_by_reason"].values()) == 2
        assert summary["safe_rate"] == pytest.approx(sum(bool(row["safe"]) for row in mine) / 7)
        assert sum(summary["class_histogram"].values()) == 5
        assert summary["certified_radius"]["q100"] == max(row["certified_radius"] for row in ok)
        assert summary["disagreement_rate"] == pytest.approx(
            sum(row["standard_class_id"] != row["robust_class_id"] for row in ok) / 5)
        labelled = [row for row in ok if row["label"] is not None]
        assert summary["labelled_frames"] == len(labelled) == 5
        assert summary["accuracy"] == pytest.approx(sum(r["class_id"] == r["label"] for r in labelled) / 5)
        assert summary["safe_but_wrong"] == sum(bool(r["safe"]) and r["class_id"] != r["label"] for r in labelled)
        assert summary["frames_per_second"] > 0
    [plot] = (tmp_path / "out").glob("bag_*.png")  # bag_<run id>.png
    assert plot.stat().st_size > 0
    assert report["rounding_error"] == ["bounded"]
    error = capsys.readouterr().err
    assert "refused: corrupt message" in error and "estimated" not in error


def test_compressed_frames_and_a_topic_of_another_type(articles, tmp_path, capsys):
    frames, _ = articles
    recording = [Frame("jpeg0", frames[0], "jpeg"), Frame("png1", frames[1], "png"), Frame("jpeg2", frames[2], "jpeg")]
    path = write_recording(tmp_path / "compressed", "/image/compressed", recording, storage="mcap", compressed=True,
                           extra_topics={"/chatter": "text"})
    assert cli.main(["bag", str(path), "--topic", "/chatter", *COMMON, "--out", str(tmp_path / "o")]) == 2
    error = capsys.readouterr().err
    assert "topic /chatter has type std_msgs/msg/String" in error and "/image/compressed" in error
    assert cli.main(["bag", str(path), "--topic", "/camera", *COMMON, "--out", str(tmp_path / "o")]) == 2
    assert "no topic /camera" in capsys.readouterr().err
    report, rows, _ = run(["bag", str(path), "--topic", "/image/compressed", "--alphas", "1"], tmp_path / "out")
    assert report["recording"]["type"] == "sensor_msgs/msg/CompressedImage"
    assert [row["status"] for row in rows] == [0, 0, 0] and all(row["certified_radius"] > 0 for row in rows)


def test_the_console_says_when_the_rounding_error_is_only_estimated(articles, tmp_path, capsys,
                                                                    monkeypatch):
    """A robust network the error-bounded forward cannot bound is certified with an estimated rounding
    error (`CertifiedClassifier.forward_error`): the console says so, not only the JSON."""
    from mixclf_ros.core.forward_error import UnboundedForwardError
    from mixclf_ros.evaluation import bag_units
    from mixclf_ros.runtime import classifier

    def unbounded(*args, **kwargs):
        raise UnboundedForwardError("a layer of the test")

    monkeypatch.setattr(classifier, "ErrorBoundedForward", unbounded)
    monkeypatch.setattr(bag_units, "_CLASSIFIERS", {})
    path = write_recording(tmp_path / "rec", TOPIC, raw_frames(articles)[:2])
    report, _, _ = run(["bag", str(path), "--topic", TOPIC, "--alphas", "1"], tmp_path / "out")
    assert report["rounding_error"] == ["estimated"]
    assert "rounding error is estimated, not bounded (forward_error = estimated" in capsys.readouterr().err


def test_an_undecodable_jpeg_is_bad_input_and_the_rest_goes_on(articles, tmp_path):
    from bagutil import image_message

    from mixclf_ros.evaluation.bag_reader import typestore

    frames, _ = articles
    broken = image_message(Frame("broken", frames[0], "jpeg"), 1, 0)
    broken.data = np.frombuffer(b"\xff\xd8 not a jpeg", np.uint8)
    raw = typestore().serialize_cdr(broken, "sensor_msgs/msg/CompressedImage")
    path = write_recording(tmp_path / "rec", "/image/compressed",
                           [Frame("a", frames[0], "jpeg"), Frame("broken", corrupt=bytes(raw)),
                            Frame("b", frames[1], "jpeg")], compressed=True)
    _, rows, _ = run(["bag", str(path), "--topic", "/image/compressed", "--alphas", "1"], tmp_path / "out")
    assert [row["status"] for row in rows] == [0, 2, 0]
    assert "could not decode compressed image" in rows[1]["status_message"] and rows[1]["safe"] is False


def test_write_results_records_the_nodes_messages_beside_the_frames(articles, tmp_path):
    from rosbags.highlevel import AnyReader

    from mixclf_ros.evaluation.bag_reader import typestore

    path = write_recording(tmp_path / "rec", TOPIC, raw_frames(articles), storage="mcap")
    results = tmp_path / "results"
    _, rows, _ = run(["bag", str(path), "--topic", TOPIC, "--alphas", "0.6", "--write-results", str(results)],
                     tmp_path / "out")
    with AnyReader([results], default_typestore=typestore()) as reader:
        counts = {c.topic: (c.msgtype, c.msgcount) for c in reader.connections}
        assert counts == {TOPIC: ("sensor_msgs/msg/Image", 7),
                          "/certified_classification": ("mixclf_ros/msg/CertifiedClassification", 6)}
        written = {}
        results_connections = [c for c in reader.connections if c.topic != TOPIC]  # the frames: as recorded
        for connection, log_time, raw in reader.messages(connections=results_connections):
            message = reader.deserialize(raw, connection.msgtype)
            written[message.header.frame_id] = (log_time, message)
    for row in rows:
        if row["refused"]:
            continue
        log_time, message = written[row["frame_id"]]
        assert log_time == row["log_time_ns"]
        assert f"{message.header.stamp.sec}.{message.header.stamp.nanosec:09d}" == row["stamp"]
        for key in ("status", "class_id", "class_name", "certified_radius", "image_radius", "safe",
                    "standard_class_id", "robust_class_id", "status_message"):
            assert getattr(message, key) == row[key], key
    assert cli.main(["bag", str(path), "--topic", TOPIC, "--write-results", str(results), *COMMON,
                     "--out", str(tmp_path / "again")]) == 2  # never overwritten


@pytest.mark.slow
def test_ray_units_give_the_in_process_rows(articles, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install -r requirements-cluster.txt)")
    path = write_recording(tmp_path / "rec", TOPIC, raw_frames(articles))
    arguments = ["bag", str(path), "--topic", TOPIC, "--alphas", "0.6,1", "--shard-size", "3", "--name", "bag"]
    expected = run(arguments, tmp_path / "in_process")
    report, rows, csv = run([*arguments, "--ray", "local", "--ray-cpus", "2"], tmp_path / "ray")
    assert csv == expected[2] and rows == expected[1]
    assert comparable(report) == comparable(expected[0])
    assert report["execution"]["backend"] == "ray local" and report["execution"]["units"]["total"] == 3
    assert all(worker["worker"].startswith("ray:") for worker in report["execution"]["workers"])


def test_the_node_over_dds_agrees_with_the_rows_frame_by_frame(articles, tmp_path, installed_prefix):
    """Every frame of a recording replayed to the node (every frame, reliable), each published result
    compared with `mixclf-eval bag`'s row at the node's alpha: status, class, radii and safe equal."""
    from rosbags.highlevel import AnyReader
    from rosutil import node_with_client
    from sensor_msgs.msg import Image

    from mixclf_ros.evaluation.bag_reader import typestore

    frames, _ = articles
    recording = [f for f in raw_frames(articles) if f.corrupt is None]
    recording += [Frame(f"article{i}", frames[i]) for i in range(4, 8)]
    path = write_recording(tmp_path / "rec", TOPIC, recording, storage="sqlite3")
    _, rows, _ = run(["bag", str(path), "--topic", TOPIC, "--alphas", "0.6"], tmp_path / "out")
    expected = {row["frame_id"]: row for row in rows}
    assert len(expected) == len(recording)

    every_frame = ["-p", "frame_policy:=every", "-p", "max_image_age:=0.0", "-p", "torch_threads:=1",
                   "-p", f"qos_overrides.{TOPIC}.subscription.reliability:=reliable",
                   "-p", f"qos_overrides.{TOPIC}.subscription.depth:=10"]
    with node_with_client("--params-file", str(CONFIG), *every_frame, log_path=tmp_path / "node.log",
                          reliable=True) as (client, _):
        client.clear()
        with AnyReader([path], default_typestore=typestore()) as reader:
            for connection, _, raw in reader.messages():
                recorded = reader.deserialize(raw, connection.msgtype)
                message = Image(height=recorded.height, width=recorded.width, encoding=recorded.encoding,
                                is_bigendian=recorded.is_bigendian, step=recorded.step, data=bytes(recorded.data))
                message.header.stamp.sec = recorded.header.stamp.sec
                message.header.stamp.nanosec = recorded.header.stamp.nanosec
                message.header.frame_id = recorded.header.frame_id
                client.image_publisher.publish(message)
                time.sleep(0.05)
        published = client.wait_for(set(expected), timeout=180.0)
    assert set(published) == set(expected), f"no result for {set(expected) - set(published)}"
    for frame_id, message in published.items():
        row = expected[frame_id]
        assert f"{message.header.stamp.sec}.{message.header.stamp.nanosec:09d}" == row["stamp"]
        for key in ("status", "class_id", "certified_radius", "image_radius", "safe", "standard_class_id",
                    "robust_class_id"):
            assert getattr(message, key) == row[key], (frame_id, key, getattr(message, key), row[key])
    assert sum(bool(row["safe"]) for row in rows) > 0  # the comparison covers safe frames too
