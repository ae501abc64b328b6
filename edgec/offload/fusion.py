"""Patterns shared by the backends: an anchor operator (conv2d, matmul) with an optional bias and a chain of
post-ops (ReLU or clip, a residual add, in either order), with the checks every backend needs, and the reading
of a partitioned function back into that chain for an emitter.

A pattern's name spells its chain ("onednn.conv2d_bias_clip_add"); the emitter reads the chain from the name and
the operands from the composite function, so patterns and emitters cannot disagree on what was fused.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import tvm
from tvm import relax
from tvm.relax.backend.utils import has_leaking_intermediate_variables
from tvm.relax.dpl import is_const, is_op, wildcard

from .backend import Operands, Pattern

ACTIVATIONS = ("relu", "clip")
# The reason a pattern refuses a second operand computed at run time, unless its backend takes one
CONSTANT_WEIGHTS_ONLY = "its weights are computed at run time (only constant weights are packed)"
# Post-op chains after the anchor (and its bias): at most one activation and one residual add, either order.
_CHAINS = [(), *((a,) for a in ACTIVATIONS), ("add",), *((a, "add") for a in ACTIVATIONS),
           *(("add", a) for a in ACTIVATIONS)]


def recorded(pattern: Pattern, accepted: set[str], refused: dict[str, str]) -> relax.transform.FusionPattern:
    """`pattern` for FuseOpsByPattern, its check's verdict recorded per anchor (by the name it is bound to): taken
    in `accepted`, else the reason in `refused` (the last one a check gave: several patterns try one anchor)."""
    def check(ctx) -> bool:
        reason, name = pattern.check(ctx), ctx.value_to_bound_var[ctx.annotated_expr["anchor"]].name
        if reason is None:
            accepted.add(name)
        else:
            refused[name] = reason
        return reason is None

    return relax.transform.FusionPattern(pattern.name, pattern.pattern, pattern.annotations, check)


def _step(prev, step: str):
    """The pattern of one post-op on `prev`, and the pattern of its other operand (None for activations)."""
    if step == "bias":
        bias = is_const()
        return is_op("relax.add")(prev, bias), bias
    if step == "relu":
        return is_op("relax.nn.relu")(prev), None
    if step == "clip":
        return is_op("relax.clip")(prev, wildcard(), wildcard()), None
    other = wildcard()                       # the residual: any tensor of the result's shape, either side
    return is_op("relax.add")(prev, other) | is_op("relax.add")(other, prev), other


def fused_patterns(backend: str, anchor: str, op: str, check_anchor: Callable[[relax.Call], str | None],
                   *, with_bias: bool = True, runtime_weights: str | None = CONSTANT_WEIGHTS_ONLY) -> list[Pattern]:
    """Patterns `<backend>.<anchor>[_bias][_<post-op>...]` for `op(data, weight)`, longest chain first.

    `check_anchor(call)` gives the reason the backend cannot run this call (attributes, dtypes, shapes), or None.
    `runtime_weights` is the reason a weight that is not a constant is refused, None where the anchor takes one.
    """
    patterns = []
    biases = (True, False) if with_bias else (False,)
    for chain in sorted((((("bias",) if b else ()) + c) for b, c in itertools.product(biases, _CHAINS)),
                        key=len, reverse=True):
        root = is_op(op)(wildcard(), wildcard())
        annotations = {"anchor": root}
        for i, step in enumerate(chain):
            root, operand = _step(root, step)
            annotations[f"step{i}"] = root
            if operand is not None:
                annotations[f"operand{i}"] = operand
        patterns.append(Pattern("_".join((f"{backend}.{anchor}", *chain)), root, annotations,
                                _check(chain, check_anchor, runtime_weights), op))
    return patterns


def nhwc_conv_check(library: str) -> Callable[[relax.Call], str | None]:
    """The anchor check of a backend whose conv2d takes NHWC activations and OIHW weights."""
    def check(call: relax.Call) -> str | None:
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NHWC", "OIHW", "NHWC"):
            return (f"layout {attrs.data_layout}/{attrs.kernel_layout}/{attrs.out_layout} "
                    f"({library} is given NHWC/OIHW/NHWC; offload-layout converts the graph)")
        return None

    return check


def static_shape(expr: relax.Expr) -> list[int] | None:
    shape = getattr(expr.ty, "shape", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def _check(chain: tuple[str, ...], check_anchor,
           runtime_weights: str | None) -> Callable[[relax.transform.PatternCheckContext], str | None]:
    def check(ctx: relax.transform.PatternCheckContext) -> str | None:
        # FuseOpsByPattern itself accepts a match whose intermediate value is also used outside it (a conv output
        # feeding a residual add and the next block): the result would be invalid IR (TVM 0.27).
        if has_leaking_intermediate_variables(ctx):
            return f"a value inside the fused chain ({' + '.join(chain)}) is also used outside it"
        anchor = ctx.annotated_expr["anchor"]
        for role, expr in (("input", anchor.args[0]), ("weight", anchor.args[1]), ("output", anchor)):
            dtype = getattr(expr.ty, "dtype", None)
            if dtype != "float32":
                return f"{role} dtype {dtype} (float32 only)"
            if static_shape(expr) is None:
                return f"{role} has a dynamic shape"
        if runtime_weights and not isinstance(anchor.args[1], tvm.ir.expr.GenericConst):
            return runtime_weights
        out_dtype = getattr(anchor.attrs, "out_dtype", None)
        if out_dtype not in (None, "", "float32", "void"):
            return f"accumulates in {out_dtype} (float32 only)"
        reason = check_anchor(anchor)
        if reason:
            return reason
        out_shape = static_shape(anchor)
        for i, step in enumerate(chain):
            value = ctx.annotated_expr[f"step{i}"]
            if step == "bias":
                size = int(ctx.annotated_expr[f"operand{i}"].value.numpy().size)
                shape = static_shape(ctx.annotated_expr[f"operand{i}"])
                if size != out_shape[-1] or shape[-1:] != out_shape[-1:]:
                    return f"bias of shape {shape} is not one value per output channel"
            elif step == "clip" and not all(isinstance(v, tvm.tirx.FloatImm) for v in value.args[1:]):
                return "clip bounds are not constants"
            elif step == "add" and static_shape(ctx.annotated_expr[f"operand{i}"]) != out_shape:
                return f"residual of shape {static_shape(ctx.annotated_expr[f'operand{i}'])} is broadcast"
        return None

    return check


@dataclass(frozen=True)
class PostOp:
    kind: str                         # "bias", "relu", "clip" or "add"
    operand: int | None = None        # parameter index of the bias or the residual
    bounds: tuple[float, float] = (0.0, 0.0)   # clip


@dataclass(frozen=True)
class Fused:
    """One partitioned function as an emitter needs it: the anchor call (attributes and shapes) with the
    parameter index of its data and weight, and the post-ops in order."""
    symbol: str
    composite: str
    anchor: relax.Call
    data: int
    weight: int
    post_ops: tuple[PostOp, ...]
    num_params: int


def fused_operands(fused: Fused, *, weight: bool = True) -> Operands:
    """A backend packs the weight (unless it is computed at run time) and the bias at load; every other operand is
    given to each call."""
    packed = tuple(sorted(([fused.weight] if weight else []) + [op.operand for op in fused.post_ops
                                                                if op.kind == "bias"]))
    return Operands(packed, tuple(i for i in range(fused.num_params) if i not in packed))


def composite_function(func: relax.Function) -> relax.Function:
    """The one composite function a FuseOpsByPattern(annotate_codegen=True) function calls."""
    inner = [f for f in _local_functions(func) if "Composite" in f.attrs]
    if len(inner) != 1:
        raise ValueError(f"{func.attrs['global_symbol']}: expected one composite function, found {len(inner)}")
    return inner[0]


def read_fused(func: relax.Function) -> Fused:
    """A function FuseOpsByPattern(annotate_codegen=True) made: its body calls one composite function, whose
    bindings are the anchor, then one binding per post-op, each using the previous one's variable."""
    inner = composite_function(func)
    composite = str(inner.attrs["Composite"])
    # the emitter's parameter indices are the composite's: the wrapper must pass its own parameters in order
    calls = [b.value for block in func.body.blocks for b in block.bindings if isinstance(b.value, relax.Call)]
    if len(calls) != 1 or len(calls[0].args) != len(func.params) or \
            not all(a.same_as(p) for a, p in zip(calls[0].args, func.params)):
        raise ValueError(f"{func.attrs['global_symbol']}: the composite is not called with the parameters in order")
    chain = composite.split(".", 1)[1].split("_")[1:]
    bindings = [b for block in inner.body.blocks for b in block.bindings]
    if len(bindings) != len(chain) + 1:
        raise ValueError(f"{composite}: {len(bindings)} bindings for the chain {chain}")

    def param(expr) -> int:
        for i, p in enumerate(inner.params):
            if p.same_as(expr):
                return i
        raise ValueError(f"{composite}: an operand is not a parameter")

    anchor = bindings[0].value
    post_ops = []
    for step, previous, binding in zip(chain, bindings, bindings[1:]):
        call = binding.value
        if step in ("bias", "add"):
            other = call.args[1] if call.args[0].same_as(previous.var) else call.args[0]
            post_ops.append(PostOp(step, operand=param(other)))
        elif step == "clip":
            post_ops.append(PostOp(step, bounds=(float(call.args[1].value), float(call.args[2].value))))
        else:
            post_ops.append(PostOp(step))
    return Fused(str(func.attrs["global_symbol"]), composite, anchor, param(anchor.args[0]), param(anchor.args[1]),
                 tuple(post_ops), len(func.params))


def _local_functions(func: relax.Function) -> list[relax.Function]:
    found = []
    relax.analysis.post_order_visit(func.body, lambda e: found.append(e) if isinstance(e, relax.Function) else None)
    return found
