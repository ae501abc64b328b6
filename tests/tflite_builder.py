"""Small TFLite models written with LiteRT's own flatbuffer schema (ai_edge_litert.schema_py_generated), for the
converter corrections no real model in the test wheels exercises."""
from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema

_TYPES = {np.dtype(np.float32): schema.TensorType.FLOAT32, np.dtype(np.int32): schema.TensorType.INT32,
          np.dtype(np.int8): schema.TensorType.INT8, np.dtype(np.uint8): schema.TensorType.UINT8,
          np.dtype(np.float16): schema.TensorType.FLOAT16}


class Graph:
    """One subgraph: tensors (constant ones carry their data) and operators, in execution order."""

    def __init__(self):
        self.model = schema.ModelT()
        self.model.version = 3
        self.model.buffers = [schema.BufferT()]        # buffer 0: the empty one every activation points at
        self.model.operatorCodes, self.sg = [], schema.SubGraphT()
        self.sg.tensors, self.sg.operators = [], []

    def tensor(self, name: str, shape, dtype=np.float32, data: np.ndarray | None = None, quant=None) -> int:
        t = schema.TensorT()
        t.name, t.shape, t.type = name, list(shape), _TYPES[np.dtype(dtype)]
        t.buffer = 0
        if data is not None:
            buf = schema.BufferT()
            buf.data = np.frombuffer(np.ascontiguousarray(data, dtype).tobytes(), np.uint8)
            self.model.buffers.append(buf)
            t.buffer = len(self.model.buffers) - 1
        if quant is not None:                          # (scales, zero points, axis)
            q = schema.QuantizationParametersT()
            q.scale, q.zeroPoint, q.quantizedDimension = list(quant[0]), list(quant[1]), quant[2]
            t.quantization = q
        self.sg.tensors.append(t)
        return len(self.sg.tensors) - 1

    def op(self, builtin: int, inputs, outputs, options_type: int = 0, options=None, custom: tuple[str, bytes] | None
           = None) -> None:
        """An operator node; `custom`: (custom code, custom options) of a CUSTOM operator."""
        key = (builtin, custom[0].encode() if custom else None)
        codes = [(c.builtinCode, c.customCode) for c in self.model.operatorCodes]
        if key not in codes:
            code = schema.OperatorCodeT()
            code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
            code.customCode = key[1]
            self.model.operatorCodes.append(code)
            codes.append(key)
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = codes.index(key), list(inputs), list(outputs)
        o.builtinOptionsType, o.builtinOptions = options_type, options
        if custom:
            o.customOptions = list(custom[1])
        self.sg.operators.append(o)

    def save(self, path: Path, inputs, outputs) -> Path:
        self.sg.inputs, self.sg.outputs = list(inputs), list(outputs)
        self.model.subgraphs = [self.sg]
        b = flatbuffers.Builder(1024)
        b.Finish(self.model.Pack(b), file_identifier=b"TFL3")
        path.write_bytes(bytes(b.Output()))
        return path
