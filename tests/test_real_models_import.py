"""Real exports whose shape idioms edgec's ONNX import folds (item 5 of "Real models import"), against onnxruntime."""
from __future__ import annotations

import numpy as np

from edgec import api
from models import real_model
from verify import assert_close_to_reference


def test_ppocrv4_rec_reshape_target_keeps_its_slice_element(tmp_path):
    """PP-OCRv4 rec's Reshape targets are Concat(Cast(0), Cast(Slice(Shape(x))), 3, 8, 15): the Slice element comes
    from a tensor whose shape ONNX inference learns only once an earlier Reshape target is folded."""
    model = real_model("ppocrv4_rec")
    built = api.build(model, "host", tmp_path / "rec", input_shapes={"x": (1, 3, 48, 320)})
    x = np.random.default_rng(0).standard_normal((1, 3, 48, 320)).astype(np.float32)
    assert_close_to_reference(model, built.bundle_dir, {"x": x})
