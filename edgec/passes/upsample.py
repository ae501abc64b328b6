"""upsample-apart: an upsampling resize's producers are computed at their own size, not inside its kernel.

FuseOps fuses injective producers into an injective consumer, and resize2d is injective: the producers' arithmetic
then runs once per output element, 4x per element for a 2x upsampling, 64x for 8x. PP-OCRv4 det's neck upsamples
four branches to one concat: in its QDQ model each branch is a chain of dequantize -> op -> quantize steps, and
fused into the resize and the concat (whose vector loop over channels computes every branch) that one kernel took
8.5 of 20 ms (one thread). Marked out-elementwise-fusable, as a convolution is, the resize keeps its elementwise
consumers but no producers.
"""
from __future__ import annotations

import math

import tvm
from tvm import relax, tirx

from ..context import BuildContext
from ..offload.fusion import static_shape
from .registry import register_pass

_OUT_ELEMWISE_FUSABLE = 4   # TVM's OpPatternKind kOutEWiseFusable
# LegalizeOps names each kernel after its TOPI compute; call_tir's callee is all the lowered graph says of the op
_RESIZE = ("resize1d", "resize2d", "resize3d")


def _upsampling_kernels(mod: tvm.IRModule) -> set[tvm.ir.GlobalVar]:
    """The resize kernels some call site gives more output elements than input elements."""
    found = set()

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op == tvm.ir.Op.get("relax.call_tir") \
                and expr.args[0].name_hint.startswith(_RESIZE):
            data, out = static_shape(expr.args[1].fields[0]), static_shape(expr)
            if data is not None and out is not None and math.prod(out) > math.prod(data):
                found.add(expr.args[0])

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return found


@tvm.transform.module_pass(opt_level=0, name="UpsampleApart")
def _upsample_apart(mod, _ctx):
    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    for gvar in _upsampling_kernels(mod):
        func = mod[gvar]
        if isinstance(func, tirx.PrimFunc):
            mod[gvar] = func.with_attr("op_pattern", _OUT_ELEMWISE_FUSABLE)
    return mod


@register_pass("upsample-apart", phase="legalize", after=("annotate-op-pattern",))
def upsample_apart(ctx: BuildContext) -> tvm.transform.Pass:
    """Keep an upsampling resize's producers out of its kernel (fused, they run once per output element)"""
    return _upsample_apart
