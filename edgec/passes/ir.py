"""Questions passes ask of a Relax module, and rewrites several passes share. Here, below both edgec.passes and
edgec.offload, so that either can use them without importing the other."""
from __future__ import annotations

import math
import re

import tvm
from tvm import relax

# TVM's ONNX importer emits Clip as TE kernels named after the topi functions: maximum, minimum1, ...
_CLIP_HALF = re.compile(r"^(maximum|minimum)\d*$")


def calls_any(mod: tvm.IRModule, ops: set[str]) -> bool:
    """Whether a Relax function of `mod` calls one of the operators named `ops` (e.g. "relax.dequantize")."""
    found = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(1) if isinstance(e, relax.Call) and
                                            isinstance(e.op, tvm.ir.Op) and e.op.name in ops else None)
    return bool(found)


def op_name(expr) -> str | None:
    """The operator a call calls ("relax.nn.conv2d"); None for anything else (a var, a constant, a call_tir's
    function)."""
    return expr.op.name if isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op) else None


def clip_bounds(clip: relax.Call) -> tuple[float, float] | None:
    """An R.clip's constant bounds (None where they are not constants)."""
    if not all(isinstance(v, (tvm.tirx.FloatImm, tvm.tirx.IntImm)) for v in clip.args[1:]):
        return None
    return float(clip.args[1].value), float(clip.args[2].value)


def scalar_constant(expr) -> bool:
    """Whether `expr` is a constant holding one value (a per-tensor scale or zero point, a scalar operand)."""
    return isinstance(expr, tvm.ir.expr.GenericConst) and expr.value.numpy().size == 1


def per_tensor(call: relax.Call) -> bool:
    """Whether `call` is not a quantize/dequantize, or is one with a single scale and zero point (so it commutes
    with layout changes and acts alike on every element)."""
    return call.op.name not in ("relax.quantize", "relax.dequantize") or all(map(scalar_constant, call.args[1:]))


def readers(func: relax.Function) -> dict[relax.Var, list[relax.Var | None]]:
    """Every var -> the bindings whose value reads it (None: the function's result reads it)."""
    found: dict[relax.Var, list[relax.Var | None]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            def note(expr, var=binding.var):
                if isinstance(expr, relax.Var):
                    found.setdefault(expr, []).append(var)
            relax.analysis.post_order_visit(binding.value, note)
    relax.analysis.post_order_visit(func.body.body, lambda e: found.setdefault(e, []).append(None)
                                    if isinstance(e, relax.Var) else None)
    return found


def graph_functions(mod: tvm.IRModule) -> list[tuple[tvm.ir.GlobalVar, relax.Function]]:
    """The Relax functions of `mod` that are the model's graph: not a backend's partition, a composite pattern's
    body or a fused group (their ops are the library's or one kernel's)."""
    return [(gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)
            and not any(k in (f.attrs or {}) for k in ("Codegen", "Composite", "Primitive"))]


def mutate_functions(mod: tvm.IRModule, mutator, skip_partitions: bool = False) -> tvm.IRModule:
    """`mod` with each Relax function rewritten by `mutator` (a relax.PyExprMutator made on `mod`); with
    `skip_partitions`, only the model's graph functions (graph_functions): a backend's partitions, which the library
    computes, and composite or fused bodies are left as they are."""
    functions = graph_functions(mod) if skip_partitions else [
        (gv, f) for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
    for gv, func in functions:
        mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()


@relax.expr_functor.mutator
class ClipHalves(relax.PyExprMutator):
    """The call_tir(maximum, (x, lo)) and call_tir(minimum, (., hi)) halves of an ONNX Clip as Relax ops: one
    R.clip(x, lo, hi) per Clip (what the offload patterns fuse), or with `as_clip=False` R.maximum / R.minimum with
    the tensor bound (what ToMixedPrecision computes in fp16: it fails on a call_tir given an fp16 tensor, and on
    R.clip's scalar bounds)."""

    def __init__(self, mod, as_clip: bool = True):
        super().__init__(mod)
        self.as_clip = as_clip

    def visit_call_(self, call):
        call = super().visit_call_(call)
        half = clip_half(call)
        if half is None:
            return call
        x, lo, hi = half
        if not self.as_clip:
            bound = call.args[1].fields[1]
            return relax.op.maximum(x, bound) if hi == math.inf else relax.op.minimum(x, bound)
        if isinstance(x, relax.Var):
            producer = self.lookup_binding(x)
            if isinstance(producer, relax.Call) and producer.op == tvm.ir.Op.get("relax.clip"):
                x, lo, hi = producer.args[0], max(lo, producer.args[1].value), min(hi, producer.args[2].value)
        return relax.op.clip(x, lo, hi)


def clip_half(call: relax.Call) -> tuple[relax.Expr, float, float] | None:
    """(x, lo, hi) of a call_tir half of an ONNX Clip (one bound infinite); None for any other call."""
    if call.op != tvm.ir.Op.get("relax.call_tir") or not isinstance(call.args[0], tvm.ir.GlobalVar):
        return None
    which = _CLIP_HALF.match(call.args[0].name_hint)
    args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else ()
    if which is None or len(args) != 2 or not isinstance(args[1], tvm.ir.expr.GenericConst) \
            or args[1].value.numpy().size != 1:
        return None
    bound = args[1].value.numpy().item()
    return (args[0], bound, math.inf) if which[1] == "maximum" else (args[0], -math.inf, bound)


@tvm.transform.module_pass(opt_level=0, name="OffloadRestoreClip")
def restore_clip(mod, pctx):
    """Each ONNX Clip (imported as call_tir maximum + minimum) as one R.clip, which patterns can fuse."""
    return relax.transform.DeadCodeElimination()(mutate_functions(mod, ClipHalves(mod)))
