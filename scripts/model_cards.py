"""Writes `models/README.md`: one model card per shipped zoo model, from its sidecar JSON.

    python scripts/model_cards.py           # (re)write models/README.md
    python scripts/model_cards.py --check   # exit 1 if models/README.md is out of date

Every number comes from files: `mixclf_ros/models/zoo/<name>.json`, written by `python -m mixclf_ros.train
<name>` at the end of training (its final measurement on the Fashion-MNIST test set), and the
evaluation CLI's outputs in `docs/results/*.json` (`mixclf-eval`; used only where the sha256 they
record is the shipped weights' own). Parameter counts come from the architecture builders in
`mixclf_ros.models.architectures`. Nothing is re-measured here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
ZOO_DIR = ROOT / "mixclf_ros" / "models" / "zoo"
OUTPUT = ROOT / "models" / "README.md"
RESULTS_DIR = ROOT / "docs" / "results"
REGENERATE = "PYTHONPATH=. python scripts/model_cards.py"

ZOO_ORDER = ("standard", "robust_at", "robust_lipschitz", "robust_lipschitz_gnp", "robust_smoothing")
LIPSCHITZ_NAMES = ("robust_lipschitz", "robust_lipschitz_gnp")
ROBUST_NAMES = ZOO_ORDER[1:]
CERTIFIED_ALPHAS = (1.0, 0.75, 0.6)

PURPOSE = {
    "standard": "the accurate, non-robust classifier g of the mixture (alpha = 0).",
    "robust_at": "robust classifier h with **empirical** robustness (adversarial training, linf eps 0.1); "
                 "no certificate.",
    "robust_lipschitz": "robust classifier h with a **certificate** from a sound Lipschitz bound "
                        "(Theorem 1, l2).",
    "robust_lipschitz_gnp": "the **default** robust classifier h (node, demo, `mixclf-eval certify`), with a "
                            "**certificate** from a sound Lipschitz bound (Theorem 1 or the logit margin, l2): a "
                            "1-Lipschitz network of AOL layers and MaxMin, trained for larger certified radii.",
    "robust_smoothing": "base classifier of a **randomized-smoothing** robust classifier h (Theorem 2, l2, "
                        "sigma 0.25).",
}
KIND = {"standard": "standard", "robust_at": "empirical (linf)", "robust_lipschitz": "lipschitz (l2)",
        "robust_lipschitz_gnp": "lipschitz (l2)", "robust_smoothing": "smoothing (l2)"}
TRAINING = {
    "standard": "cross-entropy, Adam, one-cycle learning rate.",
    "robust_at": "PGD adversarial training (Madry et al. 2018): each batch replaced by its linf PGD adversary "
                 "(7 signed-gradient steps of 0.03 from a uniform random start in the eps ball, last iterate), "
                 "eps 0.1 ramped up over the first epoch; Adam, one-cycle learning rate.",
    "robust_lipschitz": "Lipschitz-margin training (Tsuzuku et al. 2018); a logit temperature chosen on 5 000 "
                        "held-out training images to maximise the certified accuracy at l2 radius 0.5, then "
                        "folded into the last layer.",
    "robust_lipschitz_gnp": "Lipschitz-margin cross-entropy (Tsuzuku et al. 2018) with the offset sqrt(2) margin_eps "
                            "of a logit map whose l2 constant is at most 1 by construction (AOL layers, Prach & "
                            "Lampert 2022), logits scaled by loss_scale; the AOL weights frozen after training and "
                            "the softest logit temperature whose mean certified accuracy (the node's radius) at "
                            "(l2 0.5, alpha 1) and (l2 0.25, alpha 0.75) on 5 000 held-out training images is within "
                            "1 point of the best, folded into the last layer.",
    "robust_smoothing": "Gaussian noise augmentation, sigma 0.25 ([0,1] pixels).",
}


def load_sidecars(zoo_dir: Path = ZOO_DIR) -> dict[str, dict[str, Any]]:
    """name -> sidecar, for every zoo model; exits with a message naming the missing files."""
    missing = [f"{name}.{suffix}" for name in ZOO_ORDER for suffix in ("pt", "json")
               if not (zoo_dir / f"{name}.{suffix}").exists()]
    if missing:
        raise SystemExit(f"missing in {zoo_dir}: {', '.join(missing)}; train them with "
                         "`python -m mixclf_ros.train <name>` first")
    return {name: json.loads((zoo_dir / f"{name}.json").read_text()) for name in ZOO_ORDER}


def builder(architecture: str) -> Any:
    """The project's builder function of `architecture` (this checkout's mixclf_ros)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("mixclf_ros.models.architectures").ARCHITECTURES[architecture]


def parameter_count(architecture: str) -> int:
    """Trainable parameters of a project architecture (10 classes), from its builder."""
    return sum(parameter.numel() for parameter in builder(architecture)().parameters())


def architecture_summary(architecture: str) -> str:
    """First sentence of the builder's docstring, without parentheticals or the rounded parameter
    count (the exact count has its own row)."""
    doc = " ".join((builder(architecture).__doc__ or "").split())
    sentence = re.sub(r"\s*\([^()]*\)", "", doc).split(". ")[0]
    return sentence.split("; ")[0].rstrip(".")


def percent(fraction: float) -> str:
    return f"{100.0 * fraction:.2f} %"


def points(difference: float) -> str:
    return f"{100.0 * difference:+.2f} points"


def minutes(seconds: float) -> str:
    return f"{seconds:.0f} s ({seconds / 60:.1f} min)"


def table(rows: list[tuple[str, str]]) -> list[str]:
    lines = ["| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return lines


def summary_table(cards: dict[str, dict[str, Any]]) -> list[str]:
    standard = cards["standard"]["test_accuracy"]
    lines = ["| model | kind | clean test accuracy | gap to `standard` | robustness |", "|---|---|---|---|---|"]
    for name in ZOO_ORDER:
        card = cards[name]
        gap = "—" if name == "standard" else points(card["test_accuracy"] - standard)
        if name in ("standard", "robust_at"):
            robust = f"PGD-20 linf 0.1: {percent(card['pgd20_linf_0.1_accuracy_subset1000'])}"
        elif name in LIPSCHITZ_NAMES:
            robust = f"certified l2 0.5 (alpha 1): {percent(card['certified_accuracy_l2_0.5_alpha1.0'])}"
        else:
            robust = f"accuracy under N(0, 0.25²) noise: {percent(card['noisy_sigma0.25_accuracy'])}"
        lines.append(f"| `{name}` | {KIND[name]} | {percent(card['test_accuracy'])} | {gap} | {robust} |")
    return lines


def evaluation_rows(name: str, sha256: str, results_dir: Path = RESULTS_DIR) -> list[tuple[str, str]]:
    """Rows measured by `mixclf-eval` for the model `name`: from every result JSON that evaluated
    these very weights (same sha256) as g (standard) or h (robust) on its own, i.e. at alpha 0 or 1."""
    rows = []
    for path in sorted(results_dir.glob("*.json")):
        result = json.loads(path.read_text())
        roles = [role for role, model in result.get("models", {}).items()
                 if name in (model.get("label"), model.get("weights", "").removeprefix("zoo:").removesuffix(".pt"))
                 and model.get("sha256") == sha256]
        source = f"(`{result['command'].split(' --')[0]}`, [{path.name}](../docs/results/{path.name}))"
        for role in roles:
            if "reference" in result:  # sweep: g and h alone, each under the PGD aimed at itself
                attack, own = result["attack"], "std" if role == "standard" else "rob"
                if result["num_clean"] >= 10_000:
                    rows.append((f"clean accuracy, {result['num_clean']:,} images {source}",
                                 percent(result["reference"][f"{role}_clean_accuracy_all"])))
                rows.append((f"PGD-{attack['steps']} {attack['norm']} eps {attack['eps']:g} accuracy, "
                             f"{result['num_attacked']:,} images {source}",
                             percent(result["reference"][f"{role}_{own}_attacked_accuracy"])))
                alone = [row for row in result["rows"] if row["alpha"] == (0.0 if role == "standard" else 1.0)]
                if result["arguments"].get("autoattack") and alone:
                    rows.append((f"worst case over PGD and AutoAttack (APGD-CE, APGD-T, Square), {attack['norm']} "
                                 f"eps {attack['eps']:g}, {result['num_attacked']:,} images {source}",
                                 percent(alone[0]["worst_accuracy"])))
            elif "curves" in result and role == "robust":  # certify: h alone (alpha 1)
                for curve in result["curves"]:
                    if curve["model"] != "mixture" or curve["alpha"] != 1.0:
                        continue
                    certified = ", ".join(f"{percent(accuracy)} at {radius:g}"
                                          for radius, accuracy in zip(result["radii"], curve["accuracy"])
                                          if radius in (0.25, 0.5))
                    theorem = "Theorem 1" if curve["theorem"] == "theorem1" else "Theorem 2"
                    if result["certificate"].get("kind") == "lipschitz":
                        theorem = "the node's Lipschitz radius: Theorem 1 or the logit margin"
                    if "sigma" in result["certificate"]:
                        theorem += f", smoothed with sigma {result['certificate']['sigma']:g}"
                    rows.append((f"certified {result['certificate']['norm']} accuracy ({theorem}), "
                                 f"{result['data']['evaluated']:,} images {source}", certified))
    return rows


def model_card(name: str, card: dict[str, Any], standard: dict[str, Any]) -> list[str]:
    recipe = {key: value for key, value in card["recipe"].items() if key != "architecture"}
    rows = [
        ("kind (`models.zoo_config`)", KIND[name]),
        ("architecture", f"`{card['architecture']}` — {architecture_summary(card['architecture'])}"),
        ("parameters", f"{parameter_count(card['architecture']):,}"),
        ("input", "[0,1] pixels (N, 1, 28, 28), normalisation inside the model; output: 10 logits"),
        ("training", TRAINING[name]),
        ("training command", f"`{card['command']}`"),
        ("seed / epochs", f"{card['seed']} / {card['epochs']}"),
        ("recipe", ", ".join(f"{key} {value}" for key, value in recipe.items())),
        ("training wall time", f"{minutes(card['train_wall_seconds'])}, CPU"),
        ("weights", f"`mixclf_ros/models/zoo/{name}.pt` (state_dict, {card['bytes']:,} bytes, "
                    f"{card['bytes'] / 2**20:.2f} MiB)"),
        ("sha256", f"`{card['sha256']}`"),
        ("clean test accuracy (10 000 images)", percent(card["test_accuracy"])),
        ("clean accuracy, fixed 1 000-image subset", f"{percent(card['subset1000_accuracy'])} "
                                                      "(`data.evaluation_subset()`, checked by test/test_models.py)"),
    ]
    if name != "standard":
        rows.append(("clean accuracy gap to `standard`", points(card["test_accuracy"] - standard["test_accuracy"])))
    if "pgd20_linf_0.1_accuracy_subset1000" in card:
        rows.append(("PGD-20 linf eps 0.1 accuracy (1 000-image subset)",
                     percent(card["pgd20_linf_0.1_accuracy_subset1000"])))
    if name in LIPSCHITZ_NAMES:
        rows.append(("logit temperature (folded into the last layer)", f"{card['temperature']:.4g}"))
        bound = card["lipschitz_l2_probability_bound"]
        rows.append(("sound l2 Lipschitz bound of each softmax output", f"{bound:.4f}"))
        # cards written before the node certified through the logits hold Theorem 1 alone
        how = ("the node's radius, float32 logits" if "lipschitz_l2_logit_bound" in card
               else "Theorem 1 alone, as measured at training")
        for alpha in CERTIFIED_ALPHAS:
            value = percent(card[f"certified_accuracy_l2_0.5_alpha{alpha}"])
            if "lipschitz_l2_logit_bound" not in card:
                largest = max(0.0, (2 * alpha - 1) / (2 * alpha * bound))  # Theorem 1 with a margin of 1
                value += f" (Theorem 1 cannot exceed {largest:.3f} at this alpha)"
            rows.append((f"certified l2 accuracy at radius 0.5, alpha {alpha} (10 000 images, {how})", value))
        if "certified_accuracy_l2_0.25_alpha0.75" in card:
            rows.append((f"certified l2 accuracy at radius 0.25, alpha 0.75 (10 000 images, {how})",
                         percent(card["certified_accuracy_l2_0.25_alpha0.75"])))
    if name == "robust_smoothing":
        rows.append(("accuracy of the base model under N(0, 0.25²) pixel noise (10 000 images)",
                     percent(card["noisy_sigma0.25_accuracy"])))
    measured = evaluation_rows(name, card["sha256"])
    evaluation = (["Measured by the evaluation CLI on these weights (see [docs/RESULTS.md](../docs/RESULTS.md)):",
                   "", *table(measured), ""] if measured else [])
    return [f"## `{name}`", "", f"Role: {PURPOSE[name]}", "", *table(rows), "", *evaluation]


def render(cards: dict[str, dict[str, Any]]) -> str:
    standard = cards["standard"]
    gaps = ", ".join(f"`{name}` {points(cards[name]['test_accuracy'] - standard['test_accuracy'])}"
                     for name in ROBUST_NAMES)
    lines = [
        "# Model zoo: model cards",
        "",
        "<!-- generated by scripts/model_cards.py from mixclf_ros/models/zoo/*.json; do not edit by hand -->",
        "",
        f"The {len(ZOO_ORDER)} Fashion-MNIST classifiers shipped in `mixclf_ros/models/zoo/` (load one with "
        "`mixclf_ros.models.load_model(mixclf_ros.models.zoo_config(name))`). The first table of each card "
        "is the final measurement of `python -m mixclf_ros.train <name>`, stored in the sidecar "
        "`mixclf_ros/models/zoo/<name>.json` next to the weights; the second is what the evaluation CLI "
        "(`mixclf-eval`, [docs/RESULTS.md](../docs/RESULTS.md)) measured on the same weights (matched by "
        "sha256). This page only formats them. Regenerate it after retraining or re-evaluating with",
        "",
        "```sh",
        REGENERATE,
        "```",
        "",
        "Test set: the 10 000 Fashion-MNIST test images (accuracies are fractions of them, shown in %); "
        "attacks use the fixed 1 000-image subset `mixclf_ros.data.evaluation_subset()`. Perturbation sizes "
        "are in [0,1]-pixel units at the 28x28 model input.",
        "",
        *summary_table(cards),
        "",
        f"**Why mix.** Every robust model pays in clean accuracy ({gaps} against `standard`), while "
        f"`standard` itself keeps only {percent(standard['pgd20_linf_0.1_accuracy_subset1000'])} under the "
        f"PGD-20 linf 0.1 attack that `robust_at` survives on "
        f"{percent(cards['robust_at']['pgd20_linf_0.1_accuracy_subset1000'])} of the images. The mixture "
        "of eq. 4, (1 - alpha) softmax(g) + alpha softmax(h), trades between the two with one knob, alpha, "
        "instead of accepting the robust model's clean-accuracy loss everywhere.",
        "",
        "How the robustness numbers were measured (in `mixclf_ros/train.py`, `measure`):",
        "",
        "- **PGD-20 linf 0.1**: `mixclf_ros.attacks.pgd`, 20 steps of size 2.5 eps / 20 from a random start, "
        "one restart, on the 1 000-image subset; an empirical upper bound on robust accuracy, not a certificate.",
        "- **certified l2 accuracy at radius 0.5**: fraction of the test images that a Lipschitz model "
        "classifies correctly AND whose Theorem 1 radius (`certify.lipschitz_radius`, with the sound bound of "
        "`mixclf_ros.core.lipschitz`) is at least 0.5, for the mixture weight alpha; the certificate holds "
        "whatever the standard model predicts (Theorem 1 assumes nothing about g). Below alpha = 1 it needs "
        "larger margins, so it shrinks: no radius exceeds (2 alpha - 1) / (2 alpha L), L the bound below.",
        "- **noisy accuracy**: accuracy of the `robust_smoothing` base classifier on test images plus "
        "Gaussian noise of std 0.25 (unclipped): how well it works under the noise randomized smoothing "
        "adds. Certified radii of the smoothed classifier (Monte Carlo, Theorem 2) come from "
        "`mixclf-eval certify`, not from training.",
        "",
    ]
    for name in ZOO_ORDER:
        lines += model_card(name, cards[name], standard)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the written file is out of date")
    parser.add_argument("--out", type=Path, default=OUTPUT)
    args = parser.parse_args(argv)
    text = render(load_sidecars())
    if args.check:
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date: run {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
