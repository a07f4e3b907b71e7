"""The one small interface every deployment target implements.

A target is one package, targets/<name>/, whose target.py subclasses Target (targets/README.md: the hooks, what a
target may import, the checklist). It gives its Options dataclass (recipe section and CLI flags), how to write its
artifact from the prepared float model or the int8 PT2E model, how to load that artifact in its real runtime, how to
expose the runtime's quantized intermediates for the tensor-by-tensor check, and how to describe it (ops,
precisions) for the manifest. The pipeline does the rest (atomic writes, the verification gate, manifests, reports)
the same way for every target; tests/test_target_conformance.py runs one suite over every registered target.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional, Union

import numpy as np
import torch

from ..errors import MissingDependencyError
from ..quantization.simulation_semantics import EXACT, Semantics

if TYPE_CHECKING:
    from ..config.recipes import Quantization
    from ..load.images import LoadedImages
    from ..load.models import LoadedModel
    from ..quantization.pt2e import QuantizedModel
    from ..verify.tensorwise import QTensor

# What `Target.quantized_tensors` returns: the runtime's quantized tensors and facts about how they were read,
# or a sentence saying why they are not available for this artifact.
RuntimeTensors = Union[tuple[list["QTensor"], dict[str, Any]], str]


@dataclass
class ExportRequest:
    """Everything a target may need to write one artifact."""

    loaded: "LoadedModel"
    precision: str  # 'fp32' | 'fp16' | 'bf16' | 'int8'
    options: Any  # the target's own Options dataclass, from the recipe
    quantized: Optional["QuantizedModel"] = None  # the PT2E int8 model (precision int8)
    calibration: Optional["LoadedImages"] = None  # for target-native quantizers (baselines)

    @property
    def example(self) -> torch.Tensor:
        return torch.zeros(self.loaded.preprocessing.input_shape)


class Runner(ABC):
    """An artifact loaded in its runtime: normalised NCHW float32 images in, logits out.

    Runners own their input conversion (layout, integer quantization with the model's own scale and
    zero point), so every target is verified on exactly the same images.
    """

    numbers: str = "measured"  # a key of manifest.NUMBERS_KINDS
    # Intra-op threads the runtime computes with (recorded beside every latency): a number, or what decides it.
    threads: Any = "runtime default"
    # A runner too slow to verify every image (an emulator) sets how many it verifies, evenly spaced over each
    # evaluation set, and why; the manifest's sources say so. None: every image.
    max_images: Optional[int] = None
    max_images_reason: str = ""

    @abstractmethod
    def __call__(self, x: np.ndarray) -> np.ndarray: ...

    @property
    def max_batch(self) -> Optional[int]:
        """Largest batch the artifact accepts (None: any)."""
        return None

    @property
    def timed(self) -> bool:
        """Whether its latency means anything: only the real runtime's does."""
        return self.numbers == "measured"


class Target(ABC):
    name: ClassVar[str]
    title: ClassVar[str]  # what users call the format or runtime ('TFLite/LiteRT'): --help, docs
    extra: ClassVar[str]  # the pip extra that installs this target's toolchain
    artifact_name: ClassVar[str]  # file (or directory) name inside <out>/<target>/
    precisions: ClassVar[tuple[str, ...]]
    requires: ClassVar[tuple[str, ...]]  # importable modules the target needs
    Options: ClassVar[type]
    # Whether the runtime runs int16 activations (an int16 fallback's sites); others keep those tensors float.
    int16_activations: ClassVar[bool] = False
    # Its export is long and self-contained (it reads the request and writes the artifact, nothing else): on Linux,
    # beside other targets, it runs in a forked worker process while the main process exports and verifies those
    # (mnv4_deploy/infra/worker.py). Its verification stays in the main process.
    exports_in_worker: ClassVar[bool] = False
    # Roughly how many seconds its export and verification take on one core (conv_small at 224, from
    # bench/bench_convert_time.py): how the pipeline balances the targets between itself and the worker.
    work_seconds: ClassVar[float] = 10.0

    def check_installed(self) -> None:
        """Whether the toolchain is there, without importing it (coremltools alone takes seconds to import, and
        a run must say what is wrong with its other inputs at once)."""
        for module in self.requires:
            try:
                found = importlib.util.find_spec(module) is not None
            except (ImportError, ValueError):  # a parent package missing, or a broken module entry
                found = False
            if not found:
                raise MissingDependencyError(module, self.extra)

    @abstractmethod
    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        """Write the artifact at `path`; return facts for the manifest (method, opset, ...)."""

    @abstractmethod
    def load(self, path: Path, request: ExportRequest) -> Runner:
        """Load the artifact in the target's real runtime."""

    def input_spec(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        """The artifact's input as an app must feed it. Override for NHWC, integer or baked-in inputs."""
        from ..verify.manifest import input_spec

        pre = request.loaded.preprocessing
        return input_spec([1, 3, *pre.input_size], pre)

    def describe(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        """Structural facts for the manifest: operator histogram, precisions, input/output spec."""
        return {}

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        """The int8 artifact's quantized activations on `x` (normalised NCHW float32), from its runtime with
        intermediates exposed, for the tensor-by-tensor check (mnv4_deploy/verify/tensorwise.py)."""
        return f"not available: {self.name} does not expose intermediate tensors"

    def build_quantizer(self, quantization: "Quantization") -> Any:
        """A PT2E quantizer of the target's own, for a runtime whose int8 kernels need other patterns or dtypes.
        None (the default): the project's shared quantizer, so one calibration serves every such target."""
        return None

    def quantizer_key(self) -> Any:
        """Targets with the same key share one quantized model (the default: every target that keeps the
        shared quantizer)."""
        own = type(self).build_quantizer is not Target.build_quantizer
        return type(self) if own else "shared"

    def deploys_simulated_model(self, request: ExportRequest) -> bool:
        """Whether the artifact deploys `request.quantized` itself, so that model's PyTorch simulation is the
        reference its runtime must reproduce (False for a target-native quantizer or weights-only int8)."""
        return request.precision == "int8" and request.quantized is not None

    def simulation_semantics(self, request: ExportRequest) -> Semantics:
        """The integer arithmetic the runtime's int8 numbers are compared against: PyTorch's exact quantize/
        dequantize unless the runtime's own rounding is known and modelled (QNN's: targets/qnn/htp_semantics.py)."""
        return EXACT

    def verifies_every_image(self, request: ExportRequest) -> bool:
        """Whether the runner will be verified on every evaluation image (False for an emulator that sets
        `Runner.max_images`): the pipeline then starts the simulation of all of them while the target exports."""
        return True

    def default_float(self) -> str:
        """The precision (a key of `precisions`) the runtime computes a float model in on this host when the
        user sets nothing: the float baseline int8 must beat. fp32 unless the runtime picks otherwise."""
        return "fp32"

    def default_options(self, options: Any) -> Any:
        """`options` with the float precision the runtime picks by itself, where the recipe pins one for
        verification (OpenVINO's f32 hint): how a user who sets nothing runs the artifact."""
        return options

    def tool_versions(self) -> dict[str, str]:
        out = {}
        for dist in self.distributions():
            try:
                out[dist] = importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        return out

    def distributions(self) -> tuple[str, ...]:
        return ()
