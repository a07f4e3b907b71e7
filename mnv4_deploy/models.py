"""Load an MNv4 model: timm variant + pretrained weights, random weights, or a local checkpoint."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from .errors import UserError, did_you_mean
from .fileio import sha256_of
from .preprocessing import Preprocessing

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


@dataclass
class LoadedModel:
    """A float model plus everything the manifest must say about where it came from."""

    name: str
    model: nn.Module
    weights: str  # 'pretrained:<hub id>', 'random', or the checkpoint path
    weights_sha256: Optional[str]
    num_classes: int
    preprocessing: Preprocessing

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "num_classes": self.num_classes,
            "parameters": sum(p.numel() for p in self.model.parameters()),
        }


def list_variants() -> list[str]:
    """Every MobileNetV4 architecture timm registers (e.g. mobilenetv4_conv_small)."""
    import timm

    return sorted(timm.list_models("mobilenetv4_*"))


def load_model(
    name: str,
    weights: str = "pretrained",
    num_classes: Optional[int] = None,
    preprocessing_overrides: Optional[Mapping[str, Any]] = None,
) -> LoadedModel:
    """Build `name` and load `weights` ('pretrained', 'random' or a checkpoint path), in eval mode."""
    import timm

    variants = list_variants()
    arch, _, tag = name.partition(".")
    if arch not in variants:
        raise UserError(
            f"unknown model '{name}'{did_you_mean(arch, variants)}; valid MNv4 models: {', '.join(variants)}"
        )
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if num_classes < 1:
            raise UserError(f"--num-classes must be positive, got {num_classes}")
        kwargs["num_classes"] = num_classes

    sha = None
    if weights == "pretrained":
        model = _create_pretrained(timm, name, kwargs)
        source = f"pretrained:{model.pretrained_cfg.get('hf_hub_id') or name}"
    elif weights == "random":
        model = timm.create_model(name, pretrained=False, **kwargs)
        source = "random"
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(
                f"checkpoint '{weights}' not found: give --weights a .pth/.pt/.safetensors file, "
                "or 'pretrained' / 'random'"
            )
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_checkpoint(model, path)
        source, sha = str(path), sha256_of(path)

    model.eval()
    pre = Preprocessing.from_pretrained_cfg(dict(model.pretrained_cfg), **(preprocessing_overrides or {}))
    return LoadedModel(name, model, source, sha, int(model.num_classes), pre)


def _create_pretrained(timm: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as exc:  # offline, hub down, missing tag: all user-fixable
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not fetch pretrained weights for '{name}' ({reason}); "
            "use --weights PATH for a local checkpoint or --weights random"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict safely: safetensors, or torch.load with weights_only=True (no pickled code)."""
    path = Path(path)
    if path.suffix not in _CHECKPOINT_SUFFIXES:
        raise UserError(f"checkpoint '{path}' has an unknown suffix: use one of {', '.join(_CHECKPOINT_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read checkpoint '{path}': {first}") from None
    # Training scripts wrap the weights: {'state_dict': ...}, {'model': ...}, {'state_dict_ema': ...}.
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"checkpoint '{path}' does not hold a state_dict of tensors")
    return {_strip_prefix(k): v for k, v in state.items()}


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load weights strictly; on mismatch, name the keys and suggest --num-classes."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = []
        if wrong_shape:
            parts.append("shape mismatch: " + ", ".join(
                f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in wrong_shape[:3]))
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        hint = _num_classes_hint(model, state)
        raise UserError(f"checkpoint '{path}' does not match {type(model).__name__}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=True)


def _num_classes_hint(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """If only the classifier differs, say which --num-classes the checkpoint was trained with."""
    head = getattr(model, "default_cfg", {}).get("classifier", "classifier")
    weight = state.get(f"{head}.weight")
    if weight is not None and weight.ndim >= 1:
        return f"; the checkpoint has {weight.shape[0]} classes: pass --num-classes {weight.shape[0]}"
    return "; check --model and --num-classes"

