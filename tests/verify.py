"""Shared test helpers: a bundle checked against the reference runtime on the same inputs (the one way tests check
bundles), where the offload placed each operator, and small generated ONNX models saved."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgec import api, report
from edgec.reference import Comparison, Tolerance
from models import ATOL, RTOL


def _host_int8_limits():
    from edgec.offload.backends.onednn import BACKEND
    from edgec.targets import load_target

    return BACKEND.int8_limits(load_target("host").tvm())


# tests of oneDNN's int8 kernels on full-range weights and s8 inputs, as onnxruntime's quantizer makes them: on a host
# without VNNI the build leaves those layers to TVM (test_offload_int8.py::test_int8_stays_in_tvm_without_vnni checks
# that, and test_7bit_weights_run_in_onednn_without_vnni the layers it takes there)
HOST_INT8_LIMITS = _host_int8_limits()
needs_onednn_int8 = pytest.mark.skipif(HOST_INT8_LIMITS is not None,
                                       reason=f"this host: {HOST_INT8_LIMITS and HOST_INT8_LIMITS.why}, and these "
                                              "weights are full range")


def onnxruntime_as_written(model: Path):
    """onnxruntime running a QDQ model's (de)quantize math as written, graph optimizations off, as edgec's
    verification does: its fused u8 x s8 kernels sum products in saturating 16-bit pairs on x86 CPUs without VNNI,
    up to 5 steps off that math on an AVX2 Zen 3."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])


def assert_close_to_reference(model_path: Path, bundle_dir: Path, inputs: dict[str, np.ndarray] | None = None, *,
                              emulate: bool | None = None, expect_mode: str | None = None,
                              tolerance: Tolerance = Tolerance(ATOL, RTOL)) -> tuple[api.RunResult, Comparison]:
    """Run the bundle (in process, native runner or qemu) and assert every output matches onnxruntime / LiteRT
    by name, with edgec's one tolerance rule."""
    result = api.run(bundle_dir, inputs, emulate=emulate)
    if expect_mode is not None:
        assert result.mode == expect_mode, result.mode
    comparison = api.compare(result, model_path, tolerance)
    summary = ", ".join(o.problem or f"{o.name} max abs {o.max_abs:.3g} (rel {o.max_rel:.3g})"
                        for o in comparison.outputs.values())
    assert comparison.ok, f"{bundle_dir.name} ({result.mode}) vs {comparison.against}: {summary}"
    print(f"{bundle_dir.name} ({result.mode}) vs {comparison.against}: {summary}")
    return result, comparison


def placed(result: api.BuildResult) -> dict[tuple[str, str | None], int]:
    """(operator, backend or None for TVM) -> calls, from the build summary's JSON."""
    counts = {}
    for p in report.build_json(result)["offload"]:
        counts[(p["operator"], p["backend"])] = counts.get((p["operator"], p["backend"]), 0) + p["count"]
    return counts


def save_onnx(path: Path, name: str, nodes, inputs: dict[str, list[int]], outputs: dict[str, list[int]],
              inits) -> Path:
    """A float32 model of these nodes at opset 17 (IR version 8, which onnxruntime loads), checked and saved."""
    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return Path(path)


def assert_refused_in_one_line(refused: onnx.ModelProto, words: str, accepted: onnx.ModelProto, tmp_path: Path):
    """`edgec build` of `refused` exits 2 with one `error:` line holding `words`, no traceback; the same operator
    without the refused form (`accepted`) builds: the refusal is no wider than the form it is for."""
    from click.testing import CliRunner

    from edgec.cli import main

    def build(model: onnx.ModelProto, name: str):
        onnx.save(model, tmp_path / f"{name}.onnx")
        return CliRunner().invoke(main, ["build", str(tmp_path / f"{name}.onnx"), "-t", "host", "--offload", "none",
                                         "-o", str(tmp_path / f"{name}-bundle")])

    result = build(refused, "refused")
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], lines
    assert "Traceback" not in result.stderr
    built = build(accepted, "accepted")
    assert built.exit_code == 0, built.stderr
