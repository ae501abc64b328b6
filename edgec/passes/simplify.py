"""Simplification over the Relax graph: inference rewrites, binding cleanup, CSE, DCE, fast math."""
from tvm import relax

from .registry import register_pass


@register_pass("decompose-inference", phase="graph", after=("fold-batchnorm",), required=True)
def decompose_inference(ctx):
    """Rewrite training-style ops (remaining batch_norm, layer_norm stats) into inference arithmetic."""
    return relax.transform.DecomposeOpsForInference()


@register_pass("canonicalize", phase="graph", after=("decompose-inference",))
def canonicalize(ctx):
    """Remove trivial rebindings and match-casts so later patterns see the real producers."""
    return relax.transform.CanonicalizeBindings()


@register_pass("eliminate-common-subexpr", phase="graph", after=("fold-constants",), opt_level=2)
def eliminate_common_subexpr(ctx):
    """Compute identical pure subexpressions once."""
    return relax.transform.EliminateCommonSubexpr()


@register_pass("dead-code-elimination", phase="graph", after=("eliminate-common-subexpr",))
def dead_code_elimination(ctx):
    """Drop bindings and functions nothing uses."""
    return relax.transform.DeadCodeElimination(["main"])


@register_pass("fast-math", phase="graph", after=("dead-code-elimination",), opt_level=3)
def fast_math(ctx):
    """Replace exp, erf, tanh and softmax with fast approximations (about 1e-6 relative error)."""
    return relax.transform.FastMathTransform()
