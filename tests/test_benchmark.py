"""edgec.benchmark: alternated blocks in separate worker processes, threads really used, ratio and spread, the
peers (the reference runtime and IREE)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgec import api, report
from edgec.benchmark import (Block, WorkerSpec, _agrees_with_reference, bench, latency, ratio_of_medians, run_blocks,
                             threads_used)
from edgec.cli import main
from edgec.errors import EdgecError
from edgec.examples import mobilenet_v2
from edgec.reference import ReferenceRuntime


def _iree_installed() -> bool:
    try:
        import iree.compiler  # noqa: F401
        import iree.runtime  # noqa: F401
    except ImportError:
        return False
    return True


needs_iree = pytest.mark.skipif(not _iree_installed(), reason="IREE is not installed: pip install -e '.[bench]' "
                                "(cross/install.sh installs it)")


def _children() -> set[int]:
    """Live child processes of this process."""
    kids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid() and fields[0] != "Z":
            kids.add(int(stat.parent.name))
    return kids


def _onnx(path: Path, nodes, inputs, outputs, weights=()) -> Path:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs, list(weights))
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 1)]
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=8), path)
    return path


def _f32(name: str, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)


def _unary(path: Path, op: str, **attrs) -> Path:
    """y = op(x) on a 1x4 x: a model that compiles in a second."""
    domain = "ai.onnx.ml" if op == "Binarizer" else ""
    return _onnx(path, [helper.make_node(op, ["x"], ["y"], domain=domain, **attrs)], [_f32("x", [1, 4])],
                 [_f32("y", [1, 4])])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(model, host bundle) of a narrow 96x96 MobileNetV2: quick to build and to run."""
    d = tmp_path_factory.mktemp("bench")
    model = mobilenet_v2(d / "mnv2_small.onnx", width=0.35, resolution=96)
    return model, api.build(model, "host", d / "bundle").bundle_dir


@pytest.fixture(scope="module")
def matmul(tmp_path_factory) -> Path:
    """A 256x1024 @ 1024x1024 MatMul: enough work per run for onnxruntime to keep every intra-op thread busy."""
    w = numpy_helper.from_array(np.random.default_rng(0).random((1024, 1024), dtype=np.float32), "w")
    return _onnx(tmp_path_factory.mktemp("mm") / "matmul.onnx", [helper.make_node("MatMul", ["x", "w"], ["y"])],
                 [_f32("x", [256, 1024])], [_f32("y", [256, 1024])], [w])


def _block(pid, times, wall=1.0, cpu=None, idle=None) -> Block:
    return Block("edgec", pid, 0.0, 0.0, tuple(times), wall, cpu, idle)


def test_ratio_of_medians_and_spread_from_given_times():
    a = [[10.0, 12.0, 11.0], [20.0, 22.0, 21.0]]
    b = [[1.0, 1.0, 1.0], [2.0, 2.0, 2.0]]
    r = ratio_of_medians(a, b)
    assert r.value == pytest.approx(16.0 / 1.5)          # medians of all runs: 16 and 1.5
    assert (r.low, r.high) == pytest.approx((10.5, 11.0))  # per block pair: 11/1 and 21/2
    with pytest.raises(ValueError):
        ratio_of_medians(a, b[:1])


def test_threads_used_counts_threads_busy_for_a_fifth_of_the_wall_time():
    t = threads_used({1: 1.9, 2: 0.5, 3: 0.3, 4: 0.01}, wall_s=2.0, configured=4)
    assert (t.configured, t.used) == (4, 2)
    assert t.cpu_fraction == (0.95, 0.25, 0.15)         # descending, under 1% left out
    assert threads_used(None, 1.0, 2).used is None


def test_latency_pools_own_blocks_and_takes_idle_cpu_from_the_others():
    blocks = [_block(1, [1, 2, 3, 4, 5], cpu={11: 0.9, 12: 0.0}, idle={2: 0.1}),
              _block(2, [100, 100], wall=0.5, idle={1: 0.0}),
              _block(1, [6, 7, 8, 9, 10], cpu={11: 0.9, 12: 0.3}, idle={2: 0.3})]
    lat = latency("x", 1, 0, blocks, configured=2)
    assert lat.times_ms == tuple(range(1, 11)) and lat.block_medians_ms == (3.0, 8.0)
    assert (lat.median_ms, lat.p10_ms, lat.p90_ms, lat.min_ms) == pytest.approx((5.5, 1.9, 9.1, 1.0))
    assert lat.threads.used == 1 and lat.threads.cpu_fraction == (0.9, 0.15)
    assert lat.idle_cores == 0.0                          # worker 1 while worker 2's block ran
    assert latency("y", 2, 0, blocks, configured=2).idle_cores == pytest.approx(0.4 / 2.0)


def test_bench_alternates_blocks_of_separate_processes(small):
    model, bundle = small
    before = _children()
    result = bench(bundle, runs=3, blocks=3, warmup=1, threads=1, compare_model=model)
    (peer,) = result.peers
    e, r = result.edgec, peer.latency
    assert peer.peer == "reference" and peer.skipped is None
    assert len({e.pid, r.pid, os.getpid()}) == 3
    assert [(b.runtime, b.pid) for b in result.blocks] == [("edgec", e.pid), ("reference", r.pid)] * 3
    # The workers' own clock: each block ended before the next one started, so one runtime ran at a time.
    assert all(x.end <= y.start for x, y in zip(result.blocks, result.blocks[1:]))
    assert len(e.times_ms) == len(r.times_ms) == 9 and len(e.block_medians_ms) == 3
    assert e.runtime.startswith("edgec (TVM") and r.runtime.startswith("onnxruntime") and peer.runtime == r.runtime
    assert e.threads.configured == r.threads.configured == 1 and e.threads.used == r.threads.used == 1
    assert peer.ratio == ratio_of_medians([b.times_ms for b in result.blocks[0::2]],
                                          [b.times_ms for b in result.blocks[1::2]])
    assert result.runner_peak_rss_bytes > 1 << 20
    assert _children() == before                          # both workers stopped


def test_profile_times_every_call_of_a_run(small):
    """--profile: after the timed blocks, edgec's worker times each function its VM calls: the 53 offloaded layers
    in oneDNN's call sites, TVM's kernels and the VM's builtins, which add up to about one run."""
    _, bundle = small
    result = bench(bundle, runs=3, blocks=2, warmup=1, threads=1, profile_runs=5, measure_memory=False)
    assert result.profile_runs == 5 and result.profile
    calls = {kind: sum(c.calls for c in result.profile if c.kind == kind) for kind in ("onednn", "tvm", "vm")}
    assert calls["onednn"] == 53 and calls["tvm"] > 0 and calls["vm"] > 0, calls
    assert [c.median_ms for c in result.profile] == sorted((c.median_ms for c in result.profile), reverse=True)
    total = sum(c.median_ms for c in result.profile)
    assert 0.5 * result.edgec.min_ms < total < 3 * result.edgec.median_ms, (total, result.edgec)
    text = report.bench_text(result)
    assert "profile: edgec's calls over 5 runs" in text and "by kind: onednn" in text
    assert len(report.bench_json(result)["profile"]) == len(result.profile)


def test_three_runtimes_alternate_a_b_c(small):
    model, bundle = small
    x = {"input": np.random.default_rng(0).random((1, 3, 96, 96), dtype=np.float32)}
    specs = [WorkerSpec("edgec", bundle, 1), WorkerSpec("reference", model, 1), WorkerSpec("reference", model, 2)]
    timing = run_blocks(specs, x, runs=2, blocks=3, warmup=1)
    a, b, c = timing.pids
    assert len({a, b, c, os.getpid()}) == 4 and timing.skipped == (None, None, None)
    assert [(blk.runtime, blk.pid) for blk in timing.blocks] == [("edgec", a), ("reference", b), ("reference", c)] * 3
    assert all(x.end <= y.start for x, y in zip(timing.blocks, timing.blocks[1:]))
    # Every block measured both idle workers, each by its pid.
    assert [sorted(blk.idle_cpu_s) for blk in timing.blocks] == [sorted({a, b, c} - {blk.pid}) for blk in timing.blocks]
    assert all(latency(n, pid, 1, timing.blocks, 1).idle_cores is not None for n, pid in zip(timing.names, timing.pids))


def test_thread_counting_tells_one_busy_thread_from_two(matmul):
    x = {"x": np.random.default_rng(0).random((256, 1024), dtype=np.float32)}
    timing = run_blocks([WorkerSpec("reference", matmul, 1), WorkerSpec("reference", matmul, 2)], x,
                        runs=5, blocks=2, warmup=2)
    one, two = (latency(name, pid, 2, timing.blocks, n)
                for name, pid, n in zip(timing.names, timing.pids, (1, 2)))
    assert [b.pid for b in timing.blocks] == list(timing.pids) * 2
    assert one.threads.used == 1, one.threads
    assert two.threads.used == 2, two.threads


def test_a_failing_worker_is_one_error_and_leaves_no_process(small, tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    before = _children()
    with pytest.raises(EdgecError, match="^onnxruntime .* cannot load bad.onnx"):
        bench(small[1], runs=1, blocks=1, warmup=0, compare_model=bad, measure_memory=False)
    assert _children() == before


def test_cli_bench_compare_prints_threads_and_ratio(small):
    model, bundle = small
    args = ["bench", str(bundle), "--compare", str(model), "--runs", "2", "--blocks", "2", "--warmup", "1",
            "--threads", "1", "--no-memory"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert re.search(r"^  edgec \(TVM .* 1 / 1 ", out.output, re.M), out.output
    assert re.search(r"^  onnxruntime .* 1 / 1 ", out.output, re.M), out.output
    assert "threads used / configured" in out.output and "numpy in -> numpy out" in out.output
    assert re.search(r"^ratio edgec / onnxruntime \(medians of all runs\): \d+\.\d\dx, per-block range "
                     r"\d+\.\d\dx-\d+\.\d\dx", out.output, re.M), out.output
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert [b["runtime"] for b in data["blocks"]] == ["edgec", "reference"] * 2
    (peer,) = data["peers"]
    assert peer["latency"]["threads"]["configured"] == 1 and peer["ratio"]["value"] > 0
    assert data["machine"]["llvm_cpu"] and "ratio_spread" in data["definitions"]


def test_cli_peers_needs_compare_and_known_names(small):
    _, bundle = small
    out = CliRunner().invoke(main, ["bench", str(bundle), "--peers", "iree"])
    assert out.exit_code == 2 and "--peers needs --compare MODEL" in out.output, out.output
    out = CliRunner().invoke(main, ["bench", str(bundle), "--compare", str(small[0]), "--peers", "tflm"])
    assert out.exit_code == 2 and "unknown peer 'tflm'" in out.output, out.output


@needs_iree
def test_iree_worker_outputs_match_onnxruntime_by_name(tmp_path):
    """Two outputs of different shapes, a dynamic batch dim pinned to the input's: IREE's outputs come back by
    name, as numpy, and agree with onnxruntime's."""
    w = numpy_helper.from_array(np.random.default_rng(1).random((8, 4), dtype=np.float32), "w")
    model = _onnx(tmp_path / "two.onnx", [helper.make_node("MatMul", ["x", "w"], ["mm"]),
                                          helper.make_node("Relu", ["x"], ["relu"])], [_f32("x", ["N", 8])],
                  [_f32("relu", ["N", 8]), _f32("mm", ["N", 4])], [w])
    x = {"x": np.random.default_rng(0).standard_normal((3, 8), dtype=np.float32)}
    seen = []
    timing = run_blocks([WorkerSpec("iree", model, 1)], x, runs=2, blocks=1, warmup=0,
                        check=lambda outputs: seen.append(outputs))
    assert timing.skipped == (None,) and timing.names[0].startswith("IREE ") and len(timing.blocks) == 1
    (outputs,) = seen
    expected = ReferenceRuntime(model).run(x)
    assert sorted(outputs) == ["mm", "relu"]
    for name in expected:
        assert isinstance(outputs[name], np.ndarray) and outputs[name].shape == expected[name].shape
        np.testing.assert_allclose(outputs[name], expected[name], rtol=1e-5, atol=1e-5)


@needs_iree
def test_a_peer_with_wrong_numbers_is_not_timed(tmp_path):
    relu, sigmoid = _unary(tmp_path / "relu.onnx", "Relu"), _unary(tmp_path / "sigmoid.onnx", "Sigmoid")
    x = {"x": np.random.default_rng(0).random((1, 4), dtype=np.float32)}
    # IREE runs Relu, checked against onnxruntime running Sigmoid on the same input.
    timing = run_blocks([WorkerSpec("iree", relu, 1)], x, runs=1, blocks=2, warmup=0,
                        check=_agrees_with_reference(sigmoid, x))
    assert timing.blocks == ()
    assert re.fullmatch(r"outputs differ from onnxruntime \S+ on 'y': max abs error .*", timing.skipped[0])


@needs_iree
def test_iree_compile_failure_is_one_line_and_the_benchmark_goes_on(tmp_path):
    """onnxruntime runs ai.onnx.ml's Binarizer, IREE cannot import it: IREE's row says why, the rest is timed."""
    bundle = api.build(_unary(tmp_path / "relu.onnx", "Relu"), "host", tmp_path / "relu").bundle_dir
    binarizer = _unary(tmp_path / "binarizer.onnx", "Binarizer", threshold=0.5)
    before = _children()
    result = bench(bundle, runs=2, blocks=2, warmup=0, threads=1, compare_model=binarizer,
                   peers=("reference", "iree"), measure_memory=False)
    ref, iree = result.peers
    assert ref.latency is not None and ref.ratio is not None and iree.latency is None and iree.ratio is None
    assert iree.skipped.startswith("iree-compile cannot compile binarizer.onnx: ") and "onnx.Binarizer" in iree.skipped
    assert "\n" not in iree.skipped and len(iree.skipped) < 300
    assert [b.runtime for b in result.blocks] == ["edgec", "reference"] * 2
    assert _children() == before
    out = CliRunner().invoke(main, ["bench", str(bundle), "--compare", str(binarizer), "--peers", "reference,iree",
                                    "--runs", "1", "--blocks", "1", "--warmup", "0", "--no-memory"])
    assert out.exit_code == 0, out.output
    assert re.search(r"^  IREE +not timed: iree-compile cannot compile binarizer.onnx: .*onnx\.Binarizer", out.output,
                     re.M), out.output
    assert re.search(r"^ratio edgec / onnxruntime ", out.output, re.M) and "ratio edgec / IREE" not in out.output


@needs_iree
def test_cli_bench_iree_peer_prints_its_threads_and_ratio(small):
    model, bundle = small
    args = ["bench", str(bundle), "--compare", str(model), "--peers", "reference,iree", "--runs", "2", "--blocks",
            "2", "--warmup", "1", "--threads", "1", "--no-memory"]
    out = CliRunner().invoke(main, args)
    assert out.exit_code == 0, out.output
    assert "alternated edgec, onnxruntime, IREE, edgec, onnxruntime, IREE, ..." in out.output, out.output
    # IREE's calling thread runs its VM beside the one task worker: they take turns, both counted when busy.
    assert re.search(r"^  IREE \S+ \(llvm-cpu\) .* [12] / 1 ", out.output, re.M), out.output
    assert re.search(r"^ratio edgec / IREE \(medians of all runs\): \d+\.\d\dx, per-block range "
                     r"\d+\.\d\dx-\d+\.\d\dx", out.output, re.M), out.output
    data = json.loads(CliRunner().invoke(main, [*args, "--json"]).output)
    assert [b["runtime"] for b in data["blocks"]] == ["edgec", "reference", "iree"] * 2
    assert [p["peer"] for p in data["peers"]] == ["reference", "iree"]
    assert data["peers"][1]["skipped"] is None and data["peers"][1]["ratio"]["value"] > 0


def test_bench_models_script_prints_every_readme_row(small, tmp_path):
    model, _ = small
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_models.py"
    out = subprocess.run([sys.executable, str(script), str(model), "--no-rpi4", "--runs", "1", "--blocks", "1",
                          "--warmup", "0", "--offload", "none", "--json", str(tmp_path / "out.json")],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    for row in ("build time host / rpi4", "bundle (library) host / rpi4", "operators before → after fusion",
                "activation buffers (host), with / without memory planning", "max abs error vs reference runtime, host",
                "max abs error vs reference runtime, rpi4 under qemu", "host latency, 2 threads, edgec default build",
                "host latency, 2 threads, edgec --offload none", "host latency, 2 threads, reference",
                "host latency, 2 threads, IREE", "threads used: edgec / reference / IREE",
                "C++ runner peak RSS"):
        assert f"| {row}" in out.stdout, (row, out.stdout)
    assert re.search(r"^\d{4}-\d\d-\d\d: .+ \(LLVM: \S+; .*\), \d+ cores", out.stdout, re.M), out.stdout
    data = json.loads((tmp_path / "out.json").read_text())
    # IREE is timed when installed, else its row says it is not.
    # the --offload none build is a second edgec worker, timed right after the default build's
    assert [b["runtime"] for b in data["models"][0]["bench"]["blocks"]] == ["edgec", "edgec", "reference"] + [
        "iree"] * _iree_installed()
    assert data["models"][0]["host"]["comparison"]["ok"] and data["models"][0]["offload"]["none"]["comparison"]["ok"]
    assert data["models"][0]["offload"]["none"]["summary"]["offload"] is None   # nothing was offloaded
    assert re.search(r"\| host latency, 2 threads, edgec default build .*\| [\d.]+ ms; [\d.]+x onnxruntime", out.stdout)


def test_bench_board_runs_on_a_machine_without_edgec_or_tvm(tmp_path):
    """bench_board.py: `prepare` builds the four bundles, the runner and onnxruntime's outputs; `run` checks and
    times them with edgec_run and onnxruntime alone (edgec and tvm made unimportable), the int8 bundles within
    their quantization error of onnxruntime's QDQ math and the float ones at float precision."""
    script = Path(__file__).resolve().parents[1] / "bench" / "bench_board.py"
    board = tmp_path / "board"
    prepared = subprocess.run([sys.executable, str(script), "prepare", str(board), "--target", "host",
                               "--models", "resnet-small", "--calibration", "2"], capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr
    without = ("import runpy, sys; sys.modules.update(tvm=None, tvm_ffi=None, edgec=None); "
               "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')")
    ran = subprocess.run([sys.executable, "-c", without, str(board / "bench_board.py"), "run", str(board),
                          "--runs", "2", "--blocks", "1", "--warmup", "0", "--threads", "1"],
                         capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    rows = {m.group(1): m.group(2) for m in re.finditer(
        r"^\| ResNet-20 \(generated, 32x32\) \| ([^|]+?) \| [\d.]+ \([\d.]+-[\d.]+\) \|.*"
        r"\| logits: (?:SQNR )?([\d.]+ dB|exact)",
        ran.stdout, re.M)}
    assert set(rows) == {"edgec fp32", "edgec int8", "edgec fp32, offload none", "edgec int8, offload none"}, ran.stdout
    for runtime, sqnr in rows.items():
        assert sqnr == "exact" or float(sqnr.removesuffix(" dB")) > (30 if "int8" in runtime else 90), runtime
    assert re.search(r"^\| ResNet-20 \(generated, 32x32\) \| onnxruntime int8 \| [\d.]+ ", ran.stdout, re.M)
    # the library kept once for all bundles is back in each bundle that ships it
    bundles = json.loads((board / "plan.json").read_text())["models"][0]["bundles"]
    assert [b["shared"] for b in bundles] == [["lib/libdnnl.so.2"]] * 2 + [[]] * 2
    assert all((board / b["dir"] / lib).is_file() for b in bundles for lib in b["shared"])
