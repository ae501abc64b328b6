"""int8 post-training quantization (issue 9, item 1): `build --quantize int8 --calibration DATA`.

The classifier is tests/test_eval.py's MLP trained on sklearn's digits; its held-out images are the calibration
DATA, whose last fifth the build holds back for the before/after table. The CNN is edgec's example MobileNetV2
(0.35 x 96, random weights) on the digits images upsampled to 96 x 96 and normalized as ImageNet inputs; the real
model is PP-OCRv4 det on synthetic text images, each beside onnxruntime's own static quantization. Builds use
--offload none: oneDNN's int8 kernels (offload-quantized) disagree with the QDQ graph beyond the verification
tolerance on these models, a finding left to the offload work (see the closing note of this change).
"""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import tvm
from tvm import relax

from edgec import api
from edgec.context import BuildOptions
from edgec.quantize import METHODS, QuantizeOptions
from test_cli_errors import check_error, cli
from test_eval import _digits_onnx, _trained

NO_OFFLOAD = ()


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("quantize")
    _, x, y, _ = _trained()
    np.savez(d / "cal.npz", x=x, labels=y)
    return {"dir": d, "model": _digits_onnx(d / "digits.onnx")}


def _build(model, data, out, method, ir=None):
    options = BuildOptions(offload=NO_OFFLOAD, dump_ir=ir, quantize=QuantizeOptions("int8", data, method))
    return api.build(model, "host", out, options=options)


def _onnxruntime_sqnr(model, out, name, cal, test):
    """onnxruntime's own static QDQ quantization (uint8 activations, int8 weights per channel, MinMax) on the same
    calibration samples: its output SQNR against fp32 on the held-back ones."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter({name: s[None]} for s in cal)

        def get_next(self):
            return next(self.samples, None)

    quantize_static(str(model), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    fp32, ort_q = (ort.InferenceSession(str(p)) for p in (model, out))
    ref = np.stack([fp32.run(None, {name: s[None]})[0] for s in test])
    got = np.stack([ort_q.run(None, {name: s[None]})[0] for s in test])
    return 10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum())


@pytest.mark.parametrize("method", METHODS)
def test_digits_int8_top1_within_one_point(digits, method):
    d = digits["dir"]
    result = _build(digits["model"], d / "cal.npz", d / f"int8-{method}", method, ir=d / f"ir-{method}")
    logits = next(o for o in result.evaluation.outputs if o.name == "logits")
    print(f"digits {method}: top-1 int8 {logits.top1_bundle:.4f} fp32 {logits.top1_reference:.4f}, "
          f"SQNR {logits.sqnr_db:.1f} dB")
    assert result.evaluation.samples == 90 and result.evaluation.labelled
    assert logits.top1_bundle >= logits.top1_reference - 0.01
    # verified on the first held-back sample, the one it ships, and the next three, pooled
    assert result.manifest.verification["runner"] == "in-process, 4 samples"
    record = json.loads((result.bundle_dir / "manifest.json").read_text())["quantization"]
    assert record["method"] == method and record["calibration_samples"] == 360
    assert record["layers"] == 2 and record["biases"] == 2 and record["float"] == []
    # one quantize per quantized tensor (the input, the hidden ReLU), none around the bias add or the ReLU itself
    ir = next((d / f"ir-{method}").glob("*-quantize-int8.py")).read_text()
    assert ir.count("R.quantize(") == record["tensors"] == 2
    stored = []     # the dtypes of the constants behind dequantize: int8 weights, int32 biases
    relax.analysis.post_order_visit(result.compiled.quantized_graph["main"], lambda e: stored.append(
        str(e.args[0].ty.dtype)) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.dequantize"
        and isinstance(e.args[0], tvm.ir.expr.Constant) else None)
    assert sorted(stored) == ["int32", "int32", "int8", "int8"]
    # both layers are integer kernels, the logits one with a float32 output (its output is not quantized; it
    # computed in float on weights dequantized at load where the host has no dot product): no float32 copy of a
    # weight ships
    assert result.compiled.int8_kernels["layers"] == 2
    params = tvm.runtime.load_param_dict((result.bundle_dir / "params.bin").read_bytes())
    assert sorted(str(v.dtype) for v in params.values() if v.numpy().size >= 32 * 10) == ["int8", "int8"]


def test_cnn_sqnr_against_onnxruntime_quantization(tmp_path):
    """The example CNN: edgec's int8 output SQNR against fp32, for each method, beside onnxruntime's own static
    QDQ quantization (per channel, MinMax) on the same calibration and held-back samples."""
    from sklearn.datasets import load_digits

    from edgec.examples import mobilenet_v2

    model = mobilenet_v2(tmp_path / "mbv2.onnx", width=0.35, resolution=96)
    big = np.kron(load_digits().images[:100] / 16.0, np.ones((12, 12)))
    x = np.stack([(big - m) / s for m, s in ((0.485, 0.229), (0.456, 0.224), (0.406, 0.225))], 1).astype(np.float32)
    np.savez(tmp_path / "imgs.npz", input=x)
    held = QuantizeOptions("int8", tmp_path / "imgs.npz").held_back(len(x))
    cal, test = x[:-held], x[-held:]

    ort_sqnr = _onnxruntime_sqnr(model, tmp_path / "ort.onnx", "input", cal, test)
    sqnr = {}
    for method in METHODS:
        result = _build(model, tmp_path / "imgs.npz", tmp_path / method, method)
        sqnr[method] = result.evaluation.outputs[0].sqnr_db
    print(f"MobileNetV2 0.35x96 int8 SQNR vs fp32: onnxruntime QDQ {ort_sqnr:.1f} dB, edgec "
          + ", ".join(f"{m} {v:.1f} dB" for m, v in sqnr.items()))
    assert sqnr["minmax"] >= ort_sqnr - 1.0
    assert max(sqnr.values()) >= ort_sqnr - 1.0
    # entropy: 2.8 dB while ReLU's exact zeros were in its histogram (they pulled ReLU6 thresholds to ~1.5); below
    # the others on these blocky upsampled digits: 20 of 2048 bins hold 30-60% of an early ReLU6 output, and KL,
    # which counts merging distinct values as loss however close they are, clips those to 1.3-2.8 of 6
    assert sqnr["entropy"] >= 10.0


def _text_images(n: int) -> np.ndarray:
    """PP-OCR det inputs: tests/models.text_image's rows of glyphs, each with other glyphs, shifted, at another
    contrast and with sensor-like noise."""
    from models import text_image

    images = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        x = np.roll(text_image(seed=i), tuple(int(d) for d in rng.integers(-30, 30, 2)), axis=(2, 3))
        images.append(x * rng.uniform(0.7, 1.1) + rng.normal(0, rng.uniform(0.02, 0.2), x.shape))
    return np.concatenate(images).astype(np.float32)


def test_ppocrv4_det_sqnr_against_onnxruntime_quantization(tmp_path, monkeypatch):
    """PP-OCRv4 det (a trained model) on realistic text images: the output SQNR against fp32 of edgec's int8 graph
    per method — equalize-int8's, calibrate's and quantize-int8's own functions, the QDQ graph run on TVM as the
    build's reference does — beside onnxruntime's static QDQ quantization on the same data.

    Measured through the passes' functions, three methods without three builds (the build itself, verified by the
    quantized rule: tests/test_verify_quantized.py). Neither edgec nor onnxruntime reaches 30 dB: quantizing only the
    10 conv inputs after the PPLCNetV3 stem costs 9.4 dB on its own (their channels' ranges differ up to 50x;
    equalizing the depthwise convs' inputs takes minmax from 1.7 to 8.2 dB), the neck and head together 30 dB — a
    model for keeping its first layers float (mixed precision by error budget). Quantizing each layer alone, the
    rest float: the worst three cost 10.5, 15.6 and 17.6 dB alone (conv2d_6, conv2d_5, conv2d_20), by their int8
    weights (10.2, 17.9, 16.7 dB with the activations float), and all weights int8 with float activations give 8.0
    dB: per-channel int8 weights rounded to nearest keep plain int8 far from 30 dB here. gptq-weights-int8 takes
    minmax from 8.6 to 13.7 dB (bias-correct-int8 instead: 11.7). The bar is onnxruntime's, with margin."""
    from models import real_model
    from tvm import relax as rx

    from edgec.dataset import open_dataset
    from edgec.frontends import load_model
    from edgec.passes.fold import fold_batchnorm
    from edgec.quantize import bias, calibrate, equalize, gptq, qdq
    from edgec.quantize.reference import run_graph

    monkeypatch.chdir(tmp_path)    # onnxruntime's symbolic shape inference leaves a file in the working directory
    path = real_model("ppocrv4_det")
    x = _text_images(25)
    np.savez(tmp_path / "text.npz", x=x)
    held = QuantizeOptions("int8", tmp_path / "text.npz").held_back(len(x))
    ort_sqnr = _onnxruntime_sqnr(path, tmp_path / "ort.onnx", "x", x[:-held], x[-held:])
    model = load_model(path, {"x": (1, 3, 320, 320)})
    # as the pipeline does: batch norms folded into their convs (their biases), decomposed, constants folded
    mod = rx.transform.FoldConstant()(rx.transform.DecomposeOpsForInference()(fold_batchnorm(None)(model.mod)))
    cal, _ = open_dataset(tmp_path / "text.npz", model.inputs).split(held)
    fp32 = ort.InferenceSession(str(path))
    ref = np.stack([fp32.run(None, {"x": s[None]})[0] for s in x[-held:]])
    equalized, count = equalize.equalize(mod, cal)
    assert count > 0
    sqnr = {}
    for method in METHODS:
        graph = mod if method == "percentile" else equalized      # as the pipeline's equalize-int8 does
        ranges = calibrate.calibrate(graph, cal, method, 99.99)
        # as the pipeline's gptq-weights-int8 does for minmax, and its bias-correct-int8 for entropy
        rounded = gptq.rounded_weights(graph, ranges, cal) if method == "minmax" else None
        corrections = bias.corrections(graph, ranges, cal) if method == "entropy" else None
        quantized, record = qdq.rewrite(graph, ranges, corrections=corrections, rounded=rounded)
        assert record["layers"] > 50 and record["biases"] > 0
        run = run_graph(quantized, model, [{"x": s[None]} for s in x[-held:]])   # the build's reference's outputs
        out = np.stack([o["sigmoid_0.tmp_0"] for o in run])
        sqnr[method] = 10 * np.log10((ref ** 2).sum() / ((out - ref) ** 2).sum())
    print(f"PP-OCRv4 det int8 SQNR vs fp32 ({len(x) - held} calibration, {held} held-back text images): "
          f"onnxruntime QDQ {ort_sqnr:.1f} dB, edgec " + ", ".join(f"{m} {v:.1f} dB" for m, v in sqnr.items()))
    assert min(sqnr.values()) >= ort_sqnr
    assert sqnr["percentile"] >= ort_sqnr + 9.0
    # 1.7 dB before equalize-int8, 8.6 with round to nearest (11.7 with bias-correct-int8), 13.7 with GPTQ (13.3
    # since the learnable affines are folded into the convs)
    assert sqnr["minmax"] >= ort_sqnr + 11.0
    # 13.5 dB: 7.3 before bias-correct-int8, 5.2 with the KL on |x| (128 levels, Q renormalized)
    assert sqnr["entropy"] >= ort_sqnr + 10.0


@pytest.mark.parametrize("case, keywords", [
    ("wrong_key", ["'images'", "neither an input"]),
    ("wrong_shape", ["input 'x'", "[5,8,8]", "[N,64]"]),
    ("one_sample", ["holds 1 sample", "at least 2"]),
    ("without_calibration", ["--quantize int8 and --calibration"]),
])
def test_bad_calibration_is_one_line(digits, case, keywords):
    d = digits["dir"]
    data = d / f"{case}.npz"
    arrays = {"wrong_key": {"images": np.zeros((5, 64), np.float32)},
              "wrong_shape": {"x": np.zeros((5, 8, 8), np.float32)},
              "one_sample": {"x": np.zeros((1, 64), np.float32)}}.get(case)
    args = ["build", digits["model"], "-o", d / f"bad-{case}", "--offload", "none", "--quantize", "int8"]
    if arrays is not None:
        np.savez(data, **arrays)
        args += ["--calibration", data]
    result = cli(*args)
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)
    assert not (d / f"bad-{case}").exists()


def test_passes_says_why_quantize_steps_skip():
    """Without --quantize, `edgec passes` names what the quantization steps need, not a target mismatch."""
    result = cli("passes")
    assert result.exit_code == 0, result.output
    lines = {line.split()[2]: line for line in result.output.splitlines() if line.strip()[:1].isdigit()}
    for name in ("equalize-int8", "calibrate", "bias-correct-int8", "quantize-int8"):
        assert " skip " in lines[name] and "needs --quantize int8" in lines[name]


@pytest.mark.parametrize("method, steps", [
    ("minmax", ("equalize-int8", "calibrate", "gptq-weights-int8", "quantize-int8")),
    ("percentile", ("calibrate", "quantize-int8")),
    ("entropy", ("equalize-int8", "calibrate", "bias-correct-int8", "quantize-int8")),
])
def test_quantize_steps_run_at_every_opt_level(tmp_path, method, steps):
    """--quantize at -O0 quantizes: the steps are not -O1 optimizations an -O0 build may skip (it came out float).
    Each method runs its own steps and only those."""
    from edgec.context import BuildContext
    from edgec.passes.registry import plan
    from edgec.targets import load_target

    options = BuildOptions(opt_level=0, offload=NO_OFFLOAD,
                           quantize=QuantizeOptions("int8", tmp_path / "cal.npz", method=method))
    enabled = {s.name for s in plan(BuildContext(load_target("host"), options)) if s.enabled}
    quantization = {"equalize-int8", "calibrate", "gptq-weights-int8", "bias-correct-int8", "quantize-int8"}
    assert enabled & quantization == set(steps)


@pytest.mark.parametrize("method, steps", [
    ("minmax", ("equalize-int8", "calibrate", "gptq-weights-int8", "quantize-int8")),
    ("percentile", ("calibrate", "gptq-weights-int8", "quantize-int8")),
    ("entropy", ("equalize-int8", "calibrate", "gptq-weights-int8", "quantize-int8")),
])
def test_7bit_weights_are_rounded_by_gptq_for_every_method(tmp_path, method, steps):
    """Where oneDNN takes 7-bit weights only (a CPU without VNNI), GPTQ rounds them for every method: on PP-OCRv4 det
    round to nearest lost 4-8 dB at 7 bits, GPTQ took minmax to 15.1 dB, entropy to 16.4, percentile to 7.8."""
    from edgec.context import BuildContext
    from edgec.passes.registry import plan
    from edgec.targets import load_target
    from test_offload_int8 import _haswell_box

    options = BuildOptions(offload=("onednn",), quantize=QuantizeOptions("int8", tmp_path / "cal.npz", method=method))
    ctx = BuildContext(load_target(str(_haswell_box(tmp_path))), options, offload=("onednn",))
    enabled = {s.name for s in plan(ctx) if s.enabled}
    quantization = {"equalize-int8", "calibrate", "gptq-weights-int8", "bias-correct-int8", "quantize-int8"}
    assert enabled & quantization == set(steps)


def _spread_depthwise(path):
    """conv 1x1 (4 -> 8 channels, channel 7 100x the others) -> depthwise 3x3 (channel 7's weights / 100) -> conv 1x1:
    the depthwise conv's input has channels whose ranges differ 100x, which a per-tensor scale leaves ~2 levels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.5, (8, 4, 1, 1)).astype(np.float32)
    w1[7] *= 100
    w2 = rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)
    w2[7] /= 100
    w3 = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, n) for w, n in ((w1, "w1"), (w2, "w2"), (w3, "w3"))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["a"]),
             helper.make_node("Conv", ["a", "w2"], ["b"], group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "spread", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _with_and_without(model, d, step, disabled=()):
    """int8 builds of `model` on d/cal.npz with `step` ("on") and with it disabled ("off"), `disabled` in both: (the
    results, the SQNR of each against the float model on the held-back samples)."""
    results = {}
    for name, off in (("on", ()), ("off", (step,))):
        options = BuildOptions(offload=NO_OFFLOAD, disabled_passes=(*disabled, *off),
                               quantize=QuantizeOptions("int8", d / "cal.npz"))
        results[name] = api.build(model, "host", d / name, options=options)
    return results, *(results[n].evaluation.outputs[0].sqnr_db for n in ("on", "off"))


def test_equalization_evens_a_depthwise_input(tmp_path):
    """equalize-int8 moves the depthwise input's per-channel ranges into the depthwise weights: the int8 bundle's
    SQNR against the float model rises well above the same build with the step disabled, whose record says so."""
    model = _spread_depthwise(tmp_path / "spread.onnx")
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(1).normal(0, 1, (40, 4, 16, 16)).astype(np.float32))
    results, on, off = _with_and_without(model, tmp_path, "equalize-int8")
    print(f"int8 SQNR with equalization {on:.1f} dB, without {off:.1f} dB")
    assert on >= off + 10
    assert results["on"].compiled.quantization["equalized_tensors"] == 1
    assert results["off"].compiled.quantization["equalized_tensors"] is None


def _spread_producer(path, activation):
    """x -> conv 1x1 with a bias (4 -> 8 channels, channel 7's 30x the others) -> `activation` -> depthwise 3x3 ->
    conv 1x1: equalize-int8 puts its multiply between the first conv's chain and the depthwise conv's quantize."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.1, (8, 4, 1, 1)).astype(np.float32)
    w1[7] *= 30
    b1 = rng.normal(0, 0.05, 8).astype(np.float32)
    w2 = rng.normal(0, 0.3, (8, 1, 3, 3)).astype(np.float32)
    w3 = rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32)
    consts = {"w1": w1, "b1": b1, "w2": w2, "w3": w3}
    kind, *bounds = activation
    consts.update({f"bound{i}": np.float32(b) for i, b in enumerate(bounds)})
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"]),
             helper.make_node(kind, ["a", *(f"bound{i}" for i in range(len(bounds)))], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["b"], group=8, pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["b", "w3"], ["y"])]
    graph = helper.make_graph(nodes, "spread", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 16, 16])],
                              [numpy_helper.from_array(v, n) for n, v in consts.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.mark.parametrize("activation, folded", [
    (("Relu",), True),           # the uint8 tensor's zero point is 0: its saturation is the ReLU
    (("Clip", 0, 6), True),      # ReLU6: and every channel's range is within 6 / a_c
    (("Clip", -1, 6), False),    # -1 / a_c is inside the saturation on the narrow channels: the multiply stays
])
def test_equalization_folds_into_an_int8_producer(tmp_path, activation, folded):
    """fold_into_producers moves equalize-int8's 1 / a into the producing conv's weight and bias scales where that
    is exact, so the conv's integer chain reaches the quantize (one kernel, not a float32 conv and a multiply): the
    folded graph computes what the QDQ graph computed, on TVM, to float32 roundings."""
    from tvm import relax as rx

    from edgec.dataset import open_dataset
    from edgec.frontends import load_model
    from edgec.quantize import calibrate, equalize, qdq
    from edgec.quantize.reference import run_graph

    model = load_model(_spread_producer(tmp_path / "m.onnx", activation), {})
    mod = rx.transform.FoldConstant()(model.mod)
    x = np.random.default_rng(1).normal(0, 1, (12, 4, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    cal = open_dataset(tmp_path / "cal.npz", model.inputs)
    equalized, count = equalize.equalize(mod, cal)
    assert count == 1
    quantized, _ = qdq.rewrite(equalized, calibrate.calibrate(equalized, cal, "minmax", 99.99))
    out, n = equalize.fold_into_producers(quantized)
    assert n == int(folded)

    def ops(m):
        found = set()
        rx.analysis.post_order_visit(m["main"], lambda e: found.add(e.op.name) if isinstance(e, rx.Call)
                                     and isinstance(e.op, tvm.ir.Op) else None)
        return found

    assert "relax.multiply" in ops(quantized)
    # folded: the quantize reads the conv's bias add (its integer chain) with nothing between
    assert ops(out).isdisjoint({"relax.multiply", "relax.nn.relu", "relax.clip", "relax.call_tir"}) == folded
    inputs = [{"x": s[None]} for s in x]
    before, after = (np.stack([o["y"] for o in run_graph(m, model, inputs)]) for m in (quantized, out))
    assert np.abs(after - before).max() <= 1e-4 * np.abs(before).max()


def test_a_bias_beyond_int32_raises_its_channels_weight_scale(tmp_path):
    """A channel whose weights are tiny and whose bias is large (a dead channel, a folded shift) would have an int32
    bias beyond 2^30 at s_x * s_w: its weight scale is raised until the bias fits, so the layer keeps an int32 bias
    (its integer chain) instead of a float bias add, and its output stays what the float model computes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from tvm import relax as rx

    from edgec.dataset import open_dataset
    from edgec.frontends import load_model
    from edgec.quantize import calibrate, qdq
    from edgec.quantize.reference import run_graph

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (8, 4, 3, 3)).astype(np.float32)
    w[7] *= 1e-7
    b = rng.normal(0, 0.1, 8).astype(np.float32)
    b[7] = 5.0
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])], "dead",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), tmp_path / "m.onnx")
    model = load_model(tmp_path / "m.onnx", {})
    mod = rx.transform.FoldConstant()(model.mod)
    x = rng.normal(0, 1, (8, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    cal = open_dataset(tmp_path / "cal.npz", model.inputs)
    quantized, record = qdq.rewrite(mod, calibrate.calibrate(mod, cal, "minmax", 99.99))
    assert record["biases"] == 1 and record["float"] == [], record
    out = np.stack([o["y"] for o in run_graph(quantized, model, [{"x": s[None]} for s in x])])
    ref = np.stack([o["y"] for o in run_graph(mod, model, [{"x": s[None]} for s in x])])
    assert np.abs(out[:, :, 7] - ref[:, :, 7]).max() < 1e-3       # the dead channel: its bias, to float32
    assert 10 * np.log10((ref ** 2).sum() / ((out - ref) ** 2).sum()) > 30


def _kl(values):
    """calibrate's entropy range for `values`, histogrammed as calibrate does (exact zeros left out)."""
    from edgec.quantize.calibrate import BINS, _kl_range

    lo, hi = float(values.min()), float(values.max())
    return _kl_range(np.histogram(values[values != 0], BINS, (lo, hi))[0], lo, hi)


def test_entropy_clips_rare_outliers_and_keeps_the_body():
    """The KL window: a ReLU output (half exact zeros, an exponential body, 1e-5 of it far out at 50-100) is clipped
    well below its max yet above the body's 99.99th percentile; a hardswish-like output ([-0.2, 75]) keeps its
    negative side and most of its tail, measured with the 255 steps uint8 gives it (128 levels on |x| clipped it to
    33, and PP-OCRv4 det's [-0.19, 52] to 5.6); an input with few values near 0 keeps its range (with Q
    renormalized, as TensorRT's, a window holding those few and the folded tails is nearly lossless: PP-OCRv4
    det's input, [-3.0, 3.6], came out +-0.86)."""
    rng = np.random.default_rng(0)
    body = rng.exponential(1.0, 400_000)
    relu = np.concatenate([np.zeros(400_000), body, rng.uniform(50, 100, 8)])
    lo, hi = _kl(relu)
    assert lo == 0 and np.percentile(body, 99.99) <= hi <= 30
    hswish = np.concatenate([-rng.uniform(0, 0.2, 50_000), rng.exponential(6.0, 400_000)])
    lo, hi = _kl(hswish)
    assert lo <= -0.15 and hi >= np.percentile(hswish, 99.9)
    bimodal = np.concatenate([rng.uniform(-3, -1, 200_000), rng.uniform(1, 3.5, 200_000), rng.uniform(-0.4, 0.4, 30)])
    lo, hi = _kl(bimodal)
    assert lo <= -2.9 and hi >= 3.4
    # all below 0 (0 past hi: the windows started past the histogram's end, an IndexError): they shrink toward hi
    negative = -1 - rng.exponential(0.1, 400_000)
    lo, hi = _kl(negative)
    assert hi == 0 and negative.min() <= lo <= np.percentile(negative, 0.01)


def _offset_dense(path):
    """One dense layer reading inputs around 20 (x = 20 + noise) whose bias takes their mean back out: each weight's
    int8 rounding error times 20 is a constant shift of its output channel, as large against the output as -20 dB."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(0, 1, (16, 16)).astype(np.float32)
    b = (-20 * w.sum(axis=0)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
                              "offset", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def test_bias_correction_takes_back_the_mean_error(tmp_path):
    """bias-correct-int8 folds the int8 layer's mean output error on the calibration samples into its int32 bias:
    the held-back SQNR rises well above the same build with the step disabled, and the records say which ran."""
    model = _offset_dense(tmp_path / "offset.onnx")
    np.savez(tmp_path / "cal.npz", x=20 + np.random.default_rng(1).normal(0, 1, (60, 16)).astype(np.float32))
    # with minmax, bias-correct-int8 runs only without gptq-weights-int8
    results, on, off = _with_and_without(model, tmp_path, "bias-correct-int8", disabled=("gptq-weights-int8",))
    print(f"int8 SQNR with bias correction {on:.1f} dB, without {off:.1f} dB")
    assert on >= off + 4      # 26.6 against 21.4: what is left is the input's rounding
    assert results["on"].compiled.quantization["bias_corrected"] == 1
    assert results["off"].compiled.quantization["bias_corrected"] is None


def _spread_conv(path, w):
    """One grouped 3x3 conv (2 groups of 4 -> 8 channels, stride 2, padding 1) with weights `w`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], group=2, strides=[2, 2], pads=[1, 1, 1, 1])],
                              "spread", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])],
                              [numpy_helper.from_array(w.astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


def _spread_inputs(n: int, seed: int) -> np.ndarray:
    """Images whose 8 channels mix 3 smooth sources (correlated, as a network's activations are) at scales 1 to 50."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(0).normal(0, 1, (8, 3))
    sources = rng.normal(0, 1, (n, 3, 12, 12)).cumsum(axis=2).cumsum(axis=3) / 6
    x = np.einsum("cs,nshw->nchw", mix, sources) + rng.normal(0, 0.05, (n, 8, 12, 12))
    return (x * np.geomspace(1, 50, 8)[:, None, None]).astype(np.float32)


def _run_each(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(model))
    return np.concatenate([session.run(None, {"x": s[None]})[0] for s in x])


def test_gptq_rounding_beats_round_to_nearest_on_spread_inputs(tmp_path):
    """gptq-weights-int8's int8 weights, on the same per-channel scales, leave the conv's output (run by onnxruntime,
    activations float: the weights' error alone) far closer to float than round to nearest does where the input
    channels differ 50x in scale and are correlated: a weight's rounding error moves onto the weights not rounded yet
    (37.8 dB against 48.5)."""
    from edgec.dataset import open_dataset
    from edgec.frontends import load_model
    from edgec.quantize import calibrate, gptq, qdq

    w = np.random.default_rng(1).normal(0, 1, (16, 4, 3, 3)) / np.geomspace(1, 50, 8).reshape(2, 4)[[0] * 8 + [1] * 8,
                                                                                                 :, None, None]
    path = _spread_conv(tmp_path / "spread.onnx", w)
    np.savez(tmp_path / "cal.npz", x=_spread_inputs(40, 1))
    model = load_model(path, {"x": (1, 8, 12, 12)})
    data = open_dataset(tmp_path / "cal.npz", model.inputs)
    rounded = gptq.rounded_weights(model.mod, calibrate.calibrate(model.mod, data, "minmax", 99.99), data)
    nearest, scale = qdq.weight_params(w.astype(np.float32), 0)
    assert list(rounded) == ["conv2d_0"] and rounded["conv2d_0"].dtype == np.int8
    test = _spread_inputs(20, 2)
    ref = _run_each(path, test)
    sqnr = {}
    for name, q in (("nearest", nearest), ("gptq", rounded["conv2d_0"])):
        got = _run_each(_spread_conv(tmp_path / f"{name}.onnx", q * scale[:, None, None, None]), test)
        sqnr[name] = 10 * np.log10((ref ** 2).sum() / ((got - ref) ** 2).sum())
    print(f"int8 weights, float activations: round to nearest {sqnr['nearest']:.1f} dB, GPTQ {sqnr['gptq']:.1f} dB")
    assert np.abs(rounded["conv2d_0"].astype(int) - nearest).max() >= 1
    assert sqnr["gptq"] >= sqnr["nearest"] + 6
    # the build's step: its record, and the int8 bundle no worse for it (12.5 dB both: the input's per-tensor uint8
    # error dominates this one layer's output)
    results, on, off = _with_and_without(path, tmp_path, "gptq-weights-int8")
    print(f"int8 bundle SQNR with GPTQ {on:.1f} dB, without {off:.1f} dB")
    assert results["on"].compiled.quantization["weights_rounded"] == 1
    assert results["off"].compiled.quantization["weights_rounded"] is None
    assert on >= off - 0.5


def _outlier_mlp(path):
    """Four dense layers (MatMul, Add, Relu) whose third layer reads a tensor with one huge channel that its weights
    then nearly cancel: per-tensor uint8 on that input leaves the other channels a handful of levels, so that layer
    alone ruins int8 — and it is neither the first nor the last."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    widths = [16, 32, 32, 32, 10]
    weights = [rng.normal(0, 1 / np.sqrt(a), (a, b)).astype(np.float32) for a, b in zip(widths, widths[1:])]
    weights[1][:, 0] *= 300                  # hidden channel 0 of layer 2's output: ~300x the others
    weights[2][0, :] /= 300                  # which layer 3 scales back
    nodes, inits, x = [], [], "x"
    for i, w in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(np.full(w.shape[1], 0.1, np.float32),
                                                                                f"b{i}")]
        nodes += [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]), helper.make_node("Add", [f"m{i}", f"b{i}"],
                                                                                       [f"a{i}"])]
        x = f"a{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"]))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "outlier_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    return path


@pytest.fixture(scope="module")
def outlier(tmp_path_factory):
    d = tmp_path_factory.mktemp("budget")
    np.savez(d / "cal.npz", x=np.random.default_rng(1).uniform(-1, 1, (60, 16)).astype(np.float32))
    return {"dir": d, "model": _outlier_mlp(d / "mlp.onnx"), "data": d / "cal.npz"}


def _budget_build(outlier, name, **budget):
    options = BuildOptions(offload=NO_OFFLOAD, quantize=QuantizeOptions("int8", outlier["data"], **budget))
    result = api.build(outlier["model"], "host", outlier["dir"] / name, options=options)
    record = json.loads((result.bundle_dir / "manifest.json").read_text())["quantization"]
    assert record == result.compiled.quantization
    return result, {**record, **record["mixed_precision"]}


BUDGET_DB = 35.0


def test_error_budget_keeps_the_sensitive_layer_float(outlier):
    """Plain int8 misses the budget; the search keeps one layer float (the outlier's reader) and meets it, where
    the naive rule — first and last layer float, two layers — still misses it (measured in the same build)."""
    result, record = _budget_build(outlier, "budget", min_sqnr_db=BUDGET_DB)
    print(json.dumps({k: record[k] for k in ("sqnr_db", "float_layers")}))
    assert record["sqnr_db"]["int8"] < BUDGET_DB <= record["sqnr_db"]["mixed"]
    assert [r["layer"] for r in record["float_layers"]] == ["matmul_2"]
    row = record["float_layers"][0]
    assert row["why"] == "budget" and row["sqnr_alone_db"] < BUDGET_DB and row["bytes_added"] == 3 * 32 * 32 - 4 * 32
    assert row["macs"] == 32 * 32 and 0 < row["mac_share"] < 1
    assert record["layers"] == 3 and record["quantizable_layers"] == 4
    # the held-back samples (the bundle itself: it computes the searched graph) are far better than plain int8, but
    # 12 of them miss the budget met on 32 calibration samples (30 dB here), which the build says
    held = result.evaluation.outputs[0].sqnr_db
    assert held > record["sqnr_db"]["int8"] + 10
    assert (held < BUDGET_DB) == any("below the error budget" in w for w in result.warnings)

    naive, record = _budget_build(outlier, "first-last", min_sqnr_db=BUDGET_DB, keep_float=("matmul_0", "matmul_3"))
    assert record["sqnr_db"]["keep_float"] < BUDGET_DB <= record["sqnr_db"]["mixed"]
    assert [(r["layer"], r["why"]) for r in record["float_layers"]] == [
        ("matmul_0", "--keep-float"), ("matmul_2", "budget"), ("matmul_3", "--keep-float")]
    assert record["layers"] == 1


def test_keep_float_alone_leaves_the_matching_layers_float(outlier):
    result, record = _budget_build(outlier, "keep", keep_float=("matmul_[12]",))
    assert [r["layer"] for r in record["float_layers"]] == ["matmul_1", "matmul_2"]
    assert "budget" not in record and record["layers"] == 2
    # float weights behind no dequantize: two int8 weight constants left in the QDQ graph
    stored = []
    relax.analysis.post_order_visit(result.compiled.quantized_graph["main"], lambda e: stored.append(
        str(e.args[0].ty.dtype)) if isinstance(e, relax.Call) and getattr(e.op, "name", "") == "relax.dequantize"
        and isinstance(e.args[0], tvm.ir.expr.Constant) else None)
    assert stored.count("int8") == 2


@pytest.mark.parametrize("flags, keywords", [
    (["--min-sqnr", "30", "--max-error", "1%"], ["--min-sqnr and --max-error"]),
    (["--min-sqnr", "lots"], ["--min-sqnr 'lots'", "dB"]),
    (["--max-error", "150%"], ["--max-error '150%'", "between 0 and 100"]),
    (["--keep-float", "conv*"], ["--keep-float 'conv*'", "matches no", "matmul_0"]),
    (["--keep-float", "*"], ["every quantizable layer"]),
    (["--min-sqnr", "200dB"], ["200 dB", "not reachable", "int8 gives"]),
])
def test_error_budget_refusals_are_one_line(outlier, flags, keywords):
    out = outlier["dir"] / "refused"
    result = cli("build", outlier["model"], "-o", out, "--offload", "none", "--quantize", "int8", "--calibration",
                 outlier["data"], *flags)
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)
    assert not out.exists()


def test_error_budget_needs_int8(outlier):
    result = cli("build", outlier["model"], "-o", outlier["dir"] / "x", "--min-sqnr", "30")
    check_error(result.stderr, result.exit_code, "--min-sqnr is for --quantize int8 or fp16", exception=result.exception)


@pytest.mark.parametrize("budget", [{}, {"min_sqnr_db": 40.0}])
def test_streaming_model_quantizes(tmp_path, budget):
    """A streaming model's quantized reference starts from the initial state and feeds its state outputs back (it
    looked every parameter of main up in the sample steps, which leave the state out: a KeyError). With a budget the
    search runs each calibration step with its recorded state, as calibration does."""
    from test_streaming import leaky_state_model

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "cal.npz", x=rng.uniform(-1, 1, (40, 4)).astype(np.float32),
             h=rng.uniform(-1, 1, (40, 4)).astype(np.float32))
    options = BuildOptions(offload=NO_OFFLOAD, quantize=QuantizeOptions("int8", tmp_path / "cal.npz", **budget))
    result = api.build(leaky_state_model(tmp_path / "leaky.onnx"), "host", tmp_path / "b", options=options)
    if budget:
        mixed = result.compiled.quantization["mixed_precision"]
        assert mixed["sqnr_db"]["mixed"] >= 40 and mixed["float_layers"] == []
    assert result.manifest.verification["status"] == "verified"
    assert result.manifest.verification["runner"].endswith("steps streamed")
    assert result.compiled.quantization["tensors"] == 2    # both inputs of the add x + 0.5 h


def test_switchable_graph_is_the_float_and_the_int8_graph(outlier):
    """The budget search's one module: switches all off compute the float model, all on the QDQ graph, and a mix the
    graph with those layers left float (qdq.rewrite(floats=...)), each exactly (a select per layer; plain +
    s * (quantized - plain) was a rounding away)."""
    from tvm import relax as rx

    from edgec.dataset import open_dataset
    from edgec.frontends import load_model
    from edgec.quantize import analysis, calibrate, qdq
    from edgec.quantize.calibrate import on_host

    model = load_model(outlier["model"], None)
    mod = rx.transform.FoldConstant()(rx.transform.DecomposeOpsForInference()(model.mod))
    ranges = calibrate.calibrate(mod, open_dataset(outlier["data"], model.inputs), "minmax", 99.99)
    names = list(analysis.plan(mod["main"]).layers.values())
    switched = on_host(qdq.rewrite(mod, ranges, switchable=True)[0])
    x = np.random.default_rng(5).uniform(-1, 1, (1, 16)).astype(np.float32)
    # in range; far out of it (float values large next to the clipped int8 ones); an infinite input
    for sample in (x, x * 1e7, np.where(np.arange(16) == 3, np.inf, x).astype(np.float32)):
        for floats in (set(names), set(), {"matmul_2"}, {"matmul_0", "matmul_3"}):
            switch = tvm.runtime.tensor(np.array([n not in floats for n in names], bool))
            got = switched["main"](tvm.runtime.tensor(sample), switch).numpy()
            want = (on_host(mod) if floats == set(names) else
                    on_host(qdq.rewrite(mod, ranges, frozenset(floats))[0]))["main"](tvm.runtime.tensor(sample)).numpy()
            np.testing.assert_array_equal(got, want)


def test_held_back_budget_miss_without_an_sqnr_is_warned():
    """The held-back table has no SQNR for an all-0 reference output with an error (-inf dB) nor for NaN/infinite
    mismatches (counted apart): both miss the budget and are warned about, as a low SQNR is; exact is not."""
    from edgec.api import _budget_missed
    from edgec.evaluation import OutputMetrics

    def output(name, sqnr, max_abs, nonfinite=0):
        return OutputMetrics(name, (4,), "float32", sqnr, max_abs == 0 and not nonfinite, max_abs, nonfinite, False,
                             None, None, None)

    evaluation = type("Evaluation", (), {"outputs": [output("low", 20.0, 0.5), output("fine", 50.0, 0.01),
                                                     output("exact", None, 0.0), output("zero", None, 0.2),
                                                     output("nan", 45.0, 0.01, nonfinite=3)]})
    warned = _budget_missed(QuantizeOptions("int8", None, min_sqnr_db=30.0), evaluation)
    assert [w.split("'")[1] for w in warned] == ["low", "zero", "nan"]
    assert "20.0 dB" in warned[0] and "up to 0.2 where the float model gives 0" in warned[1] and "3 NaN" in warned[2]
    assert _budget_missed(QuantizeOptions("int8", None), evaluation) == []


def test_budget_sqnr_counts_a_nan_as_missing_the_budget():
    """A NaN or infinity on one side only misses any budget; the finite elements give the SQNR as the held-back
    table does (a NaN noise was never below the running worst: the mix met every budget)."""
    from edgec.quantize import budget

    switched = budget._Switched.__new__(budget._Switched)
    switched.reference = [[np.array([1.0, np.inf, 2.0])], [np.array([3.0, np.inf, -1.0])]]
    for got, want in (([1.1, np.nan, 2.0], -np.inf), ([1.0, np.inf, 2.1], 10 * np.log10(15 / 0.01))):
        switched._outputs = lambda floats, count: [[np.array(got)], [np.array([3.0, np.inf, -1.0])]]
        assert switched.sqnr(set(), 2) == pytest.approx(want)


def test_budget_sqnr_stops_at_the_sample_that_misses_the_budget():
    """Given the budget, a mix is run only until its noise so far exceeds what the budget allows of the reference's
    whole signal (the search only needs to know it missed); a mix that meets it is measured on every sample, to the
    same SQNR as without the budget."""
    from edgec.quantize import budget

    switched = budget._Switched.__new__(budget._Switched)
    switched.reference = [[np.array([1.0, 2.0])], [np.array([3.0, -1.0])]]
    switched.max_signal = [15.0]
    run = []

    def outputs(got):
        def samples(floats, count):
            for g in got[:count]:
                run.append(g)
                yield [np.array(g)]
        return samples

    switched._outputs = outputs([[1.5, 2.0], [3.0, -1.0]])      # 0.25 of noise in the first sample: 17.8 dB
    assert switched.sqnr(set(), 2, budget=20.0) == -np.inf and len(run) == 1
    run.clear()
    switched._outputs = outputs([[1.0, 2.1], [3.0, -1.0]])      # 0.01: 31.8 dB
    assert switched.sqnr(set(), 2, budget=20.0) == switched.sqnr(set(), 2) == pytest.approx(10 * np.log10(15 / 0.01))
    assert len(run) == 4


def test_error_budget_on_a_model_without_quantizable_layers(tmp_path):
    """No layer to quantize: the search runs its module with an empty switch vector and the build is the float
    model (an empty switch list was a float64 array: the module refused it)."""
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "relu",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "relu.onnx")
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(0).uniform(-1, 1, (20, 1, 16)).astype(np.float32))
    options = BuildOptions(offload=NO_OFFLOAD, quantize=QuantizeOptions("int8", tmp_path / "cal.npz", min_sqnr_db=30))
    result = api.build(tmp_path / "relu.onnx", "host", tmp_path / "b", options=options)
    mixed = result.compiled.quantization["mixed_precision"]
    assert mixed["quantizable_layers"] == 0 and mixed["float_layers"] == [] and mixed["sqnr_db"]["mixed"] is None
    assert result.evaluation.outputs[0].exact


def test_budget_record_and_summary_keep_minus_infinity_apart_from_exact():
    """JSON has no infinity: an exact SQNR is written None and printed inf, one with noise and no signal "-inf" and
    printed so (both were None: an int8 graph with nothing but noise read 'int8 inf')."""
    from edgec.quantize.budget import _finite
    from edgec.report import _mixed_precision

    record = _finite({"budget": {"min_sqnr_db": 30.0, "measured_on": "32 calibration samples"},
                      "sqnr_db": {"int8": -np.inf, "keep_float": np.inf, "mixed": 31.0}})
    assert record["sqnr_db"] == {"int8": "-inf", "keep_float": None, "mixed": 31.0}
    assert json.loads(json.dumps(record)) == record
    assert "int8 -inf dB, with --keep-float inf, mixed 31.0 dB" in _mixed_precision(record)[0]


def test_summary_leaves_out_the_steps_that_did_not_run():
    """The build summary's quantization line lists what the record says; bias correction, which does not run where
    gptq-weights-int8 did, is left out rather than printed as 'None'."""
    from edgec.report import quantization_line

    line = quantization_line({"mode": "int8", "method": "minmax", "layers": 53, "bias_corrected": None,
                              "weights_rounded": 53, "float": []})
    assert line == "  quantization: mode int8; method minmax; layers 53; weights rounded 53"
