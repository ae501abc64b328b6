"""Build-time verification: every build runs its staged bundle through the runner its target uses here and
compares the outputs, by name, with the reference runtime; the manifest and the summary say what happened.
Also: a bundle for every descriptor in targets/, and a TFLite model under qemu."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import tvm
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgec import api
from edgec.cli import main
from edgec.passes import registry
from edgec.targets import Target, all_targets
from edgec.toolchain import build_runner, host_arch
from edgec.verification import VerificationFailed
from models import inputs_for, real_model
from verify import assert_close_to_reference

RNG = np.random.default_rng(7)


def save(graph, path):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def two_in_two_out(path):
    """Outputs listed in the graph as ("zeta", "alpha"), inputs as ("b", "a"): nothing lines up by position or
    alphabetical order, so only a comparison by name passes."""
    w = numpy_helper.from_array(RNG.standard_normal((6, 4)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["alpha"]),
         helper.make_node("Sub", ["b", "a"], ["d"]), helper.make_node("Tanh", ["d"], ["zeta"])],
        "two", [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 6]),
                helper.make_tensor_value_info("a", TensorProto.FLOAT, [2, 6])],
        [helper.make_tensor_value_info("zeta", TensorProto.FLOAT, [2, 6]),
         helper.make_tensor_value_info("alpha", TensorProto.FLOAT, [2, 4])], [w])
    return save(graph, path)


def conv_relu(path):
    w = numpy_helper.from_array((RNG.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c"], ["y"])],
        "conv_relu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [w])
    return save(graph, path)


def gather(path):
    """Gather(table, idx): valid only for indices below 3, which random sample inputs (0..15) are not."""
    table = numpy_helper.from_array(RNG.standard_normal((3, 5)).astype(np.float32), "table")
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "idx"], ["rows"], axis=0)], "gather",
        [helper.make_tensor_value_info("idx", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, [4, 5])], [table])
    return save(graph, path)


def test_outputs_compared_by_name(tmp_path):
    model = two_in_two_out(tmp_path / "two.onnx")
    built = api.build(model, "host", tmp_path / "b")
    v = built.manifest.verification
    assert v["status"] == "verified" and set(v["outputs"]) == {"zeta", "alpha"}
    assert [t.name for t in built.manifest.outputs] == ["zeta", "alpha"]
    result = api.run(built.bundle_dir, {"a": RNG.random((2, 6), dtype=np.float32),
                                        "b": RNG.random((2, 6), dtype=np.float32)})
    comparison = api.compare(result, model)
    assert comparison.ok and set(comparison.outputs) == {"zeta", "alpha"}
    # the same arrays under swapped names must fail: a positional match would have passed
    swapped = dataclasses.replace(result, outputs={"zeta": result.outputs["alpha"], "alpha": result.outputs["zeta"]})
    assert not api.compare(swapped, model).ok


def erf_float64(path):
    """onnxruntime's CPU provider has no float64 Erf kernel (1.31 and 1.32 alike); TVM compiles it."""
    graph = helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "erf64",
                              [helper.make_tensor_value_info("x", TensorProto.DOUBLE, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 3, 8, 8])])
    return save(graph, path)


def test_reference_that_refuses_the_model_marks_the_bundle_not_verified(tmp_path):
    """The reference runtime cannot load the model; edgec still builds, and says the bundle is not verified."""
    model = erf_float64(tmp_path / "erf64.onnx")
    result = CliRunner().invoke(main, ["build", str(model), "-o", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert "NOT VERIFIED: onnxruntime" in result.stdout
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "not verified" and manifest["sample"] is None
    assert "onnxruntime" in manifest["verification"]["reason"]
    assert "not verified" in (tmp_path / "b" / "README.md").read_text()
    # the bundle still runs on the user's input, and run.py --check says there is nothing to check against
    run_py = str(tmp_path / "b" / "run.py")
    ran = subprocess.run([sys.executable, run_py, "--input", f"x={_npy(tmp_path, RNG.random((1, 3, 8, 8)))}"],
                         capture_output=True, text=True)
    assert ran.returncode == 0 and ran.stdout.startswith("y: float64[1, 3, 8, 8]"), ran.stdout + ran.stderr
    check = subprocess.run([sys.executable, run_py, "--check"], capture_output=True, text=True)
    assert check.returncode == 2 and "no sample" in check.stderr, check.stderr
    assert "Traceback" not in check.stderr and len(check.stderr.strip().splitlines()) == 1, check.stderr


def _npy(tmp_path, array):
    path = tmp_path / f"in{RNG.integers(1 << 30)}.npy"
    np.save(path, array)
    return path


def test_invalid_random_sample_then_a_valid_one(tmp_path):
    """Random indices are out of range for Gather: the reference fails on them, the bundle is built "not
    verified"; the user's valid sample (--input at build time) verifies it."""
    model = gather(tmp_path / "gather.onnx")
    unverified = api.build(model, "host", tmp_path / "b1")
    assert unverified.manifest.verification["status"] == "not verified"
    assert "onnxruntime" in unverified.manifest.verification["reason"]
    idx = _npy(tmp_path, np.array([2, 0, 1, 2], np.int64))
    result = CliRunner().invoke(main, ["build", str(model), "-o", str(tmp_path / "b2"), "--input", f"idx={idx}"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "b2" / "manifest.json").read_text())
    assert manifest["verification"]["status"] == "verified"
    assert np.array_equal(np.load(tmp_path / "b2" / "sample" / "inputs" / manifest["inputs"][0]["file"]),
                          np.load(idx))


def test_wrong_numbers_stop_the_build(tmp_path, monkeypatch):
    """A pass that breaks the numbers (here: fold-batchnorm replaced by one that turns every Relu into a
    Sigmoid) is caught before anything is published; the CLI says so with exit code 1, not as a user error."""
    @tvm.transform.module_pass(opt_level=0, name="BrokenFold")
    def broken(mod, ctx):
        from tvm import relax
        from tvm.relax.dpl import is_op, rewrite_call, wildcard

        x = wildcard()
        mod = mod.clone()
        mod["main"] = rewrite_call(is_op("relax.nn.relu")(x), lambda expr, m: relax.op.sigmoid(m[x]), mod["main"])
        return mod

    spec = registry._PASSES["fold-batchnorm"]
    monkeypatch.setitem(registry._PASSES, "fold-batchnorm", dataclasses.replace(spec, make=lambda ctx: broken))
    model = conv_relu(tmp_path / "m.onnx")
    with pytest.raises(VerificationFailed, match="disagrees with onnxruntime .* on output 'y'"):
        api.build(model, "host", tmp_path / "b")
    assert not (tmp_path / "b").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    result = CliRunner().invoke(main, ["build", str(model), "-o", str(tmp_path / "b")])
    assert result.exit_code == 1 and "internal error" not in result.stderr, result.output
    assert result.stderr.startswith("error: the compiled model disagrees with onnxruntime")


@pytest.mark.parametrize("target", sorted(t.name for t in all_targets()))
def test_every_descriptor_builds_and_verifies(tmp_path, target):
    """Every board in targets/ (rpi3 and rpi-zero2w included) builds and is verified on this machine: in
    process for the host, under qemu for the Raspberry Pis."""
    built = api.build(conv_relu(tmp_path / "m.onnx"), target, tmp_path / target)
    v = built.manifest.verification
    assert v["status"] == "verified", v
    assert v["runner"] == ("in-process" if built.manifest.target.arch == host_arch() else "qemu")
    assert built.manifest.target.name == target


def test_code_for_instructions_this_cpu_lacks_is_not_run_here(tmp_path):
    """A board of this architecture whose CPU has an extension this one lacks (AMX on x86, SME on Arm): its code
    would stop edgec with SIGILL, so the build says why it is not verified and `edgec run` refuses in one line."""
    extension = {"x86_64": "amx-tile", "aarch64": "sme"}[host_arch()]
    host = tvm.target.Target({"kind": "llvm", "mtriple": tvm.target.codegen.llvm_get_system_triple(),
                              "mcpu": tvm.target.codegen.llvm_get_system_cpu()})
    if tvm.target.codegen.target_has_features(extension, host):
        pytest.skip(f"this CPU has {extension}")
    board = tmp_path / "board.toml"
    board.write_text(f'''name = "board"
description = "this machine's CPU with {extension}"
arch = "{host_arch()}"

[tvm]
target = {{ kind = "llvm", mtriple = "detect", mcpu = "detect", mattr = ["+{extension}"] }}

[toolchain]
triple = "native"
compiler = "g++"
apt_package = "g++"

[device]
kind = "cpu"
threads = 1
memory_mb = 1024
''')
    built = CliRunner().invoke(main, ["build", str(conv_relu(tmp_path / "m.onnx")), "-t", str(board), "-o",
                                      str(tmp_path / "b")])
    assert built.exit_code == 0, built.output
    reason = json.loads((tmp_path / "b" / "manifest.json").read_text())["verification"]["reason"]
    assert extension in reason and "lacks" in reason, reason
    for command in ("run", "bench"):
        ran = subprocess.run([sys.executable, "-m", "edgec.cli", command, str(tmp_path / "b")], capture_output=True,
                             text=True)
        assert ran.returncode == 2 and ran.stderr.startswith("error: board's code uses") and extension in ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    # the bundle's own runners, where it is deployed, read what its code needs from the manifest and refuse too
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert extension in manifest["cpu_features"] and "aes" not in manifest["cpu_features"]
    runner = build_runner(tmp_path / "b", Target.from_json(manifest["target"], "manifest.json"))
    for command in ([sys.executable, "run.py", "--check"], [str(runner), "-d", "."]):
        ran = subprocess.run(command, cwd=tmp_path / "b", capture_output=True, text=True)
        assert ran.returncode == 2, (command, ran.stdout, ran.stderr)
        assert f"error: the bundle's code uses {extension}, which this machine's CPU lacks" in ran.stderr, ran.stderr
        assert len(ran.stderr.strip().splitlines()) == 1, ran.stderr
    # --quantize evaluates the bundle on held-back samples in process: not this one, and the build says why
    np.savez(tmp_path / "cal.npz", x=RNG.standard_normal((12, 1, 3, 8, 8)).astype(np.float32))
    quantized = CliRunner().invoke(main, ["build", str(tmp_path / "m.onnx"), "-t", str(board), "-o",
                                          str(tmp_path / "q"), "--quantize", "int8", "--calibration",
                                          str(tmp_path / "cal.npz")])
    assert quantized.exit_code == 0, quantized.output
    assert "no before/after table: board's code uses" in quantized.output, quantized.output


def test_runners_know_every_cpu_feature_of_the_shipped_boards():
    """The runners check a bundle's cpu_features against their own tables of LLVM's names (x86 /proc/cpuinfo flags,
    Arm hwcaps) and cannot check a name they lack: every feature of every board in targets/ is in them, and this
    machine has all of its own."""
    from edgec.runtime import bundle_runner
    from edgec.toolchain import cpu_features

    runner = bundle_runner()
    known = set(runner._X86_FLAGS) | set(runner._ARM_HWCAPS)
    for target in all_targets():
        assert set(cpu_features(target.tvm())) <= known, (target.name, set(cpu_features(target.tvm())) - known)
    host = next(t for t in all_targets() if t.name == "host")
    assert cpu_features(host.tvm()) and runner.cpu_features_lacking(cpu_features(host.tvm())) == []


def test_both_runners_hold_the_same_cpu_feature_tables():
    """run.py and main.cc each name the CPU features by their own table: the same entries in both (a feature one
    runner checks and the other does not would make a bundle's fate depend on the runner)."""
    import re
    from pathlib import Path

    from edgec.runtime import bundle_runner

    runner = bundle_runner()
    source = (Path(__file__).resolve().parents[1] / "templates" / "bundle" / "main.cc").read_text()
    x86 = source[source.index("#if defined(__x86_64__)"):source.index("#elif defined(__aarch64__)")]
    arm = source[source.index("#elif defined(__aarch64__)"):source.index("#else", source.index("kHwcaps"))]
    assert dict(re.findall(r'\{"([\w.-]+)", "(\w+)"\}', x86)) == runner._X86_FLAGS
    assert {name: (int(a), int(b)) for name, a, b in re.findall(r'\{"([\w.-]+)", \{(\d+), (\d+)\}\}', arm)} \
        == runner._ARM_HWCAPS


def test_tflite_model_under_qemu(tmp_path):
    name = "face_detection_short_range"
    built = api.build(real_model(name), "rpi4", tmp_path / "face-rpi4")
    assert built.manifest.verification["status"] == "verified"
    assert built.manifest.verification["runner"] == "qemu"
    assert_close_to_reference(real_model(name), built.bundle_dir, inputs_for(name), expect_mode="qemu")
