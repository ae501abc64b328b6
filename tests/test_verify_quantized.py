"""Build verification of quantized bundles (reference.QuantizedRule): correct int8 bundles whose rounding flips put
them steps away from their quantized reference are accepted, where the float rule (atol 1e-5) refuses them, and
bundles computing a wrongly quantized graph are refused.

The model is edgec's example MobileNetV2 at full size, quantized by onnxruntime's quantize_static (QDQ, per
channel, u8 activations, s8 weights). A wrong bundle is the same build of the QDQ file with one quantization
parameter or weight changed, verified against the original file's reference: the faults are placed where the
rule sees them on this untrained network (docs/architecture.md, "Verifying quantized bundles", has the sweep
over positions and the ones it cannot see)."""
from __future__ import annotations

import contextlib
import dataclasses
import json

import numpy as np
import onnx
import tvm
import pytest
from onnx import numpy_helper

from edgec import api
from edgec.context import BuildOptions
from edgec.examples import mobilenet_v2
from edgec.reference import DEFAULT_TOLERANCE, INTEGER_RULE, QUANTIZED_RULE, compare_outputs, compare_quantized
from edgec.signature import random_inputs
from edgec.targets import load_target
from edgec.verification import VerificationFailed, reference_outputs, stream_steps, verify_staged
from edgec.frontends import load_model


@pytest.fixture(scope="module")
def qdq(tmp_path_factory):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    d = tmp_path_factory.mktemp("verify_quantized")
    rng = np.random.default_rng(1)
    data = [{"input": rng.random((1, 3, 224, 224), dtype=np.float32)} for _ in range(8)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(data)

        def get_next(self):
            return next(self.samples, None)

    with contextlib.chdir(d):   # onnxruntime's quantization writes a temporary file into the working directory
        quant_pre_process(str(mobilenet_v2(d / "mbv2.onnx")), str(d / "pre.onnx"), skip_symbolic_shape=True)
        for name, form in (("qdq", QuantFormat.QDQ), ("qoperator", QuantFormat.QOperator)):   # same calibration
            quantize_static(str(d / "pre.onnx"), str(d / f"{name}.onnx"), Reader(), quant_format=form,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return d


def test_mobilenetv2_qdq_builds_verified_by_the_quantized_rule(qdq):
    result = api.build(qdq / "qdq.onnx", "host", qdq / "bundle")    # default offload: oneDNN's int8 primitives
    verification = json.loads((result.bundle_dir / "manifest.json").read_text())["verification"]
    logits = verification["outputs"]["logits"]
    print("MobileNetV2 QDQ:", logits)
    assert verification["status"] == "verified" and verification["rule"] == QUANTIZED_RULE.to_json()
    assert "graph optimizations off" in verification["reference"]
    assert verification["runner"] == "in-process, 4 samples"     # the random sample and 3 more, pooled
    assert logits["margin_db"] >= QUANTIZED_RULE.margin_db and logits["fraction_off"] <= QUANTIZED_RULE.max_fraction
    # steps away from the reference: the float rule refuses this correct bundle
    model = load_model(qdq / "qdq.onnx")
    sample = {"input": np.load(result.bundle_dir / "sample" / "inputs" / "0-input.npy")}
    reference = reference_outputs(model, [sample])
    got = api.run(result.bundle_dir, sample).outputs
    assert logits["max_abs"] > 0.05
    assert not compare_outputs(got, reference.outputs[0], DEFAULT_TOLERANCE).ok
    # sample/expected is the verified bundle's own output: run.py --check reproduces it under its tolerance
    expected = {"logits": np.load(result.bundle_dir / "sample" / "expected" / "0-logits.npy")}
    assert compare_outputs(got, expected, result.manifest.tolerance).ok
    readme = (result.bundle_dir / "README.md").read_text()     # says which rule verified it, and what --check checks
    assert "passed the quantized rule" in readme and "reproduces them" in readme and "agreed within atol" not in readme


def _mutated(src, dst, kind: str):
    """The QDQ file with one fault: the first activation's DequantizeLinear reads a zero point off by 3 (its
    QuantizeLinear keeps the right one), the first conv's channel 0 weight scale x1.5, two output channels of the
    27th weight swapped, the first conv's bias dropped (zeros), the last QuantizeLinear (the classifier's
    requantization) at 1.25x its scale."""
    model = onnx.load(str(src))
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    const = {n: numpy_helper.to_array(i) for n, i in inits.items()}
    dq = [n for n in graph.node if n.op_type == "DequantizeLinear"]
    weights = [n for n in dq if n.input[0] in const and const[n.input[0]].dtype == np.int8]
    biases = [n for n in dq if n.input[0] in const and const[n.input[0]].dtype == np.int32]
    activations = [n for n in dq if n.input[0] not in const]
    quantizers = [n for n in graph.node if n.op_type == "QuantizeLinear"]

    def replace(node, index, value):
        name = f"fault_{kind}"
        graph.initializer.append(numpy_helper.from_array(value, name))
        node.input[index] = name

    if kind == "zero_point":
        node = activations[0]
        replace(node, 2, (const[node.input[2]].astype(np.int32) + 3).clip(0, 255).astype(np.uint8))
    elif kind == "channel_scale":
        scale = const[weights[0].input[1]].copy()
        scale[0] *= 1.5
        replace(weights[0], 1, scale)
    elif kind == "swapped_weight":
        w = const[weights[26].input[0]].copy()
        w[[0, 1]] = w[[1, 0]]
        replace(weights[26], 0, w)
    elif kind == "missing_bias":
        replace(biases[0], 0, np.zeros_like(const[biases[0].input[0]]))
    elif kind == "requantization":
        replace(quantizers[-1], 1, const[quantizers[-1].input[1]] * np.float32(1.25))
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("kind", ["zero_point", "channel_scale", "swapped_weight", "missing_bias", "requantization"])
def test_wrong_quantized_bundle_is_refused(qdq, kind):
    """A correct build of the faulty file (offload none: TVM's own kernels) checked against the original file's
    reference on the samples a build pools: refused, with what was measured."""
    bad = _mutated(qdq / "qdq.onnx", qdq / f"{kind}.onnx", kind)
    result = api.build(bad, "host", qdq / kind, options=BuildOptions(offload=()))
    model = load_model(qdq / "qdq.onnx")
    reference = reference_outputs(model, stream_steps(model, random_inputs(result.manifest.inputs), False))
    with pytest.raises(VerificationFailed, match="over 4 samples: its error .* rounding error") as e:
        verify_staged(result.bundle_dir, load_target("host"), reference)
    print(kind, e.value.message)


def test_qoperator_qdq_form_computes_the_qdq_file(qdq):
    """The QOperator MobileNetV2 rewritten to its QDQ form (reference.qdq_model) gives onnxruntime's own QDQ file's
    outputs (same calibration) exactly: the QDQ form is the reference. onnxruntime's fused QLinear kernels requantize
    their own way; how far they land is printed, not asserted (1-4 output steps with onnxruntime 1.31: its own
    kernels, not edgec, so no bound of theirs is this test's to hold)."""
    from edgec.reference import ReferenceRuntime, qdq_model

    form, rewritten = qdq_model(qdq / "qoperator.onnx")
    assert rewritten and not {"QLinearConv", "QLinearAdd", "QGemm"} & {n.op_type for n in form.graph.node}
    rewritten_ref = ReferenceRuntime(qdq / "qoperator.onnx", content=form.SerializeToString(), exact=True)
    qdq_ref, kernels = ReferenceRuntime(qdq / "qdq.onnx", exact=True), ReferenceRuntime(qdq / "qoperator.onnx")
    for seed in range(2):
        sample = random_inputs(load_model(qdq / "qdq.onnx").inputs, seed)
        expected = rewritten_ref.run(sample)["logits"]
        np.testing.assert_array_equal(expected, qdq_ref.run(sample)["logits"])
        off = np.abs(kernels.run(sample)["logits"] - expected).max()
        print(f"onnxruntime's QLinear kernels against the QDQ form: max {off:.3g}")


def test_mobilenetv2_qoperator_builds_verified_by_the_quantized_rule(qdq):
    """As the QDQ file: its QDQ form is the reference (the float rule refused this correct bundle, 0.13 off)."""
    result = api.build(qdq / "qoperator.onnx", "host", qdq / "qoperator_bundle")
    verification = result.manifest.verification
    logits = verification["outputs"]["logits"]
    print("MobileNetV2 QOperator:", logits)
    assert verification["status"] == "verified" and verification["rule"] == QUANTIZED_RULE.to_json()
    assert verification["reference"].endswith("(graph optimizations off) on its QDQ form")
    assert logits["max_abs"] > 0.05 and logits["margin_db"] >= QUANTIZED_RULE.margin_db


def _qoperator_fault(src, dst, kind: str):
    """The QOperator file with one fault: the first QLinearConv reads the input's zero point off by 3, or no bias
    (zeros), or the QGemm (the classifier) requantizes at 1.25x its output scale (the DequantizeLinear after it keeps
    the right one)."""
    model = onnx.load(str(src))
    graph = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    conv = next(n for n in graph.node if n.op_type == "QLinearConv")
    gemm = next(n for n in graph.node if n.op_type == "QGemm")
    node, index, fault = {
        "zero_point": (conv, 2, lambda v: (v.astype(np.int32) + 3).clip(0, 255).astype(np.uint8)),
        "missing_bias": (conv, 8, np.zeros_like),
        "requantization": (gemm, 7, lambda v: v * np.float32(1.25))}[kind]
    graph.initializer.append(numpy_helper.from_array(fault(const[node.input[index]]), f"fault_{kind}"))
    node.input[index] = f"fault_{kind}"
    onnx.save(model, str(dst))
    return dst


@pytest.mark.parametrize("kind", ["zero_point", "missing_bias", "requantization"])
def test_wrong_qoperator_graph_is_refused(qdq, kind):
    """The faulty QOperator file's QDQ form computed by onnxruntime (as an exact bundle of it would) against the
    original file's reference, its nudged references included: refused by the quantized rule."""
    from edgec.reference import ReferenceRuntime, qdq_model

    bad = _qoperator_fault(qdq / "qoperator.onnx", qdq / f"qoperator_{kind}.onnx", kind)
    model = load_model(qdq / "qoperator.onnx")
    sample = random_inputs(model.inputs)
    reference = reference_outputs(model, [sample])
    nudged = [list(reference.nudged(1 + nudge)) for nudge in QUANTIZED_RULE.nudges]
    wrong = ReferenceRuntime(bad, content=qdq_model(bad)[0].SerializeToString(), exact=True).run(sample)
    report = compare_quantized([wrong], list(reference.outputs), list(reference.floats), QUANTIZED_RULE,
                               nudged=nudged)["logits"]
    print(kind, report)
    assert not report["ok"]


def test_wrong_qoperator_bundle_is_refused(qdq):
    """End to end: a correct build (TVM's kernels) of the QOperator file without the first conv's bias, verified
    against the original file's reference."""
    bad = _qoperator_fault(qdq / "qoperator.onnx", qdq / "qoperator_no_bias.onnx", "missing_bias")
    result = api.build(bad, "host", qdq / "qoperator_no_bias", options=BuildOptions(offload=()))
    reference = reference_outputs(load_model(qdq / "qoperator.onnx"), [random_inputs(result.manifest.inputs)])
    with pytest.raises(VerificationFailed, match="rounding error") as e:
        verify_staged(result.bundle_dir, load_target("host"), reference)
    print(e.value.message)


@pytest.mark.parametrize("kind", ["weight_zero_point", "classifier_scale"])
def test_wrong_dynamic_graph_is_refused(qdq, kind):
    """quantize_dynamic's MobileNetV2 with one fault, computed by onnxruntime, against the original's reference (its
    DynamicQuantizeLinear codes unrounded in the twin, nudged references included): the first ConvInteger's weight
    zero point +3, or the classifier's weight scale x1.25 (the Mul that rescales its MatMulInteger)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgec.reference import ReferenceRuntime

    quantize_dynamic(str(qdq / "pre.onnx"), str(qdq / "dynamic.onnx"), weight_type=QuantType.QInt8)
    model = onnx.load(str(qdq / "dynamic.onnx"))
    graph = model.graph
    const = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    if kind == "weight_zero_point":
        node, index = next(n for n in graph.node if n.op_type == "ConvInteger"), 3
        fault = (const[node.input[index]].astype(np.int32) + 3).astype(np.int8)
    else:
        node = [n for n in graph.node if n.op_type == "Mul" and any(i in const for i in n.input)][-1]
        index = next(k for k, i in enumerate(node.input) if i in const)
        fault = const[node.input[index]] * np.float32(1.25)
    graph.initializer.append(numpy_helper.from_array(fault, "fault"))
    node.input[index] = "fault"
    onnx.save(model, str(qdq / f"dynamic_{kind}.onnx"))
    imported = load_model(qdq / "dynamic.onnx")
    sample = random_inputs(imported.inputs)
    reference = reference_outputs(imported, [sample])
    nudged = [list(reference.nudged(1 + nudge)) for nudge in QUANTIZED_RULE.nudges]
    wrong = ReferenceRuntime(qdq / f"dynamic_{kind}.onnx", exact=True).run(sample)
    report = compare_quantized([wrong], list(reference.outputs), list(reference.floats), QUANTIZED_RULE,
                               nudged=nudged)["logits"]
    print(kind, report)
    assert not report["ok"]


@pytest.fixture(scope="module")
def ppocr(tmp_path_factory):
    """PP-OCRv4 det `--quantize int8 --calibration` (tests/test_quantize.py's synthetic text images), default
    offload, verified on models.inputs_for's text image."""
    from edgec.quantize import QuantizeOptions
    from models import inputs_for, real_model
    from test_quantize import _text_images

    d = tmp_path_factory.mktemp("ppocr_int8")
    np.savez(d / "text.npz", x=_text_images(25))
    options = BuildOptions(quantize=QuantizeOptions("int8", d / "text.npz", "percentile"))
    sample = inputs_for("ppocrv4_det")
    result = api.build(real_model("ppocrv4_det"), "host", d / "int8", input_shapes={"x": (1, 3, 320, 320)},
                       options=options, sample_inputs=sample)
    return result, sample


def test_ppocrv4_det_int8_build_is_verified(ppocr):
    """Its bundle is up to ~0.5 from the QDQ reference on the probability map (rounding flips in the head), which
    the float rule refuses, and inside the quantized rule."""
    result, _ = ppocr
    verification = result.manifest.verification
    out = verification["outputs"]["sigmoid_0.tmp_0"]
    print("PP-OCRv4 det int8:", out)
    assert verification["status"] == "verified" and verification["rule"] == QUANTIZED_RULE.to_json()
    assert out["margin_db"] >= QUANTIZED_RULE.margin_db and out["fraction_off"] <= QUANTIZED_RULE.max_fraction
    assert out["max_abs"] > DEFAULT_TOLERANCE.atol + DEFAULT_TOLERANCE.rtol    # the float rule would refuse it
    assert result.manifest.quantization["layers"] > 50


@pytest.mark.xfail(strict=True, reason="the rule's 0 dB margin, which the untrained MobileNetV2's flips need, is "
                   "too lenient for PP-OCRv4 det, whose rounding error is large (10.5 dB SQNR): this fault measures "
                   "5.0 dB, 1.2% (docs/architecture.md)")
def test_ppocrv4_det_wrong_requantization_is_refused(ppocr):
    """A wrong requantization of the first quantized conv (its weight scales x1.5), computed exactly (TVM on the
    faulty QDQ graph, as the reference is), against the build's reference."""
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, rewrite_call

    from edgec.quantize.reference import quantized_reference
    from edgec.reference import compare_quantized

    result, sample = ppocr
    weight, scale = is_const(), is_const()
    faults = []

    def wrong_scale(call, matches):
        if faults or str(matches[weight].ty.dtype) != "int8":
            return call
        faults.append(call)
        return relax.op.dequantize(call.args[0], relax.const(matches[scale].value.numpy() * np.float32(1.5)),
                                   call.args[2], call.attrs.axis, call.attrs.out_dtype)

    good = result.compiled.quantized_graph
    bad = tvm.IRModule(dict(good.functions))
    bad["main"] = rewrite_call(is_op("relax.dequantize")(weight, scale, is_const()), wrong_scale, good["main"])
    assert len(faults) == 1
    model = result.compiled.model
    reference = quantized_reference(good, model, [sample])
    wrong = quantized_reference(bad, model, [sample]).outputs
    report = compare_quantized(list(wrong), list(reference.outputs), list(reference.floats))["sigmoid_0.tmp_0"]
    print("PP-OCRv4 det, first weight's scales x1.5:", report)
    assert not report["ok"]


def test_energy_bound_is_never_tighter_than_the_nudged_references():
    """A detector's one score, which its own rounding happens to leave almost where the float model puts it (1e-4),
    while a nudge of the reference's requantization moves it 5e-3: a bundle 2e-3 off passes (no nearer than the
    reference's own nudges land), one 1e-2 off does not; without rounding error only an identical output passes."""
    ref, twin = {"score": np.float32([0.9])}, [{"score": np.float32([0.9001])}]
    nudged = [[{"score": np.float32([0.9 + d])}] for d in (5e-3, -5e-3, 1e-3, -1e-3)]

    def report(out, floats=twin):
        return compare_quantized([{"score": np.float32([out])}], [ref], floats, QUANTIZED_RULE, nudged=nudged)["score"]

    near, far = report(0.902), report(0.91)
    assert near["ok"] and near["margin_db"] < QUANTIZED_RULE.margin_db and near["margin_db"] >= near["nudged_margin_db"]
    assert not far["ok"] and far["margin_db"] < far["nudged_margin_db"]
    exact = report(0.902, floats=[ref])      # the reference equals the float model
    assert not exact["ok"] and "nudged_margin_db" not in exact
    # a rule whose nudged graphs are not the reference's own (INTEGER_RULE's) keeps its energy bound
    assert not INTEGER_RULE.nudged_energy
    fixed = dataclasses.replace(QUANTIZED_RULE, nudged_energy=False)
    assert not compare_quantized([{"score": np.float32([0.902])}], [ref], twin, fixed, nudged=nudged)["score"]["ok"]


def test_integer_rule_passes_an_output_within_one_step():
    """A full-integer model's 10 scores with one flipped rounding: the energy and element bounds refuse it (10% of the
    elements, 10 dB above the rounding's energy), the rule's one step accepts it; two steps do not pass."""
    ref = {"scores": np.arange(-5, 5, dtype=np.int8)}
    twin = [{"scores": ref["scores"] + np.float32(0.1)}]
    flipped = ref["scores"].copy()
    flipped[3] += 1
    report = compare_quantized([{"scores": flipped}], [ref], twin, INTEGER_RULE)["scores"]
    assert report["ok"] and report["fraction_off"] > INTEGER_RULE.max_fraction and report["margin_db"] < 0
    flipped[3] += 1
    assert not compare_quantized([{"scores": flipped}], [ref], twin, INTEGER_RULE)["scores"]["ok"]


@pytest.fixture(scope="module")
def amplifying(tmp_path_factory):
    """tests/test_offload_int8.py's MobileNetV2 (width .35, 96 px, QDQ) and its sample 2, where one flipped
    requantization reaches 10% of the logits: the reference's nudged twins measure up to 23% there."""
    from test_offload_int8 import quantized

    d = tmp_path_factory.mktemp("amplifying")
    rng = np.random.default_rng(5)
    samples = [{"input": rng.random((1, 3, 96, 96), dtype=np.float32)} for _ in range(8)]
    return quantized(mobilenet_v2(d / "mnv2.onnx", width=0.35, resolution=96), samples), samples[2]


@pytest.mark.parametrize("kind", ["zero_point", "missing_bias", "requantization"])
def test_nudged_element_bound_still_refuses_faults(amplifying, kind):
    """With the element and energy bounds raised to what the nudged references measure, a faulty graph (onnxruntime
    computing the faulty file, as an exact bundle of it would) is still refused by both."""
    from edgec.reference import ReferenceRuntime

    qdq, sample = amplifying
    reference = reference_outputs(load_model(qdq), [sample])
    nudged = [list(reference.nudged(1 + nudge)) for nudge in QUANTIZED_RULE.nudges]
    bad = ReferenceRuntime(_mutated(qdq, qdq.with_name(f"{kind}.onnx"), kind), exact=True).run(sample)
    report = compare_quantized([bad], list(reference.outputs), list(reference.floats), QUANTIZED_RULE,
                               nudged=nudged)["logits"]
    print(kind, report)
    assert report["nudged_fraction_off"] > QUANTIZED_RULE.max_fraction     # the raised bound is in force
    # refused by both bounds, the energy one at what the nudged references measure where that is lower
    assert not report["ok"] and report["margin_db"] < min(QUANTIZED_RULE.margin_db, report["nudged_margin_db"])
    assert report["fraction_off"] > report["nudged_fraction_off"]


def test_quantized_reference_nudges_every_requantization(amplifying):
    """edgec's own QDQ reference (TVM, for --quantize int8) nudged: every quantize of a computed tensor reads it times
    the factor (checked in the IR: compiling this model seven times takes minutes)."""
    from tvm import relax

    from edgec.quantize.reference import nudged

    qdq, _ = amplifying
    mod = load_model(qdq).mod

    def quantizes(module):
        bindings = {b.var: b.value for block in module["main"].body.blocks for b in block.bindings}
        return bindings, [v for v in bindings.values() if isinstance(v, relax.Call) and v.op.same_as(
            tvm.ir.Op.get("relax.quantize")) and not isinstance(v.args[0], tvm.ir.expr.Constant)]

    bindings, calls = quantizes(nudged(mod, 1.5))
    assert len(calls) == len(quantizes(mod)[1]) > 50
    for call in calls:
        x = bindings[call.args[0]]
        assert x.op.same_as(tvm.ir.Op.get("relax.multiply")) and float(x.args[1].value.numpy()) == 1.5, x
