"""Shared fixtures: the reference checkpoint and real images from ../shared (skipped when absent)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# Declines OpenVINO's usage telemetry before any test module imports openvino, as the CLI does: its sender thread
# would keep the export worker (mnv4_deploy/infra/worker.py) from forking for the rest of the session.
import mnv4_deploy.targets.openvino.target  # noqa: E402,F401

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MNV4_SHARED", REPO.parent / "shared"))
REFERENCE = SHARED / "models" / "mnv4_conv_small_tin202.pth"
HYBRID_REFERENCE = SHARED / "models" / "mnv4_hybrid_medium_tin202_e1.pth"
TIN = SHARED / "data" / "tiny-imagenet-202"

# The reference checkpoint's preprocessing: 64x64 images as they are, ImageNet mean/std.
REFERENCE_ARGS = ["--model", "mobilenetv4_conv_small", "--weights", str(REFERENCE), "--num-classes", "202",
                  "--input-size", "64", "--crop-pct", "1.0"]


def prepared_model(name: str = "mobilenetv4_conv_small_035", weights: str = "random",
                   num_classes: Optional[int] = None, size: int = 64) -> Any:
    """A loaded, deployment-prepared MNv4 at `size` x `size` with no crop: the one model loader of the tests."""
    from mnv4_deploy import load_model, prepare

    loaded = load_model(name, weights, num_classes, {"input_size": [size], "crop_pct": 1.0})
    prepare(loaded.model)
    return loaded


def reference_model(checkpoint: Path) -> Any:
    """The reference checkpoint as the toolkit loads it (conv_small, 202 classes, 64x64)."""
    return prepared_model("mobilenetv4_conv_small", str(checkpoint), 202, 64)


@pytest.fixture(scope="session")
def reference_checkpoint() -> Path:
    if not REFERENCE.is_file():
        pytest.skip(f"reference checkpoint not found at {REFERENCE} (../shared is absent outside CI)")
    return REFERENCE


@pytest.fixture(scope="session")
def tiny_imagenet() -> Path:
    if not (TIN / "train").is_dir():
        pytest.skip(f"Tiny ImageNet not found at {TIN} (../shared is absent outside CI)")
    return TIN


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    """A small ImageFolder of real photographs (crops of scikit-image's samples), two classes."""
    import skimage
    from PIL import Image

    data = Path(skimage.__file__).parent / "data"
    root = tmp_path / "images"
    for cls, names in {"a": ["astronaut.png", "coffee.png", "chelsea.png"], "b": ["rocket.jpg", "motorcycle_left.png", "ihc.png"]}.items():
        (root / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            img = Image.open(data / name).convert("RGB")
            for j in range(3):
                w, h = img.size
                s = min(w, h) // (j + 1)
                img.crop((0, 0, s, s)).resize((80, 80)).save(root / cls / f"{i}_{j}.jpg")
    return root


def qnn_or_skip() -> None:
    """Skip, naming the command that installs the qnn extra, where onnxruntime-qnn is missing."""
    from mnv4_deploy.errors import UserError
    from mnv4_deploy.targets import get_target

    try:
        get_target("qnn").check_installed()
    except UserError as exc:
        pytest.skip(str(exc))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The conformance suite runs first: its converts (every target, one quantization) then run before any test
    imports JAX (litert-torch's converter), so their TFLite and ExecuTorch exports go to the export worker as in
    a user's `convert` (a process that has imported JAX never forks one); the rest keep their order."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_target_conformance.py") else 1)
