"""Bad input through the real CLI: one `error: <message>; <hint>` line on stderr, exit code 2, no traceback.

Every case goes through `edgec.cli:main` with click's CliRunner (click 8.2+ keeps stderr apart from stdout:
`result.stderr`, `result.stdout`); a few also run `python -m edgec.cli` in a real process to prove that the
installed entry point behaves the same. `edgec --verbose ...` is the one way to get a traceback.

Builds are few: one module-scoped host bundle of a tiny Conv+Relu model serves every `edgec run` case, and the
missing-compiler case is the only other build that gets as far as linking.
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


def unsupported_onnx(path: Path) -> Path:
    """Two operators the TVM Relax ONNX frontend lacks: ConvInteger twice, Det once."""
    from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map

    assert not {"ConvInteger", "Det"} & set(_get_convert_map()), "TVM now imports these ops; pick others"
    w = numpy_helper.from_array(np.ones((1, 1, 3, 3), np.uint8), "w")
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y1"]), helper.make_node("ConvInteger", ["x", "w"], ["y2"]),
         helper.make_node("Det", ["m"], ["d"])],
        "unsupported",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4]),
         helper.make_tensor_value_info("m", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y1", TensorProto.INT32, [1, 1, 2, 2]),
         helper.make_tensor_value_info("y2", TensorProto.INT32, [1, 1, 2, 2]),
         helper.make_tensor_value_info("d", TensorProto.FLOAT, [])], [w])
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
    line = check_cli_error(result, "unsup.onnx", "ConvInteger (x2)", "Det (x1)", "edgec inspect")
    assert line.index("ConvInteger") < line.index("Det"), "the most frequent op comes first"
    assert not (tmp_path / "out").exists()


def test_inspect_lists_unsupported_operators(tmp_path):
    model = unsupported_onnx(tmp_path / "unsup.onnx")
    result = cli("inspect", model)
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    assert "cannot import: ConvInteger (x2), Det (x1)" in result.stdout


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
    result = cli("build", work / "model.onnx", "--disable-pass", "legalize", "-o", tmp_path / "out")
    check_cli_error(result, "'legalize'", "cannot be disabled", "edgec passes")
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
