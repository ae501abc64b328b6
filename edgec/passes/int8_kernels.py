"""int8-kernels: the int8 chains no offload backend takes run in TVM as integer kernels.

A QDQ chain `quantize(act(dequantize(x_q) (*) dequantize(w_q) + dequantize(b_q)))` of conv2d (groups 1) or matmul
that is still in main after `offload-quantized` (no backend, or one that refused it) would otherwise be compiled
as it reads: dequantize to float, float conv, quantize. It is matched by the offload patterns themselves
(`offload/quantized.py`, read back by `read_quantized`) and replaced by one TIR kernel:

  pack:  A[m, k] = x as a matrix (im2col for a conv, padding with the input's zero point; NHWC: k runs over each
         filter tap's channels, as x holds them), in the type the dot product takes (u8 for VNNI, s8 for Arm:
         x ^ 0x80 with the zero point moved by 128, exact; int16 for AVX2), the reduction padded to a multiple of the
         dot product's group G (4, or 2 for AVX2) with zeros (NHWC: each tap's channels)
  acc:   acc[m, n] = sum_k int32(A[m, k]) * int32(W[n, k])  (W packed [N/L, K/G, L, G], zero padded)
  out:   quantize(act(float32(acc + b') * sx * sw[n]), sy, zy)  (relax.quantize's own arithmetic: round(v / sy) + zy,
         clamped to the output type), where b' = b - zx * sum_k W[n, k] folds the input's zero point into the bias.

The sum is exact where the QDQ reference sums rounded float products; the requantization is the reference's. The
acc block is tensorized with the target's dot product: AVX-512 VNNI `vpdpbusd` (L = 16), Arm `sdot` (+dotprod,
L = 4), AVX2 `vpmaddwd` on 16-bit operands (L = 8, G = 2: the weights sign-extended as they load, params.bin keeps
them int8); elsewhere it is a vectorized int32 loop (L = 16). Rows (m) are tiled by up to 4; a parallel task takes
a run of tiles, packs each tile's rows of A once for all its blocks of output channels, sums a block in registers and
requantizes it right after. The kernel is marked scheduled (`tirx.is_scheduled`; `edgec.int8_kernel` names the
instruction used), so cpu-default-schedule leaves it alone.
A depthwise conv2d chain (NHWC) gets a kernel of its own, `_DepthwiseChain`: int32 vector loops across channels.
A chain the patterns or `_unsupported` refuse stays as it was, and so does one whose kernel TVM's schedule refuses:
the module's `edgec.int8_kernels` record (`--dump-ir`, the build summary) says which and why. `--offload auto` times
a backend's int8 chains against these kernels (`takes`, `replace_chains`).
"""
from __future__ import annotations

import json
import math
from collections import Counter

import numpy as np
import tvm
from tvm import relax, s_tir, te, tirx
from tvm.target.codegen import llvm_get_vector_width, target_has_features

from ..context import BuildContext
from ..errors import last_line
from ..offload.fusion import composite_function, recorded, static_shape
from ..offload.quantized import QFused, has_quantized_anchor, quantized_patterns, read_quantized, untie_dequantize
from .cpu_schedule import _MIN_PARALLEL_WORK, _SCHEDULED, parallel_tasks
from .dot_products import DOT_PRODUCTS, VECTOR_LOOP, intrinsic
from .ir import restore_clip
from .registry import register_pass

ATTR = "edgec.int8_kernel"        # the dot product the kernel's sums use: "vnni", "sdot", "avx2" or "vector"
# the module's record (JSON): the instruction, the chains taken, the kernels they share, "<op> <input shape>: why"
# for each chain left float as its kernel failed, and how many int8 chains the checks refused, by reason
RECORD_ATTR = "edgec.int8_kernels"
_GROUP = "edgec_int8"             # the patterns' prefix: the partitioned chains this pass replaces
_INT32_MAX = 2**31 - 1
_OPAQUE = 8                       # TVM's OpPatternKind kOpaque
_MIN_ROW_TILES = 8                # row tiles that keep the cores busy on their own (see _schedule)


def _dot_product(target: tvm.target.Target) -> tuple[str, int, int, str]:
    """(name, lanes, group, operand type of A) of the target's 8-bit dot product."""
    for kind, dot in DOT_PRODUCTS.items():
        if target_has_features(dot.feature, target):
            return kind, dot.lanes, dot.group, dot.a_dtype
    return "vector", 16, 4, "uint8"


def _row_tile(rows: int, direct: bool) -> int:
    """Rows summed together: 4, padded to whole tiles where A is packed; a matmul reading x itself: a divisor."""
    return next(t for t in (4, 2, 1) if rows % t == 0) if direct else min(rows, 4)


def _no_offload(ctx: BuildContext) -> bool:
    return ctx.on_cpu() and not ctx.offload


def _integer_convs(mod: tvm.IRModule) -> bool:
    """Whether main has an NCHW conv2d int8-kernels takes by shape (groups 1, or depthwise) on a dequantized int8
    weight."""
    bound = {b.var: b.value for block in mod["main"].body.blocks for b in block.bindings}

    def int8_weight(arg) -> bool:
        value = bound.get(arg, arg)
        return isinstance(value, relax.Call) and value.op == tvm.ir.Op.get("relax.dequantize") \
            and isinstance(value.args[0], tvm.ir.expr.GenericConst) and value.args[0].ty.dtype == "int8"

    return any(isinstance(v, relax.Call) and v.op == tvm.ir.Op.get("relax.nn.conv2d")
               and (int(v.attrs.groups) == 1 or _depthwise(v))
               and str(v.attrs.data_layout) == "NCHW" and int8_weight(v.args[1]) for v in bound.values())


# after quantize-int8 by name, whose QDQ form it takes
@register_pass("int8-layout", phase="graph", after=("canonicalize", "quantize-int8"), applies=_no_offload,
               skip_reason="needs --offload none and a CPU (llvm) target (with a backend, offload-quantized converts)")
def int8_layout(ctx: BuildContext) -> tvm.transform.Pass:
    """Put the graph in NHWC for int8-kernels when it has NCHW int8 convs and no backend converts it."""
    from ..offload.passes import channels_last     # here: importing edgec.offload imports this package

    # an NHWC im2col row is runs of channels, as x holds them: the pack is vector copies where NCHW gathers scalars
    convert = channels_last({"relax.nn.conv2d": ["NHWC", "OIHW"]})

    @tvm.transform.module_pass(opt_level=0, name="Int8Layout")
    def step(mod, pctx):
        return convert(mod) if _integer_convs(mod) else mod

    return step


# after offload-quantized by name: the chains a backend takes are partitioned first, this pass gets the rest
@register_pass("int8-kernels", phase="graph",
               after=("canonicalize", "quantize-int8", "int8-layout", "offload-quantized"),
               applies=BuildContext.on_cpu, skip_reason="CPU (llvm) targets only")
def int8_kernels(ctx: BuildContext) -> tvm.transform.Pass:
    """Run the int8 conv2d/matmul chains no backend takes as integer kernels (VNNI, sdot, AVX2, int32 vector loops)."""
    target = ctx.tvm_target()
    accepted, refused = set(), {}       # a run's anchors: taken, or why not (fusion.recorded)
    patterns = [recorded(p, accepted, refused)
                for anchor, op in (("conv2d", "relax.nn.conv2d"), ("matmul", "relax.matmul"))
                for p in quantized_patterns(_GROUP, anchor, op, _unsupported, float_out=_float_out(target))]
    partition = tvm.transform.Sequential([
        # the offload steps' graph preparation: Clip as R.clip, a dequantize per reader
        restore_clip, relax.transform.CanonicalizeBindings(), untie_dequantize,
        relax.transform.FuseOpsByPattern(patterns, bind_constants=False, annotate_codegen=True)])

    @tvm.transform.module_pass(opt_level=0, name="Int8Kernels")
    def step(mod, pctx):
        if not has_quantized_anchor(mod):
            return mod
        accepted.clear()
        refused.clear()
        partitioned = partition(mod)
        groups = [gv for gv, f in partitioned.functions_items() if (f.attrs or {}).get("Codegen") == _GROUP]
        replace = _Replace(partitioned, target, set(groups))
        if groups:
            replaced = replace.run()
            if replace.taken:   # else every kernel failed: the graph stays as it was, preparation undone
                for gv in groups:
                    del replaced[gv]
                mod = relax.transform.DeadCodeElimination()(replaced)
        # else nothing taken: the graph stays as it was, preparation undone
        kind = _dot_product(target)[0]
        kernels = sum(1 for f in mod.functions.values() if isinstance(f, tirx.PrimFunc) and ATTR in (f.attrs or {}))
        record = {"instruction": DOT_PRODUCTS[kind].instruction if kind in DOT_PRODUCTS else VECTOR_LOOP,
                  "layers": replace.taken, "depthwise": replace.depthwise, "kernels": kernels, "left": replace.left,
                  "refused": Counter(why for name, why in refused.items() if name not in accepted)}
        return mod.with_attr(RECORD_ATTR, json.dumps(record)) if groups or record["refused"] else mod

    return step


def takes(func: relax.Function, target: tvm.target.Target) -> bool:
    """Whether a backend's partitioned int8 chain has an integer kernel for `target`: one int8-kernels' own patterns
    match (no residual add or longer tail fused in; a float32 output where `_float_out`), its anchor one the kernels
    take."""
    q = read_quantized(func)
    return q.sum is None and not q.tail and (not q.float_out or _float_out(target)) and _unsupported(q.anchor) is None


def _float_out(target: tvm.target.Target) -> bool:
    """Whether the kernels take chains without their quantize (float32 output): where the target has a dot product.
    Without one (a Cortex-A72) XNNPACK's float convolution is left those chains, as it was."""
    return _dot_product(target)[0] in DOT_PRODUCTS


def replace_chains(mod: tvm.IRModule, target: tvm.target.Target, symbols: set[str]) -> tvm.IRModule:
    """Each call of the partitioned int8 chains named `symbols` (a backend's; `takes` them) as call_tir of its
    integer kernel, as int8-kernels does with its own (a chain whose kernel TVM's schedule refuses: its float QDQ
    operators); the partitioned functions dropped. For --offload auto: its TVM side of an int8 chain."""
    replace = _Replace(mod, target, {gv for gv in mod.get_global_vars() if gv.name_hint in symbols})
    replaced = replace.run()
    for name in symbols:
        del replaced[replaced.get_global_var(name)]
    return relax.transform.DeadCodeElimination()(replaced)


def _unsupported(anchor: relax.Call) -> str | None:
    """Why the integer kernel does not take this conv2d/matmul (None: it does)."""
    if str(anchor.ty.dtype) != "float32":
        return f"computed in {anchor.ty.dtype}"
    if any(static_shape(a) is None for a in (anchor, *anchor.args)):
        return "dynamic shape"
    if anchor.op.name == "relax.nn.conv2d":
        a = anchor.attrs
        if str(a.data_layout) not in ("NCHW", "NHWC") or str(a.out_layout or a.data_layout) != str(a.data_layout) \
                or sorted(str(a.kernel_layout)) != sorted("OIHW"):
            return f"layout {a.data_layout}/{a.kernel_layout}"
        if int(a.groups) != 1 and not _depthwise(anchor):
            return "grouped convolution"
        if _depthwise(anchor) and str(a.data_layout) != "NHWC":
            return "depthwise convolution in NCHW"      # int8-layout puts it in NHWC; disabled, it stays float
        k = math.prod(static_shape(anchor.args[1])[1:])
    else:
        if len(static_shape(anchor.args[1])) != 2 or len(static_shape(anchor.args[0])) < 2:
            return "not a matrix product with a 2-D weight"
        k = static_shape(anchor.args[0])[-1]
    if 255 * 128 * k > _INT32_MAX // 2:
        return "reduction too long for an int32 sum"
    return None


def _accumulators(target: tvm.target.Target) -> int:
    """int32 sums a depthwise tile keeps in registers: half of the target's vector registers (AVX-512: 16 of 32 zmm,
    256 sums; AVX2: 8 of 16 ymm, 64; AArch64 NEON: 16 of 32, 64). On the Zen 4, MobileNetV2's 17 depthwise convs
    alone: 0.50 ms with 64, 0.47 with 128, 0.45 with 256."""
    registers = 32 if target_has_features("avx512f", target) or "aarch64" in str(target.attrs.get("mtriple", "")) \
        else 16
    return llvm_get_vector_width(target) // 32 * registers // 2


def _depthwise(conv: relax.Call) -> bool:
    """Whether each output channel of the conv2d reads one input channel (groups = input channels)."""
    groups, shape = int(conv.attrs.groups), static_shape(conv.args[0])
    return groups > 1 and shape is not None and groups == shape[str(conv.attrs.data_layout).index("C")]


def _value(expr) -> np.ndarray:
    return expr.value.numpy()


def _requantize(total, n, bias: te.Tensor, scale: te.Tensor, quantization: te.Tensor, out_dtype: str):
    """Output channel n's int32 sum `total` as the chain's output: float32(total + b') * sx * sw[n], the activation's
    clamp, then relax.quantize's own arithmetic (its legalization: clip(round(v / sy) + zy, min, max), cast); a
    float32 output (a `..._f32` chain) is the clamped value."""
    v = (total + bias[n]).astype("float32") * scale[n]
    v = tirx.max(tirx.min(v, quantization[4]), quantization[3])
    if out_dtype == "float32":
        return v
    v = te.round(v / quantization[1]) + quantization[2]
    info = np.iinfo(out_dtype)
    lo, hi = (tirx.const(float(b), "float32") for b in (info.min, info.max))
    return tirx.max(tirx.min(v, hi), lo).astype(out_dtype)


@relax.expr_functor.mutator
class _Replace(relax.PyExprMutator):
    """Each call of a partitioned chain in `chains` becomes call_tir of its integer kernel."""

    def __init__(self, mod: tvm.IRModule, target: tvm.target.Target, chains: set[tvm.ir.GlobalVar]):
        super().__init__(mod)
        self.mod_ = mod
        self.target = target
        self.chains = chains
        self.left: list[str] = []       # "<op> <input shape>: why" for each chain whose kernel failed
        self.taken = 0                  # chains replaced by their kernel
        self.depthwise = 0              # of which depthwise convs

    def run(self) -> tvm.IRModule:
        for gv, func in self.mod_.functions_items():
            if isinstance(func, relax.Function) and "Codegen" not in (func.attrs or {}):
                self.builder_.update_func(gv, self.visit_expr(func))
        return self.builder_.finalize()

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not isinstance(call.op, tvm.ir.GlobalVar) or call.op not in self.chains:
            return call
        func = self.mod_[call.op]
        q = read_quantized(func)
        depthwise = q.anchor.op.name == "relax.nn.conv2d" and _depthwise(q.anchor)
        chain = (_DepthwiseChain if depthwise else _IntegerChain)(q, call.args, self.target)
        constants = chain.constants()
        try:
            kernel = chain.kernel(constants[0].shape)
        except Exception as e:  # TVM's schedule primitives raise ScheduleError, TVMError and plain Python errors
            self.left.append(f"{chain.q.anchor.op.name.rsplit('.', 1)[-1]} {'x'.join(map(str, chain.x_shape))}: "
                             f"{last_line(e)}")
            return self._float_chain(func, call.args)
        self.taken += 1
        self.depthwise += depthwise
        return chain.emit(self.builder_, kernel, constants)

    def _float_chain(self, func: relax.Function, args) -> relax.Expr:
        """The chain as it was before the partition: its composite function's bindings, in place of the call."""
        inner = composite_function(func)
        body = inner.bind_params(dict(zip(inner.params, args))).body
        for block in body.blocks:
            for binding in block.bindings:
                self.set_var_remap(binding.var, self.builder_.emit(self.visit_expr(binding.value)))
        return self.visit_expr(body.body)


class _IntegerChain:
    """One chain's integer kernel: its packed constants, TIR and the Relax calls around it."""

    def __init__(self, q: QFused, args, target: tvm.target.Target):
        self.q, self.args, self.target = q, args, target
        self.x_shape, self.x_dtype = static_shape(args[q.data]), q.data_dtype
        self.out_shape = static_shape(q.anchor)
        self.kind, self.lanes, self.group, self.a_dtype = self._sums(target)
        # the input's zero point where A holds it shifted to the other 8-bit type (x ^ 0x80 is x -/+ 128)
        self.shift = {("int8", "uint8"): 128, ("uint8", "int8"): -128}.get((self.x_dtype, self.a_dtype), 0)
        self.zx = int(_value(args[q.data_zero_point])) + self.shift
        self.sx = np.float32(_value(args[q.data_scale]).reshape(()))
        # a float32 output has none: its quantization operand holds 1 and 0, unread
        self.sy = 1.0 if q.float_out else float(_value(args[q.out_scale]).reshape(()))
        self.zy = 0 if q.float_out else int(_value(args[q.out_zero_point]))
        self.weight = self._weight_matrix()                      # (N, K) int8
        self.n, self.k = self.weight.shape

    def _sums(self, target: tvm.target.Target) -> tuple[str, int, int, str]:
        """(kind, lanes, group, A's type) of the kernel's sums: the target's dot product."""
        return _dot_product(target)

    def _weight_matrix(self) -> np.ndarray:
        w = _value(self.args[self.q.weight])
        if self.q.anchor.op.name == "relax.matmul":
            return w if self.q.weight_transposed else w.T
        # NHWC: k = (kh * KW + kw) * Cg + c, so that an im2col row is runs of channels, as x holds them, each padded
        # with zero weights to Cg, a multiple of the dot product's group (3 RGB channels: 4); NCHW: k = (c * KH + kh)
        # * KW + kw
        order = "OHWI" if self._channels_last() else "OIHW"
        w = w.transpose([str(self.q.anchor.attrs.kernel_layout).index(c) for c in order])
        if self._channels_last():
            w = np.pad(w, [(0, 0)] * 3 + [(0, self._tap_channels() - w.shape[3])])
        return w.reshape(w.shape[0], -1)

    def _tap_channels(self) -> int:
        """Cg: an NHWC conv's input channels padded to a multiple of the dot product's group."""
        return -(-self.x_shape[3] // self.group) * self.group

    def _channels_last(self) -> bool:
        return self.q.anchor.op.name == "relax.nn.conv2d" and str(self.q.anchor.attrs.data_layout) == "NHWC"

    def constants(self) -> tuple[np.ndarray, ...]:
        """Packed weights [Np/L, Kp/G, L, G], bias with the input's zero point folded in, per-channel scale, and
        [zx, sy, zy, lo, hi]: the input's zero point (as A holds it), the output's scale and zero point, and the
        activation's clamp, operands rather than constants in the code so that the layers of one shape share it."""
        n = self.n
        bias = np.zeros(n, np.int64) if self.q.bias is None else _value(self.args[self.q.bias]).reshape(-1)
        bias = bias.astype(np.int64) - self.zx * self.weight.astype(np.int64).sum(axis=1)
        sw = np.broadcast_to(_value(self.args[self.q.weight_scale]).astype(np.float32).reshape(-1), (n,))
        lo, hi = {"relu": (0.0, np.inf), "clip": self.q.bounds}.get(self.q.activation, (-np.inf, np.inf))
        quantization = np.array([self.zx, self.sy, self.zy, lo, hi], np.float32)
        return self._packed(), bias.astype(np.int32), (self.sx * sw).astype(np.float32), quantization

    def _packed(self) -> np.ndarray:
        lanes, group, n, k = self.lanes, self.group, self.n, self.k
        kp, np_ = -(-k // group) * group, self._n_blocks() * lanes
        padded = np.zeros((np_, kp), np.int8)
        padded[:n, :k] = self.weight
        return np.ascontiguousarray(padded.reshape(np_ // lanes, lanes, kp // group, group).transpose(0, 2, 1, 3))

    def _n_blocks(self) -> int:
        """Blocks of `lanes` output channels (the packed weights' first axis)."""
        return -(-self.n // self.lanes)

    def _rows(self) -> tuple[int, tvm.ir.Op | None]:
        if self.q.anchor.op.name == "relax.matmul":
            return math.prod(self.out_shape[:-1]), None
        layout = str(self.q.anchor.attrs.data_layout)
        b, oh, ow = (self.out_shape[layout.index(c)] for c in "NHW")
        return b * oh * ow, layout

    def kernel(self, packed_shape) -> tirx.PrimFunc:
        """The scheduled kernel for weights packed in `packed_shape`; raises what TVM's schedule raises."""
        rows, layout = self._rows()
        direct = len(self.x_shape) == 2 and self.k % self.group == 0 and self.x_dtype == self.a_dtype \
            and layout is None
        return self._prim_func(rows, packed_shape, direct)

    def _call(self, bb: relax.BlockBuilder, func: tirx.PrimFunc, name: str, constants, shape) -> relax.Expr:
        gv = bb.add_func(func, name)        # an equal kernel: the same gv
        return bb.emit(relax.call_tir(gv, [self.args[self.q.data], *(relax.const(c) for c in constants)],
                                      relax.TensorType(shape, self.q.out_dtype)))

    def emit(self, bb: relax.BlockBuilder, func: tirx.PrimFunc, constants) -> relax.Expr:
        rows, layout = self._rows()
        out = self._call(bb, func, f"int8_{self.q.anchor.op.name.rsplit('.', 1)[-1]}", constants, (rows, self.n))
        if layout is None:
            return relax.op.reshape(out, self.out_shape)
        nhwc = [self.out_shape[layout.index(c)] for c in "NHWC"]
        out = bb.emit(relax.op.reshape(out, nhwc))
        return out if layout == "NHWC" else relax.op.permute_dims(out, [0, 3, 1, 2])

    def _filter(self) -> tuple[int, int]:
        """A conv's filter height and width."""
        shape, layout = static_shape(self.args[self.q.weight]), str(self.q.anchor.attrs.kernel_layout)
        return shape[layout.index("H")], shape[layout.index("W")]

    def _tap(self, oh, ow, kh, kw):
        """(ih, iw, inside): the input row and column filter tap (kh, kw) of output (oh, ow) reads, and whether
        that is inside x (else the padding: the input's zero point)."""
        a = self.q.anchor.attrs
        layout = str(a.data_layout)
        h_in, w_in = (self.x_shape[layout.index(c)] for c in "HW")
        ih = oh * int(a.strides[0]) + kh * int(a.dilation[0]) - int(a.padding[0])
        iw = ow * int(a.strides[1]) + kw * int(a.dilation[1]) - int(a.padding[1])
        return ih, iw, tirx.all(ih >= 0, ih < h_in, iw >= 0, iw < w_in)

    def _operands(self, packed_shape) -> list[te.Tensor]:
        """The kernel's inputs: x, then constants()' four."""
        return [te.placeholder(self.x_shape, self.x_dtype, name="x"), te.placeholder(packed_shape, "int8", name="w"),
                te.placeholder((self.n,), "int32", name="bias"), te.placeholder((self.n,), "float32", name="scale"),
                te.placeholder((5,), "float32", name="quantization")]

    def _a_value(self, x: te.Tensor, zx, m, k):
        """x's element at row m, column k of the matrix (im2col for a conv), in a_dtype, as a TE expression."""
        q = self.q
        if q.anchor.op.name == "relax.matmul":
            idx, rest = [], m
            for d in reversed(self.out_shape[:-1]):
                idx.insert(0, rest % d)
                rest = rest // d
            value, inside = x[(*idx, k)], None
        else:
            layout = str(q.anchor.attrs.data_layout)
            kh_n, kw_n = self._filter()
            oh_n, ow_n = (self.out_shape[layout.index(c)] for c in "HW")
            h_in, w_in = (self.x_shape[layout.index(c)] for c in "HW")
            b, oh, ow = m // (oh_n * ow_n), m // ow_n % oh_n, m % ow_n
            if self._channels_last():
                c_n = self._tap_channels()
                kh, kw, c = k // (kw_n * c_n), k // c_n % kw_n, k % c_n
            else:
                c, kh, kw = k // (kh_n * kw_n), k // kw_n % kh_n, k % kw_n
            ih, iw, inside = self._tap(oh, ow, kh, kw)
            value = x[tuple({"N": b, "C": c, "H": ih, "W": iw}[d] for d in layout)]
            if self._channels_last() and self._tap_channels() != self.x_shape[3]:
                # A padding channel (weight 0: any value) reads the next pixel's first channels, one vector load
                # per tap; past the last pixel that is past x's end, so there they read its last channel instead.
                last = tirx.all(b == self.x_shape[0] - 1, ih == h_in - 1, iw == w_in - 1)
                value = tirx.if_then_else(last, x[b, ih, iw, tirx.min(c, self.x_shape[3] - 1)], value)
        value = (value.astype("int32") + self.shift).astype(self.a_dtype) if self.shift else value.astype(self.a_dtype)
        # if_then_else, not Select: Select computes both sides, so x would be read outside its buffer (TVM's
        # simplifier drops index clamps inside a Select's true side, taking its condition as known)
        if inside is not None:
            value = tirx.if_then_else(inside, value, zx.astype(self.a_dtype))
        return tirx.if_then_else(k < self.k, value, tirx.const(0, self.a_dtype))

    def _prim_func(self, rows: int, packed_shape, direct: bool) -> tirx.PrimFunc:
        q, lanes = self.q, self.lanes
        kp = packed_shape[1] * self.group
        operands = x, w, bias, scale, quantization = self._operands(packed_shape)
        # rows padded to whole tiles: the padding rows pack the last row again, and no output is written from them
        tile = _row_tile(rows, direct)
        padded = -(-rows // tile) * tile
        a = x if direct else te.compute(
            (padded, kp), lambda m, k: self._a_value(x, quantization[0], tirx.min(m, rows - 1), k), name="pack")
        r = te.reduce_axis((0, kp), name="r")
        acc = te.compute(
            (padded, packed_shape[0] * lanes),
            lambda m, n: te.sum(a[m, r].astype("int32")
                                * w[n // lanes, r // self.group, n % lanes, r % self.group].astype("int32"), axis=r),
            name="acc")

        out = te.compute((rows, self.n), lambda m, n: _requantize(acc[m, n], n, bias, scale, quantization,
                                                                  q.out_dtype), name="out")
        return self._finished(self._schedule(te.create_prim_func([*operands, out]), rows, direct))

    def _finished(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        """The scheduled kernel, unnamed (add_func names it), marked scheduled and never fused: FuseTIR would put
        unscheduled loops of its neighbours in it (and trips on its buffers' int32 shapes)."""
        return func.without_attr("global_symbol").with_attr({_SCHEDULED: True, ATTR: self.kind,
                                                             "op_pattern": _OPAQUE})

    def _schedule(self, func: tirx.PrimFunc, rows: int, direct: bool) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        tile = _row_tile(rows, direct)
        acc = sch.get_sblock("acc")
        m, n, k = sch.get_loops(acc)
        mo, mi = sch.split(m, [None, tile])
        no, ni = sch.split(n, [None, self.lanes])
        ko, ki = sch.split(k, [None, self.group])
        tensorized = self.kind in DOT_PRODUCTS
        # The intrinsic takes the lanes x group block, for up to 3 blocks of output channels at once: each A broadcast
        # serves every block, each block of weights every row of the tile. Up to 8 vectors of sums: with 12 (of
        # AVX2's 16 registers) a 14x14x96 -> 576 1x1 conv took 0.137 ms, with 8 0.103, with 4 (one block) 0.121.
        # The vector loop takes a vector of outputs per weight column.
        blocks = next((b for b in (3, 2) if self._n_blocks() % b == 0 and tile * b <= 8), 1) if tensorized else 1
        no, nb = sch.split(no, [None, blocks])
        sch.reorder(*(mo, no, ko, mi, nb, ni, ki) if tensorized else (mo, no, ko, mi, nb, ki, ni))
        # Parallel tiles of rows, each packing its own rows of A while they fit in cache, once for all its blocks of
        # output channels; with few rows (a matmul's), parallel blocks of outputs instead, each packing its rows.
        # A task runs a run of row tiles: a buffer allocated in a parallel loop's body is a workspace call each
        # iteration (TVMBackendAllocWorkspace), which took half of a 1x1 conv's time allocated per tile.
        # Tasks divide the tiles evenly (a guard on a ragged last task would keep tensorize from matching).
        tiles = -(-rows // tile)
        by_rows = tiles >= _MIN_ROW_TILES
        if by_rows:
            tasks = max(d for d in range(1, min(parallel_tasks(self.target), tiles) + 1) if tiles % d == 0)
            task, outer = sch.split(mo, [tasks, None]) if tasks > 1 else (mo, mo)
        else:
            task = outer = sch.fuse(mo, no)
        if rows * self.n * self.k >= _MIN_PARALLEL_WORK:
            sch.parallel(task)
        if not direct:
            pack = sch.get_sblock("pack")
            sch.compute_at(pack, outer)
            self._vectorize_pack(sch, pack)
        out = sch.get_sblock("out")
        sch.reverse_compute_at(out, no if by_rows else outer)
        sch.vectorize(sch.get_loops(out)[-1])      # the requantization, a block's lanes at a time
        if not tensorized:
            sch.vectorize(ni)
        init = sch.decompose_reduction(acc, ko)
        if tensorized:
            sch.tensorize(ni, intrinsic(self.kind))
        # a tile's sums stay in registers across the reduction (after tensorize: its intrinsics' C is global memory)
        sch.set_scope(init, 0, "local")
        return sch.mod["main"]

    def _vectorize_pack(self, sch: s_tir.Schedule, pack) -> None:
        """A's columns as vectors where x holds them contiguously: a matmul's row, an NHWC conv's runs of
        channels (one per filter tap, split by tap so that each vector's tap, and so its padding check, is known
        outside it); an NCHW conv's im2col stays a scalar loop. Vectors of a power-of-two width up to 64: a tap's
        96 channels as one 96-byte vector became 96 byte inserts (PP-OCRv4 det's 96 -> 24 3x3 conv at 80x80:
        1.37 ms, 0.43 as 3 vectors of 32)."""
        columns = sch.get_loops(pack)[-1]
        if self.q.anchor.op.name == "relax.matmul":
            run = sch.get(columns).extent.value
        elif self._channels_last():
            run = self._tap_channels()
            columns = sch.split(columns, [None, self._filter()[1], run])[-1]
        else:
            return
        lanes = next(v for v in (64, 32, 16, 8, 4, 2, 1) if run % v == 0)
        sch.vectorize(sch.split(columns, [None, lanes])[-1])


class _DepthwiseChain(_IntegerChain):
    """A depthwise conv's integer kernel (NHWC): each output channel sums its KH x KW taps of one input channel.

    No dot product serves it (a channel's taps are not contiguous in x), so the sums are int32 vector loops across
    channels: a vector of channels of a few neighbouring outputs stays in registers over the taps, each tap's weights
    loaded once for those outputs, and is requantized right after. Padding reads the input's zero point, folded into
    the bias as for the other kernels; x is read as it is (no shifted copy)."""

    def _sums(self, target: tvm.target.Target) -> tuple[str, int, int, str]:
        channels = self.out_shape[3]
        return "vector", next(n for n in (16, 8, 4, 2, 1) if channels % n == 0), 1, self.x_dtype

    def _weight_matrix(self) -> np.ndarray:
        w = _value(self.args[self.q.weight])
        w = w.transpose([str(self.q.anchor.attrs.kernel_layout).index(c) for c in "OHWI"])
        return w.reshape(w.shape[0], -1)        # (N, KH * KW): one input channel per output channel

    def _packed(self) -> np.ndarray:
        return np.ascontiguousarray(self.weight.T)      # [tap, channel]: a tap's weights for a vector of channels

    def kernel(self, packed_shape) -> tirx.PrimFunc:
        kh_n, kw_n = self._filter()
        multiplier = self.n // self.x_shape[3]
        operands = x, w, bias, scale, quantization = self._operands(packed_shape)
        kh, kw = te.reduce_axis((0, kh_n), name="kh"), te.reduce_axis((0, kw_n), name="kw")

        def tap(b, oh, ow, c):
            ih, iw, inside = self._tap(oh, ow, kh, kw)
            # if_then_else: x is not read at the padding (see _IntegerChain._a_value)
            return tirx.if_then_else(inside, x[b, ih, iw, c // multiplier],
                                     quantization[0].astype(self.x_dtype)).astype("int32")

        acc = te.compute(self.out_shape, lambda b, oh, ow, c: te.sum(
            tap(b, oh, ow, c) * w[kh * kw_n + kw, c].astype("int32"), axis=[kh, kw]), name="acc")
        out = te.compute(self.out_shape, lambda b, oh, ow, c: _requantize(
            acc[b, oh, ow, c], c, bias, scale, quantization, self.q.out_dtype), name="out")
        return self._finished(self._schedule(te.create_prim_func([*operands, out])))

    def _schedule(self, func: tirx.PrimFunc) -> tirx.PrimFunc:
        sch = s_tir.Schedule(func)
        acc = sch.get_sblock("acc")
        b, oh, ow, c, kh, kw = sch.get_loops(acc)
        width = self.out_shape[2]
        tile = max(t for t in range(1, max(_accumulators(self.target) // self.lanes, 1) + 1) if width % t == 0)
        owo, owi = sch.split(ow, [None, tile])
        co, ci = sch.split(c, [None, self.lanes])
        rows = sch.fuse(b, oh)
        sch.reorder(rows, owo, co, kh, kw, owi, ci)
        for loop in (kh, kw, owi):      # the taps' index arithmetic and padding checks become constants
            sch.unroll(loop)
        if math.prod(self.out_shape) * self.k >= _MIN_PARALLEL_WORK:
            sch.parallel(rows)
        out = sch.get_sblock("out")
        sch.reverse_compute_at(out, co)
        sch.vectorize(sch.get_loops(out)[-1])
        sch.vectorize(ci)       # before the init is split off, which takes the vector loop along
        init = sch.decompose_reduction(acc, kh)
        sch.set_scope(init, 0, "local")
        return sch.mod["main"]

    def emit(self, bb: relax.BlockBuilder, func: tirx.PrimFunc, constants) -> relax.Expr:
        return self._call(bb, func, "int8_depthwise_conv2d", constants, self.out_shape)
