"""int8-lookup-tables on hand-written Relax: the tables are constants computed at build time; a chain does not
continue across binding blocks."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import relax as R

from edgec.passes.lookup import _lookup_tables


def _hardswish(dtype: str) -> tvm.IRModule:
    """main(x) = quantize(hardswish(dequantize(x))), x and the result of `dtype`."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 8), dtype))
    zero = relax.const(0, dtype)
    with bb.function("main", [x]):
        with bb.dataflow():
            d = bb.emit(relax.op.dequantize(x, relax.const(0.1, "float32"), zero, axis=-1, out_dtype="float32"))
            a = bb.emit(relax.op.clip(relax.op.add(d, relax.const(3.0, "float32")), 0, 6))
            h = bb.emit(relax.op.divide(relax.op.multiply(d, a), relax.const(6.0, "float32")))
            y = bb.emit_output(relax.op.quantize(h, relax.const(0.05, "float32"), zero, axis=-1, out_dtype=dtype))
        bb.emit_func_output(y)
    return bb.get()


@tvm.script.ir_module
class ChainIntoBranches:
    @R.function
    def main(x: R.Tensor((1, 8), "int8"), c: R.Tensor((), "bool")) -> R.Tensor((1, 8), "int8"):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            a = R.add(d, R.const(3.0, "float32"))
            q = R.quantize(a, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            R.output(q)
        if c:
            d1 = R.dequantize(q, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            m1 = R.multiply(d1, R.const(2.0, "float32"))
            y = R.quantize(m1, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
        else:
            d2 = R.dequantize(q, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            m2 = R.divide(d2, R.const(6.0, "float32"))
            y = R.quantize(m2, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
        return y


def _outputs(mod, *args, dtype="int8") -> np.ndarray:
    """main's outputs for each of the 256 values of x (8 at a time)."""
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    values = np.arange(-128, 128) if dtype == "int8" else np.arange(256)
    return np.stack([vm["main"](tvm.runtime.tensor(row), *map(tvm.runtime.tensor, args)).numpy()
                     for row in values.astype(dtype).reshape(32, 1, 8)])


def _bindings(func: relax.Function) -> list[relax.Binding]:
    return [b for block in func.body.blocks for b in block.bindings]


@pytest.mark.parametrize("dtype", ["int8", "uint8"])
def test_the_table_is_a_constant_made_at_build_time(dtype):
    """main is one lookup in a 256-entry constant, entry i the chain's value for the i-th value of x; every binding
    of main depends on x (no table computed at run time, nothing for compute-at-load); a uint8 x is the index itself
    (int8 is cast and offset by 128); the outputs are the chain's."""
    plain = _hardswish(dtype)
    mod = _lookup_tables(plain)
    relax.analysis.well_formed(mod)
    bindings = _bindings(mod["main"])
    assert all(relax.analysis.free_vars(b.value) for b in bindings), mod
    lookups = [b.value for b in bindings if getattr(b.value.op, "name", None) == "relax.take"]
    assert len(lookups) == 1 and isinstance(lookups[0].args[0], tvm.ir.expr.GenericConst), mod
    assert (len(bindings), lookups[0].args[1].same_as(mod["main"].params[0])) == \
        ((3, False) if dtype == "int8" else (1, True)), mod
    expected = _outputs(plain, dtype=dtype).reshape(256)
    np.testing.assert_array_equal(lookups[0].args[0].value.numpy(), expected)
    np.testing.assert_array_equal(_outputs(mod, dtype=dtype).reshape(256), expected)


def test_a_chain_continued_in_an_if_branch_starts_there_again():
    """q's chain (from the dataflow block) is not extended inside the branches: its table var is the block's own."""
    mod = _lookup_tables(ChainIntoBranches)
    relax.analysis.well_formed(mod)    # raises where a var is used outside its block
    assert mod.script().count("R.take(") == 3, mod    # the block's chain and each branch's
    # the then branch only: TVM's VM crashes (StorageObj::AllocTensor) running this well-formed module's else branch
    np.testing.assert_array_equal(_outputs(mod, np.array(True)), _outputs(ChainIntoBranches, np.array(True)))


def _batch_norm_chain(dtype: str, layout: str) -> tvm.IRModule:
    """A batch norm between a per-channel dequantize and a per-tensor quantize (PP-OCRv4 det's head after its
    deconvolution): every op's other operand a constant along the channel axis, in NHWC or NCHW."""
    channels = 5
    shape = (1, 4, 6, channels) if layout == "NHWC" else (1, channels, 4, 6)
    axis = 3 if layout == "NHWC" else 1
    along = [channels if d == axis else 1 for d in range(4)]
    rng = np.random.default_rng(3)

    def per_channel(low, high):
        return relax.const(rng.uniform(low, high, along).astype(np.float32))

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, dtype))
    low = -128 if dtype == "int8" else 0
    with bb.function("main", [x]):
        with bb.dataflow():
            d = bb.emit(relax.op.dequantize(x, relax.const(rng.uniform(0.01, 0.1, channels).astype(np.float32)),
                                            relax.const(np.full(channels, low + 7).astype(dtype)), axis=axis,
                                            out_dtype="float32"))
            n = bb.emit(relax.op.divide(relax.op.subtract(d, per_channel(-1, 1)), per_channel(0.5, 2)))
            b = bb.emit(relax.op.add(relax.op.multiply(n, per_channel(0.5, 2)), per_channel(-1, 1)))
            y = bb.emit_output(relax.op.quantize(b, relax.const(0.03, "float32"), relax.const(low + 100, dtype),
                                                 axis=axis, out_dtype=dtype))
        bb.emit_func_output(y)
    return bb.get()


@pytest.mark.parametrize("dtype, layout", [("uint8", "NHWC"), ("int8", "NCHW")])
def test_chain_with_per_channel_constants_is_a_table_per_channel(dtype, layout):
    """A chain whose constants vary along one channel axis is a lookup in 256 entries per channel, made at build
    time; every code of every channel gives the chain's value."""
    mod = _batch_norm_chain(dtype, layout)
    looked = _lookup_tables(mod)
    script = looked.script()
    assert "R.call_tir(cls.channel_lookup" in script and "R.divide(" not in script, script
    shape = [int(d) for d in mod["main"].params[0].ty.shape]
    low = -128 if dtype == "int8" else 0
    codes = np.arange(low, low + 256)
    # each code at every position (and so in every channel), 256 inputs
    inputs = [np.full(shape, v).astype(dtype) for v in codes]
    outs = []
    for m in (mod, looked):
        vm = relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())
        outs.append(np.stack([vm["main"](tvm.runtime.tensor(v)).numpy() for v in inputs]))
    np.testing.assert_array_equal(outs[0], outs[1])
