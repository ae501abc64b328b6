"""Library offload (edgec/offload) with the oneDNN backend on the host: offloaded builds match the reference,
the summary says where every convolution and matrix product runs (and why one stays in TVM), bundles ship the
library and run from anywhere, --offload none offloads nothing, and models with their own weights run concurrently in one process, each owning its
library state."""
from __future__ import annotations

import ctypes
import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from onnx import helper, numpy_helper

from edgec import api, report
from edgec.build import BuildOptions
from edgec.context import BuildContext
from edgec.errors import EdgecError
from edgec.examples import mobilenet_v2, resnet_small, transformer_block
from edgec.frontends import load_model
from edgec.offload import placement_of
from edgec.passes import plan, run_pipeline
from edgec.reference import ReferenceRuntime, Tolerance, compare_outputs
from edgec.runtime.local import load_bundle
from edgec.targets import load_target
from models import ATOL, RTOL, inputs_for, real_model
from verify import assert_close_to_reference, placed, save_onnx

ONEDNN = BuildOptions(offload=("onednn",))
NONE = BuildOptions(offload=())
RNG = np.random.default_rng(3)


def build(model, out, options=ONEDNN, **kw) -> api.BuildResult:
    result = api.build(model, "host", out, options=options, **kw)
    assert result.manifest.verification["status"] == "verified", result.manifest.verification
    return result


def _weight(*shape):
    return (RNG.standard_normal(shape) * 0.2).astype(np.float32)


def conv_zoo(path: Path) -> Path:
    """Every conv2d form the backend takes, a Gemm with bias + ReLU, a residual add before a ReLU, ReLU6 as Clip,
    and one conv whose weights are a model input (refused: packing needs constant weights)."""
    inits, nodes = [], []

    def conv(x, out, cin, cout, k, group=1, **attrs):
        w, b = f"{out}_w", f"{out}_b"
        inits.extend([numpy_helper.from_array(_weight(cout, cin // group, k, k), w),
                      numpy_helper.from_array(_weight(cout), b)])
        nodes.append(helper.make_node("Conv", [x, w, b], [out], group=group, kernel_shape=[k, k], **attrs))
        return out

    lo, hi = numpy_helper.from_array(np.float32(0), "lo"), numpy_helper.from_array(np.float32(6), "hi")
    inits += [lo, hi]
    a = conv("x", "a", 8, 16, 3, pads=[1, 1, 1, 1])                                  # 3x3 padded
    nodes.append(helper.make_node("Clip", [a, "lo", "hi"], ["a6"]))                   # ReLU6
    b = conv("a6", "b", 16, 16, 3, group=16, strides=[2, 2], pads=[0, 1, 1, 0])       # depthwise, strided, asym
    c = conv(b, "c", 16, 16, 3, group=4, dilations=[2, 2], pads=[2, 2, 2, 2])         # grouped, dilated
    d = conv(c, "d", 16, 16, 1)                                                       # 1x1
    nodes += [helper.make_node("Add", [d, b], ["r"]), helper.make_node("Relu", ["r"], ["rr"])]  # residual
    nodes.append(helper.make_node("Conv", ["rr", "wx"], ["e"], pads=[1, 1, 1, 1]))   # runtime weights
    nodes.append(helper.make_node("Flatten", ["e"], ["f"]))
    inits += [numpy_helper.from_array(_weight(10, 16 * 8 * 8), "g_w"), numpy_helper.from_array(_weight(10), "g_b")]
    nodes += [helper.make_node("Gemm", ["f", "g_w", "g_b"], ["g"], transB=1), helper.make_node("Relu", ["g"], ["y"])]
    return save_onnx(path, "conv_zoo", nodes, {"x": [1, 8, 16, 16], "wx": [16, 16, 3, 3]}, {"y": [1, 10]}, inits)


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    return mobilenet_v2(tmp_path_factory.mktemp("models") / "mnv2_small.onnx", width=0.35, resolution=96)


@pytest.fixture(scope="module")
def small_cnn_host(small_cnn, tmp_path_factory):
    return build(small_cnn, tmp_path_factory.mktemp("b") / "small-onednn")


def test_pipeline_has_the_offload_steps_before_legalization():
    steps = plan(BuildContext(load_target("host"), ONEDNN, offload=("onednn",)), "onnx")
    names = [s.name for s in steps if s.enabled]
    wanted = ["offload-restore-clip", "offload-layout", "offload-partition", "lift-params", "offload-codegen",
              "legalize-ops"]
    assert [n for n in names if n in wanted] == wanted
    off = plan(BuildContext(load_target("host"), NONE, offload=()), "onnx")
    assert not any(s.enabled for s in off if s.name.startswith("offload-"))


def test_unknown_backend_is_a_user_error(small_cnn, tmp_path):
    with pytest.raises(EdgecError, match="unknown offload backend 'mkl'"):
        api.build(small_cnn, "host", tmp_path / "b", options=BuildOptions(offload=("mkl",)))


def test_small_cnn_offloaded_matches_reference(small_cnn, small_cnn_host):
    assert placed(small_cnn_host) == {("conv2d", "onednn"): 52, ("matmul", "onednn"): 1}
    patterns = {p.detail for p in small_cnn_host.compiled.offload}
    # ReLU6 (ONNX Clip) and the residual adds are fused into the convolutions
    assert {"onednn.conv2d_bias_clip", "onednn.conv2d_bias_add", "onednn.matmul_bias"} <= patterns
    text = report.build_text(small_cnn_host)
    assert "conv2d x35 -> onednn (onednn.conv2d_bias_clip)" in text
    assert "ships lib/libgomp.so.1, lib/libOpenCL.so.1, lib/libdnnl.so.2" in text
    assert_close_to_reference(small_cnn, small_cnn_host.bundle_dir)
    assert_close_to_reference(small_cnn, small_cnn_host.bundle_dir, emulate=True, expect_mode="native runner")


def test_cnn_offloaded_matches_reference(tmp_path):
    model = mobilenet_v2(tmp_path / "mobilenetv2.onnx")
    result = build(model, tmp_path / "cnn-onednn")
    assert placed(result) == {("conv2d", "onednn"): 52, ("matmul", "onednn"): 1}
    assert_close_to_reference(model, result.bundle_dir)


def test_ppocrv4_det_offloaded_matches_reference(tmp_path):
    model = real_model("ppocrv4_det")
    inputs = inputs_for("ppocrv4_det")
    options = BuildOptions(dump_ir=tmp_path / "ir", offload=("onednn",))
    result = build(model, tmp_path / "det-onednn", options, input_shapes={"x": (1, 3, 320, 320)},
                   sample_inputs=inputs)
    assert placed(result) == {("conv2d", "onednn"): 62, ("conv2d_transpose", "onednn"): 2}
    assert_close_to_reference(model, result.bundle_dir, inputs)
    # whole-graph NHWC: no transpose pairs between offloaded operators, only the input's and the output's
    partitioned = next((tmp_path / "ir").glob("*-offload-partition.py")).read_text()
    assert partitioned.count("R.permute_dims(") == 2


def test_every_conv_form_and_the_refused_one(tmp_path):
    model = conv_zoo(tmp_path / "zoo.onnx")
    inputs = {"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32), "wx": _weight(16, 16, 3, 3)}
    result = build(model, tmp_path / "zoo", sample_inputs=inputs)
    assert placed(result) == {("conv2d", "onednn"): 4, ("matmul", "onednn"): 1, ("conv2d", None): 1}
    refused = [p for p in result.compiled.offload if p.backend is None]
    assert refused[0].detail == "its weights are computed at run time (only constant weights are packed)"
    assert "conv2d x1 -> TVM: its weights are computed at run time" in report.build_text(result)
    patterns = {p.detail for p in result.compiled.offload if p.backend}
    assert {"onednn.conv2d_bias_clip", "onednn.conv2d_bias_add_relu", "onednn.matmul_bias_relu"} <= patterns
    assert_close_to_reference(model, result.bundle_dir, inputs)


def test_transposed_convolutions_and_the_refused_one(tmp_path):
    """ConvTranspose as oneDNN's deconvolution (NCHW): strided, padded with output padding, dilated, then a ReLU;
    a grouped one stays in TVM with its reason. The bias add stays a TVM kernel (NCHW: not per last axis)."""
    path = tmp_path / "deconv.onnx"
    inits = [numpy_helper.from_array(_weight(8, 6, 3, 3), "w1"), numpy_helper.from_array(_weight(6), "b1"),
             numpy_helper.from_array(_weight(6, 4, 2, 2), "w2"), numpy_helper.from_array(_weight(4, 2, 3, 3), "w3")]
    nodes = [helper.make_node("ConvTranspose", ["x", "w1", "b1"], ["a"], strides=[2, 2], pads=[1, 1, 1, 1],
                              output_padding=[1, 1]),
             helper.make_node("Relu", ["a"], ["ar"]),
             helper.make_node("ConvTranspose", ["ar", "w2"], ["b"], strides=[2, 2], dilations=[2, 2]),
             helper.make_node("ConvTranspose", ["b", "w3"], ["y"], group=2, pads=[1, 1, 1, 1])]
    save_onnx(path, "deconv", nodes, {"x": [1, 8, 5, 5]}, {"y": [1, 4, 21, 21]}, inits)
    inputs = {"x": RNG.standard_normal((1, 8, 5, 5)).astype(np.float32)}
    result = build(path, tmp_path / "deconv", sample_inputs=inputs)
    assert placed(result) == {("conv2d_transpose", "onednn"): 2, ("conv2d_transpose", None): 1}, placed(result)
    refused = [p for p in result.compiled.offload if p.backend is None]
    assert refused[0].detail == "2 groups (one group only)"
    assert_close_to_reference(path, result.bundle_dir, inputs)


def test_offload_none_makes_no_external_calls(small_cnn, tmp_path):
    result = build(small_cnn, tmp_path / "plain", options=NONE)
    assert result.compiled.offload is None and report.build_json(result)["offload"] is None
    assert result.manifest.shared_libs == () and not (result.bundle_dir / "lib").exists()
    assert "dnnl" not in subprocess.run(["ldd", result.bundle_dir / "model.so"], capture_output=True,
                                        text=True).stdout
    symbols = subprocess.run(["nm", "-D", "--defined-only", result.bundle_dir / "model.so"], capture_output=True,
                             text=True).stdout
    assert "onednn" not in symbols


def test_copied_bundle_runs_on_its_shipped_library(small_cnn, small_cnn_host, tmp_path):
    copy = Path(shutil.copytree(small_cnn_host.bundle_dir, tmp_path / "elsewhere" / "bundle"))
    manifest = small_cnn_host.manifest
    assert manifest.shared_libs == ("lib/libgomp.so.1", "lib/libOpenCL.so.1", "lib/libdnnl.so.2")
    assert all(rel in manifest.files for rel in manifest.shared_libs)
    # each library's license notice travels with it, from the Debian package that installed the library
    for rel in manifest.shared_libs:
        assert f"{rel}.copyright" in manifest.files and "Copyright" in (copy / f"{rel}.copyright").read_text()
    # loaded from the bundle directly, the model library finds its libraries in lib/
    ldd = subprocess.run(["ldd", copy / "model.so"], capture_output=True, text=True).stdout
    for lib in ("libdnnl.so.2", "libgomp.so.1", "libOpenCL.so.1"):
        assert f"{lib} => {copy}/./lib/{lib}" in ldd or f"{lib} => {copy}/lib/{lib}" in ldd, ldd
    # run.py loads the shipped bytes, never the system's libdnnl
    script = ("import sys; from edgec.runtime.local import load_bundle; m = load_bundle(sys.argv[1]); "
              "m.run(m.sample('inputs')); "
              "print('\\n'.join(l for l in open('/proc/self/maps') if 'libdnnl' in l))")
    maps = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, check=True).stdout
    assert "libdnnl" in maps and "/usr/lib" not in maps and "/lib/x86_64" not in maps, maps
    assert_close_to_reference(small_cnn, copy)
    assert_close_to_reference(small_cnn, copy, emulate=True, expect_mode="native runner")


def test_one_library_two_weight_sets_concurrently(tmp_path):
    """One bundle's library with two sets of weights: the second bundle is the first with the params and expected
    outputs of another build (other weights, same architecture), so the process loads the code once and only each
    Model's own state (made by main_load at load) tells the weights apart. Each bundle loaded twice, all four run
    at once in threads, and one Model is also run from two threads (its runs take turns): every output matches
    onnxruntime's (the sample's expected outputs)."""
    import json

    from edgec.manifest import FileEntry

    # every weight of at least 16 values, so that all of them are in params.bin (smaller ones stay in the code)
    models = [resnet_small(tmp_path / f"m{seed}.onnx", depth=8, num_classes=16, seed=seed) for seed in (1, 2)]
    first, other = (build(m, tmp_path / f"b{i}") for i, m in enumerate(models))
    assert first.manifest.load_function == "main_load"
    swapped = Path(shutil.copytree(first.bundle_dir, tmp_path / "swapped"))
    manifest = json.loads((swapped / "manifest.json").read_text())
    for rel in ["params.bin", *(f"sample/expected/{t.file}" for t in other.manifest.outputs)]:
        shutil.copyfile(other.bundle_dir / rel, swapped / rel)
        manifest["files"][rel] = vars(FileEntry.of(swapped / rel))
    (swapped / "manifest.json").write_text(json.dumps(manifest))
    bundles = [first.bundle_dir, swapped]
    loaded = [load_bundle(b, threads=2) for b in bundles * 2]
    expected = [m.sample("expected") for m in loaded]
    # the same sample inputs (seeded) with the other build's expected outputs
    assert all(np.array_equal(a, loaded[1].sample("inputs")[n]) for n, a in loaded[0].sample("inputs").items())
    assert not compare_outputs(expected[0], expected[1], Tolerance(ATOL, RTOL)).ok   # the weights do differ
    failures, runs = [], []

    def worker(model):
        inputs, reference = model.sample("inputs"), model.sample("expected")
        for _ in range(6):
            comparison = compare_outputs(model.run(inputs), reference, Tolerance(ATOL, RTOL))
            runs.append(1)
            if not comparison.ok:
                failures.append(comparison)

    threads = [threading.Thread(target=worker, args=(m,)) for m in loaded + loaded[:1]]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(runs) == 30 and not failures


class _DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p), ("sname", ctypes.c_char_p),
                ("saddr", ctypes.c_void_p)]


def _parallel_launch_owner(bundle: Path) -> tuple[str, str]:
    """(the file whose code the loaded model library's TVM kernels start their parallel loops with, that library's
    file): run.py loads a private copy named by its digest, found in this process's mappings."""
    model = load_bundle(bundle, threads=2)
    assert compare_outputs(model.run(model.sample("inputs")), model.sample("expected"), Tolerance(ATOL, RTOL)).ok
    digest = hashlib.sha256((bundle / "model.so").read_bytes()).hexdigest()
    with open("/proc/self/maps") as f:
        path = next(line.split()[5] for line in f if line.rstrip().split("/")[-1].startswith(f"{digest}.so"))
    library = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
    launch = ctypes.c_void_p.in_dll(library, "__TVMBackendParallelLaunch").value
    info = _DlInfo()
    assert ctypes.CDLL(None).dladdr(ctypes.c_void_p(launch), ctypes.byref(info))
    return info.fname.decode(), path


def test_tvm_kernels_run_on_the_onednn_team(tmp_path):
    """One thread pool per process: once the load function ran, the parallel loops of the TVM kernels left in an
    offloaded model (the sigmoid, the layout transpose) start on oneDNN's OpenMP team, through the launch function
    linked into the model library, not on TVM's pool, which an --offload none build keeps. A team smaller than
    asked (OMP_THREAD_LIMIT=1, as in a nested region) splits each loop for the threads it has: still correct."""
    inits = [numpy_helper.from_array(_weight(32, 16, 3, 3), "w"), numpy_helper.from_array(_weight(32), "b")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Sigmoid", ["c"], ["y"])]
    model = save_onnx(tmp_path / "conv_sigmoid.onnx", "conv_sigmoid", nodes, {"x": [1, 16, 64, 64]},
                      {"y": [1, 32, 64, 64]}, inits)
    offloaded, plain = build(model, tmp_path / "onednn"), build(model, tmp_path / "plain", options=NONE)
    assert placed(offloaded) == {("conv2d", "onednn"): 1}
    for result in (offloaded, plain):   # both have parallel TVM kernels
        symbols = subprocess.run(["nm", "-D", result.bundle_dir / "model.so"], capture_output=True, text=True).stdout
        assert " V __TVMBackendParallelLaunch" in symbols
    owner, library = _parallel_launch_owner(offloaded.bundle_dir)
    assert owner == library
    owner, library = _parallel_launch_owner(plain.bundle_dir)
    assert owner != library and "libtvm_runtime" in owner
    check = subprocess.run([sys.executable, "run.py", "--check", "--threads", "2"], cwd=offloaded.bundle_dir,
                           env={**os.environ, "OMP_THREAD_LIMIT": "1"}, capture_output=True, text=True)
    assert check.returncode == 0 and "check: ok" in check.stdout, check.stdout + check.stderr


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: a pin to it changes nothing")
def test_offloaded_bundle_leaves_its_threads_on_every_core(small_cnn_host):
    """TVM's pool pins the thread that starts it to the first THREADS cores, and OpenMP's team, started from that
    thread, inherits the pin: beside busy processes on those cores the whole model shared them while other cores
    idled (MobileNetV2 int8, 4 threads on a 16-core Xeon beside 12 busy processes: 4.9-12.7 ms, unpinned 1.5-2.0). A
    bundle with offload libraries tells TVM's pool not to pin (TVM_BIND_THREADS=0, as edgec_run does): after a run on
    one thread, the thread that ran it may still run on every core the process was given."""
    script = ("import os, run; m = run.Model('.', threads=1); m.run(m.sample('inputs')); "
              "print(sorted(os.sched_getaffinity(0)))")
    env = {k: v for k, v in os.environ.items() if k != "TVM_BIND_THREADS"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=small_cnn_host.bundle_dir, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == str(sorted(os.sched_getaffinity(0)))


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: no other core to keep the team on")
def test_openmp_team_keeps_off_the_calling_threads_cpu_which_stays_unpinned(small_cnn_host):
    """After a pause the calling thread could wake on its OpenMP worker's CPU and the worker join it there, every
    region then running its halves in turn on one core (MobileNetV2 on 2 cores, a run every 33 ms: 11.0-11.4 ms
    against 4.0 back to back, and 5.9-6.0 kept apart). The library keeps the team's workers off the CPU the caller
    runs on; the caller itself is never pinned."""
    script = ("import json, os, run\n"
              "m = run.Model('.', threads=2); x = m.sample('inputs'); [m.run(x) for _ in range(3)]\n"
              "def allowed(tid):\n"
              "    with open(f'/proc/self/task/{tid}/status') as f:\n"
              "        return next(ln.split(':')[1].strip() for ln in f if ln.startswith('Cpus_allowed_list'))\n"
              "print(allowed(os.getpid())); print(json.dumps([allowed(t) for t in os.listdir('/proc/self/task')]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "GOMP_"))}
    proc = subprocess.run([sys.executable, "-c", script], cwd=small_cnn_host.bundle_dir, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    caller, masks = proc.stdout.split("\n")[:2]
    every = sorted(os.sched_getaffinity(0))
    assert caller == _cpu_list(every)
    assert any(mask == _cpu_list([c for c in every if c != cpu]) for cpu in every for mask in json.loads(masks)), masks


def _cpu_list(cpus: list[int]) -> str:
    """The kernel's Cpus_allowed_list form of `cpus` (ascending): ranges as 0-3, joined by commas."""
    runs, start = [], None
    for i, cpu in enumerate(cpus):
        start = cpu if start is None else start
        if i + 1 == len(cpus) or cpus[i + 1] != cpu + 1:
            runs.append(str(start) if start == cpu else f"{start}-{cpu}")
            start = None
    return ",".join(runs)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def test_call_site_functions_refuse_wrong_arguments_in_one_error(small_cnn_host):
    """The C ABI run and _pack functions of each call site (backend.exported) check their argument count and the
    state's type and raise TVM's error, never crash: a wrong call is one exception in the caller."""
    import tvm

    library = small_cnn_host.bundle_dir / "model.so"
    symbols = subprocess.run(["nm", "-D", "--defined-only", library], capture_output=True, text=True,
                             check=True).stdout.split()
    classifier = "onednn_matmul_bias_0"      # the matmul + bias: (state, data, out)
    assert f"__tvm_ffi_{classifier}" in symbols and f"__tvm_ffi_{classifier}_pack" in symbols
    module = tvm.runtime.load_module(str(library))
    run, pack = (module.get_function(name, query_imports=True) for name in (classifier, classifier + "_pack"))
    tensor = tvm.runtime.tensor(np.zeros(4, np.float32))
    with pytest.raises(TypeError, match=f"{classifier} takes 3 arguments, not 0"):
        run()
    with pytest.raises(TypeError, match=f"{classifier}_pack takes 2 arguments, not 1"):   # weights and bias
        pack(tensor)
    with pytest.raises(TypeError, match="a state its _pack function did not make"):
        run(tensor, tensor, tensor)


def test_loading_and_dropping_models_frees_their_state(small_cnn_host):
    """Each Model's packed weights and primitives go with it: loading, running and dropping one 30 more times
    grows the process by less than half of what keeping each load's state would (at least the params' size per
    load: 30 x 1.7 MB here). Measured for MobileNetV2 (14 MB of weights): flat at 256 MB over 80 loads."""
    import gc

    bundle = small_cnn_host.bundle_dir
    per_load = (bundle / "params.bin").stat().st_size / 2**20

    def cycle():
        model = load_bundle(bundle, threads=2)
        outputs = model.run(model.sample("inputs"))
        assert compare_outputs(outputs, model.sample("expected"), Tolerance(ATOL, RTOL)).ok
        del model
        gc.collect()

    for _ in range(10):   # allocator arenas, thread pools and thread-local scratch reach their steady state
        cycle()
    before = _rss_mb()
    for _ in range(30):
        cycle()
    grown = _rss_mb() - before
    assert per_load > 1 and grown < 30 * per_load / 2, (grown, per_load)


def test_transformer_block_matches_reference(tmp_path):
    """Attention and an MLP: the default host build verifies, and the summary places every matrix product."""
    model = transformer_block(tmp_path / "block.onnx")
    result = build(model, tmp_path / "block")
    assert_close_to_reference(model, result.bundle_dir, {"x": RNG.standard_normal((1, 16, 64)).astype(np.float32)})
    where = placed(result)
    matmuls = {backend: n for (op, backend), n in where.items() if "matmul" in op}
    assert sum(matmuls.values()) == 8, where       # q, k, v, out, fc1, fc2 projections and the two attention products
    # 16 tokens: the attention products are too small for a library call to pay
    assert [(p.detail, p.count) for p in result.compiled.offload if p.backend is None] == [
        ("a 1x4x16x16 by 1x4x16x16 matmul is too small to pay for a library call (16K multiply-adds < 64K)", 2)]
    print(report.build_text(result))
    # one loaded model, runs in a row: each run's inputs reach the bound input tensors, and the outputs handed back
    # are copies that the next run (reusing the VM's buffers and oneDNN's per-thread memory objects) leaves alone
    loaded, reference = load_bundle(result.bundle_dir), ReferenceRuntime(model)
    xs = [RNG.standard_normal((1, 16, 64)).astype(np.float32) * scale for scale in (1, 3, 0.1)]
    outputs = [loaded.run({"x": x}) for x in xs]
    for x, out in zip(xs, outputs):
        assert compare_outputs(out, reference.run({"x": x}), Tolerance(ATOL, RTOL)).ok


def test_resnet_small_fuses_the_residual_adds(tmp_path):
    """A CIFAR ResNet-20: every convolution goes to oneDNN, and each block's second conv carries its residual add
    and ReLU as post-ops (nine blocks), so no add or ReLU of a block is left to a TVM kernel."""
    model = resnet_small(tmp_path / "resnet.onnx")
    result = build(model, tmp_path / "resnet")
    assert_close_to_reference(model, result.bundle_dir, {"input": RNG.standard_normal((1, 3, 32, 32)).astype(np.float32)})
    where = placed(result)
    assert where == {("conv2d", "onednn"): 21, ("matmul", "onednn"): 1}, where
    fused = [p for p in report.build_json(result)["offload"] if p["detail"].endswith("_add_relu")]
    assert sum(p["count"] for p in fused) == 9, report.build_text(result)


def test_attention_products_with_enough_tokens_go_to_onednn(tmp_path):
    """64 tokens: Q.K^T and attn.V (4-D by 4-D, both operands computed at run time) run as oneDNN matmuls."""
    model = transformer_block(tmp_path / "block.onnx", tokens=64)
    result = build(model, tmp_path / "block")
    assert placed(result) == {("matmul", "onednn"): 8}, report.build_text(result)
    assert sum(p.count for p in result.compiled.offload if p.detail == "onednn.bmm") == 2, report.build_text(result)
    assert_close_to_reference(model, result.bundle_dir, {"x": RNG.standard_normal((1, 64, 64)).astype(np.float32)})


def test_xnnpack_keeps_attention_products_in_tvm(tmp_path):
    """Placement only (partitioned for rpi4, not run): the projections go to XNNPACK, the attention products stay."""
    model = transformer_block(tmp_path / "block.onnx", tokens=64)
    ctx = BuildContext(load_target("rpi4"), BuildOptions(offload=("xnnpack",)), offload=("xnnpack",))
    steps = plan(ctx, "onnx")
    steps = steps[:[s.name for s in steps].index("offload-partition") + 1]
    imported = load_model(model, import_steps=tuple(s.name for s in steps if s.phase == "import" and s.enabled))
    with ctx.tvm_target():
        mod, _ = run_pipeline(imported.mod, steps, ctx)
    refused = [(p.detail, p.count) for p in placement_of(mod) if p.backend is None]
    assert refused == [("its second operand is computed at run time (Debian's 2022 XNNPACK has no batched matmul; its "
                        "fully connected operator packs constant weights)", 2)]
    assert sum(p.count for p in placement_of(mod) if p.backend == "xnnpack") == 6
