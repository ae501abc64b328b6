"""edgec's detection converters (edgec/frontends/onnx_detection.py): NonMaxSuppression and DeformConv, each on a
small model against onnxruntime, as bench/onnx_suite.py runs a case; NonMaxSuppression's data-dependent row count
also through a bundle, in process and with the C++ runner; refused forms exit 2 with one line."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_onnx_semantics import _assert_matches_reference, _build, _model, edgec_host  # noqa: F401
from verify import assert_close_to_reference, assert_refused_in_one_line

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


def _boxes(rng, batches: int, n: int, center_point_box: int) -> np.ndarray:
    """Overlapping boxes; for the corner form, half of them with their corners swapped."""
    xy = rng.uniform(0, 10, (batches, n, 2)).astype(np.float32)
    wh = rng.uniform(1, 4, (batches, n, 2)).astype(np.float32)
    if center_point_box:
        return np.concatenate([xy, wh], axis=2)
    corners = np.concatenate([xy[..., ::-1], (xy + wh)[..., ::-1]], axis=2)   # [y1, x1, y2, x2]
    corners[:, ::2] = corners[:, ::2][..., [2, 3, 0, 1]]
    return corners


def _nms(batches: int, classes: int, n: int, center_point_box: int, max_out: int, iou: float,
         score_threshold: float | None, runtime_max: bool = False):
    params = [("max_out", np.array([max_out], np.int64)), ("iou", np.array([iou], np.float32))]
    if score_threshold is not None:
        params.append(("score_threshold", np.array([score_threshold], np.float32)))
    inputs = [helper.make_tensor_value_info("boxes", F32, [batches, n, 4]),
              helper.make_tensor_value_info("scores", F32, [batches, classes, n])]
    if runtime_max:
        inputs.append(helper.make_tensor_value_info("max_out", I64, [1]))
    node = helper.make_node("NonMaxSuppression", ["boxes", "scores", *(name for name, _ in params)], ["selected"],
                            center_point_box=center_point_box)
    return _model([node], inputs, [helper.make_tensor_value_info("selected", I64, ["n", 3])], opset=11,
                  initializers=[numpy_helper.from_array(v, name) for name, v in params
                                if not (runtime_max and name == "max_out")])


@pytest.mark.parametrize("center_point_box", [0, 1])
@pytest.mark.parametrize("score_threshold", [None, 0.4])
def test_non_max_suppression(edgec_host, tmp_path, center_point_box, score_threshold):
    """Two batches, three classes, tied scores (the lower index first), some classes keeping fewer than the
    maximum: the row count differs from the capacity."""
    rng = np.random.default_rng(center_point_box)
    boxes = _boxes(rng, 2, 12, center_point_box)
    scores = rng.choice(np.linspace(0, 1, 7, dtype=np.float32), (2, 3, 12))
    model = _nms(2, 3, 12, center_point_box, 5, 0.3, score_threshold)
    _assert_matches_reference(edgec_host, model, [boxes, scores], tmp_path)


def test_non_max_suppression_nan_scores_are_not_above_the_threshold(edgec_host, tmp_path):
    """A NaN score is not above score_threshold: never a candidate (onnxruntime and onnx's reference)."""
    rng = np.random.default_rng(7)
    boxes = _boxes(rng, 1, 6, 0)
    scores = np.array([[[0.9, np.nan, 0.5, np.nan, 0.7, 0.2]]], np.float32)
    _assert_matches_reference(edgec_host, _nms(1, 1, 6, 0, 6, 0.99, 0.1), [boxes, scores], tmp_path)


def test_non_max_suppression_rows_feed_later_operators(edgec_host, tmp_path):
    """As a detector's tail: the kept box indices gather the boxes, so later operators take the run-time count."""
    nms = _nms(1, 2, 30, 0, 6, 0.4, 0.3)
    nodes = [*nms.graph.node, helper.make_node("Gather", ["selected", "two"], ["index"], axis=1),
             helper.make_node("Squeeze", ["boxes", "zero"], ["all_boxes"]),
             helper.make_node("Gather", ["all_boxes", "index"], ["kept"], axis=0),
             helper.make_node("Relu", ["kept"], ["y"])]
    extra = [numpy_helper.from_array(np.array(2, np.int64), "two"), numpy_helper.from_array(np.array([0], np.int64),
                                                                                           "zero")]
    model = _model(nodes, list(nms.graph.input), [helper.make_tensor_value_info("y", F32, ["n", 4])], opset=13,
                   initializers=[*nms.graph.initializer, *extra])
    rng = np.random.default_rng(5)
    _assert_matches_reference(edgec_host, model, [_boxes(rng, 1, 30, 0), rng.random((1, 2, 30), dtype=np.float32)],
                              tmp_path)


def test_non_max_suppression_bundle_runs_with_a_run_time_row_count(tmp_path):
    """The manifest gives the row count as null; run.py and edgec_run return the rows the inputs select."""
    import json

    rng = np.random.default_rng(4)
    result = _build(_nms(1, 2, 10, 0, 4, 0.5, 0.2), tmp_path, "nms")
    assert result.exit_code == 0, result.stderr
    bundle = tmp_path / "nms-bundle"
    assert json.loads((bundle / "manifest.json").read_text())["outputs"][0]["shape"] == [None, 3]
    readme = (bundle / "README.md").read_text()   # as a shape, not Python's [None, 3] (shown escaped)
    assert "int64 \\[?, 3\\], written as" in readme and "None" not in readme
    assert "A `?` is a size the model computes at run time" in readme
    counts = set()
    for scale in (0.3, 0.6, 1.0):   # fewer scores above the threshold, fewer rows
        inputs = {"boxes": _boxes(rng, 1, 10, 0), "scores": rng.random((1, 2, 10), dtype=np.float32) * scale}
        for emulate in (False, True):
            run, _ = assert_close_to_reference(tmp_path / "nms.onnx", bundle, inputs, emulate=emulate)
            counts.add(run.outputs["selected"].shape[0])
    assert len(counts) > 1, counts   # the inputs select different numbers of rows


def _deform_conv(with_mask_and_bias: bool):
    attrs = dict(kernel_shape=[3, 3], strides=[2, 1], dilations=[1, 2], pads=[1, 2, 0, 1], group=2, offset_group=2)
    names = ["x", "w", "offset", *(["b", "mask"] if with_mask_and_bias else [])]
    shapes = {"x": [1, 4, 7, 8], "w": [6, 2, 3, 3], "offset": [1, 36, 3, 7], "b": [6], "mask": [1, 18, 3, 7]}
    node = helper.make_node("DeformConv", names, ["y"], **attrs)
    return _model([node], [helper.make_tensor_value_info(n, F32, shapes[n]) for n in names],
                  [helper.make_tensor_value_info("y", F32, [1, 6, 3, 7])], opset=19), [shapes[n] for n in names]


@pytest.mark.parametrize("with_mask_and_bias", [False, True])
def test_deform_conv(edgec_host, tmp_path, with_mask_and_bias):
    """Strides, dilations, uneven pads, groups and offset groups; offsets reach outside the input."""
    model, shapes = _deform_conv(with_mask_and_bias)
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal(s).astype(np.float32) * (3 if i == 2 else 1) for i, s in enumerate(shapes)]
    _assert_matches_reference(edgec_host, model, inputs, tmp_path)


def _nms_scoring(n: int):
    """NonMaxSuppression of 4 boxes with scores for n boxes."""
    model = _nms(1, 1, 4, 0, 2, 0.5, None)
    model.graph.input[1].type.tensor_type.shape.dim[2].dim_value = n
    return model


REFUSALS = {
    "nms-scores-for-other-boxes": (lambda: _nms_scoring(5), "takes boxes [1, 4, 4] and scores [1, 1, 5]",
                                   lambda: _nms_scoring(4)),
    "nms-runtime-maximum": (lambda: _nms(1, 1, 4, 0, 2, 0.5, None, runtime_max=True),
                            "takes its max_output_boxes_per_class from the input data at run time",
                            lambda: _nms(1, 1, 4, 0, 2, 0.5, None)),
    "nms-center-point-box-2": (lambda: _nms(1, 1, 4, 2, 2, 0.5, None), "center_point_box=2",
                               lambda: _nms(1, 1, 4, 1, 2, 0.5, None)),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_with_one_line_and_exit_2(case, tmp_path):
    refused, words, accepted = REFUSALS[case]
    assert_refused_in_one_line(refused(), words, accepted(), tmp_path)
