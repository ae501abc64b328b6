"""Operator fusion: group elementwise and injective ops into their producers, then merge the kernels."""
from tvm import relax

from .registry import register_pass


@register_pass("fuse-ops", phase="fuse", order=10)
def fuse_ops(options):
    """Group ops into fusable functions by their TIR pattern (conv + bias + relu6 become one group)."""
    return relax.transform.FuseOps()


@register_pass("fuse-tir", phase="fuse", order=20)
def fuse_tir(options):
    """Merge each fused group's kernels into a single TIR kernel."""
    return relax.transform.FuseTIR()
