"""Where TVM's ONNX importer would compute a wrong result without a word: the node forms edgec refuses before
converting (`refuse_wrong_conversions`), and TVM converters it replaces with correct ones (`CONVERTERS`, used by
`from_onnx` here). Each rule was found by, and is checked with, bench/onnx_suite.py (the ONNX backend node
suite); tests/test_onnx_semantics.py holds a small model per rule.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgecError, last_line
from .onnx_detection import NEW_OPS as DETECTION_OPS
from .onnx_ml import NEW_OPS as ML_OPS
from .onnx_ops import CONSTANT_FORMS, NEW_OPS, dtype

# Operators TVM's importer has no converter for that edgec converts: the recurrent layers (onnx_recurrent), the
# control flow made plain graph before conversion (onnx_control_flow; a data-dependent If is TVM's Relax If), and
# onnx_ops', onnx_detection's and onnx_ml's operators (onnx_ml's ai.onnx.ml ones: onnx_ml.converts).
EDGEC_OPS = ("LSTM", "GRU", "RNN", "If", "Loop", "Scan", *NEW_OPS, *DETECTION_OPS, *ML_OPS)

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
    consts = graph_constants(graph)
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
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

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

    class BitShift(tvm_onnx.BitShift):
        """A shift by less than 0 or by the bit width or more, as ONNX defines it: the sign fill alone (-1 for a
        right shift of a negative X, else 0). TVM's converter leaves it to LLVM, where such a shift is undefined
        and each CPU gives its own number."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            x, y = inputs
            dt = dtype(x)
            out_of_range = relax.op.greater_equal(y, relax.const(np.iinfo(dt).bits, dtype(y)))
            if not dt.startswith("uint"):
                out_of_range = relax.op.logical_or(out_of_range, relax.op.less(y, relax.const(0, dtype(y))))
            out_of_range = bb.emit(out_of_range)
            safe_y = relax.op.where(out_of_range, relax.const(0, dtype(y)), y)
            right = attr.get("direction", b"LEFT") in (b"RIGHT", "RIGHT")
            shifted = (relax.op.right_shift if right else relax.op.left_shift)(x, safe_y)
            zero = relax.const(0, dt)
            fill = relax.op.where(relax.op.less(x, zero), relax.const(-1, dt), zero) if right and \
                not dt.startswith("uint") else zero
            return relax.op.where(out_of_range, fill, shifted)

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

    def static_shape(op: str, attr: dict, shape) -> None:
        """Refuse a target shape computed from the input data: the output's shape would be known only at run time
        (a bundle's signature is static), and TVM's converters make a malformed module of it."""
        if not isinstance(shape, (relax.ShapeExpr, tvm.ir.GenericConst)):
            name = attr["tvm_custom"]["name"]
            raise EdgecError(f"{op} node{f' {name!r}' if name else ''} takes its shape from the input data at run "
                             "time; edgec compiles static shapes only",
                             "if that shape comes from a graph input, fix it with --const-input NAME=FILE.npy")

    class Expand(tvm_onnx.Expand):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            static_shape("Expand", attr, inputs[1])
            return super()._impl_v13(bb, inputs, attr, params)

    class ConstantOfShape(tvm_onnx.ConstantOfShape):
        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            static_shape("ConstantOfShape", attr, inputs[0])
            return super()._impl_v9(bb, inputs, attr, params)

    def extreme(base, sign: int):
        """ReduceMax (sign 1) / ReduceMin (-1) as the spec defines them where TVM's do not: the empty set's result
        is the identity (-inf/+inf, the dtype's lowest/highest integer, False/True: TVM has none), bool inputs
        reduced as uint8 (TVM's reductions have no bool start value), and a float max of only -inf values is -inf
        (a min of +inf, +inf; TVM starts from the largest finite value and returns that)."""

        class Extreme(base):
            @classmethod
            def _fix(cls, impl, bb, inputs, attr, params):
                x = inputs[0]
                dt = dtype(x)
                reduced = bb.emit(relax.op.astype(x, "uint8")) if dt == "bool" else x
                result = bb.normalize(impl(bb, tvm_onnx.onnx_input([reduced, *inputs[1:]]), attr, params))
                out = [int(d) for d in result.ty.shape]
                if 0 in [int(d) for d in x.ty.shape] and 0 not in out:
                    if dt == "bool":
                        identity = sign < 0
                    elif dt.startswith(("float", "bfloat")):
                        identity = -sign * np.inf
                    else:
                        info = np.iinfo(np.dtype(dt))
                        identity = info.min if sign > 0 else info.max
                    return relax.const(np.full(out, identity, dt), dt)
                if dt == "bool":
                    return relax.op.astype(result, "bool")
                result = bb.emit(result)
                if not dt.startswith(("float", "bfloat")):
                    return result
                # sign where a value is not the infinity, else 0: the reduction of that is 0 only if none is
                infinite = relax.const(-sign * np.inf, dt)
                finite = bb.emit(relax.op.multiply(relax.op.astype(relax.op.not_equal(x, infinite), "int32"),
                                                   relax.const(sign, "int32")))
                any_finite = bb.emit(impl(bb, tvm_onnx.onnx_input([finite, *inputs[1:]]), attr, params))
                return relax.op.where(relax.op.equal(any_finite, relax.const(0, "int32")), infinite, result)

            @classmethod
            def _impl_v11(cls, bb, inputs, attr, params):
                return cls._fix(super()._impl_v11, bb, inputs, attr, params)

            @classmethod
            def _impl_v18(cls, bb, inputs, attr, params):
                return cls._fix(super()._impl_v18, bb, inputs, attr, params)

        Extreme.__name__ = base.__name__
        return Extreme

    ReduceMax, ReduceMin = extreme(tvm_onnx.ReduceMax, 1), extreme(tvm_onnx.ReduceMin, -1)

    class Attention(tvm_onnx.OnnxOpConverter):
        """ONNX's own Attention (opset 23 on; TVM converts every Attention as the com.microsoft one), step for step
        as onnx's reference implementation: Q and K each scaled by sqrt(scale), softcap before the masks, causal and
        window masks aligned bottom-right (after past_key, or per batch at nonpad_kv_seqlen), a softmax that is 0
        (not NaN) on a row whose mask is all -inf, as the spec says, and such rows zeroed in Y and mode 3."""

        @classmethod
        def _impl_v23(cls, bb, inputs, attr, params):
            q, k, v = inputs[:3]
            mask, past_key, past_value, nonpad = (inputs[i] if len(inputs) > i else None for i in range(3, 7))
            dt, name = dtype(q), attr["tvm_custom"]["name"] or "Attention"
            out_dt = dt
            if dt in ("float16", "bfloat16"):   # TVM's float16 matmul and exp round each step (and its bfloat16
                # kernels fail in code generation): float32 inside, rounded once
                q, k, v = (bb.emit(relax.op.astype(t, "float32")) for t in (q, k, v))
                past_key, past_value = (t if t is None else bb.emit(relax.op.astype(t, "float32"))
                                        for t in (past_key, past_value))
                if mask is not None and dtype(mask) == dt:
                    mask = bb.emit(relax.op.astype(mask, "float32"))
                dt = "float32"

            def const(value, to=None):
                return relax.const(np.asarray(value), to or dt)

            def add(a, b):
                return b if a is None else bb.emit(relax.op.add(a, b))

            def where(cond, yes, no):
                return bb.emit(relax.op.where(cond, const(yes), const(no)))

            def refuse(what):
                raise EdgecError(f"Attention node '{name}' {what}, which edgec does not convert",
                                 "export the attention as separate MatMul/Softmax nodes")

            rank = len(q.ty.shape)
            if rank == 3:
                def heads(t, n):       # (B, S, n*h) -> (B, n, S, h)
                    b, seq, hidden = (int(d) for d in t.ty.shape)
                    return bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(t, (b, seq, n, hidden // n))),
                                                         [0, 2, 1, 3]))

                if not attr.get("q_num_heads") or not attr.get("kv_num_heads"):
                    refuse("has 3-D inputs without q_num_heads and kv_num_heads")
                q = heads(q, attr["q_num_heads"])
                k, v = heads(k, attr["kv_num_heads"]), heads(v, attr["kv_num_heads"])
            if past_key is not None:
                k = bb.emit(relax.op.concat([past_key, k], axis=2))
                v = bb.emit(relax.op.concat([past_value, v], axis=2))
            present_k, present_v = k, v
            batch, q_heads, q_len, head = (int(d) for d in q.ty.shape)
            kv_heads, kv_len = int(k.ty.shape[1]), int(k.ty.shape[2])

            bias = None
            if mask is not None:
                short = kv_len - int(mask.ty.shape[-1])
                if short > 0:             # a mask shorter than the keys masks the rest
                    fill = np.full([int(d) for d in list(mask.ty.shape)[:-1]] + [short],
                                   dtype(mask) != "bool" and -np.inf)
                    mask = bb.emit(relax.op.concat([mask, const(fill, dtype(mask))], axis=-1))
                bias = where(mask, 0, -np.inf) if dtype(mask) == "bool" else mask
            # Causal and window masks: query i attends key j by j - (i + offset); the offset is past_key's length,
            # or per batch nonpad_kv_seqlen - q_len (an external cache), else 0.
            window = attr.get("left_window_size", -1), attr.get("right_window_size", -1)
            if attr.get("is_causal", 0) or window != (-1, -1):
                j_minus_i = np.arange(kv_len)[None, :] - np.arange(q_len)[:, None]
                if past_key is None and nonpad is not None:
                    offset = bb.emit(relax.op.reshape(relax.op.astype(nonpad, "int64"), (batch, 1, 1, 1)))
                    diff = bb.emit(relax.op.subtract(const(j_minus_i + q_len, "int64"), offset))  # j - i - offset
                else:
                    diff = const(j_minus_i - (int(past_key.ty.shape[2]) if past_key is not None else 0), "int64")
                allowed = []
                if attr.get("is_causal", 0):
                    allowed.append(relax.op.less_equal(diff, const(0, "int64")))
                if window[0] >= 0:
                    allowed.append(relax.op.less_equal(relax.op.negative(diff), const(window[0], "int64")))
                if window[1] >= 0:
                    allowed.append(relax.op.less_equal(diff, const(window[1], "int64")))
                for cond in allowed:
                    bias = add(bias, where(bb.emit(cond), 0, -np.inf))
            if nonpad is not None:
                keys = relax.op.less(const(np.arange(kv_len), "int64"),
                                     relax.op.reshape(relax.op.astype(nonpad, "int64"), (batch, 1, 1, 1)))
                bias = add(bias, where(bb.emit(keys), 0, -np.inf))

            if q_heads != kv_heads:       # grouped-query attention: each K/V head serves consecutive Q heads
                if q_heads % kv_heads or int(v.ty.shape[1]) != kv_heads:
                    refuse(f"has {q_heads} query heads for {kv_heads} key heads")
                k = bb.emit(relax.op.repeat(k, q_heads // kv_heads, axis=1))
                v = bb.emit(relax.op.repeat(v, q_heads // kv_heads, axis=1))
            scale = const(np.sqrt(attr.get("scale", 1 / np.sqrt(head))))
            qk = bb.emit(relax.op.matmul(relax.op.multiply(q, scale),
                                         relax.op.permute_dims(relax.op.multiply(k, scale), [0, 1, 3, 2])))
            softcap = attr.get("softcap", 0.0)
            if softcap > 0:
                qk = bb.emit(relax.op.multiply(relax.op.tanh(relax.op.divide(qk, const(softcap))), const(softcap)))
            mode = attr.get("qk_matmul_output_mode", 0)
            # qk_matmul_output as the spec defines it: 1 after softcap, 2 with the mask added as well (-inf where
            # masked, as onnx's reference; onnxruntime writes the lowest finite value there), 3 the probabilities.
            # Mode 0 with softcap is refused: the spec says the raw product, onnx's reference returns it capped.
            if attr["tvm_custom"]["num_outputs"] > 3 and softcap > 0 and mode == 0:
                refuse("outputs qk_matmul_output in mode 0 with softcap")
            scores = add(qk, bias) if bias is not None else qk
            qk_out = scores if mode == 2 else qk
            precision = attr.get("softmax_precision")
            if precision is not None:
                import onnx

                scores = bb.emit(relax.op.astype(scores, str(onnx.helper.tensor_dtype_to_np_dtype(precision))))
            # The reference's softmax shifts an all -inf row by 0 and divides its zero sum by 1; here by the lowest
            # finite value and max(sum, 1) (a row with a finite maximum sums to at least 1): the same numbers,
            # without a `where` read along a broadcast axis, which cpu-default-schedule cannot inline.
            sdt = dtype(scores)
            top = bb.emit(relax.op.max(scores, axis=-1, keepdims=True))
            top = bb.emit(relax.op.maximum(top, const(np.finfo(np.dtype(sdt) if sdt != "bfloat16" else np.float32).min
                                                      if sdt != "bfloat16" else -3.3895e38, sdt)))
            e = bb.emit(relax.op.exp(relax.op.subtract(scores, top)))
            total = bb.emit(relax.op.maximum(relax.op.sum(e, axis=-1, keepdims=True), const(1, sdt)))
            probs = bb.emit(relax.op.divide(e, total))
            if bias is not None:          # a row whose mask is all -inf attends nothing: 0, even where scores are NaN
                attendable = relax.op.astype(relax.op.not_equal(bias, const(-np.inf)), "int32")
                masked = relax.op.equal(relax.op.max(attendable, axis=-1, keepdims=True), const(0, "int32"))
                probs = bb.emit(relax.op.where(masked, const(0, sdt), probs))
            probs = bb.emit(relax.op.astype(probs, dt)) if sdt != dt else probs
            if mode == 3:
                qk_out = probs
            y = bb.emit(relax.op.matmul(probs, v))
            if rank == 3:
                y = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(y, [0, 2, 1, 3])), (batch, q_len, -1)))
            if out_dt != dt:
                y, present_k, present_v, qk_out = (bb.emit(relax.op.astype(t, out_dt))
                                                   for t in (y, present_k, present_v, qk_out))
            return relax.Tuple([y, present_k, present_v, qk_out])

    from .onnx_detection import detection_converters
    from .onnx_ml import ml_converters
    from .onnx_ops import op_converters
    from .onnx_quant import quant_converters
    from .onnx_recurrent import recurrent_converters

    return {**{c.__name__: c for c in (IsInf, Mod, BitShift, LayerNormalization, Dropout, SpaceToDepth,
                                       ConvTranspose, Expand, ConstantOfShape, Attention, ReduceMax, ReduceMin)},
            **recurrent_converters(), **quant_converters(), **op_converters(), **detection_converters(),
            **ml_converters()}


_CONVERTERS: dict | None = None


def all_nodes(graph):
    """The graph's nodes and those of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                yield from all_nodes(sub)


def graph_constants(graph) -> dict:
    """Name -> value of the graph's initializers and Constant nodes (the `value` form, and the scalar and list
    forms that functions' expanded bodies use)."""
    import onnx
    from onnx import numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        for a in node.attribute if node.op_type == "Constant" else ():
            if a.name == "value":
                consts[node.output[0]] = numpy_helper.to_array(a.t)
            elif a.name in CONSTANT_FORMS:
                consts[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(a), CONSTANT_FORMS[a.name])
    return consts


def from_onnx(model, shape_dict: dict, dtype_dict: dict):
    """TVM's from_onnx (weights bound as constants, names kept) with edgec's converters in place of TVM's."""
    from tvm.relax.frontend.onnx.onnx_frontend import ONNXGraphImporter

    global _CONVERTERS
    if _CONVERTERS is None:
        _CONVERTERS = _converters()

    # The Ifs left are data-dependent (onnx_control_flow took the constant ones): TVM makes each a Relax If whose
    # branches are converted without the shape folding the main graph had, which can fail.
    branch_of = {attr.g.name: node.name or node.output[0] for node in all_nodes(model.graph) if node.op_type == "If"
                 for attr in node.attribute if attr.HasField("g")}

    class Importer(ONNXGraphImporter):
        def _check_for_unsupported_ops(self, graph):
            """Already checked by edgec's frontend, which knows edgec's converters too."""

        def _convert_subgraph(self, bb, graph):
            try:
                return super()._convert_subgraph(bb, graph)
            except EdgecError:
                raise
            except Exception as e:  # TVM's converters raise anything on a branch they cannot convert
                raise EdgecError(f"If node '{branch_of.get(graph.name, graph.name)}' chooses its branch at run time, "
                                 f"and TVM cannot convert its {graph.name or 'branch'} ({last_line(e)})",
                                 "make the condition constant: fix the inputs it depends on with --const-input "
                                 "NAME=FILE.npy (and pin shapes with --input-shape)") from e

        def _convert_operator(self, op_name, inputs, attrs, opset):
            converter = _CONVERTERS.get(op_name)
            if converter is None:
                return super()._convert_operator(op_name, inputs, attrs, opset)
            return self.bb.normalize(converter.get_converter(opset)(self.bb, inputs, attrs,
                                                                    [self._nodes, self._params]))

    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    importer = Importer(shape_dict, dtype_dict, keep_params_in_input=False, sanitize=False)
    return importer.from_onnx(model.graph, opset)
