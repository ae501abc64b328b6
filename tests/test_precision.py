"""Reduced precision without calibration (issue 9, item 5): `--quantize fp16` for targets with fp16 arithmetic
(rpi5, under qemu's cortex-a76), refused elsewhere; `--quantize int8-weights` on any target: int8 weights with
their scales in params.bin, dequantized once by the load function, float32 compute. The CNN is edgec's example
MobileNetV2 at 0.35 x 96 (random weights)."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import tvm
from onnx import helper, numpy_helper

from edgec import api
from edgec.context import BuildOptions
from edgec.examples import mobilenet_v2
from edgec.passes.precision import int8_encoding, round_int8
from edgec.quantize import FP16_MIN_SQNR_DB, QuantizeOptions
from edgec.reference import PRECISION_RULE, decibels
from test_cli_errors import check_error, cli
from test_offload_arm import qemu_cpus  # noqa: F401  (fixture)
from verify import save_onnx

RNG = np.random.default_rng(3)


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return mobilenet_v2(tmp_path_factory.mktemp("models") / "cnn.onnx", width=0.35, resolution=96)


def _options(mode: str) -> BuildOptions:
    return BuildOptions(quantize=QuantizeOptions(mode, None))


def _float32_weight_bytes(model) -> int:
    return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(model)).graph.initializer)


def _params(bundle) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in tvm.runtime.load_param_dict_from_file(str(bundle / "params.bin")).items()}


def test_int8_encoding_is_exact_for_rounded_weights_only():
    weight = RNG.standard_normal((8, 4, 3, 3)).astype(np.float32)
    for axis in range(weight.ndim):
        rounded = round_int8(weight, axis)
        assert np.abs(rounded - weight).max() <= np.abs(weight).max() / 254 * (1 + 1e-6)
        q, scale, found = int8_encoding(rounded)
        assert q.dtype == np.int8 and np.abs(q).max() == 127 and found == axis
        shape = [1] * weight.ndim
        shape[axis] = -1
        assert np.array_equal(q.astype(np.float32) * scale.reshape(shape), rounded)   # the load function's multiply
    assert int8_encoding(weight) is None                               # a float weight stays float
    assert int8_encoding(round_int8(weight, 0)[:1, :1, :1, :1]) is None   # too small to be lifted
    assert int8_encoding(weight[0, 0, 0]) is None and int8_encoding(weight.reshape(-1)) is None   # no slices


def test_fp16_refused_on_a_target_without_it(cnn, tmp_path):
    result = cli("build", cnn, "--quantize", "fp16", "-o", tmp_path / "b")
    check_error(result.stderr, result.exit_code, "--quantize fp16", "host", "device.fp16", "rpi5",
                exception=result.exception)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("args, keywords", [
    (("--quantize", "fp16", "--target", "rpi5", "--calibration", "cal.npz"), ("--calibration", "fp16")),
    (("--quantize", "int8-weights", "--calibration", "cal.npz"), ("--calibration", "int8-weights")),
    (("--quantize", "int8"), ("--calibration",)),
])
def test_calibration_only_with_int8(cnn, tmp_path, args, keywords):
    result = cli("build", cnn, *args, "-o", tmp_path / "b")
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)


def _rounded_onnx(model, path):
    """The ONNX model with its Conv and Gemm weights rounded by round_int8 along their output channel: what an
    int8-weights bundle computes (rounding commutes with the BN folding edgec does first, a per-channel scale)."""
    m = onnx.load(str(model))
    inits = {i.name: i for i in m.graph.initializer}
    for node in m.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axis = 0 if node.op_type == "Conv" or trans_b else 1
            init = inits[node.input[1]]
            init.CopyFrom(numpy_helper.from_array(round_int8(numpy_helper.to_array(init), axis), init.name))
    onnx.save(m, str(path))
    return path


def test_int8_weights_host_matches_the_rounded_model(cnn, tmp_path):
    result = api.build(cnn, "host", tmp_path / "w8", options=_options("int8-weights"))
    manifest, bundle = result.manifest, result.bundle_dir
    assert manifest.verification["status"] == "verified", manifest.verification
    record = manifest.quantization
    assert record["mode"] == "int8-weights" and record["compute"] == "float32"
    assert record["rounded_tensors"] == 53                      # 52 convolutions and the classifier
    params = _params(bundle)
    assert sum(v.dtype == np.int8 for v in params.values()) == record["rounded_tensors"]
    assert manifest.load_function == "main_load"                # dequantized there, once per loaded model
    fp32 = _float32_weight_bytes(cnn)
    assert (bundle / "params.bin").stat().st_size <= 0.3 * fp32, ((bundle / "params.bin").stat().st_size, fp32)
    x = RNG.standard_normal((1, 3, 96, 96)).astype(np.float32)
    out = api.run(bundle, {"input": x}).outputs["logits"]
    rounded = ort.InferenceSession(str(_rounded_onnx(cnn, tmp_path / "rounded.onnx"))).run(None, {"input": x})[0]
    exact = ort.InferenceSession(str(cnn)).run(None, {"input": x})[0]
    # the bundle computes the rounded model in float32: its distance from it is float rounding, far below the weight
    # rounding's own effect (its distance from the float32 model)
    assert np.abs(out - rounded).max() <= 1e-4 * np.abs(rounded).max()
    assert decibels((exact ** 2).sum(), ((out - exact) ** 2).sum()) < decibels((rounded ** 2).sum(), ((out - rounded) ** 2).sum()) - 40


def test_fp16_rpi5_under_cortex_a76(cnn, tmp_path, qemu_cpus):  # noqa: F811
    result = api.build(cnn, "rpi5", tmp_path / "fp16", options=_options("fp16"))
    manifest, bundle = result.manifest, result.bundle_dir
    verification = manifest.verification
    assert verification["status"] == "verified" and verification["runner"] == "qemu, 4 samples", verification
    assert verification["rule"] == PRECISION_RULE.to_json()
    assert set(qemu_cpus) == {"cortex-a76"}
    assert "passed the precision rule (its error at least 0.0 dB below the graph's own rounding error; see" in \
        " ".join((bundle / "README.md").read_text().split())
    assert manifest.quantization["mode"] == "fp16" and manifest.inputs[0].dtype == "float32"
    params = _params(bundle)
    assert {str(v.dtype) for v in params.values() if v.size >= 16} == {"float16"}
    assert (bundle / "params.bin").stat().st_size <= 0.52 * _float32_weight_bytes(cnn)
    # every convolution stays in TVM (XNNPACK takes float32 only), and the summary says why
    assert all(p.backend is None and "float16" in p.detail for p in result.compiled.offload)
    logits = verification["outputs"]["logits"]
    x = RNG.standard_normal((1, 3, 96, 96)).astype(np.float32)
    out = api.run(bundle, {"input": x}).outputs["logits"]
    ref = ort.InferenceSession(str(cnn)).run(None, {"input": x})[0]
    # the rule's consequence on another input: within twice fp16's rounding error of float32 in rms (6.02 dB), the
    # rounding error as measured at build time, with 3 dB for a new input
    assert decibels((ref ** 2).sum(), ((out - ref) ** 2).sum()) >= logits["quantization_sqnr_db"] - 6.02 - 3


def test_int8_weights_rpi4_under_cortex_a72(cnn, tmp_path, qemu_cpus):  # noqa: F811
    result = api.build(cnn, "rpi4", tmp_path / "w8", options=_options("int8-weights"))
    verification = result.manifest.verification
    assert verification["status"] == "verified" and verification["runner"] == "qemu", verification
    assert set(qemu_cpus) == {"cortex-a72"}
    # XNNPACK packs its weights at load from the values main_load dequantized there
    assert all(p.backend == "xnnpack" for p in result.compiled.offload if p.operator == "conv2d")
    assert sum(v.dtype == np.int8 for v in _params(result.bundle_dir).values()) == 53


def test_fp16_field_is_a_boolean(tmp_path):
    from edgec.errors import EdgecError
    from edgec.targets import load_target, load_target_file

    text = open(load_target("rpi5").origin).read()
    assert load_target("rpi5").device.fp16 and not load_target("rpi4").device.fp16
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("fp16 = true", 'fp16 = "yes"'))
    with pytest.raises(EdgecError, match="field 'device.fp16' has the wrong type"):
        load_target_file(bad)


def _shared_weight_convs(path):
    """Two convolutions sharing one weight: y = conv(conv(x, W), W)."""
    return save_onnx(path, "shared", [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
                                      helper.make_node("Conv", ["c", "W"], ["y"], pads=[1, 1, 1, 1])],
                     {"x": [1, 8, 4, 4]}, {"y": [1, 8, 4, 4]},
                     [numpy_helper.from_array(RNG.standard_normal((8, 8, 3, 3)).astype(np.float32), "W")])


@pytest.mark.parametrize("opt_level", [0, 1])
def test_fp16_weights_stored_once_in_fp16_at_every_opt_level(tmp_path, opt_level):
    """The weights' casts are folded by to-fp16 itself: at -O0 (no fold-constants) they stayed float32 in params.bin,
    cast on every call; a weight two convolutions share is one fp16 tensor (-O0 and -O1 stored it twice)."""
    options = BuildOptions(opt_level=opt_level, quantize=QuantizeOptions("fp16", None))
    result = api.build(_shared_weight_convs(tmp_path / "shared.onnx"), "rpi5", tmp_path / "b", options=options)
    assert result.manifest.verification["status"] == "verified", result.manifest.verification
    assert [(v.dtype, v.shape) for v in _params(result.bundle_dir).values()] == [(np.float16, (8, 8, 3, 3))]


def _cancelling(path, offset: float):
    """(conv(x) + offset) - offset: at offset 2048 fp16 keeps only a few bits of the convolution (its outputs are a
    few units), at offset 1 all of them."""
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "big"], ["a"]), helper.make_node("Sub", ["a", "big"], ["y"])]
    return save_onnx(path, "cancel", nodes, {"x": [1, 8, 4, 4]}, {"y": [1, 8, 4, 4]},
                     [numpy_helper.from_array(np.random.default_rng(5).standard_normal((8, 8, 3, 3)).astype(np.float32),
                                              "W"), numpy_helper.from_array(np.float32(offset), "big")])


def test_fp16_summary_and_readme_give_the_graphs_own_error(tmp_path):
    """The precision rule bounds the bundle by the fp16 graph's distance from float32 and never checks that distance:
    (conv(x) + 2048) - 2048 loses all but a few bits in fp16, the bundle computes exactly that graph and is verified
    when --min-sqnr accepts it, so the summary and the bundle README must say how far the graph is (they said "max abs
    error 0" only)."""
    from edgec.report import build_text

    result = api.build(_cancelling(tmp_path / "cancel.onnx", 2048), "rpi5", tmp_path / "b",
                       options=BuildOptions(quantize=QuantizeOptions("fp16", None, min_sqnr_db=10.0)))
    own = result.manifest.verification["outputs"]["y"]["quantization_sqnr_db"]
    assert result.manifest.verification["status"] == "verified" and own < 25, result.manifest.verification
    assert result.manifest.quantization["min_sqnr_db"] == 10.0
    assert f"below the graph's own rounding error (SQNR {own:.1f} dB)" in build_text(result)
    assert f"the graph's own rounding error: SQNR {own:.1f} dB" in (result.bundle_dir / "README.md").read_text()


def test_fp16_refuses_a_graph_far_from_float32(tmp_path):
    """A graph that loses precision in fp16 is refused below the floor (FP16_MIN_SQNR_DB unless --min-sqnr), in one
    line with the SQNR measured, the floor and the ways out (it built and was verified: the precision rule bounds the
    bundle by the graph and never judged the graph); the same graph where fp16 keeps the convolution's bits builds."""
    lossy = _cancelling(tmp_path / "lossy.onnx", 2048)
    result = cli("build", lossy, "--target", "rpi5", "--quantize", "fp16", "-o", tmp_path / "refused")
    check_error(result.stderr, result.exit_code, "output 'y' of the fp16 graph is", "dB SQNR against float32",
                f"below the floor of {FP16_MIN_SQNR_DB:g} dB", "--input", "--min-sqnr", exception=result.exception)
    assert not (tmp_path / "refused").exists()
    measured = float(result.stderr.split("fp16 graph is ")[1].split(" dB")[0])
    assert 0 < measured < 25
    result = cli("build", lossy, "--target", "rpi5", "--quantize", "fp16", "--max-error", "0.5%", "-o", tmp_path / "x")
    check_error(result.stderr, result.exit_code, "below the floor of 46.0206 dB", exception=result.exception)
    fine = api.build(_cancelling(tmp_path / "fine.onnx", 1), "rpi5", tmp_path / "fine", options=_options("fp16"))
    assert fine.manifest.verification["status"] == "verified", fine.manifest.verification
    assert fine.manifest.verification["outputs"]["y"]["quantization_sqnr_db"] >= FP16_MIN_SQNR_DB
    assert fine.manifest.quantization["min_sqnr_db"] == FP16_MIN_SQNR_DB


def test_fp16_floor_checked_without_the_reference_runtime(tmp_path, monkeypatch):
    """Where the reference runtime cannot run the model, the fp16 graph is measured against the imported float32
    graph run by TVM, and the manifest names that reference (the bundle was "not verified" and the floor silently
    not checked: a graph far from float32 was shipped)."""
    import edgec.verification

    monkeypatch.setattr(edgec.verification, "reference_outputs", lambda model, steps: "onnxruntime is absent (test)")
    result = cli("build", _cancelling(tmp_path / "lossy.onnx", 2048), "--target", "rpi5", "--quantize", "fp16",
                 "-o", tmp_path / "refused")
    check_error(result.stderr, result.exit_code, "output 'y' of the fp16 graph is", "dB SQNR against float32",
                f"below the floor of {FP16_MIN_SQNR_DB:g} dB", exception=result.exception)
    fine = api.build(_cancelling(tmp_path / "fine.onnx", 1), "rpi5", tmp_path / "fine", options=_options("fp16"))
    verification = fine.manifest.verification
    assert verification["status"] == "verified", verification
    assert "measured against the imported float32 graph on TVM" in verification["reference"]
    assert "no reference runtime: onnxruntime is absent (test)" in verification["reference"]
    assert verification["outputs"]["y"]["quantization_sqnr_db"] >= FP16_MIN_SQNR_DB


def test_fp16_floor_judges_float_outputs_of_one_shape():
    """The floor measures a float output's SQNR: an index that a near tie flips in fp16 (3 against 7: 4.9 dB) is no
    precision lost and builds; a run-time size fp16 changes is refused in one line (it was numpy's broadcast error,
    an internal error)."""
    from edgec.errors import EdgecError
    from edgec.passes.precision import _check_floor

    _check_floor("class", [np.array([3])], [np.array([7])], FP16_MIN_SQNR_DB)
    _check_floor("found", [np.array([True])], [np.array([False])], FP16_MIN_SQNR_DB)
    with pytest.raises(EdgecError) as error:
        _check_floor("boxes", [np.zeros((2, 4), np.float32)], [np.zeros((3, 4), np.float32)], FP16_MIN_SQNR_DB)
    assert "output 'boxes' of the fp16 graph has shape [2, 4] on the sample input, float32 [3, 4]" in str(error.value)
    assert "\n" not in str(error.value)
    with pytest.raises(EdgecError, match="output 'y' of the fp16 graph is 4.9 dB SQNR"):
        _check_floor("y", [np.array([3.0], np.float32)], [np.array([7.0], np.float32)], FP16_MIN_SQNR_DB)


def test_int8_encoding_keeps_the_sign_of_zero():
    """A -0.0 is no int8 times a scale (q = 0 gives +0.0 back): a parameter holding one stays float32 (it was encoded,
    and a division by it changed the sign of its infinity)."""
    weight = round_int8(RNG.standard_normal((8, 4, 3, 3)).astype(np.float32), 0)
    weight[0, 0, 0, 0] = -0.0
    assert int8_encoding(weight) is None
    weight[0, 0, 0, 0] = 0.0
    assert int8_encoding(weight) is not None
    weight[0, 0, 0, 0] = np.inf
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # no cast of inf or nan to int8 on the way
        assert int8_encoding(weight) is None


def test_fp16_refuses_a_kernel_it_cannot_convert_in_one_line(tmp_path):
    """A reflect Pad is a call_tir the importer writes itself, on which ToMixedPrecision fails: refused in one line
    naming it (it was TVM's check failure, and a hint to skip to-fp16)."""
    weight = numpy_helper.from_array(RNG.standard_normal((8, 8, 3, 3)).astype(np.float32), "W")
    pads = numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"]), helper.make_node("Pad", ["c", "pads"], ["p"], mode="reflect"),
             helper.make_node("Conv", ["p", "W"], ["y"])]
    model = save_onnx(tmp_path / "pad.onnx", "pad", nodes, {"x": [1, 8, 6, 6]}, {"y": [1, 8, 4, 4]}, [weight, pads])
    result = cli("build", model, "--target", "rpi5", "--quantize", "fp16", "-o", tmp_path / "b")
    check_error(result.stderr, result.exit_code, "--quantize fp16 cannot convert", "mirror_pad", "int8-weights",
                exception=result.exception)
    assert "to-fp16" not in result.stderr


def test_int8_weights_refuses_a_quantized_model(tmp_path):
    """A QDQ model keeps its own int8 (it was folded to float32, rounded again per channel off its grid, and its int8
    conv ran as a float one)."""
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["Wq", "sw"], ["W"]),
             helper.make_node("Conv", ["xd", "W"], ["y"], pads=[1, 1, 1, 1])]
    inits = [numpy_helper.from_array(RNG.integers(-127, 128, (8, 8, 3, 3)).astype(np.int8), "Wq"),
             numpy_helper.from_array(np.float32(0.013), "sw"), numpy_helper.from_array(np.float32(0.02), "sx"),
             numpy_helper.from_array(np.uint8(128), "zx")]
    model = save_onnx(tmp_path / "qdq.onnx", "qdq", nodes, {"x": [1, 8, 4, 4]}, {"y": [1, 8, 4, 4]}, inits)
    result = cli("build", model, "--quantize", "int8-weights", "-o", tmp_path / "b")
    check_error(result.stderr, result.exit_code, "quantized already", "without --quantize", exception=result.exception)


def test_fp16_overflow_is_the_models_not_a_bug(tmp_path):
    """A convolution whose outputs pass 65504 is inf in fp16: refused in one line, exit 2, as the model's range (the
    verification called it "a bug in edgec or TVM", exit 1)."""
    weights = np.clip(RNG.standard_normal((8, 8, 3, 3)) * 10000, -60000, 60000)   # themselves within fp16's range
    weight = numpy_helper.from_array(weights.astype(np.float32), "W")
    # the ReLU keeps fold-batchnorm from moving the scale k into the weights, which would keep the conv in range
    nodes = [helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Mul", ["r", "k"], ["y"])]
    model = save_onnx(tmp_path / "big.onnx", "big", nodes, {"x": [1, 8, 4, 4]}, {"y": [1, 8, 4, 4]},
                      [weight, numpy_helper.from_array(np.float32(1e-4), "k")])
    result = cli("build", model, "--target", "rpi5", "--quantize", "fp16", "-o", tmp_path / "b")
    check_error(result.stderr, result.exit_code, "fp16's range", "'y'", "int8-weights", exception=result.exception)
