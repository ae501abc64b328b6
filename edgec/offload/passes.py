"""The offload steps of edgec's pipeline, run when the build offloads (BuildContext.offload names backends):
graph preparation, partition, code generation. `edgec passes` lists them and `--dump-ir` shows each one's effect.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass

import tvm
from tvm import relax
from tvm.relax.dpl import is_const, is_op, is_tuple, rewrite_call, wildcard

from ..context import BuildContext
from ..passes.ir import calls_any, per_tensor, restore_clip
from ..passes.registry import register_pass
from .backend import Operands
from .fusion import composite_function, read_fused, recorded, static_shape
from .quantized import (beyond, deconv_back_to_nchw, deconv_to_nhwc, is_quantized, quantized_layers, read_quantized,
                        untie_dequantize)

_PLACEMENT_ATTR = "edgec_offload_placement"
_INT8_LIMITED_ATTR = "edgec_offload_int8_limited"   # offload-quantized's [operator, why, count] per backend whose
# int8 limits on the target left layers to TVM
# Ops ConvertLayout would move along to the new layout, which TVM 0.27 cannot lower in it.
_KEEP_LAYOUT = {"relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}
# Elementwise ops without a layout rule in TVM 0.27: ConvertLayout wraps each in a transpose pair. quantize and
# dequantize are elementwise when per tensor (their one scale and zero point): moved only then.
_NO_LAYOUT_RULE = ("relax.clip", "relax.quantize", "relax.dequantize")
# Elementwise ops a transpose moves through (ConvertLayout has rules for them, but not where a dequantize, which it
# keeps in the old layout, feeds them).
_UNARY = ("relax.sigmoid", "relax.nn.relu")
_BINARY = ("relax.add", "relax.subtract", "relax.multiply", "relax.divide")
_MAX_CONCAT = 8     # operands of a concat a transpose moves through (the patterns match each count)


def _offloading(ctx: BuildContext) -> bool:
    return bool(ctx.offload)


def _backends(ctx: BuildContext):
    from . import resolve

    return resolve(ctx.offload, ctx.target.arch)


def int8_weight_max(ctx: BuildContext) -> tuple[int, str | None]:
    """The widest int8 weights every backend taking int8 chains on this target sums exactly, and why it is less than
    ±127 (None when it is not): what quantize-int8 makes, so that its layers run in the backends' kernels."""
    from ..quantize.qdq import WEIGHT_MAX

    found = [b.int8_limits(ctx.tvm_target()) for b in _backends(ctx) if b.quantized_patterns()] if ctx.offload else []
    narrowest = min((f for f in found if f), key=lambda f: f.weight_max, default=None)
    return (WEIGHT_MAX, None) if narrowest is None else (narrowest.weight_max, narrowest.why)


@register_pass("offload-restore-clip", phase="graph", after=("dead-code-elimination",), applies=_offloading)
def offload_restore_clip(ctx):
    """Turn ONNX Clip (imported as call_tir maximum + minimum) back into R.clip, which patterns can fuse."""
    return restore_clip


def _identity(first, second) -> bool:
    """permute_dims(permute_dims(x, first), second) is x."""
    first, second = [int(a) for a in first], [int(a) for a in second]
    return len(first) == len(second) and all(first[second[i]] == i for i in range(len(first)))


def _any_op(names):
    pattern = is_op(names[0])
    for name in names[1:]:
        pattern |= is_op(name)
    return pattern


def _inverse(axes) -> list[int]:
    return [axes.index(i) for i in range(len(axes))]


def _sunk_constant(const, axes: list[int]):
    """The constant c' with op(permute(x), c) == permute(op(x, c')): a scalar as it is, one of the output's rank
    transposed back; None for another rank (it would broadcast against other axes)."""
    value = const.value.numpy()
    if value.size == 1 and value.ndim <= len(axes):     # a higher rank would add axes the transpose lacks
        return const
    return relax.const(value.transpose(_inverse(axes))) if value.ndim == len(axes) else None


@tvm.transform.module_pass(opt_level=0, name="OffloadDropTransposePairs")
def _drop_transpose_pairs(mod, pctx):
    """Transposes are moved below the ops ConvertLayout left in the old layout, until they meet the transpose that
    undoes them; both are then removed. ConvertLayout cannot see through quantize/dequantize, so between two NHWC
    operators of a QDQ graph everything (hardswish, SE blocks, resize, concat) stays NCHW: moved here are per-tensor
    quantize/dequantize and clip, unary elementwise ops, binary ones with a constant (a scalar, or one of the
    output's rank, transposed back) or both operands transposed alike, mean with keepdims (its axes mapped),
    resize2d from NCHW to NHWC and a concat of operands transposed alike (its axis mapped).
    A transpose left below a dequantize goes back above it: on 8-bit values it moves a quarter of the bytes, and a
    quantized chain sees its dequantize; below a per-channel one of a constant (a weight ConvertLayout transposed)
    it transposes the constant, the channel axis moved along. A binary op with a transpose on one side only and a
    per-tensor dequantize of the same shape on the other (QDQ's residual add: ConvertLayout keeps it in the layout of
    its operands) gives the other side the inverse transpose, only for a transpose back to channels first (what
    ConvertLayout puts after an NHWC operator), so the inverse one, which the rule then meets, stays.
    """
    x = wildcard()
    transposed = is_op("relax.permute_dims")(x)
    op = _any_op(_NO_LAYOUT_RULE)(transposed, wildcard(), wildcard())
    unary = _any_op(_UNARY)
    pair = is_op("relax.permute_dims")(transposed)

    quantized = is_op("relax.dequantize")(wildcard(), wildcard(), wildcard())
    above = is_op("relax.permute_dims")(quantized)

    left, right = wildcard(), wildcard()
    t_left, t_right = is_op("relax.permute_dims")(left), is_op("relax.permute_dims")(right)
    dequantized = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
    constant = is_const()
    binary = _any_op(_BINARY)
    both = binary(t_left, t_right)
    first = binary(t_left, dequantized) | binary(t_left, constant)
    one = first | binary(dequantized, t_left) | binary(constant, t_left)
    reduced = is_op("relax.mean")(transposed)
    resized = is_op("relax.image.resize2d")(transposed, wildcard())
    parts = [is_op("relax.permute_dims")(wildcard()) for _ in range(_MAX_CONCAT)]
    concat = is_op("relax.concat")(is_tuple(parts[:2]))
    for n in range(3, _MAX_CONCAT + 1):
        concat |= is_op("relax.concat")(is_tuple(parts[:n]))

    def sink(expr, m):
        if expr.op.name in _BINARY:
            return sink_binary(expr, m)
        if expr.op.name == "relax.concat":
            return sink_concat(expr, m)
        axes = [int(a) for a in m[transposed].attrs.axes]
        if expr.op.name == "relax.mean":
            if not expr.attrs.keepdims or expr.attrs.axis is None:
                return expr
            inner = relax.op.mean(m[x], sorted(axes[int(a) % len(axes)] for a in expr.attrs.axis), keepdims=True)
        elif expr.op.name == "relax.image.resize2d":
            a = expr.attrs
            if a.layout != "NCHW" or axes != [0, 3, 1, 2]:
                return expr
            inner = relax.op.image.resize2d(
                m[x], expr.args[1], [float(r) for r in a.roi], "NHWC", a.method, a.coordinate_transformation_mode,
                a.rounding_method, float(a.cubic_alpha), int(a.cubic_exclude), float(a.extrapolation_value),
                a.out_dtype if str(a.out_dtype) else None)
        elif expr.op.name in _UNARY or per_tensor(m[op]):
            inner = relax.Call(expr.op, [m[x], *expr.args[1:]], expr.attrs)
        else:
            return expr
        return relax.op.permute_dims(inner, axes)

    def sink_binary(expr, m):
        transposed = m[t_left]
        axes = [int(a) for a in transposed.attrs.axes]
        shape = static_shape(expr)
        if shape is None:
            return expr
        if t_right in m:
            # equal ranks broadcast axis by axis, so the same transpose on both sides commutes with the op
            if [int(a) for a in m[t_right].attrs.axes] != axes:
                return expr
            operands = [m[left], m[right]]
        elif constant in m:
            moved = _sunk_constant(m[constant], axes)
            if moved is None:
                return expr
            operands = [m[left], moved] if first in m else [moved, m[left]]
        else:
            other = m[dequantized]
            scalar = static_shape(other)
            if scalar is not None and math.prod(scalar) == 1 and len(scalar) <= len(axes):
                # a dequantized scalar (QDQ's hardswish constants) broadcasts alike in any layout
                operands = [m[left], other] if first in m else [other, m[left]]
                return relax.op.permute_dims(relax.Call(expr.op, operands, expr.attrs), axes)
            if any(static_shape(e) != shape for e in (transposed, other)):
                return expr     # broadcasting: the operands' layouts are not the output's
            # rank 3's [0, 2, 1] is its own inverse: the rule would meet the transpose it moved, again and again
            # (PP-OCRv4 rec's layer norms: the build never ended); ConvertLayout's are rank 4
            if not per_tensor(other) or axes != [0, len(axes) - 1, *range(1, len(axes) - 1)] \
                    or axes == _inverse(axes):
                return expr
            moved = relax.op.permute_dims(other, _inverse(axes))
            operands = [m[left], moved] if first in m else [moved, m[left]]
        return relax.op.permute_dims(relax.Call(expr.op, operands, expr.attrs), axes)

    def sink_concat(expr, m):
        calls = [m[p] for p in parts if p in m]   # the tuple may be bound to a var: read the match, not the call
        axes = [int(a) for a in calls[0].attrs.axes]
        if any([int(a) for a in c.attrs.axes] != axes for c in calls):
            return expr
        inner = relax.op.concat([c.args[0] for c in calls], axes[int(expr.attrs.axis) % len(axes)])
        return relax.op.permute_dims(inner, axes)

    def cancel(expr, m):
        return m[x] if _identity(m[transposed].attrs.axes, m[pair].attrs.axes) else expr

    def hoist(expr, m):
        call, axes = m[quantized], m[above].attrs.axes
        if per_tensor(call):
            return relax.Call(call.op, [relax.op.permute_dims(call.args[0], axes), *call.args[1:]], call.attrs)
        if axes is None or not isinstance(call.args[0], tvm.ir.expr.Constant):
            return expr
        # a per-channel weight ConvertLayout transposed (TFLite's HWIO to OIHW): the int8 constant transposed, its
        # channel axis followed, so the chain's patterns see dequantize(int8 constant)
        axes = [int(a) for a in axes]
        return relax.op.dequantize(relax.const(call.args[0].value.numpy().transpose(axes)), *call.args[1:],
                                   axis=axes.index(int(call.attrs.axis) % len(axes)), out_dtype=call.attrs.out_dtype)

    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            func = rewrite_call(pair, cancel, rewrite_call(op | unary(transposed) | both | one | reduced | resized
                                                           | concat, sink, func))
            mod[gv] = rewrite_call(pair, cancel, rewrite_call(above, hoist, func))
    return mod


@tvm.transform.module_pass(opt_level=0, name="OffloadConstantsSecond")
def _constants_second(mod, pctx):
    """add/multiply(const, x) becomes add/multiply(x, const), the constant at x's rank (leading 1s, as
    broadcasting reads it): ConvertLayout takes a binary op's layout from its first operand and gives up on
    operands of another rank, and the op and everything after it would stay in the old layout."""
    def rewrite(expr, m):
        const, data = m[constant], m[x]
        if const.ty.dtype != getattr(data.ty, "dtype", None):
            return expr
        rank = len(static_shape(data) or ())
        value = const.value.numpy()
        if rank > value.ndim:
            const = relax.const(value.reshape((1,) * (rank - value.ndim) + value.shape))
        elif expr.args[1].same_as(const):
            return expr
        return relax.Call(expr.op, [data, const], expr.attrs)

    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    for op in ("relax.add", "relax.multiply"):
        for args in ((0, 1), (1, 0)):
            x, constant = wildcard(), is_const()
            operands = [constant, x] if args == (0, 1) else [x, constant]
            for gv, func in list(mod.functions_items()):
                if isinstance(func, relax.Function):
                    mod[gv] = rewrite_call(is_op(op)(*operands), rewrite, func)
    return mod


def channels_last(layouts: dict[str, list[str]], *after_convert: tvm.transform.Pass) -> tvm.transform.Pass:
    """ConvertLayout to `layouts` (conv2d_transpose kept as TVM 0.27 lowers it), ONNX's Clip as R.clip first (a
    chain's pattern sees it), then `after_convert`, then the transpose pairs left between converted ops dropped."""
    return tvm.transform.Sequential([
        restore_clip, relax.transform.ConvertLayout({**_KEEP_LAYOUT, **layouts}), *after_convert,
        _drop_transpose_pairs, relax.transform.DeadCodeElimination(["main"]), relax.transform.CanonicalizeBindings()],
        name="ChannelsLast")


def _desired_layouts(backends) -> dict[str, list[str]]:
    desired = dict(_KEEP_LAYOUT)
    for backend in reversed(backends):   # the first backend's wish wins
        desired.update(backend.layouts)
    return desired


@register_pass("offload-layout", phase="graph", after=("offload-restore-clip",), applies=_offloading)
def layout(ctx):
    """Convert the graph to the backends' layout (NHWC), leaving no transpose pairs between offloaded operators."""
    desired = _desired_layouts(_backends(ctx))
    convert = tvm.transform.Sequential([
        _constants_second, relax.transform.ConvertLayout(desired), _drop_transpose_pairs,
        # ConvertLayout transposes constant biases; folding makes them constants the patterns accept
        relax.transform.FoldConstant(), relax.transform.DeadCodeElimination(["main"]),
        relax.transform.CanonicalizeBindings()], name="OffloadLayout")
    wanted = {op for op in desired if op not in _KEEP_LAYOUT}

    @tvm.transform.module_pass(opt_level=0, name="OffloadLayoutIfNeeded")
    def layout_if_needed(mod, pctx):
        # ConvertLayout re-checks every binding, and refuses some the importer made (add of int64 and int32
        # indices): a graph without the backends' operators is not converted; the transposes offload-quantized left
        # around the int8 chains it converted for int8-kernels still meet and go
        if not calls_any(mod, wanted):
            return _drop_transpose_pairs(mod)
        converted = convert(mod)
        # ConvertLayout rewrites every function, offload-quantized's partitions too, which are in their backend's
        # layout already (an NHWC int8 conv2d_transpose would be put back in NCHW): they stay as they were
        for gv, func in mod.functions_items():
            if isinstance(func, relax.Function) and "Codegen" in (func.attrs or {}):
                converted[converted.get_global_var(gv.name_hint)] = func
        return converted

    return layout_if_needed


# after quantize-int8 by name, whose QDQ form it takes: import order, which sets registration order, must not decide
@register_pass("offload-quantized", phase="graph", after=("canonicalize", "quantize-int8"), applies=_offloading)
def quantized(ctx):
    """Give int8 chains in QDQ form (dequantize, conv2d/matmul/conv2d_transpose, bias, ReLU/clip, quantize) to the
    backends' integer kernels, in their layout, before constant folding turns the int8 weights into floats."""
    target = ctx.tvm_target()
    backends = [b for b in _backends(ctx) if b.quantized_patterns()]
    limits = {b.name: b.int8_limits(target) for b in backends}
    # a backend's int8 conv2d_transpose is NHWC (see quantized.deconv_to_nhwc); what it leaves goes back to NCHW
    deconv = [deconv_to_nhwc] if any(p.anchor == "relax.nn.conv2d_transpose"
                                     for b in backends for p in b.quantized_patterns()) else []

    def taken(pattern, backend: str, outside: set):
        """The pattern's check, then the backend's limits on this target (the anchors they leave out counted)."""
        def check(c) -> bool:
            if pattern.check(c) is not None:
                return False
            if limits[backend] is None or beyond(c, limits[backend]) is None:
                return True
            outside.add(c.annotated_expr["anchor"])
            return False

        return check

    @tvm.transform.module_pass(opt_level=0, name="OffloadQuantizedIfAny")
    def quantized_if_any(mod, pctx):
        # no int8 weights, nothing to do: the graph is left for offload-layout as it is
        if not backends or not quantized_layers(mod):
            return mod
        outside = {b.name: set() for b in backends}
        patterns = [relax.transform.FusionPattern(p.name, p.pattern, p.annotations, taken(p, b.name, outside[b.name]))
                    for b in backends for p in b.quantized_patterns()]
        converted = tvm.transform.Sequential([
            channels_last(_desired_layouts(backends), *deconv), untie_dequantize,
            relax.transform.FuseOpsByPattern(patterns, bind_constants=False, annotate_codegen=True),
            *(deconv and [deconv_back_to_nchw])], name="OffloadQuantized")(mod)
        # a chain taken, or one the limits left to int8-kernels, which reads the backends' layout best too (its
        # im2col rows are runs of channels); else the graph stays in its layout, as without int8 offload
        if any(outside.values()) or any("Codegen" in (f.attrs or {}) for f in converted.functions.values()):
            mod = converted
        # for offload-partition's placement: the int8 layers left to TVM by a backend's limits on this target
        rows = [["int8 layers", f"{name}: {limits[name].why}", len(anchors)] for name, anchors in outside.items()
                if anchors]
        return mod.with_attr(_INT8_LIMITED_ATTR, json.dumps(rows)) if rows else mod

    return quantized_if_any


@dataclass(frozen=True)
class Measured:
    """What `--offload auto` measured for one operator group on this machine: the library call and TVM's kernel."""
    group: str               # the backend's pattern and the data input's shape: "onednn.conv2d_bias_clip 1x48x48x16"
    backend: str             # the backend whose call was timed
    backend_ms: float
    tvm_ms: float


@dataclass(frozen=True)
class Placement:
    """Where calls of one operator went: a backend (with the fused pattern) or TVM (with the reason)."""
    operator: str            # "conv2d", "matmul"
    backend: str | None      # None: it stays in TVM
    detail: str              # the pattern it was fused as, or why the backends refused it
    count: int
    measured: Measured | None = None   # offload-auto's timings, which decided where it runs


def placement_of(mod: tvm.IRModule) -> tuple[Placement, ...] | None:
    """The placement offload-partition recorded in the module (offload-auto revises it), None when it did not run."""
    if mod.attrs is None or _PLACEMENT_ATTR not in mod.attrs:
        return None
    return tuple(Placement(**{**p, "measured": p.get("measured") and Measured(**p["measured"])})
                 for p in json.loads(str(mod.attrs[_PLACEMENT_ATTR])))


def with_placement(mod: tvm.IRModule, placement: list[Placement]) -> tvm.IRModule:
    """`mod` with `placement` recorded, offloaded operators first."""
    ordered = sorted(placement, key=lambda p: (p.backend is None, p.operator, -p.count))
    return mod.with_attr(_PLACEMENT_ATTR, json.dumps([asdict(p) for p in ordered]))


def _partition_pass(backends):
    @tvm.transform.module_pass(opt_level=0, name="OffloadPartition")
    def partition(mod, pctx):
        accepted, refused = set(), {}   # the anchors: taken, or why not (fusion.recorded)
        patterns = [recorded(p, accepted, refused) for backend in backends for p in backend.patterns()]
        anchors = {p.anchor for backend in backends for p in backend.patterns()}
        mod = relax.transform.FuseOpsByPattern(patterns, bind_constants=False, annotate_codegen=True)(mod)
        names = ", ".join(b.name for b in backends)
        counts = Counter()
        for binding in (b for block in mod["main"].body.blocks for b in block.bindings):
            call = binding.value
            if not isinstance(call, relax.Call):
                continue
            if isinstance(call.op, tvm.ir.GlobalVar) and "Codegen" in (mod[call.op].attrs or {}):
                fused = (read_quantized if is_quantized(mod[call.op]) else read_fused)(mod[call.op])
                counts[(_short(fused.anchor.op.name), str(mod[call.op].attrs["Codegen"]), fused.composite)] += 1
            elif isinstance(call.op, tvm.ir.Op) and call.op.name in anchors:
                var = binding.var.name
                why = refused.get(var, f"no {names} pattern matches it")
                if var in accepted:
                    why = "its match overlapped another fused group"
                counts[(_short(call.op.name), None, why)] += 1
        refused = json.loads(str((mod.attrs or {}).get(_INT8_LIMITED_ATTR, "[]")))
        return with_placement(mod.without_attr(_INT8_LIMITED_ATTR) if refused else mod,
                              [*(Placement(op, None, detail, n) for op, detail, n in refused),
                               *(Placement(op, backend, detail, n) for (op, backend, detail), n in counts.items())])

    return partition


def _short(op_name: str) -> str:
    return op_name.rsplit(".", 1)[-1]


@register_pass("offload-partition", phase="graph", after=("offload-layout",), applies=_offloading)
def partition(ctx):
    """Group the operators a backend takes into functions for its codegen; record where each one runs and why."""
    return _partition_pass(_backends(ctx))


@register_pass("offload-auto", phase="graph", after=("offload-partition",),
               applies=lambda ctx: _offloading(ctx) and ctx.offload_auto)
def auto(ctx):
    """--offload auto: time each partitioned group against TVM's kernel here; the slower library calls go back to TVM."""
    from .auto import auto_pass

    return auto_pass(ctx, _backends(ctx))


LOAD_SUFFIX = "_load"   # main_load: the function runners call once at load (the manifest's "load")


@relax.expr_functor.mutator
class _StateArguments(relax.PyExprMutator):
    """Calls of a backend's function take a state made at load instead of the operands it packs."""

    def __init__(self, mod, operands: dict[str, Operands], weights):
        super().__init__(mod)
        self.operands, self.weights = operands, weights
        self.states: list[tuple[relax.Var, str, list[relax.Expr]]] = []   # state, symbol, packed operands

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if call.op != tvm.ir.Op.get("relax.call_dps_packed") or not isinstance(call.args[0], relax.ExternFunc):
            return call
        symbol = str(call.args[0].global_symbol)
        if symbol not in self.operands:
            return call
        taken, operands = self.operands[symbol], list(call.args[1].fields)
        for k in taken.packed:
            if not (isinstance(operands[k], tvm.ir.expr.GenericConst) or
                    any(operands[k].same_as(w) for w in self.weights)):
                raise ValueError(f"{symbol}: operand {k}, packed at load, is not a weight or a constant")
        state = relax.Var(f"state{len(self.states)}", relax.ObjectType())
        self.states.append((state, symbol, [operands[k] for k in taken.packed]))
        rest = [state] + [operands[k] for k in taken.runtime]
        return relax.Call(call.op, [call.args[0], relax.Tuple(rest)], call.attrs, call.ty_args)


def _split_load(mod: tvm.IRModule, gv: tvm.ir.GlobalVar, operands: dict[str, Operands]) -> tvm.IRModule:
    """F(inputs, weights) becomes F(inputs, kept weights, states) and F_load(weights) -> (kept weights, states),
    where each state is `<symbol>_pack(its packed operands)`; the weights' values ("params") go with F_load, less
    those neither F nor a _pack reads."""
    func = mod[gv]
    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else len(func.params)
    inputs, weights = list(func.params[:num_input]), list(func.params[num_input:])
    mutator = _StateArguments(mod, operands, weights)
    body = mutator.visit_expr(func.body)
    if not mutator.states:
        return mod
    used = relax.analysis.free_vars(body)
    kept = [w for w in weights if any(w.same_as(u) for u in used)]
    states = [s for s, _, _ in mutator.states]
    read = [*kept, *(a for _, _, args in mutator.states for a in args)]
    loaded = [i for i, w in enumerate(weights) if any(w.same_as(r) for r in read)]
    load_params = [relax.Var(weights[i].name, weights[i].ty) for i in loaded]
    renamed = dict(zip((weights[i] for i in loaded), load_params))
    bb = relax.BlockBuilder()
    name = gv.name_hint + LOAD_SUFFIX
    with bb.function(name, load_params, {"num_input": 0}):
        with bb.dataflow():
            made = [bb.emit(relax.op.call_pure_packed(relax.ExternFunc(f"{symbol}_pack"),
                                                      *[renamed.get(a, a) for a in args],
                                                      ty_args=relax.ObjectType()))
                    for _, symbol, args in mutator.states]
            out = bb.emit_output(relax.Tuple([renamed[w] for w in kept] + made))
        bb.emit_func_output(out)
    load = bb.get()[name]
    if "params" in func.attrs:
        values = list(func.attrs["params"])
        load = load.with_attr("params", [values[i] for i in loaded])
    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    mod[gv] = relax.Function(inputs + kept + states, body, func.ret_ty, func.is_pure, func.attrs,
                             func.span).without_attr("params")
    mod[name] = load
    return mod


@relax.expr_functor.mutator
class _Renamed(relax.PyExprMutator):
    def __init__(self, mod, names: dict[tvm.ir.GlobalVar, tvm.ir.GlobalVar]):
        super().__init__(mod)
        self.names = names

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if isinstance(call.op, tvm.ir.GlobalVar) and call.op in self.names:
            return relax.Call(self.names[call.op], call.args, call.attrs, call.ty_args, call.span)
        return call


def _named_by_composite(mod: tvm.IRModule) -> tvm.IRModule:
    """Each partitioned function named after its composite and a number (onednn_qconv2d_bias_relu_3) instead of
    FuseOps' list of its operators. The name is the C symbol of its run and _pack functions, kept in the library's
    symbol table, its VM program and its error messages (PP-OCRv4 det int8: 88 names of about 100 characters; its
    dynamic string table alone went 18 -> 10 KB), and it is the name `edgec bench --profile` shows."""
    partitioned = {gv.name_hint: (gv, f) for gv, f in mod.functions_items()
                   if isinstance(f, relax.Function) and "Codegen" in (f.attrs or {})}
    if not partitioned:
        return mod
    # numbered in the order main (or offload-auto's g<i>, in turn) calls them, as a profile lists them
    callers = sorted((gv.name_hint != "main", gv.name_hint, f) for gv, f in mod.functions_items()
                     if isinstance(f, relax.Function) and gv.name_hint not in partitioned)
    called = [b.value.op.name_hint for *_, f in callers if isinstance(f.body, relax.SeqExpr)
              for block in f.body.blocks for b in block.bindings
              if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar)]
    order = list(dict.fromkeys(name for name in [*called, *sorted(partitioned)] if name in partitioned))
    taken = {gv.name_hint for gv in mod.get_global_vars()}
    bb = relax.BlockBuilder(mod)
    numbers, names = Counter(), {}
    for gv, func in (partitioned[name] for name in order):
        stem = str(composite_function(func).attrs["Composite"]).replace(".", "_")
        name = f"{stem}_{numbers[stem]}"
        numbers[stem] += 1
        if name not in taken:   # else a function of that name already: it keeps FuseOps' own
            names[gv] = bb.add_func(func.with_attr("global_symbol", name), name)
    added = bb.get()
    functions = {}
    for gv, func in added.functions_items():
        if gv in names:
            continue
        if isinstance(func, relax.Function) and not any(gv.same_as(new) for new in names.values()):
            func = _Renamed(added, names).visit_expr(func)
        functions[gv] = func
    return tvm.IRModule(functions, attrs=mod.attrs)


def pack_at_load(backends) -> tvm.transform.Pass:
    """RunCodegen, then every public function that calls the backends' code gets a load function: the operands the
    backends pack (constant weights, biases) go to each call site's `<symbol>_pack` there, once per module instance,
    and the function takes the states it made instead. So packing is never per call, and state belongs to whoever
    called the load function (the runners: once per loaded model), not to the library."""
    by_name = {b.name: b for b in backends}

    @tvm.transform.module_pass(opt_level=0, name="OffloadCodegen")
    def offload_codegen(mod, pctx):
        mod = _named_by_composite(mod)
        operands = {str(f.attrs["global_symbol"]): by_name[str(f.attrs["Codegen"])].operands(f)
                  for _, f in mod.functions_items()
                  if isinstance(f, relax.Function) and "Codegen" in (f.attrs or {})}
        mod = relax.transform.RunCodegen()(mod)
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and "global_symbol" in (func.attrs or {}):
                mod = _split_load(mod, gv, operands)
        return mod

    return offload_codegen


@register_pass("offload-codegen", phase="params", after=("lift-params",), required=True, applies=_offloading)
def codegen(ctx):
    """Emit the backends' C++ for the partitioned functions, and the load function that packs their weights once."""
    return pack_at_load(_backends(ctx))
