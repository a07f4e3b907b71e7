"""QNN's HTP backend through onnxruntime-qnn: a session for one Snapdragon SoC, and the context-binary compile,
with QNN's framework op trace beside it, refused when QNN cannot place the whole model on HTP."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Optional

from ...errors import VerificationError

TRACE = "qnn_op_trace.json"  # QNN's framework op trace, written beside the context model
# Snapdragon SoCs QNN can compile for: QNN's soc_model number, HTP architecture, marketing name.
SOCS: dict[str, tuple[int, int, str]] = {
    "SM8350": (30, 68, "Snapdragon 888"),
    "SM8450": (36, 69, "Snapdragon 8 Gen 1"),
    "SM8550": (43, 73, "Snapdragon 8 Gen 2"),
    "SM8650": (57, 75, "Snapdragon 8 Gen 3"),
    "SM8750": (69, 79, "Snapdragon 8 Elite"),
}
FALLBACK_REFUSED = "fallback to CPU EP has been explicitly disabled"  # onnxruntime's words when placement fails


@functools.cache
def _ep_devices() -> tuple[Any, ...]:
    """Register the QNN plugin library with onnxruntime (once per process) and return its devices."""
    import onnxruntime as ort
    import onnxruntime_qnn as qnn

    if not any(d.ep_name == qnn.get_ep_name() for d in ort.get_ep_devices()):
        ort.register_execution_provider_library(qnn.get_ep_name(), qnn.get_library_path())
    return tuple(d for d in ort.get_ep_devices() if d.ep_name == qnn.get_ep_name())


def session(model: Any, soc: str, fallback: bool, config: Optional[dict[str, str]] = None,
            provider: Optional[dict[str, str]] = None, quiet: bool = False) -> Any:
    """An onnxruntime session on QNN's HTP backend for `soc` (a key of SOCS); `fallback` False: every node on HTP
    or fail (`quiet`: without onnxruntime's own error log, for a caller that handles the failure)."""
    import onnxruntime as ort
    import onnxruntime_qnn as qnn

    soc_model, arch, _ = SOCS[soc]
    so = ort.SessionOptions()
    so.log_severity_level = 4 if quiet else 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.add_provider_for_devices(list(_ep_devices()), {
        "backend_path": qnn.get_qnn_htp_path(), "soc_model": str(soc_model), "htp_arch": str(arch),
        **(provider or {})})
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), so)


def compile_context(qdq: Path, context: Path, folder: Path, opts: Any) -> None:
    """Compile the QDQ model into the context binary for `opts.soc`, with QNN's op trace beside it. A model QNN
    cannot place whole is refused (VerificationError naming every node left off HTP and QNN's reason) unless
    `opts.allow_cpu_fallback`."""
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail

    config = {"ep.context_enable": "1", "ep.context_file_path": str(context), "ep.context_embed_mode": "0"}
    trace = {"enable_framework_op_trace": "1", "framework_op_trace_dir": str(folder)}
    try:
        session(qdq, opts.soc, opts.allow_cpu_fallback, config, trace)
    except Fail as exc:
        if FALLBACK_REFUSED not in str(exc) or not (folder / TRACE).is_file():
            raise
        refused = json.loads((folder / TRACE).read_text()).get("unsupported_nodes", [])
        names = "; ".join(f"{r['node_name']} ({r['op_type']}): {refusal_reason(r)}" for r in refused[:8])
        more = f"; and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise VerificationError(
            f"[qnn] int8: {len(refused)} node(s) not placed on HTP ({opts.soc}): {names}{more} (not written; "
            "--allow-cpu-fallback writes it with those nodes on the CPU)") from None
    if not context.is_file():  # QNN claimed no node at all: no context binary to compile
        raise VerificationError(f"[qnn] int8: QNN placed no node of the model on HTP ({opts.soc}); nothing to compile")


def refusal_reason(refusal: dict[str, Any]) -> str:
    return str(refusal.get("reason", "")).split(f"{refusal.get('op_type')} node `")[0].strip() or "no reason given"


@functools.cache
def qnn_sdk_version() -> Optional[str]:
    from onnxruntime_qnn import build_and_package_info as info

    return getattr(info, "qnn_version", None)
