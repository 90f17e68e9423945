"""`make demo`'s command runs end to end over DDS, and its figures are right."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from process_tree import descendants, process_identity

pytestmark = pytest.mark.ros  # over real DDS or the installed executables (make setup)

FRAMES = 12
ATTACK_EPS = 30.0  # l2 in frame pixels in [0, 1]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, installed_prefix) -> dict:
    summary_file = tmp_path_factory.mktemp("demo") / "summary.json"
    command = [sys.executable, "-m", "mixclf_ros.demo.launcher", "--frames", str(FRAMES), "--rate", "4",
               "--attack-eps", str(ATTACK_EPS), "--alpha-schedule", "6:0.8", "--summary-file", str(summary_file),
               "--start-index", "100"]
    logs = tmp_path_factory.mktemp("demo-logs")
    with open(logs / "stdout", "w+") as stdout, open(logs / "stderr", "w+") as stderr:
        launcher = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True)
        started = set()  # every process the launcher started (its process tree)
        deadline = time.monotonic() + 400
        while launcher.poll() is None and time.monotonic() < deadline:
            started |= descendants(launcher.pid)
            time.sleep(0.2)
        if launcher.poll() is None:
            launcher.kill()
        returncode = launcher.wait()
        stdout.seek(0)
        stderr.seek(0)
        out, err = stdout.read(), stderr.read()
    assert returncode == 0, out[-3000:] + err[-3000:]
    return {"stdout": out, "summary": json.loads(summary_file.read_text()), "started": started}


def test_demo_exits_cleanly_with_a_result_for_every_frame(demo_run):
    summary = demo_run["summary"]
    assert summary["total"]["results"] == FRAMES
    assert len(summary["records"]) == FRAMES
    assert sorted(r["index"] for r in summary["records"]) == list(range(100, 100 + FRAMES))
    assert all(r["status"] == 0 for r in summary["records"])
    assert "== summary" in demo_run["stdout"]
    # the alpha schedule was applied live: results before and after the change
    alphas = [round(r["alpha"], 2) for r in summary["records"]]
    assert alphas[0] == 0.6 and alphas[-1] == 0.8
    assert len(demo_run["started"]) >= 3, "the node, camera and monitor processes were not seen"
    leftover = [pid for pid, start in demo_run["started"] if process_identity(pid) == (pid, start)]
    assert not leftover, f"processes the demo started are still running: {leftover}"


def test_the_attack_fools_the_standard_model(demo_run):
    records = demo_run["summary"]["records"]
    fooled = sum(r["standard"] != r["label"] for r in records)
    assert fooled >= 0.6 * len(records), f"standard model fooled on only {fooled}/{len(records)} frames"


def test_monitor_figures_agree_with_a_direct_computation(demo_run):
    """Re-renders the same frames (same images, same seeded attack) and classifies them with the
    library directly: the node's predictions, radii and the monitor's counts must agree."""
    from mixclf_ros.attacks import pgd
    from mixclf_ros.data import load_fashion_mnist
    from mixclf_ros.demo.render import ARTICLE_SCALE, article_budget, embed_article, quantize_towards
    from mixclf_ros.models.loading import load_model, zoo_config
    from mixclf_ros.runtime.classifier import CertifiedClassifier, LiveSettings
    from mixclf_ros.runtime.node_parameters import MODELS
    from mixclf_ros.vision.decode import decode_image
    from mixclf_ros.vision.preprocess import PreprocessConfig

    images, labels = load_fashion_mnist("test")
    standard, robust = (load_model(zoo_config(MODELS[role])) for role in ("standard_model", "robust_model"))
    classifier = CertifiedClassifier(standard, robust, PreprocessConfig(crop_height=476, crop_width=476),
                                     torch.device("cpu"))
    budget = article_budget(ATTACK_EPS, "l2", scale=ARTICLE_SCALE)
    records = demo_run["summary"]["records"]
    correct = {"standard": 0, "robust": 0, "mixed": 0}
    for record in records:
        index = record["index"]
        x = torch.from_numpy(images[index].copy()).float()[None, None] / 255
        x_adv = pgd(standard, x, torch.tensor([int(labels[index])]), eps=budget, norm="l2", steps=20,
                    generator=torch.Generator().manual_seed(index))
        article = quantize_towards(images[index], x_adv[0, 0].detach().double().numpy())
        frame = embed_article(article)
        decoded = decode_image("rgb8", 480, 640, 640 * 3, frame.tobytes())
        [result] = classifier.classify([decoded], LiveSettings(alpha=record["alpha"], safe_radius=budget))
        assert result.class_id == record["mixed"] and result.standard_class_id == record["standard"]
        assert result.robust_class_id == record["robust"] and result.safe == record["safe"]
        assert result.certified_radius == pytest.approx(record["certified_radius"], rel=1e-4, abs=1e-6)
        if result.safe:  # the guarantee itself: the clean frame gets the attacked frame's class
            clean = decode_image("rgb8", 480, 640, 640 * 3, embed_article(images[index]).tobytes())
            [clean_result] = classifier.classify([clean], LiveSettings(alpha=record["alpha"], safe_radius=0.0))
            assert clean_result.class_id == result.class_id, f"certificate violated on test image {index}"
        for name, predicted in (("standard", record["standard"]), ("robust", record["robust"]),
                                ("mixed", record["mixed"])):
            correct[name] += int(predicted == labels[index])
    assert demo_run["summary"]["total"]["correct"] == correct
    safe = sum(r["safe"] for r in records)
    assert demo_run["summary"]["total"]["safe"] == safe
    assert np.isclose(100 * correct["mixed"] / len(records),
                      float(demo_run["stdout"].split("== summary")[1].split("mixed")[1].split("%")[0]), atol=0.051)


def test_demo_launch_file_declares_the_demo_options():
    import ast

    source = (Path(__file__).resolve().parents[1] / "launch" / "demo.launch.py").read_text()
    tree = ast.parse(source)
    executables = {ast.literal_eval(k.value) for node in ast.walk(tree) if isinstance(node, ast.Call)
                   for k in node.keywords if k.arg == "executable"}
    assert executables == {"mixclf_node", "mixclf_camera_sim", "mixclf_monitor"}
    for option in ("rate", "attack_eps", "alpha_schedule", "frames", "noise_std", "compressed"):
        assert f'"{option}"' in source, option
