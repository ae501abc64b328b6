"""A bundle loads the TVM runtime alone: operators TVM lowers to functions of its compiler library (relax.run.*) run
through edgec's own kernels (NonZero, Compress) in the C++ runner and under qemu, or are refused at build time
(Unique) in one line."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from edgec import api
from test_onnx_semantics import _build, _model
from verify import assert_close_to_reference, assert_refused_in_one_line

F32 = TensorProto.FLOAT


def _nonzero(dims: list[int], elem=F32):
    return _model([helper.make_node("NonZero", ["x"], ["y"])], [helper.make_tensor_value_info("x", elem, dims)],
                  [helper.make_tensor_value_info("y", TensorProto.INT64, [len(dims) or 1, "n"])])


@pytest.mark.parametrize("dims,elem", [([2, 3, 4], F32), ([5], TensorProto.BOOL), ([3, 4], TensorProto.INT32)])
def test_nonzero_runs_in_the_cpp_runner(tmp_path, dims, elem):
    """Row-major coordinates (NaN counts as nonzero), a count the inputs decide, none at all: run.py and edgec_run
    (which loads libtvm_runtime only) against onnxruntime."""
    rng = np.random.default_rng(len(dims))
    result = _build(_nonzero(dims, elem), tmp_path, "nz")
    assert result.exit_code == 0, result.stderr
    np_dtype = {F32: np.float32, TensorProto.BOOL: np.bool_, TensorProto.INT32: np.int32}[elem]
    counts = set()
    for keep in (0.0, 0.3, 1.0):
        x = np.where(rng.random(dims) < keep, rng.integers(1, 5, dims), 0).astype(np_dtype)
        if elem == F32 and x.size:
            x.reshape(-1)[0] = np.nan
        for emulate in (False, True):
            run, _ = assert_close_to_reference(tmp_path / "nz.onnx", tmp_path / "nz-bundle", {"x": x}, emulate=emulate)
            assert run.outputs["y"].shape[0] == len(dims)
            counts.add(run.outputs["y"].shape[1])
    assert len(counts) == 3, counts


def test_compress_runs_in_the_cpp_runner(tmp_path):
    model = _model([helper.make_node("Compress", ["x", "c"], ["y"], axis=1)],
                   [helper.make_tensor_value_info("x", F32, [3, 5]),
                    helper.make_tensor_value_info("c", TensorProto.BOOL, [4])],
                   [helper.make_tensor_value_info("y", F32, [3, "n"])])
    result = _build(model, tmp_path, "compress")
    assert result.exit_code == 0, result.stderr
    x = np.arange(15, dtype=np.float32).reshape(3, 5)
    for c in ([True, False, True, True], [False] * 4):
        run, _ = assert_close_to_reference(tmp_path / "compress.onnx", tmp_path / "compress-bundle",
                                           {"x": x, "c": np.array(c)}, emulate=True)
        assert run.outputs["y"].shape == (3, sum(c))


def test_nonzero_verifies_on_rpi4_under_qemu(tmp_path):
    """The aarch64 runtime (the one a Pi bundle ships with) loads the library: the build's verification passes."""
    import onnx

    path = tmp_path / "nz.onnx"
    onnx.save(_nonzero([4, 4]), path)
    x = np.where(np.random.default_rng(0).random((4, 4)) < 0.5, 1.5, 0.0).astype(np.float32)
    build = api.build(path, "rpi4", tmp_path / "rpi4", sample_inputs={"x": x})
    assert build.manifest.verification["status"] == "verified", build.manifest.verification
    run, _ = assert_close_to_reference(path, tmp_path / "rpi4", {"x": x}, expect_mode="qemu")
    assert run.outputs["y"].shape == (2, int((x != 0).sum()))


def test_a_compiler_library_function_is_refused_at_build(tmp_path):
    unique = _model([helper.make_node("Unique", ["x"], ["y"], sorted=1)],
                    [helper.make_tensor_value_info("x", F32, [6])], [helper.make_tensor_value_info("y", F32, ["n"])])
    assert_refused_in_one_line(unique, "relax.run.unique", _nonzero([6]), tmp_path)
