"""Questions passes ask of a Relax module. Here, below both edgec.passes and edgec.offload, so that either can ask
without importing the other."""
from __future__ import annotations

import tvm
from tvm import relax


def calls_any(mod: tvm.IRModule, ops: set[str]) -> bool:
    """Whether a Relax function of `mod` calls one of the operators named `ops` (e.g. "relax.dequantize")."""
    found = []
    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, lambda e: found.append(1) if isinstance(e, relax.Call) and
                                            isinstance(e.op, tvm.ir.Op) and e.op.name in ops else None)
    return bool(found)


def per_tensor(call: relax.Call) -> bool:
    """Whether `call` is not a quantize/dequantize, or is one with a single scale and zero point (so it commutes
    with layout changes and acts alike on every element)."""
    return call.op.name not in ("relax.quantize", "relax.dequantize") or all(
        isinstance(a, tvm.ir.expr.GenericConst) and a.value.numpy().size == 1 for a in call.args[1:])


def mutate_functions(mod: tvm.IRModule, mutator, skip_partitions: bool = False) -> tvm.IRModule:
    """`mod` with each Relax function rewritten by `mutator` (a relax.PyExprMutator made on `mod`); with
    `skip_partitions`, a backend's partitions (Codegen functions), which the library computes, are left as they are."""
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and not (skip_partitions and func.attrs and "Codegen" in func.attrs):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    return mutator.builder_.get()
