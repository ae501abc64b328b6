"""XNNPACK offload for the Raspberry Pi targets, under qemu with the board's CPU model: offloaded builds match the
reference, the summary places every convolution (and says why one stays in TVM), a copied bundle runs on the
libraries it ships, and the arm64 packages come from a sysroot edgec fetches (cross/setup-aarch64.sh adds arm64
to apt)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from edgec import api, report
from edgec.errors import EdgecError
from edgec.examples import mobilenet_v2
from edgec.manifest import Manifest
from edgec.runtime import native
from edgec.targets import load_target, load_target_file
from edgec.toolchain import build_runner, deb_sysroot, emulator_command, emulator_env, runtime_dir
from models import inputs_for, real_model
from verify import assert_close_to_reference, placed, save_onnx

RNG = np.random.default_rng(7)
XNNPACK_LIBS = ("lib/libcpuinfo.so.0", "lib/libpthreadpool.so.0", "lib/libXNNPACK.so.0")


def build(model, target, out, **kw) -> api.BuildResult:
    result = api.build(model, target, out, **kw)
    assert result.manifest.verification["status"] == "verified", result.manifest.verification
    assert result.manifest.shared_libs == XNNPACK_LIBS
    return result


@pytest.fixture
def qemu_cpus(monkeypatch):
    """The QEMU_CPU of every runner edgec starts (native.py's subprocess calls)."""
    seen = []
    run = subprocess.run

    def recording(command, *args, env=None, **kw):
        seen.append((env or {}).get("QEMU_CPU"))
        return run(command, *args, env=env, **kw)

    monkeypatch.setattr(native.subprocess, "run", recording)
    return seen


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    return mobilenet_v2(tmp_path_factory.mktemp("models") / "mobilenetv2.onnx")


@pytest.fixture(scope="module")
def cnn_rpi4(cnn, tmp_path_factory):
    return build(cnn, "rpi4", tmp_path_factory.mktemp("b") / "cnn-rpi4")


def test_descriptors_offload_to_xnnpack_under_their_cpu_model():
    for name, cpu in (("rpi4", "cortex-a72"), ("rpi3", "cortex-a53"), ("rpi-zero2w", "cortex-a53")):
        target = load_target(name)
        assert target.offload == ("xnnpack",) and target.emulator.cpu == cpu
        assert emulator_env(target) == {"QEMU_CPU": cpu}
        assert target.to_json()["emulator"]["cpu"] == cpu


def test_emulator_cpu_must_be_a_model_name(tmp_path):
    text = Path(load_target("rpi4").origin).read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace('cpu = "cortex-a72"', 'cpu = "cortex-a72 -d in_asm"'))
    with pytest.raises(EdgecError, match="field 'emulator.cpu' is 'cortex-a72 -d in_asm', not a CPU model name"):
        load_target_file(bad)


def test_cnn_rpi4_matches_reference_under_cortex_a72(cnn, cnn_rpi4, qemu_cpus):
    with open(cnn_rpi4.bundle_dir / "model.so", "rb") as f:
        assert f.read(20)[18:20] == (183).to_bytes(2, "little")      # ELF e_machine: EM_AARCH64
    assert cnn_rpi4.manifest.target.tvm_target["mcpu"] == "cortex-a72"
    assert placed(cnn_rpi4) == {("conv2d", "xnnpack"): 52, ("matmul", "xnnpack"): 1}
    patterns = {p.detail for p in cnn_rpi4.compiled.offload}
    # ReLU6 and the residual adds run inside the XNNPACK functions
    assert {"xnnpack.conv2d_bias_clip", "xnnpack.conv2d_bias_add", "xnnpack.matmul_bias"} <= patterns
    assert "ships lib/libcpuinfo.so.0, lib/libpthreadpool.so.0, lib/libXNNPACK.so.0" in report.build_text(cnn_rpi4)
    _, comparison = assert_close_to_reference(cnn, cnn_rpi4.bundle_dir, expect_mode="qemu")
    assert qemu_cpus == ["cortex-a72"]
    # same inputs, other weights would differ by ~1: the comparison is not vacuous
    assert max(o.max_abs for o in comparison.outputs.values()) < 2e-5


def test_ppocrv4_det_rpi4_matches_reference(tmp_path, qemu_cpus):
    model, inputs = real_model("ppocrv4_det"), inputs_for("ppocrv4_det")
    result = build(model, "rpi4", tmp_path / "det-rpi4", input_shapes={"x": (1, 3, 320, 320)}, sample_inputs=inputs)
    assert placed(result) == {("conv2d", "xnnpack"): 62}
    assert qemu_cpus == ["cortex-a72"]       # the build's own verification
    assert_close_to_reference(model, result.bundle_dir, inputs, expect_mode="qemu")


def test_small_cnn_rpi3_matches_reference_under_cortex_a53(tmp_path, qemu_cpus):
    model = mobilenet_v2(tmp_path / "small.onnx", width=0.35, resolution=96, seed=5)
    result = build(model, "rpi3", tmp_path / "small-rpi3")
    assert placed(result) == {("conv2d", "xnnpack"): 52, ("matmul", "xnnpack"): 1}
    assert_close_to_reference(model, result.bundle_dir, expect_mode="qemu")
    assert qemu_cpus == ["cortex-a53", "cortex-a53"]


def test_copied_bundle_runs_on_its_own_libraries(cnn, cnn_rpi4, tmp_path):
    copy = Path(shutil.copytree(cnn_rpi4.bundle_dir, tmp_path / "elsewhere" / "bundle"))
    manifest = Manifest.load(copy)
    assert all(rel in manifest.files for rel in manifest.shared_libs)
    # each library's license notice travels with it (BSD: "must reproduce the above copyright notice")
    for rel in manifest.shared_libs:
        assert f"{rel}.copyright" in manifest.files and "Copyright" in (copy / f"{rel}.copyright").read_text()
    dynamic = subprocess.run(["aarch64-linux-gnu-readelf", "-d", copy / "model.so"], capture_output=True,
                             text=True, check=True).stdout
    assert "Library rpath: [$ORIGIN/lib]" in dynamic and "sysroots" not in dynamic
    # Nothing else on the emulated machine has them: only the bundle can provide them.
    target = manifest.target
    sysroot = Path(target.emulator.sysroot)
    assert not list(sysroot.rglob("libXNNPACK*")) and not list(sysroot.rglob("libpthreadpool*"))
    env = {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": str(runtime_dir(target.arch) / "lib"),
           **emulator_env(target)}
    # model.so loaded by anyone (run.py on the board) finds them in the copy's lib/, dependencies too (DT_RPATH)
    loader = next(sysroot.glob("lib/ld-linux-aarch64.so.1"))
    listed = subprocess.run([*emulator_command(target), str(loader), "--list", str(copy / "model.so")],
                            capture_output=True, text=True, env=env, check=True).stdout
    for rel in XNNPACK_LIBS:
        assert f"{Path(rel).name} => {copy / rel} " in listed, listed
    # the C++ runner as a user starts it: only the TVM runtime on the library path (it loads lib/ from the bytes
    # it checked)
    command = [*emulator_command(target), str(build_runner(copy, target)), "-d", str(copy), "-o",
               str(tmp_path / "out"), *[str(copy / "sample" / "inputs" / t.file) for t in manifest.inputs]]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    expected = np.load(copy / "sample" / "expected" / manifest.outputs[0].file)
    got = np.load(tmp_path / "out" / manifest.outputs[0].file)
    assert np.abs(got - expected).max() < 2e-5
    assert_close_to_reference(cnn, copy, expect_mode="qemu")


def _weight(*shape):
    return (RNG.standard_normal(shape) * 0.2).astype(np.float32)


def conv_zoo(path: Path) -> Path:
    """Every conv2d form XNNPACK takes and three things it cannot: weights computed at run time (packed at
    creation), a matmul with 3-D weights (a fully connected operator takes 2-D), and a Clip whose range is empty
    (an operator's output range needs min < max: the conv goes to XNNPACK, the clip stays in TVM)."""
    inits, nodes = [], []

    def const(name, value):
        inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def conv(x, out, cin, cout, k, group=1, **attrs):
        nodes.append(helper.make_node("Conv", [x, const(f"{out}_w", _weight(cout, cin // group, k, k)),
                                               const(f"{out}_b", _weight(cout))], [out], group=group,
                                      kernel_shape=[k, k], **attrs))
        return out

    lo, hi, half = const("lo", np.float32(0)), const("hi", np.float32(6)), const("half", np.float32(0.5))
    a = conv("x", "a", 8, 16, 3, pads=[1, 1, 1, 1])                                  # 3x3 padded
    nodes.append(helper.make_node("Clip", [a, lo, hi], ["a6"]))                       # ReLU6
    b = conv("a6", "b", 16, 16, 3, group=16, strides=[2, 2], pads=[0, 1, 1, 0])       # depthwise, strided, asym
    c = conv(b, "c", 16, 16, 3, group=4, dilations=[2, 2], pads=[2, 2, 2, 2])         # grouped, dilated
    d = conv(c, "d", 16, 16, 1)                                                       # 1x1
    nodes += [helper.make_node("Add", [d, b], ["r"]), helper.make_node("Relu", ["r"], ["rr"])]  # residual, ReLU
    nodes.append(helper.make_node("Conv", ["rr", "wx"], ["e"], pads=[1, 1, 1, 1]))   # runtime weights
    f = conv("e", "f", 16, 16, 1)
    nodes += [helper.make_node("Clip", [f, half, half], ["f_flat"]),                 # empty range
              helper.make_node("Add", ["f_flat", "e"], ["g"]),
              helper.make_node("Reshape", ["g", const("g_s", np.array([2, 8, 64]))], ["g3"]),
              helper.make_node("MatMul", ["g3", const("bw", _weight(2, 64, 8))], ["h"]),   # 3-D weights
              helper.make_node("Reshape", ["h", const("h_s", np.array([1, 128]))], ["hf"]),
              helper.make_node("Gemm", ["hf", const("fc_w", _weight(10, 128)), const("fc_b", _weight(10))], ["fc"],
                               transB=1),
              helper.make_node("Relu", ["fc"], ["y"])]
    return save_onnx(path, "conv_zoo", nodes, {"x": [1, 8, 16, 16], "wx": [16, 16, 3, 3]}, {"y": [1, 10]}, inits)


def test_every_conv_form_and_what_xnnpack_cannot_take(tmp_path):
    model = conv_zoo(tmp_path / "zoo.onnx")
    inputs = {"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32), "wx": _weight(16, 16, 3, 3)}
    result = build(model, "rpi4", tmp_path / "zoo", sample_inputs=inputs)
    assert placed(result) == {("conv2d", "xnnpack"): 5, ("conv2d", None): 1, ("matmul", "xnnpack"): 1,
                              ("matmul", None): 1}
    text = report.build_text(result)
    assert "conv2d x1 -> TVM: its weights are computed at run time (only constant weights are packed)" in text
    assert "matmul x1 -> TVM: a 3-D by 3-D matmul (a fully connected operator takes 2-D weights)" in text
    patterns = {p.detail: p.count for p in result.compiled.offload if p.backend}
    # ReLU6 fused (a); b and c feed two ops (nothing after their bias can be fused); the residual add and its ReLU
    # fused (d); the empty clip is not: f runs as conv2d_bias and the clip in TVM
    assert patterns == {"xnnpack.conv2d_bias_clip": 1, "xnnpack.conv2d_bias": 3, "xnnpack.conv2d_bias_add_relu": 1,
                        "xnnpack.matmul_bias_relu": 1}, patterns
    print(text)
    assert_close_to_reference(model, result.bundle_dir, inputs, expect_mode="qemu")


def test_packages_it_cannot_fetch_are_one_line_with_the_fix(tmp_path, monkeypatch):
    """apt without the arm64 architecture (or offline): one line naming the setup script, exit 2, no debris."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "apt-get"
    fake.write_text("#!/bin/sh\necho 'E: Unable to locate package libxnnpack0:arm64' >&2\nexit 100\n")
    fake.chmod(0o755)
    cache = tmp_path / "cache"
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(cache))
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    with pytest.raises(EdgecError) as e:
        deb_sysroot("aarch64", ("libxnnpack0",))
    assert e.value.message == ("could not download the arm64 packages libxnnpack0 "
                               "(E: Unable to locate package libxnnpack0:arm64)")
    assert "sudo sh cross/setup-aarch64.sh" in e.value.hint
    assert not (cache / "sysroots").exists() or not any((cache / "sysroots").iterdir())
    # the CLI stops before compiling anything
    model = mobilenet_v2(tmp_path / "m.onnx", width=0.35, resolution=32)
    proc = subprocess.run([sys.executable, "-m", "edgec.cli", "build", str(model), "-t", "rpi4", "-o",
                           str(tmp_path / "out")], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not download the arm64 packages libxnnpack0 "), lines
    assert "run: sudo sh cross/setup-aarch64.sh" in lines[0]
    assert not (tmp_path / "out").exists()


# Preloaded into the C++ runner under qemu (-v: it keeps stderr): counts the pthreadpool_parallelize_1d calls that come from outside
# XNNPACK's own library, i.e. from the launch function linked into model.so that runs TVM's parallel loops, and says
# when a pool is created and destroyed.
_LAUNCH_COUNTER = r"""
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
extern "C" void* pthreadpool_create(size_t threads) {
  fprintf(stderr, "pthreadpool created\n");
  return ((void* (*)(size_t))dlsym(RTLD_NEXT, "pthreadpool_create"))(threads);
}
extern "C" void pthreadpool_destroy(void* pool) {
  fprintf(stderr, "pthreadpool destroyed\n");
  ((void (*)(void*))dlsym(RTLD_NEXT, "pthreadpool_destroy"))(pool);
}
typedef void (*Task)(void*, size_t);
typedef void (*Parallelize)(void*, Task, void*, size_t, unsigned);
static long outside_xnnpack;
static void report(void) { fprintf(stderr, "launches from outside XNNPACK: %ld\n", outside_xnnpack); }
extern "C" void pthreadpool_parallelize_1d(void* pool, Task task, void* context, size_t range, unsigned flags) {
  static Parallelize real;
  static void* xnnpack;
  Dl_info caller, library;
  if (!real) {
    real = (Parallelize)dlsym(RTLD_NEXT, "pthreadpool_parallelize_1d");
    dladdr(dlsym(RTLD_DEFAULT, "xnn_run_operator"), &library);
    xnnpack = library.dli_fbase;
    atexit(report);
  }
  if (dladdr(__builtin_return_address(0), &caller) && caller.dli_fbase != xnnpack) ++outside_xnnpack;
  real(pool, task, context, range, flags);
}
"""


def test_tvm_kernels_run_on_the_xnnpack_pool(tmp_path):
    """One thread pool per process on the board too: the parallel loops of the TVM kernels left in an XNNPACK
    build (the sigmoid, the layout transpose) run as tasks on XNNPACK's pthreadpool, started from the model
    library, and the outputs match under qemu with 2 threads and with 1 (no pool: the calling thread runs them).
    The pool goes with the library (it stayed, threads running, when a model was unloaded: loaded again, a second
    pool started)."""
    inits = [numpy_helper.from_array(_weight(32, 16, 3, 3), "w"), numpy_helper.from_array(_weight(32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["y"])]
    model = save_onnx(tmp_path / "conv_sigmoid.onnx", "conv_sigmoid", nodes, {"x": [1, 16, 64, 64]},
                      {"y": [1, 32, 64, 64]}, inits)
    result = build(model, "rpi4", tmp_path / "b")
    assert placed(result) == {("conv2d", "xnnpack"): 1}
    bundle, target = result.bundle_dir, result.manifest.target
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", bundle / "model.so"], capture_output=True, text=True,
                             check=True).stdout
    assert " V __TVMBackendParallelLaunch" in symbols and " U pthreadpool_parallelize_1d" in symbols
    counter = tmp_path / "count_launches.so"
    source = tmp_path / "count_launches.cc"
    source.write_text(_LAUNCH_COUNTER)
    subprocess.run([target.toolchain.compiler, "-shared", "-fPIC", "-O1", "-o", counter, source, "-ldl"], check=True)
    env = {"PATH": os.environ["PATH"], "LD_LIBRARY_PATH": str(runtime_dir(target.arch) / "lib"),
           "LD_PRELOAD": str(counter), **emulator_env(target)}
    expected = np.load(bundle / "sample" / "expected" / result.manifest.outputs[0].file)
    for threads in ("2", "1"):
        out = tmp_path / f"out{threads}"
        command = [*emulator_command(target), str(build_runner(bundle, target)), "-v", "-d", str(bundle), "-t", threads,
                   "-o", str(out), *[str(bundle / "sample" / "inputs" / t.file) for t in result.manifest.inputs]]
        proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        launches = int(proc.stderr.split("launches from outside XNNPACK: ")[1].split()[0])
        assert launches > 0, proc.stderr
        pools = 1 if threads == "2" else 0
        assert proc.stderr.count("pthreadpool created") == proc.stderr.count("pthreadpool destroyed") == pools
        assert np.abs(np.load(out / result.manifest.outputs[0].file) - expected).max() < 2e-5
