"""The int8 rewrite into QDQ form, from the calibrated ranges.

Activations: uint8, per tensor, asymmetric over the calibrated range (widened to hold 0, which padding and ReLU
produce exactly). Weights: int8, symmetric, per output channel, stored as int8 constants behind a dequantize.
Biases: int32 with scale s_x * s_w, zero point 0, as onnxruntime's QDQ quantizer stores them (a channel's s_w
raised where its bias would not fit, `fit_bias`). Each quantized
input gets `dequantize(quantize(x))`; identical pairs on one tensor are then merged, so a tensor read by
several layers is quantized once.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..errors import EdgecError
from . import analysis

_INT32 = np.iinfo(np.int32)


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """uint8 (scale, zero point) covering [lo, hi] and 0."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / 255 if hi > lo else 1.0
    return float(np.float32(scale)), int(np.clip(np.round(-lo / scale), 0, 255))


WEIGHT_MAX = 127   # int8 weights use [-127, 127]; a backend may sum exactly only a narrower range (weight_max)


def weight_params(w: np.ndarray, axis: int, weight_max: int = WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weights, float32 scale per channel along `axis`), symmetric over [-weight_max, weight_max]."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    top = np.abs(w).max(axis=reduce)
    scale = np.where(top > 0, top / weight_max, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    return np.clip(np.round(w / scale.reshape(shape)), -weight_max, weight_max).astype(np.int8), scale


def layer_weights(layer: analysis.Compute, rounded: np.ndarray | None = None,
                  weight_max: int = WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """A quantized layer's (int8 weights, scales): rounded to nearest, or `rounded` (edgec.quantize.gptq's, which
    keeps weight_params's scales)."""
    wq, scale = weight_params(layer.weight.value.numpy(), layer.weight_axis, weight_max)
    return (wq if rounded is None else rounded), scale


# an int32 bias at most this large leaves the int32 accumulator room for the products' sum (K * 127 * 255)
BIAS_MAX = 2 ** 30


def fit_bias(layer: analysis.Compute, wq: np.ndarray, sw: np.ndarray, sx: float, bias: np.ndarray | None,
             weight_max: int = WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """(wq, sw) with the weight scale of each channel whose bias would be beyond BIAS_MAX at sx * sw raised until it
    fits, that channel's weights rounded again on it. Such a channel's products are under K * 127 * 255 / 2^30 of
    its bias (a depthwise conv's: 3e-4), so coarser weights cost it nothing measurable, where a float bias kept the
    whole layer out of the integer chain (its conv writing float32 for a float bias add)."""
    if bias is None:
        return wq, sw
    need = np.abs(bias.reshape(-1).astype(np.float64)) / (np.float64(sx) * BIAS_MAX)
    grow = need > sw
    if not grow.any():
        return wq, sw
    sw = np.where(grow, need * (1 + 1e-6), sw).astype(np.float32)    # float32 rounding must not land under `need`
    w = layer.weight.value.numpy()
    shape = [1] * w.ndim
    shape[layer.weight_axis] = -1
    again = np.clip(np.round(w / sw.reshape(shape)), -weight_max, weight_max).astype(np.int8)
    return np.where(grow.reshape(shape), again, wq), sw


def quantize_pair(x: relax.Expr, scale: float, zero_point: int) -> relax.Expr:
    s, z = relax.const(scale, "float32"), relax.const(zero_point, "uint8")
    return relax.op.dequantize(relax.op.quantize(x, s, z, axis=-1, out_dtype="uint8"), s, z, axis=-1)


SWITCH = "edgec_int8_switch"   # the switchable module's extra parameter: one bool per layer, true = int8


def rewrite(mod: tvm.IRModule, ranges: dict[str, tuple[float, float]], floats: frozenset[str] = frozenset(),
            switchable: bool = False, corrections: dict[str, np.ndarray] | None = None,
            rounded: dict[str, np.ndarray] | None = None, weight_max: int = WEIGHT_MAX) -> tuple[tvm.IRModule, dict]:
    """(the QDQ module, what was done: layers and tensors quantized, what stayed float and why).

    `corrections`: {layer name: its mean output error per output channel} (edgec.quantize.bias), subtracted from
    the layer's bias where it is int8 (a float layer keeps the float model's bias). `rounded`: {layer name: its int8
    weights} (edgec.quantize.gptq) in place of round to nearest. `weight_max`: the weights' range, ±127 or less.

    `floats`: layers (analysis.Plan.layers names) left float: their inputs, weights and bias as the float model
    has them. `switchable`: instead, main takes one more parameter, SWITCH, a bool vector with one entry per
    layer (in Plan.layers order), and each layer selects quantized or plain by it on what it quantizes: one
    compiled module that runs any mix of int8 and float layers (the error-budget search, edgec.quantize.budget).
    """
    func = mod["main"]
    plan = analysis.plan(func)
    if sorted(plan.keys()) != sorted(ranges):
        raise EdgecError("the graph changed between calibrate and quantize-int8",
                         "run quantize-int8 right after calibrate (report this with --dump-ir output)")
    params = {t: activation_params(*ranges[k]) for k, t in plan.tensors}
    stayed = dict(plan.float_ops)
    done = {"layers": 0, "biases": 0, "corrected": 0}
    layer_scales: dict[relax.Var, np.ndarray] = {}   # a quantized layer's var -> s_x * s_w per channel
    switch = relax.Var(SWITCH, relax.TensorType([len(plan.layers)], "bool")) if switchable else None
    position = {var: i for i, var in enumerate(plan.layers)}

    def keep(why: str):
        stayed[why] = stayed.get(why, 0) + 1

    def choose(layer: relax.Var, plain: relax.Expr, quantized: relax.Expr) -> relax.Expr:
        if switch is None:
            return plain if plan.layers[layer] in floats else quantized
        # a select, not plain + s * (quantized - plain): that is the QDQ value only to a rounding, and NaN where
        # plain is infinite
        return relax.op.where(relax.op.take(switch, relax.const(position[layer], "int64"), axis=0), quantized, plain)

    def pairs(layer: relax.Var, originals, news) -> list[relax.Expr]:
        return [choose(layer, n, quantize_pair(n, *params[o])) if o in params else n for o, n in zip(originals, news)]

    @relax.expr_functor.mutator
    class QDQ(relax.PyExprMutator):
        def visit_var_binding_(self, binding):
            self.binding = binding.var
            super().visit_var_binding_(binding)

        def visit_call_(self, call):
            new = super().visit_call_(call)
            var, args = self.binding, list(new.args)
            if var in plan.compute:
                layer = plan.compute[var]
                x = call.args[0]
                wq, sw = layer_weights(layer, (rounded or {}).get(plan.layers[var]), weight_max)
                sx, zx = params[x]
                wq, sw = fit_bias(layer, wq, sw, sx, biases.get(var), weight_max)
                args[0] = choose(var, args[0], quantize_pair(args[0], sx, zx))
                args[1] = choose(var, args[1], relax.op.dequantize(
                    relax.const(wq), relax.const(sw), relax.const(np.zeros_like(sw, np.int8)), axis=layer.weight_axis))
                if switch is None and plan.layers[var] in floats:
                    return new
                layer_scales[var] = (np.float64(sx) * sw.astype(np.float64)).astype(np.float32)
                done["layers"] += 1
                return relax.Call(new.op, args, new.attrs)
            if var in plan.bias:
                return self._bias(new, plan.bias[var]) if plan.bias[var] in layer_scales else new
            if var not in plan.layers:
                return new
            if isinstance(args[0], relax.Tuple):       # concat
                fields = pairs(var, call.args[0].fields, args[0].fields)
                return relax.Call(new.op, [relax.Tuple(fields), *args[1:]], new.attrs)
            return relax.Call(new.op, pairs(var, call.args, args), new.attrs)

        def _bias(self, new: relax.Call, layer: relax.Var) -> relax.Call:
            compute = plan.compute[layer]
            scale = layer_scales[layer]
            bias = biases[layer]
            done["corrected"] += bool(corrections and plan.layers[layer] in corrections)
            q = np.round(bias.astype(np.float64) / scale.reshape(bias.shape).astype(np.float64))
            if (np.abs(q) > _INT32.max).any():
                keep("bias beyond int32 at scale s_x * s_w")
                return new
            axis = compute.channel_axis if bias.ndim > 1 else 0
            dq = relax.op.dequantize(relax.const(q.astype(np.int32)), relax.const(scale),
                                     relax.const(np.zeros(scale.shape, np.int32)), axis=axis)
            done["biases"] += 1
            return relax.Call(new.op, [new.args[0], choose(layer, new.args[1], dq)], new.attrs)

    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    biases = {}     # a quantized layer's var -> its bias as quantize-int8 stores it (corrected; fit_bias, _bias)
    for add, layer in plan.bias.items():
        b = values[add].args[1].value.numpy()
        if corrections and plan.layers[layer] in corrections:
            b = b - corrections[plan.layers[layer]].reshape(b.shape)
        biases[layer] = b

    mutator = QDQ(mod)
    out = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    body = mutator.visit_expr(func)
    if switch is not None:
        body = relax.Function([*func.params, switch], body.body, attrs=func.attrs)
        if "num_input" in (func.attrs or {}):   # SWITCH is an input, not a weight
            body = body.with_attr("num_input", int(func.attrs["num_input"]) + 1)
    out["main"] = body
    # the pairs put on one tensor for each of its readers are identical: one quantize, one dequantize per tensor
    out = relax.transform.EliminateCommonSubexpr()(out)
    record = {"layers": done["layers"], "biases": done["biases"], "tensors": len(plan.tensors),
              # None: bias-correct-int8 did not run
              "bias_corrected": None if corrections is None else done["corrected"],
              # None: gptq-weights-int8 did not run
              "weights_rounded": None if rounded is None else sum(plan.layers[v] in rounded for v in layer_scales),
              "float": [{"what": why, "count": n} for why, n in sorted(stayed.items())]}
    return out, record
