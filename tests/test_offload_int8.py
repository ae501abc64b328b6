"""oneDNN int8 offload of QDQ models (made here with onnxruntime.quantization.quantize_static, per channel): each
conv2d/matmul chain runs as one integer primitive with its weights kept int8, and the small models' outputs are
within one quantization step of onnxruntime running the same QDQ model as written (verify.onnxruntime_as_written),
with most elements exact; a deep one is held to the quantized rule (see the MobileNetV2 test)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

from edgec import api, report
from edgec.build import BuildOptions
from edgec.examples import mobilenet_v2
from edgec.quantize import QuantizeOptions
from verify import needs_onednn_int8, onnxruntime_as_written, save_onnx

ONEDNN = BuildOptions(offload=("onednn",))
RNG = np.random.default_rng(5)


class _Samples(CalibrationDataReader):
    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)


def quantized(model: Path, samples: list[dict[str, np.ndarray]], activations=QuantType.QUInt8,
              reduce_range: bool = False) -> Path:
    """onnxruntime's static QDQ quantization; `reduce_range`: 7-bit weights (within ±64)."""
    out = model.with_name(model.stem + f"_qdq_{activations.name}{'_7bit' * reduce_range}.onnx")
    quantize_static(str(model), str(out), _Samples(samples), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=activations, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return out


def _output_scale(model: Path, output: str) -> float:
    """The scale of the DequantizeLinear that makes `output`: one quantization step of it."""
    import onnx

    graph = onnx.load(str(model)).graph
    node = next(n for n in graph.node if output in n.output)
    assert node.op_type == "DequantizeLinear", node.op_type
    scale = next(i for i in graph.initializer if i.name == node.input[1])
    return float(numpy_helper.to_array(scale))


def check_within_one_step(model: Path, bundle: Path, inputs: dict[str, np.ndarray]) -> float:
    """Every output within one step of onnxruntime's; returns the fraction of elements off by one step."""
    ours = api.run(bundle, inputs).outputs
    session = onnxruntime_as_written(model)
    theirs = dict(zip([o.name for o in session.get_outputs()], session.run(None, inputs)))
    off = total = 0
    for name, expected in theirs.items():
        step = _output_scale(model, name)
        steps = np.abs(ours[name].astype(np.float64) - expected) / step
        assert steps.max() <= 1.0 + 1e-3, f"{name}: {steps.max():.2f} steps off"
        off += int((steps > 0.5).sum())
        total += steps.size
    print(f"{bundle.name}: {off} of {total} elements one step off ({off / total:.2%})")
    return off / total


def build(model: Path, out: Path, inputs, options: BuildOptions = ONEDNN) -> api.BuildResult:
    return api.build(model, "host", out, options=options, sample_inputs=inputs)


def int8_placement(result: api.BuildResult) -> dict[str, list[str]]:
    placed = {}
    for p in report.build_json(result)["offload"]:
        placed.setdefault(p["operator"], []).append(f"{p['backend']}:{p['detail']}")
    return placed


def conv_forms(path: Path) -> Path:
    """Every conv2d form the fp32 path takes (3x3 padded, depthwise strided asymmetric, grouped dilated, 1x1),
    ReLU6 as Clip, a ReLU, a Gemm with bias."""
    inits, nodes = [], []

    def conv(x, out, cin, cout, k, group=1, **attrs):
        w, b = f"{out}_w", f"{out}_b"
        inits.extend([numpy_helper.from_array((RNG.standard_normal((cout, cin // group, k, k)) * 0.3)
                                              .astype(np.float32), w),
                      numpy_helper.from_array((RNG.standard_normal(cout) * 0.1).astype(np.float32), b)])
        nodes.append(helper.make_node("Conv", [x, w, b], [out], group=group, kernel_shape=[k, k], **attrs))
        return out

    inits += [numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")]
    a = conv("x", "a", 8, 16, 3, pads=[1, 1, 1, 1])
    nodes.append(helper.make_node("Clip", [a, "lo", "hi"], ["a6"]))
    b = conv("a6", "b", 16, 16, 3, group=16, strides=[2, 2], pads=[0, 1, 1, 0])
    c = conv(b, "c", 16, 16, 3, group=4, dilations=[2, 2], pads=[2, 2, 2, 2])
    nodes.append(helper.make_node("Relu", [c], ["cr"]))
    d = conv("cr", "d", 16, 16, 1)
    nodes.append(helper.make_node("Flatten", [d], ["f"]))
    inits += [numpy_helper.from_array((RNG.standard_normal((10, 16 * 8 * 8)) * 0.1).astype(np.float32), "g_w"),
              numpy_helper.from_array((RNG.standard_normal(10) * 0.1).astype(np.float32), "g_b")]
    nodes.append(helper.make_node("Gemm", ["f", "g_w", "g_b"], ["y"], transB=1))
    return save_onnx(path, "conv_forms", nodes, {"x": [1, 8, 16, 16]}, {"y": [1, 10]}, inits)


def qdq_conv(path: Path, sx: float, sw: np.ndarray, sb: np.ndarray, sy: float, *, group: int = 1, zx: int = 0,
             tail: str | None = None) -> Path:
    """One hand-made QDQ 3x3 conv over [1, 4, 6, 6] (s8 activations, zero points zx and 3) with these scales: the
    input's, the weights' and the bias's per output channel (len(sw) of them), the output's; `tail`: a float ONNX
    operator between the conv and its quantize."""
    rng = np.random.default_rng(2)
    cout = len(sw)
    inits = [numpy_helper.from_array(np.asarray(v, dtype), name) for name, v, dtype in [
        ("sx", sx, np.float32), ("zx", zx, np.int8), ("sw", sw, np.float32), ("zw", [0] * cout, np.int8),
        ("sb", sb, np.float32), ("zb", [0] * cout, np.int32), ("sy", sy, np.float32), ("zy", 3, np.int8),
        ("w", rng.integers(-127, 128, (cout, 4 // group, 3, 3)), np.int8),
        ("b", rng.integers(-500, 500, cout), np.int32)]]
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], axis=0),
             helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1], group=group),
             *([helper.make_node(tail, ["c"], ["t"])] if tail else []),
             helper.make_node("QuantizeLinear", ["t" if tail else "c", "sy", "zy"], ["cq"]),
             helper.make_node("DequantizeLinear", ["cq", "sy", "zy"], ["y"])]
    return save_onnx(path, "qconv", nodes, {"x": [1, 4, 6, 6]}, {"y": [1, cout, 6, 6]}, inits)


def float_tail_conv(path: Path, tail: str) -> Path:
    """qdq_conv with the float ONNX operator `tail` between the conv and its quantize: five output channels of
    different weight scales, the input's zero point -7."""
    sx, sw = np.float32(0.02), np.linspace(0.004, 0.012, 5, dtype=np.float32)
    return qdq_conv(path, sx, sw, sx * sw, 0.05, zx=-7, tail=tail)


@needs_onednn_int8
def test_bias_at_another_scale_is_not_an_int8_bias(tmp_path):
    """The integer kernels add the int32 bias at scale sx * sw: a chain whose bias has another scale is an int8 conv
    with a float32 output, the bias added after it in float (it ran as an int8 primitive with the bias off by that
    factor: 58% of the outputs wrong)."""
    sx, sw = np.float32(0.02), np.full(4, 0.01, np.float32)
    model = qdq_conv(tmp_path / "qconv.onnx", sx, sw, 8 * sx * sw, 0.01)
    result = build(model, tmp_path / "b", {"x": (RNG.standard_normal((1, 4, 6, 6)) * 0.5).astype(np.float32)})
    assert result.manifest.verification["status"] == "verified"
    assert int8_placement(result)["conv2d"] == ["onednn:onednn.qconv2d_f32"]


@needs_onednn_int8
@pytest.mark.parametrize("tail", ["HardSwish", "Sigmoid"])
def test_int8_conv_with_a_float_tail_runs_int8(tmp_path, tail):
    """A conv whose output goes through a float operator before its quantize (edgec's own quantization leaves
    hardswish and sigmoid so) is one int8 primitive with the operator as a post-op in real units, sx * sw per
    channel, and an 8-bit destination: PP-OCRv4 det's and rec's convs ran as float convs on weights dequantized at
    load, the int8 bundle slower than the fp32 one (then as int8 primitives writing float32 for a TVM kernel).
    Within one step of onnxruntime's QDQ math."""
    model = float_tail_conv(tmp_path / "qconv.onnx", tail)
    sample = {"x": (RNG.standard_normal((1, 4, 6, 6)) * 0.8).astype(np.float32)}
    result = build(model, tmp_path / "b", sample)
    assert result.manifest.verification["status"] == "verified"
    assert int8_placement(result)["conv2d"] == [f"onednn:onednn.qconv2d_bias_{tail.lower()}"]
    for x in (sample, {"x": (RNG.standard_normal((1, 4, 6, 6)) * 2).astype(np.float32)}):
        assert check_within_one_step(model, tmp_path / "b", x) < 0.05


@needs_onednn_int8
@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8])
def test_conv_forms_int8_within_one_step(tmp_path, activations):
    model = conv_forms(tmp_path / "forms.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples, activations)
    result = build(qdq, tmp_path / "b", samples[0])
    placed = int8_placement(result)
    assert placed["conv2d"] and all(p.startswith("onednn:onednn.qconv2d") for p in placed["conv2d"]), placed
    assert placed["matmul"] == ["onednn:onednn.qmatmul_bias"], placed
    # the int8 weights are what params.bin holds: far less than the float weights' 4 bytes each
    weights = sum(np.prod(i.dims) for i in __import__("onnx").load(str(model)).graph.initializer)
    assert (tmp_path / "b" / "params.bin").stat().st_size < 1.5 * weights
    # and no weight or bias zero points (zeros, which the patterns' checks fixed): neither _pack nor run reads them
    import tvm

    params = tvm.runtime.load_param_dict((tmp_path / "b" / "params.bin").read_bytes())
    assert not [name for name, v in params.items() if v.numpy().size > 1 and not v.numpy().any()]
    for sample in [samples[1], {"x": (RNG.standard_normal((1, 8, 16, 16)) * 2).astype(np.float32)}]:
        assert check_within_one_step(qdq, tmp_path / "b", sample) < 0.05


@needs_onednn_int8
def test_mobilenet_v2_int8_on_onednn(tmp_path):
    """All 52 convs (ReLU6 chains too) are oneDNN int8 primitives. Each computes the exact integer sum and requantizes
    with one float32 scale, the reference (onnxruntime running the QDQ model's float math) divides a float32 value by
    the output scale: a value within an ulp or two of a half step rounds the other way (sample 2 here: one such conv
    output of 13824 in block 5), and this random-weight network amplifies that one flip through its depth to 10% of
    the logits, up to 11 steps. The reference nudged by a few ulps lands as far (23%), so the quantized rule holds
    the bundle to that (reference.QuantizedRule.nudges): verified. Own generator: the calibration and the sample are
    the ones measured, whichever tests ran before."""
    rng = np.random.default_rng(5)
    model = mobilenet_v2(tmp_path / "mnv2.onnx", width=0.35, resolution=96)
    samples = [{"input": rng.random((1, 3, 96, 96), dtype=np.float32)} for _ in range(8)]
    qdq = quantized(model, samples)
    result = build(qdq, tmp_path / "b", samples[2])
    convs = [p for p in report.build_json(result)["offload"] if p["operator"] == "conv2d"]
    assert sum(p["count"] for p in convs) == 52, convs
    assert all(p["backend"] == "onednn" and p["detail"].startswith("onednn.qconv2d") for p in convs), convs
    verification = result.manifest.verification
    assert verification["status"] == "verified" and verification["rule"]["name"] == "quantized", verification
    logits = verification["outputs"]["logits"]
    # beyond the rule's 5% on this sample, within what the nudged reference measures
    assert logits["margin_db"] >= 0.0 and 0.05 < logits["fraction_off"] <= logits["nudged_fraction_off"], logits


def residual_blocks(path: Path) -> Path:
    """Two residual blocks, the skip added first and second (QDQ keeps the sums 8-bit): conv 3x3 + ReLU, conv 1x1,
    Add(x, conv); conv 1x1 + ReLU, conv 3x3, Add(conv, skip)."""
    inits, nodes = [], []

    def conv(x, out, cin, cout, k):
        w, b = f"{out}_w", f"{out}_b"
        inits.extend([numpy_helper.from_array((RNG.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32), w),
                      numpy_helper.from_array((RNG.standard_normal(cout) * 0.1).astype(np.float32), b)])
        nodes.append(helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k], pads=[k // 2] * 4))
        return out

    nodes.append(helper.make_node("Relu", [conv("x", "a", 8, 16, 3)], ["ar"]))
    nodes.append(helper.make_node("Add", ["x", conv("ar", "b", 16, 8, 1)], ["s1"]))
    nodes.append(helper.make_node("Relu", [conv("s1", "c", 8, 8, 1)], ["cr"]))
    nodes.append(helper.make_node("Add", [conv("cr", "d", 8, 8, 3), "s1"], ["y"]))
    return save_onnx(path, "residual_blocks", nodes, {"x": [1, 8, 16, 16]}, {"y": [1, 8, 16, 16]}, inits)


@needs_onednn_int8
@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8])
def test_residual_blocks_int8_exact(tmp_path, activations):
    """Each conv is an int8 primitive, though its input is also the residual add's (its dequantize untied) and the
    add sits between NHWC convs (the transposes moved through it). Each residual add is the sum post-op of the conv
    before it (in the first block the skip is the first operand, in the second the second), rounding where QDQ
    rounds: verified by the quantized rule and within one step of onnxruntime."""
    model = residual_blocks(tmp_path / "res.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples, activations)
    result = build(qdq, tmp_path / "b", samples[0])
    # the quantizer drops a ReLU its quantize's range clips anyway
    placed = {(p["detail"], p["count"]) for p in report.build_json(result)["offload"] if p["operator"] == "conv2d"}
    assert placed == {("onednn.qconv2d_bias", 2), ("onednn.qconv2d_bias_add", 2)}, placed
    verification = result.manifest.verification
    assert verification["status"] == "verified" and verification["rule"]["name"] == "quantized", verification
    for sample in [samples[1], {"x": (RNG.standard_normal((1, 8, 16, 16)) * 2).astype(np.float32)}]:
        assert check_within_one_step(qdq, tmp_path / "b", sample) < 0.05


@needs_onednn_int8
@pytest.mark.parametrize("fault", ["residual_scale", "one_rounding_less"])
def test_residual_sum_fault_is_refused(tmp_path, monkeypatch, fault):
    """A fault seeded in the emitted sum post-op (the residual's scale 2% off; the conv's own rounding and
    saturation left out, so the sum rounds once where QDQ rounds twice) is refused by the quantized rule."""
    from edgec.offload.backends import onednn
    from edgec.verification import VerificationFailed

    correct = onednn._qsum

    def faulty(q, at):
        post_ops = correct(q, at)
        if fault == "residual_scale":
            # the sum's Param c * S(sr) / S(sz): c 1.02
            assert post_ops[-1].startswith("{dnnl::algorithm::undef, {1.0f, ")
            return post_ops[:-1] + [post_ops[-1].replace("{1.0f, ", "{1.02f, ", 1)]
        return post_ops[2:]

    monkeypatch.setattr(onednn, "_qsum", faulty)
    model = residual_blocks(tmp_path / "res.onnx")
    rng = np.random.default_rng(3)
    samples = [{"x": rng.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    with pytest.raises(VerificationFailed, match="rounding error") as e:
        build(quantized(model, samples), tmp_path / "b", samples[0])
    print(fault, e.value.message)


def qdq_conv_add(path: Path, residual: str, chain_out_scale: float) -> Path:
    """A hand-made u8 QDQ 3x3 conv over [1, 4, 6, 6] whose output, dequantized at `chain_out_scale` (its quantize's is
    0.01), is added to `residual`: "x", the conv's own input, or "r", a second input."""
    rng = np.random.default_rng(2)
    inits = [numpy_helper.from_array(np.asarray(v, dtype), name) for name, v, dtype in [
        ("sx", 0.02, np.float32), ("zx", 128, np.uint8), ("sw", [0.01] * 4, np.float32), ("zw", [0] * 4, np.int8),
        ("sb", [0.0002] * 4, np.float32), ("zb", [0] * 4, np.int32), ("sy", 0.01, np.float32),
        ("sy_read", chain_out_scale, np.float32), ("zy", 120, np.uint8), ("sz", 0.03, np.float32),
        ("zz", 130, np.uint8), ("w", rng.integers(-127, 128, (4, 4, 3, 3)), np.int8),
        ("b", rng.integers(-500, 500, 4), np.int32)]]
    nodes = [helper.make_node("QuantizeLinear", [name, "sx", "zx"], [f"{name}q"]) for name in sorted({"x", residual})]
    nodes += [helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
              helper.make_node("DequantizeLinear", [f"{residual}q", "sx", "zx"], ["rd"]),
              helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wd"], axis=0),
              helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bd"], axis=0),
              helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]),
              helper.make_node("QuantizeLinear", ["c", "sy", "zy"], ["cq"]),
              helper.make_node("DequantizeLinear", ["cq", "sy_read", "zy"], ["cd"]),
              helper.make_node("Add", ["cd", "rd"], ["s"]),
              helper.make_node("QuantizeLinear", ["s", "sz", "zz"], ["sq"]),
              helper.make_node("DequantizeLinear", ["sq", "sz", "zz"], ["y"])]
    inputs = {name: [1, 4, 6, 6] for name in ("x", residual)}
    return save_onnx(path, "qconv_add", nodes, inputs, {"y": [1, 4, 6, 6]}, inits)


@needs_onednn_int8
@pytest.mark.parametrize("residual, chain_out_scale, placed", [
    # x + conv(x): one operand is both the input and the residual (its C++ function took it twice: g++ failed)
    ("x", 0.01, "onednn.qconv2d_bias_add"),
    # the post-ops dequantize y with its quantize's scale: another dequantize scale is no sum post-op
    ("r", 0.013, "onednn.qconv2d_bias")])
def test_residual_sum_edge_cases(tmp_path, residual, chain_out_scale, placed):
    model = qdq_conv_add(tmp_path / "qconv_add.onnx", residual, chain_out_scale)
    inputs = {name: (RNG.standard_normal((1, 4, 6, 6)) * 0.5).astype(np.float32) for name in ("x", residual)}
    result = build(model, tmp_path / "b", inputs)
    assert result.manifest.verification["status"] == "verified"
    assert int8_placement(result) == {"conv2d": [f"onednn:{placed}"]}
    assert check_within_one_step(model, tmp_path / "b", inputs) < 0.05


@needs_onednn_int8
def test_int8_partitions_at_o3(tmp_path):
    """-O3's fast-math runs after offload-quantized has made its partitions: calls of functions in main."""
    model = residual_blocks(tmp_path / "res.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples)
    result = build(qdq, tmp_path / "b", samples[0], BuildOptions(offload=("onednn",), opt_level=3))
    assert result.manifest.verification["status"] == "verified"
    assert sum(p["count"] for p in report.build_json(result)["offload"] if p["operator"] == "conv2d") == 4


@pytest.mark.parametrize("mcpu, vnni", [("haswell", False), ("znver3", False), ("cascadelake", True),
                                        ("znver4", True), ("alderlake", True)])
def test_onednn_int8_limits_without_vnni(mcpu, vnni):
    """Without VNNI (AVX-512 VNNI, AVX-VNNI) oneDNN's int8 kernels add each two u8 x s8 products in a saturating int16
    (vpmaddubsw), exact for weights within ±64: on an AVX2 Zen 3, full-range weights gave 10% of a u8 conv's outputs
    wrong; s8 inputs get their weights halved."""
    import tvm

    from edgec.offload.backends.onednn import BACKEND

    limits = BACKEND.int8_limits(tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": mcpu}))
    assert (limits is None) == vnni, limits
    assert vnni or (limits.weight_max == 64 and limits.activations == ("uint8",) and mcpu in limits.why), limits


def _haswell_box(tmp_path: Path) -> Path:
    """A descriptor for a Haswell box (AVX2, no VNNI), whose code this machine can run."""
    descriptor = (Path(__file__).parents[1] / "targets" / "host.toml").read_text()
    target = tmp_path / "haswell-box.toml"
    target.write_text(descriptor.replace('name = "host"', 'name = "haswell-box"')
                      .replace('mtriple = "detect", mcpu = "detect"', 'mtriple = "x86_64-linux-gnu", mcpu = "haswell"'))
    return target


def test_int8_stays_in_tvm_without_vnni(tmp_path):
    """For a CPU without VNNI, full-range int8 weights (onnxruntime's default) are TVM's integer kernels, the reason
    and the count in the placement: AVX2's vpmaddwd kernels on the graph in oneDNN's layout (NHWC, where an im2col
    row is runs of channels), and the bundle is verified within one step."""
    model = conv_forms(tmp_path / "forms.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples)
    options = BuildOptions(offload=("onednn",), dump_ir=tmp_path / "ir")
    result = api.build(qdq, str(_haswell_box(tmp_path)), tmp_path / "b", options=options, sample_inputs=samples[0])
    assert result.manifest.verification["status"] == "verified"
    placed = int8_placement(result)
    assert len(placed["int8 layers"]) == 1 and "haswell (no VNNI)" in placed["int8 layers"][0], placed
    assert not any("onednn.q" in p for rows in placed.values() for p in rows), placed
    kernels = next((tmp_path / "ir").glob("*-int8-kernels.py")).read_text()
    assert kernels.count('"edgec.int8_kernel": "avx2"') == 3, kernels
    assert 'def int8_conv2d(x: T.Buffer((1, 16, 16, 8), "uint8")' in kernels     # NHWC
    assert check_within_one_step(qdq, tmp_path / "b", samples[1]) < 0.05


def test_7bit_weights_run_in_onednn_without_vnni(tmp_path):
    """For a CPU without VNNI, 7-bit weights (onnxruntime's reduce_range) and u8 inputs are oneDNN's int8 kernels,
    exact: within one step of onnxruntime's QDQ math, as with VNNI. s8 inputs stay TVM's."""
    model = conv_forms(tmp_path / "forms.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    target = _haswell_box(tmp_path)
    qdq = quantized(model, samples, reduce_range=True)
    result = api.build(qdq, str(target), tmp_path / "b", options=ONEDNN, sample_inputs=samples[0])
    assert result.manifest.verification["status"] == "verified"
    placed = int8_placement(result)
    assert "int8 layers" not in placed and placed["matmul"] == ["onednn:onednn.qmatmul_bias"], placed
    assert placed["conv2d"] and all(p.startswith("onednn:onednn.qconv2d") for p in placed["conv2d"]), placed
    for sample in samples[1:4]:
        assert check_within_one_step(qdq, tmp_path / "b", sample) < 0.05
    # zero points only where not 0, the source's in the bias where no padding is read (the Gemm reads the last
    # conv's output, zero point not 0): oneDNN compensates for a zero point attribute inside the kernel
    run = subprocess.run([sys.executable, "-m", "edgec.cli", "run", str(tmp_path / "b")], capture_output=True,
                         text=True, check=True, env={**os.environ, "DNNL_VERBOSE": "1"})
    primitives = [line for line in run.stdout.splitlines() if line.startswith("onednn_verbose,exec,cpu,")]
    matmul, first = ([line for line in primitives if key in line] for key in (",matmul,", "mb1_ic8oc16"))
    assert matmul and "zero-points:src" not in matmul[0] and "zero-points:dst" in matmul[0], primitives
    assert first and "zero-points:src" in first[0], primitives     # padded: the compensation stays oneDNN's
    signed = quantized(model, samples, QuantType.QInt8, reduce_range=True)
    placed = int8_placement(api.build(signed, str(target), tmp_path / "s8", options=ONEDNN, sample_inputs=samples[0]))
    assert "int8 input" in " ".join(placed["int8 layers"]), placed


def test_own_int8_quantization_makes_7bit_weights_without_vnni(tmp_path):
    """edgec's quantizer on a CPU without VNNI makes weights within ±64, so that oneDNN's int8 kernels take them; the
    manifest says so. Without offload it keeps ±127 (TVM's integer kernels sum any)."""
    model = conv_forms(tmp_path / "forms.onnx")
    data = tmp_path / "calibration.npz"
    np.savez(data, x=RNG.standard_normal((16, 1, 8, 16, 16)).astype(np.float32))
    target = str(_haswell_box(tmp_path))
    built = {}
    for offload in (("onednn",), ()):
        options = BuildOptions(offload=offload, quantize=QuantizeOptions("int8", data, method="minmax"))
        built[offload] = api.build(model, target, tmp_path / f"b{len(offload)}", options=options)
        assert built[offload].manifest.verification["status"] == "verified"
    weights = built[("onednn",)].manifest.quantization["weights"]
    assert "within ±64" in weights and "haswell (no VNNI)" in weights, weights
    assert "within" not in built[()].manifest.quantization["weights"]
    # every conv and the Gemm oneDNN's int8 primitives: those whose output stays float (the Gemm's ends the graph)
    # with a float32 destination
    placed = int8_placement(built[("onednn",)])
    assert "int8 layers" not in placed and all(p.startswith("onednn:onednn.qconv2d") for p in placed["conv2d"]), placed
    assert "onednn:onednn.qconv2d_bias_f32" in placed["conv2d"], placed
    assert placed["matmul"] == ["onednn:onednn.qmatmul_bias_f32"], placed


def lcnet_blocks(path: Path) -> Path:
    """PP-LCNet's layers between its convolutions, as PP-OCRv4 det has them: hardswish written out (Add 3, Clip 0..6,
    Mul, Div 6), a learnable scale and bias (Mul, Add of scalars), an SE block (ReduceMean, conv, ReLU, conv,
    hardsigmoid as Mul, Add, Clip 0..1, Mul by the block's input), a nearest Resize x2 concatenated with another
    conv's output, Sigmoid."""
    inits, nodes = [], []

    def scalar(name, value):
        inits.append(numpy_helper.from_array(np.float32(value), name))
        return name

    def conv(x, out, cin, cout, k, stride=1):
        w, b = f"{out}_w", f"{out}_b"
        inits.extend([numpy_helper.from_array((RNG.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32), w),
                      numpy_helper.from_array((RNG.standard_normal(cout) * 0.1).astype(np.float32), b)])
        nodes.append(helper.make_node("Conv", [x, w, b], [out], kernel_shape=[k, k], pads=[k // 2] * 4,
                                      strides=[stride, stride]))
        return out

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    a = conv("x", "a", 8, 16, 3)
    h = node("Div", [node("Mul", [a, node("Clip", [node("Add", [a, scalar("three", 3)], "a3"), scalar("zero", 0),
                                                   scalar("six", 6)], "a6")], "am"), "six"], "hs")
    lab = node("Add", [node("Mul", [h, scalar("scale", 1.1)], "ls"), scalar("bias", -0.05)], "lab")
    pooled = node("ReduceMean", [lab], "pool", axes=[2, 3], keepdims=1)
    se = conv(node("Relu", [conv(pooled, "se1", 16, 4, 1)], "se1r"), "se2", 4, 16, 1)
    gate = node("Clip", [node("Add", [node("Mul", [se, scalar("sixth", 1 / 6)], "g1"), scalar("half", 0.5)], "g2"),
                         "zero", scalar("one", 1)], "gate")
    excited = node("Mul", [lab, gate], "excited")
    low = conv(excited, "low", 16, 8, 3, stride=2)
    inits.append(numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "up"))
    up = node("Resize", [low, "", "up"], "upx", mode="nearest")
    joined = node("Concat", [up, conv(excited, "side", 16, 8, 1)], "joined", axis=1)
    node("Sigmoid", [conv(joined, "head", 16, 1, 3)], "y")
    return save_onnx(path, "lcnet_blocks", nodes, {"x": [1, 8, 16, 16]}, {"y": [1, 1, 16, 16]}, inits)


@needs_onednn_int8
@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8])
def test_lcnet_blocks_int8_whole_graph_nhwc(tmp_path, activations):
    """Between QDQ's int8 convs (NHWC in oneDNN), the float dequantize -> op -> quantize regions (hardswish, scalar
    scale and bias, SE block, resize, concat, sigmoid) move to NHWC too: the transposes around them cancel, only
    the input's and the output's are left; hardswish with the scale and bias, a chain of one 8-bit tensor, is a
    table lookup; the bundle passes the quantized rule."""
    model = lcnet_blocks(tmp_path / "lcnet.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples, activations)
    result = build(qdq, tmp_path / "b", samples[0], BuildOptions(offload=("onednn",), dump_ir=tmp_path / "ir"))
    assert result.manifest.verification["status"] == "verified"
    assert int8_placement(result) == {"conv2d": ["onednn:onednn.qconv2d_bias"]}
    partitioned = next((tmp_path / "ir").glob("*-offload-partition.py")).read_text()
    main = partitioned[partitioned.index("def main("):]
    assert main.count("R.permute_dims(") == 2, main
    assert "layout=\"NHWC\"" in main and "R.mean(" in main
    tables = next((tmp_path / "ir").glob("*-int8-lookup-tables.py")).read_text()
    main = tables[tables.index("def main("):]
    assert main.count("R.take(") >= 2, main
    # the tables hold what the chains compute: the same outputs without them
    plain = build(qdq, tmp_path / "plain", samples[0],
                  BuildOptions(offload=("onednn",), disabled_passes=("int8-lookup-tables",)))
    sample = {"x": (RNG.standard_normal((1, 8, 16, 16)) * 2).astype(np.float32)}
    np.testing.assert_array_equal(api.run(result.bundle_dir, sample).outputs["y"],
                                  api.run(plain.bundle_dir, sample).outputs["y"])


def test_lcnet_blocks_int8_keeps_shared_dequantize_out_of_memory(tmp_path):
    """The SE block's input (a lookup's 8-bit output) is read by its mean and by its product with the gate: its
    float values are computed in each reader's kernel (dequantize-per-use), the mean's included (mean-takes-
    producers), so no kernel stores a dequantized tensor; the outputs are the same bits as without both passes."""
    model = lcnet_blocks(tmp_path / "lcnet.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples)
    result = build(qdq, tmp_path / "b", samples[0], BuildOptions(offload=(), dump_ir=tmp_path / "ir"))
    assert result.manifest.verification["status"] == "verified"
    def stored(ir_dir):
        """The dequantize kernels main calls, but for the one that makes the output (gv), and the mean kernels."""
        fused = next(ir_dir.glob("*-fuse-tir.py")).read_text()
        calls = [line.strip() for line in fused[fused.index("def main("):].splitlines() if "R.call_tir(cls." in line]
        # kernel names without TVM's numbering, which follows the passes before (int8-layout's transposes)
        return ([c for c in calls if "cls.dequantize" in c and not c.startswith("gv =")],
                [re.sub(r"\d+", "", c.split("cls.")[1].split(",")[0]) for c in calls if "mean" in c])

    dequantized, means = stored(tmp_path / "ir")
    assert dequantized == [] and means == ["fused_dequantize_mean"], (dequantized, means)
    plain = build(qdq, tmp_path / "plain", samples[0], BuildOptions(
        offload=(), disabled_passes=("dequantize-per-use", "mean-takes-producers"), dump_ir=tmp_path / "p"))
    dequantized, means = stored(tmp_path / "p")
    assert len(dequantized) == 1 and means == ["fused_mean_quantize"], (dequantized, means)    # float32 stored
    sample = {"x": (RNG.standard_normal((1, 8, 16, 16)) * 2).astype(np.float32)}
    np.testing.assert_array_equal(api.run(result.bundle_dir, sample).outputs["y"],
                                  api.run(plain.bundle_dir, sample).outputs["y"])


def deconv_head(path: Path) -> Path:
    """PP-OCRv4 det's head between NHWC convs: conv 3x3 + ReLU, ConvTranspose 2x2 stride 2 (16 to 8 channels),
    ReLU, ConvTranspose 2x2 stride 2 to one channel; beside it a ConvTranspose 3x3 stride 2 with padding, output
    padding and a bias (another form), added after a conv."""
    inits, nodes = [], []

    def weights(name, shape):
        inits.append(numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name))
        return name

    def node(op, inputs, out, **attrs):
        nodes.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    a = node("Relu", [node("Conv", ["x", weights("a_w", (16, 8, 3, 3)), weights("a_b", (16,))], "a",
                           kernel_shape=[3, 3], pads=[1] * 4)], "ar")
    up = node("Relu", [node("ConvTranspose", [a, weights("u_w", (16, 8, 2, 2))], "u", kernel_shape=[2, 2],
                            strides=[2, 2])], "ur")
    node("ConvTranspose", [up, weights("v_w", (8, 1, 2, 2))], "y", kernel_shape=[2, 2], strides=[2, 2])
    side = node("ConvTranspose", [a, weights("s_w", (16, 4, 3, 3)), weights("s_b", (4,))], "s", kernel_shape=[3, 3],
                strides=[2, 2], pads=[1] * 4, output_padding=[1, 1])
    node("Conv", [side, weights("t_w", (4, 4, 1, 1)), weights("t_b", (4,))], "z", kernel_shape=[1, 1])
    return save_onnx(path, "deconv_head", nodes, {"x": [1, 8, 8, 8]}, {"y": [1, 1, 32, 32], "z": [1, 4, 16, 16]},
                     inits)


@needs_onednn_int8
@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8])
def test_deconv_int8_on_onednn_nhwc(tmp_path, activations):
    """QDQ ConvTranspose chains are oneDNN int8 deconvolutions in NHWC (computed between transposes that cancel
    against the NHWC convs' ones), within one step of onnxruntime and verified by the quantized rule. The one with
    an int32 bias is not a chain with its bias (its bias add, reshaped for NCHW, does not follow it to NHWC): an int8
    deconvolution with a float32 output, the bias added after it."""
    model = deconv_head(tmp_path / "head.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 8, 8)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples, activations)
    result = build(qdq, tmp_path / "b", samples[0], BuildOptions(offload=("onednn",), dump_ir=tmp_path / "ir"))
    verification = result.manifest.verification
    assert verification["status"] == "verified" and verification["rule"]["name"] == "quantized", verification
    deconvs = {(p["detail"], p["count"]) for p in report.build_json(result)["offload"]
               if p["operator"] == "conv2d_transpose"}
    assert deconvs == {("onednn.qdeconv", 2), ("onednn.qdeconv_f32", 1)}, deconvs
    partitioned = next((tmp_path / "ir").glob("*-offload-partition.py")).read_text()
    qdeconv = partitioned[partitioned.index('"Composite": "onednn.qdeconv"'):]
    assert 'data_layout="NHWC"' in qdeconv[:qdeconv.index("R.output(")], qdeconv
    for sample in [samples[1], {"x": (RNG.standard_normal((1, 8, 8, 8)) * 2).astype(np.float32)}]:
        assert check_within_one_step(qdq, tmp_path / "b", sample) < 0.05


@needs_onednn_int8
def test_own_quantization_takes_deconvolutions_int8(tmp_path):
    """--quantize int8 quantizes ConvTranspose layers too (per output channel along IOHW's O): on oneDNN the head's
    three deconvolutions are int8 primitives, not float ones on the float weights (PP-OCRv4 det's first one: 0.74 ms
    float, 0.14 int8), verified by the quantized rule, and the int8 bundle stays near the float model."""
    model = deconv_head(tmp_path / "head.onnx")
    np.savez(tmp_path / "cal.npz", x=RNG.standard_normal((20, 8, 8, 8)).astype(np.float32))
    options = BuildOptions(offload=("onednn",), quantize=QuantizeOptions("int8", tmp_path / "cal.npz"))
    result = api.build(model, "host", tmp_path / "b", options=options)
    assert result.manifest.verification["status"] == "verified", result.manifest.verification
    deconvs = {p["detail"]: p["count"] for p in report.build_json(result)["offload"]
               if p["operator"] == "conv2d_transpose"}
    # the ReLU between the two 2x2 ones is the first's post-op; the others end float (an output, a bias after it)
    assert deconvs == {"onednn.qdeconv_relu": 1, "onednn.qdeconv_f32": 2}, deconvs
    assert result.compiled.quantization["layers"] == 5
    sqnr = {o.name: o.sqnr_db for o in result.evaluation.outputs}
    assert min(sqnr.values()) >= 30, sqnr


def conv_with_tail(path: Path, tail: list[str]) -> Path:
    """x -> Conv 3x3 with a bias -> `tail` -> Conv 1x1: each entry of `tail` HardSwish, Sigmoid, "hardswish by hand"
    or affine (Mul and Add by scalars, as PP-LCNetV3's learnable affine blocks; the shift makes the output's zero
    point not 0)."""
    inits = [numpy_helper.from_array((RNG.standard_normal((16, 8, 3, 3)) * 0.3).astype(np.float32), "w1"),
             numpy_helper.from_array((RNG.standard_normal(16) * 0.1).astype(np.float32), "b1"),
             numpy_helper.from_array((RNG.standard_normal((8, 16, 1, 1)) * 0.3).astype(np.float32), "w2")]
    nodes, last = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1])], "a"
    for i, step in enumerate(tail):
        out = f"t{i}"
        if step == "affine":
            inits += [numpy_helper.from_array(np.float32(0.7 + i), f"s{i}"),
                      numpy_helper.from_array(np.float32(-0.2), f"z{i}")]
            nodes += [helper.make_node("Mul", [f"s{i}", last], [f"{out}m"]),
                      helper.make_node("Add", [f"{out}m", f"z{i}"], [out])]
        elif step == "hardswish by hand":   # as PaddlePaddle exports it: (x * clip(x + 3, 0, 6)) / 6, [1] constants
            inits += [numpy_helper.from_array(np.array([v], np.float32), f"{name}{i}")
                      for name, v in (("three", 3), ("zero", 0), ("six", 6))]
            nodes += [helper.make_node("Add", [last, f"three{i}"], [f"{out}a"]),
                      helper.make_node("Clip", [f"{out}a", f"zero{i}", f"six{i}"], [f"{out}c"]),
                      helper.make_node("Mul", [last, f"{out}c"], [f"{out}m"]),
                      helper.make_node("Div", [f"{out}m", f"six{i}"], [out])]
        else:
            nodes.append(helper.make_node(step, [last], [out]))
        last = out
    nodes.append(helper.make_node("Conv", [last, "w2"], ["y"]))
    return save_onnx(path, "conv_with_tail", nodes, {"x": [1, 8, 12, 12]}, {"y": [1, 8, 12, 12]}, inits)


@needs_onednn_int8
@pytest.mark.parametrize("tail, composite", [
    (["HardSwish", "affine"], "onednn.qconv2d_bias_hardswish_affine"),
    (["hardswish by hand"], "onednn.qconv2d_bias_hardswish"),
    (["Sigmoid"], "onednn.qconv2d_bias_sigmoid"),
    # the affine before the activation goes into the conv's weights and bias (fold-batchnorm)
    (["affine", "HardSwish", "affine"], "onednn.qconv2d_bias_hardswish_affine"),
    (["affine"], "onednn.qconv2d_bias"),
])
def test_int8_conv_tail_runs_as_post_ops(tmp_path, tail, composite):
    """--quantize int8 on oneDNN: a conv's elementwise tail up to the next quantize is the int8 primitive's post-ops
    (the conv writes uint8, no float32 tensor and TVM kernel between it and the next conv), verified by the
    quantized rule on two inputs. oneDNN 2.6 computes two linear post-ops with the last one's constants (one
    eltwise kernel per algorithm): the division by the output scale as a linear after the affine was refused by
    verification, so it rides on the last post-op's own scale."""
    model = conv_with_tail(tmp_path / "m.onnx", tail)
    np.savez(tmp_path / "cal.npz", x=RNG.standard_normal((20, 8, 12, 12)).astype(np.float32))
    options = BuildOptions(offload=("onednn",), quantize=QuantizeOptions("int8", tmp_path / "cal.npz"))
    for k, scale in enumerate((1.0, 3.0)):
        sample = {"x": (RNG.standard_normal((1, 8, 12, 12)) * scale).astype(np.float32)}
        result = api.build(model, "host", tmp_path / f"b{k}", options=options, sample_inputs=sample)
        assert result.manifest.verification["status"] == "verified", result.manifest.verification
    assert int8_placement(result)["conv2d"] == [f"onednn:{composite}", "onednn:onednn.qconv2d_f32"], \
        int8_placement(result)


def float_tflite_cnn(path: Path) -> Path:
    """A float TFLite CNN: conv 3x3 + RELU, depthwise 3x3, conv 1x1 (weights OHWI and 1HWC, which TVM's TFLite
    importer gives conv2d as HWIO and HWOI)."""
    from ai_edge_litert import schema_py_generated as schema

    from tflite_builder import Graph

    g, op, act = Graph(), schema.BuiltinOperator, schema.ActivationFunctionType
    x = g.tensor("image", (1, 12, 12, 8))

    def conv(src, name, weight_shape, channels, kind, activation=act.NONE, **fields):
        options = getattr(schema, f"{kind}OptionsT")()
        for key, value in dict(padding=schema.Padding.SAME, strideH=1, strideW=1,
                               fusedActivationFunction=activation, **fields).items():
            setattr(options, key, value)
        w = g.tensor(f"{name}_w", weight_shape, data=(RNG.standard_normal(weight_shape) * 0.3).astype(np.float32))
        b = g.tensor(f"{name}_b", (channels,), data=(RNG.standard_normal(channels) * 0.1).astype(np.float32))
        out = g.tensor(name, (1, 12, 12, channels))
        g.op(getattr(op, "CONV_2D" if kind == "Conv2D" else "DEPTHWISE_CONV_2D"), [src, w, b], [out],
             getattr(schema.BuiltinOptions, f"{kind}Options"), options)
        return out

    a = conv(x, "a", (16, 3, 3, 8), 16, "Conv2D", act.RELU)
    b = conv(a, "b", (1, 3, 3, 16), 16, "DepthwiseConv2D", depthMultiplier=1)
    return g.save(path, [x], [conv(b, "c", (8, 1, 1, 16), 8, "Conv2D")])


@pytest.mark.parametrize("target, backend, runner", [("host", "onednn", "in-process"), ("rpi4", "xnnpack", "qemu")])
def test_quantized_tflite_layers_run_on_int8_primitives(tmp_path, target, backend, runner):
    """edgec's int8 of a float TFLite model: its weights quantized per channel in the importer's HWIO/HWOI, which
    ConvertLayout transposes for the backend (OIHW); the transpose goes into the int8 constant (the scale's axis
    moved along), so the int8 convs are the backend's int8 primitives (before: the patterns saw a transposed
    dequantize, and the convs stayed float or went to TVM's kernels), verified by the quantized rule."""
    model = float_tflite_cnn(tmp_path / "cnn.tflite")
    np.savez(tmp_path / "cal.npz", image=RNG.standard_normal((16, 12, 12, 8)).astype(np.float32))
    options = BuildOptions(offload=(backend,), quantize=QuantizeOptions("int8", tmp_path / "cal.npz"))
    result = api.build(model, target, tmp_path / "b", options=options,
                       sample_inputs={"image": RNG.standard_normal((1, 12, 12, 8)).astype(np.float32)})
    checked = result.manifest.verification
    assert checked["status"] == "verified" and checked["runner"] == f"{runner}, 4 samples", checked
    # the last conv's output stays float (the model's output): oneDNN's int8 primitive with a float32 destination,
    # XNNPACK's float conv on dequantized weights (its int8 operators' outputs are 8-bit)
    last = {"onednn": "qconv2d_bias_f32", "xnnpack": "conv2d_bias"}[backend]
    assert int8_placement(result) == {"conv2d": [f"{backend}:{backend}.{p}" for p in
                                                 ("qconv2d_bias_relu", "qconv2d_bias", last)]}, \
        int8_placement(result)
    assert result.compiled.int8_kernels is None
