"""Recipes: YAML files validated into typed, frozen dataclasses.

A mistake names the file, the line, the key and the nearest valid key. YAML is read with the safe loader.

Each PTQ algorithm owns its section's dataclass beside its code (quantization/ptq/*.py); this module assembles
them. A recipe's `targets:` sections stay as written (`TargetSection`) until the target registry checks them
against each target's Options (`mnv4_deploy.targets.check_recipe_targets`, which every entry point runs when it
loads a recipe): config sits below the targets and imports none of them.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..errors import UserError, did_you_mean
from ..quantization.ptq.adaround import AdaRound
from ..quantization.ptq.bias_correction import BiasCorrection
from ..quantization.ptq.equalize import Equalization
from ..quantization.ptq.range_learning import RangeLearning
from .named_files import find_named, named_files, shipped_dir, user_dir
from .options import MAX_BATCH, MAX_IMAGES, MAX_SEED, MAX_STEPS, choice, numeric_range, option, range_text
from .yaml_io import CONSTRUCT_ERRORS, cannot_read, compose, construct

# The shipped recipes (package data; the repository's recipes/ folder). Read them by name with load_recipe.
RECIPES_DIR = shipped_dir("recipes") or Path("recipes")


@dataclass(frozen=True)
class WeightQuant:
    bits: int = choice(8, 8)
    granularity: str = choice("per_channel", "per_channel", "per_tensor")


@dataclass(frozen=True)
class ActivationQuant:
    bits: int = choice(8, 8)
    # How activation ranges are chosen from calibration data (see mnv4_deploy/quantization/observers.py):
    # per-batch statistics averaged over batches (mean_minmax, percentile, mse) resist MNv4's outliers;
    # minmax and histogram (torchao's HistogramObserver) are the naive baselines; kl is TensorRT's entropy method.
    observer: str = choice("percentile", "percentile", "mse", "kl", "mean_minmax", "histogram", "minmax",
                           "moving_average")
    percentile: float = option(99.99, above=50, high=100)  # for observer: percentile (the high tail kept)


@dataclass(frozen=True)
class Calibration:
    # A calibration set (name or .yaml file, see calibration/) to use when the command gives no --calib;
    # its root comes from --calib-root or $MNV4_CALIB_ROOT. Empty: --calib, else the scikit-image photos.
    set: str = ""
    images: int = option(512, low=1, high=MAX_IMAGES)  # calibration images drawn from --calib (a set larger than this: a seeded subset)
    batch_size: int = option(32, low=1, high=MAX_BATCH)
    seed: int = option(0, low=0, high=MAX_SEED)
    # ...and no more than this many pixels of them (512 images at 64x64), at least `min_images`: the per-batch
    # range statistics sample at most 2^20 values a tensor, which 32 images at 224x224 fill as 32 at 64x64 do,
    # and calibrating 512 native-size images was the largest share of a native-resolution convert
    # (bench/bench_convert_time.py; agreement with float measured in bench/bench_calibration_pixels.py).
    pixels: int = option(512 * 64 * 64, low=1, high=2 ** 40)
    min_images: int = option(128, low=1, high=MAX_IMAGES)

    def images_for(self, height: int, width: int) -> int:
        """How many calibration images are read and used at this input size."""
        return min(self.images, max(self.min_images, self.pixels // (height * width)))


@dataclass(frozen=True)
class Fallback:
    """Keep the most sensitive activations in higher precision, under an accuracy budget
    (mnv4_deploy/quantization/sensitivity.py).

    Sites are added greedily, most helpful first, until top-1 agreement with float on the calibration images
    reaches `target_agreement` or `max_layers` sites are chosen.
    """

    max_layers: int = option(0, low=0, high=10_000)  # 0 = off
    target_agreement: float = option(0.97, unit_interval=True)  # the budget: stop once top-1 agreement with float (calibration images) reaches this
    # float: those tensors stay float on every target. int16: int16 activations with int8 weights (w8a16, as
    # Qualcomm's w8a16_mixed_int16) on targets whose runtime runs them (ONNX QDQ, opset 21); the others keep
    # those tensors float (TFLite's converter rejects mixed int8/int16 operands, OpenVINO 2026.4 computes
    # 65536-level FakeQuantize wrongly, CoreML has no int16 activations). Each manifest says which it got.
    precision: str = choice("float", "float", "int16")
    images: int = option(512, low=1, high=MAX_IMAGES)  # calibration images the choice is judged on (at most the calibration set)
    # Module paths (comma-separated, as `mnv4-deploy debug` and `inspect --sensitivity` name layers) whose
    # activations are kept out of int8 as given, instead of the greedy choice (max_layers and the budget unused).
    layers: str = ""


@dataclass(frozen=True)
class Quantization:
    weights: WeightQuant = field(default_factory=WeightQuant)
    activations: ActivationQuant = field(default_factory=ActivationQuant)
    calibration: Calibration = field(default_factory=Calibration)
    fallback: Fallback = field(default_factory=Fallback)
    # PTQ algorithms (mnv4_deploy/quantization/ptq/), applied in this order: equalization (float model), calibration,
    # adaround (weights), range_learning (activation scales), bias_correction.
    equalization: Equalization = field(default_factory=Equalization)
    adaround: AdaRound = field(default_factory=AdaRound)
    range_learning: RangeLearning = field(default_factory=RangeLearning)
    bias_correction: BiasCorrection = field(default_factory=BiasCorrection)


@dataclass(frozen=True)
class Thresholds:
    """What an artifact of one precision must reach against the float model to be written."""

    min_agreement: float = option(0.5, unit_interval=True)  # top-1 agreement with the reference, held-back images
    min_cosine: float = option(0.9, unit_interval=True)  # mean per-image cosine similarity of logits


@dataclass(frozen=True)
class Verification:
    """How artifacts are checked in their runtime, and the gate they must pass to be written.

    Every artifact must give finite outputs. Float artifacts must reproduce the float model; int8 ones must
    stay close to it, and an artifact built from the shared PT2E model must also reproduce that model's
    PyTorch simulation (a converter that drops or rescales a quantizer fails there first). The int8 bounds
    against float are loose on purpose: they catch broken artifacts (onnxruntime's default quantize_static
    keeps 1% agreement on the reference checkpoint), not recipes that lose a little accuracy.
    """

    images: int = option(256, low=1, high=MAX_IMAGES)  # held-back images (disjoint from calibration) used to compare with float
    batch_size: int = option(64, low=1, high=MAX_BATCH)
    # false: an artifact that fails the thresholds is still written, and its manifest says it failed.
    gate: bool = True
    fp32: Thresholds = field(default_factory=lambda: Thresholds(min_agreement=0.99, min_cosine=0.9999))
    fp16: Thresholds = field(default_factory=lambda: Thresholds(min_agreement=0.95, min_cosine=0.999))
    # bf16 keeps 8 bits of mantissa (fp16: 11): looser than fp16, still far tighter than int8.
    bf16: Thresholds = field(default_factory=lambda: Thresholds(min_agreement=0.95, min_cosine=0.998))
    int8: Thresholds = field(default_factory=lambda: Thresholds(min_agreement=0.5, min_cosine=0.9))
    # Artifacts built from the shared PT2E model against its PyTorch simulation (same quantization). Integer
    # kernels round differently from the float simulation by up to 1 LSB per layer, and a fragile model amplifies
    # that: the reference conv_small at 224 (trained at 64) stays at cosine 0.94-0.97 in all three runtimes with
    # every tensor within 1 LSB locally. So this bound catches gross divergence; the tensor-by-tensor check names
    # the layer where a converter went wrong.
    simulation: Thresholds = field(default_factory=lambda: Thresholds(min_agreement=0.85, min_cosine=0.9))


@dataclass(frozen=True)
class Distillation:
    """The float model teaches the fake-quantized one (knowledge distillation)."""

    # mse: match the teacher's logits (pushes every logit, so the int8 model keeps the float top-1);
    # kl: match softened probabilities at `temperature` (Hinton et al.).
    loss: str = choice("mse", "mse", "kl")
    temperature: float = option(1.0, above=0, high=100)  # for loss: kl
    alpha: float = option(1.0, unit_interval=True)  # weight of distillation vs cross-entropy on the labels (1.0 = distillation only)


@dataclass(frozen=True)
class Qat:
    """Quantization-aware fine-tuning (`mnv4-deploy qat`). Steps count optimizer updates over all processes.

    Training starts from the PTQ model of the recipe's `quantization:` section (epoch 0 = that model) and the
    shipped epoch is chosen on held-back train images (mnv4_deploy/qat.py)."""

    epochs: int = option(2, low=0, high=10_000)
    batch_size: int = option(64, low=1, high=MAX_BATCH)  # per process
    optimizer: str = choice("adamw", "adamw", "sgd")
    lr: float = option(1e-5, above=0, high=1)
    # constant, or cosine: every learning rate (weights and ranges) decays from its value to 0 over the run's
    # steps, so the exported weights are a settled point rather than one step of a noisy walk.
    lr_schedule: str = choice("constant", "constant", "cosine")
    # learning rates rise linearly from lr/warmup_steps to lr over these first steps (0: no warm-up)
    warmup_steps: int = option(0, low=0, high=MAX_STEPS)
    weight_decay: float = option(0.0, low=0, high=1)
    # Learn the activation scales and zero points by gradient (LSQ, Esser et al. 2020) once observers freeze;
    # off: the ranges stay where PTQ (and the observers, while on) left them.
    range_learning: bool = True
    range_lr: float = option(1e-4, above=0, high=1)
    # true: each activation scale learns at range_lr x its PTQ value (the same relative step for a 0.01 scale and
    # a hybrid's residual-stream scale of 100); false: range_lr for every scale.
    range_lr_relative: bool = False
    # BatchNorm is folded into the convs of the PTQ start (as every target deploys it): 0 is the only value that
    # runs (kept so that recipes written for earlier versions still load; > 0 is refused with the reason).
    freeze_bn_after: int = option(0, low=0, high=MAX_STEPS)
    # Activation observers keep refining the PTQ ranges on the train batches for this many steps, then freeze.
    freeze_observers_after: int = option(0, low=0, high=MAX_STEPS)
    distillation: Distillation = field(default_factory=Distillation)
    augment: str = choice("flip", "flip", "none")  # random horizontal flips of train images
    # Train images held back (never trained on, not calibration images, not --val) and scored at epoch 0 and after
    # every epoch: the shipped epoch is chosen on them.
    eval_images: int = option(1000, low=1, high=MAX_IMAGES)
    checkpoint_every: int = option(200, low=1, high=MAX_STEPS)  # steps between checkpoints (and at each epoch end)
    workers: int = option(2, low=0, high=64)  # data-loader worker processes per training process
    seed: int = option(0, low=0, high=MAX_SEED)


@dataclass(frozen=True)
class Recipe:
    name: str = "ptq-int8"
    description: str = ""
    quantization: Quantization = field(default_factory=Quantization)
    verification: Verification = field(default_factory=Verification)
    qat: Qat = field(default_factory=Qat)  # used by `mnv4-deploy qat` only
    # Per-target options, e.g. {'onnx': OnnxOptions(opset=18)}, once the registry has checked the sections
    # (targets.check_recipe_targets); TargetSection as written until then.
    targets: dict = field(default_factory=dict)
    source: str = field(default="<built-in>", compare=False)

    def to_dict(self) -> dict[str, Any]:
        targets = {name: options.as_written() if isinstance(options, TargetSection) else dataclasses.asdict(options)
                   for name, options in self.targets.items()}
        d = dataclasses.asdict(dataclasses.replace(self, targets={}))
        d.pop("source")
        return d | {"targets": targets}


def load_recipe(name_or_path: Optional[str]) -> Recipe:
    """Load a recipe by shipped name ('ptq-int8') or by path; None gives the default recipe."""
    if name_or_path is None:
        name_or_path = "ptq-int8"
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        named = find_named("recipes", name_or_path)
        if named is None:
            shipped = shipped_recipes()
            raise UserError(
                f"unknown recipe '{name_or_path}'{did_you_mean(name_or_path, shipped)}; "
                f"shipped recipes: {', '.join(shipped) or 'none'} (own ones in {user_dir('recipes')}), "
                "or give a path to a .yaml file"
            )
        return parse_recipe(named.read_text(), str(named))
    if not path.is_file():
        raise UserError(f"recipe file '{name_or_path}' not found")
    return parse_recipe(path.read_text(), str(path))


def shipped_recipes() -> list[str]:
    """Recipe names `--recipe` accepts: the package's and the user folder's."""
    return sorted(named_files("recipes"))


def parse_recipe(text: str, source: str = "<string>") -> Recipe:
    node = compose(text, source)  # safe loader; a syntax error or a duplicate key names its line
    if node is None:
        return Recipe(source=source)
    recipe = _build(Recipe, node, source, "")
    return dataclasses.replace(recipe, source=source)



@dataclass(frozen=True)
class TargetSection:
    """A recipe's `targets.<name>:` section as written, until the target registry checks it.

    Config sits below the targets and imports none of them: `mnv4_deploy.targets.check_recipe_targets` turns
    each section into that target's Options (`build_section`), or names an unknown target with its line."""

    name: str
    source: str
    line: int
    node: Optional[yaml.Node] = field(default=None, compare=False, repr=False)  # None: an empty section

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def as_written(self) -> Any:
        """The section's plain values, for a recipe's dict before its sections are checked."""
        return {} if self.node is None else construct(self.node, self.source)


def _target_sections(node: yaml.Node, source: str) -> dict[str, TargetSection]:
    if not isinstance(node, yaml.MappingNode):
        raise UserError(f"{_where(source, node)}: 'targets' must map target names to options")
    out = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise UserError(f"{_where(source, key_node)}: keys in 'targets' must be target names")
        empty = isinstance(value_node, yaml.ScalarNode) and value_node.value in ("", "~", "null")
        out[key_node.value] = TargetSection(key_node.value, source, key_node.start_mark.line + 1,
                                            None if empty else value_node)
    return out


def build_section(options_cls: type, section: TargetSection) -> Any:
    """A target's Options from its recipe section, each key checked against that class (type, choices, range):
    a mistake names the file, the line and `targets.<name>.<key>`."""
    if section.node is None:
        return options_cls()
    return _build(options_cls, section.node, section.source, f"targets.{section.name}")



def _where(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}"


def _field_default(f: dataclasses.Field) -> Any:
    """A nested section's own default (e.g. verification.fp32's thresholds), which given keys override."""
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None if f.default is dataclasses.MISSING else f.default


def _build(cls: type, node: yaml.Node, source: str, path: str, base: Any = None) -> Any:
    if not isinstance(node, yaml.MappingNode):
        raise UserError(f"{_where(source, node)}: '{path or 'recipe'}' must be a mapping of keys")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    values: dict[str, Any] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise UserError(f"{_where(source, key_node)}: keys in '{path or 'recipe'}' must be plain names")
        key = key_node.value
        full = f"{path}.{key}" if path else key
        if key not in fields:
            raise UserError(
                f"{_where(source, key_node)}: unknown key '{full}'{did_you_mean(key, fields)}; "
                f"valid keys here: {', '.join(fields)}"
            )
        typ = hints[key]
        if cls is Recipe and key == "targets":
            values[key] = _target_sections(value_node, source)
        elif dataclasses.is_dataclass(typ):
            values[key] = _build(typ, value_node, source, full, _field_default(fields[key]))
        else:
            values[key] = _scalar(typ, fields[key], value_node, source, full)
    try:  # an Options class may check its fields together (__post_init__): name the section's line too
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except UserError as exc:
        raise UserError(f"{_where(source, node)}: {exc}") from None


def _scalar(typ: Any, f: dataclasses.Field, node: yaml.Node, source: str, path: str) -> Any:
    try:
        value = yaml.SafeLoader("").construct_document(node)
    except CONSTRUCT_ERRORS as exc:
        raise UserError(f"{_where(source, node)}: '{path}' {cannot_read(exc)}") from None
    if typ is dict or typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise UserError(f"{_where(source, node)}: '{path}' must be a mapping")
        return value
    expected = {int: int, float: (int, float), str: str, bool: bool}.get(typ)
    if expected and (not isinstance(value, expected) or (typ is int and isinstance(value, bool))):
        raise UserError(f"{_where(source, node)}: '{path}' must be {typ.__name__}, got {value!r}")
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise UserError(
            f"{_where(source, node)}: '{path}' must be one of {', '.join(map(str, choices))}, "
            f"got {value!r}{did_you_mean(str(value), map(str, choices))}"
        )
    if typ in (int, float):
        _check_range(value, f, f"{_where(source, node)}: '{path}'")
    return float(value) if typ is float else value


def _check_range(value: Any, f: dataclasses.Field, what: str) -> None:
    """A number inside its field's declared range (finite; an undeclared int at least 0)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise UserError(f"{what} must be a finite number, got {value}")
    bounds = numeric_range(f) or (0, None, None)
    low, above, high = bounds
    if ((low is not None and value < low) or (above is not None and value <= above)
            or (high is not None and value > high)):
        raise UserError(f"{what} must be {range_text(*bounds)}, got {value}")

