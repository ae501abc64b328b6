"""Full-integer TFLite models compile to integer compute: their int8 CONV_2D, DEPTHWISE_CONV_2D and FULLY_CONNECTED
run as oneDNN's int8 primitives on the host and XNNPACK's QC8 operators on the Pi targets
(edgec.frontends.tflite_convert.integer_form brings them into the QDQ form of the offload patterns), each output
within one quantization step of LiteRT's integer kernels (LiteRT requantizes with a fixed-point multiplier, the
backends in fp32: they can differ by one step where the exact value lies at a half step)."""
from __future__ import annotations

import re

import flatbuffers
import numpy as np
import pytest

from edgec import api, report
from edgec.build import BuildOptions
from edgec.reference import INTEGER_RULE, ReferenceRuntime
from edgec.targets import load_target
from edgec.verification import VerificationFailed, reference_outputs, stream_steps, verify_staged
from edgec.frontends import load_model
from models import real_model
from test_offload_arm import qemu_cpus  # noqa: F401  (a fixture)
from test_streaming import AUDIO, wakeword_features
from test_tflite_import import _options
from tflite_builder import Graph, schema
from verify import needs_onednn_int8

ONEDNN = BuildOptions(offload=("onednn",))


class _Int8Layers:
    """A full-integer graph under construction: per-channel int8 weights, int32 biases at scale sx * sw, and each
    output's scale set from the spread its accumulator takes, so that the outputs use their 8-bit range: about 40
    steps rms around a zero point near 0, or (ReLU) over the range above a zero point of -128."""

    def __init__(self):
        self.g, self.rng = Graph(), np.random.default_rng(3)

    def activation(self, name, shape, scale, zero_point, dtype=np.int8):
        return self.g.tensor(name, shape, dtype, quant=([scale], [zero_point], 0)), scale

    def layer(self, kind, x, out_shape, weight_shape, axis, reach, act=0, input_rms=40, **fields):
        """`kind` (Conv2D, DepthwiseConv2D, FullyConnected) of x = (tensor, scale), whose values spread `input_rms`
        steps around the zero point, each output summing `reach` products: its output (tensor, scale)."""
        (tensor, sx), g, channels = x, self.g, weight_shape[axis]
        sw = (self.rng.random(channels) * 0.01 + 0.005).astype(np.float32)
        w = g.tensor(f"{kind}{len(g.sg.tensors)}_w", weight_shape, np.int8,
                     self.rng.integers(-127, 128, weight_shape).astype(np.int8), quant=(sw, [0] * channels, axis))
        b = g.tensor(f"{kind}{len(g.sg.tensors)}_b", (channels,), np.int32,
                     self.rng.integers(-3000, 3000, channels).astype(np.int32), quant=(sx * sw, [0] * channels, 0))
        relu = act in (schema.ActivationFunctionType.RELU, schema.ActivationFunctionType.RELU6)
        sy = float(np.sqrt(reach) * input_rms * 73 * sx * sw.mean() / (80 if relu else 40))
        if act == schema.ActivationFunctionType.RELU6:
            sy = min(sy, 6 / 255)
        y = self.activation(f"{kind}{len(g.sg.tensors)}", out_shape, sy, -128 if relu else int(self.rng.integers(-9, 9)))
        op = {"Conv2D": "CONV_2D", "DepthwiseConv2D": "DEPTHWISE_CONV_2D", "FullyConnected": "FULLY_CONNECTED"}[kind]
        g.op(getattr(schema.BuiltinOperator, op), [tensor, w, b], [y[0]],
             *_options(kind, fusedActivationFunction=act, **fields))
        return y


def small_int8_cnn(path):
    """conv 3x3 + RELU6, depthwise 3x3 stride 2 + RELU, depthwise x2 multiplier, conv 1x1, a residual ADD, a
    FULLY_CONNECTED + RELU on the flattened map and a QUANTIZE to uint8: the layers of a full-integer CNN."""
    n, act, op = _Int8Layers(), schema.ActivationFunctionType, schema.BuiltinOperator
    same = dict(padding=schema.Padding.SAME, strideH=1, strideW=1)
    x = n.activation("image", (1, 12, 12, 8), 0.003, -4)
    a = n.layer("Conv2D", x, (1, 12, 12, 16), (16, 3, 3, 8), 0, 9 * 8, act.RELU6, input_rms=74, **same)
    b = n.layer("DepthwiseConv2D", a, (1, 6, 6, 16), (1, 3, 3, 16), 3, 9, act.RELU, input_rms=57,
                padding=schema.Padding.SAME, strideH=2, strideW=2, depthMultiplier=1)
    c = n.layer("DepthwiseConv2D", b, (1, 6, 6, 32), (1, 3, 3, 32), 3, 9, input_rms=57, depthMultiplier=2, **same)
    d = n.layer("Conv2D", c, (1, 6, 6, 16), (16, 1, 1, 32), 0, 32, **same)
    s = n.activation("sum", (1, 6, 6, 16), float(np.hypot(57 * b[1], 40 * d[1]) / 40), 3)
    n.g.op(op.ADD, [b[0], d[0]], [s[0]], *_options("Add"))
    flat = n.g.tensor("flat", (1, 576), np.int8, quant=([s[1]], [3], 0))
    n.g.op(op.RESHAPE, [s[0], n.g.tensor("shape", (2,), np.int32, np.array([1, 576], np.int32))], [flat],
           *_options("Reshape", newShape=[1, 576]))
    logits = n.layer("FullyConnected", (flat, s[1]), (1, 10), (10, 576), 0, 576, act.RELU)
    score = n.activation("score", (1, 10), logits[1], 0, np.uint8)
    n.g.op(op.QUANTIZE, [logits[0]], [score[0]])
    # the inner layers are outputs too, so that each is compared
    return n.g.save(path, [x[0]], [a[0], c[0], s[0], score[0]])


def deep_int8_cnn(path, layers=7):
    """`layers` 3x3 convs with ReLU at 64x64, 64 channels (the first from 8): deep enough that LiteRT's own two kernel
    sets end 4 steps apart, as one step per layer compounds."""
    n, same = _Int8Layers(), dict(padding=schema.Padding.SAME, strideH=1, strideW=1)
    x = y = n.activation("image", (1, 64, 64, 8), 0.003, -4)
    for k in range(layers):
        channels = n.g.sg.tensors[y[0]].shape[-1]
        y = n.layer("Conv2D", y, (1, 64, 64, 64), (64, 3, 3, channels), 0, 9 * channels,
                    schema.ActivationFunctionType.RELU, input_rms=74 if k == 0 else 57, **same)
    return n.g.save(path, [x[0]], [y[0]])


def streaming_deep_int8_cnn(path, layers=3):
    """deep_int8_cnn fed back on itself, as a streaming model keeps its state (resource variables, initialized by a
    CALL_ONCE subgraph to the quantized zero): each call concatenates the image with the state, runs `layers` 3x3
    convs with ReLU, and a 1x1 conv of the last one is the next state. Flips compound through the layers and from
    call to call (at 7 layers, 4 calls, a correct bundle's are as large as the rounding: docs/architecture.md)."""
    n, same, op = _Int8Layers(), dict(padding=schema.Padding.SAME, strideH=1, strideW=1), schema.BuiltinOperator
    g, quant = n.g, ([0.003], [-4], 0)

    def handle():
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = "state_handle", [], schema.TensorType.RESOURCE, 0
        g.sg.tensors.append(t)
        g.op(op.VAR_HANDLE, [], [len(g.sg.tensors) - 1], *_options("VarHandle", sharedName="state"))
        return len(g.sg.tensors) - 1

    main, g.sg = g.sg, schema.SubGraphT()           # subgraph 1: the state's initial value
    g.sg.tensors, g.sg.operators, g.sg.inputs, g.sg.outputs = [], [], [], []
    g.op(op.ASSIGN_VARIABLE, [handle(), g.tensor("zero", (1, 64, 64, 8), np.int8, np.full((1, 64, 64, 8), -4), quant)],
         [], *_options("AssignVariable"))
    init, g.sg = g.sg, main
    g.op(op.CALL_ONCE, [], [], *_options("CallOnce", initSubgraphIndex=1))
    variable, image = handle(), g.tensor("image", (1, 64, 64, 8), np.int8, quant=quant)
    state = g.tensor("state", (1, 64, 64, 8), np.int8, quant=quant)
    g.op(op.READ_VARIABLE, [variable], [state], *_options("ReadVariable"))
    y = g.tensor("joined", (1, 64, 64, 16), np.int8, quant=quant), quant[0][0]
    g.op(op.CONCATENATION, [image, state], [y[0]], *_options("Concatenation", axis=3))
    for k in range(layers):
        y = n.layer("Conv2D", y, (1, 64, 64, 64), (64, 3, 3, 16 if k == 0 else 64), 0, 9 * (16 if k == 0 else 64),
                    schema.ActivationFunctionType.RELU, input_rms=74 if k == 0 else 57, **same)
    following, natural = n.layer("Conv2D", y, (1, 64, 64, 8), (8, 1, 1, 64), 0, 64, input_rms=57, **same)
    # the next state at the state's own scale: the weights (and the bias, at input x weight scale) rescaled with it
    w, b = (g.sg.tensors[i].quantization for i in g.sg.operators[-1].inputs[1:3])
    w.scale, b.scale = ([s * quant[0][0] / natural for s in q.scale] for q in (w, b))
    g.sg.tensors[following].quantization = g.sg.tensors[state].quantization
    g.op(op.ASSIGN_VARIABLE, [variable, following], [], *_options("AssignVariable"))
    main.inputs, main.outputs = [image], [y[0]]
    g.model.subgraphs = [main, init]
    builder = flatbuffers.Builder(1024)
    builder.Finish(g.model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path


def within_one_step(ours: dict, reference: dict) -> tuple[int, int]:
    """Asserts every output within one step of LiteRT's; (elements one step off, elements)."""
    off = total = 0
    for name, expected in reference.items():
        assert ours[name].dtype == expected.dtype and ours[name].shape == expected.shape, name
        steps = np.abs(ours[name].astype(int) - expected.astype(int))
        assert steps.max() <= 1, f"{name}: {steps.max()} quantization steps off"
        off, total = off + int(steps.sum()), total + steps.size
    return off, total


def placement(built) -> dict[tuple[str, str, str], int]:
    """(operator, backend, pattern) -> calls, from the build summary."""
    return {(p["operator"], p["backend"], p["detail"]): p["count"] for p in report.build_json(built)["offload"]}


@pytest.mark.parametrize("target, backend", [pytest.param("host", "onednn", marks=needs_onednn_int8), ("rpi4", "xnnpack")])
def test_small_int8_cnn_runs_on_int8_primitives_within_one_step(tmp_path, qemu_cpus, target, backend):
    """On the host oneDNN's int8 primitives, the residual ADD a sum post-op of the conv before it; for rpi4
    XNNPACK's QC8 operators (the ADD apart), run under qemu (Cortex-A72)."""
    model = small_int8_cnn(tmp_path / "int8_cnn.tflite")
    rng = np.random.default_rng(0)
    samples = [{"image": rng.integers(-128, 128, (1, 12, 12, 8)).astype(np.int8)} for _ in range(6)]
    built = api.build(model, target, tmp_path / "b", options=BuildOptions(offload=(backend,)),
                      sample_inputs=samples[0])
    assert built.manifest.verification["status"] == "verified"
    convs = ({(f"{backend}.qconv2d_bias", 1), (f"{backend}.qconv2d_bias_add", 1)} if backend == "onednn"
             else {(f"{backend}.qconv2d_bias", 2)})
    assert placement(built) == {**{("conv2d", backend, pattern): n for pattern, n in convs},
                                ("conv2d", backend, f"{backend}.qconv2d_bias_clip"): 2,
                                ("matmul", backend, f"{backend}.qmatmul_bias_clip"): 1}, placement(built)
    litert, off, total, scores = ReferenceRuntime(model), 0, 0, []
    for sample in samples:
        reference = litert.run(sample)
        o, t = within_one_step(api.run(built.bundle_dir, sample).outputs, reference)
        off, total, scores = off + o, total + t, [*scores, reference["score"]]
    print(f"{target}: {off} of {total} outputs one step off LiteRT")
    assert np.ptp(np.concatenate(scores)) > 50, "the scores vary with the input: the comparison checks something"
    assert (target == "rpi4") == ("cortex-a72" in qemu_cpus)


@needs_onednn_int8
def test_okay_nabu_int8_layers_on_onednn_stream_within_one_step(tmp_path):
    """micro-wakeword's okay_nabu (pymicro-wakeword 2.5.0, full-integer, streaming): all 14 convolutions and the
    dense layer are oneDNN int8 primitives; 12 streamed steps, every output within one step of LiteRT."""
    built = api.build(real_model("okay_nabu"), "host", tmp_path / "b", options=ONEDNN)
    assert placement(built) == {("conv2d", "onednn", "onednn.qconv2d_bias"): 8,
                                ("conv2d", "onednn", "onednn.qconv2d_bias_clip"): 6,
                                ("matmul", "onednn", "onednn.qmatmul_bias"): 1}, placement(built)
    states = api.bundle_states(built.bundle_dir)
    litert, model = ReferenceRuntime(real_model("okay_nabu"), states=states), api.load(built.bundle_dir)
    off = total = 0
    for chunk in wakeword_features(12):
        o, t = within_one_step(model.stream({AUDIO: chunk}), litert.run({AUDIO: chunk}))
        off, total = off + o, total + t
    print(f"{off} of {total} outputs one step off LiteRT")


@needs_onednn_int8
def test_other_int8_forms_within_one_step(tmp_path):
    """A depthwise conv over one input channel (multiplier 4: TVM's HWIO kernel), a conv with per-tensor weights,
    a FULLY_CONNECTED without bias keeping a 3-D input's dims: each an int8 primitive; a legacy uint8 conv
    (asymmetric weights, which the integer kernels do not take) stays a float conv, and right."""
    rng, op, act = np.random.default_rng(1), schema.BuiltinOperator, schema.ActivationFunctionType
    same = dict(padding=schema.Padding.SAME, strideH=1, strideW=1)

    def weights(name, shape, scales, axis=0, dtype=np.int8, zero_point=0):
        info = np.iinfo(dtype)
        data = rng.integers(info.min + (dtype == np.int8), info.max + 1, shape).astype(dtype)
        return g.tensor(name, shape, dtype, data, quant=(scales, [zero_point] * len(scales), axis))

    def bias(name, scales, channels):
        return g.tensor(name, (channels,), np.int32, rng.integers(-300, 300, channels).astype(np.int32),
                        quant=(scales, [0] * len(scales), 0))

    g = Graph()
    x = g.tensor("x", (1, 8, 8, 1), np.int8, quant=([0.05], [0], 0))
    sw = np.float32([0.01, 0.02, 0.015, 0.012])
    y = g.tensor("y", (1, 8, 8, 4), np.int8, quant=([0.1], [-3], 0))
    g.op(op.DEPTHWISE_CONV_2D, [x, weights("w1", (1, 3, 3, 4), sw, 3), bias("b1", 0.05 * sw, 4)], [y],
         *_options("DepthwiseConv2D", depthMultiplier=4, fusedActivationFunction=act.RELU, **same))
    z = g.tensor("z", (1, 6, 6, 6), np.int8, quant=([0.2], [5], 0))
    g.op(op.CONV_2D, [y, weights("w2", (6, 3, 3, 4), [0.01]), bias("b2", [0.001], 6)], [z],
         *_options("Conv2D", padding=schema.Padding.VALID, strideH=1, strideW=1))
    v = g.tensor("v", (1, 5, 16), np.int8, quant=([0.05], [2], 0))
    u = g.tensor("u", (1, 5, 8), np.int8, quant=([0.05], [0], 0))
    g.op(op.FULLY_CONNECTED, [v, weights("w3", (8, 16), np.full(8, 0.01, np.float32)), -1], [u],
         *_options("FullyConnected", keepNumDims=True))
    mixed = g.save(tmp_path / "forms.tflite", [x, v], [z, u])

    g = Graph()
    x8 = g.tensor("x", (1, 6, 6, 3), np.uint8, quant=([0.05], [128], 0))
    y8 = g.tensor("y", (1, 6, 6, 4), np.uint8, quant=([0.05], [128], 0))
    g.op(op.CONV_2D, [x8, weights("w", (4, 3, 3, 3), [0.01], dtype=np.uint8, zero_point=120), bias("b", [0.0005], 4)],
         [y8], *_options("Conv2D", fusedActivationFunction=act.RELU6, **same))
    legacy = g.save(tmp_path / "uint8.tflite", [x8], [y8])

    for model, placed in [(mixed, {("conv2d", "onednn", "onednn.qconv2d_bias_clip"): 1,
                                   ("conv2d", "onednn", "onednn.qconv2d_bias"): 1,
                                   ("matmul", "onednn", "onednn.qmatmul"): 1}),
                          (legacy, {("conv2d", "onednn", "onednn.conv2d_bias_clip"): 1})]:
        built = api.build(model, "host", tmp_path / model.stem, options=ONEDNN)
        assert built.manifest.verification["status"] == "verified" and placement(built) == placed, placement(built)
        sample = {t.name: rng.integers(np.iinfo(t.dtype).min, np.iinfo(t.dtype).max + 1, t.shape).astype(t.dtype)
                  for t in built.manifest.inputs}
        reference = ReferenceRuntime(model).run(sample)
        within_one_step(api.run(built.bundle_dir, sample).outputs, reference)
        assert all(np.ptp(r.astype(int)) > 20 for r in reference.values()), reference


def test_deep_int8_cnn_is_verified_by_the_integer_rule(tmp_path):
    """7 layers: TVM's float QDQ kernels (offload none, int8-kernels disabled) end steps off LiteRT, as LiteRT's two
    kernel sets end 5 apart, which the one-step rule refuses; the integer rule measures the bundle against the model's
    own rounding and accepts it, and the summary names the rule and the margin. (TVM's integer kernels, int8-kernels,
    give LiteRT's outputs exactly here.)"""
    options = BuildOptions(offload=(), disabled_passes=("int8-kernels",))
    built = api.build(deep_int8_cnn(tmp_path / "deep.tflite"), "host", tmp_path / "b", options=options)
    verification = built.manifest.verification
    out = verification["outputs"]["Conv2D21"]
    print("7-layer int8 CNN, TVM:", out)
    assert verification["status"] == "verified" and verification["rule"] == INTEGER_RULE.to_json()
    assert out["max_abs"] > 1 and verification["tolerance"] == {"atol": 1, "rtol": 0}
    assert out["margin_db"] >= INTEGER_RULE.margin_db
    assert out["worst_channel_margin_db"] >= INTEGER_RULE.channel_margin_db
    assert f"integer rule: {out['margin_db']:.1f} dB below the graph's own rounding error" in report.build_text(built)


def test_an_unmeasurable_integer_rule_leaves_the_one_step_refusal(tmp_path, monkeypatch):
    """A twin that cannot be built (here made to raise) for a bundle beyond one step: refused in one line, the
    one-step rule's, saying why the integer rule was not measured; not an internal error."""
    import edgec.verification

    def broken(mod, states=()):
        raise ValueError("an op the twin does not foresee\nat 'pack'")

    monkeypatch.setattr(edgec.verification, "unrounded_integers", broken)
    options = BuildOptions(offload=(), disabled_passes=("int8-kernels",))
    with pytest.raises(VerificationFailed) as e:
        api.build(deep_int8_cnn(tmp_path / "deep.tflite"), "host", tmp_path / "b", options=options)
    assert "beyond atol=1" in e.value.message and "\n" not in e.value.message, e.value.message
    assert "the integer rule could not be measured (ValueError: at 'pack')" in e.value.message, e.value.message


def _faulty(src, dst, layer: int, channel_only: bool):
    """`src` with the weight scales of conv `layer` x1.25 (a wrong requantization), or its channel 0's alone x1.5;
    its bias's scales alike (LiteRT takes a bias at input scale x weight scale whatever its own says, TVM's importer
    at its own: they compute the same only where the model agrees). `layer`: the conv's operator index."""
    model = schema.ModelT.InitFromPackedBuf(src.read_bytes(), 0)
    tensors, op = model.subgraphs[0].tensors, model.subgraphs[0].operators[layer]
    for quantization in (tensors[op.inputs[1]].quantization, tensors[op.inputs[2]].quantization):
        quantization.scale = [s * (1.5 if k == 0 else 1) if channel_only else s * 1.25
                              for k, s in enumerate(quantization.scale)]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    dst.write_bytes(bytes(builder.Output()))
    return dst


def test_streaming_deep_int8_cnn_is_verified_by_the_integer_rule(tmp_path):
    """A 3-layer CNN as a stream: TVM's float QDQ kernels end steps off LiteRT over the 4 verification steps, which
    the one-step rule refuses; the integer rule, its twin streamed on its own unrounded state, accepts it."""
    options = BuildOptions(offload=(), disabled_passes=("int8-kernels",))
    built = api.build(streaming_deep_int8_cnn(tmp_path / "stream.tflite"), "host", tmp_path / "b", options=options)
    verification = built.manifest.verification
    print("streaming 3-layer int8 CNN, TVM:", verification["outputs"])
    assert verification["status"] == "verified" and verification["rule"] == INTEGER_RULE.to_json()
    assert verification["runner"] == "in-process, 4 steps streamed"
    assert set(verification["outputs"]) == {"Conv2D12", "Conv2D15"}         # the output and the state
    assert max(out["max_abs"] for out in verification["outputs"].values()) > 1
    for out in verification["outputs"].values():
        assert out["max_abs"] <= 1 or out["margin_db"] >= INTEGER_RULE.margin_db


def test_unrounded_twin_streams_a_state_no_quantize_makes():
    """A state carried as it is (the previous frame): the twin's state input is float32, its output the int8 input,
    which the next step is fed widened (exactly), not refused by the VM as a dtype mismatch."""
    import tvm
    from types import SimpleNamespace
    from tvm.script import relax as R

    from edgec.frontends.base import State
    from edgec.quantize.reference import run_graph
    from edgec.reference import unrounded_integers

    @tvm.script.ir_module
    class PreviousFrame:
        @R.function
        def main(x: R.Tensor((1, 4), "int8"), prev: R.Tensor((1, 4), "int8")):
            with R.dataflow():
                both = R.add(R.dequantize(x, R.const(0.1, "float32"), R.const(0, "int8"), out_dtype="float32"),
                             R.dequantize(prev, R.const(0.1, "float32"), R.const(0, "int8"), out_dtype="float32"))
                y = R.quantize(R.multiply(both, R.const(0.5, "float32")), R.const(0.1, "float32"),
                               R.const(0, "int8"), out_dtype="int8")
                out = (y, x)
                R.output(out)
            return out

    state = State("prev", "prev", "next", np.zeros((1, 4), np.int8))
    model = SimpleNamespace(states=(state,), outputs=(SimpleNamespace(name="y"), SimpleNamespace(name="next")))
    frames = [np.array([[1, 2, 3, 5]], np.int8), np.array([[7, 8, 9, 10]], np.int8)]
    out = run_graph(unrounded_integers(PreviousFrame, (state,)), model, [{"x": f} for f in frames])
    np.testing.assert_array_equal(out[0]["y"], frames[0] * np.float32(0.5))      # unrounded: 1.5, 2.5 stay
    np.testing.assert_array_equal(out[1]["y"], (frames[1] + frames[0]) * np.float32(0.5))


@pytest.mark.parametrize("make, layer, channel_only", [(deep_int8_cnn, 3, False), (deep_int8_cnn, 6, True),
                                                       (streaming_deep_int8_cnn, 5, False),
                                                       (streaming_deep_int8_cnn, 7, False)],
                         ids=["layer4", "layer7_channel0", "streaming_layer2", "streaming_state"])
def test_wrong_deep_int8_bundle_is_refused(tmp_path, make, layer, channel_only):
    """A correct build of the faulty file checked against the original's reference: refused. The last layer's one
    channel is 1/64 of the output (measured 9.0 dB, 1.2% off: inside the whole-output bounds), seen per channel. The
    stream's faults (its layer 2's scales, the conv making its state) over its 4 steps."""
    good = make(tmp_path / "deep.tflite")
    bad = _faulty(good, tmp_path / "bad.tflite", layer, channel_only)
    built = api.build(bad, "host", tmp_path / "b", options=BuildOptions(offload=()))
    model = load_model(good)
    steps = stream_steps(model, {"image": np.load(built.bundle_dir / "sample" / "inputs" / "0-image.npy")}, False)
    with pytest.raises(VerificationFailed, match="rounding error") as e:
        verify_staged(built.bundle_dir, load_target("host"), reference_outputs(model, steps), stream=bool(model.states))
    print(e.value.message)
    assert "requantization nudged" in e.value.message      # refused with the element bound its nudged graphs measure
    assert ("over 4 steps from the initial state" in e.value.message) == bool(model.states)
    whole_output = float(re.search(r"its error (\S+) dB below", e.value.message).group(1))
    assert (whole_output >= INTEGER_RULE.margin_db) == channel_only   # the one channel passes the whole-output bound
