"""upsample-apart: an upsampling resize's producers are their own kernel (fused, they ran once per output element);
a downsampling one's stay fused into it."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from edgec import api
from edgec.build import BuildOptions
from test_schedule import kernels, lowered
from verify import assert_close_to_reference, save_onnx


def resizes(path):
    """x * 1.5 + 0.25 resized nearest 4x up (then Sigmoid), x * 0.25 resized 2x down."""
    inits = [numpy_helper.from_array(np.float32(1.5), "a"), numpy_helper.from_array(np.float32(0.25), "b"),
             numpy_helper.from_array(np.array([1, 1, 4, 4], np.float32), "up"),
             numpy_helper.from_array(np.array([1, 1, 0.5, 0.5], np.float32), "down")]
    nodes = [helper.make_node("Mul", ["x", "a"], ["m"]), helper.make_node("Add", ["m", "b"], ["h"]),
             helper.make_node("Resize", ["h", "", "up"], ["u"], mode="nearest"),
             helper.make_node("Sigmoid", ["u"], ["y"]),
             helper.make_node("Mul", ["x", "b"], ["s"]),
             helper.make_node("Resize", ["s", "", "down"], ["z"], mode="nearest")]
    return save_onnx(path, "resizes", nodes, {"x": [1, 4, 8, 8]}, {"y": [1, 4, 32, 32], "z": [1, 4, 4, 4]}, inits)


def test_upsampling_resize_keeps_its_producers_apart(tmp_path):
    model = resizes(tmp_path / "resizes.onnx")
    names = [n for n in kernels(lowered(model)) if "resize2d" in n]
    upsampling = [n for n in names if "sigmoid" in n]
    assert len(names) == 2 and len(upsampling) == 1, names
    assert "multiply" not in upsampling[0] and "add" not in upsampling[0], upsampling   # computed at 8x8, once
    assert "multiply" in [n for n in names if n not in upsampling][0], names            # 4x4 reads of 8x8: fused
    unfused = [n for n in kernels(lowered(model, disabled=["upsample-apart"])) if "sigmoid" in n]
    assert "multiply" in unfused[0], unfused
    api.build(model, "host", tmp_path / "b", options=BuildOptions(offload=()))
    assert_close_to_reference(model, tmp_path / "b")
