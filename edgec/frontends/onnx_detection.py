"""Converters for the detection operators TVM's importer cannot convert, each per the ONNX spec (onnx's reference
implementation where the spec leaves a detail open): NonMaxSuppression (TVM's own fails in code generation) and
DeformConv. The forms they do not cover are refused in one line. Checked with bench/onnx_suite.py;
tests/test_onnx_detection.py holds a small model per converter.
"""
from __future__ import annotations

import numpy as np

from .onnx_ops import build_time_value, leading_part, refuse, shape

# Operators converted here that TVM's importer has no converter for (NonMaxSuppression it has, but replaced).
NEW_OPS = ("DeformConv",)


def _nms_kernel(batches: int, classes: int, boxes: int, keep: int, center_point_box: bool, iou_threshold: float,
                score_threshold: float | None, dtype: str):
    """The greedy selection of onnx's reference, one (batch, class) after the other: take the best-scoring box left
    (the lowest index among equal scores), keep it unless its IoU with a box kept for the class exceeds the
    threshold, until `keep` boxes are kept or none is left. Writes the (batch, class, box) rows into `selected`
    (capacity batches * classes * keep) and their number into `count`."""
    from tvm.script import tirx as T

    capacity = batches * classes * keep
    # A box starts out of the candidates when its score is not above score_threshold (the spec's "strictly above";
    # a NaN score is not above it either, so the test is the negated `>`, not `<=`).
    below = score_threshold is not None
    threshold = score_threshold if below else 0.0

    @T.prim_func(private=True)
    def non_max_suppression(box: T.Buffer((batches, boxes, 4), dtype),
                            score: T.Buffer((batches, classes, boxes), dtype),
                            selected: T.Buffer((capacity, 3), "int64"), count: T.Buffer((1,), "int64")):
        T.func_attr({"tir.noalias": True})
        # ymin, xmin, ymax, xmax of each box of the batch
        corners = T.alloc_buffer((boxes, 4), dtype)
        out_of_play = T.alloc_buffer((boxes,), "int32")
        kept = T.alloc_buffer((keep,), "int32")
        n_kept = T.alloc_buffer((1,), "int32")
        best = T.alloc_buffer((1,), "int32")
        exhausted = T.alloc_buffer((1,), "int32")
        suppressed = T.alloc_buffer((1,), "int32")
        count[0] = T.int64(0)
        for b in range(batches):
            for i in range(boxes):
                if center_point_box:   # [x_center, y_center, width, height], as the reference computes it
                    corners[i, 0] = box[b, i, 1] - box[b, i, 3] / T.Cast(dtype, 2)
                    corners[i, 1] = box[b, i, 0] - box[b, i, 2] / T.Cast(dtype, 2)
                    corners[i, 2] = box[b, i, 1] + box[b, i, 3] / T.Cast(dtype, 2)
                    corners[i, 3] = box[b, i, 0] + box[b, i, 2] / T.Cast(dtype, 2)
                else:                  # any two opposite corners [y1, x1, y2, x2]
                    corners[i, 0] = T.min(box[b, i, 0], box[b, i, 2])
                    corners[i, 1] = T.min(box[b, i, 1], box[b, i, 3])
                    corners[i, 2] = T.max(box[b, i, 0], box[b, i, 2])
                    corners[i, 3] = T.max(box[b, i, 1], box[b, i, 3])
            for c in range(classes):
                for i in range(boxes):
                    if below:
                        out_of_play[i] = T.if_then_else(score[b, c, i] > T.Cast(dtype, threshold), 0, 1)
                    else:
                        out_of_play[i] = 0
                n_kept[0] = 0
                exhausted[0] = 0
                for _step in range(boxes):
                    best[0] = -1
                    if exhausted[0] == 0 and n_kept[0] < keep:   # no scan once the class is done
                        for i in range(boxes):
                            if out_of_play[i] == 0:
                                if best[0] < 0:
                                    best[0] = i
                                elif score[b, c, i] > score[b, c, best[0]]:
                                    best[0] = i
                        if best[0] < 0:
                            exhausted[0] = 1
                    if best[0] >= 0:
                        out_of_play[best[0]] = 1
                        suppressed[0] = 0
                        for j in range(keep):
                            if j < n_kept[0] and suppressed[0] == 0:
                                y0 = T.max(corners[best[0], 0], corners[kept[j], 0])
                                x0 = T.max(corners[best[0], 1], corners[kept[j], 1])
                                y1 = T.min(corners[best[0], 2], corners[kept[j], 2])
                                x1 = T.min(corners[best[0], 3], corners[kept[j], 3])
                                inter = (y1 - y0) * (x1 - x0)
                                area_a = (corners[best[0], 2] - corners[best[0], 0]) * (
                                    corners[best[0], 3] - corners[best[0], 1])
                                area_b = (corners[kept[j], 2] - corners[kept[j], 0]) * (
                                    corners[kept[j], 3] - corners[kept[j], 1])
                                union = area_a + area_b - inter
                                if y1 > y0 and x1 > x0 and inter > T.Cast(dtype, 0) and area_a > T.Cast(dtype, 0) \
                                        and area_b > T.Cast(dtype, 0) and union > T.Cast(dtype, 0):
                                    if inter / union > T.Cast(dtype, iou_threshold):
                                        suppressed[0] = 1
                        if suppressed[0] == 0:
                            kept[n_kept[0]] = best[0]
                            n_kept[0] = n_kept[0] + 1
                            selected[count[0], 0] = T.Cast("int64", b)
                            selected[count[0], 1] = T.Cast("int64", c)
                            selected[count[0], 2] = T.Cast("int64", best[0])
                            count[0] = count[0] + T.int64(1)

    return non_max_suppression


def detection_converters() -> dict:
    """op_type -> converter class, for onnx_semantics.from_onnx."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    class NonMaxSuppression(tvm_onnx.OnnxOpConverter):
        """selected_indices [num_selected, 3], num_selected known at run time only: the kernel writes the rows into
        a buffer of the most there can be and their count, and the result is that buffer's first `count` rows."""

        @classmethod
        def _impl_v10(cls, bb, inputs, attr, params):
            fix = "fix max_output_boxes_per_class, iou_threshold and score_threshold with --const-input NAME=FILE.npy"

            def scalar(i: int, what: str, default):
                value = build_time_value("NonMaxSuppression", attr, inputs[i], what, fix)
                if value is None or value.size == 0:
                    return default
                if value.size != 1:
                    refuse("NonMaxSuppression", attr, f"has a {what} of {value.size} values", fix)
                return value.reshape(-1)[0].item()

            boxes, scores = inputs[0], inputs[1]
            dtype = str(boxes.ty.dtype)
            if dtype not in ("float32", "float64") or str(scores.ty.dtype) != dtype:
                refuse("NonMaxSuppression", attr, f"takes {dtype} boxes and {scores.ty.dtype} scores",
                       "export the model with float32 boxes and scores")
            center_point_box = attr.get("center_point_box", 0)
            if center_point_box not in (0, 1):
                refuse("NonMaxSuppression", attr, f"has center_point_box={center_point_box}",
                       "center_point_box is 0 or 1 (the spec allows no other)")
            if len(shape(boxes)) != 3 or len(shape(scores)) != 3 or shape(boxes)[2] != 4 \
                    or [shape(scores)[0], shape(scores)[2]] != shape(boxes)[:2]:
                refuse("NonMaxSuppression", attr, f"takes boxes {shape(boxes)} and scores {shape(scores)}",
                       "give boxes [batches, boxes, 4] and scores [batches, classes, boxes]")
            batches, n_boxes, _ = shape(boxes)
            _, classes, _ = shape(scores)
            keep = min(max(int(scalar(2, "max_output_boxes_per_class", 0)), 0), n_boxes)
            iou_threshold = float(scalar(3, "iou_threshold", 0.0))
            score_threshold = scalar(4, "score_threshold", None)
            if keep == 0 or batches * classes == 0:
                return relax.const(np.zeros((0, 3), np.int64), "int64")
            kernel = _nms_kernel(batches, classes, n_boxes, keep, bool(center_point_box), iou_threshold,
                                 None if score_threshold is None else float(score_threshold), dtype)
            return leading_part(bb, kernel, "non_max_suppression", [boxes, scores],
                                (batches * classes * keep, 3), 0, "num_selected")

    class DeformConv(tvm_onnx.OnnxOpConverter):
        """2-D deformable convolution: each kernel tap samples the input bilinearly (zero outside) at its place
        moved by `offset` (per offset group, (dy, dx) pairs per tap), times `mask`; then a grouped convolution of
        those samples as one matmul per group."""

        @classmethod
        def _impl_v19(cls, bb, inputs, attr, params):
            x, w, offset = inputs[0], inputs[1], inputs[2]
            bias, mask = inputs[3], inputs[4]   # TVM's onnx_input: None where absent
            dt = str(x.ty.dtype)
            if len(shape(x)) != 4:
                refuse("DeformConv", attr, f"is {len(shape(x)) - 2}-D", "edgec converts 2-D DeformConv only")
            n, c, h, wd = shape(x)
            oc, c_per_group, kh, kw = shape(w)
            _, _, oh, ow = shape(offset)
            groups, offset_groups = attr.get("group", 1), attr.get("offset_group", 1)
            sh, sw = attr.get("strides", (1, 1))
            dh, dw = attr.get("dilations", (1, 1))
            top, left, bottom, right = attr.get("pads", (0, 0, 0, 0))
            taps, points = kh * kw, oh * ow
            expected = [(h + top + bottom - (kh - 1) * dh - 1) // sh + 1,
                        (wd + left + right - (kw - 1) * dw - 1) // sw + 1]
            if [oh, ow] != expected:
                refuse("DeformConv", attr, f"has offsets for a {oh}x{ow} output where its attributes give "
                       f"{expected[0]}x{expected[1]}", "export the model with offsets of the output's size")
            if list(attr.get("kernel_shape", (kh, kw))) != [kh, kw] or c % offset_groups or c != c_per_group * groups \
                    or oc % groups:
                refuse("DeformConv", attr, "has a kernel_shape, group or offset_group that does not fit its weights",
                       "export the model with consistent DeformConv attributes")

            def const(values):
                return relax.const(np.asarray(values, dt), dt)

            # where each tap of each output point samples, before the offsets: (taps, points)
            rows = (np.arange(kh) * dh)[:, None, None, None] + (np.arange(oh) * sh - top)[None, None, :, None]
            cols = (np.arange(kw) * dw)[None, :, None, None] + (np.arange(ow) * sw - left)[None, None, None, :]
            base_y = np.broadcast_to(rows, (kh, kw, oh, ow)).reshape(taps, points)
            base_x = np.broadcast_to(cols, (kh, kw, oh, ow)).reshape(taps, points)
            moves = bb.emit(relax.op.reshape(offset, (n, offset_groups, taps, 2, points)))
            y = bb.emit(relax.op.add(relax.op.squeeze(relax.op.strided_slice(moves, [3], [0], [1]), [3]),
                                     const(base_y)))
            x_at = bb.emit(relax.op.add(relax.op.squeeze(relax.op.strided_slice(moves, [3], [1], [2]), [3]),
                                        const(base_x)))
            y0, x0 = bb.emit(relax.op.floor(y)), bb.emit(relax.op.floor(x_at))
            fy, fx = bb.emit(relax.op.subtract(y, y0)), bb.emit(relax.op.subtract(x_at, x0))
            # the input, per offset group, as (n, offset_groups, channels of the group, h * w)
            flat = bb.emit(relax.op.reshape(x, (n, offset_groups, c // offset_groups, h * wd)))
            sampled = None
            for oy, ox in ((0, 0), (0, 1), (1, 0), (1, 1)):
                yi = bb.emit(relax.op.add(y0, const(oy)))
                xi = bb.emit(relax.op.add(x0, const(ox)))
                wy = fy if oy else bb.emit(relax.op.subtract(const(1), fy))
                wx = fx if ox else bb.emit(relax.op.subtract(const(1), fx))
                inside = relax.op.logical_and(
                    relax.op.logical_and(relax.op.greater_equal(yi, const(0)), relax.op.less(yi, const(h))),
                    relax.op.logical_and(relax.op.greater_equal(xi, const(0)), relax.op.less(xi, const(wd))))
                weight = bb.emit(relax.op.where(inside, relax.op.multiply(wy, wx), const(0)))
                index = relax.op.add(relax.op.multiply(relax.op.clip(yi, 0, h - 1), const(wd)),
                                     relax.op.clip(xi, 0, wd - 1))
                index = bb.emit(relax.op.reshape(relax.op.astype(index, "int64"), (n, offset_groups, 1, taps * points)))
                index = bb.emit(relax.op.broadcast_to(index, (n, offset_groups, c // offset_groups, taps * points)))
                picked = bb.emit(relax.op.gather_elements(flat, index, axis=3))
                term = bb.emit(relax.op.multiply(
                    relax.op.reshape(picked, (n, offset_groups, c // offset_groups, taps, points)),
                    relax.op.expand_dims(weight, 2)))
                sampled = term if sampled is None else bb.emit(relax.op.add(sampled, term))
            if mask is not None:
                sampled = bb.emit(relax.op.multiply(
                    sampled, relax.op.expand_dims(relax.op.reshape(mask, (n, offset_groups, taps, points)), 2)))
            columns = bb.emit(relax.op.reshape(sampled, (n, groups, c_per_group * taps, points)))
            kernels = bb.emit(relax.op.reshape(w, (1, groups, oc // groups, c_per_group * taps)))
            y_out = bb.emit(relax.op.reshape(relax.op.matmul(kernels, columns), (n, oc, oh, ow)))
            if bias is not None:
                y_out = bb.emit(relax.op.add(y_out, relax.op.reshape(bias, (1, oc, 1, 1))))
            return y_out

    return {c.__name__: c for c in (NonMaxSuppression, DeformConv)}
