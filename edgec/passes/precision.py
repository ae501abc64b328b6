"""Reduced precision without calibration: `--quantize fp16` and `--quantize int8-weights`.

fp16 (`to-fp16`, graph phase): TVM's ToMixedPrecision. Activations and weights are fp16 and elementwise ops
compute in fp16; conv2d and matmul multiply fp16 operands and accumulate in fp32 (out_dtype float32), each result
rounded once to fp16; what ToMixedPrecision keeps float32 (softmax, reductions) computes on widened fp16 values. The bundle's inputs and outputs stay float32 (what the user's code and the reference
runtime exchange; one cast each, negligible against the graph). The offload backends take float32 only, so fp16
kernels are TVM's. Only for targets whose descriptor has `device.fp16 = true`.

int8-weights: `round-weights-int8` (graph phase) rounds each conv/matmul weight to int8 per output channel,
symmetric (scale = max|w| / 127), leaving float32 constants that are exactly q * scale; compute stays float32.
`store-weights-int8` (params phase, after the offload backends' load function exists) stores every weight
parameter that is exactly some int8 q times a per-slice float32 scale as (q, scale) in params.bin, and the load
function (`main_load`, called once per loaded model) computes q * scale: the same float32 values, bit for bit (one
IEEE multiply), so the weights are dequantized once at load, never per call, and the backends pack them from there.

Both are verified through the graph they left, run here (precision_reference).
"""
from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import tvm
from tvm import relax

from ..context import BuildContext
from ..errors import EdgecError
from ..quantize import FP16_MIN_SQNR_DB
from ..reference import PRECISION_RULE, decibels
from .fold import DEQUANTIZED_SCALES_ATTR, fold_constants
from .ir import ClipHalves
from .params import MIN_LIFTED_ELEMENTS, identity_load
from .quantize import QUANTIZATION_ATTR, quantization_of, refuse_quantized
from .registry import register_pass

INT8_MAX = 127
# a scale per fewer elements saves nothing, and one element is any float32 times some scale (a bias is not int8)
_MIN_SLICE = 8


def _mode(ctx: BuildContext) -> str | None:
    return ctx.options.quantize.mode if ctx.options.quantize is not None else None


def check_target(mode: str, target) -> None:
    """--quantize fp16 for a target without fp16 arithmetic is refused (it would run slower than float32, emulated
    through conversions, for no gain but the size)."""
    if mode != "fp16" or target.device.fp16:
        return
    from ..targets import all_targets

    having = sorted(t.name for t in all_targets() if t.device.fp16)
    raise EdgecError(f"--quantize fp16 needs a target that computes in fp16, and {target.name}'s descriptor does not "
                     "set device.fp16 = true",
                     f"build for one that does ({', '.join(having) or 'none is installed'}), or use --quantize "
                     "int8-weights for a smaller bundle on any target")


@register_pass("to-fp16", phase="graph", after=("canonicalize",), applies=lambda ctx: _mode(ctx) == "fp16",
               opt_level=0, skip_reason="needs --quantize fp16")
def to_fp16(ctx):
    """Compute in fp16: fp16 weights and activations, conv/matmul accumulating in fp32; inputs/outputs stay fp32."""
    # the weights' casts to fp16 folded here, not left to fold-constants (-O1): at -O0 they stayed float32 in
    # params.bin and were cast on every call. One cast per use of a weight: merged first, or a weight two operators
    # share would be stored twice.
    fold, merge = fold_constants(ctx), relax.transform.EliminateCommonSubexpr()

    def step(mod):     # a plain function: an EdgecError raised in a tvm module_pass comes back as TVM's error
        # folded first: the importer's Clip bounds come as where(isnan(c), -inf, c), which ClipHalves needs as
        # constants, and fold-constants may come after this pass (or not run, at -O0)
        mod = fold(mod)
        clips = ClipHalves(mod, as_clip=False)
        clips.builder_.update_func(mod.get_global_var("main"), clips.visit_expr(mod["main"]))
        mod = clips.builder_.get()
        try:
            mixed = relax.transform.ToMixedPrecision(out_dtype="float32")(mod)
        except Exception as e:  # TVM's check failure on a call_tir; with none, the pass manager's report stands
            kernels = _call_tir_kernels(mod["main"])
            if not kernels:
                raise
            raise EdgecError(f"--quantize fp16 cannot convert this model: TVM's ToMixedPrecision fails on the kernels "
                             f"its importer wrote directly ({', '.join(kernels)})",
                             "build it in float32, or with --quantize int8-weights for a smaller bundle") from e
        # called, not sequenced: a Sequential skips passes above the build's opt level (CSE is -O1)
        mod = fold(merge(mixed))
        floor = ctx.options.quantize.min_sqnr_db
        record = {"mode": "fp16", "compute": "fp16 (elementwise ops, activations, weights)",
                  "accumulation": "float32 in conv/matmul, each result rounded to fp16",
                  "inputs_outputs": "float32", "kernels": "TVM's (the offload backends take float32 only)",
                  "min_sqnr_db": FP16_MIN_SQNR_DB if floor is None else floor}
        return mod.with_attr(QUANTIZATION_ATTR, json.dumps(record))

    return step


def _call_tir_kernels(func: relax.Function) -> list[str]:
    """The names of the kernels `func` calls through call_tir, sorted, once each."""
    names = set()
    relax.analysis.post_order_visit(func, lambda e: names.add(e.args[0].name_hint) if isinstance(e, relax.Call) and
                                    e.op == tvm.ir.Op.get("relax.call_tir") else None)
    return sorted(names)


def _weight_axis(call: relax.Call) -> int | None:
    """The output-channel axis of a conv/matmul call's constant weight (its second argument), else None."""
    op = getattr(call.op, "name", "")
    if len(call.args) < 2 or not isinstance(call.args[1], tvm.ir.expr.Constant):
        return None
    if op.startswith("relax.nn.conv") and "transpose" not in op:
        return str(call.attrs.kernel_layout).index("O")
    if op == "relax.matmul" and call.args[1].value.ndim >= 2:
        return call.args[1].value.ndim - 1       # x @ w: w's last axis indexes the outputs
    return None


def round_int8(weight: np.ndarray, axis: int) -> np.ndarray:
    """`weight` rounded to symmetric int8 per slice along `axis`: float32(q) * scale, scale = max|slice| / 127."""
    moved = np.moveaxis(weight.astype(np.float32), axis, 0)
    peak = np.abs(moved).reshape(len(moved), -1).max(axis=1)
    scale = np.where(peak > 0, peak / np.float32(INT8_MAX), np.float32(1)).astype(np.float32)
    scale = scale.reshape((-1,) + (1,) * (moved.ndim - 1))
    q = np.clip(np.rint(moved / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
    return np.moveaxis(q.astype(np.float32) * scale, 0, axis)


@register_pass("round-weights-int8", phase="graph", after=("canonicalize",),
               applies=lambda ctx: _mode(ctx) == "int8-weights", opt_level=0, skip_reason="needs --quantize int8-weights")
def round_weights_int8(ctx):
    """Round conv/matmul weights to int8 per output channel (symmetric); compute stays float32."""
    fold = fold_constants(ctx)

    @relax.expr_functor.mutator
    class Rounder(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.rounded: list[tuple[tvm.runtime.Tensor, relax.Expr]] = []   # a weight, its rounded constant
            self.elements = 0

        def visit_call_(self, call):
            call = super().visit_call_(call)
            axis = _weight_axis(call)
            # a weight lift-params leaves in the code is not worth a scale
            if (axis is None or call.args[1].value.dtype != "float32"
                    or call.args[1].value.numpy().size < MIN_LIFTED_ELEMENTS):
                return call
            weight = call.args[1].value
            rounded = next((r for w, r in self.rounded if w.same_as(weight)), None)   # a weight used twice
            if rounded is None:
                rounded = relax.const(round_int8(weight.numpy(), axis))
                self.rounded.append((weight, rounded))
                self.elements += weight.numpy().size
            return relax.Call(call.op, [call.args[0], rounded, *call.args[2:]], call.attrs, call.ty_args)

    def step(mod):     # a plain function, as to-fp16's
        refuse_quantized(mod)
        mod = fold(mod)   # weights behind transposes and casts become constants the calls take
        rounder = Rounder(mod)
        rounder.builder_.update_func(mod.get_global_var("main"), rounder.visit_expr(mod["main"]))
        record = {"mode": "int8-weights", "weights": "int8 per output channel, symmetric (scale = max|w| / 127), "
                  "dequantized once at load", "compute": "float32", "rounded_tensors": len(rounder.rounded),
                  "rounded_elements": rounder.elements}
        return rounder.builder_.get().with_attr(QUANTIZATION_ATTR, json.dumps(record))

    return step


def int8_encoding(weight: np.ndarray, scales: Sequence[np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray, int] | None:
    """(q int8, scale float32, axis) with float32(q) * scale[index along axis] == weight exactly; None when no axis
    gives that. The scales tried per slice: `scales` of the axis's length where given (those of the int8 weights a
    fold dequantized), else round-weights-int8's, max|slice| / 127 and its neighbours."""
    if weight.dtype != np.float32 or weight.ndim < 1 or weight.size < MIN_LIFTED_ELEMENTS or not np.isfinite(weight).all():
        return None
    for axis in reversed(range(weight.ndim)):
        if weight.size // weight.shape[axis] < _MIN_SLICE:
            continue
        moved = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)
        if scales is None:
            peak = np.abs(moved).max(axis=1)
            # the scale round_int8 chose: peak = float32(127 * scale), so peak / 127 is it or a neighbour
            first = np.where(peak > 0, peak / np.float32(INT8_MAX), np.float32(1)).astype(np.float32)
            candidates = [first, np.nextafter(first, np.float32(np.inf)), np.nextafter(first, np.float32(0))]
        else:
            candidates = [c for c in scales if c.shape == (len(moved),) and (c > 0).all()]
        scale = np.full(len(moved), np.nan, np.float32)
        q = np.zeros(moved.shape, np.int8)
        for candidate in candidates:
            rounded = np.clip(np.rint(moved / candidate[:, None]), -128, INT8_MAX).astype(np.int8)
            # what the load function computes, compared as bits: == takes -0.0 for the +0.0 that q = 0 gives back
            # (1 / w would change sign)
            back = rounded.astype(np.float32) * candidate[:, None]
            exact = np.isnan(scale) & (back.view(np.uint32) == moved.view(np.uint32)).all(axis=1)
            scale[exact], q[exact] = candidate[exact], rounded[exact]
        if not np.isnan(scale).any():
            q = np.moveaxis(q.reshape(np.moveaxis(weight, axis, 0).shape), 0, axis)
            return np.ascontiguousarray(q), scale, axis
    return None


def _dequantize_kernel(rank: int, axis: int) -> tvm.tirx.PrimFunc:
    """w = float32(q) * scale[index along `axis`] for a weight of any shape of this rank: one kernel serves every
    weight of one (rank, channel axis), instead of one per shape."""
    from tvm import te

    shape = [te.var(f"d{k}", "int64") for k in range(rank)]
    q = te.placeholder(shape, "int8", name="q")
    scale = te.placeholder((shape[axis],), "float32", name="scale")
    w = te.compute(shape, lambda *i: q[i].astype("float32") * scale[i[axis]], name="w")
    return te.create_prim_func([q, scale, w]).without_attr("global_symbol")   # private, as legalized kernels


def _store_int8(load: relax.Function, kernel, normalize, scales: Sequence[np.ndarray] | None
                ) -> tuple[relax.Function, int, int]:
    """The load function taking (q, scale) for each weight int8_encoding encodes (with `scales`), computing
    q * scale first thing (`kernel(rank, axis)`: the dequantize kernel's GlobalVar); with the bytes stored before and
    after."""
    values = list(load.attrs["params"])
    params, stored, bindings, before, after = [], [], [], 0, 0
    for var, value in zip(load.params, values):
        array = value.numpy()
        encoding = int8_encoding(array, scales)
        if encoding is None:
            params.append(var)
            stored.append(value)
            continue
        q, scale, axis = encoding
        q_var = relax.Var(f"{var.name}_int8", relax.TensorType(q.shape, "int8"))
        scale_var = relax.Var(f"{var.name}_scale", relax.TensorType(scale.shape, "float32"))
        params += [q_var, scale_var]
        stored += [tvm.runtime.tensor(q), tvm.runtime.tensor(scale)]
        bindings.append(relax.VarBinding(var, normalize(relax.call_tir(
            kernel(q.ndim, axis), (q_var, scale_var), relax.TensorType(q.shape, "float32")))))
        before, after = before + array.nbytes, after + q.nbytes + scale.nbytes
    body = relax.SeqExpr([relax.BindingBlock(bindings), *load.body.blocks], load.body.body) if bindings else load.body
    func = relax.Function(params, body, load.ret_ty, load.is_pure, load.attrs, load.span)
    return func.with_attr("params", stored), before, after


@register_pass("store-weights-int8", phase="params", after=("lift-params", "offload-codegen"), required=True)
def store_weights_int8(ctx):
    """Store int8 weights as int8 with their scales in params.bin, where the graph holds them as float32 (the rounded
    ones of --quantize int8-weights; those a fold dequantized for a float layer); the load function dequantizes
    them once."""
    from ..offload.passes import LOAD_SUFFIX

    rounded = _mode(ctx) == "int8-weights"

    @tvm.transform.module_pass(opt_level=0, name="EdgecStoreWeightsInt8")
    def step(mod, _pctx):
        name = "main" + LOAD_SUFFIX
        if "params" not in mod["main"].attrs and name not in [gv.name_hint for gv in mod.get_global_vars()]:
            return mod     # no weights were lifted
        folded = mod.attrs[DEQUANTIZED_SCALES_ATTR] if mod.attrs and DEQUANTIZED_SCALES_ATTR in mod.attrs else None
        if not rounded and not folded:
            return mod
        scales = None if rounded else [s.numpy() for s in folded]
        if folded:      # read here only: it does not go on into the built module
            mod = mod.without_attr(DEQUANTIZED_SCALES_ATTR)
        given = mod
        if name not in [gv.name_hint for gv in mod.get_global_vars()]:
            mod = identity_load(mod, name)
        builder = relax.BlockBuilder(mod)

        @functools.cache
        def kernel(rank: int, axis: int) -> tvm.ir.GlobalVar:
            return builder.add_func(_dequantize_kernel(rank, axis), f"dequantize_int8_{rank}d_{axis}")

        load, before, after = _store_int8(mod[name], kernel, builder.normalize, scales)
        if not before:
            return given
        builder.update_func(mod.get_global_var(name), load)
        mod = relax.transform.Normalize()(builder.get())   # the prepended bindings' block and the body get types
        record = {**(quantization_of(mod) or {}), "stored_bytes_float32": before, "stored_bytes_int8": after}
        return mod.with_attr(QUANTIZATION_ATTR, json.dumps(record))

    return step


def precision_reference(graph: tvm.IRModule, model, steps: list[dict[str, np.ndarray]]):
    """A ReferenceRun (edgec.verification) for an fp16 or int8-weights build, from the graph the precision pass left,
    run here by TVM without offload; the reason it cannot be checked when the reference runtime cannot run the model.

    int8-weights computes in float32 on weights that are exactly the graph's: the bundle must give that graph's
    outputs within the float tolerance, so that it differs from the reference runtime's float32 answer by the
    weights' rounding (the graph's own distance from it) and float rounding alone. fp16: two correct compilations
    round differently, so the reference runtime's outputs are the `floats` of reference.PRECISION_RULE; where it
    cannot run the model, the imported float32 graph run by TVM gives them (the floor is checked all the same), and
    the reference's name says so."""
    from ..quantize.reference import run_graph
    from ..verification import ReferenceRun, reference_outputs

    reference = reference_outputs(model, steps)
    record = quantization_of(graph)
    mode = record["mode"]
    if isinstance(reference, str):
        if mode != "fp16":
            return reference
        reference = ReferenceRun(f"the imported float32 graph on TVM (llvm, no offload; no reference runtime: "
                                 f"{reference})",
                                 tuple(steps), tuple(run_graph(model.mod, model, steps)), frozenset())
    name = f"edgec's {mode} graph on TVM (llvm, no offload)"
    outputs = tuple(run_graph(graph, model, steps))
    if mode == "int8-weights":
        return replace(reference, name=name, outputs=outputs)
    for got, want in zip(outputs, reference.outputs):
        lost = next((n for n in want if not np.isfinite(got[n]).all() and np.isfinite(want[n]).all()), None)
        if lost is not None:    # the model, not the compilation: the verification would call it edgec's bug
            raise EdgecError(f"--quantize fp16: the model's values leave fp16's range (output '{lost}' is not finite "
                             f"in fp16, finite in float32; fp16 ends at 65504)",
                             "build it in float32, or with --quantize int8-weights for a smaller bundle")
    for output in reference.outputs[0]:
        _check_floor(output, [o[output] for o in outputs], [o[output] for o in reference.outputs],
                     record["min_sqnr_db"])
    return replace(reference, name=f"{name}, measured against {reference.name}", outputs=outputs,
                   floats=reference.outputs, rule=PRECISION_RULE)


def _check_floor(name: str, fp16: list[np.ndarray], float32: list[np.ndarray], floor: float) -> None:
    """Refuse an fp16 graph whose output `name` (every step's, elements finite on both sides, as `edgec eval` sums
    them) is below `floor` dB of SQNR against float32: the precision rule verifies a bundle against that graph and
    would pass it as it is. An integer or bool output (an index, a count, a mask) has no SQNR: fp16 changes it only
    through the float values it is computed from, which a near tie on the sample input flips. A size computed at
    run time that fp16 changes is refused (the sums need the same elements on both sides)."""
    from ..evaluation import _Accumulator

    if not all(np.issubdtype(np.asarray(a).dtype, np.floating) for a in float32):
        return
    shapes = [(np.shape(got), np.shape(want)) for got, want in zip(fp16, float32) if np.shape(got) != np.shape(want)]
    if shapes:
        raise EdgecError(f"--quantize fp16: output '{name}' of the fp16 graph has shape {list(shapes[0][0])} on the "
                         f"sample input, float32 {list(shapes[0][1])} (a size the model computes at run time comes "
                         f"out otherwise in fp16)", "build it in float32, or with --quantize int8-weights for a "
                                                    "smaller bundle")
    sums = _Accumulator(name, None)
    for got, want in zip(fp16, float32):
        sums.add(np.asarray(got), np.asarray(want), None)
    sqnr = decibels(sums.signal, sums.noise)
    if sqnr >= floor:
        return
    accept = f", or accept it with --min-sqnr {np.floor(sqnr * 10) / 10:g}" if sqnr >= 0.1 else ""
    raise EdgecError(f"--quantize fp16: output '{name}' of the fp16 graph is {sqnr:.1f} dB SQNR against float32 on "
                     f"the sample input, below the floor of {floor:g} dB (the model loses precision in fp16)",
                     f"build it in float32 (or --quantize int8-weights for a smaller bundle), check it on a "
                     f"representative input with --input NAME=FILE.npy{accept}")
