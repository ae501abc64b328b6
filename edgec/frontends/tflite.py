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
    return _with_state(path, model)


class _StreamingSubGraph:
    """Subgraph 0 of a streaming model seen with its state as graph inputs and outputs: each variable the graph
    rewrites (ASSIGN_VARIABLE) enters as the tensor its first READ_VARIABLE produces and leaves as the tensor its
    ASSIGN_VARIABLE writes, and those two operators are hidden; TVM converts the rest."""

    def __init__(self, subgraph, inputs: list[int], outputs: list[int], hidden: set[int], reads: dict[int, int]):
        self._sg, self._inputs, self._outputs = subgraph, inputs, outputs
        self._ops = [i for i in range(subgraph.OperatorsLength()) if i not in hidden]
        self.reads = reads            # output tensor of a later READ_VARIABLE -> the state input it reads again

    def __getattr__(self, name):
        return getattr(self._sg, name)

    def OperatorsLength(self):
        return len(self._ops)

    def Operators(self, i):
        return self._sg.Operators(self._ops[i])

    def InputsLength(self):
        return len(self._inputs)

    def Inputs(self, i):
        return self._inputs[i]

    def InputsAsNumpy(self):
        return np.array(self._inputs, np.int32)

    def OutputsLength(self):
        return len(self._outputs)

    def Outputs(self, i):
        return self._outputs[i]

    def OutputsAsNumpy(self):
        return np.array(self._outputs, np.int32)


def _streaming_model(model, view: _StreamingSubGraph, states: tuple):
    """The model with `view` as its subgraph 0 (a tflite.Model, as TVM's importer asserts) and its States."""
    import tflite

    class StreamingModel(tflite.Model):
        def Subgraphs(self, j):
            return view if j == 0 else super().Subgraphs(j)

    streaming = StreamingModel()
    streaming.Init(model._tab.Bytes, model._tab.Pos)
    streaming.states = states
    return streaming


def _with_state(path: Path, model):
    """A streaming model keeps state between calls in resource variables its graph rewrites (ASSIGN_VARIABLE),
    initialized once by a CALL_ONCE subgraph. TVM takes only variables set at initialization; edgec makes each
    rewritten variable a state (an input and an output, fed back by the runners), with the value the CALL_ONCE
    subgraph assigns as its initial value (zeros when it assigns none). Anything else is refused."""
    from tflite.CallOnceOptions import CallOnceOptions
    from tvm.relax.frontend.tflite.tflite_frontend import _decode_type, get_tensor_name

    from .base import State

    def refuse(what):
        return EdgecError(f"{path.name} is a streaming model whose variable {what}, which edgec cannot import",
                          "export the model in its non-streaming form (the state as ordinary inputs and outputs)")

    conv = _converter(model)    # names operators (of any subgraph)

    def ops(sg):
        for i in range(sg.OperatorsLength()):
            yield i, conv.get_op_code_str(sg.Operators(i)), sg.Operators(i)

    def handles(sg) -> dict[int, str]:
        """VAR_HANDLE output tensor -> variable key (TVM's: its shared name, else the tensor's name)."""
        from tvm.relax.frontend.tflite.tflite_frontend import ExprTable

        from .tflite_convert import EdgecOperatorConverter

        reader = EdgecOperatorConverter(model, sg, ExprTable(), None)
        found = {}
        for _, name, op in ops(sg):
            if name == "VAR_HANDLE":
                out = reader.get_output_tensors(op)[0]
                found[op.Outputs(0)] = "/".join(filter(None, reader._get_var_handle_resource_key(op, out)))
        return found

    main = model.Subgraphs(0)
    keys = handles(main)
    reads, writes, inits = {}, {}, []
    for i, name, op in ops(main):
        if name == "READ_VARIABLE":
            reads.setdefault(keys.get(op.Inputs(0)), []).append((i, op.Outputs(0)))
        elif name == "ASSIGN_VARIABLE":
            writes.setdefault(keys.get(op.Inputs(0)), []).append((i, op.Inputs(1)))
        elif name == "CALL_ONCE":
            inits.append((i, model.Subgraphs(_call_once_index(op, CallOnceOptions))))
    if not writes:
        return model
    initial, hidden = {}, set()
    for at, init in inits:
        init_keys = handles(init)
        if set(init_keys.values()) <= set(writes):     # it initializes states only: the runners do that
            hidden.add(at)
        for _, name, op in ops(init):
            if name == "ASSIGN_VARIABLE" and init_keys.get(op.Inputs(0)) in writes:
                t = init.Tensors(op.Inputs(1))
                data = model.Buffers(t.Buffer()).DataAsNumpy()     # 0 for a buffer without data
                if not isinstance(data, np.ndarray) or not data.size:
                    raise refuse(f"{init_keys[op.Inputs(0)]} is initialized to a computed value")
                shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
                initial[init_keys[op.Inputs(0)]] = np.frombuffer(data.tobytes(), _decode_type(t.Type())).reshape(shape)
    states, fed, aliases = [], [], {}
    for key, assigned in writes.items():
        if key is None:
            raise refuse("handle does not come from a VAR_HANDLE of the main graph")
        read = reads.get(key, [])
        if len(assigned) != 1 or not read or read[-1][0] > assigned[0][0]:
            raise refuse(f"{key} is not read, then written once, per call")
        first = read[0][1]
        aliases.update({tensor: first for _, tensor in read[1:]})
        hidden.update((read[0][0], assigned[0][0]))
        if ((_tensor_spec(main, first)[1:], _quantization(main, first))
                != (_tensor_spec(main, assigned[0][1])[1:], _quantization(main, assigned[0][1]))):
            raise refuse(f"{key} is written with another shape, type or quantization than it is read")
        _, dims, dtype = _tensor_spec(main, first)
        value = initial.get(key, np.zeros(dims, dtype))
        if list(value.shape) != dims or str(value.dtype) != dtype:
            raise refuse(f"{key}'s initial value is {value.dtype}{list(value.shape)}, not {dtype}{dims}")
        fed.append((first, assigned[0][1]))
        states.append(State(key, get_tensor_name(main, first), get_tensor_name(main, assigned[0][1]), value))
    view = _StreamingSubGraph(main, [*main.InputsAsNumpy().tolist(), *(i for i, _ in fed)],
                              [*main.OutputsAsNumpy().tolist(), *(o for _, o in fed)], hidden, aliases)
    return _streaming_model(model, view, tuple(states))


def _call_once_index(op, options_class) -> int:
    opts = options_class()
    table = op.BuiltinOptions()
    opts.Init(table.Bytes, table.Pos)
    return int(opts.InitSubgraphIndex())


def _quantization(subgraph, index: int) -> tuple:
    q = subgraph.Tensors(index).Quantization()
    if q is None or not q.ScaleLength():
        return ()
    return tuple(q.ScaleAsNumpy().tolist()), tuple(q.ZeroPointAsNumpy().tolist())


def input_quantization(path: Path) -> dict[str, tuple[float, int]]:
    """(scale, zero point) of each integer input quantized per tensor: what its integers stand for, x = scale *
    (q - zero point). edgec's signature keeps only the integer dtype; an image folder needs the rest."""
    sg = _load(Path(path)).Subgraphs(0)
    found = {}
    for i in range(sg.InputsLength()):
        name, _, dtype = _tensor_spec(sg, sg.Inputs(i))
        q = _quantization(sg, sg.Inputs(i))
        if dtype in ("int8", "uint8") and q and len(q[0]) == 1:
            found[name] = (float(q[0][0]), int(q[1][0]))
    return found


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

    from .tflite_convert import EdgecOperatorConverter, integer_form

    mod = from_tflite(model, shape_dict={s.name: s.shape for s in inputs}, dtype_dict={s.name: s.dtype for s in inputs},
                      op_converter=EdgecOperatorConverter)
    # The importer also attaches its weights as a function attribute; they are bound as constants already.
    mod["main"] = mod["main"].without_attr("params")
    return integer_form(mod)


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
                                       {}, states=lambda model: getattr(model, "states", ())))
