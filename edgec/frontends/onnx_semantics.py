"""Where TVM's ONNX importer would compute a wrong result without a word: the node forms edgec refuses before
converting (`refuse_wrong_conversions`), and TVM converters it replaces with correct ones (`CONVERTERS`, used by
`from_onnx` here). Each rule was found by, and is checked with, bench/onnx_suite.py (the ONNX backend node
suite); tests/test_onnx_semantics.py holds a small model per rule.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgecError

# Element types TVM cannot compute with correctly: float8 casts mishandle subnormals, NaN/inf, saturation and the
# FNUZ bias, casts to them fail in code generation, and 2/4-bit integers cannot even be passed in or out. E8M0 is
# read correctly, but made with the wrong rounding: it is refused only where a node produces it.
_BAD_DTYPES = ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1", "INT4", "UINT4",
               "INT2", "UINT2")
_BAD_OUTPUT_DTYPES = ("FLOAT8E8M0",)


def _attr(node, name, default=None):
    import onnx

    found = next((a for a in node.attribute if a.name == name), None)
    value = default if found is None else onnx.helper.get_attribute_value(found)
    return value.decode() if isinstance(value, bytes) else value


def _resize_scales(node, consts, shapes) -> str | None:
    """Resize with scales whose output size is fractional: ONNX maps coordinates with the scale (or the unrounded
    size, for align_corners), TVM with the rounded output size."""
    if len(node.input) < 3 or not node.input[2]:
        return None
    scales, shape = consts.get(node.input[2]), shapes.get(node.input[0])
    if scales is None or scales.size == 0 or shape is None:
        return None
    axes = _attr(node, "axes") or range(len(shape))
    sizes = [shape[a] * s for a, s in zip(axes, scales.tolist())]
    if all(isinstance(s, float) and s.is_integer() for s in sizes):
        return None
    return f"scales {scales.tolist()} give a fractional output size for input shape {list(shape)}"


def _conv_transpose_padding(x_shape, w_shape, attrs: dict) -> list[int]:
    """The ONNX spec's total padding per spatial axis for ConvTranspose's output_shape: the size the strides make
    minus output_shape."""
    n = len(x_shape) - 2
    strides, dilations = attrs.get("strides") or [1] * n, attrs.get("dilations") or [1] * n
    extra, kernel = attrs.get("output_padding") or [0] * n, attrs.get("kernel_shape") or w_shape[2:]
    out = list(attrs["output_shape"])[-n:]
    return [strides[i] * (x_shape[i + 2] - 1) + extra[i] + (kernel[i] - 1) * dilations[i] + 1 - out[i]
            for i in range(n)]


def _conv_transpose_crop(node, consts, shapes) -> str | None:
    """output_shape smaller than the strides make: where to crop, ONNX's reference and onnxruntime disagree."""
    x, w = (shapes.get(t) for t in node.input[:2])
    if _attr(node, "output_shape") is None or x is None or w is None:
        return None
    attrs = {a.name: _attr(node, a.name) for a in node.attribute}
    if all(t <= 0 for t in _conv_transpose_padding(x, w, attrs)):
        return None
    return f"output_shape {list(attrs['output_shape'])} smaller than its strides make (a cropped output)"


def _dropout_training(node, consts, shapes) -> str | None:
    if len(node.input) < 3 or not node.input[2]:
        return None
    mode = consts.get(node.input[2])
    if mode is not None and not mode.any():
        return None
    return "training_mode (random dropout at run time)"


# op_type -> [(what it checks, rule(node, constants, static shapes) -> reason or None)]; a reason refuses the node.
_REFUSALS = {
    "BatchNormalization": [lambda n, c, s: "training_mode=1 (batch statistics)" if _attr(n, "training_mode") else None],
    "Dropout": [_dropout_training],
    "RoiAlign": [lambda n, c, s: "mode='max'" if _attr(n, "mode", "avg") == "max" else None],
    "Resize": [lambda n, c, s: "antialias=1" if _attr(n, "antialias") else None, _resize_scales],
    "ConvTranspose": [_conv_transpose_crop],
}
_HINTS = {
    "ConvTranspose": "export the model with explicit pads instead of output_shape",
    "BatchNormalization": "export the model in inference mode (PyTorch: model.eval() before export)",
    "Dropout": "export the model in inference mode (PyTorch: model.eval() before export)",
}


def refuse_wrong_conversions(model) -> None:
    """Raise an EdgecError naming the first node whose conversion would give wrong numbers (see _REFUSALS and
    _BAD_DTYPES). Runs on the pinned, shape-folded graph, so static shapes and constant inputs are known."""
    import onnx
    from onnx import numpy_helper

    def codes(names):
        return {getattr(onnx.TensorProto, name): name for name in names if hasattr(onnx.TensorProto, name)}

    bad, bad_out = codes(_BAD_DTYPES), codes(_BAD_DTYPES + _BAD_OUTPUT_DTYPES)
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    typed = [*graph.input, *graph.value_info, *graph.output]
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in typed if vi.type.HasField("tensor_type")}
    elem.update({t.name: t.data_type for t in graph.initializer})
    shapes = {vi.name: [d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in typed
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.node
                   if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    for node in graph.node:
        label = f"{node.op_type} node '{node.name or node.output[0]}'"
        found = [bad[elem[t]] for t in node.input if elem.get(t) in bad]
        found += [bad_out[elem[t]] for t in node.output if elem.get(t) in bad_out]
        if node.op_type == "Cast" and _attr(node, "to") in bad_out:
            found.append(bad_out[_attr(node, "to")])
        if found:
            dtype = found[0]
            raise EdgecError(f"{label} computes with {dtype} tensors, which edgec cannot convert "
                             "correctly (TVM's float8/int4/int2 support gives wrong numbers)",
                             "keep these tensors in float16/float32 or int8 in the exported model")
        if node.domain not in ("", "ai.onnx"):
            continue
        for rule in _REFUSALS.get(node.op_type, ()):
            reason = rule(node, consts, shapes)
            if reason:
                raise EdgecError(f"{label} uses {reason}, which edgec does not convert correctly yet",
                                 _HINTS.get(node.op_type, f"export the model without this form of {node.op_type}"))


# --------------------------------------------------------------------------------------------- converters
def _converters() -> dict:
    """op_type -> converter class; built on first use, since it imports TVM's frontend."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    def dtype(expr) -> str:
        return str(expr.ty.dtype)

    class IsInf(tvm_onnx.IsInf):
        """detect_positive / detect_negative (TVM's converter ignores them)."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            x = inputs[0]
            found = relax.op.isinf(x)
            zero = relax.const(0, dtype(x))
            if not attr.get("detect_positive", 1):
                found = relax.op.logical_and(found, relax.op.less(x, zero))
            if not attr.get("detect_negative", 1):
                found = relax.op.logical_and(found, relax.op.greater(x, zero))
            return found

    class Mod(tvm_onnx.Mod):
        """Float fmod=0 as numpy's mod: the C remainder moved to the divisor's sign (TVM's a - floor(a/b)*b gives
        NaN for an infinite divisor)."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            a, b = inputs
            if attr.get("fmod", 0) or not dtype(a).startswith(("float", "bfloat")):
                return super()._impl_v10(bb, inputs, attr, params)
            rem = bb.emit(relax.op.mod(a, b))
            zero = relax.const(0, dtype(a))
            move = relax.op.logical_and(relax.op.not_equal(rem, zero),
                                        relax.op.logical_xor(relax.op.less(rem, zero), relax.op.less(b, zero)))
            return relax.op.where(move, relax.op.add(rem, b), rem)

    class LayerNormalization(tvm_onnx.LayerNormalization):
        """Mean and InvStdDev outputs computed (TVM's converter returns scalar placeholders), in float32 as
        stash_type=1 asks."""

        @classmethod
        def _impl_v17(cls, bb, inputs, attr, params):
            y = bb.emit(super()._impl_v17(bb, inputs, attr, params).fields[0])
            x = inputs[0]
            rank = len(x.ty.shape)
            axes = list(range(attr.get("axis", -1) % rank, rank))
            stash = "float32" if attr.get("stash_type", 1) == 1 else dtype(x)
            xs = bb.emit(relax.op.astype(x, stash)) if dtype(x) != stash else x
            mean = bb.emit(relax.op.mean(xs, axes, keepdims=True))
            var = relax.op.mean(relax.op.square(relax.op.subtract(xs, mean)), axes, keepdims=True)
            inv = relax.op.rsqrt(relax.op.add(var, relax.const(attr.get("epsilon", 1e-5), stash)))
            return relax.Tuple([y, mean, bb.emit(inv)])

    class Dropout(tvm_onnx.Dropout):
        """Inference dropout is the identity, and its mask all true, as bool (TVM's mask is the float output);
        training mode is refused before conversion."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            mask = relax.op.ones(x.ty.shape, "bool")
            return relax.Tuple([x, mask])

        _impl_v12 = _impl_v1

    class SpaceToDepth(tvm_onnx.SpaceToDepth):
        """mode='CRD' (opset 28): channel-major output channels; TVM's converter always orders them DCR."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if attr.get("mode", b"DCR") not in (b"CRD", "CRD"):
                return super()._impl_v1(bb, inputs, attr, params)
            bs = int(attr["blocksize"])
            b, c, h, w = inputs[0].ty.shape
            x = relax.op.reshape(inputs[0], (b, c, h // bs, bs, w // bs, bs))
            x = relax.op.permute_dims(x, [0, 1, 3, 5, 2, 4])
            return relax.op.reshape(x, (b, c * bs * bs, h // bs, w // bs))

    class ConvTranspose(tvm_onnx.ConvTranspose):
        """output_shape (TVM's converter ignores it), when at least the size the strides make: the rows and
        columns beyond that come out at the end, as output_padding (smaller ones are refused before conversion)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            if "output_shape" not in attr:
                return super()._impl_v1(bb, inputs, attr, params)
            shapes = [[int(d) for d in t.ty.shape] for t in inputs[:2]]
            totals = _conv_transpose_padding(*shapes, attr)
            attr = {k: v for k, v in attr.items() if k not in ("output_shape", "auto_pad")}
            extra = attr.get("output_padding", [0] * len(totals))
            attr.update(pads=[0] * 2 * len(totals), output_padding=[e - t for e, t in zip(extra, totals)])
            return super()._impl_v1(bb, inputs, attr, params)

    return {c.__name__: c for c in (IsInf, Mod, LayerNormalization, Dropout, SpaceToDepth, ConvTranspose)}


_CONVERTERS: dict | None = None


def from_onnx(model, shape_dict: dict, dtype_dict: dict):
    """TVM's from_onnx (weights bound as constants, names kept) with edgec's converters in place of TVM's."""
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    global _CONVERTERS
    if _CONVERTERS is None:
        _CONVERTERS = _converters()

    class Importer(ONNXGraphImporter):
        def _convert_operator(self, op_name, inputs, attrs, opset):
            converter = _CONVERTERS.get(op_name)
            if converter is None:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            return self.bb.normalize(converter.get_converter(opset)(self.bb, inputs, attrs,
                                                                    [self._nodes, self._params]))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = Importer(shape_dict, dtype_dict, keep_params_in_input=False, sanitize=False)
    return importer.from_onnx(model.graph, opset)
