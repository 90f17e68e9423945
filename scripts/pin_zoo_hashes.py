"""Writes the sha256 of the shipped zoo weights (from their sidecar JSON) into config/mixclf.yaml,
so the default parameters file pins exactly the committed weights.

    python scripts/pin_zoo_hashes.py
"""

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    config = ROOT / "config" / "mixclf.yaml"
    text = config.read_text()
    for weights in re.findall(r'weights: "zoo:([a-z_]+)\.pt"', text):
        digest = json.loads((ROOT / "mixclf_ros" / "models" / "zoo" / f"{weights}.json").read_text())["sha256"]
        pattern = rf'(weights: "zoo:{weights}\.pt".*\n\s*sha256: )"[^"]*"'
        text, count = re.subn(pattern, rf'\1"{digest}"', text)
        assert count == 1, weights
    config.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
