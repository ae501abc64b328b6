"""Per-channel activation equalization before int8 calibration (cross-layer equalization into depthwise convs).

An activation's int8 scale is per tensor: where its channels' ranges differ widely (PP-LCNetV3's stem: up to 50x),
the narrow channels get a few of the 256 levels. A depthwise conv's output channel reads one input channel, so it
computes the same on x_c / a_c with that output channel's weights multiplied by a_c, and their int8 error does not
change (their scale is per output channel). With a_c = r_c / max r (r_c: channel c's range on the calibration
samples, from a min/max sweep of its own), the tensor the pair is put on, x * (1 / a), has every channel's range
equal. Only tensors read by depthwise convs alone, whose widest channel's range is at least SPREAD times the median
one's, are equalized; x itself stays for readers that take no pair (an SE block's product). The multiply is an
elementwise op after x's producer, which TVM fuses into the producer's kernel.

Tried and left out: SmoothQuant's a_c = sqrt(r_c / w_c) for the inputs of dense convs too (w_c the largest weight
reading channel c) gave PP-OCRv4 det minmax 6.7 dB (depthwise alone: 9.6 in the same exploratory script): a column
scaled up raises its output channels' weight scales, and per-output-channel weights then lose what the activation
gained.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..dataset import Dataset
from ..progress import current
from . import analysis
from .calibrate import Runner, sweep

SPREAD = 4.0        # max range / median range at which a tensor is equalized
_FLOOR = 1e-3       # a channel's range is taken as at least this share of the widest (dead channels: range 0)


def _readers(func: relax.Function) -> dict[relax.Var, list[relax.Var]]:
    """Every var -> the bindings whose value reads it."""
    readers: dict[relax.Var, list[relax.Var]] = {}
    for block in func.body.blocks:
        for binding in block.bindings:
            def note(expr, var=binding.var):
                if isinstance(expr, relax.Var):
                    readers.setdefault(expr, []).append(var)
            relax.analysis.post_order_visit(binding.value, note)
    relax.analysis.post_order_visit(func.body.body, lambda e: readers.setdefault(e, []).append(None)
                                    if isinstance(e, relax.Var) else None)
    return readers


def _channel_axis(call: relax.Call) -> int:
    return str(call.attrs.data_layout).index("C")


def _channel_map(call: relax.Call) -> np.ndarray:
    """For each weight of a depthwise conv, the input channel it reads (output channel o reads o // multiplier),
    shaped to broadcast against the weights."""
    w = call.args[1].value.numpy()
    o = str(call.attrs.kernel_layout).index("O")
    shape = [1] * w.ndim
    shape[o] = w.shape[o]
    return (np.arange(w.shape[o]) // (w.shape[o] // int(call.attrs.groups))).reshape(shape)


def _depthwise(call: relax.Call) -> bool:
    """Each output channel reads one input channel (weights [C * multiplier, 1, kh, kw])."""
    return call.op.name == analysis.CONV and \
        call.args[1].value.numpy().shape[str(call.attrs.kernel_layout).index("I")] == 1


def candidates(func: relax.Function, plan: analysis.Plan) -> dict[str, tuple[relax.Var, list[relax.Var]]]:
    """{plan key: (tensor, its readers)} for the tensors every reader of which is a quantized depthwise conv."""
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    readers = _readers(func)
    out = {}
    for key, tensor in plan.tensors:
        users = readers.get(tensor, [])
        if tensor not in values or not users or any(u is None or u not in plan.compute for u in users):
            continue
        calls = [values[u] for u in users]
        if all(_depthwise(c) and c.args[0].same_as(tensor) for c in calls):
            out[key] = (tensor, users)
    return out


def factors(found: dict[str, tuple[relax.Var, list[relax.Var]]], ranges: dict[str, np.ndarray]
            ) -> dict[relax.Var, np.ndarray]:
    """{tensor: a, one factor per channel} for the `found` candidates whose per-channel `ranges` warrant it."""
    out = {}
    for key, (tensor, _) in found.items():
        r = ranges[key]
        top = float(r.max())
        if top <= 0 or top < SPREAD * float(np.median(r)):
            continue
        out[tensor] = (np.maximum(r, _FLOOR * top) / top).astype(np.float32)
    return out


def rewrite(mod: tvm.IRModule, scale: dict[relax.Var, np.ndarray]) -> tvm.IRModule:
    """main with x * (1 / a) read by x's depthwise readers in place of x, and their weights multiplied by a."""
    func = mod["main"]
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    readers = _readers(func)
    reader_of = {u: t for t in scale for u in readers[t]}
    axis = {t: _channel_axis(values[readers[t][0]]) for t in scale}

    @relax.expr_functor.mutator
    class Equalize(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.scaled: dict[relax.Var, relax.Var] = {}

        def visit_var_binding_(self, binding):
            if binding.var in reader_of:
                call = values[binding.var]
                tensor = reader_of[binding.var]
                weights = call.args[1].value.numpy() * scale[tensor][_channel_map(call)]
                value = relax.Call(call.op, [self.scaled[tensor], relax.const(weights.astype(np.float32))],
                                   call.attrs, call.ty_args)
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))
                return
            super().visit_var_binding_(binding)
            if binding.var in scale:
                a = scale[binding.var]
                shape = [1] * len(binding.var.ty.shape)
                shape[axis[binding.var]] = -1
                inverse = relax.const((1 / a).astype(np.float32).reshape(shape))
                self.scaled[binding.var] = self.builder_.emit(
                    relax.op.multiply(self.visit_expr(binding.var), inverse), name_hint=f"{binding.var.name}_eq")

    out = mod.clone()
    out["main"] = Equalize(mod).visit_expr(func)
    return relax.transform.Normalize()(out)


def equalize(mod: tvm.IRModule, data: Dataset) -> tuple[tvm.IRModule, int]:
    """(main with its widely spread depthwise conv inputs equalized on `data`'s per-channel ranges, how many)."""
    func = mod["main"]
    plan = analysis.plan(func)
    found = candidates(func, plan)
    if not found:
        return mod, 0
    keys = plan.keys()
    current().detail("equalization: compile the float model with taps")
    runner = Runner.tapping(mod, keys)
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    axes = {k: _channel_axis(values[users[0]]) for k, (_, users) in found.items()}
    widest: dict[str, np.ndarray] = {}

    def per_channel(taps):
        for key, t in zip(keys, taps):
            if key in found:
                other = tuple(d for d in range(t.ndim) if d != axes[key])
                span = np.maximum(t.max(axis=other), 0) - np.minimum(t.min(axis=other), 0)
                widest[key] = np.maximum(widest[key], span) if key in widest else span

    sweep(runner, data, "equalization per-channel min/max", per_channel)
    scale = factors(found, widest)
    return (rewrite(mod, scale), len(scale)) if scale else (mod, 0)
