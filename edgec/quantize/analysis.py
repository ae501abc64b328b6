"""Which tensors of a float Relax graph int8 quantization puts a quantize → dequantize pair on.

A pair goes where an integer kernel would read int8: the data input of a convolution (a transposed one too) or a
matrix product with constant weights, both inputs of an add of two activations (a residual), every input of a
concat, the input of a pooling. Nothing goes between such a layer and its bias add and ReLU/clip: those are its int32 accumulator and
epilogue, requantized once at the next boundary, so conv → relu → conv holds one pair, not one around each op.
The analysis is a pure function of the graph, so `calibrate` and `quantize-int8` agree on the tensors by position.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import relax

from ..passes.ir import op_name

CONV, MATMUL, ADD, CONCAT = "relax.nn.conv2d", "relax.matmul", "relax.add", "relax.concat"
DECONV = "relax.nn.conv2d_transpose"
POOLS = ("relax.nn.max_pool2d", "relax.nn.avg_pool2d", "relax.nn.adaptive_avg_pool2d", "relax.mean")


@dataclass(frozen=True)
class Compute:
    """A conv2d, conv2d_transpose or matmul whose weights become int8, per output channel along `weight_axis`."""
    op: str
    weight: tvm.ir.expr.Constant
    weight_axis: int
    channel_axis: int              # the output's channel axis, along which a bias adds
    macs: int                      # multiply-accumulates per run


@dataclass
class Plan:
    tensors: list[tuple[str, relax.Var]]            # (key, tensor) for every tensor that gets a pair, in graph order
    compute: dict[relax.Var, Compute]               # quantized layers by the var they bind
    bias: dict[relax.Var, relax.Var]                # a bias add's var -> its layer's var
    float_ops: dict[str, int]                       # ops that stay float although quantizable, with why, counted
    layers: dict[relax.Var, str]                    # every binding that reads a pair -> its layer name (conv2d_3)

    def keys(self) -> list[str]:
        return [k for k, _ in self.tensors]


def _float_activation(expr) -> bool:
    """A float32 tensor with a static shape, bound to a var (a constant is no activation)."""
    ty = getattr(expr, "ty", None)
    dims = getattr(getattr(ty, "shape", None), "values", None)
    return (isinstance(expr, relax.Var) and isinstance(ty, relax.TensorType) and str(ty.dtype) == "float32"
            and dims is not None and all(isinstance(d, tvm.tirx.IntImm) for d in dims))


def _float_const(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.Constant) and str(expr.ty.dtype) == "float32"


def _compute(call: relax.Call) -> tuple[Compute | None, str | None]:
    """The layer a call is, when its weights can be quantized per channel; else (None, why not) for conv/matmul."""
    op = op_name(call)
    if op not in (CONV, MATMUL, DECONV):
        return None, None
    x, w = call.args[0], call.args[1]
    if not _float_const(w):
        return None, f"{op.split('.')[-1]} with non-constant float32 weights"
    if op == DECONV and int(call.attrs.groups) != 1:
        # IOHW weights of a grouped deconvolution: O counts one group's outputs, not the output channels
        return None, "conv2d_transpose with groups"
    weights = w.value.numpy()
    if op in (CONV, DECONV):
        a = call.attrs
        axis = str(a.kernel_layout).index("O")
        # each output element of a conv reads its channel's weights once; each input element of a deconv is
        # scattered through its channel's
        reads = _elements(call) * weights.size // weights.shape[axis] if op == CONV else \
            _elements(x) * weights.size // weights.shape[str(a.kernel_layout).index("I")]
        return Compute(op, w, axis, str(a.out_layout or a.data_layout).index("C"), reads), None
    if weights.ndim != 2 or not _float_activation(x):
        return None, "matmul with weights of rank other than 2"
    return Compute(op, w, 1, len(x.ty.shape) - 1, _elements(call) * weights.shape[0]), None


def _elements(expr) -> int:
    """Elements of a tensor of static shape (0 where a dimension is not static)."""
    dims = getattr(getattr(expr.ty, "shape", None), "values", None) or ()
    return int(np.prod([int(d) if isinstance(d, tvm.tirx.IntImm) else 0 for d in dims]))


def _bias_fits(bias: tvm.ir.expr.Constant, layer: relax.Var, compute: Compute) -> bool:
    """A constant adds per output channel: shaped like the output with 1s except along the channel axis, or [C]."""
    shape = bias.value.numpy().shape
    out = [int(d) for d in layer.ty.shape]
    channels = out[compute.channel_axis]
    if len(shape) == 1:
        return compute.channel_axis == len(out) - 1 and shape[0] == channels
    return len(shape) == len(out) and all(s == (channels if i == compute.channel_axis else 1)
                                          for i, s in enumerate(shape))


def plan(func: relax.Function) -> Plan:
    bindings = [b for block in func.body.blocks for b in block.bindings]
    values = {b.var: b.value for b in bindings if isinstance(b, relax.VarBinding)}
    uses: dict[relax.Var, int] = {}

    @relax.expr_functor.visitor
    class Uses(relax.PyExprVisitor):
        def visit_var_(self, var):
            uses[var] = uses.get(var, 0) + 1

        def visit_dataflow_var_(self, var):
            uses[var] = uses.get(var, 0) + 1

    for value in values.values():
        Uses().visit_expr(value)
    Uses().visit_expr(func.body.body)

    compute: dict[relax.Var, Compute] = {}
    float_ops: dict[str, int] = {}
    for var, value in values.items():
        layer, why = _compute(value)
        if layer is not None and _float_activation(value.args[0]):
            compute[var] = layer
        elif why:
            float_ops[why] = float_ops.get(why, 0) + 1
    bias = {}
    for var, value in values.items():
        if op_name(value) == ADD:
            layer, const = value.args
            if layer in compute and uses.get(layer) == 1 and _float_const(const) \
                    and _bias_fits(const, layer, compute[layer]):
                bias[var] = layer

    wanted: set[relax.Var] = set()
    layers: dict[relax.Var, str] = {}
    counts: dict[str, int] = {}
    for var, value in values.items():
        op = op_name(value)
        if var in compute or op in POOLS:
            inputs = [value.args[0]]
        elif op == ADD and var not in bias:
            inputs = list(value.args) if all(_float_activation(a) for a in value.args) else []
        elif op == CONCAT and isinstance(value.args[0], relax.Tuple):
            inputs = list(value.args[0].fields)
        else:
            continue
        inputs = [x for x in inputs if _float_activation(x)]
        if inputs:
            # named by op and position among that op's layers in graph order: the same names for every build of
            # a model, which --keep-float globs and the budget search reports
            kind = op.split(".")[-1]
            layers[var] = f"{kind}_{counts.get(kind, 0)}"
            counts[kind] = counts.get(kind, 0) + 1
        wanted.update(inputs)
    tensors = [(f"input:{p.name}", p) for p in func.params if p in wanted]
    tensors += [(f"{i}:{b.var.name}", b.var) for i, b in enumerate(bindings) if b.var in wanted]
    return Plan(tensors, compute, bias, float_ops, layers)
