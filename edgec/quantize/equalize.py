"""Per-channel activation equalization before int8 calibration (cross-layer equalization into depthwise convs).

An activation's int8 scale is per tensor: where its channels' ranges differ widely (PP-LCNetV3's stem: up to 50x),
the narrow channels get a few of the 256 levels. A depthwise conv's output channel reads one input channel, so it
computes the same on x_c / a_c with that output channel's weights multiplied by a_c, and their int8 error does not
change (their scale is per output channel). With a_c = r_c / max r (r_c: channel c's range on the calibration
samples, from a min/max sweep of its own), the tensor the pair is put on, x * (1 / a), has every channel's range
equal. Only tensors read by depthwise convs alone, whose widest channel's range is at least SPREAD times the median
one's, are equalized; x itself stays for readers that take no pair (an SE block's product). The multiply is an
elementwise op after x's producer, which TVM fuses into the producer's kernel.

An int8 producer cannot take it so: the integer kernel's chain (conv, bias, ReLU/clip, quantize) ends before the
multiply, so the conv writes float32 for a separate multiply-quantize kernel (MobileNetV2's expand conv: 0.49 +
0.25 ms where the whole chain takes 0.1). After quantize-int8, `fold_into_producers` moves 1 / a into the
producer's weight and bias scales instead (exact where the quantize's saturation clips at least as much as the
ReLU/clip on every channel, which then goes: ReLU6's 0 and 6 / a_c on each channel against a uint8 tensor's
[0, top], top <= 6 / a_c since a_c = r_c / top and r_c <= 6).

Tried and left out: SmoothQuant's a_c = sqrt(r_c / w_c) for the inputs of dense convs too (w_c the largest weight
reading channel c) gave PP-OCRv4 det minmax 6.7 dB (depthwise alone: 9.6 in the same exploratory script): a column
scaled up raises its output channels' weight scales, and per-output-channel weights then lose what the activation
gained.
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax

from ..dataset import Dataset
from ..passes.ir import clip_bounds, clip_half, op_name, readers
from ..progress import current
from . import analysis
from .calibrate import Runner, sweep

SPREAD = 4.0        # max range / median range at which a tensor is equalized
_FLOOR = 1e-3       # a channel's range is taken as at least this share of the widest (dead channels: range 0)


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
    read_by = readers(func)
    out = {}
    for key, tensor in plan.tensors:
        users = read_by.get(tensor, [])
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
    read_by = readers(func)
    reader_of = {u: t for t in scale for u in read_by[t]}
    axis = {t: _channel_axis(values[read_by[t][0]]) for t in scale}

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


def _activation(value) -> tuple[relax.Expr, float, float] | None:
    """(x, lo, hi) of a ReLU, a clip or one call_tir half of an ONNX Clip; None for anything else."""
    if op_name(value) == "relax.nn.relu":
        return value.args[0], 0.0, math.inf
    if op_name(value) == "relax.clip":
        bounds = clip_bounds(value)
        return None if bounds is None else (value.args[0], *bounds)
    return clip_half(value) if isinstance(value, relax.Call) else None


def _redundant(bound: float, factor: np.ndarray, saturates: float, lower: bool) -> bool:
    """Whether a clip bound on y clips nothing of quantize(y * factor) (factor > 0, per channel): the quantize
    saturates at or inside bound * factor on every channel."""
    return math.isinf(bound) or bool((bound * factor <= saturates if lower else bound * factor >= saturates).all())


def _dequantize_scaled(value: relax.Call, factor: np.ndarray) -> relax.Call | None:
    """dequantize(const q, const scale per channel, zero point) with its scale multiplied by `factor`."""
    if op_name(value) != "relax.dequantize" or not isinstance(value.args[0], tvm.ir.expr.Constant) \
            or not isinstance(value.args[1], tvm.ir.expr.Constant):
        return None
    scale = value.args[1].value.numpy()
    if scale.size != factor.size:
        return None
    new = (scale.reshape(-1).astype(np.float64) * factor).astype(np.float32).reshape(scale.shape)
    return relax.Call(value.op, [value.args[0], relax.const(new), value.args[2]], value.attrs)


def fold_into_producers(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """(main with each equalization multiply that sits between an int8 conv's chain and its quantize moved into
    the conv's weight and bias dequantize scales, how many): quantize(act(conv(x, dq(w)) + dq(b)) * (1 / a))
    becomes quantize(conv(x, dq'(w)) + dq'(b)) where the quantize's saturation makes the ReLU/clip redundant."""
    func = mod["main"]
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    read_by = readers(func)

    def only_reader(var, reader) -> bool:
        return read_by.get(var) == [reader]

    new: dict[relax.Var, relax.Expr] = {}
    for var, value in values.items():
        users = read_by.get(var, [])
        if op_name(value) != "relax.multiply" or not isinstance(value.args[1], tvm.ir.expr.Constant) \
                or len(users) != 1 or op_name(values.get(users[0])) != "relax.quantize":
            continue
        quantize = values[users[0]]
        if not all(isinstance(a, tvm.ir.expr.Constant) and a.value.numpy().size == 1 for a in quantize.args[1:]):
            continue
        lo, hi, reader, x = -math.inf, math.inf, var, value.args[0]
        while x in values and only_reader(x, reader) and (act := _activation(values[x])) is not None:
            lo, hi, reader, x = max(lo, act[1]), min(hi, act[2]), x, act[0]
        chain, bias = x, None
        if x in values and only_reader(x, reader) and op_name(values[x]) == "relax.add" and values[x].args[1] in values:
            bias, reader, x = values[x].args[1], x, values[x].args[0]
        conv = values.get(x)
        if op_name(conv) != analysis.CONV or not only_reader(x, reader) or conv.args[1] not in values \
                or not only_reader(conv.args[1], x) or bias is not None and not only_reader(bias, reader):
            continue
        factor = value.args[1].value.numpy()
        channel = str(conv.attrs.out_layout or conv.attrs.data_layout).index("C")
        channels = int(conv.ty.shape[channel])
        if factor.ndim != len(conv.ty.shape) or factor.size != channels or factor.shape[channel] != channels \
                or not (np.isfinite(factor) & (factor > 0)).all():
            continue
        factor = factor.reshape(-1).astype(np.float64)
        s, z = (a.value.numpy().item() for a in quantize.args[1:])
        info = np.iinfo(str(quantize.attrs.out_dtype))
        weights = _dequantize_scaled(values[conv.args[1]], factor)
        bias_scaled = None if bias is None else _dequantize_scaled(values[bias], factor)
        # the quantize rounds v / s + z to the nearest integer, then saturates: v a quarter step inside the edge
        # gives the edge already (half a step would be a tie: round half away from zero or to even)
        if not (_redundant(lo, factor, s * (int(info.min) - z + 0.25), lower=True)
                and _redundant(hi, factor, s * (int(info.max) - z - 0.25), lower=False)) \
                or weights is None or bias is not None and bias_scaled is None:
            continue
        new[conv.args[1]] = weights
        if bias is not None:
            new[bias] = bias_scaled
        new[var] = chain      # the quantize reads the chain: the activation and the multiply are left unread
    if not new:
        return mod, 0

    @relax.expr_functor.mutator
    class Fold(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            if binding.var not in new:
                return super().visit_var_binding_(binding)
            value = self.builder_.normalize(self.visit_expr(new[binding.var]))
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))

    out = mod.clone()
    out["main"] = Fold(mod).visit_expr(func)
    folded = sum(op_name(values[v]) == "relax.multiply" for v in new)
    return relax.transform.DeadCodeElimination()(relax.transform.CanonicalizeBindings()(out)), folded
