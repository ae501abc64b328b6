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
                act: str | None = "relu6") -> str:
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
        if act is None:
            return f"{name}.bn"
        if act == "relu":
            self.nodes.append(helper.make_node("Relu", [f"{name}.bn"], [f"{name}.relu"], name=f"{name}.relu"))
            return f"{name}.relu"
        self.nodes.append(helper.make_node("Clip", [f"{name}.bn", "relu6.min", "relu6.max"], [f"{name}.relu6"],
                                           name=f"{name}.relu6"))
        return f"{name}.relu6"

    def linear(self, x: str, name: str, n_in: int, n_out: int) -> str:
        """MatMul by [n_in, n_out] weights plus a bias, as PyTorch exports nn.Linear on 3-D activations."""
        w = self.const(f"{name}.weight", self.rng.standard_normal((n_in, n_out)) * np.sqrt(1.0 / n_in))
        b = self.const(f"{name}.bias", self.rng.uniform(-0.1, 0.1, n_out))
        self.nodes += [helper.make_node("MatMul", [x, w], [f"{name}.mm"], name=f"{name}.mm"),
                       helper.make_node("Add", [f"{name}.mm", b], [name], name=f"{name}.bias")]
        return name

    def save(self, path, name: str, inputs: dict[str, list[int]], outputs: dict[str, list[int]]) -> Path:
        graph = helper.make_graph(
            self.nodes, name, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs.items()],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs.items()], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgec")
        model.ir_version = 8  # opset 17's IR version: loadable by older onnxruntime builds on boards
        onnx.checker.check_model(model, full_check=True)
        path = Path(path)
        onnx.save(model, path)
        return path


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
            y = b.conv_bn(y, f"{name}.project", hidden, cout, 1, act=None)
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
    return b.save(path, "mobilenetv2", {"input": [1, 3, resolution, resolution]}, {"logits": [1, num_classes]})


def resnet_small(path, depth: int = 20, resolution: int = 32, num_classes: int = 10, seed: int = 0) -> Path:
    """Write a randomly initialised CIFAR-style ResNet (He et al. 2015, section 4.2: three stages of basic blocks,
    16/32/64 channels, 1x1 strided projection shortcuts) to `path`: input "input" [1,3,R,R], output "logits"."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n+2 (8, 14, 20, ...), not {depth}")
    b = _Builder(seed)
    x = b.conv_bn("input", "stem", 3, 16, 3, act="relu")
    cin = 16
    for stage, cout in enumerate((16, 32, 64)):
        for i in range((depth - 2) // 6):
            name, stride = f"stage{stage}.block{i}", 2 if stage and i == 0 else 1
            y = b.conv_bn(x, f"{name}.conv1", cin, cout, 3, stride=stride, act="relu")
            y = b.conv_bn(y, f"{name}.conv2", cout, cout, 3, act=None)
            shortcut = x if stride == 1 and cin == cout else \
                b.conv_bn(x, f"{name}.shortcut", cin, cout, 1, stride=stride, act=None)
            b.nodes += [helper.make_node("Add", [y, shortcut], [f"{name}.add"], name=f"{name}.add"),
                        helper.make_node("Relu", [f"{name}.add"], [f"{name}.out"], name=f"{name}.out")]
            x, cin = f"{name}.out", cout
    fc_w = b.const("fc.weight", b.rng.standard_normal((num_classes, cin)) * np.sqrt(1.0 / cin))
    fc_b = b.const("fc.bias", b.rng.uniform(-0.1, 0.1, num_classes))
    b.nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pool"], name="pool"),
        helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten"),
        helper.make_node("Gemm", ["flatten", fc_w, fc_b], ["logits"], name="fc", transB=1),
    ]
    return b.save(path, "resnet_small", {"input": [1, 3, resolution, resolution]}, {"logits": [1, num_classes]})


def transformer_block(path, tokens: int = 16, dim: int = 64, heads: int = 4, seed: int = 0) -> Path:
    """Write a randomly initialised pre-norm transformer encoder block (input "x" [1,T,D], output "y" [1,T,D]):
    LayerNorm, multi-head self-attention (batched MatMuls and Softmax), a residual add, LayerNorm, an MLP with GELU
    in its Erf form (as PyTorch exports nn.GELU), a residual add. The projections are 3-D x 2-D MatMuls with bias."""
    if dim % heads:
        raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
    b, hd = _Builder(seed), dim // heads

    def const(name, value):
        b.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def layernorm(x, name):
        b.nodes.append(helper.make_node("LayerNormalization", [
            x, b.const(f"{name}.weight", b.rng.uniform(0.5, 1.5, dim)),
            b.const(f"{name}.bias", b.rng.uniform(-0.1, 0.1, dim))], [name], name=name, axis=-1))
        return name

    def split_heads(x, name):
        b.nodes += [helper.make_node("Reshape", [x, const(f"{name}.shape", np.array([1, tokens, heads, hd]))],
                                     [f"{name}.r"], name=f"{name}.r"),
                    helper.make_node("Transpose", [f"{name}.r"], [name], name=name, perm=[0, 2, 1, 3])]
        return name

    h = layernorm("x", "ln1")
    q, k, v = (split_heads(b.linear(h, n, dim, dim), f"{n}.heads") for n in ("q", "k", "v"))
    b.const("scale", np.array(hd ** -0.5))
    b.nodes += [helper.make_node("Transpose", [k], ["kt"], name="kt", perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", [q, "kt"], ["scores"], name="scores"),
                helper.make_node("Mul", ["scores", "scale"], ["scaled"], name="scaled"),
                helper.make_node("Softmax", ["scaled"], ["attn"], name="attn", axis=-1),
                helper.make_node("MatMul", ["attn", v], ["ctx.heads"], name="ctx.heads"),
                helper.make_node("Transpose", ["ctx.heads"], ["ctx.t"], name="ctx.t", perm=[0, 2, 1, 3]),
                helper.make_node("Reshape", ["ctx.t", const("ctx.shape", np.array([1, tokens, dim]))], ["ctx"],
                                 name="ctx")]
    b.nodes.append(helper.make_node("Add", [b.linear("ctx", "out", dim, dim), "x"], ["res1"], name="res1"))
    m = b.linear(layernorm("res1", "ln2"), "fc1", dim, 4 * dim)
    for name, value in (("sqrt2", np.sqrt(2)), ("one", 1.0), ("half", 0.5)):
        b.const(name, np.array(value))
    b.nodes += [helper.make_node("Div", [m, "sqrt2"], ["gelu.d"], name="gelu.d"),
                helper.make_node("Erf", ["gelu.d"], ["gelu.e"], name="gelu.e"),
                helper.make_node("Add", ["gelu.e", "one"], ["gelu.a"], name="gelu.a"),
                helper.make_node("Mul", [m, "gelu.a"], ["gelu.m"], name="gelu.m"),
                helper.make_node("Mul", ["gelu.m", "half"], ["gelu"], name="gelu")]
    b.nodes.append(helper.make_node("Add", [b.linear("gelu", "fc2", 4 * dim, dim), "res1"], ["y"], name="y"))
    return b.save(path, "transformer_block", {"x": [1, tokens, dim]}, {"y": [1, tokens, dim]})


EXAMPLES = {"mobilenetv2": mobilenet_v2, "resnet-small": resnet_small, "transformer-block": transformer_block}
