"""int8-kernels: QDQ conv2d/matmul chains no backend takes (`--offload none`) run in TVM as integer kernels (8-bit x
int8 -> int32 sums with the target's dot product, then QDQ's requantization), verified like any int8 build against
the QDQ reference; depthwise convs get int32 vector-loop kernels of their own; chains the kernels do not take
(grouped convs) stay float as before."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from onnxruntime.quantization import QuantType

from edgec import api, report
from edgec.build import BuildOptions
from test_offload_arm import qemu_cpus  # noqa: F401  (a fixture)
from test_offload_int8 import check_within_one_step, conv_forms, float_tail_conv, qdq_conv, quantized

NO_OFFLOAD = BuildOptions(offload=())
RNG = np.random.default_rng(9)


def _kernels(dump: Path) -> tuple[list[str], list[str]]:
    """After int8-kernels: each integer kernel's dot product (`depthwise` for a depthwise conv's kernel), and the
    groups of the float conv2d left in main."""
    text = next(dump.glob("*-int8-kernels.py")).read_text()
    kernels = re.findall(r'def (int8_\w+)\(.*\n.*"edgec\.int8_kernel": "(\w+)"', text)
    return ([("depthwise" if "depthwise" in name else kind) for name, kind in kernels],
            re.findall(r"R\.nn\.conv2d\(.*groups=(\d+)", text))


def _channels_last(dump: Path) -> bool:
    """int8-layout put the graph in NHWC: the forms model's first conv reads x (1x8x16x16) as 1x16x16x8."""
    return 'def int8_conv2d(x: T.Buffer((1, 16, 16, 8)' in next(dump.glob("*-int8-kernels.py")).read_text()


def _forms(tmp_path, activations):
    model = conv_forms(tmp_path / "forms.onnx")
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    return quantized(model, samples, activations), samples


@pytest.mark.parametrize("activations", [QuantType.QUInt8, QuantType.QInt8])
def test_offload_none_runs_integer_kernels(tmp_path, activations):
    """The 3x3 padded conv, the 1x1 conv and the Gemm become integer kernels with this host's dot product (VNNI on an
    AVX-512 VNNI CPU, vpmaddwd on AVX2, else the vector loop), the strided depthwise conv with asymmetric padding a
    depthwise kernel, on the graph int8-layout put in NHWC; the grouped conv stays float. The integer sums are
    exact, so the bundle is within one step of onnxruntime's QDQ float math."""
    from tvm.target.codegen import target_has_features

    from edgec.targets import load_target

    qdq, samples = _forms(tmp_path, activations)
    options = BuildOptions(offload=(), dump_ir=tmp_path / "ir")
    result = api.build(qdq, "host", tmp_path / "b", options=options, sample_inputs=samples[0])
    kinds, float_convs = _kernels(tmp_path / "ir")
    host = load_target("host").tvm()
    expected = next((k for k, feature in (("vnni", "avx512vnni"), ("avx2", "avx2"))
                     if target_has_features(feature, host)), "vector")
    assert sorted(kinds) == sorted([expected] * 3 + ["depthwise"]) and float_convs == ["4"], (kinds, float_convs)
    assert _channels_last(tmp_path / "ir")
    # the summary names the instruction: 4 chains, 4 kernels (no two of one shape)
    instruction = {"vnni": "vpdpbusd", "avx2": "vpmaddwd", "vector": "int32 vector loop"}[expected]
    line = next(s for s in report.build_text(result).splitlines() if "int8 kernels in TVM" in s)
    assert line.startswith("  int8 kernels in TVM: 4 int8 layers, 4 kernels, ") and instruction in line, line
    assert line.endswith(", 1 depthwise: int32 vector loop; float: 1 grouped convolution"), line
    verification = result.manifest.verification
    assert verification["status"] == "verified" and verification["rule"]["name"] == "quantized", verification
    for sample in [samples[1], {"x": (RNG.standard_normal((1, 8, 16, 16)) * 2).astype(np.float32)}]:
        assert check_within_one_step(qdq, tmp_path / "b", sample) < 0.05


@pytest.mark.parametrize("mcpu, kind", [("x86-64-v3", "avx2"), ("x86-64", "vector")])
def test_dot_product_without_vnni(tmp_path, mcpu, kind):
    """A CPU without VNNI gets vpmaddwd's exact 16-bit pairs where it has AVX2 (x86-64-v3), the int32 vector loop
    where it has only SSE2 (x86-64), with the same result."""
    from edgec.targets import target_files

    host = target_files()["host"].read_text()
    descriptor = tmp_path / "cpu.toml"
    descriptor.write_text(host.replace('name = "host"', 'name = "cpu"').replace('mcpu = "detect"', f'mcpu = "{mcpu}"'))
    qdq, samples = _forms(tmp_path, QuantType.QUInt8)
    options = BuildOptions(offload=(), dump_ir=tmp_path / "ir")
    result = api.build(qdq, str(descriptor), tmp_path / "b", options=options, sample_inputs=samples[0])
    assert sorted(_kernels(tmp_path / "ir")[0]) == sorted([kind] * 3 + ["depthwise"])
    assert result.manifest.verification["status"] == "verified"
    assert check_within_one_step(qdq, tmp_path / "b", samples[1]) < 0.05


def _exact_qconv(model: Path, x: np.ndarray, group: int = 1) -> np.ndarray:
    """qdq_conv's output with the conv summed as integers (the output's zero point 3) and QDQ's float32 arithmetic
    around it: what an exact integer kernel gives, where onnxruntime's float sums can round a value on a step's
    boundary the other way."""
    import onnx
    from onnx import numpy_helper

    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(model)).graph.initializer}
    sx, zx, sw, sy = inits["sx"], int(inits["zx"]), inits["sw"], inits["sy"]
    w, b = inits["w"].astype(np.int64), inits["b"].astype(np.int64)
    cout = len(w)
    # dequantize(x) pads with 0.0: the centred integers pad with 0
    xq = np.clip(np.round(x / sx) + zx, -128, 127).astype(np.int64) - zx
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(xq, [(0, 0), (0, 0), (1, 1), (1, 1)]), (3, 3),
                                                       axis=(2, 3))                   # [1, 4, 6, 6, 3, 3]
    windows = windows.reshape(1, group, 4 // group, 6, 6, 3, 3)
    acc = np.einsum("ngchwij,gocij->ngohw", windows, w.reshape(group, cout // group, 4 // group, 3, 3))
    acc = acc.reshape(1, cout, 6, 6) + b.reshape(1, cout, 1, 1)
    v = acc.astype(np.float32) * (np.float32(sx) * sw.astype(np.float32)).reshape(1, cout, 1, 1)
    q = np.clip(np.round(v / np.float32(sy)) + 3, -128, 127)
    return (q - 3) * np.float32(sy)


@pytest.mark.parametrize("group, channels, zx", [(1, 4, 0), (4, 4, 0), (4, 4, 5), (4, 8, -7)],
                         ids=["conv", "depthwise", "depthwise-zx", "depthwise-multiplier-zx"])
def test_padded_conv_zero_points(tmp_path, group, channels, zx):
    """s8 activations with zero points zx and 3 on a padded 3x3 conv (group 4: depthwise, channels 8: two output
    channels per input channel): the padding is the input's zero point (as dequantize(x) pads with 0.0), and the
    integer sums are exact: the output is the exact integer result's on any input."""
    sx, sw, sy = np.float32(0.02), np.full(channels, 0.01, np.float32), 0.01
    model = qdq_conv(tmp_path / "qconv.onnx", sx, sw, sx * sw, sy, group=group, zx=zx)
    rng = np.random.default_rng(4)
    samples = [{"x": (rng.standard_normal((1, 4, 6, 6)) * 0.5).astype(np.float32)} for _ in range(4)]
    options = BuildOptions(offload=(), dump_ir=tmp_path / "ir")
    result = api.build(model, "host", tmp_path / "b", options=options, sample_inputs=samples[0])
    kinds = _kernels(tmp_path / "ir")[0]
    assert len(kinds) == 1 and (kinds[0] == "depthwise") == (group > 1), kinds
    assert result.manifest.verification["status"] == "verified"
    for sample in samples:
        ours = api.run(tmp_path / "b", sample).outputs["y"]
        assert np.array_equal(ours, _exact_qconv(model, sample["x"], group))
        assert check_within_one_step(model, tmp_path / "b", sample) < 0.05


def test_sdot_on_rpi5_under_qemu(tmp_path, qemu_cpus):
    """rpi5 (+dotprod) without offload: the integer kernels use sdot (u8 activations shifted to s8) in NHWC, run
    under qemu as a Cortex-A76, verified against the QDQ reference."""
    qdq, samples = _forms(tmp_path, QuantType.QUInt8)
    options = BuildOptions(offload=(), dump_ir=tmp_path / "ir")
    result = api.build(qdq, "rpi5", tmp_path / "b", options=options, sample_inputs=samples[0])
    assert sorted(_kernels(tmp_path / "ir")[0]) == ["depthwise"] + ["sdot"] * 3 and _channels_last(tmp_path / "ir")
    checked = result.manifest.verification
    assert checked["status"] == "verified" and checked["runner"] == "qemu" and "cortex-a76" in qemu_cpus


def test_full_integer_tflite_gives_litert_exactly(tmp_path):
    """The 7-layer full-integer TFLite CNN (s8 activations) without offload: every conv an integer kernel, outputs
    equal to LiteRT's (the float QDQ path ends steps off; test_tflite_int8.py)."""
    from test_tflite_int8 import deep_int8_cnn

    options = BuildOptions(offload=(), dump_ir=tmp_path / "ir")
    built = api.build(deep_int8_cnn(tmp_path / "deep.tflite"), "host", tmp_path / "b", options=options)
    kinds, float_convs = _kernels(tmp_path / "ir")
    assert kinds and not float_convs, (kinds, float_convs)
    verification = built.manifest.verification
    assert verification["status"] == "verified"
    assert all(out["max_abs"] == 0 for out in verification["outputs"].values()), verification


def test_a_kernel_the_schedule_refuses_stays_float(tmp_path, monkeypatch):
    """A chain whose integer kernel TVM's schedule refuses stays the float QDQ chain, and the module says which and
    why (the build failed in int8-kernels); the other chains still get their kernels."""
    from edgec.passes import int8_kernels

    schedule = int8_kernels._IntegerChain._schedule

    def refuse_matmul(self, func, rows, direct):
        if self.q.anchor.op.name == "relax.matmul":
            raise RuntimeError("ScheduleError: refused here")
        return schedule(self, func, rows, direct)

    monkeypatch.setattr(int8_kernels._IntegerChain, "_schedule", refuse_matmul)
    qdq, samples = _forms(tmp_path, QuantType.QUInt8)
    options = BuildOptions(offload=(), dump_ir=tmp_path / "ir")
    result = api.build(qdq, "host", tmp_path / "b", options=options, sample_inputs=samples[0])
    assert len(_kernels(tmp_path / "ir")[0]) == 3
    text = next((tmp_path / "ir").glob("*-int8-kernels.py")).read_text()
    assert result.compiled.int8_kernels["left"] == ["matmul 1x1024: ScheduleError: refused here"]
    assert result.compiled.int8_kernels["layers"] == 3
    assert re.search(r'R\.Tensor\(\(1, 10\), dtype="float32"\) = R\.matmul\(', text)   # the float chain's matmul
    assert result.manifest.verification["status"] == "verified"
    assert check_within_one_step(qdq, tmp_path / "b", samples[1]) < 0.05


_GUARDED_RUN = r'''
import ctypes, mmap, sys
import numpy as np, tvm

PAGE = mmap.PAGESIZE
libc = ctypes.CDLL(None)
libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
for path in sys.argv[1:]:
    case = np.load(path + ".npz")
    x, constants = case["x"], [case[f"c{j}"] for j in range(4)]
    kernel = tvm.runtime.load_module(path + ".so")["main"]

    def run(x):
        out = tvm.runtime.tensor(np.zeros(case["out_shape"], str(case["out_dtype"])))
        kernel(x, *(tvm.runtime.tensor(c) for c in constants), out)
        return out.numpy()

    expected = run(tvm.runtime.tensor(x))
    pages = -(-x.nbytes // PAGE)
    for at_start in (True, False):      # x right after an unreadable page, or right before one
        region = mmap.mmap(-1, (pages + 2) * PAGE)
        base = ctypes.addressof(ctypes.c_char.from_buffer(region))
        for guard in (base, base + (pages + 1) * PAGE):
            assert libc.mprotect(guard, PAGE, 0) == 0
        offset = PAGE if at_start else (pages + 1) * PAGE - x.nbytes
        guarded = np.frombuffer(region, x.dtype, x.size, offset).reshape(x.shape)
        guarded[...] = x
        assert np.array_equal(run(tvm.runtime.from_dlpack(guarded)), expected), path    # x itself, not a copy
        del guarded
    print("read inside", path, flush=True)
'''


def test_kernels_read_only_their_input(tmp_path, monkeypatch):
    """Each kernel (3x3 padded conv, the depthwise conv with asymmetric padding, 1x1 conv, matmul) reads nothing
    outside its input: run on an input between two unreadable pages, it gives the same output (a read of the
    padding outside x, which a Select of TVM's computes whatever its condition, stops the process with SIGSEGV)."""
    import subprocess
    import sys

    import tvm

    from edgec.passes import int8_kernels
    from edgec.targets import load_target

    kernels = []
    finished = int8_kernels._IntegerChain._finished

    def keep(self, func):
        kernels.append((self, finished(self, func)))
        return kernels[-1][1]

    monkeypatch.setattr(int8_kernels._IntegerChain, "_finished", keep)
    qdq, samples = _forms(tmp_path, QuantType.QUInt8)
    api.build(qdq, "host", tmp_path / "b", options=NO_OFFLOAD, sample_inputs=samples[0])
    assert sorted(type(chain).__name__ for chain, _ in kernels) == ["_DepthwiseChain"] + ["_IntegerChain"] * 3
    paths = []
    for i, (chain, func) in enumerate(kernels):
        path = tmp_path / f"kernel{i}"
        tvm.tirx.build(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                       target=load_target("host").tvm()).export_library(str(path) + ".so")
        out_shape = chain.out_shape if isinstance(chain, int8_kernels._DepthwiseChain) else (chain._rows()[0], chain.n)
        x = RNG.integers(0, 256, chain.x_shape).astype(chain.x_dtype)
        np.savez(str(path) + ".npz", x=x, out_shape=out_shape, out_dtype=chain.q.out_dtype,
                 **{f"c{j}": c for j, c in enumerate(chain.constants())})
        paths.append(str(path))
    done = subprocess.run([sys.executable, "-c", _GUARDED_RUN, *paths], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.count("read inside") == 4, (done.returncode, done.stdout,
                                                                           done.stderr[-2000:])


def test_grouped_conv_of_a_dynamic_shape_is_no_integer_conv():
    """int8-layout's check on a grouped int8 conv whose input has a dynamic batch: not a depthwise conv it can prove
    (the kernels' checks refuse dynamic shapes), where it indexed a shape it did not have (TypeError: the build
    failed in int8-layout)."""
    from tvm import relax, tirx

    from edgec.passes.int8_kernels import _integer_convs

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((tirx.Var("n", "int64"), 4, 6, 6), "float32"))
    weight = relax.op.dequantize(relax.const(np.ones((4, 1, 3, 3), np.int8)), relax.const(np.float32(0.1)),
                                 relax.const(np.int8(0)), axis=0)
    with bb.function("main", [x]):
        with bb.dataflow():
            w = bb.emit(weight)
            out = bb.emit_output(relax.op.nn.conv2d(x, w, padding=1, groups=4))
        bb.emit_func_output(out)
    assert _integer_convs(bb.get()) is False


@pytest.mark.parametrize("tail", ["HardSwish", "Sigmoid"])
def test_chain_with_a_float_tail_is_an_integer_kernel(tmp_path, tail):
    """A conv whose output goes through a float operator before its quantize is an integer kernel with a float32
    output (x86 has a dot product everywhere but SSE2): the sums exact, the value float32(sum + b') * sx * sw, the
    operator after it a TVM kernel of its own; within one step of onnxruntime's QDQ math."""
    model = float_tail_conv(tmp_path / "qconv.onnx", tail)
    samples = [{"x": (RNG.standard_normal((1, 4, 6, 6)) * s).astype(np.float32)} for s in (0.8, 2)]
    options = BuildOptions(offload=(), dump_ir=tmp_path / "ir")
    result = api.build(model, "host", tmp_path / "b", options=options, sample_inputs=samples[0])
    kinds, float_convs = _kernels(tmp_path / "ir")
    assert len(kinds) == 1 and kinds[0] != "depthwise" and not float_convs, (kinds, float_convs)
    assert result.compiled.int8_kernels["layers"] == 1
    assert result.manifest.verification["status"] == "verified"
    for sample in samples:
        assert check_within_one_step(model, tmp_path / "b", sample) < 0.05


def test_chain_with_a_float_tail_takes_sdot_beside_xnnpack_under_qemu(tmp_path, qemu_cpus):
    """rpi5 with its XNNPACK: XNNPACK's int8 operators have 8-bit outputs, so a chain whose output stays float32 is
    an sdot kernel of int8-kernels (a float conv on weights dequantized at load before), run under qemu as a
    Cortex-A76 and verified against the QDQ reference."""
    model = float_tail_conv(tmp_path / "qconv.onnx", "HardSwish")
    sample = {"x": (RNG.standard_normal((1, 4, 6, 6)) * 0.8).astype(np.float32)}
    result = api.build(model, "rpi5", tmp_path / "b", options=BuildOptions(dump_ir=tmp_path / "ir"),
                       sample_inputs=sample)
    assert _kernels(tmp_path / "ir") == (["sdot"], [])
    checked = result.manifest.verification
    assert checked["status"] == "verified" and checked["runner"] == "qemu" and "cortex-a76" in qemu_cpus
