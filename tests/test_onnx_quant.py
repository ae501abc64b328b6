"""ONNX QOperator models (issue 9, item 4): models made here with onnxruntime.quantization — quantize_static in
QuantFormat.QOperator (per tensor and per channel, uint8 and int8 activations) on a small CNN and an MLP, and
quantize_dynamic on an MLP, a transformer-like block and the CNN — imported in QDQ form (edgec/frontends/onnx_quant),
built for the host with the default offload, and compared with onnxruntime: static models within one quantization
step of the output (the fraction of elements one step off and the largest difference in steps printed), dynamic ones
(int32 compute, float scales) within the float tolerance on these small models. Builds verify both by the quantized
rule (tests/test_verify_quantized.py has the deep model and the faults).

onnxruntime's u8 x s8 kernels (MLAS) sum products in saturating 16-bit pairs on x86 CPUs without VNNI: on the AVX2
Zen 3 here its QOperator MLP gave outputs 23 steps off the same quantization's QDQ math where an input went past the
calibrated range. So a static model is also compared with onnxruntime running that QDQ model (quantize_static's
QDQ format on the same samples) as written, and with its own QOperator kernels only on a CPU with VNNI; a dynamic
one is compared with onnxruntime running it with its int8 weights as uint8 (_u8_weights), which it sums exactly, as
the build's own reference does."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType, quantize_dynamic,
                                      quantize_static)

from edgec import api, report
from edgec.context import BuildOptions
from test_cli_errors import check_error, cli
from verify import HOST_INT8_LIMITS, assert_close_to_reference, onnxruntime_as_written, save_onnx

RNG = np.random.default_rng(9)


@pytest.fixture(autouse=True)
def _reseeded():
    """Each test draws the same models and samples whichever tests ran before it in its worker."""
    global RNG
    RNG = np.random.default_rng(9)


def _init(name: str, *shape: int, scale: float = 0.3):
    return numpy_helper.from_array((RNG.standard_normal(shape) * scale).astype(np.float32), name)


def small_cnn(path: Path) -> Path:
    """Conv + ReLU, a depthwise conv, a residual Add, a strided 1x1 conv, Mul, MaxPool, Concat, GlobalAveragePool,
    Flatten, Gemm: the ops onnxruntime's QOperator quantizer turns into QLinearConv, QLinearAdd, QLinearMul,
    QLinearConcat, QLinearGlobalAveragePool and QGemm, with MaxPool and Flatten left on 8-bit tensors."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], group=8),
             helper.make_node("Relu", ["c2"], ["r2"]),
             helper.make_node("Add", ["r1", "r2"], ["a"]),
             helper.make_node("Conv", ["a", "w3", "b3"], ["c3"], strides=[2, 2]),
             helper.make_node("Mul", ["c3", "c3"], ["m"]),
             helper.make_node("MaxPool", ["a"], ["mp"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Concat", ["m", "mp"], ["cat"], axis=1),
             helper.make_node("GlobalAveragePool", ["cat"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    inits = [_init("w1", 8, 3, 3, 3), _init("b1", 8, scale=0.1), _init("w2", 8, 1, 3, 3), _init("b2", 8, scale=0.1),
             _init("w3", 8, 8, 1, 1), _init("b3", 8, scale=0.1), _init("wf", 10, 16), _init("bf", 10, scale=0.1)]
    return save_onnx(path, "cnn", nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 10]}, inits)


def mlp(path: Path) -> Path:
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]), helper.make_node("Gemm", ["r1", "w2", "b2"], ["y"])]
    inits = [_init("w1", 32, 64), _init("b1", 64, scale=0.1), _init("w2", 64, 10), _init("b2", 10, scale=0.1)]
    return save_onnx(path, "mlp", nodes, {"x": [4, 32]}, {"y": [4, 10]}, inits)


def block(path: Path) -> Path:
    """Single-head self-attention with a residual, then a ReLU feed-forward layer."""
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"]), helper.make_node("MatMul", ["x", "wk"], ["k"]),
             helper.make_node("MatMul", ["x", "wv"], ["v"]), helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s"]), helper.make_node("Softmax", ["s"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["o"]), helper.make_node("Add", ["o", "x"], ["res"]),
             helper.make_node("MatMul", ["res", "w1"], ["f1"]), helper.make_node("Add", ["f1", "b1"], ["f1b"]),
             helper.make_node("Relu", ["f1b"], ["f1r"]), helper.make_node("MatMul", ["f1r", "w2"], ["y"])]
    inits = [_init("wq", 16, 16), _init("wk", 16, 16), _init("wv", 16, 16), _init("w1", 16, 32), _init("b1", 32),
             _init("w2", 32, 16)]
    return save_onnx(path, "block", nodes, {"x": [1, 8, 16]}, {"y": [1, 8, 16]}, inits)


MODELS = {"cnn": (small_cnn, (1, 3, 16, 16)), "mlp": (mlp, (4, 32)), "block": (block, (1, 8, 16))}


class _Samples(CalibrationDataReader):
    def __init__(self, samples: list[dict[str, np.ndarray]]):
        self._it = iter(samples)

    def get_next(self):
        return next(self._it, None)


def _ops(path: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _output_step(model: Path, output: str) -> float:
    """The scale of the DequantizeLinear that makes `output`: one quantization step of it."""
    graph = onnx.load(str(model)).graph
    node = next(n for n in graph.node if output in n.output)
    assert node.op_type == "DequantizeLinear", node.op_type
    return float(numpy_helper.to_array(next(i for i in graph.initializer if i.name == node.input[1])))


def _static(tmp_path: Path, name: str, activations, per_channel: bool) -> Path:
    """The QOperator model, and beside it (`<name>_qdq.onnx`) the same quantization in QDQ form."""
    make, shape = MODELS[name]
    model = make(tmp_path / f"{name}.onnx")
    samples = [{"x": RNG.standard_normal(shape).astype(np.float32)} for _ in range(16)]
    for form in (QuantFormat.QDQ, QuantFormat.QOperator):
        quantized = tmp_path / f"{name}_{'qop' if form == QuantFormat.QOperator else 'qdq'}.onnx"
        quantize_static(str(model), str(quantized), _Samples(samples), quant_format=form,
                        activation_type=activations, weight_type=QuantType.QInt8, per_channel=per_channel)
    expected = {"cnn": {"QLinearConv", "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearGlobalAveragePool",
                        "QGemm"},
                "mlp": {"QLinearMatMul", "QLinearAdd", "QGemm"}}[name]
    assert expected <= _ops(quantized), _ops(quantized)
    return quantized


def _within_one_step(quantized: Path, bundle: Path, shape) -> str:
    """Every output element within one step of onnxruntime's, on three samples (one beyond the calibrated range);
    few off by one. onnxruntime: the QDQ twin as written, and the QOperator model where its kernels are exact
    (the module's docstring). Returns what was measured."""
    qdq = quantized.with_name(quantized.name.replace("_qop", "_qdq"))
    sessions = {"QDQ as written": onnxruntime_as_written(qdq)}
    if HOST_INT8_LIMITS is None:
        sessions["QOperator"] = ort.InferenceSession(str(quantized), providers=["CPUExecutionProvider"])
    step = _output_step(qdq, "y")
    measured = []
    for form, session in sessions.items():
        off = total = 0
        worst = 0.0
        for scale in (1.0, 1.0, 2.5):
            sample = {"x": RNG.standard_normal(shape).astype(np.float32) * scale}
            ours = api.run(bundle, sample).outputs["y"]
            steps = np.abs(ours.astype(np.float64) - session.run(None, sample)[0]) / step
            worst = max(worst, float(steps.max()))
            off += int((steps > 0.5).sum())
            total += steps.size
        # the twin computes each layer in float and rounds once; the bundle's integer kernels requantize int32 sums
        # by a float32 multiplier, which rounds some near-halves the other way (up to 9% of the MLP's 120 outputs)
        few = 0.05 if form == "QOperator" else 0.15
        assert worst <= 1.0 + 1e-3 and off / total < few, f"{form}: {off} of {total} off, at most {worst:.2f} steps"
        measured.append(f"{form}: {off} of {total} elements one step off ({off / total:.2%}), at most {worst:.2f} steps")
    return "; ".join(measured)


_STATIC = [pytest.mark.parametrize("per_channel", [False, True], ids=["per_tensor", "per_channel"]),
           pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8], ids=["u8", "s8"])]


def _parametrized(test):
    for mark in _STATIC:
        test = mark(test)
    return test


@_parametrized
@pytest.mark.parametrize("name", ["cnn", "mlp"])
def test_static_qoperator_within_one_step(tmp_path, name, activations, per_channel):
    """With the default offload: the QDQ form is what the int8 offload takes, the MLP's products and the CNN's
    convolutions as integer primitives (which of the rest it takes is the offload's choice)."""
    quantized = _static(tmp_path, name, activations, per_channel)
    shape = MODELS[name][1]
    result = api.build(quantized, "host", tmp_path / "b", sample_inputs={"x": np.ones(shape, np.float32)})
    placed = sorted({f"{p['operator']}:{p['detail']}" for p in report.build_json(result)["offload"]})
    print(f"{quantized.name} {activations.name} per_channel={per_channel}: "
          f"{_within_one_step(quantized, result.bundle_dir, shape)}; offload {placed}")
    # on a CPU without VNNI the full-range int8 layers are TVM's integer kernels (verify.HOST_INT8_LIMITS)
    assert ({"cnn": "conv2d:onednn.qconv2d_bias", "mlp": "matmul:onednn.qmatmul_bias"}[name] if HOST_INT8_LIMITS is None
            else f"int8 layers:onednn: {HOST_INT8_LIMITS.why}") in placed


@_parametrized
def test_static_qoperator_cnn_on_tvm_within_one_step(tmp_path, activations, per_channel):
    """Every QLinear operator of the CNN converted, compiled by TVM alone (--offload none)."""
    quantized = _static(tmp_path, "cnn", activations, per_channel)
    shape = MODELS["cnn"][1]
    result = api.build(quantized, "host", tmp_path / "b", options=BuildOptions(offload=()),
                       sample_inputs={"x": np.ones(shape, np.float32)})
    print(f"{quantized.name} {activations.name} per_channel={per_channel} on TVM: "
          f"{_within_one_step(quantized, result.bundle_dir, shape)}")


@pytest.mark.parametrize("name", ["mlp", "block", "cnn"])
def test_dynamic_quantization_matches(tmp_path, name):
    make, shape = MODELS[name]
    model = make(tmp_path / f"{name}.onnx")
    quantized = tmp_path / f"{name}_dyn.onnx"
    quantize_dynamic(str(model), str(quantized), weight_type=QuantType.QInt8,
                     op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    assert {"DynamicQuantizeLinear", "MatMulInteger" if name != "cnn" else "ConvInteger"} <= _ops(quantized)
    samples = [{"x": RNG.standard_normal(shape).astype(np.float32) * s} for s in (1.0, 3.0)]
    result = api.build(quantized, "host", tmp_path / "b", sample_inputs=samples[0])
    # verified by the quantized rule against its twin with each DynamicQuantizeLinear's code unrounded
    assert result.manifest.verification["rule"]["name"] == "quantized"
    reference = _u8_weights(quantized, tmp_path / f"{name}_dyn_u8.onnx")
    for sample in samples:
        assert_close_to_reference(reference, result.bundle_dir, sample)


def test_dynamic_quantization_verified_where_int16_pairs_saturate(tmp_path):
    """Every code 255 against int8 weights near 127: each pair of products (64770) is past int16, where onnxruntime's
    u8 x s8 kernels saturate on x86 without VNNI. The build's reference sums the same integers exactly (as uint8
    weights, reference._unsigned_integer_weights), so the exact bundle is verified, not refused as off from it."""
    w = np.full((32, 8), 0.5, np.float32) + np.linspace(0, 0.01, 8, dtype=np.float32)
    model = save_onnx(tmp_path / "mm.onnx", "mm", [helper.make_node("MatMul", ["x", "w"], ["y"])], {"x": [2, 32]},
                      {"y": [2, 8]}, [numpy_helper.from_array(w, "w")])
    quantized = tmp_path / "mm_dyn.onnx"
    quantize_dynamic(str(model), str(quantized), weight_type=QuantType.QInt8)
    x = np.full((2, 32), 3.0, np.float32)      # codes: 255 (the range starts at 0)
    result = api.build(quantized, "host", tmp_path / "b", sample_inputs={"x": x})
    assert result.manifest.verification["status"] == "verified"
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(quantized)).graph.initializer}
    codes = next(v for v in inits.values() if v.dtype == np.int8 and v.shape == w.shape).astype(np.int64)
    scale = next(v for k, v in inits.items() if k.endswith("_scale") and v.dtype == np.float32)
    assert codes.min() > 120    # the saturating case: (255 * codes[k] + 255 * codes[k + 1]) > 32767
    exact = (255 * codes.sum(0)) * np.float32(3.0 / 255) * scale
    np.testing.assert_allclose(api.run(result.bundle_dir, {"x": x}).outputs["y"], np.broadcast_to(exact, (2, 8)),
                               rtol=1e-6)


def _u8_weights(model: Path, out: Path) -> Path:
    """The dynamically quantized model with each MatMulInteger/ConvInteger's int8 weights as uint8 (w + 128, zero
    point + 128): the same integers, which onnxruntime's u8 x u8 kernels sum exactly on every x86 CPU."""
    proto = onnx.load(str(model))
    inits = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type not in ("MatMulInteger", "ConvInteger"):
            continue
        weights = numpy_helper.to_array(inits[node.input[1]])
        assert weights.dtype == np.int8, weights.dtype
        zero = numpy_helper.to_array(inits[node.input[3]]) if len(node.input) > 3 and node.input[3] else np.int8(0)
        for index, value in ((1, weights), (3, zero)):
            name = f"{node.input[1]}_u8" if index == 1 else f"{node.input[1]}_zero_u8"
            proto.graph.initializer.append(numpy_helper.from_array((value.astype(np.int16) + 128).astype(np.uint8), name))
            while len(node.input) <= index:
                node.input.append("")
            node.input[index] = name
    onnx.save(proto, str(out))
    return out


def _qoperator_model(path: Path, node, inputs: dict, output_shape: list[int]) -> Path:
    """A model of one com.microsoft QOperator node on uint8 tensors, the constants per-tensor scale 0.05 and zero
    point 128."""
    inits = [numpy_helper.from_array(np.float32(0.05), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    inits += [numpy_helper.from_array(v, k) for k, v in inputs.items() if k != "x"]
    graph = helper.make_graph([node], "q", [helper.make_tensor_value_info("x", onnx.TensorProto.UINT8, [4, 8])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, output_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("case, keywords", [
    ("qgemm_alpha", ["QGemm node 'gemm'", "alpha=0.5", "does not convert"]),
    ("unconverted_op", ["QLinearSigmoid"]),
])
def test_unconverted_qoperator_forms_are_one_line(tmp_path, case, keywords):
    if case == "qgemm_alpha":
        node = helper.make_node("QGemm", ["x", "s", "z", "w", "ws", "wz", "", "s", "z"], ["y"], name="gemm",
                                domain="com.microsoft", alpha=0.5, transB=1)
        weights = {"w": RNG.integers(-127, 127, (6, 8), dtype=np.int8), "ws": np.float32(0.01), "wz": np.int8(0)}
        model = _qoperator_model(tmp_path / "q.onnx", node, weights, [4, 6])
    else:
        node = helper.make_node("QLinearSigmoid", ["x", "s", "z", "s", "z"], ["y"], domain="com.microsoft")
        model = _qoperator_model(tmp_path / "q.onnx", node, {}, [4, 8])
    result = cli("build", model, "-o", tmp_path / "b")
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)
    assert not (tmp_path / "b").exists()


def test_qdq_form_of_qgemm_with_a_2d_bias_computes_the_model():
    """QGemm's int32 C may be [M, N], at s_a times the per-column b_scale: its QDQ form dequantizes C along its last
    axis and gives onnxruntime's outputs of the QOperator node (its first axis: a refused DequantizeLinear)."""
    from edgec.frontends.onnx_quant import qdq_form

    consts = {"sa": np.float32(0.05), "za": np.uint8(128), "b": RNG.integers(-127, 128, (4, 3)).astype(np.int8),
              "sb": np.array([0.01, 0.02, 0.03], np.float32), "zb": np.zeros(3, np.int8),
              "c": RNG.integers(-2000, 2000, (2, 3)).astype(np.int32), "sy": np.float32(0.1), "zy": np.uint8(128)}
    node = helper.make_node("QGemm", ["a", "sa", "za", "b", "sb", "zb", "c", "sy", "zy"], ["y"], domain="com.microsoft")
    graph = helper.make_graph([node], "qgemm", [helper.make_tensor_value_info("a", onnx.TensorProto.UINT8, [2, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.UINT8, [2, 3])],
                              [numpy_helper.from_array(np.asarray(v), k) for k, v in consts.items()])
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    a = {"a": RNG.integers(0, 256, (2, 4)).astype(np.uint8)}
    want = ort.InferenceSession(model.SerializeToString(), options).run(None, a)[0]
    form = qdq_form(onnx.ModelProto.FromString(model.SerializeToString()))
    got = ort.InferenceSession(form.SerializeToString(), options).run(None, a)[0]
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1, (got, want)


def test_a_failing_qdq_form_leaves_the_model_not_verified_in_one_line(tmp_path, monkeypatch):
    """A failure inside the QDQ-form rewrite (here made to raise) is the reference's reason in one line, which a build
    records as "not verified", not a traceback."""
    from edgec.frontends import load_model, onnx_quant
    from edgec.verification import reference_outputs

    def broken(model):
        raise ValueError("an input the rewrite does not foresee\nat node 'conv'")

    quantized = _static(tmp_path, "mlp", QuantType.QUInt8, per_channel=False)
    monkeypatch.setattr(onnx_quant, "qdq_form", broken)
    reason = reference_outputs(load_model(quantized), [{"x": np.ones(MODELS["mlp"][1], np.float32)}])
    assert isinstance(reason, str) and "\n" not in reason, reason
    assert "cannot write mlp_qop.onnx in the QDQ form" in reason and "at node 'conv'" in reason


def moving_cnn(path: Path) -> Path:
    """Conv + ReLU, a linear 2x Resize, Conv, Pad, Conv, Split into two 1x1 Convs, Add, GlobalAveragePool, Flatten,
    Gemm: onnxruntime's QOperator quantizer leaves Resize, Pad and Split on 8-bit tensors between QLinear nodes."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Resize", ["r1", "", "scales"], ["up"], mode="linear"),
             helper.make_node("Conv", ["up", "w2", "b2"], ["c2"]),
             helper.make_node("Pad", ["c2", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "w3", "b3"], ["c3"]),
             helper.make_node("Split", ["c3", "halves"], ["s1", "s2"], axis=1),
             helper.make_node("Conv", ["s1", "w4", "b4"], ["c4"]), helper.make_node("Conv", ["s2", "w5", "b5"], ["c5"]),
             helper.make_node("Add", ["c4", "c5"], ["a"]), helper.make_node("GlobalAveragePool", ["a"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], transB=1)]
    inits = [_init("w1", 8, 3, 3, 3), _init("b1", 8, scale=0.1), numpy_helper.from_array(np.float32([1, 1, 2, 2]), "scales"),
             _init("w2", 16, 8, 3, 3), _init("b2", 16, scale=0.1),
             numpy_helper.from_array(np.int64([0, 0, 1, 1, 0, 0, 1, 1]), "pads"), _init("w3", 16, 16, 3, 3),
             _init("b3", 16, scale=0.1), numpy_helper.from_array(np.int64([8, 8]), "halves"), _init("w4", 8, 8, 1, 1),
             _init("b4", 8, scale=0.1), _init("w5", 8, 8, 1, 1), _init("b5", 8, scale=0.1), _init("wf", 10, 8),
             _init("bf", 10, scale=0.1)]
    return save_onnx(path, "moving", nodes, {"x": [1, 3, 16, 16]}, {"y": [1, 10]}, inits)


def test_qoperator_resize_pad_split_verified_by_the_quantized_rule(tmp_path):
    """Resize, Pad and Split stay on 8-bit tensors in the QDQ form, as edgec imports them: a linear Resize on uint8 is
    onnxruntime's uint8 kernel, which dequantize -> Resize -> quantize is not (measured 0.10-0.16 off the output).
    The twin then keeps the roundings those operators read (a stricter rule); the correct bundle passes it, and the
    conv after the Resize reading a zero point off by 3 (onnxruntime computing the faulty file) is refused."""
    from edgec.frontends import load_model
    from edgec.reference import QUANTIZED_RULE, ReferenceRuntime, compare_quantized, qdq_model
    from edgec.verification import reference_outputs

    quantized = tmp_path / "moving_qop.onnx"
    quantize_static(str(moving_cnn(tmp_path / "moving.onnx")), str(quantized),
                    _Samples([{"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(16)]),
                    quant_format=QuantFormat.QOperator, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, per_channel=True)
    assert {"Resize", "Pad", "Split", "QLinearConv"} <= _ops(quantized)
    assert {"Resize", "Pad", "Split"} <= {n.op_type for n in qdq_model(quantized)[0].graph.node}
    sample = {"x": RNG.standard_normal((1, 3, 16, 16)).astype(np.float32)}     # as calibrated: [0, 1) saturates y
    result = api.build(quantized, "host", tmp_path / "b", sample_inputs=sample)
    verification = result.manifest.verification
    print("Resize, Pad, Split QOperator:", verification["outputs"]["y"])
    assert verification["status"] == "verified" and verification["rule"] == QUANTIZED_RULE.to_json()
    assert verification["reference"].endswith("on its QDQ form")

    model = onnx.load(str(quantized))
    conv = [n for n in model.graph.node if n.op_type == "QLinearConv"][1]      # reads the Resize's output
    zero = next(i for i in model.graph.initializer if i.name == conv.input[2])
    model.graph.initializer.append(numpy_helper.from_array(
        (numpy_helper.to_array(zero).astype(np.int32) + 3).clip(0, 255).astype(np.uint8), "fault"))
    conv.input[2] = "fault"
    onnx.save(model, str(tmp_path / "fault.onnx"))
    reference = reference_outputs(load_model(quantized), [sample])
    wrong = ReferenceRuntime(tmp_path / "fault.onnx", content=qdq_model(tmp_path / "fault.onnx")[0].SerializeToString(),
                             exact=True).run(sample)
    report = compare_quantized([wrong], list(reference.outputs), list(reference.floats), QUANTIZED_RULE)["y"]
    print("zero point +3 after the Resize:", report)
    assert not report["ok"]
