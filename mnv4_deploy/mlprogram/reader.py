"""Read a saved ML Program (.mlpackage) into plain data: the program as Core ML will load it.

Everything comes from the files on disk (the program proto and its weight blob), never from the converter's
in-memory state, so what runs is exactly what ships: a converter bug that only shows after serialization (or a
hand-edited program) is executed as written. Decoding is our own (proto immediate values, blob file values via
coremltools' blob reader); coremltools' milproto loader is not used because it rebuilds a pymil program (type
inference, value inference) that could silently repair what the file says.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .toolchain import import_coremltools

# MIL DataType names -> numpy dtypes (the types our programs use; others are refused by name).
_NUMPY = {"BOOL": np.bool_, "FLOAT16": np.float16, "FLOAT32": np.float32, "FLOAT64": np.float64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}
# Blob readers per dtype (coremltools.libmilstoragepython._BlobStorageReader).
_BLOB_READ = {"FLOAT32": "read_float_data", "FLOAT16": "read_fp16_data", "INT8": "read_int8_data",
              "UINT8": "read_uint8_data", "INT16": "read_int16_data", "UINT16": "read_uint16_data",
              "INT32": "read_int32_data", "UINT32": "read_uint32_data"}
_WEIGHTS_DIR, _AUTHOR = "weights", "com.apple.CoreML"


class ProgramFormatError(ValueError):
    """The file holds something this reader does not decode (named, never guessed)."""


@dataclass(frozen=True)
class Var:
    """A named value of the program with its declared type (shape None: not a constant-shape tensor)."""

    name: str
    dtype: str  # MIL DataType name, e.g. FLOAT16
    shape: Optional[tuple[int, ...]]


@dataclass
class Op:
    type: str
    inputs: dict[str, list[Any]]  # parameter -> bindings: ('name', var) or ('value', array)
    attributes: dict[str, Any]  # decoded attribute values (except 'name')
    outputs: list[Var]

    @property
    def name(self) -> str:
        return self.outputs[0].name if self.outputs else self.type


@dataclass
class Program:
    """One function of an ML Program: its inputs, constants, operations in order, and outputs."""

    source: str  # the .mlpackage path and function (for messages)
    description: str  # the model's short description (model name, precision)
    function: str
    opset: str
    inputs: list[Var]
    outputs: list[str]
    consts: dict[str, np.ndarray]
    ops: list[Op]
    types: dict[str, Var] = field(default_factory=dict)  # every declared variable

    @property
    def label(self) -> str:
        return f"{self.description or 'ML Program'} ({self.source})"


def weights_dir(path: Path) -> Optional[Path]:
    """The package's weights folder (where '@model_path/weights/...' points)."""
    import_coremltools()
    from coremltools.libmodelpackage import ModelPackage

    if not ModelPackage.isValid(str(path)):
        return None
    item = ModelPackage(str(path)).findItemByNameAuthor(_WEIGHTS_DIR, _AUTHOR)
    return Path(item.path()) if item is not None else None


def read_program(path: Path, function: str = "main") -> Program:
    """The program of a saved .mlpackage, decoded (constants as numpy arrays)."""
    ct = import_coremltools()

    path = Path(path)
    spec = ct.utils.load_spec(str(path))
    return from_spec(spec, weights_dir(path), f"{path}:{function}", function)


def from_spec(spec: Any, weights: Optional[Path], source: str, function: str = "main") -> Program:
    if spec.WhichOneof("Type") != "mlProgram":
        raise ProgramFormatError(f"{source}: not an ML Program (model type {spec.WhichOneof('Type')})")
    functions = spec.mlProgram.functions
    if function not in functions:
        raise ProgramFormatError(f"{source}: no function '{function}' (has {', '.join(functions)})")
    fn = functions[function]
    block = fn.block_specializations[fn.opset]
    decoder = _Decoder(weights, source)
    program = Program(source=source, description=spec.description.metadata.shortDescription, function=function,
                      opset=fn.opset, inputs=[_var(v) for v in fn.inputs], outputs=list(block.outputs),
                      consts={}, ops=[])
    program.types = {v.name: v for v in program.inputs}
    for op in block.operations:
        if len(op.blocks):
            raise ProgramFormatError(f"{source}: op '{op.type}' ({op.outputs[0].name if op.outputs else ''}) "
                                     "has nested blocks (control flow), which the reference executor does not run")
        outputs = [_var(o) for o in op.outputs]
        program.types.update({v.name: v for v in outputs})
        if op.type == "const":
            program.consts[outputs[0].name] = decoder.value(op.attributes["val"], outputs[0].name)
            continue
        inputs = {k: [("name", b.name) if b.WhichOneof("binding") == "name"
                      else ("value", decoder.value(b.value, f"{outputs[0].name}.{k}")) for b in arg.arguments]
                  for k, arg in op.inputs.items()}
        attributes = {k: decoder.value(v, f"{outputs[0].name}.{k}") for k, v in op.attributes.items() if k != "name"}
        program.ops.append(Op(op.type, inputs, attributes, outputs))
    return program


def _dtype_name(code: int) -> str:
    import_coremltools()
    from coremltools.proto import MIL_pb2

    return MIL_pb2.DataType.Name(code)


def _var(named: Any) -> Var:
    t = named.type
    if t.WhichOneof("type") != "tensorType":
        return Var(named.name, t.WhichOneof("type") or "", None)
    tt = t.tensorType
    dims = [d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in tt.dimensions]
    shape = None if any(d is None for d in dims) else tuple(int(d) for d in dims)
    return Var(named.name, _dtype_name(tt.dataType), shape)


class _Decoder:
    """Decodes proto Values: immediate tensors and blob file values (one blob reader per weight file)."""

    def __init__(self, weights: Optional[Path], source: str) -> None:
        self.weights, self.source, self.readers = weights, source, {}

    def value(self, value: Any, where: str) -> Any:
        if value.type.WhichOneof("type") != "tensorType":
            raise ProgramFormatError(f"{self.source}: {where} is a {value.type.WhichOneof('type')} value, "
                                     "which the reference executor does not decode")
        tt = value.type.tensorType
        dtype = _dtype_name(tt.dataType)
        shape = tuple(int(d.constant.size) for d in tt.dimensions)
        if value.WhichOneof("value") == "blobFileValue":
            return self._blob(value.blobFileValue, dtype, shape, where)
        tensor = value.immediateValue.tensor
        kind = tensor.WhichOneof("value")
        if dtype == "STRING":
            strings = list(tensor.strings.values)
            return strings[0] if shape == () else np.array(strings).reshape(shape)
        if dtype not in _NUMPY:
            raise ProgramFormatError(f"{self.source}: {where} has dtype {dtype}, which the reference executor "
                                     "does not decode")
        if kind == "bytes":
            array = np.frombuffer(tensor.bytes.values, _NUMPY[dtype])
        elif kind is None:
            array = np.zeros(0, _NUMPY[dtype])
        else:
            array = np.asarray(list(getattr(tensor, kind).values)).astype(_NUMPY[dtype])
        return array.reshape(shape).copy()

    def _blob(self, blob: Any, dtype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
        import_coremltools()
        from coremltools.libmilstoragepython import _BlobStorageReader

        if dtype not in _BLOB_READ:
            raise ProgramFormatError(f"{self.source}: {where} is a {dtype} blob, which the reference executor "
                                     "does not decode")
        if self.weights is None:
            raise ProgramFormatError(f"{self.source}: {where} lives in a weight file but the package has none")
        file = self.weights / os.path.basename(blob.fileName)
        if file not in self.readers:
            if not file.is_file():
                raise ProgramFormatError(f"{self.source}: weight file {file} is missing")
            self.readers[file] = _BlobStorageReader(str(file))
        raw = np.asarray(getattr(self.readers[file], _BLOB_READ[dtype])(blob.offset))
        array = raw.view(np.float16) if dtype == "FLOAT16" else raw.astype(_NUMPY[dtype], copy=False)
        if array.size != int(np.prod(shape)):
            raise ProgramFormatError(f"{self.source}: {where}: blob at offset {blob.offset} holds {array.size} "
                                     f"values, its type says {shape}")
        return array.reshape(shape).copy()
