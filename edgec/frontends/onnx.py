"""ONNX → Relax."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import EdgecError, last_line
from ..signature import TensorSpec
from . import register_frontend
from .base import ImportedModel, ModelInfo, check_pins, histogram, relax_outputs, unsupported_error

# Small constant subgraphs (Shape → Gather → Concat → Reshape) are evaluated on the CPU when
# folding; anything bigger is left to Relax's FoldConstant, which is far faster on weights.
_FOLD_MAX_ELEMENTS = 1 << 16
_NONDETERMINISTIC = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


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


def fold_shape_subgraphs(model) -> int:
    """Evaluate the small constant subgraphs that pinned shapes make static; returns nodes folded.

    Relax's importer needs Reshape/Expand targets as constants. PP-OCR rec/cls compute them through
    Shape → Gather → Concat chains; once the input dims are pinned, these chains are constant.
    """
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    kept, folded = [], 0
    for node in model.graph.node:
        value = None
        if node.op_type == "Shape" and all(isinstance(d, int) and d > 0 for d in shapes.get(node.input[0], [None])):
            value = np.array(shapes[node.input[0]], dtype=np.int64)
            start = next((a.i for a in node.attribute if a.name == "start"), 0)
            end = next((a.i for a in node.attribute if a.name == "end"), None)
            value = value[start:end]
        elif (node.op_type not in _NONDETERMINISTIC and node.domain in ("", "ai.onnx") and len(node.output) == 1
              and all(i == "" or i in consts for i in node.input)
              and sum(consts[i].size for i in node.input if i) <= _FOLD_MAX_ELEMENTS
              and not any(a.HasField("g") or a.graphs for a in node.attribute)):
            feeds = {i: consts[i] for i in node.input if i}
            try:
                value = ReferenceEvaluator(node, opsets={"": opset} if opset else None).run(None, feeds)[0]
            except Exception:  # an op the reference evaluator lacks: leave the node to the importer
                value = None
        if value is not None and np.asarray(value).size <= _FOLD_MAX_ELEMENTS:
            consts[node.output[0]] = np.asarray(value)
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(value), node.output[0]))
            folded += 1
        else:
            kept.append(node)
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return folded


def import_onnx(path: Path, input_shapes: dict[str, tuple[int, ...]]) -> ImportedModel:
    from tvm.relax.frontend.onnx import from_onnx

    model = _load(path)
    missing = _unsupported_ops(model)
    if missing:
        raise unsupported_error(path, missing, "ONNX")
    t0 = time.perf_counter()
    inputs = pin_input_shapes(model, input_shapes, path)
    fold_shape_subgraphs(model)
    try:
        mod = from_onnx(model, shape_dict={s.name: list(s.shape) for s in inputs},
                        dtype_dict={s.name: s.dtype for s in inputs}, keep_params_in_input=False,
                        sanitize_input_names=False)
    except Exception as e:
        raise EdgecError(f"TVM's ONNX importer failed on {path.name}: {last_line(e)}",
                         "if an input has dynamic dims, pin them with --input-shape; run with --verbose for details") from e
    outputs = tuple(TensorSpec(o.name, spec.shape, spec.dtype)
                    for o, spec in zip(model.graph.output, relax_outputs(mod)))
    return ImportedModel(path.stem, path, "onnx", mod, tuple(inputs), outputs, time.perf_counter() - t0)


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


register_frontend(".onnx", import_onnx, inspect_onnx)
