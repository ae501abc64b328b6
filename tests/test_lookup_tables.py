"""int8-lookup-tables on hand-written Relax: a chain does not continue across binding blocks."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from edgec.passes.lookup import _lookup_tables


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


def _outputs(mod, c: bool) -> np.ndarray:
    """main's outputs for each of the 256 int8 values of x (8 at a time)."""
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return np.stack([vm["main"](tvm.runtime.tensor(row), tvm.runtime.tensor(np.array(c))).numpy()
                     for row in np.arange(-128, 128, dtype=np.int8).reshape(32, 1, 8)])


def test_a_chain_continued_in_an_if_branch_starts_there_again():
    """q's chain (from the dataflow block) is not extended inside the branches: its table var is the block's own."""
    mod = _lookup_tables(ChainIntoBranches)
    relax.analysis.well_formed(mod)    # raises where a var is used outside its block
    assert mod.script().count("R.take(") == 3, mod    # the block's chain and each branch's
    # the then branch only: TVM's VM crashes (StorageObj::AllocTensor) running this well-formed module's else branch
    np.testing.assert_array_equal(_outputs(mod, True), _outputs(ChainIntoBranches, True))
