"""TFLite softmax composites: every softmax of a PyTorch graph marked as litert's `odml.softmax` composite on the
last axis, so litert-converter lowers it to the fused SOFTMAX builtin (int8 in int8 models).

Runs on the graph the tflite target converts (the converted PT2E graph for int8, the exported float model of a
hybrid); the shared PT2E model and the other targets are not changed.
"""
from __future__ import annotations

import torch


def softmax_composites(gm: torch.fx.GraphModule) -> int:
    """Mark every softmax as an `odml.softmax` composite on the last axis; return how many.

    litert-torch lowers a bare softmax through JAX into REDUCE_MAX/SUB/EXP/SUM/DIV, which have no int8
    kernels: between the quantized matmuls of the Mobile MQA they stayed float (dequantize, 5 float ops,
    quantize) and no hybrid could be full-integer. litert-converter lowers the composite to the fused
    SOFTMAX builtin instead, int8 when the PT2E graph quantizes its output with the kernel's fixed 1/256
    scale (quantization/passes/attention_annotation.py does). The builtin always normalises the last axis whatever the
    composite's attribute says, so a softmax over another axis (MobileMQA's is over keys, axis 2) is
    transposed there and back; the converter keeps both transposes int8 and folds the second into the
    following matmul. Only the TFLite graph is changed: the shared PT2E model and other targets are not.
    """
    import uuid

    from litert_torch.backend.composite import mark_tensor

    graph, count = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (torch.ops.aten.softmax.int,
                                                              torch.ops.aten._softmax.default):
            continue
        if node.target == torch.ops.aten.softmax.int and len(node.args) > 2 and node.args[2] is not None:
            continue  # a dtype-casting softmax: leave it to the default lowering
        src, val = node.args[0], node.meta.get("val")
        if val is None or (src.op == "call_function" and src.target == mark_tensor.mark_tensor_op):
            continue  # no shape known, or already marked
        rank = len(val.shape)
        dim, last = int(node.args[1]) % rank, rank - 1
        uid, attr = uuid.uuid4().hex, mark_tensor.serialize_composite_attr({"axis": -1})
        with graph.inserting_before(node):
            x = src if dim == last else graph.call_function(torch.ops.aten.transpose.int, (src, dim, last))
            x = graph.call_function(mark_tensor.mark_tensor_op, (x, "odml.softmax", 0, uid, True, None))
            y = graph.call_function(torch.ops.aten._softmax.default, (x, last, False))
            y = graph.call_function(mark_tensor.mark_tensor_op, (y, "odml.softmax", 0, uid, False, attr))
            if dim != last:
                y = graph.call_function(torch.ops.aten.transpose.int, (y, dim, last))
        node.replace_all_uses_with(y)
        graph.erase_node(node)
        count += 1
    if count:
        gm.recompile()
    return count

