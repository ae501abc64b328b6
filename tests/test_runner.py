"""The bundle's C++ runner (templates/bundle) built by edgec.toolchain and driven by edgec.runtime.native.

Builds a tiny two-input, two-output ONNX model into bundles for the host and for rpi4, and runs them through
the C++ runner natively and under qemu-user (cross/setup-aarch64.sh installs the tools)."""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec.errors import EdgecError
from edgec.manifest import Manifest
from edgec.runtime.native import run_with_runner
from edgec.signature import TensorSpec, random_inputs, tensor_file_name
from edgec.toolchain import build_runner, find_tool, host_arch

INPUTS = (TensorSpec("x", (1, 3, 8, 8), "float32"), TensorSpec("offset", (1, 10), "int32"))
# an output name with characters that cannot go into a file name as they are
OUTPUTS = (TensorSpec("features", (1, 4, 8, 8), "float32"), TensorSpec("logits/out:0", (1, 10), "float32"))


def tiny_onnx() -> onnx.ModelProto:
    """Conv+Relu -> "features"; Flatten+Gemm + Cast(offset) -> "logits/out:0"."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.2).astype(np.float32), n)
             for n, s in [("conv_w", (4, 3, 3, 3)), ("conv_b", (4,)), ("fc_w", (256, 10)), ("fc_b", (10,))]]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["features"]),
        helper.make_node("Flatten", ["features"], ["flat"]),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["fc"]),
        helper.make_node("Cast", ["offset"], ["offset_f"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["fc", "offset_f"], ["logits/out:0"]),
    ]
    dt = {"float32": TensorProto.FLOAT, "int32": TensorProto.INT32}
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info(s.name, dt[s.dtype], s.shape) for s in INPUTS],
        [helper.make_tensor_value_info(s.name, dt[s.dtype], s.shape) for s in OUTPUTS], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def write_bundle(path: Path, arch: str, model: onnx.ModelProto) -> Path:
    """Build `model` with edgec's own pipeline for the host or the Raspberry Pi 4 (aarch64)."""
    from edgec import api

    model_path = path.with_suffix(".onnx")
    onnx.save(model, model_path)
    api.build(model_path, "host" if arch == host_arch() else "rpi4", path)
    return path


def dir_digest(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model() -> onnx.ModelProto:
    return tiny_onnx()


@pytest.fixture(scope="module")
def feeds() -> dict[str, np.ndarray]:
    return random_inputs(INPUTS, seed=3)


@pytest.fixture(scope="module")
def host_bundle(tmp_path_factory, model) -> Path:
    return write_bundle(tmp_path_factory.mktemp("bundles") / "host", host_arch(), model)


@pytest.fixture(scope="module")
def reference(model, feeds, host_bundle) -> dict[str, dict[str, np.ndarray]]:
    """Outputs of onnxruntime and of the in-process relax.VirtualMachine on the host bundle's library."""
    import tvm
    from tvm import relax

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_out = dict(zip([s.name for s in OUTPUTS], sess.run([s.name for s in OUTPUTS], feeds)))

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(host_bundle / "model.so")), tvm.cpu())
    params = tvm.runtime.load_param_dict_from_file(str(host_bundle / "params.bin"))
    arity = vm.module["get_function_arity"]("main")
    args = [tvm.runtime.tensor(feeds[s.name]) for s in INPUTS]
    args += [params[vm.module["get_function_param_name"]("main", i)] for i in range(len(INPUTS), arity)]
    vm_out = dict(zip([s.name for s in OUTPUTS], (t.numpy() for t in vm["main"](*args))))
    return {"ort": ort_out, "vm": vm_out}


@pytest.fixture(scope="module")
def aarch64_bundle(tmp_path_factory, model) -> Path:
    if host_arch() == "aarch64":
        pytest.skip("the host is aarch64: covered by the host test")
    return write_bundle(tmp_path_factory.mktemp("bundles") / "aarch64", "aarch64", model)


def assert_matches(outputs: dict[str, np.ndarray], reference: dict[str, dict[str, np.ndarray]]) -> None:
    assert set(outputs) == {s.name for s in OUTPUTS}
    for spec in OUTPUTS:
        assert outputs[spec.name].shape == spec.shape and str(outputs[spec.name].dtype) == spec.dtype
        for ref in ("vm", "ort"):
            np.testing.assert_allclose(outputs[spec.name], reference[ref][spec.name], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{spec.name} vs {ref}")


def test_host_runner_matches_vm_and_onnxruntime(host_bundle, feeds, reference):
    before = dir_digest(host_bundle)
    res = run_with_runner(host_bundle, feeds, repeat=3, warmup=1)
    assert_matches(res.outputs, reference)
    assert not res.emulated and "edgec_run" in res.command[0]
    assert res.load_ms > 0 and res.first_ms > 0 and 0 < res.min_ms <= res.median_ms
    assert 1 << 20 < res.peak_rss_bytes < 1 << 30
    assert dir_digest(host_bundle) == before, "building/running must not touch the bundle"


def test_aarch64_runner_under_qemu(aarch64_bundle, feeds, reference):
    t0 = time.perf_counter()
    build_runner(aarch64_bundle, Manifest.load(aarch64_bundle).target)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = run_with_runner(aarch64_bundle, feeds, repeat=2, threads=1)
    run_s = time.perf_counter() - t0
    print(f"aarch64 runner build {build_s:.1f}s (cached if ~0), qemu run {run_s:.2f}s, "
          f"load {res.load_ms:.1f}ms first {res.first_ms:.1f}ms median {res.median_ms:.1f}ms")
    assert res.emulated and "qemu-aarch64-static" in res.command[0]
    assert_matches(res.outputs, reference)


def test_runner_build_is_cached(host_bundle):
    first = build_runner(host_bundle, Manifest.load(host_bundle).target)
    mtime = first.stat().st_mtime_ns
    t0 = time.perf_counter()
    assert build_runner(host_bundle, Manifest.load(host_bundle).target) == first
    assert time.perf_counter() - t0 < 1.0 and first.stat().st_mtime_ns == mtime


def test_runner_compile_error_shows_compiler_output(host_bundle, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(host_bundle, broken)
    (broken / "main.cc").write_text((broken / "main.cc").read_text() + "\nint broken_line = ;\n")
    with pytest.raises(EdgecError, match=r"building the .* runner failed:(.|\n)*error"):
        build_runner(broken, Manifest.load(broken).target)


def test_wrong_input_shape_is_rejected_before_running(host_bundle, feeds):
    bad = dict(feeds, x=np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(EdgecError, match=r"\[1, 3, 4, 4\].*\[1, 3, 8, 8\]"):
        run_with_runner(host_bundle, bad)
    with pytest.raises(EdgecError, match="do not match the model's inputs"):
        run_with_runner(host_bundle, {"x": feeds["x"]})


@pytest.mark.parametrize("case, message", [
    ("shape", "has shape [1, 3, 4, 4], the model expects [1, 3, 8, 8]"),
    ("dtype", "has dtype float64, the model expects float32"),
    ("big_endian", "unsupported dtype '>f4'"),
    ("fortran", "Fortran-order"),
    ("garbage", "not a .npy file"),
    ("truncated", "data size does not match"),
    ("missing", "cannot open input file"),
    ("count", "expected 2 input .npy files (x, offset), got 1"),
])
def test_runner_rejects_bad_inputs(host_bundle, feeds, tmp_path, case, message):
    """The C++ runner's own checks: one line on stderr, exit code 2."""
    runner = build_runner(host_bundle, Manifest.load(host_bundle).target)
    x, offset = tmp_path / "x.npy", tmp_path / "offset.npy"
    np.save(offset, feeds["offset"])
    arrays = {"shape": np.zeros((1, 3, 4, 4), np.float32), "dtype": feeds["x"].astype(np.float64),
              "big_endian": feeds["x"].astype(">f4"), "fortran": np.asfortranarray(feeds["x"])}
    if case in arrays:
        np.save(x, arrays[case])
    elif case == "garbage":
        x.write_bytes(b"not numpy")
    elif case == "truncated":
        np.save(x, feeds["x"])
        x.write_bytes(x.read_bytes()[:-4])
    args = [str(x)] if case == "count" else [str(x), str(offset)]
    proc = subprocess.run([str(runner), "-d", str(host_bundle), "-o", str(tmp_path / "out"), *args],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


def test_runner_writes_outputs_by_name(host_bundle, feeds, tmp_path):
    runner = build_runner(host_bundle, Manifest.load(host_bundle).target)
    paths = []
    for spec in INPUTS:
        paths.append(str(tmp_path / f"{spec.name}.npy"))
        np.save(paths[-1], feeds[spec.name])
    proc = subprocess.run([str(runner), "-d", str(host_bundle), "-o", str(tmp_path / "out"), *paths],
                          capture_output=True, text=True, check=True)
    assert proc.stdout.startswith("edgec_run: load_ms=") and "threads=default" in proc.stdout
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(tensor_file_name(s.name) for s in OUTPUTS)
    assert tensor_file_name("logits/out:0") == "logits_out_0.npy"


def test_find_tool_reports_the_apt_package():
    with pytest.raises(EdgecError) as e:
        find_tool("edgec-no-such-tool", "edgec-pkg")
    assert e.value.message == "edgec-no-such-tool not found"
    assert e.value.hint == "install it with: sudo apt-get install edgec-pkg"
    assert find_tool("sh", "dash").startswith("/")
