"""`edgec inspect` tells the truth (it runs the import a build runs) and the dynamic-dims hint fits the model."""
from __future__ import annotations

import json

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from models import real_model
from tflite_builder import Graph, schema
from test_cli_errors import _save, check_cli_error, cli


def inspect_json(*args) -> dict:
    result = cli("inspect", *args, "--json")
    assert result.exit_code == 0 and result.stderr == "", result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------------------ the real import

def test_inspect_reports_an_importer_failure(tmp_path):
    """PRELU is in TVM's converter table, so the operator list says nothing; its int8 form fails in the importer."""
    g = Graph()
    q = ([0.05], [3], 0)
    x = g.tensor("x", (1, 4), np.int8, quant=q)
    alpha = g.tensor("alpha", (4,), np.int8, np.array([1, 2, 3, 4], np.int8), quant=([0.1], [0], 0))
    y = g.tensor("y", (1, 4), np.int8, quant=q)
    g.op(schema.BuiltinOperator.PRELU, [x, alpha], [y])
    model = g.save(tmp_path / "prelu_int8.tflite", [x], [y])
    info = inspect_json(model)
    assert info["unsupported_operators"] == {} and info["imports"] is False
    assert "PRELU" in info["import_error"] and "TVM's TFLite importer failed" in info["import_error"]
    text = cli("inspect", model).stdout
    assert "import fails: TVM's TFLite importer failed" in text and "every operator is supported" not in text


def test_inspect_of_a_model_that_imports():
    info = inspect_json(real_model("face_detection_full_range_sparse"))
    assert info["imports"] is True and info["import_error"] is None and info["imported_operator_calls"] > 300
    assert "imports: " in cli("inspect", real_model("face_detection_full_range_sparse")).stdout


def test_inspect_custom_operator_names_it_and_takes_a_converter():
    text = cli("inspect", real_model("selfie_segmentation")).stdout
    assert "cannot import: Convolution2DTransposeBias (custom) (x1)" in text and "--converter" in text
    from test_tflite_import import EXAMPLE_CONVERTERS
    info = inspect_json(real_model("selfie_segmentation"), "--converter", EXAMPLE_CONVERTERS)
    assert info["imports"] is True and info["unsupported_operators"] == {}


def test_inspect_counts_constant_node_weights_and_integer_macs(tmp_path):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w)),
         helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),
         helper.make_node("MatMulInteger", ["a", "b"], ["m"])],
        "consts",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
         helper.make_tensor_value_info("a", TensorProto.UINT8, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8]),
         helper.make_tensor_value_info("m", TensorProto.INT32, [2, 5])],
        [numpy_helper.from_array(np.ones((16, 5), np.uint8), "b")])
    info = inspect_json(_save(graph, tmp_path / "consts.onnx"))
    assert info["param_count"] == w.size + 16 * 5 and info["param_bytes"] == w.nbytes + 16 * 5
    assert info["macs"] == 4 * 8 * 8 * 27 + 2 * 5 * 16
    # ConvInteger: 2 convs of 1x1x2x2 outputs, 9 MACs each
    graph = helper.make_graph(
        [helper.make_node("ConvInteger", ["x", "w"], ["y1"]), helper.make_node("ConvInteger", ["x", "w"], ["y2"])],
        "convinteger", [helper.make_tensor_value_info("x", TensorProto.UINT8, [1, 1, 4, 4])],
        [helper.make_tensor_value_info(y, TensorProto.INT32, [1, 1, 2, 2]) for y in ("y1", "y2")],
        [numpy_helper.from_array(np.ones((1, 1, 3, 3), np.uint8), "w")])
    assert inspect_json(_save(graph, tmp_path / "convinteger.onnx"))["macs"] == 2 * 4 * 9


# ------------------------------------------------------------------------------------------ hints that fit

def _dynamic_onnx(path, x_dims, z_dims=None):
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_dims)]
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, x_dims)]
    if z_dims is not None:
        inputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, z_dims))
        nodes.append(helper.make_node("Relu", ["z"], ["w"]))
        outputs.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, z_dims))
    return _save(helper.make_graph(nodes, "dyn", inputs, outputs), path)


def test_dynamic_image_dims_hint_placeholders_not_ones(tmp_path):
    model = _dynamic_onnx(tmp_path / "img.onnx", ["N", 3, "p2o.DynamicDimension.1", "width"])
    line = check_cli_error(cli("build", model, "-o", tmp_path / "out"), "--input-shape x:1x3xHxW",
                           "H, W: the sizes the model expects")
    assert "1x3x1x1" not in line


def test_named_dynamic_dim_hint(tmp_path):
    model = _dynamic_onnx(tmp_path / "seq.onnx", ["batch", "seq_len", 64])
    check_cli_error(cli("build", model, "-o", tmp_path / "out"), "--input-shape x:1xSEQ_LENx64",
                    "SEQ_LEN: the size the model expects")


def test_tflite_hint_uses_the_stored_shape(tmp_path):
    """TFLite keeps a concrete shape beside the signature's -1s: that is the model's own size."""
    g = Graph()
    x = g.tensor("x", (1, 96, 96, 3))
    g.sg.tensors[x].shapeSignature = [-1, -1, -1, 3]
    y = g.tensor("y", (1, 96, 96, 3))
    g.sg.tensors[y].shapeSignature = [-1, -1, -1, 3]
    g.op(schema.BuiltinOperator.RELU, [x], [y])
    model = g.save(tmp_path / "dyn.tflite", [x], [y])
    line = check_cli_error(cli("build", model, "-o", tmp_path / "out"), "--input-shape x:1x96x96x3")
    assert "expects" not in line, "no placeholder when the model holds the sizes"
    check_cli_error(cli("build", model, "--input-shape", "x:1x96x3", "-o", tmp_path / "out"), "does not fit",
                    "['?', '?', '?', 3]")
    info = inspect_json(model, "--input-shape", "x:2x64x80x3")
    assert info["imports"] is True


def test_pinning_is_not_suggested_for_pinned_inputs(tmp_path):
    model = _dynamic_onnx(tmp_path / "two.onnx", ["N", 3, "H", "W"], ["N", 8])
    line = check_cli_error(cli("build", model, "--input-shape", "x:1x3x16x16", "-o", tmp_path / "out"),
                           "input 'z'", "--input-shape z:1x8")
    assert "x:" not in line
    result = cli("inspect", model, "--input-shape", "x:1x3x16x16", "--input-shape", "z:1x8")
    assert result.exit_code == 0 and "--input-shape" not in result.stdout and "imports: " in result.stdout, \
        result.stdout
