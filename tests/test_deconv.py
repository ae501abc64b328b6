"""deconv-as-matmul: a ConvTranspose whose stride equals its kernel is a matmul and a transpose in TVM; other
ConvTransposes, and those a backend takes, are left as they are."""
from __future__ import annotations

import numpy as np
from onnx import helper, numpy_helper

from edgec import api
from edgec.build import BuildOptions
from test_schedule import kernels, lowered
from verify import assert_close_to_reference, save_onnx

RNG = np.random.default_rng(7)


def deconvs(path):
    """ConvTranspose 2x2 stride 2 with a bias, then ReLU (DB's head), beside a 3x3 stride-2 one with padding and
    output padding (its blocks overlap: not a matmul)."""
    def weight(name, shape):
        return numpy_helper.from_array((RNG.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [weight("w2", (6, 4, 2, 2)), weight("b2", (4,)), weight("w3", (6, 4, 3, 3))]
    nodes = [helper.make_node("ConvTranspose", ["x", "w2", "b2"], ["d"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Relu", ["d"], ["y"]),
             helper.make_node("ConvTranspose", ["x", "w3"], ["z"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1], output_padding=[1, 1])]
    return save_onnx(path, "deconvs", nodes, {"x": [1, 6, 10, 12]}, {"y": [1, 4, 20, 24], "z": [1, 4, 20, 24]},
                     inits)


def test_stride_equal_to_kernel_deconv_is_a_matmul(tmp_path):
    model = deconvs(tmp_path / "deconvs.onnx")
    names = list(kernels(lowered(model, offload=())))
    assert sum("conv2d_transpose" in n for n in names) == 1 and sum("matmul" in n for n in names) == 1, names
    unchanged = list(kernels(lowered(model, disabled=["deconv-as-matmul"], offload=())))
    assert sum("conv2d_transpose" in n for n in unchanged) == 2 and not any("matmul" in n for n in unchanged)
    result = api.build(model, "host", tmp_path / "b", options=BuildOptions(offload=()))
    assert result.manifest.verification["status"] == "verified"
    for _ in range(2):      # the same sums in another order: within the float tolerance of onnxruntime
        assert_close_to_reference(model, tmp_path / "b", {"x": RNG.standard_normal((1, 6, 10, 12)).astype(np.float32)})


def test_a_deconv_the_backend_takes_stays_its_own(tmp_path):
    """With oneDNN (host's descriptor), both deconvolutions are its primitives: the rewrite runs after the partition."""
    model = deconvs(tmp_path / "deconvs.onnx")
    result = api.build(model, "host", tmp_path / "b")
    assert [(p.operator, p.backend, p.count) for p in result.compiled.offload] == [("conv2d_transpose", "onednn", 2)]
    assert_close_to_reference(model, tmp_path / "b")
