"""Stand-in weights for the three examples of docs/BRING_YOUR_OWN.md, so that they run before you have
trained models. They classify nothing: every robust stand-in favours one class ("Dress", 3) by a large
bias over tiny weights, so that its certificates are positive and the examples show them.

    python examples/standin_weights.py [FOLDER]      (default: my_models/)

writes resnet18_finetuned.pt (g of every example), my_lipschitz_net.pt (example a), smoothing_base.pt
(example b) and resnet18_pgd.pt (example c), and prints their sha256 (the `sha256` keys to pin).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

FAVOURED_CLASS = 3


def _favour(linear: torch.nn.Linear, scale: float = 1e-3, bias: float = 8.0) -> None:
    with torch.no_grad():
        linear.weight.mul_(scale)
        linear.bias.zero_()
        linear.bias[FAVOURED_CLASS] = bias


def write_standins(folder: str | Path, num_classes: int = 10) -> dict[str, Path]:
    """Writes the four stand-in state_dicts into `folder`; returns {name: path}."""
    import torchvision

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from my_lipschitz_net import build

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    networks = {"resnet18_finetuned": torchvision.models.resnet18(num_classes=num_classes)}
    lipschitz = build(num_classes)
    _favour(lipschitz.head)
    smoothing = torchvision.models.resnet18(num_classes=num_classes)
    _favour(smoothing.fc)
    networks.update(my_lipschitz_net=lipschitz, smoothing_base=smoothing,
                    resnet18_pgd=torchvision.models.resnet18(num_classes=num_classes))
    paths = {}
    for name, network in networks.items():
        paths[name] = folder / f"{name}.pt"
        torch.save(network.state_dict(), paths[name])
    return paths


def main() -> int:
    for name, path in write_standins(sys.argv[1] if len(sys.argv) > 1 else "my_models").items():
        print(f"{path}  sha256 {hashlib.sha256(path.read_bytes()).hexdigest()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
