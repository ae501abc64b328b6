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

A chain whose constants vary along one channel axis (a batch norm left between a per-channel dequantize and a
quantize: PP-OCRv4 det's head after its deconvolution, three divisions per element) is a table of 256 entries per
channel, computed the same way on the 256 values laid along axis 0, and looked up by a kernel of its own:
out[i] = table[x[i], channel of i] (PP-OCRv4 det's 160x160x24 head: 0.19 -> 0.12 ms).
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax, te

from ..context import BuildContext
from ..offload.fusion import static_shape
from ..quantize.calibrate import on_host
from .ir import mutate_functions, per_tensor, scalar_constant
from .registry import register_pass

_LOWEST = {"uint8": 0, "int8": -128}     # the 8-bit types a chain starts from: the table's first entry
_EIGHT_BIT = tuple(_LOWEST)
# Elementwise ops a chain may hold: per-tensor quantize/dequantize, and ops whose other operands are scalars
_ELEMENTWISE = ("relax.quantize", "relax.dequantize", "relax.add", "relax.subtract", "relax.multiply",
                "relax.divide", "relax.maximum", "relax.minimum", "relax.clip", "relax.sigmoid", "relax.nn.relu")
_MIN_OPS = 3    # a lone requantization (dequantize, quantize) costs about what a table lookup does


def _channel_axis(expr, shape: tuple[int, ...]) -> int | None:
    """The one axis of `shape` a constant `expr` varies along (its other dimensions 1), or None."""
    if not isinstance(expr, tvm.ir.expr.GenericConst):
        return None
    dims = list(expr.value.shape)
    if len(dims) > len(shape):
        return None
    dims = [1] * (len(shape) - len(dims)) + dims
    varying = [d for d, n in enumerate(dims) if n != 1]
    return varying[0] if len(varying) == 1 and dims[varying[0]] == shape[varying[0]] else None


def _channels(shape: tuple[int, ...], axis: int) -> list[int]:
    """The shape of a table computed per channel: the 256 values along axis 0, the channels along `axis`."""
    return [256] + [shape[axis] if d == axis else 1 for d in range(1, len(shape))]


def _channel_lookup(shape: tuple[int, ...], index_dtype: str, axis: int, dtype: str) -> tvm.tirx.PrimFunc:
    """out[i] = table[x[i], i[axis]]: a table of 256 entries per channel."""
    table = te.placeholder((256, shape[axis]), dtype, name="table")
    x = te.placeholder(shape, index_dtype, name="x")
    out = te.compute(shape, lambda *i: table[x[i].astype("int32"), i[axis]], name="channel_lookup")
    return te.create_prim_func([table, x, out]).without_attr("global_symbol")   # private, as legalized kernels are


@relax.expr_functor.mutator
class _Tables(relax.PyExprMutator):
    def __init__(self, mod):
        super().__init__(mod)
        # var -> (root, its value on the table, ops, the channel axis of per-channel operands or None)
        self.chains: dict[relax.Var, tuple[relax.Var, relax.Expr, int, int | None]] = {}
        self.tables: list[relax.Var] = []                 # each lookup's table, still computed from the 256 values
        self.on_table: list[relax.VarBinding] = []        # the bindings that compute them (and unused ones), in order

    def _chain(self, expr) -> tuple[relax.Var, relax.Expr, int, int | None] | None:
        """What `expr` is as an operand of a chain: its root, its value on the root's 256 values (along axis 0, so
        that a per-channel operand broadcasts along its own axis), its ops, its channel axis."""
        if expr in self.chains:
            return self.chains[expr]
        dtype, shape = str(getattr(expr.ty, "dtype", None)), static_shape(expr)
        if isinstance(expr, relax.Var) and dtype in _EIGHT_BIT and shape:
            low = _LOWEST[dtype]
            values = np.arange(low, low + 256).astype(dtype).reshape([256] + [1] * (len(shape) - 1))
            return expr, relax.const(values), 0, None
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
        root, on_table, ops, axis = chain
        self.chains[binding.var] = chain
        if ops >= _MIN_OPS and str(getattr(value.ty, "dtype", None)) in _EIGHT_BIT \
                and static_shape(value) == static_shape(root):
            low = _LOWEST[str(root.ty.dtype)]
            # a uint8 value is its own index: no int32 copy of x (a kernel of its own, which take does not fuse)
            index = relax.op.subtract(relax.op.astype(root, "int32"), relax.const(low, "int32")) if low else root
            if axis is None:
                table = self._emit_on_table(relax.op.reshape(on_table, [256]))
                # in bounds by construction; "fast" would have TVM warn at each legalization that it could segfault
                value = relax.op.take(table, index, axis=0, mode="clip")
            else:
                shape = static_shape(root)
                every_channel = self._emit_on_table(relax.op.broadcast_to(on_table, _channels(shape, axis)))
                table = self._emit_on_table(relax.op.reshape(every_channel, [256, shape[axis]]))
                kernel = self.builder_.add_func(_channel_lookup(shape, "int32" if low else "uint8", axis,
                                                                str(value.ty.dtype)), "channel_lookup")
                value = relax.call_tir(kernel, [table, index], relax.TensorType(shape, str(value.ty.dtype)))
            self.tables.append(table)
        self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))

    def _link(self, call: relax.Call) -> tuple[relax.Var, relax.Expr, int, int | None] | None:
        """The chain `call` extends, or None: its tensor operands must share one root, the rest be scalars or
        constants along one channel axis of the root (a batch norm's; a per-channel quantize or dequantize)."""
        if call.op.name not in _ELEMENTWISE:
            return None
        chains = [self._chain(a) if isinstance(a, relax.Var) else None for a in call.args]
        roots = {c[0] for c in chains if c is not None}
        if len(roots) != 1:
            return None
        root = roots.pop()
        shape = static_shape(root)
        axes = {c[3] for c in chains if c is not None and c[3] is not None}
        quantization = call.op.name in ("relax.quantize", "relax.dequantize")
        if quantization and not per_tensor(call):     # its scale and zero point lie along its axis
            axes.add(int(call.attrs.axis) % len(shape))
        for arg, chain in zip(call.args[:1] if quantization else call.args, chains):
            if chain is None and not (isinstance(arg, (tvm.tirx.IntImm, tvm.tirx.FloatImm)) or scalar_constant(arg)):
                axes.add(_channel_axis(arg, shape))    # None: neither a chain, a scalar nor a channel constant
        if None in axes or len(axes) > 1 or 0 in axes:    # axis 0 holds the 256 values
            return None
        axis = next(iter(axes), None)
        args = [a if c is None else c[1] for a, c in zip(call.args, chains)]
        if axis is not None and quantization and static_shape(args[0])[axis] == 1:
            # a per-channel quantize or dequantize needs the channels along its axis
            args[0] = self._emit_on_table(relax.op.broadcast_to(args[0], _channels(shape, axis)))
        on_table = self._emit_on_table(relax.Call(call.op, args, call.attrs, call.ty_args))
        return root, on_table, max(c[2] for c in chains if c is not None) + 1, axis

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
    mod = mutate_functions(mod, mutator, skip_partitions=True)
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
