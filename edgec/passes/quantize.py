"""The quantization steps of the pipeline (edgec.quantize): `equalize-int8`, `calibrate`, `gptq-weights-int8`,
`bias-correct-int8`, then `quantize-int8`.

They run in the graph phase right after canonicalize, before offload-quantized, whose patterns take the QDQ form
they leave to the backends' integer kernels (later constant folding would turn the int8 weights into floats).
`calibrate` folds constants first (weight transposes), so that both passes see weights as constants. `calibrate` records its ranges in a module attribute, which `quantize-int8` consumes
and replaces with the record the manifest keeps (QUANTIZATION_ATTR). Both run at every -O level: `--quantize`
asks for them, and an -O0 build must not come out float. Both are plain functions of the module, not TVM module
passes: they refuse bad input (calibration data, an unreachable error budget) with an EdgecError, which a TVM
pass would turn into its own RuntimeError.
"""
from __future__ import annotations

import base64
import json

import numpy as np
import tvm

from ..context import BuildContext
from ..errors import EdgecError
from .fold import fold_constants
from .ir import calls_any
from .registry import register_pass

RANGES_ATTR = "edgec_calibration"
EQUALIZED_ATTR = "edgec_equalized"     # how many tensors equalize-int8 rescaled, for quantize-int8's record
CORRECTION_ATTR = "edgec_bias_correction"   # bias-correct-int8's {layer: mean output error per channel}
ROUNDED_ATTR = "edgec_rounded_weights"      # gptq-weights-int8's {layer: [shape, its int8 weights in base64]}
QUANTIZATION_ATTR = "edgec_quantization"


def _int8(ctx: BuildContext) -> bool:
    return ctx.options.quantize is not None and ctx.options.quantize.mode == "int8"


def refuse_quantized(mod: tvm.IRModule) -> None:
    """--quantize int8 or int8-weights on a model quantized already is refused: its own quantization compiles as it
    is, where they would fold its int8 weights to floats and round them again (int8-weights: per channel, off the
    model's own grid, and its int8 layers leave the integer kernels)."""
    if calls_any(mod, {"relax.quantize", "relax.dequantize"}):
        raise EdgecError("the model is quantized already (it has QuantizeLinear/DequantizeLinear or integer "
                         "operators)", "build it without --quantize: its own quantization is compiled as it is")


def quantization_of(mod: tvm.IRModule) -> dict | None:
    """The record `quantize-int8` left on a module (None when it did not run)."""
    text = (mod.attrs or {}).get(QUANTIZATION_ATTR)
    return None if text is None else json.loads(str(text))


def _equalized(ctx: BuildContext) -> bool:
    # percentile clips the wide channels' tails itself: on PP-OCRv4 det it keeps 11.9 dB unequalized, 8.9 equalized
    return _int8(ctx) and ctx.options.quantize.method != "percentile"


@register_pass("equalize-int8", phase="graph", after=("canonicalize",), applies=_equalized, opt_level=0,
               skip_reason="needs --quantize int8, minmax or entropy")
def equalize_int8(ctx):
    """Even out the channels' ranges of depthwise conv inputs (factors moved into their weights) before calibrate"""
    from ..quantize.equalize import equalize

    fold = fold_constants(ctx)

    def step(mod):
        refuse_quantized(mod)
        mod, count = equalize(fold(mod), ctx.calibration)
        return mod.with_attr(EQUALIZED_ATTR, count)

    return step


@register_pass("calibrate", phase="graph", after=("canonicalize", "equalize-int8"), applies=_int8, opt_level=0,
               skip_reason="needs --quantize int8")
def calibrate(ctx):
    """Run the float model on the --calibration samples with taps on the tensors int8 will quantize; record ranges."""
    from ..quantize.calibrate import calibrate as run

    options = ctx.options.quantize
    fold = fold_constants(ctx)

    def step(mod):
        refuse_quantized(mod)
        mod = fold(mod)
        # kept for gptq-weights-int8, which taps the same graph
        ranges = run(mod, ctx.calibration, options.method, options.percentile,
                     ctx.tap_runners if _gptq_runs(ctx) else None)
        return mod.with_attr(RANGES_ATTR, json.dumps({"method": options.method, "samples": len(ctx.calibration),
                                                      "ranges": ranges}))

    return step


def _calibration(mod: tvm.IRModule, step: str) -> dict:
    """What calibrate recorded on `mod` (method, samples, ranges), which `step` needs."""
    text = (mod.attrs or {}).get(RANGES_ATTR)
    if text is None:
        raise EdgecError(f"{step} needs the ranges the calibrate pass records",
                         "do not disable calibrate while quantizing")
    return json.loads(str(text))


def _weight_max(ctx: BuildContext) -> tuple[int, str | None]:
    """The int8 weights' range (and why it is narrower than ±127): the target's offload backends' integer kernels may
    sum only a narrower one exactly (oneDNN without VNNI: ±64), and the layers are to run there."""
    from ..offload.passes import int8_weight_max

    return int8_weight_max(ctx)


def _gptq(ctx: BuildContext) -> bool:
    # minmax: on PP-OCRv4 det it takes minmax from 8.6 dB (11.7 with bias-correct-int8) to 13.7; entropy from 7.3
    # to 13.4, no better than bias-correct-int8's 13.5; percentile (unequalized) from 12.1 down to 8.8. With 7-bit
    # weights (_weight_max) every method: minmax 5.8 -> 15.1 dB, entropy 9.2 (bias-correct-int8) -> 16.4, percentile
    # 4.0 -> 7.8 (docs/architecture.md)
    from ..quantize.qdq import WEIGHT_MAX

    return _int8(ctx) and (ctx.options.quantize.method == "minmax" or _weight_max(ctx)[0] < WEIGHT_MAX)


def _gptq_runs(ctx: BuildContext) -> bool:
    return _gptq(ctx) and "gptq-weights-int8" not in ctx.options.disabled_passes


@register_pass("gptq-weights-int8", phase="graph", after=("calibrate",), applies=_gptq, opt_level=0,
               skip_reason="needs --quantize int8, minmax (any method where the weights are 7-bit)")
def gptq_weights_int8(ctx):
    """Round each int8 layer's weights to minimize its output error on the calibration samples (GPTQ), not their own"""
    from ..quantize.gptq import rounded_weights

    def step(mod):
        found = rounded_weights(mod, _calibration(mod, "gptq-weights-int8")["ranges"], ctx.calibration,
                                _weight_max(ctx)[0], ctx.tap_runners)
        ctx.tap_runners.clear()     # no later pass taps: the compiled module goes
        return mod.with_attr(ROUNDED_ATTR, json.dumps({k: [list(v.shape), base64.b64encode(v.tobytes()).decode()]
                                                       for k, v in found.items()}))

    return step


def _rounded(mod: tvm.IRModule) -> dict[str, np.ndarray] | None:
    """gptq-weights-int8's int8 weights by layer (None when it did not run)."""
    text = (mod.attrs or {}).get(ROUNDED_ATTR)
    return None if text is None else {k: np.frombuffer(base64.b64decode(data), np.int8).reshape(shape)
                                      for k, (shape, data) in json.loads(str(text)).items()}


def _bias_corrected(ctx: BuildContext) -> bool:
    # minmax and entropy: on PP-OCRv4 det it takes minmax from 8.6 to 11.7 dB and entropy from 7.3 to 13.5, but
    # percentile from 12.1 down to 10.9 (docs/architecture.md); on round to nearest only: after gptq-weights-int8 it
    # takes PP-OCRv4 det minmax from 14.6 down to 12.1 dB
    method = ctx.options.quantize.method if _int8(ctx) else None
    return method in ("minmax", "entropy") and not _gptq_runs(ctx)


@register_pass("bias-correct-int8", phase="graph", after=("calibrate",), applies=_bias_corrected, opt_level=0,
               skip_reason="needs --quantize int8, minmax or entropy, without gptq-weights-int8")
def bias_correct_int8(ctx):
    """Measure each int8 layer's mean output error per channel on the calibration samples, for its bias to take back"""
    from ..quantize.bias import corrections

    def step(mod):
        found = corrections(mod, _calibration(mod, "bias-correct-int8")["ranges"], ctx.calibration, _weight_max(ctx)[0])
        return mod.with_attr(CORRECTION_ATTR, json.dumps({k: v.tolist() for k, v in found.items()}))

    return step


@register_pass("quantize-int8", phase="graph", after=("calibrate", "gptq-weights-int8", "bias-correct-int8"),
               applies=_int8, opt_level=0, skip_reason="needs --quantize int8")
def quantize_int8(ctx):
    """Rewrite into QDQ form: uint8 activations per tensor, int8 weights per channel, int32 biases."""
    from ..quantize import qdq

    def step(mod):
        calibration = _calibration(mod, "quantize-int8")
        equalized = (mod.attrs or {}).get(EQUALIZED_ATTR)
        found = (mod.attrs or {}).get(CORRECTION_ATTR)
        # None: bias-correct-int8 did not run (disabled, percentile, or minmax after gptq-weights-int8)
        corrections = None if found is None else {k: np.array(v, np.float32) for k, v in json.loads(str(found)).items()}
        rounded = _rounded(mod)
        mod = mod.without_attr(RANGES_ATTR).without_attr(EQUALIZED_ATTR).without_attr(CORRECTION_ATTR) \
            .without_attr(ROUNDED_ATTR)
        options = ctx.options.quantize
        weight_max, narrowed = _weight_max(ctx)
        floats, mixed = set(), {}
        if options.mixed:
            from ..quantize.budget import choose_floats

            floats, chosen = choose_floats(mod, calibration["ranges"], ctx.calibration, options, corrections,
                                           rounded, weight_max)
            mixed = {"mixed_precision": chosen}
        out, record = qdq.rewrite(mod, calibration["ranges"], frozenset(floats), corrections=corrections,
                                    rounded=rounded, weight_max=weight_max)
        folded = None
        if equalized:
            from ..quantize.equalize import fold_into_producers

            out, folded = fold_into_producers(out)
        record = {"mode": "int8", "method": calibration["method"], "calibration_samples": calibration["samples"],
                  # an image folder: how its images became inputs, which a deployment must do the same way
                  **({"calibration_data": ctx.calibration.description} if ctx.calibration.description else {}),
                  **({"percentile": options.percentile} if calibration["method"] == "percentile" else {}),
                  "activations": "uint8 per tensor", "weights": "int8 per channel, symmetric"
                  + (f", within ±{weight_max}: {narrowed}" if narrowed else ""),
                  # None: equalize-int8 did not run (disabled, or percentile calibration)
                  "equalized_tensors": None if equalized is None else int(equalized),
                  # of those, how many have their factors in an int8 producer's scales (None: none equalized)
                  "equalized_in_producers": folded, **record, **mixed}
        return out.with_attr(QUANTIZATION_ATTR, json.dumps(record))

    return step
