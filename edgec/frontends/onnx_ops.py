"""Converters for ONNX operators and node forms TVM's importer lacks, each per the ONNX spec (and onnx's reference
implementation where the spec leaves a detail open); the forms they do not cover are refused in one line. Found
and checked with bench/onnx_suite.py; tests/test_onnx_semantics.py holds a small model per converter.
"""
from __future__ import annotations

import numpy as np

from ..errors import EdgecError

# Operators TVM's importer has no converter for at all (onnx.py's unsupported-operator check reads this).
NEW_OPS = ("NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss", "CumProd", "LpNormalization", "Swish",
           "CenterCropPad", "RotaryEmbedding", "BitCast", "Col2Im", "TensorScatter", "Det")

# Constant's scalar and list attribute forms -> their element type (`value` holds a whole tensor).
CONSTANT_FORMS = {"value_float": "float32", "value_floats": "float32", "value_int": "int64", "value_ints": "int64"}


def dtype(expr) -> str:
    return str(expr.ty.dtype)


def shape(expr) -> list[int]:
    return [int(d) for d in expr.ty.shape]


def refuse(op: str, attr: dict, why: str, fix: str | None = None):
    """Refuse a node in one line: `why` names the form, `fix` what to do (by default, export without it)."""
    name = attr["tvm_custom"]["name"]
    raise EdgecError(f"{op} node{f' {name!r}' if name else ''} {why}, which edgec does not convert",
                     fix or f"export the model without this form of {op}")


def leading_part(bb, kernel, name: str, inputs: list, capacity: tuple, axis: int, size_name: str):
    """A size known at run time only, on the runtime alone (TVM's own data-dependent operators call functions of its
    compiler library): `kernel` writes its entries into a buffer of the most there can be (int64, `capacity`) and
    their number into a (1,) count; the result is that buffer's first `count` entries along `axis`."""
    from tvm import relax, tirx

    result = bb.emit(relax.call_tir(bb.add_func(kernel, name), inputs,
                                    [relax.TensorType(capacity, "int64"), relax.TensorType((1,), "int64")]))
    size = tirx.Var(size_name, "int64")
    bb.match_cast(bb.emit(relax.op.tensor_to_shape(bb.emit(relax.TupleGetItem(result, 1)))), relax.ShapeType([size]))
    return relax.op.strided_slice(bb.emit(relax.TupleGetItem(result, 0)), [axis], [0], [size], assume_inbound=True)


def _nonzero_kernel(size: int, rank: int, dtype: str):
    """The coordinates (rank, capacity size) of the nonzero elements of a flattened tensor in row-major order, as
    numpy.nonzero gives them, and their number; `extent` and `stride` are the tensor's dims and row-major strides."""
    from tvm.script import tirx as T

    @T.prim_func(private=True)
    def nonzero(x: T.Buffer((size,), dtype), extent: T.Buffer((rank,), "int64"), stride: T.Buffer((rank,), "int64"),
                indices: T.Buffer((rank, size), "int64"), count: T.Buffer((1,), "int64")):
        T.func_attr({"tir.noalias": True})
        count[0] = T.int64(0)
        for i in range(size):
            # numpy and onnxruntime count NaN as nonzero; LLVM's ordered `!=` does not
            if x[i] != T.Cast(dtype, 0) or T.isnan(x[i]):
                for d in range(rank):
                    indices[d, count[0]] = T.Cast("int64", i) // stride[d] % extent[d]
                count[0] = count[0] + T.int64(1)

    return nonzero


def nonzero_indices(bb, x):
    """ONNX NonZero of `x` with a static shape: int64 [rank, count] (a 0-d tensor as one of one element)."""
    from tvm import relax

    dims = shape(x) or [1]
    size, rank = int(np.prod(dims)), len(dims)
    if size == 0:
        return relax.const(np.zeros((rank, 0), np.int64), "int64")
    strides = np.cumprod([1, *dims[:0:-1]])[::-1].astype(np.int64)
    if dtype(x) == "bool":   # LLVM's code generation takes no bool != false
        x = bb.emit(relax.op.astype(x, "int8"))
    return leading_part(bb, _nonzero_kernel(size, rank, dtype(x)), "nonzero",
                        [bb.emit(relax.op.reshape(x, (size,))), relax.const(np.asarray(dims, np.int64), "int64"),
                         relax.const(strides, "int64")], (rank, size), 1, "nonzero_count")


def build_time_value(op: str, attr: dict, expr, what: str, fix: str | None = None) -> np.ndarray | None:
    """The value of an input edgec needs at build time (axes, shapes, thresholds); None for an absent optional
    input."""
    import tvm

    if expr is None:
        return None
    if not isinstance(expr, tvm.ir.GenericConst):
        refuse(op, attr, f"takes its {what} from the input data at run time", fix)
    return expr.value.numpy()


# Resize's and Upsample's string attributes -> their default and every value the spec allows (tf_half_pixel_for_nn:
# opset 11-12); any other would otherwise be interpolated as some other mode.
RESIZE_CHOICES = {
    "mode": ("nearest", ("nearest", "linear", "cubic")),
    "coordinate_transformation_mode": ("half_pixel", ("half_pixel", "half_pixel_symmetric", "pytorch_half_pixel",
                                                      "align_corners", "asymmetric", "tf_crop_and_resize",
                                                      "tf_half_pixel_for_nn")),
    "nearest_mode": ("round_prefer_floor", ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")),
    "keep_aspect_ratio_policy": ("stretch", ("stretch", "not_larger", "not_smaller")),
}


def check_resize_choices(op: str, attr: dict) -> None:
    for name, (default, allowed) in RESIZE_CHOICES.items():
        value = attr.get(name, default)
        value = value.decode() if isinstance(value, bytes) else value
        if value not in allowed:
            refuse(op, attr, f"has {name}={value!r}", f"set {name} to one of {', '.join(allowed)}")


def _resize_source(mode: str, in_w: int, out_w: int, scale: float, roi) -> tuple[np.ndarray, np.ndarray | None]:
    """Resize's source coordinate of each output index along one axis, per coordinate_transformation_mode (ONNX
    maps with the scale, and the unrounded length scale * in_w), and for tf_crop_and_resize which fall outside."""
    y = np.arange(out_w, dtype=np.float64)
    length = scale * in_w
    if mode == "align_corners":
        return (np.zeros(out_w) if length == 1 else y * (in_w - 1) / (length - 1)), None
    if mode == "asymmetric":
        return y / scale, None
    if mode == "tf_crop_and_resize":
        span = (roi[1] - roi[0]) * (in_w - 1)
        x = (np.full(out_w, span / 2) if length == 1 else y * span / (length - 1)) + roi[0] * (in_w - 1)
        return x, (x < 0) | (x > in_w - 1)
    if mode == "pytorch_half_pixel":
        return (np.full(out_w, -0.5) if length == 1 else (y + 0.5) / scale - 0.5), None
    if mode == "half_pixel":
        return (y + 0.5) / scale - 0.5, None
    if mode == "tf_half_pixel_for_nn":
        return (y + 0.5) / scale, None
    if mode == "half_pixel_symmetric":
        return in_w / 2 * (1 - out_w / length) + (y + 0.5) / scale - 0.5, None
    raise ValueError(mode)


def _resize_coefficients(mode: str, ratio: float, scale: float, attr: dict) -> np.ndarray:
    """The interpolation kernel's weights at `ratio` in (0, 1] past the left neighbour; antialias widens a
    downsampling kernel by 1 / scale."""
    a = attr.get("cubic_coeff_a", -0.75)
    if mode == "nearest":
        rounding = attr.get("nearest_mode", "round_prefer_floor")
        if ratio == 1:
            return np.array([0.0, 1.0])
        right = {"round_prefer_floor": ratio > 0.5, "round_prefer_ceil": ratio >= 0.5, "floor": False,
                 "ceil": True}[rounding]
        return np.array([0.0, 1.0]) if right else np.array([1.0, 0.0])
    if not attr.get("antialias", 0):
        if mode == "linear":
            return np.array([1 - ratio, ratio])
        return np.array([((a * (t + 1) - 5 * a) * (t + 1) + 8 * a) * (t + 1) - 4 * a if i in (0, 3)
                         else ((a + 2) * t - (a + 3)) * t * t + 1
                         for i, t in enumerate((ratio, ratio, 1 - ratio, 1 - ratio))])
    scale = min(scale, 1.0)
    if mode == "linear":
        start = int(np.floor(-1 / scale) + 1)
        args = np.abs((np.arange(start, 2 - start) - ratio) * scale)
        weights = np.clip(1 - args, 0, 1)
    else:
        start = int(np.floor(-2 / scale) + 1)
        args = np.abs((np.arange(start, 2 - start) - ratio) * scale)
        weights = np.where(args <= 1, (a + 2) * args ** 3 - (a + 3) * args ** 2 + 1,
                           np.where(args < 2, a * args ** 3 - 5 * a * args ** 2 + 8 * a * args - 4 * a, 0.0))
    return weights / weights.sum()


def resize_matrix(mode: str, in_w: int, out_w: int, scale: float, roi, attr: dict):
    """(W, outside): output = W @ input along one axis, as onnx's reference resizes it (the n neighbours nearest
    the source coordinate, ties to the smaller index, edges repeated; exclude_outside drops and renormalizes
    those beyond the edge), and the tf_crop_and_resize outputs that take extrapolation_value (or None)."""
    x, outside = _resize_source(attr.get("coordinate_transformation_mode", "half_pixel"), in_w, out_w, scale, roi)
    left = np.floor(x)
    ratio = np.where(x == left, 1.0, x - left)
    coeffs = np.array([_resize_coefficients(mode, r, scale, attr) for r in ratio])
    n = coeffs.shape[1]
    pad = int(np.ceil(n / 2))
    padded = x + pad
    frac = padded - np.floor(padded)
    if n % 2 == 0:
        offset = np.where(frac == 0, -(n // 2), -(n // 2) + 1)
    else:
        offset = np.where(frac <= 0.5, -((n - 1) // 2), -((n - 1) // 2) + 1)
    neighbours = (np.floor(padded).astype(np.int64) + offset)[:, None] + np.arange(n)[None, :] - pad
    if attr.get("exclude_outside", 0):
        coeffs = np.where((neighbours < 0) | (neighbours >= in_w), 0.0, coeffs)
        total = coeffs.sum(axis=1, keepdims=True)
        coeffs = coeffs / np.where(total == 0, 1.0, total)
    weights = np.zeros((out_w, in_w))
    np.add.at(weights, (np.repeat(np.arange(out_w), n), np.clip(neighbours, 0, in_w - 1).reshape(-1)),
              coeffs.reshape(-1))
    return weights, outside


def op_converters() -> dict:
    """op_type -> converter class, for onnx_semantics.from_onnx."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    def text(value) -> str:
        return value.decode() if isinstance(value, bytes) else value

    class Constant(tvm_onnx.Constant):
        """The scalar and list forms value_float(s) / value_int(s) (TVM's converter reads only `value`)."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            if "value" in attr:
                return super()._impl_v13(bb, inputs, attr, params)
            found = next((k for k in CONSTANT_FORMS if k in attr), None)
            if found is None:
                refuse("Constant", attr, f"holds its value as {next(k for k in attr if k != 'tvm_custom')}")
            return relax.const(np.asarray(attr[found], CONSTANT_FORMS[found]), CONSTANT_FORMS[found])

    def nll(bb, log_prob, target, weight, attr):
        """NegativeLogLikelihoodLoss on log-probabilities (N, C, d...) and targets (N, d...): the loss of each
        element is -log_prob[n, target, d...] * weight[target], 0 where target is ignore_index; 'mean' divides the
        sum by the sum of those weights (1 each without a weight input), as the spec and onnx's reference do."""
        dt = dtype(log_prob)
        reduction = text(attr.get("reduction", b"mean"))
        if reduction not in ("none", "sum", "mean"):
            refuse("NegativeLogLikelihoodLoss", attr, f"has reduction={reduction!r}")
        ignore = attr.get("ignore_index")
        kept = None
        if ignore is not None:   # an ignored target may lie outside [0, C): gathered as class 0, then weighted 0
            kept = bb.emit(relax.op.not_equal(target, relax.const(ignore, dtype(target))))
            target = bb.emit(relax.op.where(kept, target, relax.const(0, dtype(target))))
        picked = relax.op.gather_elements(log_prob, relax.op.expand_dims(target, 1), axis=1)
        loss = bb.emit(relax.op.negative(relax.op.squeeze(picked, [1])))
        w = bb.emit(relax.op.take(weight, target, axis=0)) if weight is not None else None
        if kept is not None:
            mask = bb.emit(relax.op.astype(kept, dt))
            w = mask if w is None else bb.emit(relax.op.multiply(w, mask))
        if w is not None:
            loss = bb.emit(relax.op.multiply(loss, w))
        if reduction == "none":
            return loss
        total = bb.emit(relax.op.sum(loss))
        if reduction == "sum":
            return total
        count = relax.op.sum(w) if w is not None else relax.const(float(np.prod(shape(target))), dt)
        return bb.emit(relax.op.divide(total, count))

    class NegativeLogLikelihoodLoss(tvm_onnx.OnnxOpConverter):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            weight = inputs[2] if len(inputs) > 2 else None
            return nll(bb, inputs[0], inputs[1], weight, attr)

    class SoftmaxCrossEntropyLoss(tvm_onnx.OnnxOpConverter):
        """NegativeLogLikelihoodLoss of log_softmax over the class axis (1); log_prob is the second output."""

        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            log_prob = bb.emit(relax.op.nn.log_softmax(inputs[0], axis=1))
            weight = inputs[2] if len(inputs) > 2 else None
            loss = nll(bb, log_prob, inputs[1], weight, attr)
            if attr["tvm_custom"]["num_outputs"] > 1:
                return relax.Tuple([loss, log_prob])
            return loss

    class CumProd(tvm_onnx.OnnxOpConverter):
        @classmethod
        def _impl_v26(cls, bb, inputs, attr, params):
            x = inputs[0]
            axis = build_time_value("CumProd", attr, inputs[1], "axis").reshape(-1)
            if axis.size != 1:
                refuse("CumProd", attr, f"has an axis input of {axis.size} elements")
            axis = int(axis[0]) % len(shape(x))
            if attr.get("reverse", 0):
                x = bb.emit(relax.op.flip(x, axis))
            y = bb.emit(relax.op.cumprod(x, axis, exclusive=bool(attr.get("exclusive", 0))))
            return relax.op.flip(y, axis) if attr.get("reverse", 0) else y

    class LpNormalization(tvm_onnx.OnnxOpConverter):
        """x / ||x||_p along axis, p 1 or 2 (the only ones the spec allows; the norm of p=1 sums |x|, as the spec says,
        where onnx's reference sums x)."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, p, axis = inputs[0], attr.get("p", 2), attr.get("axis", -1)
            if p == 1:
                norm = relax.op.sum(relax.op.abs(x), axis, keepdims=True)
            elif p == 2:
                norm = relax.op.sqrt(relax.op.sum(relax.op.multiply(x, x), axis, keepdims=True))
            else:
                refuse("LpNormalization", attr, f"has p={p} (the spec allows 1 and 2)")
            # a zero norm (x all zero there) divides by 1: 0, not NaN, as onnx's reference returns
            norm = bb.emit(norm)
            one = relax.const(1, dtype(x))
            return relax.op.divide(x, relax.op.where(relax.op.equal(norm, relax.const(0, dtype(x))), one, norm))

    class Swish(tvm_onnx.OnnxOpConverter):
        @classmethod
        def _impl_v24(cls, bb, inputs, attr, params):
            x = inputs[0]
            alpha = relax.const(attr.get("alpha", 1.0), dtype(x))
            return relax.op.multiply(x, relax.op.sigmoid(relax.op.multiply(x, alpha)))

    class CenterCropPad(tvm_onnx.OnnxOpConverter):
        """Per axis: a larger input is cropped to its centre (the extra row, if odd, taken from the start), a
        smaller one zero-padded around it (the extra row at the end), as onnx's reference does."""

        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            x = inputs[0]
            dims = shape(x)
            target = [int(s) for s in build_time_value("CenterCropPad", attr, inputs[1], "shape").reshape(-1)]
            axes = [a % len(dims) for a in attr.get("axes", range(len(dims)))]
            if len(axes) != len(target):
                refuse("CenterCropPad", attr, f"has {len(target)} sizes for {len(axes)} axes")
            begin, end, pads = [0] * len(dims), list(dims), [0] * (2 * len(dims))
            for axis, size in zip(axes, target):
                if dims[axis] > size:
                    begin[axis] = (dims[axis] - size) // 2
                    end[axis] = begin[axis] + size
                elif dims[axis] < size:
                    pads[axis] = (size - dims[axis]) // 2
                    pads[len(dims) + axis] = size - dims[axis] - pads[axis]
            y = bb.emit(relax.op.strided_slice(x, list(range(len(dims))), begin, end))
            if any(pads):
                y = relax.op.nn.pad(y, [p for axis in range(len(dims)) for p in (pads[axis], pads[len(dims) + axis])])
            return y

    class RotaryEmbedding(tvm_onnx.OnnxOpConverter):
        """ONNX's RotaryEmbedding (opset 23): the first rotary_embedding_dim channels of each head rotated by the
        (position-gathered) cos/sin caches, as halves or interleaved pairs; the rest passed through."""

        @classmethod
        def _impl_v23(cls, bb, inputs, attr, params):
            x, cos, sin = inputs[:3]
            position = inputs[3] if len(inputs) > 3 and inputs[3] is not None else None
            dims = shape(x)
            if len(dims) == 4:        # (B, H, S, D) -> (B, S, H, D)
                x = bb.emit(relax.op.permute_dims(x, [0, 2, 1, 3]))
            else:                     # (B, S, H*D) -> (B, S, H, D)
                heads = attr.get("num_heads", 0)
                if not heads:
                    refuse("RotaryEmbedding", attr, "has a 3-D input without num_heads")
                x = bb.emit(relax.op.reshape(x, (dims[0], dims[1], heads, dims[2] // heads)))
            b, seq, heads, head = shape(x)
            rotary = attr.get("rotary_embedding_dim", 0) or head
            if position is not None:  # caches (max_position, rotary/2) read at each (B, S) position
                cos, sin = (bb.emit(relax.op.take(c, position, axis=0)) for c in (cos, sin))
            cos, sin = (bb.emit(relax.op.expand_dims(c, 2)) for c in (cos, sin))
            rotated = bb.emit(relax.op.strided_slice(x, [3], [0], [rotary]))
            if attr.get("interleaved", 0):   # pairs (x[2i], x[2i+1])
                pairs = bb.emit(relax.op.reshape(rotated, (b, seq, heads, rotary // 2, 2)))
                x1, x2 = (bb.emit(relax.op.squeeze(relax.op.strided_slice(pairs, [4], [i], [i + 1]), [4]))
                          for i in (0, 1))
            else:                            # halves
                x1, x2 = (bb.emit(relax.op.strided_slice(rotated, [3], [i * rotary // 2], [(i + 1) * rotary // 2]))
                          for i in (0, 1))
            real = bb.emit(relax.op.subtract(relax.op.multiply(cos, x1), relax.op.multiply(sin, x2)))
            imag = bb.emit(relax.op.add(relax.op.multiply(sin, x1), relax.op.multiply(cos, x2)))
            if attr.get("interleaved", 0):
                out = relax.op.reshape(relax.op.stack([real, imag], axis=4), (b, seq, heads, rotary))
            else:
                out = relax.op.concat([real, imag], axis=3)
            if rotary < head:
                out = relax.op.concat([bb.emit(out), relax.op.strided_slice(x, [3], [rotary], [head])], axis=3)
            out = bb.emit(out)
            if len(dims) == 4:
                return relax.op.permute_dims(out, [0, 2, 1, 3])
            return relax.op.reshape(out, dims)

    class RMSNormalization(tvm_onnx.OnnxOpConverter):
        """x / sqrt(mean(x^2 over axis..) + epsilon) * Scale, Scale broadcast to the normalized shape, in float32
        for stash_type=1 (TVM's rms_norm takes only a Scale of that exact shape, and fails to compile over every
        axis)."""

        @classmethod
        def _impl_v23(cls, bb, inputs, attr, params):
            x, scale = inputs[:2]
            out_dt = dtype(x)
            compute = "float32" if attr.get("stash_type", 1) == 1 else out_dt
            x, scale = (t if dtype(t) == compute else bb.emit(relax.op.astype(t, compute)) for t in (x, scale))
            axes = list(range(attr.get("axis", -1) % len(shape(x)), len(shape(x))))
            mean = bb.emit(relax.op.mean(relax.op.multiply(x, x), axes, keepdims=True))
            inv = bb.emit(relax.op.rsqrt(relax.op.add(mean, relax.const(attr.get("epsilon", 1e-5), compute))))
            y = bb.emit(relax.op.multiply(relax.op.multiply(x, inv), scale))
            return y if compute == out_dt else relax.op.astype(y, out_dt)

    class Pow(tvm_onnx.Pow):
        """An exponent of another type than the base (TVM's power takes one type, and floats only): computed in
        the base's float type, or for an integer base in float64 and truncated back, as numpy's int power gives
        while the result fits 2^53 (integer overflow, beyond, ONNX leaves undefined)."""

        @classmethod
        def _impl_v7(cls, bb, inputs, attr, params):
            x, y = inputs
            if dtype(x) == dtype(y) and dtype(x).startswith(("float", "bfloat")):
                return super()._impl_v7(bb, inputs, attr, params)
            compute = dtype(x) if dtype(x).startswith(("float", "bfloat")) else "float64"
            x_, y_ = (t if dtype(t) == compute else bb.emit(relax.op.astype(t, compute)) for t in (x, y))
            out = bb.emit(relax.op.power(x_, y_))
            return out if compute == dtype(x) else relax.op.astype(out, dtype(x))

    class BitCast(tvm_onnx.OnnxOpConverter):
        """The same bits read as another type of the same width (the shape stays); other widths and bool, whose
        bit layout TVM does not pin down, are refused."""

        @classmethod
        def _impl_v26(cls, bb, inputs, attr, params):
            import onnx
            import tvm
            from tvm import topi

            x = inputs[0]
            src, to = dtype(x), str(onnx.helper.tensor_dtype_to_np_dtype(attr["to"]))
            if src != to and ("bool" in (src, to) or tvm.DataType(src).bits != tvm.DataType(to).bits):
                refuse("BitCast", attr, f"casts {src} to {to} (edgec reinterprets types of one width, not bool)")
            return bb.emit_te(topi.reinterpret, x, to)

    def resize(bb, x, out: list[int], scales: list[float], roi, attr: dict, op: str):
        """Resize axis by axis with the ONNX coordinate mapping (resize_matrix): nearest as a gather (exact for
        every type), linear and cubic as a product with the weights (float32 inside for float16)."""
        check_resize_choices(op, attr)
        mode = text(attr.get("mode", b"nearest"))
        spec = {k: text(v) for k, v in attr.items() if k != "tvm_custom"}
        dt = dtype(x)
        if mode == "nearest" and spec.get("antialias", 0):
            refuse(op, attr, "has antialias=1 with mode='nearest' (the spec defines antialias for linear and cubic)")
        if mode != "nearest" and not dt.startswith(("float", "bfloat")):
            refuse(op, attr, f"interpolates {dt} values in mode={mode!r}")
        compute = "float32" if dt in ("float16", "bfloat16") else dt
        y = x if compute == dt or mode == "nearest" else bb.emit(relax.op.astype(x, compute))
        rank = len(out)
        for axis in range(rank):
            in_w = shape(y)[axis]
            axis_roi = None if roi is None else (roi[axis], roi[rank + axis])
            if np.isclose(scales[axis], 1.0) and out[axis] == in_w and (axis_roi is None or np.allclose(axis_roi, (0, 1))):
                continue      # onnx's reference leaves such an axis as it is
            weights, outside = resize_matrix(mode, in_w, out[axis], scales[axis], axis_roi, spec)
            if mode == "nearest":
                y = bb.emit(relax.op.take(y, relax.const(weights.argmax(axis=1).astype(np.int64)), axis=axis))
            else:
                order = [a for a in range(rank) if a != axis] + [axis]
                moved = relax.op.permute_dims(y, order) if axis != rank - 1 else y
                moved = bb.emit(relax.op.matmul(moved, relax.const(weights.T.astype(compute), compute)))
                y = bb.emit(relax.op.permute_dims(moved, np.argsort(order).tolist()) if axis != rank - 1 else moved)
            if outside is not None and outside.any():
                mask = outside.reshape([-1 if a == axis else 1 for a in range(rank)])
                y = bb.emit(relax.op.where(relax.const(mask), relax.const(attr.get("extrapolation_value", 0.0), compute
                                                                         if mode != "nearest" else dt), y))
        return y if dtype(y) == dt else relax.op.astype(y, dt)

    class Resize(tvm_onnx.Resize):
        """`axes` and `keep_aspect_ratio_policy` (TVM's converter ignores both), as onnx's reference reads them:
        roi, scales and sizes spread to every axis, the kept aspect ratio's sizes rounded half up. Where TVM would
        map coordinates differently from ONNX (a scale whose output size is fractional: TVM maps with the rounded
        size), antialias, a resized axis 0 or 1 (TVM resizes axes 2 on) or a rank other than 3 to 5 (TVM's), edgec's
        own resize computes it."""

        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            check_resize_choices("Resize", attr)
            x = inputs[0]
            dims = shape(x)
            rank = len(dims)
            axes = [a % rank for a in attr.get("axes", range(rank))]
            policy = text(attr.get("keep_aspect_ratio_policy", b"stretch"))
            roi, scales, sizes = (inputs[i] if len(inputs) > i else None for i in (1, 2, 3))
            roi, scales, sizes = (None if t is None else build_time_value("Resize", attr, t, what).astype(np.float64)
                                  for t, what in ((roi, "roi"), (scales, "scales"), (sizes, "sizes")))
            roi, scales, sizes = (None if t is None or t.size == 0 else t for t in (roi, scales, sizes))
            if roi is not None:
                full = np.array([0.0] * rank + [1.0] * rank)
                full[axes], full[[rank + a for a in axes]] = roi[:len(axes)], roi[len(axes):]
                roi = full
            factors = np.ones(rank)
            if scales is not None:
                factors[axes] = scales
                out = np.floor(factors * dims)
            else:
                out = np.array(dims, np.float64)
                if sizes is not None:
                    out[axes] = sizes
                factors = out / dims
                if sizes is not None and policy != "stretch":
                    kept = factors[axes].min() if policy == "not_larger" else factors[axes].max()
                    factors[axes] = kept
                    out[axes] = np.floor(kept * np.asarray(dims, np.float64)[axes] + 0.5)
            own = (attr.get("antialias", 0) or np.any(factors * dims != out) or np.any(out[:2] != dims[:2])
                   or rank not in (3, 4, 5))
            if own:
                return resize(bb, x, out.astype(int).tolist(), factors.tolist(), roi, attr, "Resize")
            attr = {k: v for k, v in attr.items() if k not in ("axes", "keep_aspect_ratio_policy")}
            inputs = [x, *(None if t is None else relax.const(t.astype(dt), dt)
                           for t, dt in ((roi, "float32"), (None, "float32"), (out, "int64")))]
            return super()._impl_v18(bb, inputs, attr, params)

        _impl_v11 = _impl_v18     # opset 11 added roi and sizes: the inputs are those of opset 18

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            return upsample(bb, inputs[0], build_time_value("Resize", attr, inputs[1], "scales"), attr, "Resize")

    def upsample(bb, x, scales, attr: dict, op: str):
        """Upsample (opset 7-9) and Resize-10, which renamed it, as onnxruntime computes them (ONNX does not say how
        they map coordinates): the asymmetric mapping, nearest rounding down, in any axis; nearest downsampling,
        which onnxruntime rounds up instead, is refused."""
        scales = np.asarray(scales, np.float64).reshape(-1)
        if text(attr.get("mode", b"nearest")) == "nearest" and np.any(scales < 1):
            refuse(op, attr, f"downsamples (scales {scales.tolist()}) in mode='nearest' at opset 10 or older")
        out = np.floor(scales * shape(x)).astype(int).tolist()
        attr = {**attr, "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
        return resize(bb, x, out, scales.tolist(), None, attr, op)

    class Upsample(tvm_onnx.Upsample):
        """Scales from the input (opset 9: TVM's converter reads only the attribute) or the attribute (opset 7)."""

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            scales = attr.get("scales")
            if scales is None:
                scales = build_time_value("Upsample", attr, inputs[1], "scales")
            return upsample(bb, inputs[0], scales, attr, "Upsample")

        _impl_v7 = _impl_v9

    class Col2Im(tvm_onnx.OnnxOpConverter):
        """Col2Im as a sum over the kernel's positions: each position's column of blocks, spread by the strides,
        is added into the padded image at its dilated offset; the pads are cropped at the end."""

        @classmethod
        def _impl_v18(cls, bb, inputs, attr, params):
            x = inputs[0]
            image = [int(v) for v in build_time_value("Col2Im", attr, inputs[1], "image_shape")]
            block = [int(v) for v in build_time_value("Col2Im", attr, inputs[2], "block_shape")]
            n = len(image)
            dil, strides = attr.get("dilations", [1] * n), attr.get("strides", [1] * n)
            pads = attr.get("pads", [0] * 2 * n)
            batch, rows, length = shape(x)
            kernel = int(np.prod(block))
            padded = [image[d] + pads[d] + pads[n + d] for d in range(n)]
            blocks = [(padded[d] - dil[d] * (block[d] - 1) - 1) // strides[d] + 1 for d in range(n)]
            if rows % kernel or length != int(np.prod(blocks)):
                refuse("Col2Im", attr, f"has an input of shape {[batch, rows, length]} that does not fit "
                                       f"image_shape {image} and block_shape {block}")
            cols = bb.emit(relax.op.reshape(x, (batch, rows // kernel, kernel, *blocks)))
            total = None
            for k, pos in enumerate(np.ndindex(*block)):
                term = relax.op.squeeze(relax.op.strided_slice(cols, [2], [k], [k + 1]), [2])
                # (N, C, b0, 1, b1, 1, ...) padded to (N, C, b0, s0, b1, s1, ...): block i at i * stride
                spread = relax.op.reshape(term, (batch, rows // kernel, *[v for b in blocks for v in (b, 1)]))
                spread = relax.op.nn.pad(spread, [0, 0, 0, 0, *[p for s in strides for p in (0, 0, 0, s - 1)]])
                spread = relax.op.reshape(spread, (batch, rows // kernel, *[b * s for b, s in zip(blocks, strides)]))
                offsets = [pos[d] * dil[d] for d in range(n)]
                after = [max(0, padded[d] - offsets[d] - blocks[d] * strides[d]) for d in range(n)]
                placed = relax.op.nn.pad(spread, [0, 0, 0, 0, *[p for d in range(n) for p in (offsets[d], after[d])]])
                placed = relax.op.strided_slice(placed, list(range(2, n + 2)), [0] * n, padded)
                total = bb.emit(placed if total is None else relax.op.add(total, placed))
            return relax.op.strided_slice(total, list(range(2, n + 2)), pads[:n],
                                          [pads[d] + image[d] for d in range(n)])

    class Sinh(tvm_onnx.Sinh):
        """(e^x - e^-x) / 2, in float64 against the cancellation near 0 (TVM's sinh intrinsic does not compile for
        the host)."""

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            x = inputs[0]
            wide = bb.emit(relax.op.astype(x, "float64")) if dtype(x) != "float64" else x
            y = relax.op.multiply(relax.op.subtract(relax.op.exp(wide), relax.op.exp(relax.op.negative(wide))),
                                  relax.const(0.5, "float64"))
            return relax.op.astype(bb.emit(y), dtype(x)) if dtype(x) != "float64" else y

    class Cosh(tvm_onnx.Cosh):
        """(e^x + e^-x) / 2 (TVM's cosh intrinsic does not compile for the host)."""

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            x = inputs[0]
            return relax.op.multiply(relax.op.add(relax.op.exp(x), relax.op.exp(relax.op.negative(x))),
                                     relax.const(0.5, dtype(x)))

    class Unsqueeze(tvm_onnx.Unsqueeze):
        """A scalar axes input, as onnx's reference and onnxruntime take it (AffineGrid's expanded body has one;
        TVM's converter iterates it)."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            import tvm

            axes = inputs[1]
            if isinstance(axes, tvm.ir.GenericConst) and axes.value.numpy().ndim == 0:
                inputs = [inputs[0], relax.const(axes.value.numpy().reshape(1), dtype(axes))]
            return super()._impl_v13(bb, inputs, attr, params)

    class Split(tvm_onnx.Split):
        """Parts of size 0 as empty slices (TVM's split takes strictly increasing indices; FoldConstant fails on
        repeated ones)."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            import tvm

            sizes = inputs[1] if len(inputs) > 1 else None
            if not isinstance(sizes, tvm.ir.GenericConst) or sizes.value.numpy().all():
                return super()._impl_v13(bb, inputs, attr, params)
            x, axis = inputs[0], attr.get("axis", 0) % len(shape(inputs[0]))
            ends = np.cumsum(sizes.value.numpy()).tolist()
            return relax.Tuple([bb.emit(relax.op.strided_slice(x, [axis], [end - size], [end]))
                                for end, size in zip(ends, sizes.value.numpy().tolist())])

    class TensorScatter(tvm_onnx.OnnxOpConverter):
        """The cache with the update written along `axis` from each batch's write index (modulo the cache length
        in circular mode): each cache position reads the update position that lands on it, or keeps its value."""

        @classmethod
        def _impl_v24(cls, bb, inputs, attr, params):
            cache, update = inputs[:2]
            dims, rank = shape(cache), len(shape(cache))
            axis = attr.get("axis", -2) % rank
            if axis == 0:
                refuse("TensorScatter", attr, "scatters along axis 0 (the batch axis)")
            length, written = dims[axis], shape(update)[axis]
            offset = relax.const(np.arange(length)[None, :], "int64")           # (1, max_sequence_length)
            if len(inputs) > 2 and inputs[2] is not None:
                starts = bb.emit(relax.op.reshape(relax.op.astype(inputs[2], "int64"), (dims[0], 1)))
                offset = bb.emit(relax.op.subtract(offset, starts))               # (batch, max_sequence_length)
            mode = text(attr.get("mode", b"linear"))
            if mode not in ("linear", "circular"):
                refuse("TensorScatter", attr, f"has mode={mode!r}", "set mode to linear or circular")
            if mode == "circular":
                offset = bb.emit(relax.op.floor_mod(offset, relax.const(length, "int64")))
            keep = bb.emit(relax.op.logical_or(relax.op.less(offset, relax.const(0, "int64")),
                                               relax.op.greater_equal(offset, relax.const(written, "int64"))))
            index = bb.emit(relax.op.clip(offset, 0, written - 1))
            # (batch, 1.., max_sequence_length, 1..) broadcast to the cache's shape
            placed = [int(index.ty.shape[0])] + [1] * (axis - 1) + [length] + [1] * (rank - axis - 1)
            index, keep = (bb.emit(relax.op.broadcast_to(relax.op.reshape(t, placed), dims)) for t in (index, keep))
            gathered = bb.emit(relax.op.gather_elements(update, index, axis))
            return relax.op.where(keep, cache, gathered)

    class Det(tvm_onnx.OnnxOpConverter):
        """The determinant by Gaussian elimination with partial pivoting (as LAPACK's LU that numpy uses), unrolled
        over the matrix size, in float64: the product of the pivots, negated per row swap."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            x = inputs[0]
            dims = shape(x)
            size = dims[-1]
            if len(dims) < 2 or dims[-2] != size or size > 16:
                refuse("Det", attr, f"takes a {dims} input (edgec computes square matrices up to 16x16)")
            out_dt = dtype(x)
            a = bb.emit(relax.op.astype(x, "float64")) if out_dt != "float64" else x
            batch = dims[:-2]
            rows = relax.const(np.arange(size), "int64")
            det = relax.const(np.ones(batch), "float64")
            for k in range(size):
                column = bb.emit(relax.op.abs(relax.op.strided_slice(a, [len(dims) - 2, len(dims) - 1], [k, k],
                                                                    [size, k + 1])))
                pivot_row = bb.emit(relax.op.add(relax.op.argmax(column, axis=-2), relax.const(k, "int64")))  # (*, 1)
                # swap rows k and pivot_row: row r reads row pivot_row if r == k, row k if r == pivot_row
                order = bb.emit(relax.op.where(relax.op.equal(rows, relax.const(k, "int64")), pivot_row,
                                               relax.op.where(relax.op.equal(rows, pivot_row),
                                                              relax.const(k, "int64"), rows)))     # (*, size)
                order = bb.emit(relax.op.broadcast_to(relax.op.expand_dims(order, -1), dims))
                a = bb.emit(relax.op.gather_elements(a, order, axis=len(dims) - 2))
                swapped = relax.op.not_equal(relax.op.squeeze(pivot_row, [-1]), relax.const(k, "int64"))
                pivot = bb.emit(relax.op.squeeze(relax.op.strided_slice(
                    a, [len(dims) - 2, len(dims) - 1], [k, k], [k + 1, k + 1]), [-2, -1]))
                sign = relax.op.where(swapped, relax.const(-1.0, "float64"), relax.const(1.0, "float64"))
                det = bb.emit(relax.op.multiply(det, relax.op.multiply(pivot, sign)))
                if k == size - 1:
                    break
                # rows below k lose their multiple of row k (a zero pivot, a singular matrix, divides by 1)
                safe = relax.op.where(relax.op.equal(pivot, relax.const(0.0, "float64")),
                                      relax.const(1.0, "float64"), pivot)
                below = relax.const((np.arange(size) > k).astype(np.float64)[:, None], "float64")   # (size, 1)
                col_k = relax.op.strided_slice(a, [len(dims) - 1], [k], [k + 1])                    # (*, size, 1)
                factor = relax.op.multiply(relax.op.divide(col_k, relax.op.expand_dims(safe, [-1, -2])), below)
                row_k = relax.op.strided_slice(a, [len(dims) - 2], [k], [k + 1])                    # (*, 1, size)
                a = bb.emit(relax.op.subtract(a, relax.op.multiply(bb.emit(factor), row_k)))
            return relax.op.astype(det, out_dt) if out_dt != "float64" else det

    class MaxPool(tvm_onnx.MaxPool):
        """The Indices output (TVM's converter gives only Y): each window's first maximum in row-major order of
        the kernel, as onnx's reference scans it, as a flat index into the input (per storage_order); explicit
        pads only."""

        @classmethod
        def _impl_v8(cls, bb, inputs, attr, params):
            if attr["tvm_custom"]["num_outputs"] < 2:
                return super()._impl_v1(bb, inputs, attr, params)
            x = inputs[0]
            dims = shape(x)
            n = len(dims) - 2
            if text(attr.get("auto_pad", b"NOTSET")) != "NOTSET" or attr.get("ceil_mode", 0):
                refuse("MaxPool", attr, "outputs Indices with auto_pad or ceil_mode")
            kernel = list(attr["kernel_shape"])
            strides, dil = attr.get("strides", [1] * n), attr.get("dilations", [1] * n)
            pads = attr.get("pads", [0] * 2 * n)
            out = [(dims[2 + d] + pads[d] + pads[n + d] - dil[d] * (kernel[d] - 1) - 1) // strides[d] + 1
                   for d in range(n)]
            dt = dtype(x)
            lowest = -np.inf if dt.startswith(("float", "bfloat")) else np.iinfo(np.dtype(dt)).min
            padded = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, *[p for d in range(n) for p in (pads[d], pads[n + d])]],
                                             pad_value=float(lowest)))
            windows = [relax.op.strided_slice(padded, list(range(2, n + 2)), [pos[d] * dil[d] for d in range(n)],
                                              [pos[d] * dil[d] + (out[d] - 1) * strides[d] + 1 for d in range(n)],
                                              strides)
                       for pos in np.ndindex(*kernel)]
            stacked = bb.emit(relax.op.stack(windows, axis=0))                  # (kernel positions, N, C, out...)
            y = bb.emit(relax.op.max(stacked, axis=0))
            which = bb.emit(relax.op.argmax(stacked, axis=0))                  # the first maximum
            # input coordinate along each spatial axis: out index * stride - pad + kernel index * dilation
            flat, step = None, 1
            axes = list(range(n)) if attr.get("storage_order", 0) else list(range(n))[::-1]
            for d in axes:      # row-major: the last axis steps by 1; column-major (storage_order 1): the first
                k_index = relax.op.floor_mod(relax.op.floor_divide(which, relax.const(int(np.prod(kernel[d + 1:])),
                                                                                      "int64")),
                                             relax.const(kernel[d], "int64"))
                start = np.arange(out[d]) * strides[d] - pads[d]
                start = start.reshape([-1 if a == d else 1 for a in range(n)])
                coord = relax.op.add(relax.const(start, "int64"),
                                     relax.op.multiply(k_index, relax.const(dil[d], "int64")))
                term = relax.op.multiply(coord, relax.const(step, "int64"))
                flat = bb.emit(term if flat is None else relax.op.add(flat, term))
                step *= dims[2 + d]
            channel = np.arange(dims[0] * dims[1]).reshape(dims[0], dims[1], *[1] * n) * int(np.prod(dims[2:]))
            return relax.Tuple([y, bb.emit(relax.op.add(flat, relax.const(channel, "int64")))])

    def summed_in_float32(impl, bb, inputs, attr, params):
        """A float16 MatMul or Conv as onnxruntime and onnx's reference (numpy) compute it: products summed in
        float32, the result rounded once (TVM's float16 kernels round every partial sum)."""
        if any(t is not None and dtype(t) != "float16" for t in inputs):
            return impl(bb, inputs, attr, params)
        wide = tvm_onnx.onnx_input(None if t is None else bb.emit(relax.op.astype(t, "float32")) for t in inputs)
        return relax.op.astype(bb.emit(impl(bb, wide, attr, params)), "float16")

    class MatMul(tvm_onnx.MatMul):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            return summed_in_float32(super()._impl_v13, bb, inputs, attr, params)

    class Conv(tvm_onnx.Conv):
        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            return summed_in_float32(super()._impl_v11, bb, inputs, attr, params)

    class Softmax(tvm_onnx.Softmax):
        """float16 as Softmax's function body computes it (onnx's reference too): max, shift, exp, sum and divide,
        each result rounded to float16 (TVM's float16 softmax differs by a few float16 steps)."""

        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            x = inputs[0]
            if dtype(x) != "float16":
                return super()._impl_v13(bb, inputs, attr, params)
            axis = attr.get("axis", -1)

            def rounded(expr):      # a float16 step, carried in float32
                return bb.emit(relax.op.astype(relax.op.astype(expr, "float16"), "float32"))

            wide = bb.emit(relax.op.astype(x, "float32"))
            shifted = rounded(relax.op.subtract(wide, relax.op.max(wide, axis, keepdims=True)))
            e = rounded(relax.op.exp(shifted))
            total = rounded(relax.op.sum(e, axis, keepdims=True))
            return relax.op.astype(relax.op.divide(e, total), "float16")

    class NonZero(tvm_onnx.NonZero):
        """TVM's calls relax.run.nonzero, a function of its compiler library that a bundle's runtime lacks."""

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            return nonzero_indices(bb, inputs[0])

    class Compress(tvm_onnx.Compress):
        """The positions selected by the condition through NonZero's kernel (TVM's takes relax.run.nonzero)."""

        @classmethod
        def _impl_v11(cls, bb, inputs, attr, params):
            tensor, condition = inputs
            if dtype(condition) != "bool" or len(shape(condition)) != 1:
                refuse("Compress", attr, f"has a {dtype(condition)} condition of rank {len(shape(condition))}",
                       "give Compress a 1-D bool condition (the spec's form)")
            positions = bb.emit(relax.op.reshape(bb.emit(nonzero_indices(bb, condition)), [-1]))
            axis = attr.get("axis")
            return relax.op.take(tensor if axis is not None else relax.op.reshape(tensor, (-1,)), positions,
                                 axis=axis if axis is not None else 0)

    class EyeLike(tvm_onnx.EyeLike):
        """The `dtype` attribute sets the output's type (TVM's converter refuses one other than the input's, and
        eye_like's legalization ignores it: eye of the static shape)."""

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            import onnx

            to = attr.get("dtype")
            out = dtype(inputs[0]) if to is None else str(onnx.helper.tensor_dtype_to_np_dtype(to))
            rows, cols = shape(inputs[0])
            return relax.op.eye(rows, cols, attr.get("k", 0), out)

    return {c.__name__: c for c in (Constant, NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss, CumProd,
                                    LpNormalization, Swish, CenterCropPad, RotaryEmbedding, RMSNormalization, Pow,
                                    BitCast, Resize, Col2Im, Sinh, Cosh, EyeLike, NonZero, Compress, Unsqueeze, Split, Upsample, TensorScatter, Det, MaxPool, MatMul, Conv, Softmax)}
