"""The bundle's C++ runner edgec_run (templates/bundle/main.cc), built by edgec.toolchain and driven by
edgec.runtime.native.

Builds a tiny two-input, two-output ONNX model into bundles for the host and for rpi4, runs them through the
C++ runner natively and under qemu-user (cross/setup-aarch64.sh installs the tools), and feeds edgec_run bad
inputs, broken manifests and tampered bundles: each must end in one line on stderr and exit code 2."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec import toolchain
from edgec.errors import EdgecError
from edgec.manifest import Manifest
from edgec.resources import data_dir
from edgec.runtime.native import run_with_runner
from edgec.signature import TensorSpec, random_inputs
from edgec.toolchain import build_runner, emulator_command, find_tool, host_arch
from tamper_cases import CASES, MENTIONS

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


def edit_manifest(bundle: Path, edit) -> None:
    """Apply edit(manifest dict) to the bundle's manifest.json."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    edit(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def relist(bundle: Path, *rels: str) -> None:
    """Record the current size and sha256 of these files in the manifest, as a careful tamperer would."""
    def edit(m):
        for rel in rels:
            data = (bundle / rel).read_bytes()
            m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    edit_manifest(bundle, edit)


def run_runner(runner: Path, bundle: Path, out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(runner), "-d", str(bundle), "-o", str(out), *args], capture_output=True, text=True)


def assert_refused(proc: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and the error as the last line on stderr (only a --no-verify warning may come before it)."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines and lines[-1].startswith("edgec_run: error: ") and message in lines[-1], proc.stderr
    assert len(lines) == 1 or (len(lines) == 2 and lines[0].startswith("edgec_run: warning: --no-verify")), lines


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
def runner(host_bundle) -> Path:
    return build_runner(host_bundle, Manifest.load(host_bundle).target)


@pytest.fixture
def bundle_copy(host_bundle, tmp_path) -> Path:
    return Path(shutil.copytree(host_bundle, tmp_path / "bundle"))


@pytest.fixture(scope="module")
def reference(model, feeds, host_bundle) -> dict[str, dict[str, np.ndarray]]:
    """Outputs of onnxruntime and of the in-process relax.VirtualMachine on the host bundle's library."""
    import tvm
    from tvm import relax

    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ort_out = dict(zip([s.name for s in OUTPUTS], sess.run([s.name for s in OUTPUTS], feeds)))

    vm = relax.VirtualMachine(tvm.runtime.load_module(str(host_bundle / "model.so")), tvm.cpu())
    params = tvm.runtime.load_param_dict_from_file(str(host_bundle / "params.bin"))
    # the weights go to the manifest's load function (offload: it packs them) when it names one, else to main
    load = Manifest.load(host_bundle).load_function
    takes, first = (load, 0) if load else ("main", len(INPUTS))
    weights = [params[vm.module["get_function_param_name"](takes, i)]
               for i in range(first, vm.module["get_function_arity"](takes))]
    args = [tvm.runtime.tensor(feeds[s.name]) for s in INPUTS] + (list(vm[load](*weights)) if load else weights)
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


# ------------------------------------------------------------------------------------------ running

def test_host_runner_matches_vm_and_onnxruntime(host_bundle, feeds, reference):
    before = dir_digest(host_bundle)
    res = run_with_runner(host_bundle, feeds, repeat=3, warmup=1)
    assert_matches(res.outputs, reference)
    assert not res.emulated and "edgec_run" in res.command[0]
    assert res.load_ms > 0 and res.first_ms > 0 and 0 < res.min_ms <= res.median_ms
    assert 1 << 20 < res.peak_rss_bytes < 1 << 30
    assert res.threads == Manifest.load(host_bundle).target.device.threads, "threads default to the manifest's"
    assert run_with_runner(host_bundle, feeds, threads=1).threads == 1
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


def test_runner_sources_are_static_and_built_once(host_bundle, runner, monkeypatch):
    """main.cc and CMakeLists.txt are the template's bytes in every bundle, so one build serves every bundle."""
    for name in toolchain.RUNNER_SOURCES:
        assert (host_bundle / name).read_bytes() == (data_dir("templates") / "bundle" / name).read_bytes()
    mtime = runner.stat().st_mtime_ns

    def no_build(*args, **kwargs):
        raise AssertionError(f"a cached runner was rebuilt: {args}")

    monkeypatch.setattr(toolchain.subprocess, "run", no_build)
    assert build_runner(host_bundle, Manifest.load(host_bundle).target) == runner
    assert runner.stat().st_mtime_ns == mtime


def test_runner_compile_error_shows_compiler_output(host_bundle, tmp_path):
    broken = Path(shutil.copytree(host_bundle, tmp_path / "broken"))
    (broken / "main.cc").write_text((broken / "main.cc").read_text() + "\nint broken_line = ;\n")
    with pytest.raises(EdgecError, match=r"building the .* runner failed:(.|\n)*error"):
        build_runner(broken, Manifest.load(broken).target)


def test_wrong_input_shape_is_rejected_before_running(host_bundle, feeds):
    bad = dict(feeds, x=np.zeros((1, 3, 4, 4), np.float32))
    with pytest.raises(EdgecError, match=r"\[1, 3, 4, 4\].*\[1, 3, 8, 8\]"):
        run_with_runner(host_bundle, bad)
    with pytest.raises(EdgecError, match="do not match the model's inputs"):
        run_with_runner(host_bundle, {"x": feeds["x"]})


def test_runner_writes_outputs_by_manifest_file_names(host_bundle, runner, feeds, tmp_path):
    paths = []
    for spec in INPUTS:
        paths.append(str(tmp_path / f"{spec.name}.npy"))
        np.save(paths[-1], feeds[spec.name])
    proc = run_runner(runner, host_bundle, tmp_path / "out", "-t", "1", *paths)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.startswith("edgec_run: load_ms=") and proc.stdout.strip().endswith("threads=1")
    outputs = json.loads((host_bundle / "manifest.json").read_text())["outputs"]
    assert [o["file"] for o in outputs] == ["0-features.npy", "1-logits_out_0.npy"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [o["file"] for o in outputs]


def test_runner_runs_the_sample_without_inputs(host_bundle, runner, tmp_path):
    proc = run_runner(runner, host_bundle, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    m = json.loads((host_bundle / "manifest.json").read_text())
    for spec in m["outputs"]:
        expected = np.load(host_bundle / m["sample"]["expected"] / spec["file"])
        np.testing.assert_allclose(np.load(tmp_path / "out" / spec["file"]), expected, rtol=1e-4, atol=1e-5)


def test_manifest_cannot_start_more_threads_than_cores(bundle_copy, runner, tmp_path):
    edit_manifest(bundle_copy, lambda m: m["target"]["device"].update(threads=100000))
    proc = run_runner(runner, bundle_copy, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(f"threads={os.cpu_count()}")


# ------------------------------------------------------------------------------------------ bad inputs

def npy_bytes(array: np.ndarray) -> bytes:
    import io

    f = io.BytesIO()
    np.save(f, array)
    return f.getvalue()


def with_header(header: str, data: bytes = b"", version: int = 1) -> bytes:
    """A .npy file with this header text (padded as numpy pads it) and data."""
    text = header.encode("latin1")
    text += b" " * (63 - (len(text) + (10 if version == 1 else 12)) % 64) + b"\n"
    size = len(text).to_bytes(2 if version == 1 else 4, "little")
    return b"\x93NUMPY" + bytes([version, 0]) + size + text + data


X_DATA = bytes(4 * 3 * 8 * 8)
BAD_INPUTS = {
    "shape": (lambda f: npy_bytes(np.zeros((1, 3, 4, 4), np.float32)), "has shape [1, 3, 4, 4], the model expects [1, 3, 8, 8]"),
    "dtype": (lambda f: npy_bytes(f["x"].astype(np.float64)), "has dtype float64, the model expects float32"),
    "big_endian": (lambda f: npy_bytes(f["x"].astype(">f4")), "unsupported dtype '>f4'"),
    "fortran": (lambda f: npy_bytes(np.asfortranarray(f["x"])), "Fortran-order"),
    "garbage": (lambda f: b"not numpy", "not a .npy file"),
    "truncated": (lambda f: npy_bytes(f["x"])[:-4], "data size does not match"),
    "missing": (None, "cannot open input file"),
    "pickled": (lambda f: npy_bytes(np.array([{"a": 1}], dtype=object)), "unsupported dtype '|O'"),
    "huge_header_len": (lambda f: b"\x93NUMPY\x02\x00\xff\xff\xff\xff{'descr'", "too long"),
    "header_past_eof": (lambda f: b"\x93NUMPY\x01\x00\xff\x7f{'descr': '<f4'", "truncated .npy header"),
    "absurd_shape": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999, 99999999, 99999999), }", X_DATA),
                     "has shape [99999999, 99999999, 99999999]"),
    "overflowing_dim": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }"),
                        "too large"),
    "negative_dim": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (-1, 3), }"),
                     "non-negative integers"),
    "non_numeric_dim": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1, 'a'), }"),
                        "non-negative integers"),
    "too_many_dims": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (" + "1," * 40 + "), }"),
                      "more than 32 dimensions"),
    "unterminated_quote": (lambda f: with_header("{'descr': '<f4, 'fortran_order': False, 'shape': (1,), }"),
                           "not a valid .npy file"),
    "unterminated_string_at_end": (lambda f: with_header("{'descr': '<f4"), "unterminated string"),
    "no_shape": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, }"), "needs 'descr'"),
    "duplicate_key": (lambda f: with_header("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (1,), }"),
                      "appears twice"),
    "unknown_key": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': 1}"),
                    "unexpected key 'x'"),
    "version_9": (lambda f: b"\x93NUMPY\x09\x00" + npy_bytes(f["x"])[8:], "unsupported .npy format version 9"),
    "version_3_ok_header_wrong_shape": (lambda f: with_header("{'descr': '<f4', 'fortran_order': False, 'shape': (3,), }",
                                                              bytes(12), version=3), "has shape [3]"),
}


@pytest.mark.parametrize("case", [*BAD_INPUTS, "count"])
def test_runner_rejects_bad_inputs(host_bundle, runner, feeds, tmp_path, case):
    """The C++ runner's own checks, hostile .npy headers included: one line on stderr, exit code 2."""
    x, offset = tmp_path / "x.npy", tmp_path / "offset.npy"
    np.save(offset, feeds["offset"])
    make, message = BAD_INPUTS.get(case, (lambda f: npy_bytes(f["x"]), "expected 2 input .npy files (x, offset), got 1"))
    if make is not None:
        x.write_bytes(make(feeds))
    args = [str(x)] if case == "count" else [str(x), str(offset)]
    assert_refused(run_runner(runner, host_bundle, tmp_path / "out", *args), message)
    assert not (tmp_path / "out").exists(), "nothing is written for refused inputs"


# ------------------------------------------------------------------------------------------ bad bundles

def test_runner_sha256_matches_hashlib(bundle_copy, runner, tmp_path):
    """Files around SHA-256's 64-byte block and 56-byte padding boundaries, listed with hashlib's digests."""
    sizes = [0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 1000, (1 << 20) + 7]
    rng = np.random.default_rng(0)
    for n in sizes:
        (bundle_copy / "extra").mkdir(exist_ok=True)
        (bundle_copy / "extra" / f"{n}.bin").write_bytes(rng.integers(0, 256, n, dtype=np.uint8).tobytes())
    relist(bundle_copy, *(f"extra/{n}.bin" for n in sizes))
    proc = run_runner(runner, bundle_copy, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    edit_manifest(bundle_copy, lambda m: m["files"]["extra/56.bin"].update(sha256="0" * 64))
    assert_refused(run_runner(runner, bundle_copy, tmp_path / "out"), "extra/56.bin does not match its sha256")


def _other_device(kind: str):
    return lambda bundle: edit_manifest(bundle, lambda m: m["target"]["device"].update(kind=kind))


BROKEN_BUNDLES = {
    "garbage_manifest": (lambda b: (b / "manifest.json").write_bytes(b"\x00\xffnot json"), "not valid JSON"),
    "deeply_nested_manifest": (lambda b: (b / "manifest.json").write_text("[" * 200000), "nested deeper than 32"),
    "no_manifest": (lambda b: (b / "manifest.json").unlink(), "cannot open bundle manifest"),
    "library_not_listed": (lambda b: edit_manifest(b, lambda m: m.update(library="other.so")),
                           "'other.so' is not listed in 'files'"),
    "output_file_outside": (lambda b: edit_manifest(b, lambda m: m["outputs"][0].update(file="../0-x.npy")),
                            "'outputs[0].file' is not a tensor file name"),
    "huge_shape": (lambda b: edit_manifest(b, lambda m: m["inputs"][0].update(shape=[2 ** 62, 2 ** 62])),
                   "too large to hold"),
    "compiler_with_path": (lambda b: edit_manifest(b, lambda m: m["target"]["toolchain"].update(compiler="/tmp/cc")),
                           "'target.toolchain.compiler' is not a bare command name"),
    "entry_from_manifest": (lambda b: edit_manifest(b, lambda m: m.update(entry="nonexistent")),
                            "has no function 'nonexistent'"),
    "device_from_manifest": (_other_device("cuda"), "no cuda device"),
    "unknown_device": (_other_device("tpu"), "'target.device.kind' is not one of"),
    "output_shape_mismatch": (lambda b: edit_manifest(b, lambda m: m["outputs"][1].update(shape=[1, 11])),
                              "the manifest says float32[1, 11]"),
}


@pytest.mark.parametrize("case", BROKEN_BUNDLES)
def test_runner_refuses_broken_bundles(bundle_copy, runner, tmp_path, case):
    """Garbage, truncated or inconsistent manifests and libraries: one line on stderr, exit code 2, no crash."""
    break_it, message = BROKEN_BUNDLES[case]
    break_it(bundle_copy)
    assert_refused(run_runner(runner, bundle_copy, tmp_path / "out"), message)


def _states(*pairs, initial="params.bin"):
    """A manifest "states" entry over the tiny model's tensors (its params file stands in for the initial values)."""
    return lambda bundle: edit_manifest(bundle, lambda m: m.update(states={
        "initial": initial, "pairs": [{"name": f"s{i}", "input": a, "output": b} for i, (a, b) in enumerate(pairs)]}))


BROKEN_STATES = {
    "unknown_input": (_states(("nope", "features")), ("states.pairs[0].input", "not a tensor of the model"),
                      "names an input or output the model does not have"),
    "shapes_differ": (_states(("x", "features")), ("different shapes or dtypes",), "different shapes or dtypes"),
    "initial_not_listed": (_states(initial="states.bin"), ("'states.bin' is not listed",), "'states.bin' is not listed"),
    "initial_outside": (_states(initial="../states.bin"), ("'states.initial' is not a relative",),
                        "'states.initial' is not a relative"),
}


@pytest.mark.parametrize("case", BROKEN_STATES)
def test_runners_refuse_inconsistent_states(bundle_copy, runner, tmp_path, case):
    """A manifest's "states" is checked by both runners before anything is loaded: every pair names an input and
    an output of one shape and dtype, the initial values' file is a listed bundle file."""
    break_it, cpp_words, py_words = BROKEN_STATES[case]
    break_it(bundle_copy)
    proc = run_runner(runner, bundle_copy, tmp_path / "out", "--stream")
    assert_refused(proc, "")
    assert all(w in proc.stderr for w in cpp_words), proc.stderr
    with pytest.raises(EdgecError, match=re.escape(py_words)):
        Manifest.load(bundle_copy)


def test_runners_stream_only_a_stateful_model(host_bundle, runner, tmp_path):
    assert_refused(run_runner(runner, host_bundle, tmp_path / "out", "--stream"), "the model keeps no state")
    from edgec import api

    with pytest.raises(EdgecError, match="keeps no state"):
        api.load(host_bundle).stream({"x": np.zeros((1, 3, 8, 8), np.float32)})


@pytest.mark.parametrize("verify", [True, False], ids=["verify", "no-verify"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_runner_refuses_tampered_bundles(host_bundle, runner, tmp_path, case, verify):
    """Every shared tamper case (tests/tamper_cases.py) is refused before anything is loaded, naming what is
    wrong; --no-verify lets through only what a sha256 alone detects."""
    copy = Path(shutil.copytree(host_bundle, tmp_path / "tampered", symlinks=True))
    CASES[case](copy)
    proc = run_runner(runner, copy, tmp_path / "out", *([] if verify else ["--no-verify"]))
    if not verify and "sha256" in MENTIONS[case]:
        # what then happens to a changed library or weights is the user's risk: a crash is possible
        assert proc.stderr.startswith("edgec_run: warning: --no-verify: not checking the sha256"), proc.stderr
        assert "does not match its sha256" not in proc.stderr
        return
    assert_refused(proc, "")
    assert all(word in proc.stderr for word in MENTIONS[case]), f"{proc.stderr!r} lacks one of {MENTIONS[case]}"
    assert not (tmp_path / "out").exists()


def test_runner_decodes_escaped_manifest_strings(bundle_copy, runner, tmp_path):
    """File names written as JSON escapes (2-, 3- and 4-byte UTF-8, a surrogate pair, a tab) name real files."""
    names = ["extra/\u00e9", "extra/\u20ac", "extra/\U0001f600", "extra/tab\tname", "extra/quote\"name"]
    (bundle_copy / "extra").mkdir()
    for name in names:
        (bundle_copy / name).write_bytes(name.encode())
    relist(bundle_copy, *names)
    assert "\\ud83d\\ude00" in (bundle_copy / "manifest.json").read_text(), "json.dumps escapes non-ASCII"
    proc = run_runner(runner, bundle_copy, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr


# ------------------------------------------------------------------------------------------ toolchain

def test_emulator_command_takes_only_what_exists(host_bundle, aarch64_bundle, tmp_path):
    assert emulator_command(Manifest.load(host_bundle).target) == []
    target = Manifest.load(aarch64_bundle).target
    command = emulator_command(target)
    assert Path(command[0]).is_absolute() and command[1:] == ["-L", target.emulator.sysroot]
    gone = dataclasses.replace(target, emulator=dataclasses.replace(target.emulator, sysroot=str(tmp_path / "none")))
    with pytest.raises(EdgecError, match="sysroot .* does not exist"):
        emulator_command(gone)
    with pytest.raises(EdgecError, match="names no emulator"):
        emulator_command(dataclasses.replace(target, emulator=None))


def test_find_tool_reports_the_apt_package():
    with pytest.raises(EdgecError) as e:
        find_tool("edgec-no-such-tool", "edgec-pkg")
    assert e.value.message == "edgec-no-such-tool not found"
    assert e.value.hint == "install it with: sudo apt-get install edgec-pkg"
    assert find_tool("sh", "dash").startswith("/")
