"""Folding: batch-norm and affines into the preceding convolution, then every all-constant subexpression."""
import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, rewrite_call, wildcard

from ..offload.fusion import static_shape
from .ir import op_name, readers
from .registry import register_pass


def _batchnorm_after_conv():
    """Pattern: batch_norm(conv2d(x, W) [+ b], gamma, beta, mean, var)[0], all parameters constant.

    The ONNX importer adds a conv's bias as reshape(b, [1, C, 1, 1]), so the bias may sit behind a reshape.
    """
    x, weight, bias = wildcard(), is_const(), is_const()
    conv = is_op("relax.nn.conv2d")(x, weight)
    producer = conv | is_op("relax.add")(conv, bias | is_op("relax.reshape")(bias, wildcard()))
    stats = [is_const() for _ in range(4)]
    bn = is_op("relax.nn.batch_norm")(producer, *stats)
    return is_tuple_get_item(bn, 0), x, weight, bias, conv, bn, stats


@tvm.transform.module_pass(opt_level=0, name="FoldBatchnormIntoConv")
def _fold_batchnorm(mod, ctx):
    pattern, x, weight, bias, conv, bn, stats = _batchnorm_after_conv()

    def rewrite(expr, m):
        attrs = m[conv].attrs
        if attrs.data_layout != "NCHW" or attrs.kernel_layout != "OIHW" or int(m[bn].attrs.axis) != 1:
            return expr
        # Folded in float64 so the result is as exact as float32 allows; the new weights are constants
        # already, so nothing is left for FoldConstant to evaluate.
        gamma, beta, mean, var = (m[s].value.numpy().astype(np.float64) for s in stats)
        scale = gamma / np.sqrt(var + float(m[bn].attrs.epsilon))
        w = m[weight].value.numpy()
        b = m[bias].value.numpy().reshape(-1).astype(np.float64) if bias in m else 0.0
        new_w = (w.astype(np.float64) * scale.reshape(-1, 1, 1, 1)).astype(w.dtype)
        new_b = ((b - mean) * scale + beta).astype(w.dtype).reshape(1, -1, 1, 1)
        folded = relax.op.nn.conv2d(m[x], relax.const(new_w), attrs.strides, attrs.padding, attrs.dilation,
                                    attrs.groups, attrs.data_layout, attrs.kernel_layout, attrs.out_layout,
                                    attrs.out_dtype)
        return relax.op.add(folded, relax.const(new_b))

    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewrite_call(pattern, rewrite, func)
    return mod


def _per_channel(value: np.ndarray | None, channels: int) -> np.ndarray | None:
    """A float32 constant that broadcasts over an NCHW output per channel (one value, or C along axis 1), as [C]
    float64; None for any other."""
    if value is None or value.dtype != np.float32 or value.ndim > 4:
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(-1)[0]))
    shape = (1,) * (4 - value.ndim) + value.shape
    return value.reshape(-1).astype(np.float64) if shape == (1, channels, 1, 1) else None


def _operands(call: relax.Call) -> tuple[relax.Expr, relax.Expr]:
    """(the variable operand, the other) of a binary call."""
    a, b = call.args
    return (a, b) if isinstance(a, relax.Var) else (b, a)


def _affine_into_conv(func: relax.Function) -> relax.Function:
    """func with each conv2d (NCHW/OIHW, constant weights) [+ bias] * m [+ a] (m, a constants per channel or
    scalars: PP-LCNetV3's learnable affine blocks, a batch norm decomposed) computed as one conv2d + bias, its
    weights times m and its bias b * m + a; each value on the way read by the next alone."""
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    read_by = readers(func)

    def op(var) -> str | None:
        return op_name(values.get(var))

    def only_reader(var, reader) -> bool:
        return read_by.get(var) == [reader]

    def constant(expr) -> np.ndarray | None:
        """A constant's value, also behind a reshape (the ONNX importer's bias: reshape(b, [1, C, 1, 1]))."""
        if op(expr) == "relax.reshape" and static_shape(expr) is not None:
            shape, expr = static_shape(expr), values[expr].args[0]
            return constant(expr).reshape(shape) if isinstance(expr, tvm.ir.expr.Constant) else None
        return expr.value.numpy() if isinstance(expr, tvm.ir.expr.Constant) else None

    folded: dict[relax.Var, relax.Expr] = {}
    for var, value in values.items():
        if op(var) != "relax.multiply":
            continue
        x, m = _operands(value)
        bias, conv = None, x
        if op(x) == "relax.add" and only_reader(x, var):
            conv, bias = _operands(values[x])
        call = values.get(conv)
        if op(conv) != "relax.nn.conv2d" or not only_reader(conv, x if bias is not None else var) \
                or (call.attrs.data_layout, call.attrs.kernel_layout, call.attrs.out_layout or "NCHW") \
                != ("NCHW", "OIHW", "NCHW") or not isinstance(call.args[1], tvm.ir.expr.Constant) \
                or (static_shape(call) or ()) == ():
            continue
        channels = static_shape(call)[1]
        scale = _per_channel(constant(m), channels)
        b = np.zeros(channels) if bias is None else _per_channel(constant(bias), channels)
        if scale is None or b is None:
            continue
        last, shift = var, np.zeros(channels)
        after = read_by.get(var, [])
        if len(after) == 1 and op(after[0]) == "relax.add":
            other = _per_channel(constant(_operands(values[after[0]])[1]), channels)
            if other is not None:
                last, shift = after[0], other
        w = call.args[1].value.numpy()
        weights = (w.astype(np.float64) * scale.reshape(-1, 1, 1, 1)).astype(w.dtype)
        new_bias = (b * scale + shift).astype(w.dtype).reshape(1, -1, 1, 1)
        a = call.attrs
        folded[last] = (relax.op.nn.conv2d(call.args[0], relax.const(weights), a.strides, a.padding, a.dilation,
                                           a.groups, a.data_layout, a.kernel_layout, a.out_layout, a.out_dtype),
                        relax.const(new_bias))
    if not folded:
        return func

    @relax.expr_functor.mutator
    class Fold(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            if binding.var not in folded:
                return super().visit_var_binding_(binding)
            conv, bias = folded[binding.var]
            new = self.builder_.emit(self.visit_expr(conv))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(
                relax.op.add(new, bias))))

    return Fold().visit_expr(func)


@tvm.transform.module_pass(opt_level=0, name="FoldAffineIntoConv")
def _fold_affine(mod, ctx):
    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            mod[gv] = _affine_into_conv(func)
    return relax.transform.DeadCodeElimination()(mod)


@register_pass("fold-batchnorm", phase="graph")
def fold_batchnorm(ctx):
    """Fold inference batch-norm, then affines (x * m + a), after a conv2d into its weights and bias.

    With or without the conv's bias; m and a per channel or scalars: a learnable affine block, a decomposed batch
    norm."""
    return tvm.transform.Sequential([_fold_batchnorm, _fold_affine], name="FoldBatchnorm")


def _static(expr) -> tuple[tuple[int, ...], str] | None:
    """(shape, dtype) of a tensor with a static shape and a dtype numpy has; else None."""
    shape = static_shape(expr)
    if shape is None:
        return None
    try:
        np.dtype(str(expr.ty.dtype))
    except TypeError:           # bfloat16, float8, int4: numpy has no such dtype
        return None
    return tuple(shape), str(expr.ty.dtype)


def _astype(call, x):
    dtype = np.dtype(str(call.attrs.dtype))
    if x.dtype.kind == "f" and dtype.kind in "iu":
        # C's float-to-int conversion is undefined out of range: only TVM's own kernel says what it gives
        info = np.iinfo(dtype)
        if not (np.isfinite(x).all() and (x > info.min - 1).all() and (x < info.max + 1).all()):
            return None
    return x.astype(dtype)


def _arithmetic(ufunc, *, float_only=False):
    def evaluate(call, a, b):
        # integer division rounds differently in numpy (floor) and C (toward zero)
        if a.dtype != b.dtype or (float_only and a.dtype.kind != "f"):
            return None
        with np.errstate(all="ignore"):     # IEEE results (inf, NaN) and integer wrap-around, as TVM's kernels
            return np.asarray(ufunc(a, b))
    return evaluate


def _dequantize(call, x, scale, zero_point):
    """LegalizeOps' formula: float32(int32(x) - zero point) * scale, per channel along `axis`."""
    axis = int(call.attrs.axis) % max(x.ndim, 1)
    if str(call.attrs.out_dtype) != "float32" or x.dtype.kind not in "iu" or zero_point.dtype.kind not in "iu" \
            or any(q.size not in (1, x.shape[axis] if x.ndim else 1) for q in (scale, zero_point)):
        return None
    per_channel = [1] * x.ndim
    if x.ndim:
        per_channel[axis] = -1

    def along_axis(q):
        return q.reshape(()) if q.size == 1 else q.reshape(per_channel)

    diff = x.astype(np.int32) - along_axis(zero_point).astype(np.int32)
    return diff.astype(np.float32) * along_axis(scale).astype(np.float32)


# Ops evaluated in numpy, exactly as TVM's kernels compute them (layout changes, casts, one IEEE operation per
# element); each returns None where it cannot promise that, and TVM's FoldConstant folds that call instead.
_NUMPY_FOLD = {
    "relax.permute_dims": lambda call, x: x.transpose(None if call.attrs.axes is None
                                                       else [int(a) for a in call.attrs.axes]),
    "relax.reshape": lambda call, x, shape: x.reshape(_static(call)[0]),
    "relax.expand_dims": lambda call, x: x.reshape(_static(call)[0]),
    "relax.squeeze": lambda call, x: x.reshape(_static(call)[0]),
    "relax.astype": _astype,
    "relax.add": _arithmetic(np.add),
    "relax.subtract": _arithmetic(np.subtract),
    "relax.multiply": _arithmetic(np.multiply),
    "relax.divide": _arithmetic(np.divide, float_only=True),
    "relax.dequantize": _dequantize,
}


# Module attribute: the per-channel scales of the int8 weights a fold dequantized (a float layer of an int8 graph,
# say the classifier whose output stays float). store-weights-int8 stores each such weight as int8 again, with its
# scale, and dequantizes it at load: without it, a float32 copy four times the size went to params.bin.
DEQUANTIZED_SCALES_ATTR = "edgec.dequantized_weight_scales"


def _weight_scale(call, x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray | None:
    """The float32 scales of a dequantize of an int8 weight (zero point 0, at least MIN_LIFTED_ELEMENTS elements,
    a scale per slice along its axis); None for any other dequantize."""
    from .params import MIN_LIFTED_ELEMENTS

    if (x.dtype != np.int8 or x.size < MIN_LIFTED_ELEMENTS or zero_point.any() or scale.dtype != np.float32
            or x.ndim == 0 or scale.size != x.shape[int(call.attrs.axis) % x.ndim]):
        return None
    return scale.reshape(-1)


@relax.expr_functor.mutator
class _NumpyFolder(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.folded = 0
        self.weight_scales: list[np.ndarray] = []

    def _value(self, arg) -> np.ndarray | None:
        if isinstance(arg, relax.Var):
            arg = self.lookup_binding(arg)
        if isinstance(arg, tvm.ir.expr.Constant):
            return arg.value.numpy()
        if isinstance(arg, relax.ShapeExpr):    # reshape's target: read from the call's type
            return np.empty(0)
        return None

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        evaluate = _NUMPY_FOLD.get(getattr(call.op, "name", None))
        expected = _static(call)
        if evaluate is None or expected is None:
            return call
        args = [self._value(a) for a in call.args]
        if any(a is None for a in args):
            return call
        result = evaluate(call, *args)
        # the numpy result must be what the call's type says; anything else is left to TVM
        if result is None or (result.shape, str(result.dtype)) != expected:
            return call
        self.folded += 1
        if call.op.name == "relax.dequantize" and (scale := _weight_scale(call, *args)) is not None:
            self.weight_scales.append(scale)
        return relax.const(np.ascontiguousarray(result), expected[1])


@tvm.transform.module_pass(opt_level=0, name="NumpyFoldConstant")
def _numpy_fold(mod, ctx):
    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    scales = list(mod.attrs[DEQUANTIZED_SCALES_ATTR]) if mod.attrs and DEQUANTIZED_SCALES_ATTR in mod.attrs else []
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            folder = _NumpyFolder(mod)
            new = folder.visit_expr(func)
            if folder.folded:
                mod[gv] = new
            scales += [tvm.runtime.tensor(s) for s in folder.weight_scales]
    return mod.with_attr(DEQUANTIZED_SCALES_ATTR, scales) if scales else mod


@register_pass("fold-constants", phase="graph", after=("canonicalize", "offload-quantized", "int8-kernels"),
               tvm_name="FoldConstant")
def fold_constants(ctx):
    """Evaluate subexpressions whose inputs are all constants (weight transposes, casts, reshapes)."""
    # TVM's FoldConstant compiles and runs a kernel per folded call (~40 ms each: a TFLite model's hundreds of
    # weight transposes and fp16 casts took 6-11 s); numpy folds those first, TVM folds what is left.
    return tvm.transform.Sequential([_numpy_fold, relax.transform.FoldConstant()], name="FoldConstant")
