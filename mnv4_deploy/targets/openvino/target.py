"""OpenVINO target: IR (model.xml + model.bin) from `openvino.convert_model`, verified in the OpenVINO CPU runtime.

int8 comes from one of two quantizers, chosen in the recipe (`targets: openvino: method:`):
- `pt2e` (default): the project's shared PT2E model; its quantize/dequantize pairs become FakeQuantize, so
  OpenVINO deploys the same int8 model as every other target.
- `nncf`: NNCF's own post-training quantization of the float IR on the calibration images (presets, bias
  correction, SmoothQuant, ignored scopes, accuracy control), kept so reports can compare the two.

The artifact is a directory (`model/` holding model.xml and model.bin): the pipeline renames one path into place
atomically, and an IR is two files that must never be split.

The CPU plugin runs float layers in bf16 by default on CPUs that support it. An fp32 or int8 artifact is verified
with f32 (`inference_precision`), so verification judges the artifact rather than a bf16 rewrite; precision
`bf16` is the float IR verified as the plugin runs it by default on such CPUs (its own gate thresholds), so
reports can weigh int8 against the float users actually get. The hint is a compile setting, not part of the IR:
the manifest records it (`runtime.inference_precision`).
"""
from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ...config.options import choice, option
from ...errors import UserError, did_you_mean
from ...infra.converter_output import captured
from ...quantization.pt2e import export_program
from ...verify.tensorwise import QTensor
from ..base import ExportRequest, Runner, RuntimeTensors, Target

XML, BIN = "model.xml", "model.bin"
# Layer types whose precision decides speed; the manifest lists those that stayed in float.
_COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")


@dataclass(frozen=True)
class OpenVinoOptions:
    # pt2e: the project's shared quantization (FakeQuantize IR). nncf: nncf.quantize on the float IR.
    method: str = choice("pt2e", "pt2e", "nncf")
    # --- nncf method only ---
    preset: str = choice("performance", "performance", "mixed")  # mixed: asymmetric activations
    # NNCF's default is the fast variant; the full BiasCorrection is slower but, on the reference conv_small
    # (1000 val images), raised top-1 agreement with float from 86.4% to 89.2%.
    fast_bias_correction: bool = False
    # >= 0 turns on SmoothQuant (matmul and 1x1 convolution after quantize-agnostic ops, e.g. the Mobile MQA
    # projections) with this alpha. NNCF only runs SmoothQuant for model_type=TRANSFORMER, which also keeps
    # Add/pooling/reductions out of int8 and defaults the preset to mixed. -1 = off.
    smooth_quant_alpha: float = option(-1.0, low=-1, high=1)
    # Kept in float: PyTorch module paths ('blocks.3.0', 'blocks.1.0.conv') or IR layer names.
    ignored_scopes: tuple[str, ...] = ()
    # >= 0 turns on nncf.quantize_with_accuracy_control: at most this many top-1 points lost on the labelled
    # calibration images (the --val images stay unseen for the final measurement). -1 = off.
    max_drop: float = option(-1.0, low=-1, high=100)
    # --- runtime (verification and latency) ---
    threads: int = option(0, low=0, high=1024)  # INFERENCE_NUM_THREADS (0 = runtime default)
    performance_hint: str = choice("latency", "latency", "throughput")
    # f32 keeps float layers in f32; auto lets the CPU plugin choose (bf16 on CPUs with bf16 support).
    inference_precision: str = choice("f32", "f32", "bf16", "auto")

    def __post_init__(self) -> None:
        scopes = self.ignored_scopes
        if isinstance(scopes, str):
            scopes = (scopes,)
        if not isinstance(scopes, (list, tuple)) or not all(isinstance(s, str) for s in scopes):
            raise UserError(f"openvino ignored_scopes must be a list of layer names, got {scopes!r}")
        object.__setattr__(self, "ignored_scopes", tuple(scopes))
        if not (self.smooth_quant_alpha == -1 or 0.0 <= self.smooth_quant_alpha <= 1.0):
            raise UserError(f"openvino smooth_quant_alpha must be in [0, 1] or -1 (off), got {self.smooth_quant_alpha}")
        if not (self.max_drop == -1 or self.max_drop >= 0):
            raise UserError(f"openvino max_drop must be >= 0 top-1 points or -1 (off), got {self.max_drop}")
        if self.method == "pt2e":
            defaults = OpenVinoOptions.__dataclass_fields__
            nncf_only = [f for f in ("preset", "fast_bias_correction", "smooth_quant_alpha", "ignored_scopes", "max_drop")
                         if getattr(self, f) != defaults[f].default]
            if nncf_only:
                raise UserError(f"openvino {', '.join(nncf_only)} only apply to NNCF quantization: "
                                f"set 'method: nncf' in the recipe's targets: openvino: section, or remove them")

    def compile_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"PERFORMANCE_HINT": self.performance_hint.upper()}
        if self.threads:
            config["INFERENCE_NUM_THREADS"] = self.threads
        if self.inference_precision != "auto":
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
        return config


class OpenVinoTarget(Target):
    name = "openvino"
    title = "OpenVINO"
    extra = "openvino"
    artifact_name = "model"  # a directory: model.xml + model.bin
    work_seconds = 9
    precisions = ("fp32", "fp16", "bf16", "int8")
    requires = ("openvino", "nncf")
    Options = OpenVinoOptions

    def distributions(self) -> tuple[str, ...]:
        return ("openvino", "nncf")

    def export(self, request: ExportRequest, path: Path) -> dict[str, Any]:
        import openvino as ov

        opts: OpenVinoOptions = request.options
        info: dict[str, Any] = {"converter": "openvino.convert_model(torch.export program)"}
        if request.precision == "int8" and opts.method == "pt2e":
            if request.quantized is None:
                raise ValueError("int8 with method pt2e needs the shared PT2E model")
            model = convert(request.quantized.converted(fold_weights=False), request, fold_batchnorm=False)
            info["method"] = "pt2e -> FakeQuantize (int8 weights per-channel symmetric, int8 activations per-tensor)"
        else:
            model = convert(request.loaded.model, request)
            info["method"] = "float"
            if request.precision == "int8":
                with captured("nncf.quantize"):  # progress bars on stdout: keep it for the CLI's table or --json
                    model, nncf_info = nncf_quantize(model, request, opts)
                info.update(nncf_info)
        info["runtime_settings"] = {
            "compile_config": runtime_options(request).compile_config(),
            "why": "bf16: the precision verified; int8: the float layers left around attention run in f32 (in bf16 "
                   "their layout changes make the int8 model slower than bf16 float on bf16 CPUs; bench_speed.py)"
            if request.precision in ("bf16", "int8") else "f32: the precision verified"}
        compress = request.precision == "fp16"
        info["weights"] = {"fp32": "f32", "fp16": "f16 (compressed; decompressed at load)",
                           "bf16": "f32 (the CPU plugin computes in bf16: INFERENCE_PRECISION_HINT bf16)",
                           "int8": "int8"}[request.precision]
        path.mkdir(parents=True, exist_ok=True)
        ov.save_model(model, str(path / XML), compress_to_fp16=compress)
        return info

    def load(self, path: Path, request: ExportRequest) -> Runner:
        return OpenVinoRunner(path, runtime_options(request))

    def deploys_simulated_model(self, request: ExportRequest) -> bool:
        return super().deploys_simulated_model(request) and request.options.method == "pt2e"

    def default_float(self) -> str:
        return host_default_precision()

    def default_options(self, options: OpenVinoOptions) -> OpenVinoOptions:
        return dataclasses.replace(options, inference_precision="auto")

    def quantized_tensors(self, path: Path, request: ExportRequest, x: np.ndarray) -> RuntimeTensors:
        return runtime_quantized_tensors(Path(path), x, runtime_options(request))

    def describe(self, path: Path, request: ExportRequest) -> dict[str, Any]:
        import openvino as ov

        core = ov.Core()
        model = core.read_model(str(Path(path) / XML))
        ops = collections.Counter(op.get_type_name() for op in model.get_ops())
        compiled = core.compile_model(model, "CPU", runtime_options(request).compile_config())
        return {
            "operators": dict(sorted(ops.items(), key=lambda kv: -kv[1])),
            "fake_quantize": ops.get("FakeQuantize", 0),
            "inputs": [_port_spec(p) for p in model.inputs],
            "outputs": [_port_spec(p) for p in model.outputs],
            "runtime": (runtime := runtime_precisions(compiled)),
            "int8_compute": int8_compute(runtime),
        }


def runtime_options(request: ExportRequest) -> OpenVinoOptions:
    """The recipe's options, with bf16 inference for a bf16 artifact (whatever `inference_precision` says)."""
    if request.precision == "bf16":
        return dataclasses.replace(request.options, inference_precision="bf16")
    return request.options


def host_default_precision() -> str:
    """The precision the CPU plugin computes a float model in when not told (bf16 on CPUs with bf16 support)."""
    import openvino as ov

    hint = ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()  # 'bf16', 'f16', 'f32'
    return {"bf16": "bf16", "f16": "fp16"}.get(hint, "fp32")


def decline_telemetry() -> None:
    """Decline OpenVINO's and NNCF's usage telemetry for this process.

    Both send events unless the user ran their opt-out tool, and the GA4 backend forks a process per event:
    after litert-torch has started JAX's threads that fork can deadlock (Python warns so), and a deployment
    tool has no business reporting its users' conversions. Every telemetry (re)initialisation asks
    OptInChecker.check for consent; here it is always declined.
    """
    try:
        from openvino_telemetry import Telemetry
        from openvino_telemetry.utils.opt_in_checker import ConsentCheckResult, OptInChecker
    except ImportError:  # an OpenVINO without its telemetry package sends nothing
        return
    OptInChecker.check = lambda self, *args, **kwargs: ConsentCheckResult.DECLINED
    # The singleton: made here without consent, or made earlier (by an openvino import) and now declined.
    Telemetry(app_name="mnv4-deploy", app_version="-", tid="-", backend="ga4", enable_opt_in_dialog=False).consent = False


decline_telemetry()  # before anything here imports openvino (whose import alone sends an event)


def convert(module: Any, request: ExportRequest, fold_batchnorm: bool = True) -> Any:
    """torch.export the module (dynamic batch) and convert it to an OpenVINO model with input [?, 3, H, W].

    BatchNorm is folded into the convolutions in PyTorch first (as PT2E does for int8): OpenVINO's own fusion
    would rename each convolution after an anonymous BN multiply. Each layer is then named after the PyTorch
    module it came from ('blocks.1.0.conv/convolution_3/...'), so ignored scopes and the manifest's list of
    float layers speak the user's language.
    """
    import openvino as ov
    from openvino.frontend.pytorch.fx_decoder import TorchFXPythonDecoder

    example = request.example
    program = export_program(module, example)
    if fold_batchnorm:
        from torchao.quantization.pt2e.utils import _fuse_conv_bn_

        graph_module = program.module()
        _fuse_conv_bn_(graph_module)
        program = export_program(graph_module, example)
    with captured("openvino.convert_model"):  # the FX decoder logs a traceback per decomposition it skips
        decoder = TorchFXPythonDecoder.from_exported_program(program)
        model = ov.convert_model(decoder)
    modules = {}
    for node in decoder.pt_module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            modules[node.name] = list(stack.values())[-1][0]
    for op in model.get_ops():
        name = op.get_friendly_name()
        head = name.split("/", 1)[0]
        if "/" in name and head in modules:
            op.set_friendly_name(f"{modules[head]}/{name}")
    model.reshape({model.inputs[0]: ov.PartialShape([-1, *example.shape[1:]])})
    model.inputs[0].get_tensor().set_names({"input"})
    model.outputs[0].get_tensor().set_names({"logits"})
    return model


def layer_names(model: Any) -> list[str]:
    """Names NNCF accepts in ignored scopes: the IR's operation names (constants and I/O left out)."""
    skip = {"Constant", "Parameter", "Result"}
    return [op.get_friendly_name() for op in model.get_ops() if op.get_type_name() not in skip]


def _ignored_scope(model: Any, names: tuple[str, ...]) -> Optional[Any]:
    """IR layer names or PyTorch module paths ('blocks.3.0' keeps the whole block in float) -> IgnoredScope."""
    import nncf

    if not names:
        return None
    layers = layer_names(model)
    modules = sorted({n.split("/", 1)[0] for n in layers if "/" in n})
    chosen: list[str] = []
    for name in names:
        matched = [n for n in layers if n == name or n.startswith(name + "/") or n.startswith(name + ".")]
        if not matched:
            raise UserError(
                f"openvino ignored_scopes: no layer or module named '{name}'"
                f"{did_you_mean(name, modules) or did_you_mean(name, layers)}; give a PyTorch module path "
                f"(e.g. '{modules[len(modules) // 2] if modules else layers[0]}') or an IR layer name"
            )
        chosen += matched
    return nncf.IgnoredScope(names=list(dict.fromkeys(chosen)), validate=False)


def nncf_quantize(model: Any, request: ExportRequest, opts: OpenVinoOptions) -> tuple[Any, dict[str, Any]]:
    """NNCF post-training quantization of the float IR on the request's calibration images (batch 1)."""
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, AdvancedSmoothQuantParameters

    calib = request.calibration
    if calib is None or len(calib) == 0:
        raise ValueError("nncf quantization needs calibration images")
    start = time.perf_counter()
    dataset = nncf.Dataset([calib.x[i:i + 1] for i in range(len(calib))])
    kwargs: dict[str, Any] = {
        "preset": nncf.QuantizationPreset.MIXED if opts.preset == "mixed" else nncf.QuantizationPreset.PERFORMANCE,
        "subset_size": len(calib),
        "fast_bias_correction": opts.fast_bias_correction,
        "ignored_scope": _ignored_scope(model, opts.ignored_scopes),
        "target_device": nncf.TargetDevice.CPU,
    }
    if opts.smooth_quant_alpha >= 0:
        kwargs["model_type"] = nncf.ModelType.TRANSFORMER
        advanced = AdvancedQuantizationParameters(smooth_quant_alphas=AdvancedSmoothQuantParameters(
            convolution=opts.smooth_quant_alpha, matmul=opts.smooth_quant_alpha))
    else:
        advanced = AdvancedQuantizationParameters()
    info: dict[str, Any] = {
        "method": "nncf.quantize",
        "nncf": {"preset": opts.preset, "fast_bias_correction": opts.fast_bias_correction,
                 "smooth_quant_alpha": None if opts.smooth_quant_alpha < 0 else opts.smooth_quant_alpha,
                 "ignored_scopes": list(opts.ignored_scopes), "calibration_images": len(calib)},
    }
    if opts.max_drop >= 0:
        if calib.labels is None:
            raise UserError("openvino max_drop (accuracy control) needs labelled calibration images: point --calib "
                            "at an ImageFolder (one sub-folder per class), or set max_drop: -1")
        validation = nncf.Dataset(list(zip(calib.x[:, None], calib.labels)))
        quantized = nncf.quantize_with_accuracy_control(
            model, dataset, validation, _top1_metric, max_drop=opts.max_drop / 100.0,
            drop_type=nncf.DropType.ABSOLUTE, advanced_quantization_parameters=advanced, **kwargs)
        info["method"] = "nncf.quantize_with_accuracy_control"
        info["nncf"]["max_drop_top1_points"] = opts.max_drop
        info["nncf"]["validation"] = f"labelled calibration images ({len(calib)})"
    else:
        quantized = nncf.quantize(model, dataset, advanced_parameters=advanced, **kwargs)
    info["nncf"]["seconds"] = round(time.perf_counter() - start, 2)
    return quantized, info


def _top1_metric(compiled: Any, items: Any) -> tuple[float, list[float]]:
    """Validation function for NNCF accuracy control: top-1 (fraction) and per-image hits over (image, label)."""
    output = compiled.output(0)
    hits = [float(np.argmax(compiled(x)[output]) == int(label)) for x, label in items]
    return (float(np.mean(hits)) if hits else 0.0), hits


def runtime_precisions(compiled: Any) -> dict[str, Any]:
    """What the CPU plugin actually executes: layer counts per precision, and compute layers left in float."""
    per_precision: collections.Counter = collections.Counter()
    per_type: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    float_layers = []
    for op in compiled.get_runtime_model().get_ops():
        rt = op.get_rt_info()
        layer_type = rt["layerType"].astype(str) if "layerType" in rt else op.get_type_name()
        precision = rt["runtimePrecision"].astype(str) if "runtimePrecision" in rt else "?"
        if layer_type in ("Const", "Input", "Output"):
            continue
        per_precision[precision] += 1
        per_type[layer_type][precision] += 1
        if layer_type in _COMPUTE_LAYERS and precision not in ("i8", "u8"):
            float_layers.append({"name": op.get_friendly_name(), "type": layer_type, "precision": precision})
    return {
        "device": "CPU",
        "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "layers_per_precision": dict(per_precision.most_common()),
        "layers_per_type": {t: dict(c.most_common()) for t, c in sorted(per_type.items())},
        "compute_layers": sum(sum(per_type[t].values()) for t in _COMPUTE_LAYERS if t in per_type),
        "compute_layers_not_int8": float_layers,
    }


def int8_compute(runtime: dict[str, Any]) -> dict[str, Any]:
    """The manifest's common `int8_compute` entry from the CPU plugin's executed graph (`runtime_precisions`)."""
    floating = runtime["compute_layers_not_int8"]
    return {"int8": runtime["compute_layers"] - len(floating), "total": runtime["compute_layers"],
            "float": [f"{layer['name']} ({layer['type']}, {layer['precision']})" for layer in floating],
            "source": "OpenVINO CPU plugin's runtime model (runtimePrecision per layer)"}


def _port_spec(port: Any) -> dict[str, Any]:
    return {"name": port.get_any_name(), "shape": str(port.get_partial_shape()),
            "dtype": port.get_element_type().get_type_name()}


class OpenVinoRunner(Runner):
    """The IR compiled for the OpenVINO CPU plugin with the recipe's hint, threads and inference precision."""

    def __init__(self, path: Path, options: Optional[OpenVinoOptions] = None) -> None:
        import openvino as ov

        self.options = options or OpenVinoOptions()
        self.core = ov.Core()
        self.compiled = self.core.compile_model(str(Path(path) / XML), "CPU", self.options.compile_config())
        self.request = self.compiled.create_infer_request()
        self.threads = int(self.compiled.get_property("INFERENCE_NUM_THREADS"))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: np.ascontiguousarray(x, dtype=np.float32)})
        return self.request.get_output_tensor(0).data.copy()

    def throughput(self, x: np.ndarray, seconds: float = 3.0) -> float:
        """Images per second with the plugin's optimal number of parallel requests (AsyncInferQueue)."""
        import openvino as ov

        n = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        queue = ov.AsyncInferQueue(self.compiled, n)
        x = np.ascontiguousarray(x, dtype=np.float32)
        for _ in range(n):  # warm-up
            queue.start_async({0: x})
        queue.wait_all()
        done, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            for _ in range(n):
                queue.start_async({0: x})
            queue.wait_all()
            done += n
        return done * len(x) / (time.perf_counter() - start)



# ----------------------------------------------------------------------------- intermediates (tensor-by-tensor)
def runtime_quantized_tensors(path: Path, x: np.ndarray,
                              options: OpenVinoOptions) -> tuple[list[QTensor], dict[str, Any]]:
    """OpenVINO CPU with every activation FakeQuantize output added as a model output.

    A FakeQuantize output is the dequantized float; its integer value is recovered with the node's own
    scale and zero point (levels and output range).
    """
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(path / XML))
    fqs = _activation_fake_quantizes(model)
    # An output already produced by the model (the logits' FakeQuantize) is not added twice: look up by name.
    names = []
    for op, *_ in fqs:
        if not op.output(0).get_names():
            op.output(0).get_tensor().set_names({op.get_friendly_name() + ":fq"})
        names.append(op.output(0).get_any_name())
    model.add_outputs([op.output(0) for op, *_ in fqs])
    config = options.compile_config()
    compiled = core.compile_model(model, "CPU", config)
    feed = {0: np.ascontiguousarray(x, np.float32)}
    res = compiled.infer_new_request(feed)
    deployed = OpenVinoRunner(path, options)(feed[0])
    out = []
    for i, (op, scale, zero, qmin, levels) in enumerate(fqs):
        y = np.asarray(res[compiled.output(names[i])], np.float64)
        q = np.clip(np.rint(y / scale) + zero, qmin, qmin + levels - 1).astype(np.int32)
        out.append(QTensor(op.get_friendly_name(), scale, zero, q, i, op="FakeQuantize"))
    info = {"runtime": f"OpenVINO CPU {config.get('INFERENCE_PRECISION_HINT', 'auto')} (FakeQuantize outputs exposed)",
            "exposing_changed_logits_max_abs": float(np.abs(np.asarray(res[compiled.outputs[0]]) - deployed).max())}
    return out, info


def _activation_fake_quantizes(model: Any) -> list[tuple[Any, float, int, int, int]]:
    """(node, scale, zero point, qmin, levels) of every per-tensor FakeQuantize on an activation (nodes fed by
    constants, the weights, are skipped)."""
    fqs = []
    for op in model.get_ordered_ops():
        if op.get_type_name() != "FakeQuantize":
            continue
        src = op.input_value(0).get_node()
        while src.get_type_name() in ("Convert", "Reshape", "Unsqueeze"):
            src = src.input_value(0).get_node()
        lo, hi = (op.input_value(k).get_node() for k in (3, 4))
        if src.get_type_name() == "Constant" or lo.get_type_name() != "Constant" or hi.get_type_name() != "Constant":
            continue
        low, high = lo.get_data().astype(np.float64), hi.get_data().astype(np.float64)
        if low.size != 1:
            continue
        levels = int(op.get_attributes()["levels"])
        scale = float((high.reshape(()) - low.reshape(())) / (levels - 1))
        qmin = -(levels // 2)
        fqs.append((op, scale, int(round(qmin - float(low.reshape(())) / scale)), qmin, levels))
    return fqs
