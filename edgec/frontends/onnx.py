"""ONNX → Relax."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import EdgecError, last_line
from ..passes import register_pass
from ..signature import TensorSpec
from . import Frontend, register_frontend
from .base import ModelInfo, check_pins, histogram
from .onnx_control_flow import lower_control_flow
from .onnx_ml import converts as converts_ml
from .onnx_quant import converts as converts_quantized
from .onnx_semantics import EDGEC_OPS, all_nodes, from_onnx, graph_constants, refuse_wrong_conversions
from .pins import dynamic_dims_error

# The operators of shape arithmetic: what a Shape → Gather → Concat → Reshape chain is made of. A node is folded
# only when all its inputs are constant and one derives from a Shape/Size of a pinned tensor or is tiny; weights and
# everything else (a DequantizeLinear on int8 weights included) reach the Relax pipeline unchanged.
_SHAPE_OPS = {"Shape", "Size", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Cast", "Identity", "Reshape",
              "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Max", "Min", "Equal", "Where",
              "ReduceProd", "ReduceSum", "Range", "ConstantOfShape", "Expand", "Tile", "Flatten", "Not", "And", "Or",
              "Xor", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Sqrt", "Reciprocal", "Pow", "Transpose",
              "Split"}


# A constant this small is a shape's element (Paddle exports Cast(fill_constant) into Reshape targets), not a weight.
_SMALL = 8

_REEXPORT = "check that the file is a complete .onnx export"

_PACKED_INT = {22, 21, 25, 26}     # TensorProto INT4, UINT4, INT2, UINT2 (the enum names are newer than some onnx)


def _load(path: Path):
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises several unrelated types for a bad file
        raise EdgecError(f"{path} is not a valid ONNX model ({type(e).__name__})", _REEXPORT) from e
    if not model.graph.node:
        raise EdgecError(f"{path} is not a valid ONNX model (its graph has no nodes)", _REEXPORT)
    if model.ir_version > onnx.IR_VERSION:
        raise EdgecError(f"{path} has ONNX IR version {model.ir_version}, newer than this edgec reads "
                         f"(up to {onnx.IR_VERSION}, onnx {onnx.__version__})",
                         "export the model with an older IR version, or upgrade onnx")
    _check_opset(model, path)
    _load_external_data(model, path)
    _sort_graph(model, path)
    return model


def _load_external_data(model, path: Path) -> None:
    """Weights kept next to the model (onnx's external data): name a missing file, not onnx's ValidationError."""
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, load_external_data_for_model
    from onnx.external_data_helper import uses_external_data

    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    for tensor in external:
        location = ExternalDataInfo(tensor).location
        if not (path.parent / location).is_file():
            raise EdgecError(f"{path.name} keeps tensor '{tensor.name}' in the file '{location}', which is missing",
                             f"put {location} next to {path.name} (it is part of the model)")
    if external:
        try:
            load_external_data_for_model(model, str(path.parent))
        except Exception as e:  # onnx refuses paths outside the model's directory, short files, ...
            raise EdgecError(f"cannot read the external data of {path.name} ({last_line(e)})", _REEXPORT) from e


def _check_opset(model, path: Path) -> None:
    """Refuse opsets TVM's importer would convert wrongly instead of failing: newer than the onnx package knows,
    or (per operator) older than TVM's oldest converter of that operator when the node uses inputs or
    attributes that this converter does not have (TVM falls back to it silently)."""
    import onnx
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is None:
        return
    if opset > onnx.defs.onnx_opset_version():
        raise EdgecError(f"{path.name} uses ONNX opset {opset}, newer than TVM's importer reads (up to opset "
                         f"{onnx.defs.onnx_opset_version()}, onnx {onnx.__version__})",
                         "export the model with an older opset")
    converters = _get_convert_map()
    for node in model.graph.node:
        versions = [int(a[len("_impl_v"):]) for a in dir(converters.get(node.op_type)) if a.startswith("_impl_v")]
        if node.domain not in ("", "ai.onnx") or not versions or min(versions) <= opset:
            continue
        try:
            oldest = onnx.defs.get_schema(node.op_type, min(versions))
        except onnx.defs.SchemaError:
            continue
        unread = sorted({a.name for a in node.attribute} - set(oldest.attributes))
        if unread or len(node.input) < oldest.min_input:
            raise EdgecError(f"{path.name} uses {node.op_type} at opset {opset}, older than TVM's importer converts "
                             f"({node.op_type} from opset {min(versions)} on: "
                             + (f"it ignores {', '.join(unread)})" if unread else "it takes more inputs)"),
                             f"export the model with opset {min(versions)} or newer")


def _sort_graph(model, path: Path) -> None:
    """Check that every tensor a node reads is made by a graph input, an initializer or another node, without a
    cycle, and put the nodes in that order (TVM's importer reads them in file order and otherwise fails with a
    bare KeyError that looks like a missing --input-shape)."""
    import heapq

    graph = model.graph
    nodes = list(graph.node)
    available = {"", *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    producer = {}
    for i, node in enumerate(nodes):
        for out in filter(None, node.output):          # '' is an omitted optional output
            if out in producer or out in available - {""}:
                raise _malformed(path, f"tensor '{out}' is produced twice")
            producer[out] = i
    waiting, missing, ready = {}, [], []
    for i, node in enumerate(nodes):
        need = set(node.input) - available
        missing.append(len(need))
        for name in need:
            waiting.setdefault(name, []).append(i)
        if not need:
            ready.append(i)
    heapq.heapify(ready)
    order = []
    while ready:                       # Kahn's algorithm, keeping the file's order where it is already right
        i = heapq.heappop(ready)
        order.append(i)
        for out in nodes[i].output:
            for j in waiting.pop(out, []):
                missing[j] -= 1
                if not missing[j]:
                    heapq.heappush(ready, j)
    if len(order) < len(nodes):
        # Follow unmet inputs upstream: they end at a tensor nobody makes, or go round a cycle.
        i, seen = missing.index(next(m for m in missing if m)), set()
        while True:
            seen.add(i)
            name = next(t for t in nodes[i].input if t in waiting)
            if name not in producer:
                raise _malformed(path, f"node '{nodes[i].name or nodes[i].op_type}' reads tensor '{name}', which "
                                       "no node, graph input or initializer provides")
            if producer[name] in seen:
                raise _malformed(path, f"tensor '{name}' depends on itself (the graph has a cycle)")
            i = producer[name]
    dangling = [o.name for o in graph.output if o.name not in producer and o.name not in available]
    if dangling:
        raise _malformed(path, f"graph output '{dangling[0]}' is made by no node")
    if order != sorted(order):
        del graph.node[:]
        graph.node.extend(nodes[i] for i in order)


def _malformed(path: Path, what: str) -> EdgecError:
    return EdgecError(f"{path.name} is a malformed ONNX graph: {what}",
                      "re-export the model; onnx.checker.check_model(model, full_check=True) shows such errors")


def _graph_inputs(model):
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits]


def _dims(value_info) -> list:
    """Static dims as ints (0 included: a zero-size dim), dynamic ones as their symbolic name or '?' (a negative
    dim_value too: Paddle's exporter writes -1 for a dynamic batch)."""
    return [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _np_dtype(value_info) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(value_info.type.tensor_type.elem_type))


def _unsupported_ops(model) -> dict[str, int]:
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    supported = {*_get_convert_map(), *EDGEC_OPS}
    # Ops of custom domains are unsupported whatever their name (but onnx_quant's and onnx_ml's).
    return histogram(n.op_type for n in all_nodes(model.graph) if not converts_quantized(n) and not converts_ml(n)
                     and (n.domain not in ("", "ai.onnx") or n.op_type not in supported))


def _input_dtype(value_info, path: Path) -> str:
    """The numpy dtype of a graph input, or one line saying why edgec cannot take it."""
    import onnx

    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        what = {"sequence_type": "a Sequence", "optional_type": "an Optional", "map_type": "a Map",
                "sparse_tensor_type": "a sparse tensor"}.get(kind, "not a tensor")
        raise EdgecError(f"input '{value_info.name}' of {path.name} is {what}; edgec takes tensor inputs only",
                         "export the model with plain tensor inputs")
    elem = value_info.type.tensor_type.elem_type
    if elem in _PACKED_INT:
        raise EdgecError(f"input '{value_info.name}' of {path.name} is {onnx.TensorProto.DataType.Name(elem).lower()}, "
                         "which edgec cannot take as an input (TVM's sub-byte integers give wrong numbers)",
                         "export the model with int8 or uint8 inputs")
    if elem == onnx.TensorProto.STRING:
        raise EdgecError(f"input '{value_info.name}' of {path.name} is a string tensor; edgec compiles numeric "
                         "tensors only", "encode the strings to integers (token ids) before the model and export it "
                         "with those as input")
    return _np_dtype(value_info)


def fold_const_inputs(model, path: Path, values: dict) -> None:
    """Make graph inputs initializers holding `values` (--const-input), after checking each fits the declaration:
    a name the graph takes, the same dtype, the same rank and static dims."""
    from onnx import numpy_helper

    inputs = {i.name: i for i in _graph_inputs(model)}
    for name, value in values.items():
        if name not in inputs:
            raise EdgecError(f"--const-input names '{name}', which {path.name} has no input called",
                             f"its inputs are: {', '.join(inputs) or 'none'}")
        dims, dtype = _dims(inputs[name]), _input_dtype(inputs[name], path)
        if str(value.dtype) != dtype:
            raise EdgecError(f"--const-input '{name}' is {value.dtype}, the model's input is {dtype}",
                             f"save the array with .astype('{dtype}')")
        if value.ndim != len(dims) or any(isinstance(d, int) and d != v for d, v in zip(dims, value.shape)):
            raise EdgecError(f"--const-input '{name}' has shape {list(value.shape)}, which does not fit the model's "
                             f"input shape {dims}", "keep the rank and the static dims")
        model.graph.initializer.append(numpy_helper.from_array(value, name))
    kept = [i for i in model.graph.input if i.name not in values]
    del model.graph.input[:]
    model.graph.input.extend(kept)


def pin_input_shapes(model, input_shapes: dict[str, tuple[int, ...]], path: Path) -> list[TensorSpec]:
    """Write the pinned dims into the graph inputs; every input must end up fully static (a 0 dim is static)."""
    inputs = _graph_inputs(model)
    check_pins(path, input_shapes, [i.name for i in inputs])
    specs = []
    for inp in inputs:
        dtype = _input_dtype(inp, path)
        dims = _dims(inp)
        if inp.name in input_shapes:
            pinned = input_shapes[inp.name]
            if len(pinned) != len(dims) or any(isinstance(d, int) and d != p for d, p in zip(dims, pinned)):
                raise EdgecError(f"--input-shape {inp.name}:{'x'.join(map(str, pinned))} does not fit the model's "
                                 f"input shape {dims}", "keep the rank and the static dims, pin only dynamic ones")
            dims = list(pinned)
            tensor_shape = inp.type.tensor_type.shape
            for dim, value in zip(tensor_shape.dim, pinned):
                dim.Clear()
                dim.dim_value = value
        if not _static(dims):
            raise dynamic_dims_error(inp.name, dims)
        specs.append(TensorSpec(inp.name, tuple(dims), dtype))
    return specs


def _static(dims) -> bool:
    return dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)


def fold_shape_subgraphs(model) -> str:
    """Replace the shape computations that pinned input dims make constant by their values; returns a summary.

    Relax's importer needs Reshape/Expand targets as constants. PP-OCR rec/cls compute them through
    Shape → Gather → Concat chains; once the input dims are pinned, these chains are constant.
    """
    derived: set[str] = set()          # values computed from the shape of a pinned tensor
    folded = []
    while True:     # a folded value (a Reshape's target) can make more shapes known to the next inference round,
        # or an If's condition constant: the branch taken brings its nodes into the graph to fold
        found = _fold_round(model, derived) + lower_control_flow(model, refuse=False)
        if not found:
            return f"folded {len(folded)} shape node(s)" + "".join(f"\n  {line}" for line in folded)
        folded += found


def _fold_round(model, derived: set[str]) -> list[str]:
    import onnx
    from onnx import numpy_helper
    from onnx.reference import ReferenceEvaluator

    inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    # Only tensors whose shape inference found a shape: one without is not a scalar (that lost PP-OCRv4 rec's
    # Slice(Shape(x)) element).
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
              if vi.type.tensor_type.HasField("shape")}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})   # weights' shapes are static too
    consts = graph_constants(model.graph)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    kept, folded = [], []
    for node in model.graph.node:
        values = None
        if node.domain in ("", "ai.onnx") and node.op_type in ("Shape", "Size") and _static(shapes.get(node.input[0])):
            dims = np.array(shapes[node.input[0]], dtype=np.int64)
            if node.op_type == "Size":
                values = [np.array(dims.prod(), dtype=np.int64)]
            else:
                start = next((a.i for a in node.attribute if a.name == "start"), 0)
                end = next((a.i for a in node.attribute if a.name == "end"), None)
                values = [dims[start:end]]
        elif (node.domain in ("", "ai.onnx") and node.op_type in _SHAPE_OPS and "" not in node.output
              and all(i == "" or i in consts for i in node.input)
              and any(i in derived or consts[i].size <= _SMALL for i in node.input if i)):
            feeds = {i: consts[i] for i in node.input if i}
            values = ReferenceEvaluator(_one_node_model(node, feeds, opset)).run(None, feeds)
        if values is None:
            kept.append(node)
            continue
        for name, value in zip(node.output, values):
            value = np.asarray(value)
            consts[name] = value
            derived.add(name)
            model.graph.initializer.append(numpy_helper.from_array(value, name))
            folded.append(f"{node.op_type} {node.name or name} = {value.tolist()}")
    if folded:
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return folded


def _one_node_model(node, feeds: dict, opset: int | None):
    """The node as a model of its opset: onnx's ReferenceEvaluator runs a bare node at the newest opset (an
    opset-11 Unsqueeze's axes attribute then fails)."""
    from onnx import helper

    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in feeds.items()]
    graph = helper.make_graph([node], "fold", inputs, [helper.make_empty_tensor_value_info(o) for o in node.output])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] if opset else None)


@register_pass("fold-shape-subgraphs", phase="import", frontend="onnx", opt_level=0)
def _fold_shape_subgraphs_step(ctx):
    """Evaluate the Shape → Gather → Concat chains that pinned input dims make constant (in the ONNX graph)."""
    return fold_shape_subgraphs


def _signature(model, path: Path, input_shapes: dict) -> tuple[list[TensorSpec], list[str]]:
    return pin_input_shapes(model, input_shapes, path), [o.name for o in model.graph.output]


def _convert(model, inputs: list[TensorSpec]):
    # Control flow becomes plain graph where it can (also when fold-shape-subgraphs is off); node forms TVM would
    # convert to wrong numbers are refused; the importer is TVM's with edgec's corrected converters (onnx_semantics).
    lower_control_flow(model)
    refuse_wrong_conversions(model)
    return from_onnx(model, {s.name: list(s.shape) for s in inputs}, {s.name: s.dtype for s in inputs})


def _macs(model) -> int | None:
    """Multiply-accumulates of Conv, ConvTranspose, Gemm and MatMul and their integer forms, from inferred static
    shapes."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {vi.name: _dims(vi) for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    weight_input = {"Conv": 1, "ConvInteger": 1, "QLinearConv": 3, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1,
                    "MatMulInteger": 1, "QLinearMatMul": 3}
    for node in model.graph.node:
        if node.op_type not in weight_input:
            continue
        out, w = shapes.get(node.output[0]), shapes.get(node.input[weight_input[node.op_type]])
        if out is None or w is None or not all(isinstance(d, int) and d > 0 for d in [*out, *w]):
            return None
        if node.op_type in ("Conv", "ConvInteger", "QLinearConv"):   # each output element: Cin/group * kh * kw MACs
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
    # weights are initializers, or Constant nodes in some exporters' graphs (Paddle's)
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer]
    arrays += [numpy_helper.to_array(a.t) for n in all_nodes(model.graph) if n.op_type == "Constant"
               for a in n.attribute if a.name == "value"]
    inputs = tuple((i.name, _dims(i), _np_dtype(i)) for i in _graph_inputs(model))
    outputs = tuple((o.name, _dims(o), _np_dtype(o)) for o in model.graph.output)
    return ModelInfo(path, "onnx", inputs, outputs, histogram(n.op_type for n in all_nodes(model.graph)),
                     sum(a.size for a in arrays), sum(a.nbytes for a in arrays), _macs(model), _unsupported_ops(model))


register_frontend(".onnx", Frontend("onnx", "ONNX", _load, _unsupported_ops, _signature, _convert, inspect_onnx,
                                     {"fold-shape-subgraphs": fold_shape_subgraphs}, fold_const_inputs))
