"""Lift weights out of the graph so the library holds code only and params ship in their own file."""
import numpy as np
import tvm
from tvm import relax

from .registry import register_pass

# Constants smaller than this stay in the code: clip bounds, epsilons, small shape tables.
MIN_LIFTED_ELEMENTS = 16


@relax.expr_functor.mutator
class _ConstantLifter(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.lifted: list[tuple[relax.Var, tvm.runtime.Tensor]] = []

    def visit_generic_const_(self, const):
        value = const.value
        if int(np.prod(value.shape)) < MIN_LIFTED_ELEMENTS:
            return const
        for var, seen in self.lifted:   # a weight used twice becomes one parameter
            if seen.same_as(value):
                return var
        var = relax.Var(f"p{len(self.lifted)}", const.ty)
        self.lifted.append((var, value))
        return var


@tvm.transform.module_pass(opt_level=0, name="LiftParams")
def _lift_params(mod, ctx):
    func = mod["main"]
    lifter = _ConstantLifter(mod)
    body = lifter.visit_expr(func.body)
    if not lifter.lifted:
        return mod
    num_input = int(func.attrs["num_input"]) if "num_input" in func.attrs else len(func.params)
    existing = list(func.attrs["params"]) if "params" in func.attrs else []
    new_func = relax.Function(list(func.params) + [v for v, _ in lifter.lifted], body, func.ret_ty,
                              func.is_pure, func.attrs, func.span)
    # detach_params() reads the "params" attribute back when the pipeline is done.
    new_func = new_func.with_attrs({"num_input": num_input, "params": existing + [t for _, t in lifter.lifted]})
    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    mod["main"] = new_func
    return mod


@register_pass("lift-params", phase="params", required=True)
def lift_params(ctx):
    """Turn weight constants into parameters of main; they are saved to params.bin, apart from the code."""
    return _lift_params
