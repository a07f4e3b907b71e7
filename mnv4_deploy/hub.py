"""The Hugging Face hub, where timm's pretrained MNv4 weights come from: reachable or not, cached or not.

Unreachable, huggingface_hub retries each file with back-off for most of a minute before it gives up; one short
probe says the same at once. This module imports neither torch nor timm, so a run that cannot get its weights
stops within seconds, before the heavy imports.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Iterator, Optional

from .errors import UserError

PROBE_SECONDS = 3.0


def unreachable(timeout: float = PROBE_SECONDS) -> Optional[str]:
    """Why the hub cannot be reached ('HF_HUB_OFFLINE is set', or the probe's failure), or None when it answers.
    The probe runs in a thread so that a hanging name lookup, which no socket timeout bounds, is bounded too;
    it runs once per process."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    if constants.ENDPOINT not in _probed:
        _probed[constants.ENDPOINT] = _probe(constants.ENDPOINT, timeout)
    return _probed[constants.ENDPOINT]


_probed: dict[str, Optional[str]] = {}


def _probe(endpoint: str, timeout: float) -> Optional[str]:
    from huggingface_hub.utils import get_session

    why: list[str] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - any failure of the probe means unreachable; it is only reported
            text = str(exc).strip()
            why.append(f"{endpoint}: {text.splitlines()[0][:120] if text else type(exc).__name__}")

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 1.0)
    if thread.is_alive():
        return f"{endpoint}: no answer in {timeout:.0f} s"
    return why[0] if why else None


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def cached(model: str) -> bool:
    """Whether timm's weights for `model` ('arch' or 'arch.tag') may be in the hub cache: a `timm/arch.*`
    repository there (timm picks the tag; it reads the cache itself)."""
    arch, _, tag = model.partition(".")
    pattern = f"models--timm--{arch}.{tag}" if tag else f"models--timm--{arch}.*"
    root = cache_dir()
    return root.is_dir() and any(p.is_dir() for p in root.glob(pattern))


def offline_message(model: str, reason: str) -> str:
    return (f"cannot reach the Hugging Face hub ({reason}) and the pretrained weights for '{model}' are not in its "
            f"cache ({cache_dir()}), where they are kept after one download online; "
            "use --weights PATH for a local checkpoint or --weights random")


def require_pretrained(model: str) -> Optional[str]:
    """Before a run that needs timm's pretrained `model`: a UserError at once when the hub is unreachable and the
    weights are not cached; else the reason the hub is unreachable (load from the cache only) or None. A name
    that is no MNv4 at all is left to the model loader, which lists the valid ones."""
    if not model.startswith("mobilenetv4_"):
        return None
    reason = unreachable()
    if reason is not None and not cached(model):
        raise UserError(offline_message(model, reason))
    return reason


@contextlib.contextmanager
def offline(enabled: bool) -> Iterator[None]:
    """huggingface_hub's offline mode (cache only) for the block; it reads the flag on every request."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or enabled
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
