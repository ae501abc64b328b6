"""--offload auto on the host: a build that times each offloaded group against TVM's kernel verifies and records
every decision with both timings (summary, --json, manifest); the decision follows the timings (injected here,
so deterministic: which one wins on real timings is never asserted); a rebuild takes the decisions from the cache;
a target this machine cannot run is refused in one line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgec import api, report
from edgec.build import BuildOptions
from edgec.context import OFFLOAD_AUTO
from edgec.errors import EdgecError
from edgec.examples import mobilenet_v2
from edgec.manifest import Manifest
from edgec.offload import auto, parse_option
from verify import assert_close_to_reference

AUTO = BuildOptions(offload=OFFLOAD_AUTO)
RNG = np.random.default_rng(7)


def build(model, out, options=AUTO) -> api.BuildResult:
    result = api.build(model, "host", out, options=options)
    assert result.manifest.verification["status"] == "verified", result.manifest.verification
    return result


def _weight(*shape):
    return (RNG.standard_normal(shape) * 0.2).astype(np.float32)


@pytest.fixture(scope="module")
def two_groups(tmp_path_factory):
    """Two equal conv + bias + ReLU blocks (one group, two calls), then a Gemm with bias: two distinct groups."""
    inits, nodes = [], []
    for i, x in enumerate(("x", "r0")):
        inits += [numpy_helper.from_array(_weight(8, 8, 3, 3), f"w{i}"), numpy_helper.from_array(_weight(8), f"b{i}")]
        nodes += [helper.make_node("Conv", [x, f"w{i}", f"b{i}"], [f"c{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
                  helper.make_node("Relu", [f"c{i}"], [f"r{i}"])]
    inits += [numpy_helper.from_array(_weight(10, 8 * 16 * 16), "g_w"), numpy_helper.from_array(_weight(10), "g_b")]
    nodes += [helper.make_node("Flatten", ["r1"], ["f"]), helper.make_node("Gemm", ["f", "g_w", "g_b"], ["y"], transB=1)]
    graph = helper.make_graph(nodes, "two_groups", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)
    path = tmp_path_factory.mktemp("models") / "two_groups.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8      # what the installed onnxruntime reads
    onnx.save(model, path)
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    return mobilenet_v2(tmp_path_factory.mktemp("models") / "mnv2_small.onnx", width=0.35, resolution=96)


@pytest.fixture(scope="module")
def measured(small_cnn, cache_dir, tmp_path_factory):
    """The small CNN built with --offload auto, really measured (an empty decision cache)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EDGEC_CACHE_DIR", str(cache_dir))
        # under pytest -n 2 the other worker shares the 2 cores, and the timing took over the 120 s a build allows
        mp.setattr(auto, "TIME_LIMIT_S", 900.0)
        return build(small_cnn, tmp_path_factory.mktemp("b") / "auto")


def test_auto_build_verifies_and_records_every_decision(small_cnn, measured):
    assert_close_to_reference(small_cnn, measured.bundle_dir)
    rows = report.build_json(measured)["offload"]
    decided = [r for r in rows if r["measured"]]
    # every conv2d and matmul the oneDNN patterns take (test_offload: 52 + 1) was timed both ways
    assert sum(r["count"] for r in decided) == 53
    assert all(r["measured"] for r in rows if r["backend"]), rows
    for r in decided:
        m = r["measured"]
        assert m["backend_ms"] > 0 and m["tvm_ms"] > 0
        assert (r["backend"] == "onednn") == (m["backend_ms"] <= m["tvm_ms"]), r
        assert f"auto: {'onednn' if r['backend'] else 'TVM'} " in r["detail"] and " ms vs " in r["detail"]
    text = report.build_text(measured)
    assert text.count("; auto: onednn ") + text.count("TVM: auto: TVM ") == len(decided)
    # the manifest holds the same decisions, and reads back
    manifest = Manifest.load(measured.bundle_dir)
    assert sorted((d.group, d.calls, d.runs_in, d.backend_ms, d.tvm_ms) for d in manifest.offload_auto) == sorted(
        (r["measured"]["group"], r["count"], r["backend"] or "tvm", r["measured"]["backend_ms"],
         r["measured"]["tvm_ms"]) for r in decided)


def test_rebuild_takes_the_decisions_from_the_cache(small_cnn, measured, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(cache_dir))

    def no_measuring(*args):
        raise AssertionError("measured again although every group is cached")

    monkeypatch.setattr(auto, "measure", no_measuring)
    again = build(small_cnn, tmp_path / "again")
    assert again.manifest.offload_auto == measured.manifest.offload_auto


def test_decision_follows_the_timings(two_groups, tmp_path, monkeypatch):
    """Injected timings: TVM faster for the conv group (it goes back to TVM, fused there with its bias and ReLU),
    the library faster for the matmul (it stays offloaded); each distinct group is measured once."""
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    asked = []

    def injected(mod, groups, ctx, backends):
        asked.extend((g.operator, g.calls) for g in groups)
        return {g.key: auto.Timing(0.2, 0.1) if g.operator == "conv2d" else auto.Timing(0.05, 0.5) for g in groups}

    monkeypatch.setattr(auto, "measure", injected)
    dump = tmp_path / "ir"
    result = build(two_groups, tmp_path / "b", BuildOptions(offload=OFFLOAD_AUTO, dump_ir=dump))
    assert sorted(asked) == [("conv2d", 2), ("matmul", 1)]
    rows = {r.operator: r for r in result.compiled.offload}
    assert rows["conv2d"].backend is None and rows["conv2d"].count == 2
    assert rows["conv2d"].detail == "auto: TVM 0.1 ms vs onednn 0.2 ms (onednn.conv2d_bias_relu on 1x16x16x8)"
    assert rows["matmul"].backend == "onednn"
    assert rows["matmul"].detail == "onednn.matmul_bias on 1x2048; auto: onednn 0.05 ms vs TVM 0.5 ms"
    assert [(d.operator, d.runs_in) for d in result.manifest.offload_auto] == [("matmul", "onednn"), ("conv2d", "tvm")]
    # --dump-ir shows the step's effect: the convolutions are plain operators of main again, the matmul a call
    after = next(dump.glob("*-offload-auto.py")).read_text()
    main = after[after.index("def main"):]
    assert main.count("R.nn.conv2d(") == 2 and "fused_relax_matmul" in main and "fused_relax_nn_conv2d" not in main
    fused = [r.calls for r in result.compiled.passes if r.name in ("fuse-ops", "fuse-tir")]
    legalized = next(r.calls for r in result.compiled.passes if r.name == "legalize-ops")
    assert fused[-1] < legalized     # TVM fused each returned conv with its bias and ReLU
    assert_close_to_reference(two_groups, result.bundle_dir)
    # a manifest whose offload_auto is damaged is refused by edgec in one line (runners ignore the field)
    path = result.bundle_dir / "manifest.json"
    data = json.loads(path.read_text())
    data["offload_auto"][0]["tvm_ms"] = "fast"
    path.write_text(json.dumps(data))
    with pytest.raises(EdgecError, match="offload_auto entry"):
        Manifest.load(result.bundle_dir)


def test_disabled_step_keeps_the_partition(two_groups, tmp_path, monkeypatch):
    monkeypatch.setattr(auto, "measure", lambda *a: pytest.fail("offload-auto ran although disabled"))
    result = build(two_groups, tmp_path / "b", BuildOptions(offload=OFFLOAD_AUTO, disabled_passes=("offload-auto",)))
    assert {(p.operator, p.backend) for p in result.compiled.offload} == {("conv2d", "onednn"), ("matmul", "onednn")}
    assert result.manifest.offload_auto == ()


def _edgec(*args):
    return subprocess.run([sys.executable, "-m", "edgec.cli", *map(str, args)], capture_output=True, text=True)


def test_auto_for_another_architecture_is_one_line(two_groups, tmp_path):
    done = _edgec("build", two_groups, "-t", "rpi4", "--offload", "auto", "-o", tmp_path / "b")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --offload auto measures each operator on this machine")
    assert "--offload xnnpack" in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "b").exists()


def test_option_and_pipeline_listing():
    assert parse_option("auto") == OFFLOAD_AUTO
    with pytest.raises(EdgecError, match="is not 'none', 'auto' or a list"):
        parse_option("auto,onednn")
    listed = _edgec("passes", "-t", "host", "--offload", "auto").stdout
    assert any(" run  offload-auto " in line for line in listed.splitlines())
    disabled = _edgec("passes", "-t", "host", "--offload", "auto", "--disable-pass", "offload-auto").stdout
    assert any(" skip offload-auto " in line and "disabled" in line for line in disabled.splitlines())


def test_time_limit_is_one_line_and_leaves_nothing(two_groups, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(auto, "TIME_LIMIT_S", 0.0)
    with pytest.raises(EdgecError, match=r"timing the operator groups took over 0 s") as error:
        api.build(two_groups, "host", tmp_path / "b", options=AUTO)
    assert "--offload onednn" in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "b").exists() and not (tmp_path / "cache" / "offload-auto").exists()


@pytest.mark.parametrize("user, added", [
    ({}, {"TVM_THREAD_POOL_SPIN_COUNT": "0", "TVM_BIND_THREADS": "0", "GOMP_SPINCOUNT": "10000"}),
    ({"OMP_WAIT_POLICY": "PASSIVE"}, {"TVM_THREAD_POOL_SPIN_COUNT": "0", "TVM_BIND_THREADS": "0"}),
    ({"GOMP_SPINCOUNT": "5", "TVM_THREAD_POOL_SPIN_COUNT": "7", "TVM_BIND_THREADS": "1"}, {}),
])
def test_candidates_are_timed_as_the_runners_will_run(monkeypatch, user, added):
    """The timing workers get what run.py (and edgec_run) add to the environment, and no more: GOMP_SPINCOUNT
    overrode the user's OMP_WAIT_POLICY (and GOMP_SPINCOUNT), which the bundle's runners leave alone; the spin
    settings key the cache, so a timing under one policy is not reused under another."""
    from edgec.runtime import bundle_runner

    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TVM_THREAD_POOL_SPIN_COUNT", "TVM_BIND_THREADS"):
        monkeypatch.delenv(name, raising=False)
    default = auto._spin_settings()
    for name, value in user.items():
        monkeypatch.setenv(name, value)
    assert auto.timing_environment(3) == {**added, "TVM_NUM_THREADS": "3"}
    assert bundle_runner().offload_thread_environment(dict(user)) == added
    assert (auto._spin_settings() == default) == (not user)


@pytest.fixture(scope="module")
def int8_forms(tmp_path_factory):
    """onnxruntime's QDQ model (7-bit weights: oneDNN takes them on any CPU) of every conv form (3x3 padded, depthwise,
    grouped, 1x1) and a Gemm, and a sample."""
    from test_offload_int8 import conv_forms, quantized

    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    model = conv_forms(tmp_path_factory.mktemp("models") / "forms.onnx")
    return quantized(model, samples, reduce_range=True), samples[0]


def _int8_rows(result):
    timed = [r for r in result.compiled.offload if r.measured]
    untimed = [(r.operator, r.backend, r.detail) for r in result.compiled.offload if not r.measured]
    return timed, untimed


def test_int8_chains_are_timed_against_their_integer_kernels(int8_forms, tmp_path, monkeypatch):
    """oneDNN's int8 chains are timed against TVM's integer kernel for the same chain (int8-kernels'), really measured
    here: the 3x3, depthwise and 1x1 convs and the matmul; the grouped conv, which has no integer kernel in TVM (its
    alternative would be float QDQ), stays in oneDNN untimed, in the placement, and its library is linked."""
    qdq, sample = int8_forms
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(auto, "TIME_LIMIT_S", 900.0)
    result = api.build(qdq, "host", tmp_path / "b", options=AUTO, sample_inputs=sample)
    timed, untimed = _int8_rows(result)
    assert sorted((r.operator, r.count) for r in timed) == [("conv2d", 1)] * 3 + [("matmul", 1)], timed
    assert all(r.measured.backend_ms > 0 and r.measured.tvm_ms > 0 for r in timed)
    assert untimed == [("conv2d", "onednn", "onednn.qconv2d_bias")], untimed
    assert result.manifest.verification["status"] == "verified"


def test_int8_chain_tvm_wins_becomes_its_integer_kernel(int8_forms, tmp_path, monkeypatch):
    """Injected timings, TVM faster: each timed int8 chain leaves oneDNN for its integer kernel (call_tir of
    int8-kernels' kernel, not the float QDQ operators), the bundle within one step of onnxruntime's QDQ math."""
    from test_offload_int8 import check_within_one_step

    qdq, sample = int8_forms
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(auto, "measure", lambda mod, groups, ctx, backends: {
        g.key: auto.Timing(0.2, 0.1) for g in groups})
    dump = tmp_path / "ir"
    result = api.build(qdq, "host", tmp_path / "b", options=BuildOptions(offload=OFFLOAD_AUTO, dump_ir=dump),
                       sample_inputs=sample)
    timed, untimed = _int8_rows(result)
    assert len(timed) == 4 and all(r.backend is None and r.detail.startswith("auto: TVM 0.1 ms") for r in timed)
    assert untimed == [("conv2d", "onednn", "onednn.qconv2d_bias")], untimed
    after = next(dump.glob("*-offload-auto.py")).read_text()
    main = after[after.index("def main"):]
    assert sorted(re.findall(r"R\.call_tir\(cls\.(int8_\w+?)\d*,", main)) == [
        "int8_conv2d", "int8_conv2d", "int8_depthwise_conv2d", "int8_matmul"], main
    assert "R.nn.conv2d(" not in main and "R.matmul(" not in main
    assert result.manifest.verification["status"] == "verified"
    assert check_within_one_step(qdq, result.bundle_dir, sample) < 0.05
