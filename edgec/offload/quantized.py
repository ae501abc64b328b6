"""Quantized (QDQ) patterns shared by the backends, and the reading of a partitioned one back for an emitter.

Quantized compute reaches the offload passes as QDQ, the form TVM's ONNX frontend gives onnxruntime's QDQ models
and edgec's own quantization emits: `quantize(act(dequantize(x_q) (*) dequantize(w_q) + dequantize(b_q)))`, with
int8 weight constants quantized per output channel, an int32 bias at scale sx * sw and per-tensor activations.
Such a chain is one integer primitive: u8/s8 source with its zero point, s8 weights, s32 bias, output scales
sx * sw / sy per channel, u8/s8 destination with its zero point. The group holds every constant of the chain
(scales, zero points, int8 weights, int32 bias), so constant folding cannot turn the weights into floats.
A pattern's name is "<backend>.q<anchor>[_bias][_relu|_clip]". A chain whose output goes on in float32 (edgec's
own quantization quantizes only what an integer kernel reads, so a conv followed by hardswish, sigmoid or an affine
ends without a quantize) is "..._f32" where the backend asks for it (`float_out`): the same primitive with an f32
destination in real units, output scales sx * sw. The anchor is conv2d, matmul or conv2d_transpose
(IOHW weights, quantized along O); TVM lowers conv2d_transpose in NCHW only, so where a backend's int8
deconvolution is NHWC, `deconv_to_nhwc` computes the quantized ones in NHWC before the partition and
`deconv_back_to_nchw` returns to NCHW those the partition left in main.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import tvm
from tvm import relax
from tvm.relax.backend.utils import has_leaking_intermediate_variables
from tvm.relax.dpl import is_const, is_op, rewrite_call, wildcard

from ..passes.ir import clip_bounds, per_tensor, scalar_constant
from .backend import Int8Limits, Operands, Pattern, exported
from .fusion import composite_function, static_shape

QUANTIZED_ACTIVATIONS = ("uint8", "int8")
FLOAT_OUT = "f32"           # the name suffix of a chain without its quantize: float32 output
_ANCHORS = ("relax.nn.conv2d", "relax.matmul", "relax.nn.conv2d_transpose")


def _dequantize(data):
    return is_op("relax.dequantize")(data, is_const(), is_const())


_ACTIVATIONS = ("relu", "clip", "hardswish", "sigmoid")
_TAIL_ONLY = ("affine", "hardswish", "sigmoid")    # tokens of the longer tails (`tails`): real units, see QFused.tail


def _tails(tails: bool) -> list[tuple[str, ...]]:
    """The elementwise steps a chain may end with: none, ReLU or clip; with `tails` also an activation (ReLU, clip,
    hardswish, sigmoid) then an affine (s * x + b, scalar s and b, as PP-LCNetV3's learnable affine blocks), either
    or both: longest first. (An affine before the activation is in the conv's weights and bias already:
    fold-batchnorm folds it.)"""
    found = [(), ("relu",), ("clip",)]
    if tails:
        found += [(*((act,) if act else ()), *(("affine",) if affine else ()))
                  for act, affine in itertools.product((None, *_ACTIVATIONS), (True, False))]
    return sorted(set(found), key=lambda t: (-len(t), t))


def _scalar_operand(op: str, x):
    """op(x, c) or op(c, x), c a constant."""
    c = is_const()
    return is_op(op)(x, c) | is_op(op)(c, x)


def _step(token: str, x):
    """The pattern of one tail step on x, as TVM's importers give it."""
    if token == "affine":
        return _scalar_operand("relax.add", _scalar_operand("relax.multiply", x))
    if token == "relu":
        return is_op("relax.nn.relu")(x)
    if token == "clip":
        return is_op("relax.clip")(x, wildcard(), wildcard())
    if token == "sigmoid":
        return is_op("relax.sigmoid")(x)
    # ONNX HardSwish, x * clip(x + 3, 0, 6) / 6: divided last (opset < 14, decomposed HardSigmoid) or first
    gate = is_op("relax.clip")(is_op("relax.add")(x, is_const()), wildcard(), wildcard())
    divided = is_op("relax.divide")(gate, is_const())
    return is_op("relax.divide")(is_op("relax.multiply")(x, gate) | is_op("relax.multiply")(gate, x), is_const()) \
        | is_op("relax.multiply")(x, divided) | is_op("relax.multiply")(divided, x)


def quantized_patterns(backend: str, anchor: str, op: str, check_anchor: Callable[[relax.Call], str | None],
                       *, residual: bool = False, float_out: bool = False, tails: bool = False) -> list[Pattern]:
    """`<backend>.q<anchor>[_bias][_relu|_clip]` for quantize(chain(op(dequantize(x), dequantize(w)))), longest first;
    with `residual`, first `..._add` for quantize(dequantize(that) + dequantize(r)), QDQ's residual add of an 8-bit
    tensor r (a backend's sum post-op), the chain on either side; with `float_out`, then `..._f32` for the chains
    without the quantize, whose float32 output goes on to float operators (hardswish, sigmoid, an affine) before the
    next quantize: edgec's own quantization leaves conv outputs so; with `tails`, chains ending in the longer tails
    of `_tails` too (`..._hardswish_affine`: a backend that computes them as post-ops)."""
    patterns = []
    combinations = sorted(itertools.product((True, False), _tails(tails)), key=lambda c: -(c[0] + len(c[1])))
    for quantized_out, bias, tokens in [(True, *c) for c in combinations] + [(False, *c) for c in combinations
                                                                              if float_out]:
        weight_q = _dequantize(is_const())
        weight = weight_q | is_op("relax.permute_dims")(weight_q)    # Gemm's transB: (N, K) stored, (K, N) used
        root = is_op(op)(_dequantize(wildcard()), weight)
        annotations = {"anchor": root}
        if bias:
            bias_q = _dequantize(is_const())
            shaped = bias_q | is_op("relax.reshape")(bias_q, wildcard())
            # the ONNX frontend's reshape to [1, C, 1, 1], which the NHWC conversion transposes
            root = is_op("relax.add")(root, shaped | is_op("relax.permute_dims")(shaped))
            annotations["bias"] = root
        for token in tokens:
            root = _step(token, root)
        if tokens:
            annotations["act"] = root
        if quantized_out:
            root = is_op("relax.quantize")(root, is_const(), is_const())
        annotations["out"] = root
        name = "_".join([f"{backend}.q{anchor}"] + (["bias"] if bias else []) + list(tokens)
                        + ([] if quantized_out else [FLOAT_OUT]))
        patterns.append(Pattern(name, root, annotations, _check(check_anchor, tokens), op))
    if not residual:
        return patterns
    # two patterns, not one alternation: where both operands are chains, a match of the first side whose chain is
    # also read elsewhere (refused: a leaking value) must leave the other side its turn
    summed = []
    for p in (p for p in patterns if not p.name.endswith(FLOAT_OUT) and not _tail_tokens(p.name)):
        for chain_first in (True, False):
            chain, other = _dequantize(p.pattern), _dequantize(wildcard())
            add = is_op("relax.add")(*((chain, other) if chain_first else (other, chain)))
            root = is_op("relax.quantize")(add, is_const(), is_const())
            summed.append(Pattern(f"{p.name}_add", root, {**p.annotations, "sum": add, "residual": other,
                                                          "chain_out": chain, "sum_out": root}, p.check, op))
    return summed + patterns


def _tail_tokens(composite: str) -> tuple[str, ...]:
    """The tail steps a pattern name ends its chain with when they are a longer tail (see `_tails`), else ()."""
    tokens = tuple(t for t in composite.split(".", 1)[1].split("_")[1:] if t in (*_ACTIVATIONS, "affine"))
    return tokens if any(t in _TAIL_ONLY for t in tokens) else ()


def _tail_steps(tokens: tuple[str, ...], end, resolve) -> list[tuple[str, tuple]]:
    """A tail's steps in order, walking back from its last value `end`: (token, operands) with an affine's
    (scale, shift), a hardswish's (3, its gate's clip, 6), a clip's and a ReLU's call, as the graph has them
    (`resolve`: a variable to the expression it is bound to; a constant operand resolves to no call)."""
    steps, node = [], resolve(end)

    def split(call):    # (the data operand, the constant one)
        a, b = call.args
        return (a, b) if isinstance(resolve(a), relax.Call) else (b, a)

    for token in reversed(tokens):
        if token == "affine":
            product, shift = split(node)
            x, scale = split(resolve(product))
            steps.append((token, (scale, shift)))
        elif token == "hardswish":
            def find(call, op):     # the operand of `call` that is a call of `op`
                return next(a for a in map(resolve, call.args) if isinstance(a, relax.Call) and a.op.name == op)

            if node.op.name == "relax.divide":      # (x * gate) / 6
                gate, six = find(resolve(node.args[0]), "relax.clip"), node.args[1]
            else:                                   # x * (gate / 6)
                divided = find(node, "relax.divide")
                gate, six = resolve(divided.args[0]), divided.args[1]
            x, three = split(resolve(gate.args[0]))
            steps.append((token, (three, gate, six)))
        else:
            x = node.args[0]
            steps.append((token, (node,)))
        node = resolve(x)
    return steps[::-1]


def _tail_reason(steps: list[tuple[str, tuple]]) -> str | None:
    """Why a matched tail is not the elementwise steps its name says (None: it is)."""
    for token, operands in steps:
        if token == "affine" and not all(scalar_constant(c) and c.ty.dtype == "float32" for c in operands):
            return "an affine with a per-channel or non-float32 scale or shift (scalars only)"
        if token == "hardswish":
            three, gate, six = operands
            if not (scalar_constant(three) and scalar_constant(six)) or (
                    three.value.numpy().item(), clip_bounds(gate), six.value.numpy().item()) != (3.0, (0.0, 6.0), 6.0):
                return "x * clip(x + a, lo, hi) / b that is not hardswish (a = 3, [0, 6], b = 6)"
        if token == "clip" and clip_bounds(operands[0]) is None:
            return "clip bounds are not constants"
    return None


def _check(check_anchor, tokens: tuple[str, ...] = ()) -> Callable[[relax.transform.PatternCheckContext], str | None]:
    def check(ctx: relax.transform.PatternCheckContext) -> str | None:
        if has_leaking_intermediate_variables(ctx):
            return "a value inside the quantized chain is also used outside it"
        anchor, out = ctx.annotated_expr["anchor"], ctx.annotated_expr["out"]
        bound = {v: e for e, v in ctx.value_to_bound_var.items()}   # variable -> the expression it names
        data, weight = _dq(bound, anchor.args[0]), _dq(bound, anchor.args[1])
        quantized_out = out.op.name == "relax.quantize"
        for role, expr in (("input", data.args[0]), ("output", out)):
            if quantized_out or role == "input":
                if getattr(expr.ty, "dtype", None) not in QUANTIZED_ACTIVATIONS:
                    return f"quantized {role} of dtype {getattr(expr.ty, 'dtype', None)} (u8 or s8 only)"
            elif getattr(expr.ty, "dtype", None) != "float32":
                return f"output of dtype {getattr(expr.ty, 'dtype', None)} (float32 only)"
            if static_shape(expr) is None:
                return f"{role} has a dynamic shape"
        if not all(scalar_constant(e) for e in (*data.args[1:], *(out.args[1:] if quantized_out else ()))):
            return "activations quantized per channel (per tensor only)"
        if weight.args[0].ty.dtype != "int8" or weight.args[2].value.numpy().any():
            return "weights not symmetric int8 (zero point 0)"
        out_channels = static_shape(anchor)[_channel_axis(anchor)]
        if weight.args[1].value.numpy().size not in (1, out_channels) or (
                weight.args[1].value.numpy().size > 1 and int(weight.attrs.axis) != _output_axis(bound, anchor)):
            return "weights not quantized per output channel"
        if "bias" in ctx.annotated_expr:
            bias = _bias_dq(bound, ctx.annotated_expr["bias"])
            if bias.args[0].ty.dtype != "int32" or bias.args[0].value.numpy().size != out_channels \
                    or bias.args[2].value.numpy().any():
                return "bias not int32, one value per output channel, zero point 0"
            # the integer kernels add the int32 bias to the sums, which are at scale sx * sw: another scale (a
            # hand-made QDQ graph can have one) would be a wrong bias; a few float32 roundings apart is the same
            product = data.args[1].value.numpy().astype(np.float64) * weight.args[1].value.numpy().reshape(-1)
            if not np.allclose(bias.args[1].value.numpy().reshape(-1), product, rtol=1e-6, atol=0):
                return "bias scale is not input scale x weight scale"
        if tokens:
            reason = _tail_reason(_tail_steps(tokens, ctx.annotated_expr["act"], lambda e: _resolve(bound, e)))
            if reason:
                return reason
        if "sum" in ctx.annotated_expr:
            reason = _residual_reason(ctx.annotated_expr["residual"], ctx.annotated_expr["chain_out"],
                                      ctx.annotated_expr["sum_out"], out)
            if reason:
                return reason
        return check_anchor(anchor)

    return check


def beyond(ctx: relax.transform.PatternCheckContext, limits: Int8Limits) -> str | None:
    """Why a matched chain is outside a backend's int8 limits on the target (None: within them)."""
    bound = {v: e for e, v in ctx.value_to_bound_var.items()}
    anchor = ctx.annotated_expr["anchor"]
    data, weight = _dq(bound, anchor.args[0]), _dq(bound, anchor.args[1])
    if data.args[0].ty.dtype not in limits.activations:
        return f"{data.args[0].ty.dtype} input"
    peak = int(np.abs(weight.args[0].value.numpy().astype(np.int32)).max())
    return f"weights up to ±{peak}" if peak > limits.weight_max else None


def _residual_reason(residual: relax.Call, chain_out: relax.Call, sum_out: relax.Call, out) -> str | None:
    """Why a residual add after a chain is not the chain's sum post-op: r is read in place of the output, so it
    must be an 8-bit tensor of the output's shape, and every scale per tensor; the post-ops dequantize the chain's
    output with its quantize's scale and zero point, so its dequantize must have those."""
    if not all(np.array_equal(a.value.numpy(), b.value.numpy()) for a, b in zip(chain_out.args[1:], out.args[1:])):
        return "the chain's output dequantized with another scale or zero point than it was quantized with"
    for role, expr in (("residual", residual.args[0]), ("sum", sum_out)):
        if getattr(expr.ty, "dtype", None) not in QUANTIZED_ACTIVATIONS:
            return f"{role} of dtype {getattr(expr.ty, 'dtype', None)} (u8 or s8 only)"
    if static_shape(residual.args[0]) != static_shape(out):
        return f"residual of shape {static_shape(residual.args[0])} is not the output's {static_shape(out)}"
    if not all(scalar_constant(e) for e in (*residual.args[1:], *sum_out.args[1:])):
        return "residual or sum quantized per channel (per tensor only)"
    return None


def chain_scales(ctx: relax.transform.PatternCheckContext) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A matched chain's input scale, weight scales (one or one per output channel) and output scale, float32."""
    bound = {v: e for e, v in ctx.value_to_bound_var.items()}
    anchor = ctx.annotated_expr["anchor"]
    return tuple(e.args[1].value.numpy().astype(np.float32).reshape(-1) for e in (
        _dq(bound, anchor.args[0]), _dq(bound, anchor.args[1]), ctx.annotated_expr["out"]))


def _resolve(bound: dict, expr):
    """The expression a variable of the matched chain is bound to, through any chain of variables."""
    while isinstance(expr, relax.Var) and expr in bound:
        expr = bound[expr]
    return expr


def _dq(bound: dict, expr) -> relax.Call:
    """The dequantize behind an anchor operand (through Gemm's transpose)."""
    expr = _resolve(bound, expr)
    if expr.op.name == "relax.permute_dims":
        return _dq(bound, expr.args[0])
    return expr


def _bias_dq(bound: dict, bias: relax.Call) -> relax.Call:
    expr = _resolve(bound, bias.args[1])
    while expr.op.name != "relax.dequantize":
        expr = _resolve(bound, expr.args[0])
    return expr


def _channel_axis(anchor) -> int:
    """The anchor's output channel axis: C of a conv's layout (NHWC in the backends, NCHW where TVM keeps it)."""
    if anchor.op.name != "relax.matmul":
        return str(anchor.attrs.out_layout or anchor.attrs.data_layout).index("C")
    return -1


def _output_axis(bound: dict, anchor) -> int:
    """The axis of the stored weights that indexes output channels: O of OIHW or IOHW; N of (N, K) or (K, N)."""
    if anchor.op.name != "relax.matmul":
        return str(anchor.attrs.kernel_layout).index("O")
    weight = anchor.args[1]
    weight = bound.get(weight, weight)
    return 0 if weight.op.name == "relax.permute_dims" else 1


@dataclass(frozen=True)
class QSum:
    """A chain's residual add (`..._add`): quantize(dequantize(chain) + dequantize(r)); parameter indices."""
    residual: int
    residual_scale: int
    residual_zero_point: int
    out_scale: int
    out_zero_point: int
    residual_dtype: str
    out_dtype: str


@dataclass(frozen=True)
class QFused:
    """A partitioned quantized chain: parameter indices of each operand the emitter needs (out_*: the chain's own
    quantize; `sum`: the residual add after it, whose quantize is then the function's output)."""
    symbol: str
    composite: str
    anchor: relax.Call
    data: int
    data_scale: int
    data_zero_point: int
    weight: int
    weight_scale: int
    weight_transposed: bool      # stored (N, K), used (K, N)
    bias: int | None
    activation: str | None       # "relu" or "clip"
    bounds: tuple[float, float]  # clip, real values
    out_scale: int | None        # None (and out_dtype float32): a `..._f32` chain, without the quantize
    out_zero_point: int | None
    data_dtype: str
    out_dtype: str
    num_params: int
    sum: QSum | None = None
    # a longer tail (quantized_patterns' `tails`): every step after the bias in order, ("linear", scale, shift)
    # (parameter indices), ("hardswish",), ("logistic",), ("relu",) or ("clip", lo, hi); `activation` is then None.
    # Its steps are not positively homogeneous, so the emitter runs them on the output in real units.
    tail: tuple[tuple, ...] = ()

    @property
    def float_out(self) -> bool:
        return self.out_scale is None

    @property
    def runtime(self) -> tuple[int, ...]:
        """The operands computed at run time, in parameter order: the quantized input and a residual (one operand
        where the residual is the input itself: x + conv(x))."""
        return tuple(sorted({self.data} if self.sum is None else {self.data, self.sum.residual}))

    @property
    def packed(self) -> tuple[int, ...]:
        """The constants the emitters read, packed at load: the input's and output's scales and zero points, the
        weights and their scales, the bias, a residual add's scales and zero points, a tail's affine operands. Not
        the weights' zero point nor the bias's scale and zero point, which the pattern's check fixed (0, sx * sw, 0):
        PP-OCRv4 det int8 stored 73 KB of them."""
        read = {self.data_scale, self.data_zero_point, self.weight, self.weight_scale, self.bias, self.out_scale,
                self.out_zero_point, *(i for step in self.tail if step[0] == "linear" for i in step[1:])}
        if self.sum:
            read |= {self.sum.residual_scale, self.sum.residual_zero_point, self.sum.out_scale,
                     self.sum.out_zero_point}
        return tuple(sorted(read - {None} - set(self.runtime)))

    @property
    def operands(self) -> Operands:
        return Operands(self.packed, self.runtime)


# C++ shared by the int8 emitters (after CPP_HELPERS): reading the scales (float32) and zero points (u8, s8) given to
# _pack at load.
QUANTIZED_CPP = r"""
namespace {
// Out of line: a call site reads several, and each check's throw in line is code at every read.
[[gnu::noinline]] float Scale(const tvm::ffi::TensorView& t, int64_t channel) {
  if (t.dtype().code != kDLFloat || t.dtype().bits != 32) TVM_FFI_THROW(TypeError) << "a scale is not float32";
  return static_cast<const float*>(t.data_ptr())[t.numel() == 1 ? 0 : channel];
}

[[gnu::noinline]] int32_t ZeroPoint(const tvm::ffi::TensorView& t) {
  const DLDataType dtype = t.dtype();
  if (dtype.bits != 8) TVM_FFI_THROW(TypeError) << "a zero point is not 8-bit";
  return dtype.code == kDLUInt ? *static_cast<const uint8_t*>(t.data_ptr())
                               : *static_cast<const int8_t*>(t.data_ptr());
}
}  // namespace
"""


def pack_function(q: QFused, body: str) -> str:
    """`<symbol>_pack` of an int8 chain: `body` sees its packed operands as a<index>."""
    return pack_export(q.symbol, q.packed, body)


def pack_export(symbol: str, packed: tuple[int, ...], body: str) -> str:
    """`<symbol>_pack` (C ABI, `exported`), taking the operands `packed` in order: `body`, which sets `*result` to
    the state (the backend's Pack does, out of line: a reference returned is released in line, 300 bytes per call
    site), sees each as a<index>."""
    operands = "\n  ".join(f"const tvm::ffi::TensorView a{i} = edgec_offload::TensorArg(args, {k});"
                           for k, i in enumerate(packed))
    return f"""
static void {symbol}_pack_impl(const TVMFFIAny* args, tvm::ffi::Any* result) {{
  {operands}{body}
}}
""" + exported(f"{symbol}_pack", len(packed), f"{symbol}_pack_impl(args, result);")


def is_quantized(func: relax.Function) -> bool:
    return ".q" in composite_function(func).attrs["Composite"]


def read_quantized(func: relax.Function) -> QFused:
    inner = composite_function(func)
    values = {b.var: b.value for block in inner.body.blocks for b in block.bindings}

    def value(expr):
        while isinstance(expr, relax.Var) and expr in values:
            expr = values[expr]
        return expr

    def param(expr) -> int:
        expr = value(expr)
        for i, p in enumerate(inner.params):
            if p.same_as(expr):
                return i
        raise ValueError(f"{inner.attrs['Composite']}: an operand is not a parameter")

    out = value(inner.body.body)
    float_out = inner.attrs["Composite"].endswith(FLOAT_OUT)
    summed = None
    if inner.attrs["Composite"].endswith("_add"):    # out is the residual add's quantize, the chain's is inside it
        add = value(out.args[0])
        chain_dq, residual = (value(a) for a in add.args)
        if isinstance(value(chain_dq.args[0]), relax.Var):     # the chain on the right
            chain_dq, residual = residual, chain_dq
        summed = QSum(param(residual.args[0]), param(residual.args[1]), param(residual.args[2]), param(out.args[1]),
                      param(out.args[2]), str(residual.args[0].ty.dtype), str(out.ty.dtype))
        out = value(chain_dq.args[0])
    anchor = next(v for v in values.values() if isinstance(v.op, tvm.ir.Op) and v.op.name in _ANCHORS)
    data, weight = value(anchor.args[0]), value(anchor.args[1])
    transposed = weight.op.name == "relax.permute_dims"
    weight = value(weight.args[0]) if transposed else weight
    bias = act = None
    bounds = (0.0, 0.0)
    tokens = _tail_tokens(str(inner.attrs["Composite"]))
    tail = tuple(_read_step(token, operands, param) for token, operands in
                 _tail_steps(tokens, out if float_out else out.args[0], value)) if tokens else ()
    for v in values.values():
        if v.op.name == "relax.add" and value(v.args[0]).same_as(anchor):    # the bias add reads the anchor
            b = value(v.args[1])
            while b.op.name != "relax.dequantize":
                b = value(b.args[0])
            bias = param(b.args[0])
        elif v.op.name in ("relax.nn.relu", "relax.clip") and not tail:
            act = v.op.name.rsplit(".", 1)[-1]
            if act == "clip":
                bounds = clip_bounds(v)
    return QFused(str(func.attrs["global_symbol"]), str(inner.attrs["Composite"]), anchor,
                  param(data.args[0]), param(data.args[1]), param(data.args[2]), param(weight.args[0]),
                  param(weight.args[1]), transposed, bias, act, bounds,
                  *((None, None) if float_out else (param(out.args[1]), param(out.args[2]))),
                  str(data.args[0].ty.dtype), str(out.ty.dtype), len(func.params), summed, tail)


def _read_step(token: str, operands: tuple, param: Callable) -> tuple:
    """A tail step as QFused.tail holds it."""
    if token == "affine":
        return ("linear", *map(param, operands))
    if token == "clip":
        return ("clip", *clip_bounds(operands[0]))
    return ({"sigmoid": "logistic"}.get(token, token),)


@relax.expr_functor.mutator
class _Untie(relax.PyExprMutator):
    """Each use of a dequantized tensor by an anchor (its data) or an add gets a dequantize of its own."""

    def __init__(self, mod):
        super().__init__(mod)
        self.dequantized: dict[relax.Var, relax.Call] = {}

    def visit_var_binding_(self, binding):
        value = binding.value
        if isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op):
            name = value.op.name
            if name == "relax.dequantize":
                self.dequantized[binding.var] = value
            uses = {**{anchor: (0,) for anchor in _ANCHORS}, "relax.add": (0, 1)}.get(name, ())
            args = list(value.args)
            for i in uses:
                if isinstance(args[i], relax.Var) and args[i] in self.dequantized:
                    dq = self.dequantized[args[i]]
                    args[i] = self.builder_.emit(relax.Call(dq.op, [self.visit_expr(a) for a in dq.args], dq.attrs))
            if uses:
                value = relax.Call(value.op, [self.visit_expr(a) for a in args], value.attrs, value.ty_args)
                self.builder_.emit_normalized(relax.VarBinding(binding.var, self.builder_.normalize(value)))
                return
        super().visit_var_binding_(binding)


@tvm.transform.module_pass(opt_level=0, name="OffloadUntieDequantize")
def untie_dequantize(mod, pctx):
    """Each anchor and add gets its own dequantize of its inputs: one shared with a residual add or another
    layer would be a value used outside the quantized chain, which then could not be fused. (rewrite_call cannot
    do this: it binds a new call equal to a bound one to the same variable.)"""
    mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function) and "Codegen" not in (func.attrs or {}):
            mutator = _Untie(mod)
            mod[gv] = mutator.visit_expr(func)
    return relax.transform.DeadCodeElimination()(mod)


def has_quantized_anchor(mod: tvm.IRModule) -> bool:
    """Whether a Relax function of `mod` dequantizes an int8 constant (a QDQ chain's weight)."""
    return quantized_layers(mod) > 0


def quantized_layers(mod: tvm.IRModule) -> int:
    """How many int8 constants (QDQ chains' weights) the Relax functions of `mod` dequantize."""
    found = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.dequantize" \
                and isinstance(e.args[0], tvm.ir.expr.GenericConst) and e.args[0].ty.dtype == "int8":
            found.append(e)

    for func in mod.functions.values():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    return len(found)


def _relayout_pass(name: str, data, weight, layouts: tuple[str, str],
                   takes: Callable[[dict], bool] = lambda m: True) -> tvm.transform.Pass:
    """A pass computing each conv2d_transpose(data, weight) in `layouts[0]` in `layouts[1]` instead, between
    transposes, in the Relax functions no backend took; `takes(match)` picks which."""
    from_layout, to_layout = layouts
    to = [from_layout.index(c) for c in to_layout]
    pattern = is_op("relax.nn.conv2d_transpose")(data, weight)

    def rewrite(call, m):
        a = call.attrs
        if (a.data_layout, a.out_layout) != (from_layout, from_layout) or len(static_shape(call) or ()) != 4 \
                or not takes(m):
            return call
        inner = relax.op.nn.conv2d_transpose(
            relax.op.permute_dims(call.args[0], to), call.args[1], [int(s) for s in a.strides],
            [int(p) for p in a.padding], [int(p) for p in a.output_padding], [int(d) for d in a.dilation],
            int(a.groups), to_layout, str(a.kernel_layout), to_layout, a.out_dtype if str(a.out_dtype) else None)
        return relax.op.permute_dims(inner, [to.index(i) for i in range(4)])

    @tvm.transform.module_pass(opt_level=0, name=name)
    def relayout(mod, pctx):
        mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
        for gv, func in list(mod.functions_items()):
            if isinstance(func, relax.Function) and "Codegen" not in (func.attrs or {}):
                mod[gv] = rewrite_call(pattern, rewrite, func)
        return mod

    return relayout


# ConvertLayout gives conv2d_transpose no NHWC (TVM 0.27 lowers it in NCHW only); oneDNN's int8 deconvolution runs
# its reference code on NCHW (80x80x24 to 24 channels, 2x2 stride 2: 815 ms against 0.1 in NHWC, one core). The
# transposes around the NHWC one meet the NHWC graph's own (offload's transpose sinking removes the pairs).
# Taken: a per-tensor dequantized input (quantize/dequantize commute with the transposes) and int8 constant weights.
_DEQUANTIZED_DATA = is_op("relax.dequantize")(wildcard(), is_const(), is_const())
_DEQUANTIZED_WEIGHT = is_op("relax.dequantize")(is_const(), is_const(), is_const())
deconv_to_nhwc = _relayout_pass(
    "OffloadQuantizedDeconvNHWC", _DEQUANTIZED_DATA, _DEQUANTIZED_WEIGHT, ("NCHW", "NHWC"),
    lambda m: per_tensor(m[_DEQUANTIZED_DATA]) and m[_DEQUANTIZED_WEIGHT].args[0].ty.dtype == "int8")
# what no backend took goes back to the layout TVM lowers
deconv_back_to_nchw = _relayout_pass("OffloadDeconvBackToNCHW", wildcard(), wildcard(), ("NHWC", "NCHW"))
