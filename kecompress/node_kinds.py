"""The kinds of compute nodes of an ONNX graph (1x1, kxk, depthwise and grouped convolutions,
squeeze-excitation, the classifier): onnxruntime's speed, in fp32 and in INT8, differs by kind.

Shared by ``benchmarks/latency_profile.py`` (which times kinds in onnxruntime's optimised graphs,
blocked NCHWc shapes included) and ``export --int8`` (which keeps the kinds that lose in INT8 in
fp32, :mod:`kecompress.quantize`).
"""

from __future__ import annotations

import math
from pathlib import Path

import onnx

CONVS = {"Conv", "FusedConv", "NchwcConv"}
MATMULS = {"Gemm", "MatMul", "FusedGemm", "FusedMatMul"}
# A 1x1 convolution with fewer input or output channels than this is "small": too little work per
# pixel for INT8's gain to pay for the conversions around it.
SMALL_CHANNELS = 64
# The kinds of convolutions a user may keep in fp32 (``--int8-keep-fp32``), by their short names.
CONV_KINDS = {"depthwise": "depthwise conv", "squeeze-excitation": "squeeze-excitation",
              "small-1x1": "small 1x1 conv", "1x1": "1x1 conv", "kxk": "kxk conv", "grouped": "grouped conv"}


def spatial_is_one(shape: list[int]) -> bool:
    """Whether an NCHW (or blocked NCHWc) shape has height and width 1.

    Example:
        >>> spatial_is_one([1, 16, 1, 1]), spatial_is_one([1, 2, 7, 7, 8])
        (True, False)
    """
    # NCHW or blocked NCHWc ([N, C / block, H, W, block]): height and width are at 2 and 3 either way.
    return len(shape) >= 4 and shape[2] == shape[3] == 1


def channels(shape: list[int]) -> int:
    """The channels of an NCHW or blocked NCHWc shape.

    Example:
        >>> channels([1, 2, 7, 7, 8])
        16
    """
    return shape[1] * (shape[4] if len(shape) == 5 else 1)


def kind_and_macs(op: str, inputs: list[list[int]], outputs: list[list[int]]) -> tuple[str, int | None]:
    """The kind a node falls in, and its MACs as run (None where MACs do not apply), from its
    operator and the shapes of its inputs (the weight second) and outputs.

    Example:
        >>> kind_and_macs("Conv", [[1, 32, 8, 8], [32, 1, 3, 3]], [[1, 32, 8, 8]])
        ('depthwise conv', 18432)
        >>> kind_and_macs("Conv", [[1, 32, 8, 8], [16, 32, 1, 1]], [[1, 16, 8, 8]])[0]
        'small 1x1 conv'
    """
    output = outputs[0] if outputs else []
    if op in CONVS:
        weight = inputs[1]
        groups = channels(inputs[0]) // weight[1]
        macs = math.prod(output) * math.prod(weight[1:])
        if spatial_is_one(output):
            return "squeeze-excitation", macs
        if weight[1] == 1 and groups > 1:
            return "depthwise conv", macs
        if groups > 1:
            return "grouped conv", macs
        if weight[2:] == [1, 1]:
            small = min(channels(inputs[0]), channels(output)) < SMALL_CHANNELS
            return ("small 1x1 conv" if small else "1x1 conv"), macs
        return "kxk conv", macs
    if op in MATMULS:
        return "classifier", math.prod(inputs[0]) * output[-1]
    if op.startswith("Reorder"):
        return "layout reorder", None
    if "Pool" in op or op.startswith("Reduce"):
        return "pooling", None
    if spatial_is_one(output) or (op == "Mul" and any(spatial_is_one(shape) for shape in inputs)):
        return "squeeze-excitation", None  # its gate: activations on pooled channels, and the scaling Mul
    if op == "Concat":
        return "concat", None
    return ("batchnorm" if op == "BatchNormalization" else "element-wise"), None


def graph_node_kinds(path: str | Path) -> dict[str, str]:
    """The kind (:func:`kind_and_macs`) of every node of the ONNX graph at ``path`` but its matrix
    products, by node name; shapes come from ONNX's shape inference (a free batch dimension counts
    as 1). A squeeze-excitation block's kind covers its gate too (activations on the pooled
    channels, and the Mul that scales the feature map).

    Example:
        >>> import os, tempfile, torch, torch.nn as nn
        >>> from kecompress.export import export_onnx
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 1))
        >>> path = export_onnx(model, os.path.join(tempfile.mkdtemp(), "m.onnx"), input_shape=(3, 9, 9))
        >>> sorted(graph_node_kinds(path).values())
        ['depthwise conv', 'kxk conv', 'small 1x1 conv']
    """
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(path))).graph
    shapes = {value.name: [dim.dim_value or 1 for dim in value.type.tensor_type.shape.dim]
              for value in (*graph.input, *graph.value_info, *graph.output)}
    shapes.update({weight.name: list(weight.dims) for weight in graph.initializer})
    kinds = {}
    for node in graph.node:
        if node.op_type in MATMULS or (node.op_type in CONVS and len(shapes.get(node.input[1], [])) < 3):
            continue  # the classifier, and convolutions whose weight has no known shape
        kinds[node.name] = kind_and_macs(node.op_type, [shapes.get(name, []) for name in node.input],
                                         [shapes.get(name, []) for name in node.output])[0]
    return kinds
