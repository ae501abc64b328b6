"""Empirical bias correction: each int8 layer's mean output error, per output channel, folded into its bias.

Rounding weights to int8 moves a layer's output by (W_q - W) x, whose mean over the samples is not zero where x's
mean is not (post-ReLU and hardswish activations, a depthwise channel's 9 weights); clipping an activation to its
calibrated range (percentile, entropy, mse) moves it by a mean of its own. Both are a constant per output channel
that the int32 bias can take back. The error measured is the layer's own: its int8 form (the input's
quantize → dequantize pair, the int8 weights) on the float model's own input, minus its float output, averaged
over the calibration samples and every position, in one sweep of the float model with one tap per layer. A layer
corrected for its own error only leaves the next layers' inputs as close to float as it can, so the corrections
do not add up along the graph. Layers without a bias add (nothing to fold into) stay uncorrected.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..dataset import Dataset
from ..progress import current
from . import analysis, qdq
from .calibrate import Runner, sweep


def _error_module(mod: tvm.IRModule, ranges: dict, layers: list[relax.Var], weight_max: int) -> tvm.IRModule:
    """main returning (its result, for each of `layers` the mean of its int8 output minus its float output per
    output channel), from a non-dataflow copy (dataflow vars cannot leave their block)."""
    flat = relax.transform.ToNonDataflow()(mod)
    func = flat["main"]
    plan = analysis.plan(func)
    params = {t: qdq.activation_params(*ranges[k]) for k, t in plan.tensors}
    values = {b.var: b.value for block in func.body.blocks for b in block.bindings}
    # the non-dataflow copy has new vars: the layers are found again by name, which plan gives both alike
    by_name = {name: var for var, name in plan.layers.items()}
    original = analysis.plan(mod["main"]).layers
    wanted = [by_name[original[v]] for v in layers]
    bb = relax.BlockBuilder()
    with bb.function("main", func.params, attrs=dict(func.attrs or {})):
        for block in func.body.blocks:
            for binding in block.bindings:
                bb.emit_normalized(binding)
        taps = []
        for var in wanted:
            call, layer = values[var], plan.compute[var]
            x = call.args[0]
            wq, sw = qdq.weight_params(layer.weight.value.numpy(), layer.weight_axis, weight_max)
            weights = relax.op.dequantize(relax.const(wq), relax.const(sw), relax.const(np.zeros_like(sw, np.int8)),
                                          axis=layer.weight_axis)
            quantized = bb.emit(relax.Call(call.op, [qdq.quantize_pair(x, *params[x]), weights, *call.args[2:]],
                                           call.attrs, call.ty_args))
            error = bb.emit(relax.op.subtract(quantized, var))
            rank = len(var.ty.shape)
            taps.append(bb.emit(relax.op.mean(error, axis=[a for a in range(rank) if a != layer.channel_axis])))
        bb.emit_func_output(relax.Tuple([func.body.body, *taps]))
    out = tvm.IRModule({gv: f for gv, f in flat.functions_items() if gv.name_hint != "main"})
    out["main"] = bb.get()["main"]
    return relax.transform.Normalize()(out)


def corrections(mod: tvm.IRModule, ranges: dict, data: Dataset,
                weight_max: int = qdq.WEIGHT_MAX) -> dict[str, np.ndarray]:
    """{layer name (analysis.Plan.layers): its int8 form's mean output error per output channel} on `data`, for
    every quantized layer with a bias add."""
    plan = analysis.plan(mod["main"])
    layers = [var for var in plan.compute if var in set(plan.bias.values())]
    if not layers:
        return {}
    current().detail("bias correction: compile the float model with each layer's int8 error")
    runner = Runner(_error_module(mod, ranges, layers, weight_max), [p.name for p in mod["main"].params])
    total = [np.zeros(int(var.ty.shape[plan.compute[var].channel_axis]), np.float64) for var in layers]

    def add(taps):
        for t, tap in zip(total, taps):
            t += tap

    sweep(runner, data, "bias correction", add)
    return {plan.layers[var]: (t / len(data)).astype(np.float32) for var, t in zip(layers, total)}
