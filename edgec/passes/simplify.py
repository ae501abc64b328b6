"""Simplification over the Relax graph: inference rewrites, binding cleanup, CSE, DCE, fast math."""
import tvm
from tvm import relax, topi

from .ir import mutate_functions
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


# op -> its fast approximation (TVM's FastMathTransform's table, whose mutator fails on calls of functions: the
# offload partitions made before it in a quantized build)
_FAST_MATH = {
    "relax.nn.softmax": lambda bb, call: bb.call_te(topi.nn.fast_softmax, call.args[0], call.attrs.axis),
    "relax.exp": lambda bb, call: bb.call_te(topi.fast_exp, call.args[0]),
    "relax.erf": lambda bb, call: bb.call_te(topi.fast_erf, call.args[0]),
    "relax.tanh": lambda bb, call: bb.call_te(topi.fast_tanh, call.args[0]),
}


@relax.expr_functor.mutator
class _FastMath(relax.PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        if isinstance(call.op, tvm.ir.Op) and call.op.name in _FAST_MATH:
            return _FAST_MATH[call.op.name](self.builder_, call)
        return super().visit_call_(call)


@tvm.transform.module_pass(opt_level=0, name="FastMath")
def _fast_math(mod, pctx):
    return mutate_functions(mod, _FastMath(mod), skip_partitions=True)


@register_pass("fast-math", phase="graph", after=("dead-code-elimination",), opt_level=3)
def fast_math(ctx):
    """Replace exp, erf, tanh and softmax with fast approximations (about 1e-6 relative error)."""
    return _fast_math
