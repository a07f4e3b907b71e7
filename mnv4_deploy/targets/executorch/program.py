"""What a `.pte` file holds, read from the file itself: the execution plan (delegate calls, portable kernels)
and each XNNPACK delegate's graph, so the manifest says which layers run in int8 from what ExecuTorch will run.

An XNNPACK payload is a header and a flatbuffer; it is decoded with the `flatc` that ships in the executorch
wheel and XNNPACK's own `schema.fbs`.
"""
from __future__ import annotations

import collections
import json
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# XNNPACK node types that multiply-accumulate: what `int8_compute` counts.
COMPUTE_NODES = ("XNNConv2d", "XNNDepthwiseConv2d", "XNNFullyConnected", "XNNBatchMatrixMultiply",
                 "XNNConvTranspose2d")
_PORTABLE_COMPUTE = ("convolution", "linear", "addmm", "mm", "bmm")


def plan(path: Path) -> dict[str, Any]:
    """Delegate calls and portable kernel calls of the program's execution plan, with its I/O tensors."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.scalar_type import ScalarType
    from executorch.exir.schema import DelegateCall, KernelCall

    program = deserialize_pte_binary(Path(path).read_bytes()).program.execution_plan[0]
    kernels: collections.Counter = collections.Counter()
    delegates: collections.Counter = collections.Counter()
    for chain in program.chains:
        for instruction in chain.instructions:
            args = instruction.instr_args
            if isinstance(args, KernelCall):
                op = program.operators[args.op_index]
                kernels[f"{op.name}.{op.overload}" if op.overload else op.name] += 1
            elif isinstance(args, DelegateCall):
                delegates[program.delegates[args.delegate_index].id] += 1

    def tensor(i: int) -> dict[str, Any]:
        t = program.values[i].val
        kind = t.scalar_type
        return {"shape": list(t.sizes), "dtype": ScalarType(kind).name if isinstance(kind, int) else str(kind)}

    return {"delegate_calls": dict(delegates), "kernel_calls": dict(kernels),
            "inputs": [tensor(i) for i in program.inputs], "outputs": [tensor(i) for i in program.outputs]}


def xnnpack_graphs(path: Path) -> list[dict[str, Any]]:
    """Every XNNPACK delegate payload of the program, as JSON."""
    import executorch.backends.xnnpack.serialization as serialization
    import executorch.data.bin as bin_dir
    from executorch.backends.xnnpack.serialization.xnnpack_graph_serialize import XNNHeader
    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(Path(path).read_bytes()).program
    schema = Path(serialization.__path__[0]) / "schema.fbs"
    flatc = Path(bin_dir.__file__).parent / "flatc"
    graphs = []
    for delegate in program.backend_delegate_data:
        data = delegate.data
        header = XNNHeader.from_bytes(data[:XNNHeader.EXPECTED_LENGTH])
        flatbuffer = data[header.flatbuffer_offset:header.flatbuffer_offset + header.flatbuffer_size]
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "g.bin").write_bytes(flatbuffer)
            subprocess.run([str(flatc), "--json", "--strict-json", "--raw-binary", "-o", tmp, str(schema), "--",
                            str(Path(tmp) / "g.bin")], check=True, capture_output=True)
            text = (Path(tmp) / "g.json").read_text()
        # flatc spells non-finite floats inf/nan, which JSON does not have
        text = re.sub(r":\s*(-?)inf\b", r": \1Infinity", re.sub(r":\s*nan\b", ": NaN", text))
        graphs.append(json.loads(text))
    return graphs


def summary(graph: dict[str, Any]) -> dict[str, Any]:
    """Node histogram of one XNNPACK graph and the datatypes its compute nodes run with
    ('XNNConv2d: qint8 x qcint8 -> qint8': int8 activations, per-channel int8 weights)."""
    values: dict[int, dict[str, Any]] = {}
    for v in graph.get("xvalues", []):
        union = v["xvalue_union"]
        t = union.get("tensor_value", union)  # XNNQuantizedTensorValue wraps an XNNTensorValue
        values[t.get("id_out", 0)] = t
    nodes = graph.get("xnodes", [])

    def dtype(node: dict[str, Any], key: str) -> str:
        i = node["xnode_union"].get(key, 0)  # flatc leaves out fields equal to their default (id 0)
        return values.get(i, {}).get("datatype", "?").replace("xnn_datatype_", "")

    compute: collections.Counter = collections.Counter()
    for n in nodes:
        kind = n["xnode_union_type"]
        if kind in COMPUTE_NODES:
            second = "input2_id" if kind == "XNNBatchMatrixMultiply" else "filter_id"
            compute[f"{kind}: {dtype(n, 'input1_id')} x {dtype(n, second)} -> {dtype(n, 'output_id')}"] += 1
    kinds = collections.Counter(n["xnode_union_type"] for n in nodes)
    return {"nodes": len(nodes), "node_types": dict(kinds.most_common()), "compute": dict(compute)}


def int8_compute(path: Path) -> dict[str, Any]:
    """Convolutions, fully connected layers and matmuls with 8-bit activations inside XNNPACK, and those that
    run in float (inside a delegate, or on ExecuTorch's portable kernels)."""
    int8 = total = 0
    floating: list[str] = []
    for graph in xnnpack_graphs(path):
        for kind, n in summary(graph)["compute"].items():
            total += n
            if kind.split(": ")[1].startswith("qint8"):
                int8 += n
            else:
                floating.append(f"{kind} x{n}")
    portable = {k: v for k, v in plan(path)["kernel_calls"].items() if any(s in k for s in _PORTABLE_COMPUTE)}
    total += sum(portable.values())
    floating += [f"{k} x{v} (portable kernel)" for k, v in portable.items()]
    return {"int8": int8, "total": total, "float": floating, "source": "XNNPACK delegate graphs in the .pte"}
