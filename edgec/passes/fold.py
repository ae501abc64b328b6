"""Folding: batch-norm into the preceding convolution, then every all-constant subexpression."""
from tvm import relax

from .registry import register_pass


@register_pass("fold-batchnorm", phase="graph", order=10)
def fold_batchnorm(options):
    """Fold inference batch-norm into the weights and bias of the conv2d before it."""
    return relax.transform.FoldBatchnormToConv2D()


@register_pass("fold-constants", phase="graph", order=40)
def fold_constants(options):
    """Evaluate subexpressions whose inputs are all constants (folded BN, weight transposes)."""
    return relax.transform.FoldConstant()
