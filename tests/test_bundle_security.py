"""The bundle's promises (docs/bundle-format.md, issue 6), each test failing when one breaks:

- no code from model files: hostile input/output/file/target names go through build, `edgec run`, `run.py`
  and the C++ runner as data, never as code, and README.md shows them escaped;
- tamper-evidence: every case in tamper_cases.py is refused by `edgec run` and by `python run.py`;
- nothing of the user's is lost: edgec replaces only an intact bundle of its own at -o;
- a rebuild in the same process runs the new library; one tolerance rule for edgec and run.py --check.

Models are tiny Conv+Relu graphs, so a build takes about a second.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgec import api
from edgec.cli import main
from edgec.errors import EdgecError
from edgec.reference import ReferenceRuntime, Tolerance, compare_outputs
from edgec.resources import data_dir
from edgec.runtime import bundle_runner
from tamper_cases import CASES, MENTIONS, SIZE_CASES

REPO = Path(__file__).resolve().parents[1]
USER_ERROR = 2
MARKER = "PWNED"
# Each one, if it ever reached code, would break out of a Python docstring or string, a C++ or CMake string or
# comment, a Jinja template or a Markdown table, and create MARKER in the working directory.
PAYLOAD = f'x"""\nimport pathlib; pathlib.Path("{MARKER}").touch()\n"""'
HOSTILE = ("q'uo\"te \\back\\slash */ /* {{ 1234*5 }} {% raw %} %s %d `tick` | <b>html</b> [l](http://x) "
           f'");system("touch {MARKER}");// )\nexecute_process(COMMAND touch {MARKER})\n# '
           + PAYLOAD)


def conv_relu(path: Path, x: str = "x", y: str = "y", seed: int = 0, activation: str = "Relu") -> Path:
    """x[1,3,8,8] -> Conv(4, 3x3, pad 1) -> Relu (or another activation) -> y, with the given tensor names."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) * 0.2).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal(4) * 0.2).astype(np.float32), "b")]
    graph = helper.make_graph(
        [helper.make_node("Conv", [x, "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node(activation, ["c"], [y])],
        "conv_relu", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def run_py(bundle: Path, *args, cwd: Path) -> subprocess.CompletedProcess:
    """The deployer's command: python3 BUNDLE/run.py ARGS, in a fresh process."""
    return subprocess.run([sys.executable, str(bundle / "run.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def assert_one_error(stderr: str, exit_code: int, *words: str, code: int = USER_ERROR) -> str:
    lines = stderr.splitlines()
    assert exit_code == code, f"exit code {exit_code}, expected {code}: {stderr}"
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected one error line:\n{stderr}"
    assert all(w in lines[0] for w in words), f"{lines[0]!r} lacks one of {words}"
    return lines[0]


def assert_matches_onnxruntime(model: Path, outputs: dict[str, np.ndarray], inputs: dict[str, np.ndarray]):
    comparison = compare_outputs(outputs, ReferenceRuntime(model).run(inputs))
    assert comparison.ok, comparison


def files_of(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def bundle(work) -> Path:
    """A host bundle of a Conv+Relu model: the original every tamper case copies."""
    return api.build(conv_relu(work / "plain.onnx"), "host", work / "plain").bundle_dir


@pytest.fixture(autouse=True)
def _cwd(tmp_path, monkeypatch):
    # Payloads would create the marker in the working directory; edgec's default outputs go there too.
    monkeypatch.chdir(tmp_path)


# ------------------------------------------------------------------------------------------ hostile names

def hostile_build(tmp_path: Path, channel: str) -> tuple[Path, Path, str]:
    """Build a model whose `channel` carries HOSTILE; returns (model, bundle, the hostile string used)."""
    name = HOSTILE
    target = "host"
    if channel == "input":
        model = conv_relu(tmp_path / "m.onnx", x=name)
    elif channel == "output":
        model = conv_relu(tmp_path / "m.onnx", y=name)
    elif channel == "model file":
        name = HOSTILE.replace("/", "_")          # a file name cannot hold '/'
        model = conv_relu(tmp_path / f"{name}.onnx")
    else:
        model = conv_relu(tmp_path / "m.onnx")
        toml = (REPO / "targets" / "host.toml").read_text()
        toml = toml.replace('name = "host"', f"name = {json.dumps(name)}")
        toml = toml.replace('description = "', f'description = {json.dumps(name)[:-1]} ', 1)
        target = str(tmp_path / "board.toml")
        Path(target).write_text(toml)
    out = tmp_path / "bundle"
    result = cli("build", model, "--target", target, "-o", out)
    assert result.exit_code == 0, result.output
    return model, out, name


@pytest.mark.parametrize("channel", ["input", "output", "model file", "target name"])
def test_hostile_names_stay_data(channel, tmp_path):
    model, bundle, name = hostile_build(tmp_path, channel)
    manifest = json.loads((bundle / "manifest.json").read_text())
    stored = {"input": manifest["inputs"][0]["name"], "output": manifest["outputs"][0]["name"],
              "model file": manifest["model"]["file"], "target name": manifest["target"]["name"]}[channel]
    assert stored == (f"{name}.onnx" if channel == "model file" else name), "the name must survive as data"
    for runner in ("run.py", "main.cc", "CMakeLists.txt"):
        assert (bundle / runner).read_bytes() == (data_dir("templates") / "bundle" / runner).read_bytes()

    res = cli("run", bundle, "--compare", model)                           # edgec run, in process
    assert res.exit_code == 0, res.output
    proc = run_py(bundle, "--check", cwd=tmp_path)                          # the deployer's run.py
    assert proc.returncode == 0, proc.stderr
    assert "check: ok" in proc.stdout

    from edgec.runtime.native import run_with_runner                       # the C++ runner

    inputs = {s["name"]: np.random.default_rng(1).random(s["shape"], dtype=np.float32) for s in manifest["inputs"]}
    assert_matches_onnxruntime(model, run_with_runner(bundle, inputs).outputs, inputs)

    assert not list(tmp_path.rglob(MARKER)) and not (REPO / MARKER).exists(), "a payload was executed"
    readme = (bundle / "README.md").read_text()
    assert "\\\\nimport pathlib" in readme, "the name is shown, its newlines escaped"
    assert not any(line.lstrip("-#>| *").startswith(("import", "execute_process")) for line in readme.splitlines())
    assert "6170" not in readme, "a name was rendered as a template"
    for markup in (r"<b>", r"(?<!\\)\]\(http", r"(?<!\\)`tick", r"(?<!\\)\| &lt;b"):
        assert not re.search(markup, readme), f"a name became Markdown: {markup}"


def test_non_utf8_file_name_is_data(tmp_path):
    """File names are bytes on Linux: a non-UTF-8 one is kept readable (U+FFFD) and runs everywhere."""
    raw = os.fsencode(tmp_path) + b"/m\xff\xfe.onnx"
    conv_relu(Path(os.fsdecode(raw)))
    out = api.build(os.fsdecode(raw), "host", tmp_path / "bundle").bundle_dir
    manifest = json.loads((out / "manifest.json").read_bytes().decode("utf-8"))
    assert manifest["model"]["file"] == "m\ufffd\ufffd.onnx"
    proc = run_py(out, "--check", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_non_utf8_tensor_name_is_one_clean_error(tmp_path):
    """ONNX names are protobuf strings, which must be UTF-8: a model with other bytes is refused in one line."""
    path = conv_relu(tmp_path / "m.onnx", x="xQQQQx")
    path.write_bytes(path.read_bytes().replace(b"QQQQ", b"\xff\xfe\xff\xfe"))
    result = cli("build", path, "-o", tmp_path / "out")
    assert_one_error(result.stderr, result.exit_code, "m.onnx")
    assert not (tmp_path / "out").exists()


def test_runners_identical_across_models(work, bundle, tmp_path):
    other = api.build(conv_relu(tmp_path / "other.onnx", x="image", y="logits/out:0", seed=3), "host",
                      tmp_path / "other").bundle_dir
    for runner in ("run.py", "main.cc", "CMakeLists.txt"):
        assert (bundle / runner).read_bytes() == (other / runner).read_bytes(), runner
    assert json.loads((other / "manifest.json").read_text())["outputs"][0]["file"] == "0-logits_out_0.npy"
    assert (other / "sample" / "expected" / "0-logits_out_0.npy").is_file()


# ------------------------------------------------------------------------------------------ tampering

def tampered(bundle: Path, tmp_path: Path, case: str) -> Path:
    copy = Path(shutil.copytree(bundle, tmp_path / "tampered", symlinks=True))
    CASES[case](copy)
    return copy


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_bundle_refused_by_edgec_run(bundle, tmp_path, case):
    result = cli("run", tampered(bundle, tmp_path, case))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert_one_error(result.stderr, result.exit_code, *MENTIONS[case])


@pytest.mark.parametrize("case", sorted(CASES))
def test_tampered_bundle_refused_by_run_py(bundle, tmp_path, case):
    copy = tampered(bundle, tmp_path, case)
    proc = run_py(copy, "--check", cwd=tmp_path)
    assert_one_error(proc.stderr, proc.returncode, *MENTIONS[case])


@pytest.mark.parametrize("case", SIZE_CASES)
def test_size_checked_even_with_no_verify(bundle, tmp_path, case):
    copy = tampered(bundle, tmp_path, case)
    proc = run_py(copy, "--no-verify", cwd=tmp_path)
    assert_one_error(proc.stderr, proc.returncode, *MENTIONS[case])
    with pytest.raises(EdgecError, match="size"):
        api.run(copy, verify=False)


def test_no_verify_says_what_it_skips(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    CASES["edited_param_byte"](copy)
    proc = run_py(copy, "--no-verify", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "--no-verify: sha256 not checked" in proc.stderr and "params.bin" in proc.stderr


@pytest.mark.parametrize("content, words", [
    ("pickle", ("Python objects",)), ("missing", ("does not exist",)), ("garbage", ("not a .npy file",)),
    ("truncated", ("not a .npy file",)), ("shape", ("[1, 3, 4, 4]", "1x3x8x8"))])
def test_run_py_bad_inputs_one_line(bundle, tmp_path, content, words):
    path = tmp_path / "in=put.npy"                      # '=' in a path: still a path
    if content == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    elif content == "garbage":
        path.write_bytes(b"\x93NUMPY garbage")
    elif content == "truncated":
        np.save(path, np.zeros((1, 3, 8, 8), np.float32))
        path.write_bytes(path.read_bytes()[:-10])
    elif content == "shape":
        np.save(path, np.zeros((1, 3, 4, 4), np.float32))
    proc = run_py(bundle, "--input", path, cwd=tmp_path)
    assert_one_error(proc.stderr, proc.returncode, *words)


def test_run_py_input_path_with_equals_sign(bundle, tmp_path):
    x = np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)
    np.save(tmp_path / "a=b.npy", x)
    out = tmp_path / "out"
    for arg in (f"{tmp_path}/a=b.npy", f"x={tmp_path}/a=b.npy"):
        proc = run_py(bundle, "--input", arg, "--output-dir", out, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert_matches_onnxruntime(bundle.parent / "plain.onnx", {"y": np.load(out / "0-y.npy")}, {"x": x})
    proc = run_py(bundle, "--input", f"nope={tmp_path}/a=b.npy", cwd=tmp_path)
    assert_one_error(proc.stderr, proc.returncode, "'nope'", "its inputs are: x")


# ------------------------------------------------------------------------------------------ data loss

def test_foreign_manifest_dir_refused(work, tmp_path):
    out = tmp_path / "project"
    out.mkdir()
    (out / "manifest.json").write_text('{"name": "my web app", "version": 3}')
    (out / "index.html").write_text("<html></html>")
    before = files_of(out)
    result = cli("build", work / "plain.onnx", "-o", out)
    assert_one_error(result.stderr, result.exit_code, "manifest.json", "not an edgec bundle")
    assert files_of(out) == before


@pytest.mark.parametrize("user_file", ["notes.txt", "model.onnx", "sample/mine.npy"])
def test_user_files_in_bundle_dir_refused(work, tmp_path, user_file):
    out = api.build(work / "plain.onnx", "host", tmp_path / "b").bundle_dir
    shutil.copyfile(work / "plain.onnx", out / user_file)
    before = files_of(out)
    for force in ([], ["--force"]):
        result = cli("build", work / "plain.onnx", "-o", out, *force)
        assert_one_error(result.stderr, result.exit_code, "edgec did not write", user_file)
        assert files_of(out) == before


def test_modified_bundle_replaced_only_with_force(work, tmp_path):
    out = api.build(work / "plain.onnx", "host", tmp_path / "b").bundle_dir
    (out / "README.md").write_text("my notes about this bundle\n")
    result = cli("build", work / "plain.onnx", "-o", out)
    assert_one_error(result.stderr, result.exit_code, "modified", "README.md", "--force")
    assert (out / "README.md").read_text() == "my notes about this bundle\n"
    result = cli("build", work / "plain.onnx", "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert "my notes" not in (out / "README.md").read_text()


def test_file_at_output_refused(work, tmp_path):
    target = tmp_path / "out"
    target.write_text("precious\n")
    result = cli("build", work / "plain.onnx", "-o", target)
    assert_one_error(result.stderr, result.exit_code, "not a directory")
    assert target.read_text() == "precious\n"


def test_symlink_at_output_refused_before_compiling(work, tmp_path, monkeypatch):
    """An -o that is a symlink is refused as it is, not followed into the directory it points to, and the
    refusal comes before any compiling."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    link = tmp_path / "out"
    link.symlink_to(elsewhere)
    import edgec.api

    monkeypatch.setattr(edgec.api, "compile_model", lambda *a, **k: pytest.fail("compiled before refusing -o"))
    result = cli("build", work / "plain.onnx", "-o", link)
    assert_one_error(result.stderr, result.exit_code, "not a directory")
    assert link.is_symlink() and list(elsewhere.iterdir()) == []


def test_non_bundle_dir_refused_and_empty_dir_accepted(work, tmp_path):
    full, empty = tmp_path / "full", tmp_path / "empty"
    full.mkdir()
    empty.mkdir()
    for i in range(5):
        (full / f"f{i}.txt").write_text("mine")
    result = cli("build", work / "plain.onnx", "-o", full)
    line = assert_one_error(result.stderr, result.exit_code, "edgec did not write", "f0.txt", "and 2 more")
    assert "f4.txt" not in line
    assert len(list(full.iterdir())) == 5
    assert cli("build", work / "plain.onnx", "-o", empty).exit_code == 0
    assert (empty / "manifest.json").is_file()


def test_intact_bundle_replaced(work, bundle, tmp_path):
    out = Path(shutil.copytree(bundle, tmp_path / "b"))
    result = cli("build", work / "plain.onnx", "-o", out)
    assert result.exit_code == 0, result.output


# ------------------------------------------------------------------------------------------ one process

def test_rebuild_in_same_process_runs_new_library(tmp_path):
    """The dynamic loader reuses a loaded library of the same path: a rebuilt bundle must still run its own.
    The second model differs in code (Sigmoid for Relu), not only in weights, which live in params.bin."""
    x = {"x": np.random.default_rng(0).random((1, 3, 8, 8), dtype=np.float32)}
    out = tmp_path / "b"
    first = conv_relu(tmp_path / "first.onnx", seed=0)
    api.build(first, "host", out)
    y1 = api.run(out, x).outputs["y"]
    assert_matches_onnxruntime(first, {"y": y1}, x)
    second = conv_relu(tmp_path / "second.onnx", seed=1, activation="Sigmoid")
    api.build(second, "host", out)
    y2 = api.run(out, x).outputs["y"]
    assert not np.allclose(y1, y2)
    assert_matches_onnxruntime(second, {"y": y2}, x)


# ------------------------------------------------------------------------------------------ tolerance rule

EDGES = {  # name -> (output, expected, ok under atol=1e-3, rtol=1e-2)
    "equal": ([1.0, 2.0], [1.0, 2.0], True),
    "within atol + rtol*max|ref|": ([1.0, 2.0 + 0.021], [1.0, 2.0], True),     # 0.021 <= 1e-3 + 1e-2 * 2
    "beyond": ([1.0, 2.0 + 0.0215], [1.0, 2.0], False),
    "nan equals nan": ([np.nan, 1.0], [np.nan, 1.0], True),
    "nan vs number": ([np.nan, 1.0], [0.0, 1.0], False),
    "number vs nan": ([0.0, 1.0], [np.nan, 1.0], False),
    "same infinity": ([np.inf, 1.0], [np.inf, 1.0], True),
    "opposite infinity": ([-np.inf, 1.0], [np.inf, 1.0], False),
    "zero reference": ([0.0005, 0.0], [0.0, 0.0], True),
    "zero reference beyond atol": ([0.002, 0.0], [0.0, 0.0], False),
}


@pytest.mark.parametrize("case", EDGES)
def test_tolerance_rule_edge_cases(case):
    out, ref, ok = EDGES[case]
    tol = Tolerance(atol=1e-3, rtol=1e-2)
    out, ref = np.array(out, np.float32), np.array(ref, np.float32)
    assert compare_outputs({"y": out}, {"y": ref}, tol).ok is ok
    assert bundle_runner().compare({"y": out}, {"y": ref}, tol.atol, tol.rtol)["y"]["ok"] is ok


def test_tolerance_rule_names_shapes_dtypes():
    a = np.zeros((1, 2), np.float32)
    c = compare_outputs({"y": a, "extra": a}, {"y": a.astype(np.float64), "z": a})
    assert not c.ok
    assert c.outputs["y"].problem == "dtype float32 differs from the expected float64"
    assert c.outputs["z"].problem == "missing from the outputs"
    assert c.outputs["extra"].problem == "not an expected output"
    assert compare_outputs({"y": a}, {"y": np.zeros((2, 1), np.float32)}).outputs["y"].problem.startswith("shape")
    assert compare_outputs({"y": a[:0]}, {"y": a[:0]}).ok


@pytest.mark.parametrize("shift, ok", [(0.9, True), (1.1, False)])
def test_run_py_check_applies_the_same_rule(bundle, tmp_path, shift, ok):
    """run.py --check on a bundle whose expected output is moved by `shift` times the manifest's tolerance
    agrees with compare_outputs on the same arrays."""
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    m = json.loads((copy / "manifest.json").read_text())
    tol = Tolerance(**m["verification"]["tolerance"])
    path = copy / "sample" / "expected" / m["outputs"][0]["file"]
    expected = np.load(path)
    actual = api.run(copy, {"x": np.load(copy / "sample" / "inputs" / m["inputs"][0]["file"])}).outputs["y"]
    moved = expected.copy()
    i = int(np.argmin(expected))             # moving the smallest element leaves max |expected| as it is
    moved.flat[i] = actual.flat[i] + shift * (tol.atol + tol.rtol * float(np.abs(expected).max()))
    np.save(path, moved)
    proc = run_py(copy, "--check", "--no-verify", cwd=tmp_path)
    assert (proc.returncode == 0) is ok, proc.stdout + proc.stderr
    assert compare_outputs({"y": actual}, {"y": moved}, tol).ok is ok


# ------------------------------------------------------------------------------------------ devices

def test_runner_chosen_from_the_descriptor():
    import dataclasses

    import tvm

    from edgec.runtime import choose_runner
    from edgec.targets import load_target

    host, rpi4 = load_target("host"), load_target("rpi4")
    assert choose_runner(host) == "in-process"
    with pytest.raises(EdgecError, match="no emulator"):
        choose_runner(dataclasses.replace(rpi4, emulator=None))
    with pytest.raises(EdgecError, match="cuda device .* cannot be emulated"):
        choose_runner(dataclasses.replace(rpi4, device=dataclasses.replace(rpi4.device, kind="cuda")))
    if not tvm.cuda().exist:
        with pytest.raises(EdgecError, match="no cuda device"):
            choose_runner(dataclasses.replace(host, device=dataclasses.replace(host.device, kind="cuda")))


def test_run_py_refuses_a_device_this_machine_lacks(bundle, tmp_path):
    import tvm

    if tvm.cuda().exist:
        pytest.skip("this machine has a CUDA device")
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    m = json.loads((copy / "manifest.json").read_text())
    m["target"]["device"]["kind"] = "cuda"
    (copy / "manifest.json").write_text(json.dumps(m))
    proc = run_py(copy, cwd=tmp_path)
    assert_one_error(proc.stderr, proc.returncode, "no cuda device")
