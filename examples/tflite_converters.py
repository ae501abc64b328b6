"""A converter file for `edgec build MODEL.tflite --converter examples/tflite_converters.py`.

It maps MediaPipe's custom operator Convolution2DTransposeBias (the upsampling layer of its selfie and hair
segmentation models) to Relax: a transposed convolution plus a bias, as MediaPipe's kernel
(mediapipe/util/tflite/operations/transpose_conv_bias.cc) computes it.
"""
import struct

from tvm import relax

from edgec.frontends.custom_ops import tflite_custom_op

# TfLitePadding, as MediaPipe stores it in the options
_SAME, _VALID = 1, 2


@tflite_custom_op("Convolution2DTransposeBias")
def convolution_2d_transpose_bias(op):
    x, weights, bias = op.inputs                  # NHWC input, OHWI weights, bias[O]
    # The custom options are MediaPipe's TfLiteTransposeConvParams C struct: padding, stride_w, stride_h.
    padding, stride_w, stride_h = struct.unpack("<3i", op.options[:12])
    if padding not in (_SAME, _VALID):
        raise ValueError(f"padding {padding} is neither SAME nor VALID")
    (_, in_h, in_w, _), (_, kernel_h, kernel_w, _) = op.input_shapes[0], op.input_shapes[1]
    (_, out_h, out_w, _), = op.output_shapes
    pads, extra = [], []
    for size, kernel, stride, out in ((in_h, kernel_h, stride_h, out_h), (in_w, kernel_w, stride_w, out_w)):
        # SAME pads as the forward convolution from `out` to `size` would, the odd pixel at the end
        total = max((size - 1) * stride + kernel - out, 0) if padding == _SAME else 0
        pads.append((total // 2, total - total // 2))
        extra.append(out - ((size - 1) * stride + kernel - total))
    (top, bottom), (left, right) = pads
    # TVM lowers conv2d_transpose in NCHW only: transpose around it (the layout passes fold what they can)
    y = relax.op.nn.conv2d_transpose(
        relax.op.permute_dims(x, (0, 3, 1, 2)), relax.op.permute_dims(weights, (3, 0, 1, 2)),   # OHWI -> IOHW
        strides=(stride_h, stride_w), padding=(top, left, bottom, right), output_padding=tuple(extra),
        data_layout="NCHW", kernel_layout="IOHW")
    return relax.op.add(relax.op.permute_dims(y, (0, 2, 3, 1)), bias)
