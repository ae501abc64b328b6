"""Simplification over the Relax graph: inference rewrites, binding cleanup, CSE, DCE, fast math."""
from tvm import relax

from .registry import register_pass


@register_pass("decompose-inference", phase="graph", order=20, required=True)
def decompose_inference(options):
    """Rewrite training-style ops (remaining batch_norm, layer_norm stats) into inference arithmetic."""
    return relax.transform.DecomposeOpsForInference()


@register_pass("canonicalize", phase="graph", order=30)
def canonicalize(options):
    """Remove trivial rebindings and match-casts so later patterns see the real producers."""
    return relax.transform.CanonicalizeBindings()


@register_pass("eliminate-common-subexpr", phase="graph", order=50, opt_level=2)
def eliminate_common_subexpr(options):
    """Compute identical pure subexpressions once."""
    return relax.transform.EliminateCommonSubexpr()


@register_pass("dead-code-elimination", phase="graph", order=60)
def dead_code_elimination(options):
    """Drop bindings and functions nothing uses."""
    return relax.transform.DeadCodeElimination(["main"])


@register_pass("fast-math", phase="graph", order=70, opt_level=3)
def fast_math(options):
    """Replace exp, erf, tanh and softmax with fast approximations (about 1e-6 relative error)."""
    return relax.transform.FastMathTransform()
