"""ONNX → Relax."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgecError
from ..passes import register_pass
from ..signature import TensorSpec
from . import Frontend, register_frontend
from .base import ModelInfo, check_pins, histogram

# The operators of shape arithmetic: what a Shape → Gather → Concat → Reshape chain is made of. A node is folded
# only when one of its inputs derives from a Shape/Size of a pinned tensor and all are constant; weights and
# everything else (a DequantizeLinear on int8 weights included) reach the Relax pipeline unchanged.
_SHAPE_OPS = {"Shape", "Size", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast", "Identity", "Reshape",
              "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Max", "Min", "Equal", "Where",
              "ReduceProd", "ReduceSum", "Range", "ConstantOfShape", "Expand", "Tile", "Flatten"}


def _load(path: Path):
    import onnx

    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises several unrelated types for a bad file
        raise EdgecError(f"{path} is not a valid ONNX model ({type(e).__name__})",
                         "check that the file is a complete .onnx export") from e
    if not model.graph.node:
        raise EdgecError(f"{path} is not a valid ONNX model (its graph has no nodes)",
                         "check that the file is a complete .onnx export")
    return model


def _graph_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(value_info) -> list:
    """Static dims as ints, dynamic ones as their symbolic name or '?'."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _np_dtype(value_info) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from _all_nodes(sub)


def _unsupported_ops(model) -> dict[str, int]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = _get_convert_map()
    # Ops of custom domains are unsupported whatever their name.
    return histogram(n.op_type for n in _all_nodes(model.graph)
                     if n.domain not in ("", "ai.onnx") or n.op_type not in supported)


def pin_input_shapes(model, input_shapes: dict[str, tuple[int, ...]], path: Path) -> list[TensorSpec]:
    """Write the pinned dims into the graph inputs; every input must end up fully static."""
    inputs = _graph_inputs(model)
    check_pins(path, input_shapes, [i.name for i in inputs])
    specs = []
    for inp in inputs:
        dims = _dims(inp)
        if inp.name in input_shapes:
            pinned = input_shapes[inp.name]
            if len(pinned) != len(dims) or any(isinstance(d, int) and d > 0 and d != p for d, p in zip(dims, pinned)):
                raise EdgecError(f"--input-shape {inp.name}:{'x'.join(map(str, pinned))} does not fit the model's "
                                 f"input shape {dims}", "keep the rank and the static dims, pin only dynamic ones")
            dims = list(pinned)
            tensor_shape = inp.type.tensor_type.shape
            for dim, value in zip(tensor_shape.dim, pinned):
                dim.Clear()
                dim.dim_value = value
        dynamic = [d for d in dims if not isinstance(d, int) or d <= 0]
        if dynamic:
            example = "x".join(str(d) if isinstance(d, int) and d > 0 else "1" for d in dims)
            raise EdgecError(f"input '{inp.name}' has dynamic dims {dims}",
                             f"pin them with --input-shape {inp.name}:{example}")
        specs.append(TensorSpec(inp.name, tuple(dims), _np_dtype(inp)))
    return specs


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) and d > 0 for d in dims)


def fold_shape_subgraphs(model) -> str:
    """Replace the shape computations that pinned input dims make constant by their values; returns a summary.

    Relax's importer needs Reshape/Expand targets as constants. PP-OCR rec/cls compute them through
    Shape → Gather → Concat chains; once the input dims are pinned, these chains are constant.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(a.t) for n in model.graph.node if n.op_type == "Constant"
                   for a in n.attribute if a.name == "value"})
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    derived: set[str] = set()          # values computed from the shape of a pinned tensor
    kept, folded = [], []
    for node in model.graph.node:
        value = None
        if node.domain in ("", "ai.onnx") and node.op_type in ("Shape", "Size") and _static(shapes.get(node.input[0])):
            dims = np.array(shapes[node.input[0]], dtype=np.int64)
            if node.op_type == "Size":
                value = np.array(dims.prod(), dtype=np.int64)
            else:
                start = next((a.i for a in node.attribute if a.name == "start"), 0)
                end = next((a.i for a in node.attribute if a.name == "end"), None)
                value = dims[start:end]
        elif (node.domain in ("", "ai.onnx") and node.op_type in _SHAPE_OPS and len(node.output) == 1
              and any(i in derived for i in node.input) and all(i == "" or i in consts for i in node.input)):
            feeds = {i: consts[i] for i in node.input if i}
            value = ReferenceEvaluator(node, opsets={"": opset} if opset else None).run(None, feeds)[0]
        if value is None:
            kept.append(node)
            continue
        value = np.asarray(value)
        consts[node.output[0]] = value
        derived.add(node.output[0])
        model.graph.initializer.append(numpy_helper.from_array(value, node.output[0]))
        folded.append(f"{node.op_type} {node.name or node.output[0]} = {value.tolist()}")
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return f"folded {len(folded)} shape node(s)" + "".join(f"\n  {line}" for line in folded)


@register_pass("fold-shape-subgraphs", phase="import", frontend="onnx", opt_level=0)
def _fold_shape_subgraphs_step(ctx):
    """Evaluate the Shape → Gather → Concat chains that pinned input dims make constant (in the ONNX graph)."""
    return fold_shape_subgraphs


def _signature(model, path: Path, input_shapes: dict) -> tuple[list[TensorSpec], list[str]]:
    return pin_input_shapes(model, input_shapes, path), [o.name for o in model.graph.output]


def _convert(model, inputs: list[TensorSpec]):
    from tvm.relax.frontend.onnx import from_onnx

    return from_onnx(model, shape_dict={s.name: list(s.shape) for s in inputs},
                     dtype_dict={s.name: s.dtype for s in inputs}, keep_params_in_input=False,
                     sanitize_input_names=False)


def _macs(model) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul, from inferred static shapes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        out, w = shapes.get(node.output[0]), shapes.get(node.input[1])
        if out is None or w is None or not all(isinstance(d, int) and d > 0 for d in [*out, *w]):
            return None
        if node.op_type == "Conv":          # each output element: Cin/group * kh * kw MACs
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type == "ConvTranspose":
            x = shapes.get(node.input[0])
            total += int(np.prod(x)) * int(np.prod(w[1:]))
        else:                               # inner dimension K of the product
            a = shapes.get(node.input[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if trans_a else a[-1]
            total += int(np.prod(out)) * int(k)
    return total


def inspect_onnx(path: Path) -> ModelInfo:
    from onnx import numpy_helper

    model = _load(path)
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    inputs = tuple((i.name, _dims(i), _np_dtype(i)) for i in _graph_inputs(model))
    outputs = tuple((o.name, _dims(o), _np_dtype(o)) for o in model.graph.output)
    return ModelInfo(path, "onnx", inputs, outputs, histogram(n.op_type for n in _all_nodes(model.graph)),
                     sum(a.size for a in arrays), sum(a.nbytes for a in arrays), _macs(model), _unsupported_ops(model))


register_frontend(".onnx", Frontend("onnx", _load, _unsupported_ops, _signature, _convert, inspect_onnx,
                                     {"fold-shape-subgraphs": fold_shape_subgraphs}))
