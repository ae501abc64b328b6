"""dequantize-per-use and mean-takes-producers: an 8-bit tensor several ops read is dequantized inside each
reader's kernel (a mean's too) instead of stored as float32 between kernels, to the same bits."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from edgec.passes.dequantize import _dequantize_per_use, _mean_takes_producers


@tvm.script.ir_module
class Shared:
    @R.function
    def main(x: R.Tensor((1, 8, 8, 16), "uint8"), gate: R.Tensor((1, 1, 1, 16), "float32")):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.25, "float32"), R.const(113, "uint8"), axis=-1, out_dtype="float32")
            pooled = R.mean(d, axis=[1, 2], keepdims=True)
            doubled = R.add(d, d)
            gated = R.multiply(doubled, gate)
            up = R.image.resize2d(d, R.shape([16, 16]), layout="NHWC", method="nearest_neighbor")
            q = R.quantize(gated, R.const(0.5, "float32"), R.const(100, "uint8"), axis=-1, out_dtype="uint8")
            R.output(pooled, q, up)
        return (pooled, q, up)


def _dequantizes(mod) -> list[relax.Call]:
    found = []
    relax.analysis.post_order_visit(mod["main"], lambda e: found.append(e) if isinstance(e, relax.Call) and getattr(
        e.op, "name", "") == "relax.dequantize" else None)
    return found


def _fused(mod) -> tvm.IRModule:
    """Legalized and fused as edgec's legalize phase does, with mean-takes-producers after the pattern analysis."""
    mod = relax.transform.AnnotateTIROpPattern()(relax.transform.LegalizeOps()(mod))
    return relax.transform.FuseTIR()(relax.transform.FuseOps()(_mean_takes_producers(mod)))


def _kernels(mod) -> list[str]:
    return sorted(gv.name_hint for gv, f in _fused(mod).functions_items() if isinstance(f, tvm.tirx.PrimFunc))


def test_each_reader_gets_its_own_dequantize_and_the_mean_reads_eight_bits():
    mod = _dequantize_per_use(Shared)
    # the mean and the add (one copy for both of its operands) read copies; the upsampling resize, whose kernel
    # takes no producer, keeps the original
    assert len(_dequantizes(Shared)) == 1 and len(_dequantizes(mod)) == 3
    kernels = _kernels(mod)
    assert "fused_dequantize_mean" in kernels and not [k for k in kernels if k.startswith("dequantize")], kernels
    assert "dequantize" in _kernels(Shared)    # before: a kernel storing the float32 tensor


def test_outputs_are_the_same_bits():
    rng = np.random.default_rng(0)
    inputs = [tvm.runtime.tensor(rng.integers(0, 256, (1, 8, 8, 16), dtype=np.uint8)),
              tvm.runtime.tensor(rng.random((1, 1, 1, 16), dtype=np.float32))]
    outs = []
    for mod in (Shared, _fused(_dequantize_per_use(Shared))):
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        outs.append([o.numpy() for o in vm["main"](*inputs)])
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a.view(np.uint8), b.view(np.uint8))


@tvm.script.ir_module
class Moves:
    @R.function
    def main(x: R.Tensor((1, 5, 7, 16), "uint8")):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.37, "float32"), R.const(113, "uint8"), axis=-1, out_dtype="float32")
            up = R.image.resize2d(d, R.shape([10, 14]), layout="NHWC", method="nearest_neighbor",
                                  coordinate_transformation_mode="asymmetric", rounding_method="floor")
            q_up = R.quantize(up, R.const(0.37, "float32"), R.const(113, "uint8"), axis=-1, out_dtype="uint8")
            t = R.permute_dims(d, [0, 3, 1, 2])
            q_t = R.quantize(t, R.const(0.37, "float32"), R.const(113, "uint8"), axis=-1, out_dtype="uint8")
            smooth = R.image.resize2d(d, R.shape([10, 14]), layout="NHWC", method="linear")
            q_smooth = R.quantize(smooth, R.const(0.37, "float32"), R.const(113, "uint8"), axis=-1, out_dtype="uint8")
            other = R.quantize(t, R.const(0.5, "float32"), R.const(113, "uint8"), axis=-1, out_dtype="uint8")
            R.output(q_up, q_t, q_smooth, other)
        return (q_up, q_t, q_smooth, other)


def test_requantized_moves_run_on_the_eight_bit_codes():
    """quantize(move(dequantize(x))) with one scale and zero point is move(x), for a nearest resize and a
    transpose, every code the same; a linear resize (which computes) and another scale keep the float path."""
    from edgec.passes.dequantize import _requantize_moves_apart

    mod = _requantize_moves_apart(Moves)
    ops = []
    relax.analysis.post_order_visit(mod["main"], lambda e: ops.append((e.op.name, str(e.ty.dtype), str(
        e.args[0].ty.dtype))) if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) else None)
    assert ("relax.image.resize2d", "uint8", "uint8") in ops and ("relax.permute_dims", "uint8", "uint8") in ops
    assert ("relax.image.resize2d", "float32", "float32") in ops            # the linear one
    assert ops.count(("relax.quantize", "uint8", "float32")) == 2           # the linear resize's, the other scale's
    x = tvm.runtime.tensor(np.arange(1 * 5 * 7 * 16, dtype=np.int64).reshape(1, 5, 7, 16).astype(np.uint8))
    outs = [[o.numpy() for o in relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())["main"](x)]
            for m in (Moves, mod)]
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)
