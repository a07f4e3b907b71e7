"""Load an MNv4 model: timm variant + pretrained weights, random weights, or a local checkpoint."""
from __future__ import annotations

import importlib
import logging
import pickle
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from ..errors import UserError, did_you_mean
from ..infra.fileio import sha256_of
from .preprocessing import Preprocessing

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")

# What torch.load(weights_only=True) raises for a file that is corrupt, truncated or not a checkpoint
# (torch 2.14, found by feeding it random bytes, truncations and bit flips of real checkpoints):
# UnpicklingError (bad opcode, or a pickled class/function it refuses to import), RuntimeError
# ("PytorchStreamReader failed reading zip archive", "Invalid magic number", "unexpected EOF"),
# EOFError (empty file), and from its pure-Python unpickler on garbage: IndexError/KeyError (stack or
# memo underflow), ValueError/UnicodeDecodeError, struct.error, and AssertionError (legacy format,
# "storage key not found"). OSError covers unreadable files and torch's "Invalid argument" on some
# truncated zips. Anything else (TypeError, AttributeError...) is a bug and must propagate.
TORCH_LOAD_ERRORS: tuple[type[BaseException], ...] = (
    pickle.UnpicklingError, RuntimeError, EOFError, LookupError, ValueError, struct.error, AssertionError,
    OSError,
)

# In torch's UnpicklingError text: a pickled global (class/function) that only full unpickling could import.
_NEEDS_CODE = re.compile(
    r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked|(\S+) must be \S+ to load")


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


RANDOM_WEIGHTS_SEED = 0


def _random_model(timm: Any, name: str, kwargs: dict[str, Any]) -> Any:
    """`--weights random` draws the same weights every time (seed 0, the caller's RNG state untouched): a
    random-weights convert is repeatable, and shards of a random-weights zoo build the same models."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_WEIGHTS_SEED)
        return timm.create_model(name, pretrained=False, **kwargs)


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
    if tag:  # timm raises a bare RuntimeError for an unknown tag, even with random weights
        tagged = timm.list_models(f"{arch}.*", include_tags=True)
        if name not in tagged:
            raise UserError(f"unknown tag '{tag}' for {arch}: use one of {', '.join(tagged)}, "
                            f"or '{arch}' for its default")
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
        model = _random_model(timm, name, kwargs)
        source = "random"  # always seed RANDOM_WEIGHTS_SEED
    else:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(
                f"checkpoint '{weights}' not found: give --weights a .pth/.pt/.safetensors file, "
                "or 'pretrained' / 'random'"
            )
        model = timm.create_model(name, pretrained=False, **kwargs)
        load_checkpoint(model, path, name)
        source, sha = str(path), sha256_of(path)

    model.eval()
    pre = Preprocessing.from_pretrained_cfg(dict(model.pretrained_cfg), **(preprocessing_overrides or {}))
    return LoadedModel(name, model, source, sha, int(model.num_classes), pre)


def _fetch_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean the weights could not be downloaded (offline, hub down, no access).

    OSError covers huggingface_hub's errors (LocalEntryNotFoundError when HF_HUB_OFFLINE=1 and nothing
    is cached, HfHubHTTPError for 401/404/5xx, OfflineModeIsEnabled) and requests' ConnectionError;
    a network failure mid-download surfaces as the HTTP client's TransportError, which is not an OSError.
    """
    errors: list[type[BaseException]] = [OSError]
    for client in ("httpx", "httpx2"):  # whichever huggingface_hub is built on
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _create_pretrained(timm: Any, name: str, kwargs: dict[str, Any]) -> nn.Module:
    """timm's pretrained model; a download failure is a user-fixable one-liner, anything else a bug."""
    if not timm.is_model_pretrained(name):  # checked first, so timm's RuntimeError never needs catching
        arch = name.partition(".")[0]
        tagged = timm.list_pretrained(f"{arch}.*")
        hint = f" (pretrained tags: {', '.join(tagged)})" if tagged else ""
        raise UserError(f"timm has no pretrained weights for '{name}'{hint}; "
                        "use --weights PATH for a local checkpoint or --weights random")
    from . import hub

    offline = hub.unreachable()
    try:
        # Unreachable: read the cache only. Asking the hub would retry with back-off for most of a minute.
        with hub.offline(offline is not None):
            return timm.create_model(name, pretrained=True, **kwargs)
    except _fetch_errors() as exc:
        logger.debug("fetching pretrained %s failed", name, exc_info=True)
        if offline is not None:
            raise UserError(hub.offline_message(name, offline)) from None
        first = str(exc).strip().splitlines()[0].split(". ")[0].rstrip(".")[:160] if str(exc).strip() else ""
        reason = first or type(exc).__name__
        raise UserError(
            f"could not fetch pretrained weights for '{name}' ({reason}); "
            "use --weights PATH for a local checkpoint or --weights random"
        ) from None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict safely: safetensors, or torch.load with weights_only=True (no pickled code)."""
    path = Path(path)
    if path.suffix not in _CHECKPOINT_SUFFIXES:
        raise UserError(f"checkpoint '{path}' has an unknown suffix: use one of {', '.join(_CHECKPOINT_SUFFIXES)}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise _unreadable(path, exc) from None
    else:
        try:
            with warnings.catch_warnings():  # torch asks the user to file an issue for pickle protocol > 2
                warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except TORCH_LOAD_ERRORS as exc:
            raise _unreadable(path, exc) from None
    # Training scripts wrap the weights: {'state_dict': ...}, {'model': ...}, {'state_dict_ema': ...}.
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        held = "a dict with non-tensor values" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise UserError(f"checkpoint '{path}' is not a readable state_dict (it holds {held}): "
                        "re-save it with torch.save(model.state_dict(), path)")
    return {_strip_prefix(k): v for k, v in state.items()}


def _unreadable(path: Path, exc: BaseException) -> UserError:
    """One line for a checkpoint torch/safetensors cannot read, never repeating torch's advice to
    load with weights_only=False: that runs arbitrary code from a file that may be untrusted."""
    logger.debug("cannot read checkpoint %s", path, exc_info=exc)
    text = str(exc)
    code = _NEEDS_CODE.search(text)
    if code:
        what = next(g for g in code.groups() if g)
        return UserError(
            f"checkpoint '{path}' is not a readable state_dict: it pickles Python objects ({what}) that only "
            "arbitrary code could load, and mnv4-deploy reads only weights_only/safetensors files: "
            "re-save it as a plain state_dict (torch.save(model.state_dict(), path))"
        )
    if isinstance(exc, (PermissionError, FileNotFoundError, IsADirectoryError)):
        return UserError(f"cannot read checkpoint '{path}': {exc.strerror}; "
                         "give --weights a readable .pth/.pt/.safetensors file")
    detail = re.search(r"WeightsUnpickler error:\s*(\S[^\n]*)", text)  # the cause, minus torch's advice
    first = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
        detail.group(1) if detail else (text.strip().splitlines() or [""])[0])
    first = first.split(". ")[0].strip().rstrip(".")[:120]
    reason = f"{type(exc).__name__}: {first}" if first and "weights_only" not in first else type(exc).__name__
    return UserError(
        f"checkpoint '{path}' is not a readable state_dict ({reason}): the file is corrupt, truncated or "
        "not a PyTorch/safetensors checkpoint; re-save or re-download it"
    )


def _strip_prefix(key: str) -> str:
    for prefix in ("module.", "_orig_mod."):
        if key.startswith(prefix):
            key = key[len(prefix):]
    return key


def load_checkpoint(model: nn.Module, path: Path, name: Optional[str] = None) -> None:
    """Load weights strictly; on mismatch, name the keys and suggest --num-classes.

    `name` is the variant the user asked for (e.g. mobilenetv4_conv_small): every MNv4 variant is
    timm's MobileNetV3 class, so the class name would tell the user nothing.
    """
    name = name or getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
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
        raise UserError(f"checkpoint '{path}' does not match {name}: {'; '.join(parts)}{hint}")
    model.load_state_dict(state, strict=True)


def _num_classes_hint(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str:
    """If only the classifier differs, say which --num-classes the checkpoint was trained with."""
    head = getattr(model, "default_cfg", {}).get("classifier", "classifier")
    weight = state.get(f"{head}.weight")
    if weight is not None and weight.ndim >= 1:
        return f"; the checkpoint has {weight.shape[0]} classes: pass --num-classes {weight.shape[0]}"
    return "; check --model and --num-classes"

