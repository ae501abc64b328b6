"""XNNPACK int8 offload for the Raspberry Pi targets, under qemu with the board's CPU model: int8 conv2d/matmul
chains run as XNNPACK's QC8 convolution (u8 activations as s8), and give the host's int8 bundle (oneDNN) result.

XNNPACK computes int32 sums requantized in float32 (sx * sw[c] / sy, rounded to nearest even): the example CNN's int8
layers give the quantized reference's every rounding; what is left is the float32 classifier's summation order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx.utils import extract_model
from onnxruntime.quantization import QuantType

from edgec import api, report
from edgec.build import BuildOptions
from edgec.examples import mobilenet_v2
from edgec.quantize import QuantizeOptions
from edgec.reference import decibels
from test_offload_arm import qemu_cpus  # noqa: F401  (a fixture)
from test_offload_int8 import check_within_one_step, conv_forms, int8_placement, lcnet_blocks, qdq_conv, quantized
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
    # the host's int8 convs: oneDNN's primitives (on a CPU without VNNI too: edgec's quantizer makes 7-bit weights)
    host_int8 = int8_placement(host)
    assert all(p.startswith("onednn:onednn.qconv2d") for p in host_int8["conv2d"]), host_int8
    assert "int8 layers" not in host_int8, host_int8
    checked = arm.manifest.verification
    assert checked["status"] == "verified" and checked["runner"] == "qemu, 3 samples"  # the sample and 2 held back
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



def _onnxruntime_table(qdq: Path, chain: tuple[str, str], path: Path) -> np.ndarray:
    """What onnxruntime computes for each of the 256 uint8 codes of the QuantizeLinear output of chain[0]: the
    model's ops from there to chain[1]'s QuantizeLinear, cut out of the QDQ model (onnx.utils.extract_model)."""
    extract_model(str(qdq), str(path), [f"{chain[0]}_QuantizeLinear_Output"], [f"{chain[1]}_QuantizeLinear_Output"])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = session.get_inputs()[0]
    size = int(np.prod(x.shape))
    codes = np.resize(np.arange(256, dtype=np.uint8), -(-256 // size) * size).reshape(-1, *x.shape)
    return np.concatenate([session.run(None, {x.name: c})[0].ravel() for c in codes])[:256]


def test_lcnet_blocks_int8_rpi4_lookup_tables_made_at_build_time(tmp_path, qemu_cpus):
    """PP-LCNet's blocks (hardswish with scale and bias, an SE block's hardsigmoid, a nearest resize, the sigmoid) as
    onnxruntime's u8 QDQ model, on rpi4: each activation chain is a 256-entry uint8 table computed at build time on
    the build machine (a constant in the IR, then a weight in params.bin, the host build's same bytes), each entry
    onnxruntime's value of the chain on that code, indexed by XNNPACK's uint8 output itself (tbl/tbx, not a
    gather); under qemu (Cortex-A72)
    the bundle gives onnxruntime's every rounding, and the host int8 bundle's outputs."""
    model = lcnet_blocks(tmp_path / "lcnet.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(model, samples)
    arm = api.build(qdq, "rpi4", tmp_path / "rpi4", options=BuildOptions(dump_ir=tmp_path / "ir"),
                    sample_inputs=samples[0])
    assert qemu_cpus == ["cortex-a72"]      # the build's own verification
    checked = arm.manifest.verification
    assert (checked["status"], checked["runner"], checked["rule"]["name"]) == ("verified", "qemu", "quantized"), \
        checked
    assert checked["outputs"]["y"]["max_abs"] == 0, checked
    assert int8_placement(arm) == {"conv2d": ["xnnpack:xnnpack.qconv2d_bias"]}
    # hardswish with the scale and bias, the hardsigmoid, the sigmoid: lookups in constants, their uint8 index the
    # value itself (no int32 copy of it)
    tables_ir = next((tmp_path / "ir").glob("*-int8-lookup-tables.py")).read_text()
    main = tables_ir[tables_ir.index("def main("):]
    assert main.count("R.take(metadata[") == main.count("R.take(") == 3 and "R.astype(" not in main, main
    # each lookup kernel is AArch64's table instructions (tbl, then tbx on each next 64 entries), not a gather
    kernels = next((tmp_path / "ir").glob("*-cpu-default-schedule.py")).read_text()
    assert "llvm.aarch64.neon.tbl4" in kernels and "llvm.aarch64.neon.tbx4" in kernels and "T_take" not in kernels
    # every entry, where the bundle's outputs see few of them (an entry one step off is lost in later roundings)
    tables = [v for v in arm.compiled.params.values() if (v.shape, v.dtype) == ((256,), np.uint8)]
    chains = (("a", "lab"), ("se2", "gate"), ("head", "y"))     # the lookups' order in main
    assert len(tables) == len(chains)
    for table, chain in zip(tables, chains):
        np.testing.assert_array_equal(table, _onnxruntime_table(qdq, chain, tmp_path / f"{chain[0]}.onnx"), chain)
    host = api.build(qdq, "host", tmp_path / "host", sample_inputs=samples[0])
    assert all(np.array_equal(a, h) for a, h in zip(tables, (v for v in host.compiled.params.values()
                                                             if (v.shape, v.dtype) == ((256,), np.uint8))))
    # a wider input reaches more of each table's entries (and saturates the hardswish)
    wide = {"x": (RNG.standard_normal((1, 8, 16, 16)) * 3).astype(np.float32)}
    ours = api.run(arm.bundle_dir, wide)
    assert ours.mode == "qemu"
    np.testing.assert_array_equal(ours.outputs["y"], api.run(host.bundle_dir, wide).outputs["y"])
