"""Example models edgec can generate offline (`edgec example NAME -o model.onnx`), built with onnx.helper only."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# (expansion t, output channels c, repeats n, first stride s) from the MobileNetV2 paper.
_MBV2_CONFIG = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]


def _divisible(v: float, d: int = 8) -> int:
    """Round channels to a multiple of 8 as torchvision does, never dropping more than 10%."""
    n = max(d, int(v + d / 2) // d * d)
    return n + d if n < 0.9 * v else n


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value, np.float32), name))
        return name

    def conv_bn(self, x: str, name: str, cin: int, cout: int, k: int, stride: int = 1, group: int = 1,
                act: bool = True) -> str:
        fan_in = cin // group * k * k
        # He scaling (gain 2) where ReLU6 follows, gain 1 for the linear projection: keeps the variance
        # roughly constant over ~50 layers instead of exploding or vanishing.
        std = np.sqrt((2.0 if act else 1.0) / fan_in)
        w = self.const(f"{name}.weight", self.rng.standard_normal((cout, cin // group, k, k)) * std)
        p = k // 2
        self.nodes.append(helper.make_node("Conv", [x, w], [f"{name}.conv"], name=f"{name}.conv", kernel_shape=[k, k],
                                           strides=[stride, stride], pads=[p, p, p, p], group=group))
        # Non-trivial BN statistics so that folding BN into the conv visibly changes the weights.
        bn = [self.const(f"{name}.bn.{n}", v) for n, v in [
            ("gamma", self.rng.uniform(0.5, 1.5, cout)), ("beta", self.rng.uniform(-0.1, 0.1, cout)),
            ("mean", self.rng.uniform(-0.1, 0.1, cout)), ("var", self.rng.uniform(0.5, 1.5, cout))]]
        self.nodes.append(helper.make_node("BatchNormalization", [f"{name}.conv", *bn], [f"{name}.bn"],
                                           name=f"{name}.bn", epsilon=1e-5))
        if not act:
            return f"{name}.bn"
        self.nodes.append(helper.make_node("Clip", [f"{name}.bn", "relu6.min", "relu6.max"], [f"{name}.relu6"],
                                           name=f"{name}.relu6"))
        return f"{name}.relu6"


def mobilenet_v2(path, width: float = 1.0, resolution: int = 224, num_classes: int = 1000, seed: int = 0) -> Path:
    """Write a randomly initialised MobileNetV2 (input "input" [1,3,R,R] float32, output "logits") to `path`."""
    b = _Builder(seed)
    b.const("relu6.min", np.array(0.0))
    b.const("relu6.max", np.array(6.0))
    cin = _divisible(32 * width)
    x = b.conv_bn("input", "stem", 3, cin, 3, stride=2)
    block = 0
    for t, c, n, s in _MBV2_CONFIG:
        cout = _divisible(c * width)
        for i in range(n):
            stride = s if i == 0 else 1
            name, hidden, y = f"block{block}", cin * t, x
            if t != 1:
                y = b.conv_bn(y, f"{name}.expand", cin, hidden, 1)
            y = b.conv_bn(y, f"{name}.dw", hidden, hidden, 3, stride=stride, group=hidden)
            y = b.conv_bn(y, f"{name}.project", hidden, cout, 1, act=False)
            if stride == 1 and cin == cout:
                b.nodes.append(helper.make_node("Add", [x, y], [f"{name}.add"], name=f"{name}.add"))
                y = f"{name}.add"
            x, cin, block = y, cout, block + 1
    last = _divisible(1280 * max(1.0, width))
    x = b.conv_bn(x, "head", cin, last, 1)
    fc_w = b.const("fc.weight", b.rng.standard_normal((num_classes, last)) * np.sqrt(1.0 / last))
    fc_b = b.const("fc.bias", b.rng.uniform(-0.1, 0.1, num_classes))
    b.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten"),
        helper.make_node("Gemm", ["flatten", fc_w, fc_b], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        b.nodes, "mobilenetv2",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, num_classes])], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgec")
    model.ir_version = 8  # opset 17's IR version: loadable by older onnxruntime builds on boards
    onnx.checker.check_model(model)
    path = Path(path)
    onnx.save(model, path)
    return path


EXAMPLES = {"mobilenetv2": mobilenet_v2}
