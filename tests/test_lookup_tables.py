"""int8-lookup-tables on hand-written Relax: the tables are constants computed at build time; a chain does not
continue across binding blocks."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from edgec.passes.lookup import _lookup_tables

INT8_VALUES = np.arange(-128, 128, dtype=np.int8)


@tvm.script.ir_module
class Hardswish:
    @R.function
    def main(x: R.Tensor((1, 8), "int8")) -> R.Tensor((1, 8), "int8"):
        with R.dataflow():
            d = R.dequantize(x, R.const(0.1, "float32"), R.const(0, "int8"), axis=-1, out_dtype="float32")
            a = R.clip(R.add(d, R.const(3.0, "float32")), 0, 6)
            h = R.divide(R.multiply(d, a), R.const(6.0, "float32"))
            y = R.quantize(h, R.const(0.05, "float32"), R.const(0, "int8"), axis=-1, out_dtype="int8")
            R.output(y)
        return y


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


def _outputs(mod, *args) -> np.ndarray:
    """main's outputs for each of the 256 int8 values of x (8 at a time)."""
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return np.stack([vm["main"](tvm.runtime.tensor(row), *map(tvm.runtime.tensor, args)).numpy()
                     for row in INT8_VALUES.reshape(32, 1, 8)])


def _bindings(func: relax.Function) -> list[relax.Binding]:
    return [b for block in func.body.blocks for b in block.bindings]


def test_the_table_is_a_constant_made_at_build_time():
    """main is one lookup in a 256-entry constant, entry i the chain's value for x = i - 128; every binding of main
    depends on x (no table computed at run time, nothing for compute-at-load), and the outputs are the chain's."""
    mod = _lookup_tables(Hardswish)
    relax.analysis.well_formed(mod)
    bindings = _bindings(mod["main"])
    assert all(relax.analysis.free_vars(b.value) for b in bindings), mod
    lookups = [b.value for b in bindings if getattr(b.value.op, "name", None) == "relax.take"]
    assert len(lookups) == 1 and isinstance(lookups[0].args[0], tvm.ir.expr.GenericConst), mod
    expected = _outputs(Hardswish).reshape(256)
    np.testing.assert_array_equal(lookups[0].args[0].value.numpy(), expected)
    np.testing.assert_array_equal(_outputs(mod).reshape(256), expected)


def test_a_chain_continued_in_an_if_branch_starts_there_again():
    """q's chain (from the dataflow block) is not extended inside the branches: its table var is the block's own."""
    mod = _lookup_tables(ChainIntoBranches)
    relax.analysis.well_formed(mod)    # raises where a var is used outside its block
    assert mod.script().count("R.take(") == 3, mod    # the block's chain and each branch's
    # the then branch only: TVM's VM crashes (StorageObj::AllocTensor) running this well-formed module's else branch
    np.testing.assert_array_equal(_outputs(mod, np.array(True)), _outputs(ChainIntoBranches, np.array(True)))
