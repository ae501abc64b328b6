"""Inputs that real exports hold as constants, and the input forms around them (issue 8, item 2).

`--const-input NAME=FILE.npy` / BuildOptions.const_inputs folds a graph input at build time; zero-size dims are
static; 0-d inputs run end to end in both runners; a model without inputs builds; int4 and Sequence/Optional
inputs are refused in one line. Each built model is compared with onnxruntime.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T, helper, numpy_helper

from edgec import api
from edgec.context import BuildOptions
from test_cli_errors import check_error, cli
from verify import assert_close_to_reference


def _save(path, nodes, inputs, outputs, opset=17):
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _reshape(path):
    """y = Reshape(x[2,3], shape): the target shape is an input, which TVM's importer needs as a constant."""
    return _save(path, [helper.make_node("Reshape", ["x", "shape"], ["y"])],
                 [helper.make_tensor_value_info("x", T.FLOAT, [2, 3]),
                  helper.make_tensor_value_info("shape", T.INT64, [2])],
                 [helper.make_tensor_value_info("y", T.FLOAT, [3, 2])])


def _build(model, tmp_path, **options):
    return api.build(model, "host", tmp_path / "bundle", options=BuildOptions(offload=(), **options))


def test_const_input_folds_and_leaves_the_signature(tmp_path):
    model = _reshape(tmp_path / "reshape.onnx")
    shape = np.array([3, 2], dtype=np.int64)
    result = _build(model, tmp_path, const_inputs={"shape": shape})
    manifest = json.loads((result.bundle_dir / "manifest.json").read_text())
    assert [i["name"] for i in manifest["inputs"]] == ["x"]
    assert manifest["verification"]["status"] == "verified"
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    run = api.run(result.bundle_dir, {"x": x})
    np.testing.assert_array_equal(run.outputs["y"], x.reshape(3, 2))
    # inspect shows the model as it is: the folded input is still one of its inputs
    inspected = cli("inspect", model, "--json")
    assert inspected.exit_code == 0, inspected.stderr
    assert [i["name"] for i in json.loads(inspected.stdout)["inputs"]] == ["x", "shape"]


def test_const_input_cli(tmp_path):
    model = _reshape(tmp_path / "reshape.onnx")
    np.save(tmp_path / "shape.npy", np.array([3, 2], dtype=np.int64))
    result = cli("build", model, "-o", tmp_path / "b", "--offload", "none", "--const-input",
                 f"shape={tmp_path / 'shape.npy'}")
    assert result.exit_code == 0, result.stderr
    assert [s.name for s in api.Manifest.load(tmp_path / "b").inputs] == ["x"]


@pytest.mark.parametrize("value, spec, keywords", [
    (np.array([3, 2], dtype=np.int64), "nope={file}", ["'nope'", "its inputs are: x, shape"]),
    (np.array([3, 2], dtype=np.int32), "shape={file}", ["int32", "int64", "astype"]),
    (np.array([3, 2, 1], dtype=np.int64), "shape={file}", ["[3]", "[2]"]),
    (np.array([[3, 2]], dtype=np.int64), "shape={file}", ["[1, 2]", "[2]"]),
    (None, "shape={file}", ["does not exist"]),
    (None, "shape", ["cannot parse --const-input", "NAME=FILE.npy"]),
    (np.array([3, 2], dtype=np.int64), "shape={file} shape={file}", ["twice"]),
])
def test_const_input_refused(tmp_path, value, spec, keywords):
    model = _reshape(tmp_path / "reshape.onnx")
    file = tmp_path / "v.npy"
    if value is not None:
        np.save(file, value)
    args = [a for s in spec.format(file=file).split() for a in ("--const-input", s)]
    result = cli("build", model, "-o", tmp_path / "b", *args)
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)
    assert not (tmp_path / "b").exists()


def test_zero_size_dim_is_not_dynamic(tmp_path):
    model = _save(tmp_path / "zero.onnx", [helper.make_node("Concat", ["x", "z"], ["y"], axis=0)],
                  [helper.make_tensor_value_info("x", T.FLOAT, [2, 3]),
                   helper.make_tensor_value_info("z", T.FLOAT, [0, 3])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    result = _build(model, tmp_path)
    assert result.manifest.verification["status"] == "verified"
    assert [s.shape for s in result.manifest.inputs] == [(2, 3), (0, 3)]


@pytest.mark.parametrize("emulate", [False, True], ids=["in-process", "cpp-runner"])
def test_scalar_input_end_to_end(tmp_path, emulate):
    model = _save(tmp_path / "scalar.onnx", [helper.make_node("Mul", ["x", "s"], ["y"]),
                                             helper.make_node("ReduceSum", ["y"], ["total"], keepdims=0)],
                  [helper.make_tensor_value_info("x", T.FLOAT, [2, 3]), helper.make_tensor_value_info("s", T.FLOAT, [])],
                  [helper.make_tensor_value_info("y", T.FLOAT, [2, 3]), helper.make_tensor_value_info("total", T.FLOAT, [])])
    result = _build(model, tmp_path)
    assert result.manifest.verification["status"] == "verified"
    assert result.manifest.inputs[1].shape == ()
    inputs = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "s": np.array(-1.5, dtype=np.float32)}
    run, _ = assert_close_to_reference(model, result.bundle_dir, inputs, emulate=emulate)
    np.testing.assert_array_equal(run.outputs["y"], inputs["x"] * -1.5)
    assert run.outputs["total"].shape == () and run.outputs["total"] == -22.5   # a 0-d output compared, too


@pytest.mark.parametrize("emulate", [False, True], ids=["in-process", "cpp-runner"])
def test_model_without_inputs(tmp_path, emulate):
    value = np.arange(-3, 3, dtype=np.float32).reshape(2, 3)
    model = _save(tmp_path / "noinput.onnx",
                  [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(value)),
                   helper.make_node("Relu", ["c"], ["y"])],
                  [], [helper.make_tensor_value_info("y", T.FLOAT, [2, 3])])
    result = _build(model, tmp_path)
    assert result.manifest.verification["status"] == "verified"
    assert result.manifest.inputs == ()
    run, _ = assert_close_to_reference(model, result.bundle_dir, {}, emulate=emulate)
    np.testing.assert_array_equal(run.outputs["y"], np.maximum(value, 0))


@pytest.mark.parametrize("case", ["int4", "sequence", "optional"])
def test_unsupported_input_kinds_refused(tmp_path, case):
    if case == "int4":
        path = _save(tmp_path / "m.onnx", [helper.make_node("Identity", ["x"], ["y"])],
                     [helper.make_tensor_value_info("x", T.INT4, [2, 4])],
                     [helper.make_tensor_value_info("y", T.INT4, [2, 4])], opset=21)
        keywords = ["'x'", "int4"]
    elif case == "sequence":
        path = _save(tmp_path / "m.onnx", [helper.make_node("SequenceAt", ["s", "i"], ["y"])],
                     [helper.make_tensor_sequence_value_info("s", T.FLOAT, [2]),
                      helper.make_tensor_value_info("i", T.INT64, [])],
                     [helper.make_tensor_value_info("y", T.FLOAT, [2])])
        keywords = ["'s'", "Sequence"]
    else:
        path = _save(tmp_path / "m.onnx", [helper.make_node("OptionalHasElement", ["o"], ["y"])],
                     [helper.make_value_info("o", helper.make_optional_type_proto(
                         helper.make_tensor_type_proto(T.FLOAT, [2])))],
                     [helper.make_tensor_value_info("y", T.BOOL, [])], opset=18)
        keywords = ["'o'", "Optional"]
    result = cli("build", path, "-o", tmp_path / "b")
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)


def test_min_of_an_empty_set_is_infinity(tmp_path):
    """A zero-size dim is static now, so an empty ReduceMin reaches the converter, which returns the empty set's
    minimum, +inf (TVM's own would return float32's max)."""
    path = _save(tmp_path / "m.onnx", [helper.make_node("ReduceMin", ["x"], ["y"], keepdims=1)],
                 [helper.make_tensor_value_info("x", T.FLOAT, [0, 3])],
                 [helper.make_tensor_value_info("y", T.FLOAT, [1, 1])], opset=18)
    result = _build(path, tmp_path)
    out = api.run(result.bundle_dir, {"x": np.zeros((0, 3), np.float32)}).outputs
    assert list(out.values())[0].tolist() == [[np.inf]]
