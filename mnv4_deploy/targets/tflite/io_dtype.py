"""A quantized TFLite flatbuffer's inputs and outputs retyped: float, int8 or uint8 (the tflite target's
`io_dtype`), editing the converted model's first subgraph and keeping its signatures in step."""
from __future__ import annotations

from typing import Any


def set_io_dtype(content: bytes, io_dtype: str) -> bytes:
    """Give a quantized model float, int8 or uint8 inputs/outputs.

    litert-torch's QDQ lowering folds the boundary quantize/dequantize into int8 I/O. This first strips any
    boundary QUANTIZE (float->int8) / DEQUANTIZE (int8->float) so the I/O is the int8 tensors, then adds
    QUANTIZE/DEQUANTIZE (float) or QUANTIZE requantize ops (uint8, zero point + 128, same scale) as asked.
    """
    from ai_edge_litert.tools import flatbuffer_utils as fbu

    model = fbu.read_model_from_bytearray(bytearray(content))
    edit = _IoEdit(model)
    edit.strip_boundary_conversions()
    if io_dtype != "int8":
        edit.add_boundary_conversions(io_dtype)
    edit.renumber_signatures()
    return bytes(fbu.convert_object_to_bytearray(model))


class _IoEdit:
    """Edits of a TFLite flatbuffer's first subgraph at its inputs and outputs, keeping signatures in step."""

    def __init__(self, model: Any) -> None:
        from ai_edge_litert import schema_py_generated as fb

        self.fb, self.model, self.sg = fb, model, model.subgraphs[0]
        self.renumber: dict[int, int] = {}  # tensor index the signatures name -> the tensor that replaces it

    def _code(self, op: Any) -> int:
        from ai_edge_litert.tools import flatbuffer_utils as fbu

        return fbu.get_builtin_code_from_operator_code(self.model.operatorCodes[op.opcodeIndex])

    def _remap(self, old: int, new: int) -> None:
        for k, v in self.renumber.items():
            if v == old:
                self.renumber[k] = new
        self.renumber[old] = new

    def strip_boundary_conversions(self) -> None:
        """Float I/O behind a lone QUANTIZE (input) or DEQUANTIZE (output) -> the int8 tensor itself."""
        fb, sg = self.fb, self.sg
        for ports, builtin, is_input in ((sg.inputs, fb.BuiltinOperator.QUANTIZE, True),
                                         (sg.outputs, fb.BuiltinOperator.DEQUANTIZE, False)):
            for pos, t in enumerate(list(ports)):
                ops = [op for op in sg.operators if t in (op.inputs if is_input else op.outputs)]
                if len(ops) != 1 or sg.tensors[t].type != fb.TensorType.FLOAT32 or self._code(ops[0]) != builtin:
                    continue
                inner = ops[0].outputs[0] if is_input else ops[0].inputs[0]
                if sg.tensors[inner].type == fb.TensorType.INT8:
                    ports[pos] = inner
                    self._remap(t, inner)
                    sg.operators.remove(ops[0])

    def add_boundary_conversions(self, io_dtype: str) -> None:
        """int8 I/O -> float (QUANTIZE in, DEQUANTIZE out) or uint8 (requantizing QUANTIZE both ways)."""
        fb, sg = self.fb, self.sg
        for pos, t in enumerate(list(sg.inputs)):
            if sg.tensors[t].type == fb.TensorType.INT8:
                new = self._outer_tensor(t, io_dtype)
                sg.operators.insert(0, self._op(fb.BuiltinOperator.QUANTIZE, new, t))
                sg.inputs[pos] = new
                self._remap(t, new)
        for pos, t in enumerate(list(sg.outputs)):
            if sg.tensors[t].type == fb.TensorType.INT8:
                new = self._outer_tensor(t, io_dtype)
                builtin = fb.BuiltinOperator.QUANTIZE if io_dtype == "uint8" else fb.BuiltinOperator.DEQUANTIZE
                sg.operators.append(self._op(builtin, t, new))
                sg.outputs[pos] = new
                self._remap(t, new)

    def renumber_signatures(self) -> None:
        for sig in self.model.signatureDefs or []:
            for item in list(sig.inputs or []) + list(sig.outputs or []):
                item.tensorIndex = self.renumber.get(item.tensorIndex, item.tensorIndex)

    def _opcode(self, builtin: int) -> int:
        from ai_edge_litert.tools import flatbuffer_utils as fbu

        for i, oc in enumerate(self.model.operatorCodes):
            if fbu.get_builtin_code_from_operator_code(oc) == builtin:
                return i
        oc = self.fb.OperatorCodeT()
        oc.builtinCode, oc.deprecatedBuiltinCode, oc.version = builtin, min(builtin, 127), 2
        self.model.operatorCodes.append(oc)
        return len(self.model.operatorCodes) - 1

    def _op(self, builtin: int, inp: int, out: int) -> Any:
        o = self.fb.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = self._opcode(builtin), [inp], [out]
        return o

    def _outer_tensor(self, inner: int, io_dtype: str) -> int:
        """A new I/O tensor beside the int8 one; it takes over the public name."""
        fb, src = self.fb, self.sg.tensors[inner]
        new = fb.TensorT()
        new.shape, new.shapeSignature, new.name = list(src.shape), src.shapeSignature, src.name
        src.name = f"{_name(src.name)}/int8"
        self.model.buffers.append(fb.BufferT())
        new.buffer = len(self.model.buffers) - 1
        if io_dtype == "uint8":
            new.type = fb.TensorType.UINT8
            q = fb.QuantizationParametersT()
            q.scale = list(src.quantization.scale)
            q.zeroPoint = [int(z) + 128 for z in src.quantization.zeroPoint]
            new.quantization = q
        else:
            new.type = fb.TensorType.FLOAT32
        self.sg.tensors.append(new)
        return len(self.sg.tensors) - 1


def _name(name: Any) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)

