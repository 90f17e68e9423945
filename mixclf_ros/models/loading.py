"""Loading models from a small config, safely; the shipped zoo's configs.

The config keys (types, defaults, units, which kinds use them) are declared once in
`mixclf_ros.models.schema`. `mean`/`std` are applied INSIDE the loaded model, so certificates are
stated on [0,1] pixels: project architectures take them as builder arguments (their first layer is
Normalize); other architectures are wrapped with a Normalize layer. Weights are read with
torch.load(weights_only=True), never unpickling objects, or as TorchScript.

Every mistake raises one `ModelConfigError` naming the key and the file, before any frame.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mixclf_ros.core import lipschitz
from mixclf_ros.core.layers import Normalize
from mixclf_ros.core.lipschitz_search import probability_gradient_norm_search
from mixclf_ros.core.tracing import freeze_parametrizations, needs_freezing
from mixclf_ros.data import FASHION_MNIST_CLASSES
from mixclf_ros.models.architectures import ARCHITECTURES
from mixclf_ros.models.norm_cache import NormStore
from mixclf_ros.models.schema import DEFAULTS, DOUBLE, INTEGER, KINDS, SCHEMA, STRING, STRING_ARRAY, defaults

ZOO_DIR = Path(__file__).resolve().parent / "zoo"
TORCHSCRIPT_SUFFIXES = (".ts", ".jit", ".torchscript")

_ZOO: dict[str, dict[str, Any]] = {
    "standard": {"architecture": "fmnist_cnn", "mean": [0.2860], "std": [0.3530], "kind": "standard"},
    "robust_at": {"architecture": "fmnist_small_cnn", "mean": [0.2860], "std": [0.3530], "kind": "empirical",
                  "norm": "linf"},
    "robust_lipschitz": {"architecture": "fmnist_lipschitz_cnn", "mean": [0.0], "std": [1.0],
                         "kind": "lipschitz", "norm": "l2"},
    "robust_lipschitz_gnp": {"architecture": "fmnist_gnp_cnn", "mean": [0.2860], "std": [1.0],
                             "kind": "lipschitz", "norm": "l2"},
    "robust_smoothing": {"architecture": "fmnist_small_cnn", "mean": [0.2860], "std": [0.3530],
                         "kind": "smoothing", "sigma": 0.25, "n0": 64, "n": 1000, "beta": 0.001},
}


class ModelConfigError(ValueError):
    """A model config mistake; the message names the key and, where there is one, the file."""


def zoo_config(name: str) -> dict[str, Any]:
    """Config of a shipped model: standard, robust_at, robust_lipschitz, robust_lipschitz_gnp or
    robust_smoothing."""
    if name not in _ZOO:
        raise ModelConfigError(f"unknown zoo model '{name}' (shipped: {', '.join(_ZOO)})")
    config = {**defaults(), **copy.deepcopy(_ZOO[name]), "weights": f"zoo:{name}.pt",
              "class_names": list(FASHION_MNIST_CLASSES)}
    card = ZOO_DIR / f"{name}.json"
    if card.exists():
        config["sha256"] = json.loads(card.read_text())["sha256"]
    return config


def resolve_weights(weights: str) -> Path:
    if weights.startswith("zoo:"):
        return ZOO_DIR / weights[len("zoo:"):]
    return Path(weights).expanduser()


def zoo_sha256(weights: str) -> str:
    """The sha256 the zoo's card gives for `zoo:<file>` weights; '' for any other weights (a zoo
    hash applies to the zoo's file only)."""
    if not weights.startswith("zoo:"):
        return ""
    card = ZOO_DIR / f"{Path(weights[len('zoo:'):]).stem}.json"
    return json.loads(card.read_text())["sha256"] if card.exists() else ""


def unpinned_note(model: LoadedModel, name: str) -> str:
    """A line for the log when `model`'s weights are checked against no hash ('' otherwise): the
    file's sha256 and how to pin it. `name` is the parameter prefix, e.g. 'robust_model'."""
    if model.config["sha256"] or zoo_sha256(model.config["weights"]):
        return ""
    return (f"{name}: weights {model.weights_path} loaded unpinned, sha256 {model.sha256}; to refuse any other file "
            f"there, pin it: {name}.sha256: \"{model.sha256}\"")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Returns the config with defaults filled in and types checked."""
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ModelConfigError(f"unknown model config key(s) {sorted(unknown)} (known: {sorted(DEFAULTS)})")
    merged = {**defaults(), **config}

    def fail(key: str, why: str) -> None:
        raise ModelConfigError(f"model config key '{key}' = {merged[key]!r}: {why}")

    for key in SCHEMA:
        value = merged[key.name]
        if key.type == STRING and not isinstance(value, str):
            fail(key.name, "must be a string")
        if key.type == INTEGER and (isinstance(value, bool) or not isinstance(value, int) or value < key.minimum):
            fail(key.name, "must be a positive integer" if key.minimum == 1 else f"must be an integer >= {key.minimum}")
        if key.type == DOUBLE and (isinstance(value, bool) or not isinstance(value, (int, float))
                                   or not math.isfinite(value)):
            fail(key.name, "must be a finite number")
        if key.type == STRING_ARRAY and not isinstance(value, (list, tuple)):
            fail(key.name, "must be a list of strings")
    if not merged["architecture"]:
        fail("architecture", "is required")
    if not merged["weights"]:
        fail("weights", "is required")
    if merged["kind"] not in KINDS:
        fail("kind", f"must be one of {KINDS}")
    if merged["resize"] not in ("area", "bilinear"):
        fail("resize", "must be area or bilinear")
    if merged["norm"] not in ("l2", "linf"):
        fail("norm", "must be l2 or linf")
    if merged["kind"] == "smoothing" and merged["norm"] != "l2":
        fail("norm", "randomized smoothing certifies l2 only")
    if merged["lipschitz_constant"] < 0:
        fail("lipschitz_constant", "must be >= 0 (0 = compute)")
    if merged["kind"] == "smoothing" and merged["sigma"] <= 0:
        fail("sigma", "must be > 0")
    if not 0 < merged["beta"] < 1:
        fail("beta", "must be in (0, 1)")
    for key in ("mean", "std"):
        values = merged[key]
        if not isinstance(values, (list, tuple)) or len(values) not in (1, merged["input_channels"]):
            fail(key, f"must be a list of 1 or input_channels ({merged['input_channels']}) numbers")
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            fail(key, "must hold finite numbers")
    if any(v <= 0 for v in merged["std"]):
        fail("std", "must be > 0")
    if merged["input_channels"] not in (1, 3):
        fail("input_channels", "must be 1 or 3")
    merged["mean"] = [float(v) for v in merged["mean"]] * (merged["input_channels"] if len(merged["mean"]) == 1 else 1)
    merged["std"] = [float(v) for v in merged["std"]] * (merged["input_channels"] if len(merged["std"]) == 1 else 1)
    return merged


def _class_names(config: dict[str, Any]) -> list[str]:
    names = [str(name) for name in config["class_names"] if str(name)]
    if config["class_names_file"]:
        path = Path(config["class_names_file"]).expanduser()
        if not path.exists():
            raise ModelConfigError(f"model config key 'class_names_file': {path} not found")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if names and len(names) != config["num_classes"]:
        raise ModelConfigError(f"model config key 'class_names': {len(names)} names for "
                               f"num_classes = {config['num_classes']}")
    return names


def _build_architecture(config: dict[str, Any]) -> tuple[nn.Module, bool]:
    """Returns (module, normalises_inside)."""
    name, num_classes = config["architecture"], config["num_classes"]
    if name in ARCHITECTURES:
        return ARCHITECTURES[name](num_classes=num_classes, mean=config["mean"], std=config["std"]), True
    if name.startswith("torchvision:"):
        import torchvision

        model_name = name.split(":", 1)[1]
        known = torchvision.models.list_models()
        if model_name not in known:
            raise ModelConfigError(f"model config key 'architecture' = '{name}': torchvision has no model "
                                   f"'{model_name}' (torchvision.models.list_models() names {len(known)}, "
                                   f"e.g. resnet18, mobilenet_v3_small, convnext_tiny)")
        try:
            return torchvision.models.get_model(model_name, weights=None, num_classes=num_classes), False
        except Exception as error:
            raise ModelConfigError(f"model config key 'architecture' = '{name}': building the model failed: "
                                   f"{type(error).__name__}: {error}") from error
    module_name, _, attribute = name.partition(":")
    if not attribute:
        raise ModelConfigError(f"model config key 'architecture' = '{name}': not a project architecture "
                               f"({', '.join(ARCHITECTURES)}), 'torchvision:<name>' or 'package.module:Callable'")
    try:
        builder = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ModelConfigError(f"model config key 'architecture' = '{name}': cannot import ({error})") from error
    if not callable(builder):
        raise ModelConfigError(f"model config key 'architecture' = '{name}': {attribute} is not callable")
    try:
        accepts_classes = "num_classes" in inspect.signature(builder).parameters
        network = builder(num_classes=num_classes) if accepts_classes else builder()
    except Exception as error:
        raise ModelConfigError(f"model config key 'architecture' = '{name}': building the model failed: "
                               f"{type(error).__name__}: {error}") from error
    if not isinstance(network, nn.Module):
        raise ModelConfigError(f"model config key 'architecture' = '{name}': returned a {type(network).__name__}, "
                               "not a torch.nn.Module")
    return network, False


class LoadedModel(nn.Module):
    """A loaded model in eval mode: [0,1] pixels (N, C, H, W) -> logits (N, num_classes).

    Attributes: config (validated), num_classes, input_shape (C, H, W), kind, norm, class_names,
    weights_path, sha256, and for kind lipschitz `lipschitz_constant` (of the probability outputs,
    in `norm`, per unit of [0,1] pixels at the model input) with `lipschitz_source` ('computed': a
    sound bound; 'declared': stated in the config, only checked by `check_declared_lipschitz`) and
    `lipschitz_lower_bound` (the largest gradient norm that check found; 0 if not searched); for
    kind smoothing sigma, n0, n, beta. `network` is the bare network (what the Lipschitz walker bounds)."""

    def __init__(self, network: nn.Module, config: dict[str, Any], weights_path: Path, sha256: str):
        super().__init__()
        self.network = network.eval()
        self.config = config
        self.num_classes = config["num_classes"]
        self.input_shape = (config["input_channels"], config["input_height"], config["input_width"])
        self.kind = config["kind"]
        self.norm = config["norm"]
        self.class_names = _class_names(config)
        self.weights_path = weights_path
        self.sha256 = sha256
        self.sigma, self.n0, self.n, self.beta = config["sigma"], config["n0"], config["n"], config["beta"]
        self.lipschitz_constant = 0.0
        self.logit_lipschitz_constant = 0.0
        """The computed bound of the logits' Lipschitz constant (`norm` -> `norm`); 0 where the
        constant is declared (a probability constant bounds no logit)."""
        self.lipschitz_source = ""
        self.lipschitz_lower_bound = 0.0
        self.bound_plan = None
        """The network's compiled `core.engine.BoundPlan` (float64) when its constant is computed:
        the runtime's rounding-error bound reuses it (traced and compiled once)."""
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def train(self, mode: bool = True) -> LoadedModel:
        return super().train(False)  # loaded models stay in eval mode (certificates assume it)


def _sound_bound_advice(network: nn.Module, config: dict[str, Any], found: float) -> str:
    """What a user whose declared constant was refused can do: set 0 where the bound engine can
    bound this network (with the bound it computes), otherwise declare a proven constant, in the
    certificate's units, no lower than the slope found."""
    input_shape = (config["input_channels"], config["input_height"], config["input_width"])
    units = (f"the per-class constant of the softmax probability outputs, {config['norm']}, per [0,1] pixel at "
             "the model input (a logit constant quoted for normalised inputs: multiply it by "
             f"certify.softmax_lipschitz_factor('{config['norm']}') and by 1/min(std); see docs/BRING_YOUR_OWN.md)")
    try:
        sound = lipschitz.probability_lipschitz_bound(network, config["norm"], input_shape)
    except lipschitz.UnsupportedLayerError as error:
        return (f"the bound engine cannot bound this model ({error}), so lipschitz_constant: 0 is no way out: "
                f"declare a constant proven for this architecture and these weights, at least {found:.6g}, in "
                f"{units}; a slope found is only a lower bound of it")
    except Exception as error:  # a model the engine fails on is no model to advise 0 for
        return (f"the bound engine fails on this model ({type(error).__name__}: {error}): declare a proven "
                f"constant, at least {found:.6g}, in {units}")
    return (f"declare a constant no lower than that, in {units}, or set lipschitz_constant: 0 to use the "
            f"sound bound the engine computes for this model ({sound:.6g})")


def check_declared_lipschitz(network: nn.Module, config: dict[str, Any], path: Path) -> float:
    """Refuses a declared `lipschitz_constant` that gradients of the network contradict; returns
    the largest gradient norm found.

    Units of a declared constant: the per-class Lipschitz constant `Lip(h_i)` of the PROBABILITY
    outputs (softmax of the logits), with respect to [0,1] pixels at the model input (before
    mean/std: the loaded network normalises inside), in the certificate's norm (`norm`: l2, or
    linf, where the gradient is measured in l1). Constants quoted for normalised inputs are
    1/std times too small (4.4x for ImageNet statistics) and are refused here when the search
    finds it.

    The search (`lipschitz_search.probability_gradient_norm_search`: 32 starting points, uniform
    and image-like around the configured mean/std, then 24 adaptive ascent steps on the gradient
    norm, fixed seed) runs on a float64 copy of the network, with attention on its math kernel
    (the only one with a double backward); any gradient norm is a lower bound of the true
    constant, so a declared constant below it is wrong. Passing the check does not prove the
    constant. A refusal says what works for this model: 0 (the sound bound) where the engine can
    bound it, a proven constant of at least the slope found otherwise.
    """
    try:
        probe = copy.deepcopy(network).double().eval()
    except Exception:  # e.g. a module that cannot be copied: search in its own precision
        probe = network
    input_shape = (config["input_channels"], config["input_height"], config["input_width"])
    try:
        found = probability_gradient_norm_search(probe, config["norm"], input_shape, mean=config["mean"],
                                                 std=config["std"])
    except Exception as error:
        raise ModelConfigError(f"model config key 'lipschitz_constant' = {config['lipschitz_constant']}: cannot "
                               f"check it on the model '{config['architecture']}' in {path}: gradients fail "
                               f"({type(error).__name__}: {error}); the check needs first and second derivatives "
                               "of the softmax outputs with respect to the input (torch.autograd.grad with "
                               "create_graph=True) in float64") from error
    if not config["lipschitz_constant"] >= found:
        raise ModelConfigError(
            f"model config key 'lipschitz_constant' = {config['lipschitz_constant']}: the model "
            f"'{config['architecture']}' in {path} has probability outputs with local slopes ({config['norm']}) up "
            f"to {found:.6g} per [0,1] pixel at the model input (before mean/std), above the declared "
            f"constant {config['lipschitz_constant']}; {_sound_bound_advice(network, config, found)}")
    return found


def _state_dict_hint(state: dict[str, Any]) -> str:
    """What to do about the common ways a checkpoint differs from a plain state_dict."""
    keys = [key for key in state if isinstance(key, str)]
    for wrapper in ("state_dict", "model", "model_state_dict", "net", "ema"):
        if isinstance(state.get(wrapper), dict):
            return (f" The file holds a training checkpoint (a dict with key '{wrapper}'): save its "
                    f"state_dict alone, e.g. torch.save(torch.load(path)['{wrapper}'], 'weights.pt').")
    if keys and all(key.startswith("module.") for key in keys):
        return (" Every key starts with 'module.' (saved from DataParallel/DistributedDataParallel): save "
                "model.module.state_dict() instead, or strip the prefix: "
                "{k.removeprefix('module.'): v for k, v in state.items()}.")
    return ""


def _key_differences(expected: dict[str, Any], state: dict[str, Any]) -> str:
    """Every key the architecture wants and the file lacks, every key the file has and the architecture
    lacks, and every shape that differs: all of them, so a user can compare the two models."""
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    shapes = [f"{key}: file {tuple(state[key].shape)}, model {tuple(expected[key].shape)}" for key in expected
              if key in state and tuple(getattr(state[key], "shape", ())) != tuple(expected[key].shape)]
    parts = [f"{label} ({len(items)}): {', '.join(items)}" for label, items in
             (("keys missing from the file", missing), ("keys the model does not have", unexpected),
              ("shapes that differ", shapes)) if items]
    return "; ".join(parts) or "the tensors do not load"


def load_model(config: dict[str, Any], name: str = "") -> LoadedModel:
    """Builds, loads and checks a model described by `config` (see the module docstring).

    `name` (e.g. 'robust_model') prefixes every error message, so a user with two models knows which
    one is meant."""
    try:
        return _load_model(config)
    except ModelConfigError as error:
        if not name:
            raise
        raise ModelConfigError(f"{name}: {error}") from error


def _load_model(config: dict[str, Any]) -> LoadedModel:
    config = validate_config(config)
    path = resolve_weights(config["weights"])
    if path.is_dir():
        raise ModelConfigError(f"model config key 'weights': {path} is a directory; give the weights file in it "
                               "(a state_dict .pt/.pth, or TorchScript .ts/.jit/.torchscript)")
    if not path.is_file():
        raise ModelConfigError(f"model config key 'weights' = '{config['weights']}': file {path.resolve()} not "
                               "found (a relative path is taken from the working directory)")
    digest = sha256_of(path)
    if config["sha256"] and config["sha256"].lower() != digest:
        raise ModelConfigError(f"model config key 'sha256': {path} has sha256 {digest}, expected {config['sha256']}")
    shipped = zoo_sha256(config["weights"])
    if shipped and shipped != digest:
        raise ModelConfigError(f"model config key 'weights' = '{config['weights']}': the zoo file {path} has sha256 "
                               f"{digest}, its card says {shipped}: the shipped weights were changed; reinstall the "
                               "package")
    if path.suffix in TORCHSCRIPT_SUFFIXES:
        try:
            network = torch.jit.load(str(path), map_location="cpu")
        except Exception as error:
            raise ModelConfigError(f"model config key 'weights': {path} is not a TorchScript file ({error})") from error
        normalises = False
    else:
        network, normalises = _build_architecture(config)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # includes pickles with payloads, refused by weights_only
            raise ModelConfigError(f"model config key 'weights': {path} is not a plain state_dict "
                                   f"(loaded with weights_only=True): {error}") from error
        if not isinstance(state, dict):
            raise ModelConfigError(f"model config key 'weights': {path} holds a {type(state).__name__}, "
                                   "not a state_dict")
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            raise ModelConfigError(f"model config keys 'architecture' = '{config['architecture']}' / 'num_classes' = "
                                   f"{config['num_classes']} / 'input_channels' = {config['input_channels']} do not "
                                   f"match the weights in {path}: {_key_differences(network.state_dict(), state)}."
                                   f"{_state_dict_hint(state)}") from error
        if normalises:  # the weights carry their own mean/std buffers: they must be the configured ones
            stored = network[0]
            if not (torch.allclose(stored.mean, torch.tensor(config["mean"]), atol=1e-6)
                    and torch.allclose(stored.std, torch.tensor(config["std"]), atol=1e-6)):
                raise ModelConfigError(f"model config keys 'mean'/'std' = {config['mean']}/{config['std']} differ from "
                                       f"those stored with the weights in {path}: {stored.mean.tolist()}/"
                                       f"{stored.std.tolist()}")
    if not normalises:
        network = nn.Sequential(Normalize(config["mean"], config["std"]), network)
    network.eval()
    with torch.no_grad():
        try:
            output = network(torch.zeros(1, *(config["input_channels"], config["input_height"], config["input_width"])))
        except Exception as error:
            raise ModelConfigError(f"model config keys 'input_*': the model in {path} fails on an input of shape "
                                   f"(1, {config['input_channels']}, {config['input_height']}, "
                                   f"{config['input_width']}): {error}") from error
    if output.shape != (1, config["num_classes"]):
        raise ModelConfigError(f"model config key 'num_classes' = {config['num_classes']}: the model in {path} "
                               f"returns shape {tuple(output.shape)}")
    if config["kind"] == "lipschitz" and needs_freezing(network):
        network = freeze_parametrizations(network)  # the certified function is the one that runs
    model = LoadedModel(network, config, path, digest)
    if model.kind == "lipschitz":
        if config["lipschitz_constant"] > 0:
            model.lipschitz_lower_bound = check_declared_lipschitz(network, config, path)
            model.lipschitz_constant, model.lipschitz_source = float(config["lipschitz_constant"]), "declared"
        else:
            try:
                norms = NormStore.open()
                model.bound_plan = lipschitz.BoundPlan(network, model.input_shape, "robust_model", norm_store=norms)
                norms.save()
                model.logit_lipschitz_constant = lipschitz.logit_lipschitz_bound(network, model.norm, model.input_shape,
                                                                                 model.bound_plan)
                model.lipschitz_constant = lipschitz.probability_lipschitz_bound(network, model.norm, model.input_shape,
                                                                                 model.bound_plan)
            except lipschitz.UnsupportedLayerError as error:
                raise ModelConfigError(f"model config key 'lipschitz_constant' = 0 (compute): cannot bound the model "
                                       f"in {path}: {error}; or declare a constant (lipschitz_constant > 0; checked "
                                       f"against a gradient search, not proven)") \
                    from error
            model.lipschitz_source = "computed"
    return model


def check_compatible(standard: LoadedModel, robust: LoadedModel) -> None:
    """The mixture needs the same classes and a robust model with a certificate kind. The inputs may
    differ (size, channels, crop): each model preprocesses the frame its own way, and by Lemma 1 the
    certificate depends on the robust model's input only."""
    if standard.num_classes != robust.num_classes:
        raise ModelConfigError(f"key 'num_classes': the standard model ({standard.weights_path}) has "
                               f"{standard.num_classes} classes, the robust model ({robust.weights_path}) "
                               f"{robust.num_classes}")
    if robust.kind not in ("lipschitz", "smoothing", "empirical"):
        raise ModelConfigError(f"key 'kind' of the robust model ({robust.weights_path}): '{robust.kind}' gives no "
                               "certificate; use lipschitz, smoothing or empirical")
