"""ONNX QOperator models (onnxruntime.quantization's QuantFormat.QOperator and quantize_dynamic) in edgec's QDQ form.

Each QLinear operator becomes the float operator between `dequantize` of its 8-bit inputs and `quantize` of its
output — the form TVM's importer gives a QDQ model and edgec's own int8 quantization emits, which the offload's
integer patterns take (edgec/offload/quantized.py): int8 weights stay constants behind a per-channel dequantize,
the int32 bias is `dequantize(bias, s_x * s_w)`, and the tensors between operators stay 8-bit. The float operator
between them computes what the integer kernel's int32 accumulator holds, times the input scales, so the result is
within one quantization step of onnxruntime's integer kernels.

ConvInteger (as MatMulInteger, whose TVM converter edgec keeps) computes in int32, as ONNX defines it: its operands'
scales come from DynamicQuantizeLinear at run time, so there is no constant-scale chain for an integer kernel to
take, and int32 is exact where a float accumulation of integer products may not be.
"""
from __future__ import annotations

import itertools

import numpy as np

from . import onnx_ops

# op_type -> the domain onnxruntime emits it in; what edgec converts here (the Q/DQ ops, DynamicQuantizeLinear and
# MatMulInteger are TVM's own converters).
QUANT_OPS = {"QLinearConv": "", "QLinearMatMul": "", "ConvInteger": "", "QGemm": "com.microsoft",
             "QLinearAdd": "com.microsoft", "QLinearMul": "com.microsoft",
             "QLinearGlobalAveragePool": "com.microsoft", "QLinearConcat": "com.microsoft"}

# The axis a per-tensor (de)quantize names: TVM's QuantizeLinear/DequantizeLinear default, so that the pairs on one
# tensor are the same expression whichever operator made them (CSE merges them, the offload patterns match them).
_PER_TENSOR_AXIS = 1
_CONV_ATTRS = ("auto_pad", "dilations", "group", "kernel_shape", "pads", "strides")


def converts(node) -> bool:
    """Whether a node is one this module converts (its op in the domain onnxruntime puts it in)."""
    domain = QUANT_OPS.get(node.op_type)
    return domain is not None and (node.domain or "") in ({"", "ai.onnx"} if domain == "" else {domain})


def quant_converters() -> dict:
    """op_type -> converter class, for onnx_semantics.from_onnx."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    def refuse(op: str, attr: dict, why: str):
        onnx_ops.refuse(op, attr, why, "quantize the model with onnxruntime.quantization's defaults, or export it "
                        "in QDQ form (QuantFormat.QDQ)")

    def check_attrs(op: str, attr: dict, known: tuple[str, ...]):
        unknown = sorted(k for k in attr if k not in known and k != "tvm_custom")
        if unknown:
            refuse(op, attr, f"has attribute {unknown[0]!r}")

    def numpy_of(expr):
        return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None

    def per_tensor_axis(x) -> int:
        return _PER_TENSOR_AXIS if len(x.ty.shape) > _PER_TENSOR_AXIS else 0

    def per_tensor(scale) -> bool:
        return len(scale.ty.shape) == 0 or int(np.prod([int(d) for d in scale.ty.shape])) == 1

    def dequantize(op, attr, x, scale, zero_point, axis: int | None):
        """x in float; a scale (and zero point) of more than one element runs along `axis` of x (None: the operator
        takes a per-tensor scale only)."""
        if not per_tensor(scale):
            if axis is None:
                refuse(op, attr, "has a per-channel scale")
            if len(scale.ty.shape) != 1 or int(scale.ty.shape[0]) != int(x.ty.shape[axis]):
                refuse(op, attr, f"has a scale of shape {[int(d) for d in scale.ty.shape]} for an input of shape "
                                 f"{[int(d) for d in x.ty.shape]}")
        else:
            axis = per_tensor_axis(x)
            if len(scale.ty.shape):
                scale = relax.op.reshape(scale, ())
                zero_point = None if zero_point is None else relax.op.reshape(zero_point, ())
        if zero_point is None:
            zero_point = relax.const(np.zeros(() if per_tensor(scale) else int(scale.ty.shape[0]), str(x.ty.dtype)))
        return relax.op.dequantize(x, scale, zero_point, axis=axis % max(len(x.ty.shape), 1), out_dtype="float32")

    def quantize(y, scale, zero_point):
        """The per-tensor output: uint8 without a zero point, as ONNX's QuantizeLinear."""
        dtype = "uint8" if zero_point is None else str(zero_point.ty.dtype)
        zero_point = relax.const(0, dtype) if zero_point is None else zero_point
        if len(scale.ty.shape):
            scale, zero_point = relax.op.reshape(scale, ()), relax.op.reshape(zero_point, ())
        return relax.op.quantize(y, scale, zero_point, axis=per_tensor_axis(y), out_dtype=dtype)

    def bias(bb, op, attr, b, sx, sw, axis):
        """An int32 bias at scale s_x * s_w (per channel for per-channel weights), zero point 0: a constant scale
        where both are, as onnxruntime stores them."""
        if str(b.ty.dtype) != "int32":
            refuse(op, attr, f"has a {b.ty.dtype} bias (int32 expected)")
        if not per_tensor(sx):
            refuse(op, attr, "has a per-channel input scale")
        a, w = numpy_of(sx), numpy_of(sw)
        if a is not None and w is not None:
            scale = relax.const(a.astype(np.float32).reshape(()) * w.astype(np.float32))
        else:
            scale = bb.normalize(relax.op.multiply(relax.op.reshape(sx, ()), sw))
        return dequantize(op, attr, b, scale, None, axis)

    class QLinearConv(tvm_onnx.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            check_attrs("QLinearConv", attr, _CONV_ATTRS)
            x, sx, zx, w, sw, zw, sy, zy, b = (inputs[i] for i in range(9))
            xf = bb.normalize(dequantize("QLinearConv", attr, x, sx, zx, 1))
            wf = bb.normalize(dequantize("QLinearConv", attr, w, sw, zw, 0))
            bf = None if b is None else bb.normalize(bias(bb, "QLinearConv", attr, b, sx, sw, 0))
            y = bb.normalize(tvm_onnx.Conv._impl_v11(bb, [xf, wf, bf], dict(attr), params))
            return quantize(y, sy, zy)

    class QLinearMatMul(tvm_onnx.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            check_attrs("QLinearMatMul", attr, ())
            a, sa, za, b, sb, zb, sy, zy = (inputs[i] for i in range(8))
            af = dequantize("QLinearMatMul", attr, a, sa, za, -2)      # per row of A, per column of B
            bf = dequantize("QLinearMatMul", attr, b, sb, zb, -1)
            return quantize(bb.normalize(relax.op.matmul(af, bf)), sy, zy)

    class QGemm(tvm_onnx.OnnxOpConverter):
        """com.microsoft.QGemm: alpha * A' B' + C (int32 at scale s_a * s_b), quantized when y_scale is given, else
        float."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            check_attrs("QGemm", attr, ("alpha", "transA", "transB"))
            if attr.get("alpha", 1.0) != 1.0:
                refuse("QGemm", attr, f"has alpha={attr['alpha']}")
            a, sa, za, b, sb, zb, c, sy, zy = (inputs[i] for i in range(9))
            if not per_tensor(sa):
                refuse("QGemm", attr, "has a per-row a_scale")
            af = dequantize("QGemm", attr, a, sa, za, 0)
            trans_b = attr.get("transB", 0)
            bf = dequantize("QGemm", attr, b, sb, zb, 0 if trans_b else 1)
            if attr.get("transA", 0):
                af = relax.op.permute_dims(af, [1, 0])
            if trans_b:
                bf = relax.op.permute_dims(bf, [1, 0])
            y = bb.normalize(relax.op.matmul(af, bf))
            if c is not None:
                y = bb.normalize(relax.op.add(y, bias(bb, "QGemm", attr, c, sa, sb, -1)))
            return y if sy is None else quantize(y, sy, zy)

    def elementwise(op: str, compute):
        class Converter(tvm_onnx.OnnxOpConverter):
            @classmethod
            def _impl_v1(cls, bb, inputs, attr, params):
                check_attrs(op, attr, ())
                a, sa, za, b, sb, zb, sy, zy = (inputs[i] for i in range(8))
                y = compute(dequantize(op, attr, a, sa, za, None), dequantize(op, attr, b, sb, zb, None))
                return quantize(bb.normalize(y), sy, zy)

        Converter.__name__ = op
        return Converter

    class QLinearGlobalAveragePool(tvm_onnx.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            check_attrs("QLinearGlobalAveragePool", attr, ("channels_last",))
            x, sx, zx, sy, zy = (inputs[i] for i in range(5))
            rank = len(x.ty.shape)
            axes = list(range(1, rank - 1)) if attr.get("channels_last", 0) else list(range(2, rank))
            xf = dequantize("QLinearGlobalAveragePool", attr, x, sx, zx, None)
            return quantize(bb.normalize(relax.op.mean(xf, axes, keepdims=True)), sy, zy)

    class QLinearConcat(tvm_onnx.OnnxOpConverter):
        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            check_attrs("QLinearConcat", attr, ("axis",))
            sy, zy, rest = inputs[0], inputs[1], list(inputs[2:])
            if len(rest) % 3 or not rest:
                refuse("QLinearConcat", attr, f"has {len(inputs)} inputs (y_scale, y_zero_point, then triples)")
            parts = [dequantize("QLinearConcat", attr, *rest[i:i + 3], None) for i in range(0, len(rest), 3)]
            return quantize(bb.normalize(relax.op.concat(parts, axis=attr["axis"])), sy, zy)

    class ConvInteger(tvm_onnx.OnnxOpConverter):
        """int32 convolution of (x - x_zero_point) and (w - w_zero_point), the zero point per output channel
        or per tensor."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            check_attrs("ConvInteger", attr, _CONV_ATTRS)
            x, w, zx, zw = (inputs[i] for i in range(4))

            def centred(t, zero_point, channel_shape):
                t = relax.op.astype(t, "int32")
                if zero_point is None:
                    return bb.normalize(t)
                zero_point = bb.normalize(relax.op.astype(zero_point, "int32"))
                if not per_tensor(zero_point):
                    zero_point = relax.op.reshape(zero_point, channel_shape)
                elif len(zero_point.ty.shape):
                    zero_point = relax.op.reshape(zero_point, ())
                return bb.normalize(relax.op.subtract(t, zero_point))

            if zx is not None and not per_tensor(zx):
                refuse("ConvInteger", attr, "has a per-channel x_zero_point")
            rank = len(w.ty.shape)
            xi = centred(x, zx, None)
            wi = centred(w, zw, [-1] + [1] * (rank - 1))
            return tvm_onnx.Conv._impl_v11(bb, [xi, wi, None], dict(attr), params)

    return {c.__name__: c for c in (QLinearConv, QLinearMatMul, QGemm, QLinearGlobalAveragePool, QLinearConcat,
                                    ConvInteger, elementwise("QLinearAdd", relax.op.add),
                                    elementwise("QLinearMul", relax.op.multiply))}


# Operators that only move or select values, which onnxruntime's QOperator quantizer leaves on 8-bit tensors: in the
# QDQ form each stands between a dequantize and a quantize with its input's parameters, as its QDQ quantizer writes it.
_MOVES = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"}
# the float operator each QLinear one computes between its dequantized inputs and its quantized output
_FLOAT_OP = {"QLinearConv": "Conv", "QLinearMatMul": "MatMul", "QGemm": "Gemm", "QLinearAdd": "Add",
             "QLinearMul": "Mul", "QLinearGlobalAveragePool": "GlobalAveragePool", "QLinearConcat": "Concat"}


def has_qlinear_nodes(graph) -> bool:
    """Whether an ONNX graph has QOperator nodes qdq_form rewrites (a static QOperator model's)."""
    return any(n.op_type in _FLOAT_OP and converts(n) for n in graph.node)


def qdq_form(model):
    """`model` (an onnx.ModelProto, changed in place) with each QOperator node as the float operator between
    DequantizeLinear of its inputs and QuantizeLinear of its output, as quant_converters import it (the int32 bias
    at s_x * s_w, per-channel weights on their output-channel axis), and each operator that moves 8-bit values
    between a dequantize and a quantize with its input's parameters: onnxruntime runs it with graph optimizations
    off as the QDQ math says, the reference reference.QuantizedRule needs. None when a node is one this form cannot
    state: a scale or zero point that is not a constant, a per-channel one before opset 13 (DequantizeLinear's
    axis), channels-last pooling, QGemm's alpha."""
    from onnx import helper, numpy_helper

    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    nodes, quantized = [], {}      # quantized: an 8-bit tensor's (scale, zero point) names, for _MOVES

    class NoQdqForm(Exception):
        pass

    names = (f"edgec_qdq_{k}" for k in itertools.count())

    def fresh() -> str:
        return next(names)

    def dequantize(x: str, scale: str, zero_point: str, axis: int) -> str:
        """x in float; `axis`: where a scale of more than one element runs."""
        if scale not in constants or (zero_point and zero_point not in constants):
            raise NoQdqForm
        per_channel = constants[scale].size > 1
        if per_channel and opset < 13:
            raise NoQdqForm
        y = fresh()
        nodes.append(helper.make_node("DequantizeLinear", [x, scale] + ([zero_point] if zero_point else []), [y],
                                      **({"axis": axis} if per_channel else {})))
        return y

    def quantize(y: str, scale: str, zero_point: str, out: str):
        nodes.append(helper.make_node("QuantizeLinear", [y, scale] + ([zero_point] if zero_point else []), [out]))
        quantized[out] = (scale, zero_point)

    def bias(b: str, sx: str, sw: str, axis: int) -> str:
        """b (int32 at s_x * s_w) in float; `axis`: b's output-channel axis (QGemm's C may be 2-D, [M, N])."""
        if not b:
            return ""
        if sx not in constants or sw not in constants:
            raise NoQdqForm
        name = fresh()
        constants[name] = constants[sx].astype(np.float32).reshape(()) * constants[sw].astype(np.float32)
        graph.initializer.append(numpy_helper.from_array(constants[name], name))
        return dequantize(b, name, "", axis)

    def rewrite(node):
        op, i = node.op_type, list(node.input) + [""] * 9
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if op == "QLinearConv":
            inputs = [dequantize(i[0], i[1], i[2], 1), dequantize(i[3], i[4], i[5], 0), bias(i[8], i[1], i[4], 0)]
            out = (i[6], i[7])
        elif op == "QLinearMatMul":
            inputs, out = [dequantize(i[0], i[1], i[2], -2), dequantize(i[3], i[4], i[5], -1)], (i[6], i[7])
        elif op == "QGemm":
            if attrs.pop("alpha", 1.0) != 1.0:
                raise NoQdqForm
            inputs = [dequantize(i[0], i[1], i[2], 0), dequantize(i[3], i[4], i[5], 0 if attrs.get("transB") else 1),
                      bias(i[6], i[1], i[4], -1)]
            out = (i[7], i[8])
        elif op in ("QLinearAdd", "QLinearMul"):
            inputs, out = [dequantize(i[0], i[1], i[2], 0), dequantize(i[3], i[4], i[5], 0)], (i[6], i[7])
        elif op == "QLinearGlobalAveragePool":
            if attrs.pop("channels_last", 0):
                raise NoQdqForm
            inputs, out = [dequantize(i[0], i[1], i[2], 0)], (i[3], i[4])
        else:   # QLinearConcat: y_scale, y_zero_point, then (x, scale, zero point) triples
            inputs = [dequantize(*node.input[k:k + 3], 0) for k in range(2, len(node.input), 3)]
            out = (i[0], i[1])
        y = node.output[0] if not out[0] else fresh()
        while not inputs[-1]:       # an absent bias
            inputs.pop()
        nodes.append(helper.make_node(_FLOAT_OP[op], inputs, [y], **attrs))
        if out[0]:
            quantize(y, *out, node.output[0])

    try:
        for node in graph.node:
            if node.op_type in _FLOAT_OP and converts(node):
                rewrite(node)
            elif node.op_type in _MOVES and node.input[0] in quantized and len(node.output) == 1:
                scale, zero_point = quantized[node.input[0]]
                moved = helper.make_node(node.op_type, [dequantize(node.input[0], scale, zero_point, 0),
                                                        *node.input[1:]], [fresh()], **{
                    a.name: helper.get_attribute_value(a) for a in node.attribute})
                nodes.append(moved)
                quantize(moved.output[0], scale, zero_point, node.output[0])
            else:
                nodes.append(node)
                if node.op_type == "QuantizeLinear":
                    quantized[node.output[0]] = (node.input[1], node.input[2] if len(node.input) > 2 else "")
    except NoQdqForm:
        return None
    del graph.node[:]
    graph.node.extend(nodes)
    return model
