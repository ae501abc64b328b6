"""XNNPACK int8 offload for the Raspberry Pi targets, under qemu with the board's CPU model: int8 conv2d/matmul
chains run as XNNPACK's QC8 convolution (u8 activations as s8), and give the host's int8 bundle (oneDNN) result.

XNNPACK computes int32 sums requantized in float32 (sx * sw[c] / sy, rounded to nearest even): the example CNN's int8
layers give the quantized reference's every rounding; what is left is the float32 classifier's summation order."""
from __future__ import annotations

import numpy as np
import pytest
from onnxruntime.quantization import QuantType

from edgec import api, report
from edgec.build import BuildOptions
from edgec.examples import mobilenet_v2
from edgec.quantize import QuantizeOptions
from edgec.reference import decibels
from test_offload_arm import qemu_cpus  # noqa: F401  (a fixture)
from test_offload_int8 import check_within_one_step, conv_forms, int8_placement, qdq_conv, quantized
from verify import placed

RNG = np.random.default_rng(11)


def test_cnn_int8_rpi4_gives_the_quantized_reference_and_the_host_result(tmp_path, qemu_cpus):
    model = mobilenet_v2(tmp_path / "cnn.onnx", width=0.35, resolution=64, num_classes=10, seed=3)
    data = tmp_path / "calibration.npz"
    np.savez(data, input=RNG.random((10, 3, 64, 64), dtype=np.float32))
    inputs = {"input": RNG.random((1, 3, 64, 64), dtype=np.float32)}
    options = BuildOptions(quantize=QuantizeOptions("int8", data))
    arm = api.build(model, "rpi4", tmp_path / "rpi4", options=options, sample_inputs=inputs)
    host = api.build(model, "host", tmp_path / "host", options=options, sample_inputs=inputs)
    assert "cortex-a72" in qemu_cpus
    # every conv2d an int8 XNNPACK operator, ReLU6 fused (the classifier's output is not quantized: it stays float)
    patterns = int8_placement(arm)
    assert all(p.startswith("xnnpack:xnnpack.qconv2d") for p in patterns["conv2d"]), patterns
    assert placed(arm)[("conv2d", "xnnpack")] == 52
    assert "conv2d x35 -> xnnpack (xnnpack.qconv2d_bias_clip)" in report.build_text(arm)
    assert all(p.startswith("onednn:onednn.qconv2d") for p in int8_placement(host)["conv2d"])
    checked = arm.manifest.verification
    assert checked["status"] == "verified" and checked["runner"] == "qemu"
    # the quantized reference's rounding, every step of it: what is left is the float classifier's summation order
    # (on this input oneDNN's int8 is not: some requantization rounds the other way, 7 dB under the rule's bound)
    assert checked["outputs"]["logits"]["margin_db"] > 60, checked
    # and the host's int8 bundle, by the quantized rule: their difference is below the quantization's own error
    ours, theirs = (api.run(b.bundle_dir, inputs).outputs["logits"] for b in (arm, host))
    quantization_db = host.manifest.verification["outputs"]["logits"]["quantization_sqnr_db"]
    assert decibels(float((theirs ** 2).sum()), float(((ours - theirs) ** 2).sum())) > quantization_db


@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8])
def test_conv_forms_int8_rpi4_within_one_step(tmp_path, activations):
    """onnxruntime's QDQ (per channel): 3x3 padded + ReLU6, depthwise strided with asymmetric padding, grouped
    dilated + ReLU, 1x1, Gemm (transB) — each an XNNPACK QC8 operator, within one step of onnxruntime."""
    model = conv_forms(tmp_path / "forms.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples, activations)
    result = api.build(qdq, "rpi4", tmp_path / "b", sample_inputs=samples[0])
    assert result.manifest.verification["status"] == "verified"
    assert placed(result) == {("conv2d", "xnnpack"): 4, ("matmul", "xnnpack"): 1}
    patterns = int8_placement(result)
    assert all(p.startswith("xnnpack:xnnpack.qconv2d") for p in patterns["conv2d"]), patterns
    assert patterns["matmul"] == ["xnnpack:xnnpack.qmatmul_bias"], patterns
    assert check_within_one_step(qdq, tmp_path / "b", samples[1]) < 0.05


def test_requantization_scale_xnnpack_refuses_runs_in_tvm(tmp_path):
    """XNNPACK's QC8 convolution refuses a channel whose requantization scale (sx * sw / sy) is 256 or more: such a
    chain is refused at build time (it made the build fail at load: operator creation failed), runs as TVM's integer
    kernel (int8-kernels; the A72 has no dotprod: the int32 vector loop), and the bundle verifies."""
    sx, sw = np.float32(0.02), np.array([1.0, 0.01, 0.01, 0.01], np.float32)
    model = qdq_conv(tmp_path / "qconv.onnx", sx, sw, sx * sw, np.float32(sx * sw[0] / 300))
    result = api.build(model, "rpi4", tmp_path / "b",
                       sample_inputs={"x": (RNG.standard_normal((1, 4, 6, 6)) * 0.5).astype(np.float32)})
    assert result.manifest.verification["status"] == "verified"
    assert int8_placement(result) == {}
