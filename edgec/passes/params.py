"""Lift weights out of the graph so the library holds code only and params ship in their own file; what main computes
from the weights alone moves to the load function, which runs once per loaded model."""
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


def identity_load(mod: tvm.IRModule, name: str) -> tvm.IRModule:
    """main(inputs, weights) with no load function gets `name`(weights) -> weights, which takes main's "params"."""
    func = mod["main"]
    num_input = int(func.attrs["num_input"])
    params = [relax.Var(p.name, p.ty) for p in func.params[num_input:]]
    bb = relax.BlockBuilder()
    with bb.function(name, params, {"num_input": 0}):
        bb.emit_func_output(relax.Tuple(params))
    mod = mod.clone()
    mod[name] = bb.get()[name].with_attr("params", func.attrs["params"])
    mod["main"] = func.without_attr("params")
    return mod


@relax.expr_functor.mutator
class _WithoutBindings(relax.PyExprMutator):
    """main without the moved bindings; what it still uses of them becomes its parameters."""

    def __init__(self, moved: set[relax.Var]):
        super().__init__()
        self.moved = moved
        self.params: dict[relax.Var, relax.Var] = {}   # moved var -> main's parameter

    def visit_var_binding_(self, binding):
        if binding.var not in self.moved:
            super().visit_var_binding_(binding)

    def visit_var_(self, var):
        if var in self.moved:
            return self.params.setdefault(var, relax.Var(var.name, var.ty))
        return var

    visit_dataflow_var_ = visit_var_


def _moved_bindings(func: relax.Function, weights: list[relax.Var]) -> list[relax.VarBinding]:
    """main's bindings computed from the weights and from no input, in order: TVM's analysis for LiftTransformParams
    (dataflow bindings, no input, no size known at run time only), of those whose every variable is a weight or a
    moved binding's. One of constants alone (R.zeros) stays: fold-constants' business, and in main it holds no
    memory between runs."""
    computable = set(relax.analysis.computable_at_compile_time(func))
    available = set(weights)
    moved = []
    for block in func.body.blocks:
        for binding in block.bindings:
            uses = relax.analysis.free_vars(binding.value)
            if binding.var in computable and isinstance(binding, relax.VarBinding) and uses \
                    and all(v in available for v in uses):
                available.add(binding.var)
                moved.append(binding)
    return moved


@tvm.transform.module_pass(opt_level=0, name="EdgecComputeAtLoad")
def _compute_at_load(mod, _ctx):
    from ..offload.passes import LOAD_SUFFIX   # the offload steps import this package

    name = "main" + LOAD_SUFFIX
    func = mod["main"]
    if "num_input" not in func.attrs:
        return mod     # no weights were lifted
    num_input = int(func.attrs["num_input"])
    inputs, weights = list(func.params[:num_input]), list(func.params[num_input:])
    moved = _moved_bindings(func, weights)
    if not moved:
        return mod
    if name not in [gv.name_hint for gv in mod.get_global_vars()]:
        mod = identity_load(mod, name)
        func = mod["main"]    # the same body and parameters, without "params"
    rewriter = _WithoutBindings({b.var for b in moved})
    body = rewriter.visit_expr(func.body)
    used = set(relax.analysis.free_vars(body))
    kept = [w for w in weights if w in used]
    computed = list(rewriter.params.items())
    # main_load's body, then main's moved bindings on its results (main's weight parameters bound to them by name
    # only here: copy_with_new_vars gives the function its own vars), returning what main takes now
    load = mod[name]
    results = load.body.body
    take = relax.BindingBlock([relax.VarBinding(w, relax.TupleGetItem(results, i)) for i, w in enumerate(weights)])
    out = relax.Var("weights", relax.TupleType([v.ty for v in kept] + [v.ty for v, _ in computed]))
    compute = relax.DataflowBlock(moved + [relax.VarBinding(out, relax.Tuple(kept + [v for v, _ in computed]))])
    load = relax.Function(load.params, relax.SeqExpr([*load.body.blocks, take, compute], out), out.ty,
                          load.is_pure, load.attrs, load.span)
    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    mod[name] = relax.utils.copy_with_new_vars(load)
    mod["main"] = relax.Function(inputs + kept + [p for _, p in computed], body, func.ret_ty, func.is_pure,
                                 func.attrs, func.span)
    return relax.transform.Normalize()(mod)


@register_pass("compute-at-load", phase="params", after=("lift-params", "offload-codegen", "store-weights-int8"))
def compute_at_load(ctx):
    """Compute what main computes from the weights alone (no input) in main_load, once per loaded model."""
    return _compute_at_load
