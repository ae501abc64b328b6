"""Build-time verification.

The staged bundle runs a sample input through the runner its target uses on this machine (see
`runtime.choose_runner`), and its outputs are compared, by name, with the reference runtime's (onnxruntime,
LiteRT) under the one tolerance rule; a streaming model runs STREAM_STEPS steps from its initial state on both sides, every
step compared (LiteRT keeps a TFLite model's variables itself, onnxruntime is fed its own state outputs), and a
quantized bundle of a model without state as many samples, its statistical rule pooled over them. The
manifest records the result: "verified" with the reference, the
runner and the errors, or "not verified" with the reason (no reference runtime, a model the reference refuses,
no way to run the target's code here). Outputs beyond the tolerance stop the build: a wrong number is never
shipped with a shrug.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from .errors import EdgecError, last_line
from .frontends import ImportedModel
from .manifest import not_verified
from .reference import (DEFAULT_TOLERANCE, INTEGER_RULE, QUANTIZED_RULE, QUANTIZED_TOLERANCE, QuantizedRule,
                        ReferenceRuntime, ReferenceUnavailable, Tolerance, compare_outputs, compare_quantized,
                        qdq_forms, qdq_nudged, unrounded_integers)
from .signature import check_inputs, random_inputs
from .targets import Target


class VerificationFailed(EdgecError):
    """The compiled model disagrees with the reference runtime: a bug in edgec or TVM, not in the user's input (or,
    for a quantized bundle the rule refuses, its rounding flips amplified on this input: the hint says so)."""
    exit_code = 1


# A streaming model is verified over this many steps from its initial state, every step compared; a model without
# state judged by a statistical rule (QuantizedRule) over this many samples, pooled.
STREAM_STEPS = 4


@dataclass(frozen=True)
class ReferenceRun:
    """What the reference runtime gave on the sample: one step, or each step of a stream from the initial state."""
    name: str                                  # e.g. "LiteRT 2.3.0"
    steps: tuple[dict[str, np.ndarray], ...]   # each step's inputs (a stream's: without the state inputs)
    outputs: tuple[dict[str, np.ndarray], ...] # the reference's outputs of each step
    quantized: frozenset[str]                  # outputs holding quantized values
    # a quantized graph's reference: the float model's outputs of each step, which make the quantized rule apply
    floats: tuple[dict[str, np.ndarray], ...] | None = None
    rule: QuantizedRule = QUANTIZED_RULE        # with floats: how the bundle is compared (PRECISION_RULE: fp16...)
    # a full-integer model's: its unrounded twin's outputs (reference.unrounded_integers), computed only for a bundle
    # more than one step off, which is then judged by INTEGER_RULE
    unrounded: Callable[[], tuple[dict[str, np.ndarray], ...]] | None = None
    zero_points: dict[str, int] | None = None     # the integer outputs' (ReferenceRuntime.zero_points)
    # a quantized graph's: its outputs of each step with its requantization nudged by a factor (QuantizedRule.nudges),
    # computed only for a bundle beyond the rule's element bound
    nudged: Callable[[float], tuple[dict[str, np.ndarray], ...]] | None = None


def sample_inputs(model: ImportedModel, given: dict[str, np.ndarray] | list[str] | None) -> dict[str, np.ndarray]:
    """The user's sample, as arrays or as `--input` values (NAME=FILE.npy, read the way run.py reads them) — for
    models whose inputs must be valid, e.g. indices — or a seeded random one. A streaming model's sample leaves
    out its state inputs, which start from their initial values."""
    specs = model.stream_inputs()
    if given is None:
        return random_inputs(specs)
    if not isinstance(given, dict):
        from .runtime import bundle_errors

        with bundle_errors() as runner:
            given = runner.read_inputs([{"name": s.name} for s in specs], list(given))
    check_inputs(specs, given)
    return given


def with_initial_state(model: ImportedModel, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A stream's first call: its inputs and the initial state (what sample/ ships for run.py --check)."""
    return {**inputs, **{s.input: s.initial for s in model.states}}


def stream_steps(model: ImportedModel, first: dict[str, np.ndarray], given: bool,
                 more: list[dict[str, np.ndarray]] | None = None) -> list[dict[str, np.ndarray]]:
    """The inputs the bundle is verified on, `first` (the sample it ships) first. A streaming model's sequence:
    `first`, then the user's sample again (it may be the only valid input) or seeded random ones. A model without
    state: `first` and, for a statistical rule to pool (verify_staged), `more` (held-back calibration samples),
    or seeded random ones where `first` is random too; a given sample alone where there are no more."""
    if not model.states:
        extra = more if more is not None else [] if given else [
            random_inputs(model.stream_inputs(), seed) for seed in range(1, STREAM_STEPS)]
        return [first] + extra[:STREAM_STEPS - 1]
    return [first] + [first if given else random_inputs(model.stream_inputs(), seed) for seed in range(1, STREAM_STEPS)]


def _run(ref: ReferenceRuntime, model: ImportedModel, steps: list[dict[str, np.ndarray]]) -> tuple[dict, ...]:
    if model.states:
        return tuple(ref.stream(steps, model.states, model.constants))
    return tuple(ref.run({**step, **model.constants}) for step in steps)   # the file still takes the folded inputs


def reference_outputs(model: ImportedModel, steps: list[dict[str, np.ndarray]]) -> ReferenceRun | str:
    """The reference runtime's outputs for each step (a stream from its own initial state), or the reason it
    cannot give them. An ONNX QDQ model runs as its QDQ math says (onnxruntime without graph optimizations), and
    its float twin (reference.qdq_float_twin) gives the float outputs the quantized rule measures against, and its
    nudged twins (reference.qdq_nudged) run when needed; a QOperator model is run so in its QDQ form
    (reference.qdq_model), since onnxruntime's QLinear kernels round their own way, and a dynamically quantized one
    as it is (its int8 weights as uint8, which onnxruntime sums without saturating), with its DynamicQuantizeLinear
    codes unrounded in the twin. A full-integer TFLite model
    (outputs all quantized, a stream's states included) carries its unrounded twin and its nudged graphs, run on
    TVM when needed."""
    try:
        qdq, rewritten, twin = qdq_forms(model.path) if model.format == "onnx" else (None, False, None)
        ref = ReferenceRuntime(model.path, states=model.states, exact=twin is not None,
                               content=None if twin is None else qdq.SerializeToString())
        floats = None if twin is None else _run(ReferenceRuntime(model.path, content=twin), model, steps)
        outputs = _run(ref, model, steps)
    except ReferenceUnavailable as e:
        return str(e)
    nudged = unrounded = None
    if twin is not None:
        def nudged(factor):
            return _run(ReferenceRuntime(model.path, content=qdq_nudged(qdq, factor), exact=True), model, steps)
    if model.format == "tflite" and set(outputs[0]) <= ref.quantized_outputs:
        from .quantize import reference as graph

        # a stream's twin and nudged graphs run the same steps from the initial state, fed their own states
        def unrounded():
            return tuple(graph.run_graph(unrounded_integers(model.mod, model.states), model, steps))

        nudged = graph.nudged_runs(model.mod, model, steps)
    name = ref.name + (" on its QDQ form" if twin is not None and rewritten else "")
    return ReferenceRun(name, tuple(steps), outputs, ref.quantized_outputs, floats, unrounded=unrounded,
                        zero_points=ref.zero_points, nudged=nudged)


def tolerance_for(reference: ReferenceRun | str) -> Tolerance:
    """The one rule's tolerance; outputs that are all quantized values (a full-integer TFLite model's) may differ
    by one quantization step, as integer kernels and dequantize -> float -> quantize round differently. It is
    also what run.py --check applies to the sample."""
    if isinstance(reference, ReferenceRun) and set(reference.outputs[0]) <= reference.quantized:
        return QUANTIZED_TOLERANCE
    return DEFAULT_TOLERANCE


_BUG_HINT = ("this is a bug in edgec or TVM: rebuild with -O0 or --disable-pass to find the pass, and report it "
             "with the model")
# a bundle refused by the quantized (or precision) rule may still be correct: its rounding flips, which some
# networks amplify on some inputs (docs/architecture.md, "Verifying quantized bundles")
_QUANTIZED_HINT = ("a reduced-precision bundle differs from its reference by rounding flips, which some networks "
                   "amplify on some inputs: rebuild with a real input (-i NAME=FILE.npy) instead of the random sample, "
                   "or with --offload none; if it is still refused, report it with the model")


def _failed(reference: ReferenceRun, name: str, what: str, k: int | None, steps: int, stream: bool,
            hint: str = _BUG_HINT) -> VerificationFailed:
    """`k`: the step that disagrees; None for a rule measured over all steps (a model without state: samples)."""
    at = ((f" at step {k + 1} of {steps}" if k is not None else f" over {steps} steps") + " from the initial state"
          if stream else f" over {steps} samples" if k is None and steps > 1 else "")
    return VerificationFailed(
        f"the compiled model disagrees with {reference.name} on output '{name}'{at}: {what}; no bundle was written",
        hint)


def verify_staged(bundle_dir: Path, target: Target, reference: ReferenceRun | str, stream: bool = False) -> dict:
    """Run the staged bundle on the reference's inputs (with `stream`, step after step from the initial state) and
    compare every step with the reference; returns the manifest's "verification". A quantized graph's reference
    (one with the float model's outputs) is compared by reference.QuantizedRule instead of the tolerance, over
    every sample of a model without state (stream_steps): one sample's few rounding flips can land anywhere, the
    more so in a small output (a detector's one score)."""
    from .runtime import choose_runner, run_bundle, stream_bundle

    tolerance = tolerance_for(reference)
    if isinstance(reference, str):
        return not_verified(reference, tolerance)
    try:
        runner = choose_runner(target)
    except EdgecError as e:
        return not_verified(f"cannot run {target.name} code here ({e.message})", tolerance)
    if stream:
        steps = stream_bundle(bundle_dir, list(reference.steps), runner)
    else:   # the float tolerance holds on each input: the sample; a statistical rule pools every sample
        steps = [run_bundle(bundle_dir, reference.steps[0], runner)]

    def pooled() -> list[dict]:
        if not stream:
            steps.extend(run_bundle(bundle_dir, inputs, runner) for inputs in reference.steps[len(steps):])
        return steps

    def ran() -> str:
        return runner + (f", {len(steps)} steps streamed" if stream else
                         f", {len(steps)} samples" if len(steps) > 1 else "")

    if reference.floats is not None:
        return _verify_quantized(bundle_dir, reference, pooled(), ran(), stream)
    worst, unmeasured = {}, ""
    for k, (outputs, expected) in enumerate(zip(steps, reference.outputs)):
        comparison = compare_outputs(outputs, expected, tolerance, against=reference.name)
        if not comparison.ok and reference.unrounded is not None:
            # one step holds per layer, not through depth: the rounding's own error decides
            try:
                floats = reference.unrounded()
            except Exception as e:  # a graph the twin does not foresee (a bug in edgec): the one-step refusal stands
                unmeasured = f"; the integer rule could not be measured ({type(e).__name__}: {last_line(e)})"
            else:
                integer = replace(reference, floats=floats, rule=INTEGER_RULE)
                return _verify_quantized(bundle_dir, integer, pooled(), ran(), stream)
        for o in comparison.outputs.values():
            if not o.ok:
                what = o.problem or f"max abs error {o.max_abs:.3g} ({o.max_rel:.3g} of its range)"
                raise _failed(reference, o.name, f"{what}, beyond atol={tolerance.atol:g} + rtol={tolerance.rtol:g} "
                              f"* max|ref|{unmeasured}", k, len(steps), stream)
            if o.name not in worst or o.max_abs > worst[o.name].max_abs:
                worst[o.name] = o
    return {"status": "verified", "reason": None, "reference": reference.name, "runner": ran(),
            "tolerance": tolerance.to_json(),
            "outputs": {o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel} for o in worst.values()}}


def _json_db(value: float) -> float | None:
    return round(value, 2) if np.isfinite(value) else None   # None: no error at all (JSON has no infinity)


def _verify_quantized(bundle_dir: Path, reference: ReferenceRun, steps: list[dict], runner: str, stream: bool) -> dict:
    """The quantized rule over all steps. Where it passes, sample/expected becomes the bundle's own outputs: a
    correct int8 bundle may differ from the reference by flipped roundings far beyond the float tolerance, and
    run.py --check (which applies that tolerance) is then a check that the deployed bundle reproduces what was
    verified here."""
    from .manifest import Manifest

    rule = reference.rule
    report = compare_quantized(steps, list(reference.outputs), list(reference.floats), rule, reference.zero_points)
    if rule.nudges and reference.nudged is not None and not all(r["ok"] for r in report.values()):
        nudged = [list(reference.nudged(1 + nudge)) for nudge in rule.nudges]
        report = compare_quantized(steps, list(reference.outputs), list(reference.floats), rule, reference.zero_points,
                                   nudged)
    extra = [n for n in steps[0] if n not in reference.outputs[0]]
    if extra:
        raise _failed(reference, extra[0], "not an output of the reference", None, len(steps), stream)
    for name, r in report.items():
        if not r["ok"]:
            what = r["problem"] or (
                f"its error {r['margin_db']:.1f} dB below the quantized graph's own rounding error (rule: at "
                f"least {rule.margin_db:g} dB"
                + (f", or the {r['nudged_margin_db']:.1f} dB of the reference with its requantization nudged"
                   if r.get("nudged_margin_db", np.inf) < rule.margin_db else "")
                + f"), {r['fraction_off']:.2%} of the elements off by more than that "
                f"error's rms (rule: at most {rule.max_fraction:.0%}"
                + (f", or the {r['nudged_fraction_off']:.2%} of the reference with its requantization nudged"
                   if "nudged_fraction_off" in r else "")
                + f"), max abs error {r['max_abs']:.3g}"
                + (f", its worst channel {r['worst_channel_margin_db']:.1f} dB below (rule: at least "
                   f"{rule.channel_margin_db:g} dB)" if "worst_channel_margin_db" in r else ""))
            raise _failed(reference, name, what, None, len(steps), stream, _QUANTIZED_HINT if r["problem"] is None
                          else _BUG_HINT)
    manifest = Manifest.load(bundle_dir)
    if manifest.sample is not None:
        for spec in manifest.outputs:
            np.save(bundle_dir / manifest.sample.expected / spec.file, steps[0][spec.name])
    return {"status": "verified", "reason": None, "reference": reference.name, "runner": runner,
            "tolerance": tolerance_for(reference).to_json(), "rule": rule.to_json(),
            "outputs": {name: {**{k: v for k, v in r.items() if k not in ("ok", "problem")},
                               **{k: _json_db(r[k]) for k in ("sqnr_db", "quantization_sqnr_db", "margin_db",
                                                              "nudged_margin_db", "worst_channel_margin_db")
                                  if k in r}}
                        for name, r in report.items()}}
