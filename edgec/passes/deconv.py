"""deconv-as-matmul: a transposed convolution whose stride equals its kernel, computed as a matrix product.

Such a conv2d_transpose (U-Net and DB-head upsampling: 2x2, stride 2) writes each input pixel's C values times the
weights into its own kh x kw block of the output, blocks never overlapping: y[n, o, h*kh + i, w*kw + j] =
sum_c x[n, c, h, w] * w[c, o, i, j]. TVM legalizes it as a convolution over the input dilated with zeros, where 3 of
every 4 products (2x2) are of a zero, scheduled as a generic conv; as a matmul of the pixels (NHWC rows) by the
weights as a C x (O kh kw) matrix, then the blocks put in place (a reshape and a transpose, which fuse into the
kernel after it), it sums the same products without the zeros. Measured (AVX2 Zen 3, 2 threads, profiled), a
24 -> 24 channel 2x2 stride-2 deconvolution at 80x80: 5.9 ms as TVM's conv2d_transpose, 2.0 ms as the matmul.
Runs after the offload steps: a backend that takes the conv2d_transpose (oneDNN's deconvolution) keeps it.
"""
from __future__ import annotations

import tvm
from tvm import relax

from ..context import BuildContext
from ..offload.fusion import static_shape
from .ir import mutate_functions
from .registry import register_pass


def _as_matmul(call: relax.Call) -> bool:
    """A conv2d_transpose of static float32 shapes, NCHW/IOHW, one group, stride = kernel, no padding or dilation."""
    a = call.attrs
    shapes = [static_shape(e) for e in (call, *call.args)]
    return (None not in shapes and str(call.ty.dtype) == "float32" and int(a.groups) == 1
            and (str(a.data_layout), str(a.kernel_layout), str(a.out_layout or a.data_layout))
            == ("NCHW", "IOHW", "NCHW")
            and [int(s) for s in a.strides] == list(shapes[2][2:]) and not any(int(p) for p in a.padding)
            and not any(int(p) for p in a.output_padding) and all(int(d) == 1 for d in a.dilation))


@relax.expr_functor.mutator
class _DeconvAsMatmul(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if not (isinstance(call.op, tvm.ir.Op) and call.op.name == "relax.nn.conv2d_transpose" and _as_matmul(call)):
            return call
        x, w = call.args
        n, c, h, wd = static_shape(x)
        _, o, kh, kw = static_shape(w)
        rows = relax.op.permute_dims(x, [0, 2, 3, 1])                                  # N H W C
        blocks = relax.op.matmul(rows, relax.op.reshape(w, [c, o * kh * kw]))           # N H W (O kh kw)
        placed = relax.op.permute_dims(relax.op.reshape(blocks, [n, h, wd, o, kh, kw]), [0, 3, 1, 4, 2, 5])
        return relax.op.reshape(placed, [n, o, h * kh, wd * kw])


@tvm.transform.module_pass(opt_level=0, name="DeconvAsMatmul")
def _deconv_as_matmul(mod, pctx):
    return mutate_functions(mod, _DeconvAsMatmul(mod), skip_partitions=True)


@register_pass("deconv-as-matmul", phase="graph", after=("offload-partition", "offload-auto", "int8-kernels"),
               applies=BuildContext.on_cpu, skip_reason="CPU (llvm) targets only (measured there)")
def deconv_as_matmul(ctx: BuildContext):
    """Compute a conv2d_transpose whose stride equals its kernel (2x2 stride 2) as a matmul and a transpose."""
    return _deconv_as_matmul
