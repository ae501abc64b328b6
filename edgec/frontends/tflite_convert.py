"""TVM's TFLite operator converter with edgec's corrections, and the user's custom-operator converters.

Each override fixes a conversion TVM gets wrong on real models; the rest is TVM's converter unchanged.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.relax.frontend.tflite.tflite_frontend import OperatorConverter, get_tensor_name

from ..errors import EdgecError, last_line
from .custom_ops import CUSTOM_SUFFIX, CustomOp, active_converters

# TVM's converter knows this custom code as a builtin-like operator of its own
_TVM_CUSTOM = {b"TFLite_Detection_PostProcess"}


def custom_code(model, op) -> str | None:
    """The custom code of a CUSTOM operator node (None for builtins and for those TVM converts itself)."""
    from tflite.BuiltinOperator import BuiltinOperator

    code = model.OperatorCodes(op.OpcodeIndex())
    if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != BuiltinOperator.CUSTOM:
        return None
    name = code.CustomCode() or b""
    return None if name in _TVM_CUSTOM else name.decode("utf-8", "replace")


def _shape(tensor) -> tuple[int, ...]:
    return tuple(int(d) for d in tensor.tensor.ShapeAsNumpy()) if tensor.tensor.ShapeLength() else ()


def _static_shape(ty) -> tuple | None:
    """A Relax tensor type's shape as ints; None when it is not a tensor of known, static shape."""
    dims = getattr(getattr(ty, "shape", None), "values", None)
    if dims is None or not all(isinstance(d, tvm.ir.prim.expr.IntImm) for d in dims):
        return None
    return tuple(int(d) for d in dims)


# Operators that only move int8/uint8 values (split, slice, transpose, reshape-like, stack, a variable's stored
# value): exact on the integer tensor when the output keeps the input's scale and zero point, which TFLite's
# converter does. TVM refuses them on quantized tensors; edgec runs TVM's converter on the integers, after
# checking the parameters.
_VALUE_PRESERVING = frozenset({"SPLIT", "SPLIT_V", "STRIDED_SLICE", "SLICE", "TRANSPOSE", "SQUEEZE", "EXPAND_DIMS",
                               "PACK", "READ_VARIABLE"})


def _same_quantization(a, b) -> bool:
    if a.qnn_params is None or b.qnn_params is None:
        return a.qnn_params is b.qnn_params
    return all(np.array_equal(a.qnn_params[k].value.numpy(), b.qnn_params[k].value.numpy())
               for k in ("scale", "zero_point"))


class EdgecOperatorConverter(OperatorConverter):
    _SUPPORTED_QUANTIZED_OPS = OperatorConverter._SUPPORTED_QUANTIZED_OPS | _VALUE_PRESERVING

    def __init__(self, model, subgraph, exp_tab, ctx, conversion_state=None):
        super().__init__(model, subgraph, exp_tab, ctx, conversion_state)
        self.custom = active_converters()
        for name in self.custom:
            self.convert_map[name + CUSTOM_SUFFIX] = self.convert_custom
        for name in _VALUE_PRESERVING & set(self.convert_map):
            self.convert_map[name] = self._keeping_quantization(name, self.convert_map[name])

    def _keeping_quantization(self, name, convert):
        def checked(op):
            # the values moved (not the axes, shapes or a variable's handle) and the results
            values = [t for t in self.get_input_tensors(op) if t.qnn_params is not None]
            tensors = [*values, *self.get_output_tensors(op)]
            if values and any(not _same_quantization(tensors[0], t) for t in tensors[1:]):
                out = get_tensor_name(self.subgraph, tensors[-1].tensor_idx)
                raise EdgecError(f"quantized {name} producing {out} changes the scale or zero point, which edgec "
                                 "cannot import yet", "quantize the model with the same parameters on both sides")
            return convert(op)
        return checked

    def get_op_code_str(self, op):
        # TVM raises NotImplementedError for every custom operator; edgec names it so that it can be reported
        # by name, or converted by the user's converter.
        name = custom_code(self.model, op)
        return super().get_op_code_str(op) if name is None else name + CUSTOM_SUFFIX

    def convert_custom(self, op):
        name = custom_code(self.model, op)
        registered = self.custom[name]
        inputs, outputs = self.get_input_tensors(op), self.get_output_tensors(op)
        node = CustomOp(
            name=name,
            inputs=tuple(None if t.tensor_idx < 0 else self.get_tensor_expr(t) for t in inputs),
            input_shapes=tuple(None if t.tensor_idx < 0 else _shape(t) for t in inputs),
            output_shapes=tuple(_shape(t) for t in outputs),
            output_dtypes=tuple(self.get_tensor_type_str(t.tensor.Type()) for t in outputs),
            options=op.CustomOptionsAsNumpy().tobytes() if op.CustomOptionsLength() else b"")
        where = f"the converter of custom operator {name} ({registered.source.name})"
        try:
            result = self.bb.normalize(registered.function(node))
        except EdgecError:
            raise
        except Exception as e:  # the user's code
            raise EdgecError(f"{where} failed: {type(e).__name__}: {last_line(e)}",
                             "fix the converter (edgec --verbose shows the traceback)") from e
        leaves = list(result.ty.fields) if isinstance(result.ty, relax.TupleType) else [result.ty]
        got = [(_static_shape(leaf), str(getattr(leaf, "dtype", leaf))) for leaf in leaves]
        want = list(zip(node.output_shapes, node.output_dtypes))
        if got != want:
            raise EdgecError(f"{where} returned {got}, but the model declares its outputs as {want} (shape, dtype)",
                             "return one Relax tensor per output, with the declared shape and dtype")
        return result

    def convert_read_variable(self, op):
        # A streaming model's state (frontends.tflite._with_state): its view of the main graph hides the first read
        # of each state, whose tensor is a graph input; a later read of the state is that input again.
        first = getattr(self.subgraph, "reads", {}).get(op.Outputs(0))
        if first is None:
            return super().convert_read_variable(op)
        return self.exp_tab.get_expr(get_tensor_name(self.subgraph, first))

    def convert_prelu(self, op):
        # TVM broadcasts alpha to the whole activation and stores that as a weight: a per-channel PReLU then
        # costs H*W times its parameters (the bundle was 5-8x the model). TFLite broadcasts alpha against the
        # input, so alpha keeps its own shape here.
        data, alpha = self.get_input_tensors(op)
        x, a = self.get_tensor_expr(data), self.get_tensor_expr(alpha)
        zero = relax.const(0, self.get_tensor_type_str(data.tensor.Type()))
        return relax.op.where(relax.op.greater_equal(x, zero), x, relax.op.multiply(x, a))

    def convert_dequantize(self, op):
        # A sparse fp16 weight is DENSIFY -> DEQUANTIZE: TVM's DENSIFY leaves the dense value prefetched,
        # and its DEQUANTIZE reads the (empty) buffer of DENSIFY's output instead.
        from tflite.TensorType import TensorType

        source = self.get_input_tensors(op)[0]
        if source.tensor.Type() == TensorType.FLOAT16 and self.is_prefetched(source.tensor_idx):
            value = np.asarray(self.get_prefetched_node(source.tensor_idx), dtype=np.float16)
            dense = self.exp_tab.new_const(value, dtype="float16", source_name=source.tensor.Name())
            return relax.op.astype(dense, "float32")
        return super().convert_dequantize(op)

    def convert_fully_connected(self, op):
        # Without keep_num_dims TFLite flattens the input to [-1, K], so the output is 2-D; TVM's matmul keeps the
        # input's leading dims ([1,1,1,64] -> [1,1,1,units] where the model declares [1,units]).
        out = self.bb.normalize(super().convert_fully_connected(op))
        declared = _shape(self.get_output_tensors(op)[0])
        got = _static_shape(out.ty)
        if got is not None and got != declared and np.prod(got) == np.prod(declared):
            out = relax.op.reshape(out, declared)
        return out

    def convert_expand_dims(self, op):
        # TVM calls relax.op.expand_dims(x, axis, 1), an arity Relax does not have.
        data, axis_tensor = self.get_input_tensors(op)
        name = get_tensor_name(self.subgraph, data.tensor_idx)
        if not self._has_tensor_buffer_data(axis_tensor):
            raise EdgecError(f"EXPAND_DIMS of {name} takes its axis from a computed tensor",
                             "export the model with a constant axis")
        axis = np.asarray(self.get_tensor_value(axis_tensor)).reshape(-1)
        rank = len(data.tensor.ShapeAsNumpy()) if data.tensor.ShapeLength() else 0
        if axis.size != 1 or not -1 - rank <= int(axis[0]) <= rank:
            raise EdgecError(f"EXPAND_DIMS of {name} has axis {axis.tolist()} for a rank-{rank} input",
                             "check the model")
        return relax.op.expand_dims(self.get_tensor_expr(data), int(axis[0]))


# ------------------------------------------------------------------------------------------ full-integer models

# TVM imports a full-integer model as QDQ, but not in the form of edgec.offload.quantized's patterns (those of
# ONNX's QDQ models and of edgec's own quantization), so its int8 layers ran as float ops between dequantize and
# quantize. `integer_form` rewrites the four differences, each exactly, so that conv2d (depthwise included) and
# fully-connected chains reach the backends' int8 primitives:
# - conv2d kernels HWIO / HWOI (depthwise: a reshape after the dequantize) become OIHW, quantized along axis 0;
# - a fully-connected weight's transpose is folded into the int8 constant;
# - the fused activation, clip(quantize(y), lo, hi) on the integers, becomes quantize(clip(y, (lo - zp) * s,
#   (hi - zp) * s)): quantize is monotonic and maps those (whole) bounds to lo and hi exactly;
# - zero points take the 8-bit type of their tensor (the backends read them as u8 / s8).
# Rounding then differs from LiteRT in the integer kernels only: LiteRT's builtin kernels multiply the int32
# accumulator by a 31-bit fixed-point multiplier (round half up, then a rounding shift, half away from zero);
# oneDNN, XNNPACK and LiteRT's default XNNPACK delegate scale it in fp32 (round half to even). Each is within about
# 2^-22 relative of the exact result, so an output differs by one quantization step at most, and only where the
# exact value lies at (or within ~1e-5 of) a half step. (On tests/test_tflite_int8.py's CNN LiteRT's two forms
# disagree on 131 of 24,252 outputs; edgec's oneDNN bundle and LiteRT's default on 1.)

def _constant(expr) -> np.ndarray | None:
    return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


@relax.expr_functor.mutator
class _IntegerForm(relax.PyExprMutator):
    def visit_call_(self, call):
        call = super().visit_call_(call)
        name = call.op.name if isinstance(call.op, tvm.ir.Op) else None
        if name == "relax.dequantize":
            return self._narrow_zero_point(self._fold_weight_transpose(call), call.args[0].ty.dtype)
        if name == "relax.quantize":
            return self._narrow_zero_point(call, call.attrs.out_dtype)
        if name == "relax.clip":
            return self._clip_before_quantize(call)
        if name == "relax.nn.conv2d" and call.attrs.kernel_layout != "OIHW":
            return self._oihw_kernel(call)
        return call

    def _producer(self, expr, op: str) -> relax.Call | None:
        value = self.lookup_binding(expr) if isinstance(expr, relax.Var) else expr
        return value if isinstance(value, relax.Call) and value.op == tvm.ir.Op.get(op) else None

    @staticmethod
    def _narrow_zero_point(call, dtype) -> relax.Call:
        dtype, zero_point = str(dtype), _constant(call.args[2])
        if dtype not in ("int8", "uint8") or zero_point is None or zero_point.dtype == dtype:
            return call
        info = np.iinfo(dtype)
        if zero_point.min() < info.min or zero_point.max() > info.max:
            return call
        args = [*call.args[:2], relax.const(zero_point.astype(dtype), dtype)]
        return relax.Call(call.op, args, call.attrs)

    def _fold_weight_transpose(self, call) -> relax.Call:
        transpose = self._producer(call.args[0], "relax.permute_dims")
        weights = None if transpose is None else _constant(transpose.args[0])
        if weights is None:
            return call
        axes = None if transpose.attrs.axes is None else [int(a) for a in transpose.attrs.axes]
        folded = relax.const(np.ascontiguousarray(np.transpose(weights, axes)), str(weights.dtype))
        return relax.Call(call.op, [folded, *call.args[1:]], call.attrs)

    def _clip_before_quantize(self, clip) -> relax.Call:
        quantize = self._producer(clip.args[0], "relax.quantize")
        scale, zero_point = (None, None) if quantize is None else map(_constant, quantize.args[1:])
        if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
            return clip
        bounds = [float(b.value) for b in clip.args[1:]]
        # the integer clip casts a fractional bound toward 0, the quantize rounds it: only whole bounds map exactly
        if not all(b.is_integer() for b in bounds):
            return clip
        s, zp = float(scale.reshape(())), int(zero_point.reshape(()))
        lo, hi = ((b - zp) * s for b in bounds)
        return relax.Call(quantize.op, [relax.op.clip(quantize.args[0], lo, hi), *quantize.args[1:]], quantize.attrs)

    def _oihw_kernel(self, conv) -> relax.Call:
        """conv2d with its int8 kernel stored OIHW, per output channel (or per tensor); else unchanged."""
        kernel = conv.args[1]
        reshape = self._producer(kernel, "relax.reshape")
        dequantize = self._producer(reshape.args[0] if reshape is not None else kernel, "relax.dequantize")
        weights, scale, zero_point = (None,) * 3 if dequantize is None else map(_constant, dequantize.args)
        shape = _static_shape(kernel.ty)
        if weights is None or weights.dtype != np.int8 or scale is None or zero_point is None or zero_point.any() \
                or shape is None:
            return conv
        axis = int(dequantize.attrs.axis) % weights.ndim
        # each weight's scale, moved with it into OIHW: it must then depend on O alone
        along = [-1 if i == axis else 1 for i in range(weights.ndim)] if scale.size > 1 else [1] * weights.ndim
        order = [str(conv.attrs.kernel_layout).index(c) for c in "OIHW"]
        scales = np.transpose(np.broadcast_to(scale.reshape(along), weights.shape).reshape(shape), order)
        per_output = scales[:, :1, :1, :1]
        if not np.array_equal(scales, np.broadcast_to(per_output, scales.shape)):
            return conv
        scale = per_output.reshape(-1) if scale.size > 1 else scale
        oihw = np.ascontiguousarray(np.transpose(weights.reshape(shape), order))
        dequantized = self.builder_.emit(relax.op.dequantize(
            relax.const(oihw, "int8"), relax.const(scale, str(scale.dtype)),
            relax.const(np.zeros(scale.shape, np.int8), "int8"), axis=0, out_dtype=str(dequantize.attrs.out_dtype)))
        a = conv.attrs
        return relax.op.nn.conv2d(conv.args[0], dequantized, a.strides, a.padding, a.dilation, int(a.groups),
                                  a.data_layout, "OIHW", a.out_layout, a.out_dtype)


def integer_form(mod: tvm.IRModule) -> tvm.IRModule:
    """A full-integer model's QDQ graph in the form the backends' int8 patterns take (see above)."""
    mutator = _IntegerForm(mod)
    mod = mod.clone()
    mod["main"] = mutator.visit_expr(mod["main"])
    return relax.transform.DeadCodeElimination(["main"])(mod)
