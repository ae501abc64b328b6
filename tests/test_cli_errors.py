"""Bad input through the real CLI: one `error: <message>; <hint>` line on stderr, exit code 2, no traceback.

Every case goes through `edgec.cli:main` with click's CliRunner (click 8.2+ keeps stderr apart from stdout:
`result.stderr`, `result.stdout`); a few also run `python -m edgec.cli` in a real process to prove that the
installed entry point behaves the same. `edgec --verbose ...` is the one way to get a traceback.

Builds are few: one module-scoped host bundle of a tiny Conv+Relu model serves every `edgec run` case; the
others that get as far as linking are the missing compiler, the positive TFLite control, -o at a file and the
memory budget. A full disk and a read-only directory are real: a tmpfs and a read-only bind mount in a private
mount namespace (`unshare -Urm`), skipped where the kernel allows no user namespaces.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgec.cli import main

REPO = Path(__file__).resolve().parents[1]
RPI4_TOML = REPO / "targets" / "rpi4.toml"
HOST_TOML = REPO / "targets" / "host.toml"
SHAPE = (1, 3, 8, 8)
USER_ERROR = 2


# --------------------------------------------------------------------------------------------- models

def _save(graph: onnx.GraphProto, path: Path) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def conv_relu_onnx(path: Path, seed: int = 0, batch: int | str = 1) -> Path:
    """x[batch,3,8,8] -> Conv(4, 3x3, pad 1) -> Relu -> y; `batch` may be a symbolic dim name."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.2).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv_relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4, 8, 8])], inits)
    return _save(graph, path)


def tiny_onnx(path: Path, nodes, inputs=(("x", [1, 4]),), outputs=(("y", [1, 4]),), inits=(), opset: int = 17,
              ir: int = 8) -> Path:
    """A float32 graph saved without onnx.checker: the point is often that it is invalid."""
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs], list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir
    onnx.save(model, path)
    return path


def relu_tflite(path: Path, shape=(1, 4)) -> Path:
    """A valid one-operator TFLite model (RELU on float32 x -> y), written with the tflite package's builders."""
    import importlib

    import flatbuffers

    Model, SubGraph, Tensor, Operator, OperatorCode, Buffer = (importlib.import_module(f"tflite.{m}") for m in (
        "Model", "SubGraph", "Tensor", "Operator", "OperatorCode", "Buffer"))
    from tflite.BuiltinOperator import BuiltinOperator
    from tflite.TensorType import TensorType

    b = flatbuffers.Builder(1024)

    def vector(start, items, prepend):
        start(b, len(items))
        for item in reversed(items):
            prepend(item)
        return b.EndVector()

    tensors = []
    for name in ("x", "y"):
        name_off = b.CreateString(name)
        shape_off = vector(Tensor.TensorStartShapeVector, list(shape), b.PrependInt32)
        Tensor.TensorStart(b)
        Tensor.TensorAddShape(b, shape_off)
        Tensor.TensorAddType(b, TensorType.FLOAT32)
        Tensor.TensorAddName(b, name_off)
        tensors.append(Tensor.TensorEnd(b))
    op_in = vector(Operator.OperatorStartInputsVector, [0], b.PrependInt32)
    op_out = vector(Operator.OperatorStartOutputsVector, [1], b.PrependInt32)
    Operator.OperatorStart(b)
    Operator.OperatorAddInputs(b, op_in)
    Operator.OperatorAddOutputs(b, op_out)
    op = Operator.OperatorEnd(b)
    sg_parts = (vector(SubGraph.SubGraphStartTensorsVector, tensors, b.PrependUOffsetTRelative),
                vector(SubGraph.SubGraphStartInputsVector, [0], b.PrependInt32),
                vector(SubGraph.SubGraphStartOutputsVector, [1], b.PrependInt32),
                vector(SubGraph.SubGraphStartOperatorsVector, [op], b.PrependUOffsetTRelative))
    SubGraph.SubGraphStart(b)
    for add, part in zip((SubGraph.SubGraphAddTensors, SubGraph.SubGraphAddInputs, SubGraph.SubGraphAddOutputs,
                          SubGraph.SubGraphAddOperators), sg_parts):
        add(b, part)
    subgraph = SubGraph.SubGraphEnd(b)
    OperatorCode.OperatorCodeStart(b)
    OperatorCode.OperatorCodeAddBuiltinCode(b, BuiltinOperator.RELU)
    OperatorCode.OperatorCodeAddDeprecatedBuiltinCode(b, BuiltinOperator.RELU)
    OperatorCode.OperatorCodeAddVersion(b, 1)
    code = OperatorCode.OperatorCodeEnd(b)
    Buffer.BufferStart(b)
    empty = Buffer.BufferEnd(b)
    model_parts = (vector(Model.ModelStartSubgraphsVector, [subgraph], b.PrependUOffsetTRelative),
                   vector(Model.ModelStartOperatorCodesVector, [code], b.PrependUOffsetTRelative),
                   vector(Model.ModelStartBuffersVector, [empty], b.PrependUOffsetTRelative))
    Model.ModelStart(b)
    Model.ModelAddVersion(b, 3)
    for add, part in zip((Model.ModelAddSubgraphs, Model.ModelAddOperatorCodes, Model.ModelAddBuffers), model_parts):
        add(b, part)
    b.Finish(Model.ModelEnd(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


def unsupported_onnx(path: Path) -> Path:
    """Two operators neither the TVM Relax ONNX frontend nor edgec converts: Celu twice, Bernoulli once."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    from edgec.frontends.onnx_semantics import EDGEC_OPS

    assert not {"Celu", "Bernoulli"} & {*_get_convert_map(), *EDGEC_OPS}, "TVM or edgec now imports these ops; pick others"
    graph = helper.make_graph(
        [helper.make_node("Celu", ["x"], ["y1"]), helper.make_node("Celu", ["x"], ["y2"]),
         helper.make_node("Bernoulli", ["m"], ["d"])],
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 1, 4, 4]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [1, 1, 4, 4]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, [3, 3])])
    return _save(graph, path)


# --------------------------------------------------------------------------------------------- helpers

def cli(*args: str):
    """Invoke edgec in process; stderr is kept apart from stdout."""
    return CliRunner().invoke(main, [str(a) for a in args])


def cli_process(*args: str, cwd: Path):
    """Invoke edgec as a real process: python -m edgec.cli ARGS."""
    return subprocess.run([sys.executable, "-m", "edgec.cli", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def check_error(stderr: str, exit_code: int, *keywords: str, exception: BaseException | None = None,
                code: int = USER_ERROR) -> str:
    """The project rule: exit `code`, stderr exactly one line `error: ...` holding every keyword, no traceback.

    Collects every violation before failing, so a failure shows the whole picture at once. Returns the line.
    """
    problems = []
    if exception is not None and not isinstance(exception, SystemExit):
        problems.append("an exception escaped the CLI:\n"
                        + "".join(traceback.format_exception(type(exception), exception, exception.__traceback__)))
    if exit_code != code:
        problems.append(f"exit code {exit_code}, expected {code}")
    if "Traceback" in stderr:
        problems.append("stderr holds a traceback (only --verbose may print one)")
    lines = stderr.splitlines()
    if len(lines) != 1:
        problems.append(f"stderr has {len(lines)} lines, expected exactly one")
    errors = [ln for ln in lines if ln.startswith("error:")]
    if not lines or not lines[-1].startswith("error:"):
        problems.append("stderr does not end with a line starting with 'error:'")
    line = errors[-1] if errors else ""
    missing = [k for k in keywords if k not in line]
    if missing:
        problems.append(f"the error line lacks {missing}")
    assert not problems, "\n".join(problems) + f"\n--- stderr ---\n{stderr}--- end ---"
    return line


def check_cli_error(result, *keywords: str, code: int = USER_ERROR) -> str:
    return check_error(result.stderr, result.exit_code, *keywords, exception=result.exception, code=code)


def entries(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def host_target(directory: Path, *, compiler: str = "g++", memory_mb: str = '"auto"') -> Path:
    """A copy of targets/host.toml with another compiler command or memory budget."""
    text = _edit_toml(HOST_TOML.read_text(), 'compiler = "g++"', f'compiler = "{compiler}"')
    path = directory / f"host-{compiler}-{memory_mb.strip(chr(34))}.toml"
    path.write_text(_edit_toml(text, 'memory_mb = "auto"', f"memory_mb = {memory_mb}"))
    return path


def fake_compiler(directory: Path, name: str, script: str) -> Path:
    """An executable `name` in directory/bin running the sh `script` (the compiler's arguments are "$@");
    returns the bin directory, to put first on PATH."""
    bin_dir = directory / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / name).write_text(f"#!/bin/sh\n{script}\n")
    (bin_dir / name).chmod(0o755)
    return bin_dir


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and \
        subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0


needs_mount_namespace = pytest.mark.skipif(not _can_unshare(),
                                           reason="needs user and mount namespaces (unshare -Urm)")


def cli_in_mount(mount: str, mnt: Path, *args, cwd: Path):
    """Run edgec in a private mount namespace where the directory `mnt` is read-only ("ro") or a full 64 KiB
    tmpfs ("full"). Returns the process and the names `mnt` holds afterwards, as seen from inside."""
    setup = {"ro": 'mount --bind "$mnt" "$mnt" && mount -o remount,bind,ro "$mnt"',
             "full": 'mount -t tmpfs -o size=64k tmpfs "$mnt"'}[mount]
    script = f'mnt="$1"; shift; {setup} || exit 99; "$@" >/dev/null; rc=$?; echo "$(ls -A "$mnt")"; exit $rc'
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(mnt), sys.executable, "-m", "edgec.cli",
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 99, f"could not set up the mount: {proc.stderr}"
    return proc, set(proc.stdout.split())


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli_errors")
    conv_relu_onnx(d / "model.onnx", seed=0)
    conv_relu_onnx(d / "other.onnx", seed=1)        # same signature, different weights
    np.save(d / "good.npy", np.random.default_rng(0).random(SHAPE, dtype=np.float32))
    np.save(d / "wrong_shape.npy", np.zeros((1, 3, 4, 4), np.float32))
    np.save(d / "wrong_dtype.npy", np.zeros(SHAPE, np.float64))
    (d / "notes.txt").write_text("not an array\n")
    (d / "fake.npy").write_text("not an array either\n")
    return d


@pytest.fixture(scope="module")
def bundle(work) -> Path:
    """A host bundle of model.onnx, built once through the CLI."""
    out = work / "model-host"
    result = cli("build", work / "model.onnx", "--target", "host", "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "manifest.json").is_file() and (out / "params.bin").is_file()
    return out


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    # edgec's default output paths are relative to the working directory: keep them out of the repo.
    monkeypatch.chdir(tmp_path)


# --------------------------------------------------------------------------------------------- 1-3: model files

def test_missing_model_file(tmp_path):
    out = tmp_path / "out"
    result = cli("build", tmp_path / "missing.onnx", "-o", out)
    check_cli_error(result, "missing.onnx", "does not exist", "check the path")
    assert not out.exists()


def test_missing_model_file_real_process(tmp_path):
    proc = cli_process("build", "missing.onnx", "-o", "out", cwd=tmp_path)
    check_error(proc.stderr, proc.returncode, "missing.onnx", "does not exist", "check the path")
    assert entries(tmp_path) == set()


@pytest.mark.parametrize("suffix,kind", [(".onnx", "ONNX"), (".tflite", "TFLite")])
def test_random_bytes_are_not_a_model(tmp_path, suffix, kind):
    model = tmp_path / f"noise{suffix}"
    model.write_bytes(np.random.default_rng(0).bytes(512))
    result = cli("build", model, "-o", tmp_path / "out")
    check_cli_error(result, f"noise{suffix}", f"not a valid {kind} model", f"complete {suffix} export")
    assert entries(tmp_path) == {model.name}


def test_unsupported_model_suffix(tmp_path):
    model = tmp_path / "model.txt"
    model.write_text("hello\n")
    result = cli("build", model, "-o", tmp_path / "out")
    check_cli_error(result, "model.txt", "'.txt'", ".onnx", ".tflite")


# --------------------------------------------------------------------------------------------- 4: operators

def test_unsupported_operators_listed_with_counts(tmp_path):
    model = unsupported_onnx(tmp_path / "unsup.onnx")
    result = cli("build", model, "-o", tmp_path / "out")
    line = check_cli_error(result, "unsup.onnx", "Celu (x2)", "Bernoulli (x1)", "edgec inspect")
    assert line.index("Celu") < line.index("Bernoulli"), "the most frequent op comes first"
    assert not (tmp_path / "out").exists()


def test_inspect_lists_unsupported_operators(tmp_path):
    model = unsupported_onnx(tmp_path / "unsup.onnx")
    result = cli("inspect", model)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "cannot import: Celu (x2), Bernoulli (x1)" in result.stdout


# --------------------------------------------------------------------------------------------- 5: targets

def test_unknown_target_name(work, tmp_path):
    result = cli("build", work / "model.onnx", "--target", "rpi9", "-o", tmp_path / "out")
    check_cli_error(result, "unknown target 'rpi9'", "rpi4", "host", ".toml")


def test_target_file_that_does_not_exist(work, tmp_path):
    result = cli("build", work / "model.onnx", "--target", tmp_path / "board.toml", "-o", tmp_path / "out")
    check_cli_error(result, "board.toml", "does not exist")


def _edit_toml(text: str, old: str, new: str) -> str:
    assert old in text, f"targets/rpi4.toml changed: {old!r} not found"
    return text.replace(old, new, 1)


# name -> (edit of rpi4.toml, words the error line must hold besides the file name)
BAD_TOMLS = {
    "missing-field": (lambda t: _edit_toml(t, 'description = "Raspberry Pi 4 Model B: Cortex-A72, 4 cores, 4 GB"\n', ""),
                      ["'description'", "is missing", "add it"]),
    "missing-nested-field": (lambda t: _edit_toml(t, 'apt_package = "g++-aarch64-linux-gnu"\n', ""),
                             ["'toolchain.apt_package'", "is missing"]),
    "wrong-type": (lambda t: _edit_toml(t, "memory_mb = 4096", "memory_mb = 4.5"),
                   ["'device.memory_mb'", "wrong type", "float"]),
    "wrong-value": (lambda t: _edit_toml(t, "threads = 4", 'threads = "four"'), ["'device.threads'", "four"]),
    "unknown-field": (lambda t: _edit_toml(t, 'arch = "aarch64"', 'arch = "aarch64"\ncolour = "red"'),
                      ["'colour'", "not a known field"]),
    "unknown-nested-field": (lambda t: _edit_toml(t, "threads = 4", "threads = 4\ncolour = 1"),
                             ["'device.colour'", "not a known field"]),
    "invalid-toml": (lambda t: t + "\n[device2\nx = 1\n", ["not valid TOML", "line"]),
}


@pytest.mark.parametrize("case", BAD_TOMLS)
def test_bad_target_file(work, tmp_path, case):
    edit, words = BAD_TOMLS[case]
    toml = tmp_path / f"board-{case}.toml"
    toml.write_text(edit(RPI4_TOML.read_text()))
    result = cli("build", work / "model.onnx", "--target", toml, "-o", tmp_path / "out")
    check_cli_error(result, toml.name, *words)


# --------------------------------------------------------------------------------------------- 6: toolchain

def test_missing_cross_compiler_leaves_nothing_behind(work, tmp_path):
    toml = tmp_path / "board.toml"
    text = _edit_toml(RPI4_TOML.read_text(), 'compiler = "aarch64-linux-gnu-g++"', 'compiler = "no-such-g++"')
    toml.write_text(_edit_toml(text, 'apt_package = "g++-aarch64-linux-gnu"', 'apt_package = "g++-nosuch"'))
    project = tmp_path / "project"
    project.mkdir()
    model = Path(shutil.copy(work / "model.onnx", project / "model.onnx"))
    result = cli("build", model, "--target", toml, "-o", project / "bundle")
    assert entries(project) == {"model.onnx"}, "a failed build must leave no bundle and no temp dir behind"
    check_cli_error(result, "no-such-g++", "sudo apt-get install g++-nosuch")


# --------------------------------------------------------------------------------------------- 7: run inputs

def test_run_wrong_input_shape(work, bundle):
    result = cli("run", bundle, "--input", work / "wrong_shape.npy")
    check_cli_error(result, "'x'", "[1, 3, 4, 4]", "[1, 3, 8, 8]", "1x3x8x8")


def test_run_wrong_input_shape_real_process(work, bundle):
    proc = cli_process("run", bundle, "--input", work / "wrong_shape.npy", cwd=work)
    check_error(proc.stderr, proc.returncode, "'x'", "[1, 3, 4, 4]", "[1, 3, 8, 8]", "1x3x8x8")


def test_run_wrong_input_dtype(work, bundle):
    result = cli("run", bundle, "--input", work / "wrong_dtype.npy")
    check_cli_error(result, "'x'", "float64", "float32", "astype('float32')")


def test_run_wrong_number_of_inputs(work, bundle):
    result = cli("run", bundle, "--input", work / "good.npy", "--input", work / "good.npy")
    check_cli_error(result, "takes 1 input", "2 given", "--input")


def test_run_input_names_unknown_tensor(work, bundle):
    result = cli("run", bundle, "--input", f"nope={work / 'good.npy'}")
    check_cli_error(result, "'nope'", "its inputs are: x")


def test_run_missing_npy(work, bundle, tmp_path):
    result = cli("run", bundle, "--input", tmp_path / "absent.npy")
    check_cli_error(result, "absent.npy", "does not exist")


@pytest.mark.parametrize("name", ["notes.txt", "fake.npy"])
def test_run_input_that_is_not_npy(work, bundle, name):
    result = cli("run", bundle, "--input", work / name)
    line = check_cli_error(result, name, "not a .npy file", "numpy.save")
    # np.load's fallback message tells the user to pass allow_pickle=, which edgec's CLI offers no way to do
    assert "allow_pickle" not in line and "pickle" not in line, f"misleading pickle advice: {line}"


# --------------------------------------------------------------------------------------------- 8: input shapes

def test_dynamic_dims_need_input_shape(tmp_path):
    model = conv_relu_onnx(tmp_path / "dyn.onnx", batch="batch")
    result = cli("build", model, "-o", tmp_path / "out")
    check_cli_error(result, "'x'", "dynamic", "batch", "--input-shape x:1x3x8x8")
    assert entries(tmp_path) == {"dyn.onnx"}


def test_malformed_input_shape(tmp_path):
    model = conv_relu_onnx(tmp_path / "dyn.onnx", batch="batch")
    result = cli("build", model, "--input-shape", "x:1xAx3", "-o", tmp_path / "out")
    check_cli_error(result, "x:1xAx3", "NAME:DIMS")


def test_input_shape_for_unknown_input(tmp_path):
    model = conv_relu_onnx(tmp_path / "dyn.onnx", batch="batch")
    result = cli("build", model, "--input-shape", "image:1x3x8x8", "-o", tmp_path / "out")
    check_cli_error(result, "image", "dyn.onnx", "its inputs are: x")


# --------------------------------------------------------------------------------------------- 9: passes

def test_disable_unknown_pass(work, tmp_path):
    result = cli("build", work / "model.onnx", "--disable-pass", "no-such-pass", "-o", tmp_path / "out")
    check_cli_error(result, "no-such-pass", "--disable-pass", "edgec passes", "fuse-ops")
    assert not (tmp_path / "out").exists()


def test_disable_required_pass(work, tmp_path):
    result = cli("build", work / "model.onnx", "--disable-pass", "legalize-ops", "-o", tmp_path / "out")
    check_cli_error(result, "'legalize-ops'", "cannot be disabled", "edgec passes")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------- 10: bundles

def test_run_directory_that_is_not_a_bundle(tmp_path):
    notabundle = tmp_path / "stuff"
    notabundle.mkdir()
    (notabundle / "model.so").write_bytes(b"\0")
    result = cli("run", notabundle)
    check_cli_error(result, "stuff", "not an edgec bundle", "manifest.json", "edgec build -o")


def test_run_bundle_with_modified_params(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "tampered"))
    data = bytearray((copy / "params.bin").read_bytes())
    data[-1] ^= 0xFF
    (copy / "params.bin").write_bytes(bytes(data))
    result = cli("run", copy)
    check_cli_error(result, "params.bin", "sha256", "rebuild")


def test_run_bundle_with_missing_file(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "incomplete"))
    (copy / "params.bin").unlink()
    result = cli("run", copy)
    check_cli_error(result, "params.bin", "missing", "copy the whole bundle")


# --------------------------------------------------------------------------------------------- 11: --compare

def test_compare_against_different_model_fails(work, bundle):
    result = cli("run", bundle, "--compare", work / "other.onnx")
    check_cli_error(result, "outputs differ", "atol=", "rtol=")
    assert "max abs" in result.stdout       # the numbers that failed are still shown


def test_compare_against_same_model_passes(work, bundle):
    """Positive control: the bundle matches the model it was built from."""
    result = cli("run", bundle, "--compare", work / "model.onnx")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "max abs" in result.stdout and "onnxruntime" in result.stdout


def test_compare_against_same_model_passes_real_process(work, bundle):
    proc = cli_process("run", bundle, "--input", work / "good.npy", "--compare", work / "model.onnx", cwd=work)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "error" not in proc.stderr and "Traceback" not in proc.stderr
    assert "max abs" in proc.stdout


# --------------------------------------------------------------------------------------------- --verbose

def test_verbose_prints_traceback(work, bundle):
    result = cli("--verbose", "run", bundle, "--input", work / "wrong_shape.npy")
    assert result.exit_code == USER_ERROR, result.output
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: input 'x' has shape [1, 3, 4, 4]")


def test_verbose_prints_traceback_real_process(tmp_path):
    proc = cli_process("--verbose", "build", "missing.onnx", "-o", "out", cwd=tmp_path)
    assert proc.returncode == USER_ERROR, proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr
    assert "EdgecError" in proc.stderr
    assert proc.stderr.splitlines()[-1] == "error: model file missing.onnx does not exist; check the path"


# --------------------------------------------------------------------------------------------- 12: broken model files

def test_corrupt_tflite_body(tmp_path):
    """A valid TFL3 header with garbage after it: the flatbuffer reader has no verifier, edgec walks it."""
    good = relu_tflite(tmp_path / "good.tflite").read_bytes()
    rng = np.random.default_rng(0)
    for i, body in enumerate([rng.bytes(len(good) - 8), rng.bytes(4000), good[8:len(good) // 2]]):
        model = tmp_path / f"corrupt{i}.tflite"
        model.write_bytes(good[:8] + body)
        result = cli("build", model, "-o", tmp_path / "out")
        check_cli_error(result, model.name, "not a valid TFLite model", "corrupt", "complete .tflite export")
    assert not (tmp_path / "out").exists()


def test_valid_tflite_passes_the_corruption_check(tmp_path):
    """Positive control for the walk above: the same model uncorrupted builds."""
    result = cli("build", relu_tflite(tmp_path / "good.tflite"), "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_onnx_ir_version_too_new(tmp_path):
    model = tiny_onnx(tmp_path / "ir99.onnx", [helper.make_node("Relu", ["x"], ["y"])], ir=99)
    check_cli_error(cli("build", model, "-o", tmp_path / "out"), "ir99.onnx", "IR version 99", "older IR version")


def test_onnx_opset_too_new_for_tvm(tmp_path):
    model = tiny_onnx(tmp_path / "opset99.onnx", [helper.make_node("Relu", ["x"], ["y"])], opset=99)
    check_cli_error(cli("build", model, "-o", tmp_path / "out"), "opset99.onnx", "opset 99", "older opset")


def test_onnx_opset_too_old_for_tvm(tmp_path):
    """Reshape-1 takes its shape as an attribute; TVM's oldest Reshape converter (opset 13) reads an input."""
    model = tiny_onnx(tmp_path / "old.onnx", [helper.make_node("Reshape", ["x"], ["y"], shape=[4, 1])],
                      outputs=(("y", [4, 1]),), opset=1, ir=3)
    check_cli_error(cli("build", model, "-o", tmp_path / "out"), "old.onnx", "Reshape", "opset 1", "opset 13")


def test_missing_external_data_file(tmp_path):
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Add", ["x", "w"], ["y"])], "ext",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save_model(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.weights",
                    size_threshold=0)
    (tmp_path / "ext.weights").unlink()
    line = check_cli_error(cli("build", tmp_path / "ext.onnx", "-o", tmp_path / "out"), "ext.onnx", "'w'",
                           "ext.weights", "missing")
    assert "ValidationError" not in line


@pytest.mark.parametrize("case,nodes,words", [
    ("dangling", [helper.make_node("Relu", ["nowhere"], ["y"])], ["'nowhere'", "no node"]),
    ("cyclic", [helper.make_node("Add", ["x", "b"], ["a"]), helper.make_node("Relu", ["a"], ["b"]),
                helper.make_node("Relu", ["a"], ["y"])], ["cycle"]),
])
def test_malformed_onnx_graph_is_named(tmp_path, case, nodes, words):
    model = tiny_onnx(tmp_path / f"{case}.onnx", nodes)
    line = check_cli_error(cli("build", model, "-o", tmp_path / "out"), f"{case}.onnx", "malformed", *words)
    assert "--input-shape" not in line


def test_unsorted_onnx_graph_builds(tmp_path):
    """Acyclic but out of order (ONNX wants topological order, onnxruntime sorts): edgec sorts it too."""
    model = tiny_onnx(tmp_path / "unsorted.onnx", [helper.make_node("Relu", ["a"], ["y"]),
                                                    helper.make_node("Neg", ["x"], ["a"])])
    result = cli("build", model, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_tvm_messages_stay_off_stderr_real_process(tmp_path):
    """TVM's importer fails here and its BlockBuilder complains from C++ on fd 2: only --verbose shows that."""
    model = tiny_onnx(tmp_path / "bad.onnx", [helper.make_node("Reshape", ["x", "x"], ["y"])])
    proc = cli_process("build", model, "-o", "out", cwd=tmp_path)
    check_error(proc.stderr, proc.returncode, "bad.onnx", "importer failed")
    verbose = cli_process("--verbose", "build", model, "-o", "out", cwd=tmp_path)
    assert "BlockBuilder" in verbose.stderr, "control: the quiet run had a TVM message to hide"


# --------------------------------------------------------------------------------------------- 13: options

def test_input_shape_too_large_is_refused_before_allocating(tmp_path):
    model = tiny_onnx(tmp_path / "dyn.onnx", [helper.make_node("Relu", ["x"], ["y"])],
                      inputs=(("x", ["a", "b", "c", "d"]),), outputs=(("y", ["a", "b", "c", "d"]),))
    for spec, size in [("x:99999999x99999999x3x3", "9e+16"), (f"x:{'9' * 40}x3", "3e+40")]:
        check_cli_error(cli("build", model, "--input-shape", spec, "-o", tmp_path / "out"), spec, size, "elements")


def test_conflicting_pins_of_one_input(tmp_path):
    model = conv_relu_onnx(tmp_path / "dyn.onnx", batch="batch")
    result = cli("build", model, "--input-shape", "x:1x3x8x8", "--input-shape", "x:2x3x8x8", "-o", tmp_path / "out")
    check_cli_error(result, "'x'", "twice", "1x3x8x8", "2x3x8x8")


@pytest.mark.parametrize("option,value", [("--runs", "0"), ("--runs", "-3"), ("--warmup", "-1"), ("--threads", "0")])
def test_bench_counts_out_of_range(bundle, option, value):
    check_cli_error(cli("bench", bundle, option, value), option, value, "range", "--help")


def test_missing_compare_model(bundle, tmp_path):
    for command in ("run", "bench"):
        check_cli_error(cli(command, bundle, "--compare", tmp_path / "gone.onnx"), "--compare", "gone.onnx",
                        "does not exist")


def test_usage_error_is_one_line_real_process(tmp_path):
    proc = cli_process("--no-such-option", "build", cwd=tmp_path)
    check_error(proc.stderr, proc.returncode, "--no-such-option")


def test_input_path_holding_equals_sign(work, bundle, tmp_path):
    path = Path(shutil.copy(work / "good.npy", tmp_path / "a=b.npy"))
    result = cli("run", bundle, "--input", path)
    assert result.exit_code == 0, result.output
    named = cli("run", bundle, "--input", f"x={path}")
    assert named.exit_code == 0, named.output


def test_target_file_not_utf8(work, tmp_path):
    toml = tmp_path / "latin1.toml"
    toml.write_bytes(RPI4_TOML.read_bytes().replace(b"Raspberry Pi 4", b"Raspberry Pi \xe9"))
    check_cli_error(cli("build", work / "model.onnx", "--target", toml, "-o", tmp_path / "out"), "latin1.toml",
                    "UTF-8")


def test_internal_error_is_kept_for_bugs(work, tmp_path, monkeypatch):
    import edgec.api

    monkeypatch.setattr(edgec.api, "build", lambda *a, **k: 1 / 0)
    check_cli_error(cli("build", work / "model.onnx", "-o", tmp_path / "out"), "internal error",
                    "ZeroDivisionError", "report it", code=1)


# --------------------------------------------------------------------------------------------- 14: where -o points

def test_output_at_an_existing_file(work, tmp_path):
    (tmp_path / "out").write_text("mine\n")
    check_cli_error(cli("build", work / "model.onnx", "-o", tmp_path / "out"), "out", "not a directory")
    assert (tmp_path / "out").read_text() == "mine\n"


@needs_mount_namespace
def test_output_in_a_read_only_directory(work, tmp_path):
    (tmp_path / "ro").mkdir()
    proc, left = cli_in_mount("ro", tmp_path / "ro", "build", work / "model.onnx", "-o", tmp_path / "ro" / "out",
                              cwd=tmp_path)
    check_error(proc.stderr, proc.returncode, "cannot write in", "read-only file system")
    assert left == set()


@needs_mount_namespace
def test_output_on_a_full_disk(work, tmp_path):
    (tmp_path / "full").mkdir()
    proc, left = cli_in_mount("full", tmp_path / "full", "build", work / "model.onnx", "-o", tmp_path / "full" / "out",
                              cwd=tmp_path)
    line = check_error(proc.stderr, proc.returncode, "no space left", str(tmp_path / "full"), "full")
    assert "not permitted" not in line
    assert left == set(), "a build that ran out of space must leave no staging dir behind"


# --------------------------------------------------------------------------------------------- 15: memory budget

def _big_matmul(path: Path) -> Path:
    """x[1,512] @ w[512,1024]: 2 MiB of weights, over a 1 MiB budget."""
    w = numpy_helper.from_array(np.zeros((512, 1024), np.float32), "w")
    return tiny_onnx(path, [helper.make_node("MatMul", ["x", "w"], ["y"])], inputs=(("x", [1, 512]),),
                     outputs=(("y", [1, 1024]),), inits=[w])


def test_memory_over_budget_warns(tmp_path):
    result = cli("build", _big_matmul(tmp_path / "big.onnx"), "-t", host_target(tmp_path, memory_mb="1"),
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: ") and "memory_mb = 1" in result.stderr, result.stderr
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_memory_over_budget_refused_with_strict_memory(tmp_path):
    result = cli("build", _big_matmul(tmp_path / "big.onnx"), "-t", host_target(tmp_path, memory_mb="1"),
                 "--strict-memory", "-o", tmp_path / "out")
    check_cli_error(result, "MiB", "memory_mb = 1", "--strict-memory")
    assert not (tmp_path / "out").exists()


def test_memory_counts_the_weights_as_held_after_load(tmp_path):
    """--quantize int8-weights stores 0.5 MiB of int8 in params.bin, but main_load turns them into the 2 MiB of
    float32 the model holds while loaded: those are what the budget is checked against."""
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32), "w")
    model = tiny_onnx(tmp_path / "big.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])], inputs=(("x", [1, 512]),),
                      outputs=(("y", [1, 1024]),), inits=[w])
    result = cli("build", model, "-t", host_target(tmp_path, memory_mb="1"), "--quantize", "int8-weights",
                 "--offload", "none", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("warning: ") and "memory_mb = 1" in result.stderr, result.stderr


def test_memory_within_budget_is_quiet(tmp_path):
    """Control: the same model with a budget it fits in."""
    result = cli("build", _big_matmul(tmp_path / "big.onnx"), "-t", host_target(tmp_path, memory_mb="64"),
                 "--strict-memory", "-o", tmp_path / "out")
    assert result.exit_code == 0 and result.stderr == "", result.output
