"""TFLite → Relax."""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from ..errors import EdgecError
from ..signature import TensorSpec
from . import Frontend, register_frontend
from .base import ModelInfo, check_pins, histogram, unsupported_error
from .custom_ops import CONVERTER_HINT, CUSTOM_SUFFIX
from .pins import dynamic_dims_error


def _load(path: Path):
    try:
        import tflite
    except ImportError as e:
        raise EdgecError("the 'tflite' package is not installed", "pip install tflite==2.18.0") from e
    buf = path.read_bytes()
    # A flatbuffer carries its file identifier at bytes 4..8; checking it avoids a crash deep in the parser.
    if len(buf) < 8 or buf[4:8] != b"TFL3":
        raise EdgecError(f"{path} is not a valid TFLite model (no TFL3 identifier)",
                         "check that the file is a complete .tflite export")
    model = tflite.Model.GetRootAsModel(buf, 0)
    try:
        _walk(model, len(buf))
    except (ArithmeticError, LookupError, TypeError, ValueError, struct.error) as e:
        raise EdgecError(f"{path} is not a valid TFLite model (its body is corrupt or truncated)",
                         "check that the file is a complete .tflite export") from e
    return model


def _walk(model, size: int) -> None:
    """Read every table and index the importer will use. A flatbuffer has no checksum and the Python reader no
    verifier: garbage after a valid header would fail deep inside TVM, or loop over a garbage length."""
    def count(n: int) -> int:
        if not 0 <= n <= size:
            raise ValueError(f"a length of {n} in a {size}-byte file")
        return n

    def index(i: int, n: int) -> None:
        if not -1 <= i < n:                      # -1: an optional input left out
            raise ValueError(f"index {i} of {n}")

    from tflite.BuiltinOperator import BuiltinOperator

    known_ops = {v for k, v in vars(BuiltinOperator).items() if not k.startswith("_")}
    codes, buffers = count(model.OperatorCodesLength()), count(model.BuffersLength())
    for i in range(codes):
        code = model.OperatorCodes(i)
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) not in known_ops:   # as TVM reads it
            raise ValueError(f"operator code {code.BuiltinCode()}")
        code.CustomCode()
    for i in range(buffers):
        count(model.Buffers(i).DataLength())
    if not count(model.SubgraphsLength()):
        raise ValueError("no subgraph")
    for g in range(model.SubgraphsLength()):
        sg = model.Subgraphs(g)
        tensors = count(sg.TensorsLength())
        for i in range(tensors):
            t = sg.Tensors(i)
            (t.Name() or b"").decode("utf-8")
            count(t.ShapeLength()), count(t.ShapeSignatureLength())
            t.ShapeAsNumpy(), t.ShapeSignatureAsNumpy(), t.Type()
            index(t.Buffer(), buffers)
        for i in [*map(sg.Inputs, range(count(sg.InputsLength()))), *map(sg.Outputs, range(count(sg.OutputsLength())))]:
            index(i, tensors)
            if i < 0 or not isinstance(sg.Tensors(i).ShapeAsNumpy(), np.ndarray):   # the signature needs a shape
                raise ValueError(f"model input or output {i} without a shape")
        for i in range(count(sg.OperatorsLength())):
            op = sg.Operators(i)
            index(op.OpcodeIndex(), codes)
            for j in range(count(op.InputsLength())):
                index(op.Inputs(j), tensors)
            for j in range(count(op.OutputsLength())):
                index(op.Outputs(j), tensors)
            op.BuiltinOptionsType()


def _converter(model):
    """edgec's TFLite op converter (TVM's, corrected), used here only for its op naming and support table."""
    from tvm.relax.frontend.tflite.tflite_frontend import ExprTable

    from .tflite_convert import EdgecOperatorConverter

    return EdgecOperatorConverter(model, model.Subgraphs(0), ExprTable(), None)


def _tensor_spec(subgraph, index: int) -> tuple[str, list, str]:
    from tvm.relax.frontend.tflite.tflite_frontend import _decode_type, get_tensor_name

    t = subgraph.Tensors(index)
    sig = t.ShapeSignatureAsNumpy() if t.ShapeSignatureLength() else t.ShapeAsNumpy()
    dims = [int(d) if d >= 0 else "?" for d in sig]
    return get_tensor_name(subgraph, index), dims, _decode_type(t.Type())


def _op_names(model) -> list[str]:
    conv = _converter(model)
    sg = model.Subgraphs(0)
    return [conv.get_op_code_str(sg.Operators(i)) for i in range(sg.OperatorsLength())]


def _unsupported_ops(model) -> dict[str, int]:
    conv = _converter(model)
    return histogram(op for op in _op_names(model) if op not in conv.convert_map)


def _load_for_import(path: Path):
    """_load, refusing custom operators without a converter with the hint that fits them (--converter), and
    streaming models."""
    model = _load(path)
    missing = _unsupported_ops(model)
    if any(op.endswith(CUSTOM_SUFFIX) for op in missing):
        raise EdgecError(unsupported_error(path, missing, "TFLite").message, CONVERTER_HINT)
    # A streaming model keeps state between calls in resource variables, which its graph rewrites
    # (ASSIGN_VARIABLE). TVM only takes variables set once at initialization (CALL_ONCE); without the writes the
    # model would forget its state and give wrong numbers from its second call on.
    writes = _op_names(model).count("ASSIGN_VARIABLE")
    if writes:
        raise EdgecError(f"{path.name} is a streaming model: ASSIGN_VARIABLE (x{writes}) keeps state between calls "
                         "in resource variables, which edgec cannot import yet",
                         "export the model in its non-streaming form (the state as ordinary inputs and outputs)")
    return model


def _signature(model, path: Path, input_shapes: dict) -> tuple[list[TensorSpec], list[str]]:
    sg = model.Subgraphs(0)
    raw_inputs = [_tensor_spec(sg, sg.Inputs(i)) for i in range(sg.InputsLength())]
    check_pins(path, input_shapes, [name for name, _, _ in raw_inputs])
    inputs = []
    for i, (name, dims, dtype) in enumerate(raw_inputs):
        if name in input_shapes:
            pinned = input_shapes[name]
            # TVM's converters read the stored shapes too: a pin may only fill in the dynamic dims
            if len(pinned) != len(dims) or any(d != "?" and d != p for d, p in zip(dims, pinned)):
                raise EdgecError(f"--input-shape {name}:{'x'.join(map(str, pinned))} does not fit the model's "
                                 f"input shape {dims}", "keep the rank and the static dims, pin only dynamic ones")
            dims = list(pinned)
        if any(d == "?" for d in dims):
            raise dynamic_dims_error(name, dims, sg.Tensors(sg.Inputs(i)).ShapeAsNumpy())
        inputs.append(TensorSpec(name, tuple(dims), dtype))
    return inputs, [_tensor_spec(sg, sg.Outputs(i))[0] for i in range(sg.OutputsLength())]


def _convert(model, inputs: list[TensorSpec]):
    from tvm.relax.frontend.tflite import from_tflite

    from .tflite_convert import EdgecOperatorConverter

    mod = from_tflite(model, shape_dict={s.name: s.shape for s in inputs}, dtype_dict={s.name: s.dtype for s in inputs},
                      op_converter=EdgecOperatorConverter)
    # The importer also attaches its weights as a function attribute; they are bound as constants already.
    mod["main"] = mod["main"].without_attr("params")
    return mod


def _macs(model) -> int:
    """MACs of CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED from the stored (static) shapes."""
    sg = model.Subgraphs(0)
    conv = _converter(model)
    total = 0
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        name = conv.get_op_code_str(op)
        if name not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "TRANSPOSE_CONV"):
            continue
        out = sg.Tensors(op.Outputs(0)).ShapeAsNumpy()
        w = sg.Tensors(op.Inputs(1)).ShapeAsNumpy()    # the weights are input 1 of all four ops
        if name == "CONV_2D":                 # weights OHWI: each output element takes H*W*I MACs
            total += int(np.prod(out)) * int(np.prod(w[1:]))
        elif name == "DEPTHWISE_CONV_2D":     # weights 1HWC: each output element takes H*W MACs
            total += int(np.prod(out)) * int(w[1] * w[2])
        elif name == "FULLY_CONNECTED":       # weights [units, K]
            total += int(np.prod(out)) * int(w[-1])
        else:                                 # TRANSPOSE_CONV weights OHWI, applied to each input element
            x = sg.Tensors(op.Inputs(2)).ShapeAsNumpy()
            total += int(np.prod(x)) * int(np.prod(w[:3]))
    return total


def inspect_tflite(path: Path) -> ModelInfo:
    model = _load(path)
    sg = model.Subgraphs(0)
    activations = {sg.Inputs(i) for i in range(sg.InputsLength())}
    param_count = param_bytes = 0
    for i in range(sg.TensorsLength()):
        t = sg.Tensors(i)
        buf = model.Buffers(t.Buffer())
        if i not in activations and buf is not None and buf.DataLength() > 0:
            param_count += int(np.prod(t.ShapeAsNumpy())) if t.ShapeLength() else 1
            param_bytes += buf.DataLength()
    inputs = tuple(_tensor_spec(sg, sg.Inputs(i)) for i in range(sg.InputsLength()))
    outputs = tuple(_tensor_spec(sg, sg.Outputs(i)) for i in range(sg.OutputsLength()))
    return ModelInfo(path, "tflite", inputs, outputs, histogram(_op_names(model)), param_count, param_bytes,
                     _macs(model), _unsupported_ops(model))


register_frontend(".tflite", Frontend("tflite", "TFLite", _load_for_import, _unsupported_ops, _signature, _convert, inspect_tflite,
                                       {}))
