"""A target whose artifact is a folder (as OpenVINO's `model/`, CoreML's `.mlpackage`, qnn's `model/`), written in
a second instead of an ONNX export's fifteen: the artifact-folder transaction tests (tests/test_transaction.py)
convert many times. Its runtime is the PyTorch model itself, after checking that the folder is whole.

MNV4_TEST_EXPORT_SECONDS makes `export` sleep after writing the first file, and MNV4_TEST_EXPORT_WAIT (a path)
makes it wait there until that file exists, so a test can interrupt or race a run while its artifact is half
written. `WorkerFolderTarget` is the same target exported in the export worker process.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mnv4_deploy.targets.base import ExportRequest, Runner, Target


@dataclass(frozen=True)
class FolderOptions:
    pass


class FolderTarget(Target):
    name = "folder"
    title = "a folder artifact (test plugin)"
    extra = "test"
    artifact_name = "model"
    precisions = ("fp32",)
    requires = ("torch",)
    Options = FolderOptions

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        path.mkdir()
        torch.save(request.loaded.model.state_dict(), path / "weights.pt")
        time.sleep(float(os.environ.get("MNV4_TEST_EXPORT_SECONDS", "0")))
        wait = os.environ.get("MNV4_TEST_EXPORT_WAIT")
        deadline = time.monotonic() + 300
        while wait and not Path(wait).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        (path / "meta.json").write_text(json.dumps({"input_size": list(request.loaded.preprocessing.input_size)}))
        return {"method": "state_dict folder", "exported_by_pid": os.getpid()}

    def load(self, path: Path, request: ExportRequest) -> Runner:
        if not (path / "weights.pt").is_file() or not (path / "meta.json").is_file():
            raise RuntimeError(f"{path} is not a whole artifact")
        return FolderRunner(request.loaded.model)


class WorkerFolderTarget(FolderTarget):
    """The same artifact, exported in the export worker process (mnv4_deploy/infra/worker.py) beside other targets."""

    name = "folder_worker"
    exports_in_worker = True


class FolderRunner(Runner):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return self.model(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
