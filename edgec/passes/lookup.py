"""int8-lookup-tables: an elementwise chain of one 8-bit tensor becomes a lookup in a 256-entry table.

In a QDQ graph the activations between integer layers (PP-LCNet's hardswish and learnable scale and bias: dequantize,
add 3, quantize, dequantize, multiply by itself, quantize, divide by 6, ...) are float math with a rounding after
each op: a dozen divisions per element. Where every value of such a chain is a function of one 8-bit tensor (its
other operands are scalar constants, or the same tensor through another path), its 8-bit result is too, so it is
`take(table, x)` (the index `x + 128` for int8), the table being the same ops applied to the 256 values x can
take. The tables are computed here, at build time, by TVM on the build machine (all of a module's in one compiled
function, as the quantized reference is computed): each is a 256-entry constant (a weight once lifted, in
params.bin), and neither main nor main_load computes it, so the library holds no kernels for it. Only chains of
`_MIN_OPS` ops or more, whose output has the input's shape, are replaced; what the chain's float values feed
elsewhere keeps computing them.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..context import BuildContext
from ..offload.fusion import static_shape
from ..quantize.calibrate import on_host
from .ir import per_tensor
from .registry import register_pass

_LOWEST = {"uint8": 0, "int8": -128}     # the 8-bit types a chain starts from: the table's first entry
_EIGHT_BIT = tuple(_LOWEST)
# Elementwise ops a chain may hold: per-tensor quantize/dequantize, and ops whose other operands are scalars
_ELEMENTWISE = ("relax.quantize", "relax.dequantize", "relax.add", "relax.subtract", "relax.multiply",
                "relax.divide", "relax.maximum", "relax.minimum", "relax.clip", "relax.sigmoid", "relax.nn.relu")
_MIN_OPS = 3    # a lone requantization (dequantize, quantize) costs about what a table lookup does


def _scalar(expr) -> bool:
    return isinstance(expr, tvm.ir.expr.GenericConst) and expr.value.numpy().size == 1


@relax.expr_functor.mutator
class _Tables(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        self.chains: dict[relax.Var, tuple[relax.Var, relax.Expr, int]] = {}   # var -> (root, on the table, ops)
        self.tables: list[relax.Var] = []                 # each lookup's table, still computed from the 256 values
        self.on_table: list[relax.VarBinding] = []        # the bindings that compute them (and unused ones), in order

    def _chain(self, expr) -> tuple[relax.Var, relax.Expr, int] | None:
        """What `expr` is as an operand of a chain: its root, its value on the root's 256 values, its ops."""
        if expr in self.chains:
            return self.chains[expr]
        dtype, shape = str(getattr(expr.ty, "dtype", None)), static_shape(expr)
        if isinstance(expr, relax.Var) and dtype in _EIGHT_BIT and shape:
            low = _LOWEST[dtype]
            values = np.arange(low, low + 256).astype(dtype).reshape([1] * (len(shape) - 1) + [256])
            return expr, relax.const(values), 0
        return None

    # A table var belongs to its block: a chain carried into another (an If's branch) would use it outside
    def visit_binding_block_(self, block):
        self.chains = {}
        return super().visit_binding_block_(block)

    def visit_dataflow_block_(self, block):
        self.chains = {}
        return super().visit_dataflow_block_(block)

    def visit_var_binding_(self, binding):
        value = self.visit_expr(binding.value)
        chain = self._link(value) if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) else None
        if chain is None:
            self.builder_.emit_normalized(relax.VarBinding(binding.var, value))
            return
        root, on_table, ops = chain
        self.chains[binding.var] = chain
        if ops >= _MIN_OPS and str(getattr(value.ty, "dtype", None)) in _EIGHT_BIT \
                and static_shape(value) == static_shape(root):
            low = _LOWEST[str(root.ty.dtype)]
            # a uint8 value is its own index: no int32 copy of x (a kernel of its own, which take does not fuse)
            index = relax.op.subtract(relax.op.astype(root, "int32"), relax.const(low, "int32")) if low else root
            table = self._emit_on_table(relax.op.reshape(on_table, [256]))
            self.tables.append(table)
            # in bounds by construction; "fast" would have TVM warn at each legalization that it could segfault
            value = relax.op.take(table, index, axis=0, mode="clip")
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))

    def _link(self, call: relax.Call) -> tuple[relax.Var, relax.Expr, int] | None:
        """The chain `call` extends, or None: its tensor operands must share one root, the rest be scalars."""
        if call.op.name not in _ELEMENTWISE or not per_tensor(call):
            return None
        roots, args, ops = set(), [], 0
        for arg in call.args:
            if isinstance(arg, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) or _scalar(arg):   # clip bounds, scalars
                args.append(arg)
                continue
            chain = self._chain(arg)
            if chain is None:
                return None
            roots.add(chain[0])
            args.append(chain[1])
            ops = max(ops, chain[2])
        if len(roots) != 1:
            return None
        on_table = self._emit_on_table(relax.Call(call.op, args, call.attrs, call.ty_args))
        return roots.pop(), on_table, ops + 1

    def _emit_on_table(self, call: relax.Call) -> relax.Var:
        var = self.builder_.emit(call)
        self.on_table.append(relax.VarBinding(var, self.builder_.lookup_binding(var)))
        return var


@relax.expr_functor.mutator
class _Constants(relax.PyExprMutator):
    """Each table var's uses replaced by its value."""

    def __init__(self, values: dict[relax.Var, np.ndarray]):
        super().__init__()
        self.values = values

    def visit_var_(self, var):
        return relax.const(self.values[var]) if var in self.values else var

    visit_dataflow_var_ = visit_var_


def _computed(tables: list[relax.Var], bindings: list[relax.VarBinding]) -> dict[relax.Var, np.ndarray]:
    """The value of each table var: the bindings it needs (constants in, no input) as one function run here."""
    needed, kept = set(tables), []
    for binding in reversed(bindings):     # a chain too short for a table computed nothing that is needed
        if binding.var in needed:
            kept.append(binding)
            needed.update(relax.analysis.free_vars(binding.value))
    out = relax.Var("tables", relax.TupleType([t.ty for t in tables]))
    body = relax.SeqExpr([relax.DataflowBlock([*reversed(kept), relax.VarBinding(out, relax.Tuple(tables))])], out)
    # the vars are the mutated module's too: the function gets its own
    func = relax.utils.copy_with_new_vars(relax.Function([], body, out.ty))
    values = on_host(tvm.IRModule({"main": func}))["main"]()
    return {t: v.numpy() for t, v in zip(tables, values)}


@tvm.transform.module_pass(opt_level=0, name="Int8LookupTables")
def _lookup_tables(mod, _ctx):
    mutator = _Tables(mod)
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and not any(k in (func.attrs or {}) for k in ("Codegen", "Composite",
                                                                                          "Primitive")):
            mutator.builder_.update_func(gv, mutator.visit_expr(func))
    mod = mutator.builder_.get()
    if mutator.tables:
        constants = _Constants(_computed(mutator.tables, mutator.on_table))
        mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function):
                mod[gv] = constants.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)


@register_pass("int8-lookup-tables", phase="graph", after=("offload-partition",))
def lookup_tables(ctx: BuildContext) -> tvm.transform.Pass:
    """Elementwise chains of one 8-bit tensor (QDQ's activations) as lookups in a 256-entry table"""
    return _lookup_tables
