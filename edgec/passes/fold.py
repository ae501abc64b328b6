"""Folding: batch-norm into the preceding convolution, then every all-constant subexpression."""
import numpy as np
import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple_get_item, rewrite_call, wildcard

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


@register_pass("fold-batchnorm", phase="graph")
def fold_batchnorm(ctx):
    """Fold inference batch-norm (after conv2d, with or without bias) into the conv's weights and bias."""
    return _fold_batchnorm


@register_pass("fold-constants", phase="graph", after=("canonicalize",), tvm_name="FoldConstant")
def fold_constants(ctx):
    """Evaluate subexpressions whose inputs are all constants (weight transposes, casts, reshapes)."""
    return relax.transform.FoldConstant()
