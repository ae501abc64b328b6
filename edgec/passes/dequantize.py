"""An 8-bit tensor's float values are computed inside the kernels that read them, not stored between kernels.

In a QDQ graph a tensor that several ops read is dequantized once, and FuseOps cannot put one producer in two
kernels: the dequantize became a kernel of its own writing a float32 tensor 4x the bytes, which every reader then
read back (PP-OCRv4 det int8: 13 such kernels; its SE blocks' 80x80x96 input, read by a mean and by the block's
elementwise chain). Three passes keep the 8-bit values 8-bit between kernels, in the order they run:

- `requantize-moves-apart` (graph phase, after `int8-lookup-tables`): onnxruntime's quantizer gives a nearest
  resize, a transpose or a reshape the scale and zero point of its input, so QDQ wraps it as quantize(move(
  dequantize(x, s, z)), s, z): float32 in and out of a kernel that only moves values (PP-OCRv4 det's neck: six
  upsamplings). Such a move is run on x itself. Exact: q(d(x)) is x for every 8-bit x, since (k * s) / s rounds
  to within 255 * 2^-23 of the integer k.
- `dequantize-per-use` (graph phase, after `requantize-moves-apart`): each op that reads a shared dequantize gets its
  own copy, which fuses into that op's kernel. The copies compute the same values (the same two operations on
  the same 8-bit element), so every output keeps its bits.
- `mean-takes-producers` (legalize phase, after `annotate-op-pattern`): LegalizeOps writes a mean as a sum and a
  division, which TVM's pattern analysis files as a reduction with an epilogue (out-elementwise-fusable, like a
  convolution), so no producer fused into it. Filed as a plain reduction, its elementwise producers fuse into it
  (FuseOps' rule for reductions) and the sum reads the 8-bit tensor itself, in the same order, to the same bits.
  What it gives up is fusing its consumers, which read the reduced tensor: a few values.
"""
from __future__ import annotations

from collections import Counter

import tvm
from tvm import relax, tirx

from ..context import BuildContext
from .ir import graph_functions, scalar_constant
from .registry import register_pass

# Ops whose kernels take an elementwise producer in (FuseOps: injective and broadcast consumers, reductions);
# a resize that upsamples does not (upsample-apart), nor does a convolution or an offloaded call
_READERS = {f"relax.{op}" for op in (
    "add", "subtract", "multiply", "divide", "maximum", "minimum", "power", "clip", "nn.relu", "sigmoid", "tanh",
    "exp", "sqrt", "rsqrt", "round", "floor", "quantize", "astype", "concat", "mean", "sum", "max", "min")}
_COMM_REDUCE = 3            # TVM's OpPatternKind kCommReduce
_OUT_ELEMWISE_FUSABLE = 4   # kOutEWiseFusable: what AnnotateTIROpPattern files a mean as


def _is_dequantize(expr) -> bool:
    return isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.dequantize") \
        and not isinstance(expr.args[0], tvm.ir.expr.GenericConst)


def _reader(expr) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) and expr.op.name in _READERS


@relax.expr_functor.mutator
class _PerUse(relax.PyExprMutator):
    def __init__(self, mod, shared: set[relax.Var]):
        super().__init__(mod)
        self.shared = shared                       # dequantize vars read by more than one op
        self.values: dict[relax.Var, relax.Call] = {}

    def visit_var_binding_(self, binding):
        value = binding.value
        if binding.var in self.shared:
            self.values[binding.var] = value
        if _reader(value) and any(isinstance(a, relax.Var) and a in self.values for a in value.args):
            copies = {}     # one per shared var, however many of the call's arguments it is
            for a in value.args:
                if isinstance(a, relax.Var) and a in self.values and a not in copies:
                    copies[a] = self.builder_.emit(self.values[a])
            value = relax.Call(value.op, [copies.get(a, a) if isinstance(a, relax.Var) else a for a in value.args],
                               value.attrs, value.ty_args)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.visit_expr(value)))


def _shared_dequantizes(func: relax.Function) -> set[relax.Var]:
    """The dequantize bindings that two or more op calls read."""
    reads = Counter()
    relax.analysis.post_order_visit(func.body, lambda e: reads.update(
        a for a in e.args if isinstance(a, relax.Var)) if _reader(e) else None)
    return {b.var for block in func.body.blocks for b in block.bindings
            if _is_dequantize(b.value) and reads[b.var] > 1}


@tvm.transform.module_pass(opt_level=0, name="DequantizePerUse")
def _dequantize_per_use(mod, _ctx):
    for gv, func in graph_functions(mod):
        shared = _shared_dequantizes(func)
        if shared:
            mutator = _PerUse(mod, shared)
            mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
            mod[gv] = relax.analysis.remove_all_unused(mutator.visit_expr(func))
    return mod


@register_pass("dequantize-per-use", phase="graph", after=("requantize-moves-apart",))
def dequantize_per_use(ctx: BuildContext) -> tvm.transform.Pass:
    """A dequantize read by several ops computed in each reader's kernel, not stored as float32 between kernels"""
    return _dequantize_per_use


# Ops that move or pick values without computing any: the same on the 8-bit codes as on their float values
_MOVES = ("relax.permute_dims", "relax.reshape")
_SCALE_RANGE = (1e-30, 1e30)    # (k * s) / s must stay a normal float for every |k| <= 255


def _moves_values(call) -> bool:
    if not (isinstance(call, relax.Call) and isinstance(call.op, tvm.ir.Op)):
        return False
    if call.op.name == "relax.image.resize2d":
        return str(call.attrs.method) == "nearest_neighbor"
    return call.op.name in _MOVES


def _same_quantization(dequantize: relax.Call, quantize: relax.Call) -> bool:
    """Per-tensor and equal scale and zero point, a normal scale, and the 8-bit type the dequantize read."""
    consts = [*dequantize.args[1:], *quantize.args[1:]]
    if not all(map(scalar_constant, consts)):
        return False
    scale, zero, scale_q, zero_q = (c.value.numpy().item() for c in consts)
    return (scale, zero) == (scale_q, zero_q) and _SCALE_RANGE[0] < scale < _SCALE_RANGE[1] \
        and str(quantize.attrs.out_dtype) == str(dequantize.args[0].ty.dtype)


@relax.expr_functor.mutator
class _MovesApart(relax.PyExprMutator):
    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        moved = self._lookup(value.args[0]) if _is_quantize(value) else None
        source = self._lookup(moved.args[0]) if _moves_values(moved) else None
        if _is_dequantize(source) and _same_quantization(source, value):
            on_codes = self.builder_.normalize(relax.Call(moved.op, [source.args[0], *moved.args[1:]], moved.attrs,
                                                          moved.ty_args))
            if str(on_codes.ty.dtype) == str(value.ty.dtype):    # not a resize told to compute in float32
                value = on_codes
        self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    def _lookup(self, expr):
        return self.builder_.lookup_binding(expr) if isinstance(expr, relax.Var) else None


def _is_quantize(expr) -> bool:
    return isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.quantize")


@tvm.transform.module_pass(opt_level=0, name="RequantizeMovesApart")
def _requantize_moves_apart(mod, _ctx):
    mutator = _MovesApart(mod)
    for gv, func in graph_functions(mod):
        mutator.builder_.update_func(gv, relax.analysis.remove_all_unused(mutator.visit_expr(func)))
    return mutator.builder_.get()


@register_pass("requantize-moves-apart", phase="graph", after=("int8-lookup-tables",))
def requantize_moves_apart(ctx: BuildContext) -> tvm.transform.Pass:
    """A nearest resize, transpose or reshape between a dequantize and a quantize of the same scale moves 8 bits"""
    return _requantize_moves_apart


@tvm.transform.module_pass(opt_level=0, name="MeanTakesProducers")
def _mean_takes_producers(mod, _ctx):
    mod = mod.clone()
    for gvar, func in list(mod.functions_items()):
        # LegalizeOps names each kernel after its TOPI compute: the name is all a call_tir says of its op
        if isinstance(func, tirx.PrimFunc) and gvar.name_hint.startswith("mean") and func.attrs \
                and int(func.attrs.get("op_pattern", -1)) == _OUT_ELEMWISE_FUSABLE:
            mod[gvar] = func.with_attr("op_pattern", _COMM_REDUCE)
    return mod


@register_pass("mean-takes-producers", phase="legalize", after=("annotate-op-pattern",))
def mean_takes_producers(ctx: BuildContext) -> tvm.transform.Pass:
    """A mean's elementwise producers (a dequantize) fused into it: the sum reads the 8-bit tensor"""
    return _mean_takes_producers
