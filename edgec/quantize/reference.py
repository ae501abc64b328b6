"""What an int8 bundle is verified against at build time.

onnxruntime on the float model gives the float answer, which an int8 bundle is not meant to reproduce: its
distance from it is measured on the held-back calibration samples (the before/after table). The build checks
that the bundle computes the quantized graph it was given, against that graph (the module `quantize-int8` left)
compiled here by TVM without offload, with each quantize → dequantize run in float as the QDQ form says, under
the quantized rule (reference.QuantizedRule), which measures the bundle's distance from that graph against the
graph's own rounding error on the same sample: its distance from the same graph with each dequantize(quantize(x))
a clip of x to the pair's range (`unrounded`), compiled alike; where a bundle is beyond the rule's element bound,
also against the graph with its requantization nudged (`nudged`), compiled alike.
"""
from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm import relax

from ..frontends import ImportedModel
from .calibrate import on_host

NAME = "edgec's int8 QDQ graph on TVM (llvm, no offload)"


def unrounded(qdq: tvm.IRModule) -> tvm.IRModule:
    """The QDQ module with each per-tensor dequantize(quantize(x, s, z), s, z) replaced by clip(x, (qmin - z) * s,
    (qmax - z) * s): the same computation saturating as the pair does, without rounding. A pair with per-channel or
    non-constant parameters is kept (its rounding then counts as part of the model, a stricter rule)."""
    from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

    data, scale, zero = wildcard(), is_const(), is_const()
    quantize = is_op("relax.quantize")(data, scale, zero)
    pattern = is_op("relax.dequantize")(quantize, is_const(), is_const())

    def clip(call, matches):
        consts = [matches[scale], matches[zero], *call.args[1:]]
        if not all(isinstance(c, tvm.ir.expr.Constant) for c in consts):
            return call
        s, z, deq_s, deq_z = (c.value.numpy() for c in consts)
        q = matches[quantize]
        if s.size != 1 or z.size != 1 or not (np.array_equal(s, deq_s) and np.array_equal(z, deq_z)):
            return call
        info = np.iinfo(str(q.attrs.out_dtype))
        lo, hi = ((float(v) - float(z.item())) * float(s.item()) for v in (info.min, info.max))
        return relax.op.clip(matches[data], lo, hi)

    mod = tvm.IRModule(dict(qdq.functions))
    mod["main"] = rewrite_call(pattern, clip, qdq["main"])
    return mod


NUDGE = "edgec_nudge"     # nudged(qdq)'s last parameter: the factor, a float32 scalar


def nudged(qdq: tvm.IRModule, factor: float | None = None) -> tvm.IRModule:
    """The QDQ module with every quantize of a computed tensor x made quantize(x * factor): another correct float32
    requantization (reference.qdq_nudged, QuantizedRule.nudges). Without `factor`, it is main's last parameter
    NUDGE, so that one compilation serves every factor (`nudged_runs`). A mutator, which visits each call once: a
    rewrite_call pattern would match its own result again and nudge forever."""
    quantize = tvm.ir.Op.get("relax.quantize")
    given = None if factor is not None else relax.Var(NUDGE, relax.TensorType((), "float32"))

    def times(x: relax.Expr) -> relax.Expr:
        dtype = str(x.ty.dtype)
        if given is None:
            return relax.const(factor, dtype)
        return given if dtype == "float32" else relax.op.astype(given, dtype)

    @relax.expr_functor.mutator
    class Nudge(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            x = call.args[0] if call.op.same_as(quantize) else None
            if x is None or isinstance(x, tvm.ir.expr.Constant):
                return call
            return relax.op.quantize(relax.op.multiply(x, times(x)), *call.args[1:], call.attrs.axis,
                                     call.attrs.out_dtype)

    mod = tvm.IRModule(dict(qdq.functions))
    main = Nudge(qdq).visit_expr(qdq["main"])
    if given is not None:
        main = relax.Function([*main.params, given], main.body, main.ret_ty, main.is_pure, main.attrs, main.span)
    mod["main"] = main
    return mod


def nudged_runs(qdq: tvm.IRModule, model: ImportedModel, steps: list[dict[str, np.ndarray]]):
    """ReferenceRun.nudged for a QDQ graph: factor -> its outputs on `steps` with the requantization nudged by that
    factor, compiled once, on the first call, for every factor (a compilation per factor took 4 x 8 s on
    MobileNetV2)."""
    mod = nudged(qdq)
    vm = functools.cache(lambda: on_host(mod, llvm_opt_level=1))
    return lambda factor: tuple(run_graph(mod, model, [{**s, NUDGE: np.array(factor, np.float32)} for s in steps],
                                          vm()))


def run_graph(mod: tvm.IRModule, model: ImportedModel, steps: list[dict[str, np.ndarray]],
              vm: relax.VirtualMachine | None = None) -> list[dict[str, np.ndarray]]:
    """The outputs of `mod` (a graph-phase module, weights bound) compiled here (or `vm`, `mod` compiled), for each
    step, by name. A streaming model's steps leave out its state inputs (verification.stream_steps): they start
    from the initial state and take each step's state outputs, as ReferenceRuntime.stream feeds the reference
    runtime."""
    vm = vm or on_host(mod, llvm_opt_level=1)
    names = [p.name for p in mod["main"].params]
    dtypes = {p.name: str(p.ty.dtype) for p in mod["main"].params if any(p.name == s.input for s in model.states)}
    fed = [s for s in model.states if s.input in dtypes]

    def state_of(values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # an unrounded twin's state inputs are float32 (reference.unrounded_integers), and a state no quantize made
        # (a frame carried as it is) comes out int8 there: widened exactly; a narrowing would be a bug, so it raises
        return {s.input: values[s.output].astype(dtypes[s.input], casting="safe") for s in fed}

    state = state_of({s.output: s.initial for s in fed})
    outputs = []
    for step in steps:
        feeds = {**step, **state}
        result = vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in names])
        values = list(result) if isinstance(result, (tvm.ir.Array, list, tuple)) else [result]
        outputs.append({spec.name: v.numpy() for spec, v in zip(model.outputs, values)})
        state = state_of(outputs[-1])
    return outputs


def quantized_reference(qdq: tvm.IRModule, model: ImportedModel, steps: list[dict[str, np.ndarray]]):
    """A ReferenceRun (edgec.verification) of the QDQ module on the sample steps, with its unrounded twin's
    outputs, which make the quantized rule apply."""
    from ..verification import ReferenceRun

    return ReferenceRun(NAME, tuple(steps), tuple(run_graph(qdq, model, steps)), frozenset(),
                        tuple(run_graph(unrounded(qdq), model, steps)),
                        nudged=nudged_runs(qdq, model, steps))
