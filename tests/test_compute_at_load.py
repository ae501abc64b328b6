"""compute-at-load: what main computes from the weights alone (an int8 lookup table) moves to main_load."""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import relax as R

from edgec import api
from edgec.build import BuildOptions
from edgec.passes.lookup import _lookup_tables
from edgec.passes.params import _compute_at_load, _lift_params
from edgec.runtime.native import run_with_runner
from test_offload_int8 import lcnet_blocks, quantized

RNG = np.random.default_rng(11)


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


def _without_input(func: relax.Function) -> list[relax.Var]:
    """func's bindings that depend on no input: computed from weights and constants alone."""
    depends = set(func.params[:int(func.attrs["num_input"])])
    found = []
    for block in func.body.blocks:
        for binding in block.bindings:
            if depends & set(relax.analysis.free_vars(binding.value)):
                depends.add(binding.var)
            else:
                found.append(binding.var)
    return found


def test_the_table_is_computed_at_load():
    """main keeps the lookup, main_load computes the table from the lifted seed; the outputs are the chain's for
    each of the 256 int8 values of x."""
    lifted = _lift_params(_lookup_tables(Hardswish))
    assert _without_input(lifted["main"]), lifted["main"]      # the table, computed on every call
    mod = _compute_at_load(lifted)
    relax.analysis.well_formed(mod)
    assert not _without_input(mod["main"]), mod["main"]
    assert "params" not in mod["main"].attrs and "R.take(" in mod["main"].script()
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    computed = list(vm["main_load"](*mod["main_load"].attrs["params"]))
    assert [tuple(t.shape) for t in computed] == [(256,)]    # the table alone: the seed is not needed at run time
    plain = relax.VirtualMachine(tvm.compile(Hardswish, "llvm"), tvm.cpu())
    for row in np.arange(-128, 128, dtype=np.int8).reshape(32, 1, 8):
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(row), *computed).numpy(),
                                      plain["main"](tvm.runtime.tensor(row)).numpy())


def test_nothing_to_compute_leaves_the_module():
    """A main whose weights feed only input-dependent ops gets no load function."""
    lifted = _lift_params(Hardswish)
    assert _compute_at_load(lifted).same_as(lifted)


def test_lookup_tables_of_a_bundle_without_offload_are_made_at_load(tmp_path):
    """PP-LCNet's blocks in int8 with --offload none: main_load, which only compute-at-load makes here, computes the
    tables; main computes none. params.bin is the same bytes as without the step, and both runners give the same
    outputs as that build."""
    samples = [{"x": RNG.standard_normal((1, 8, 16, 16)).astype(np.float32)} for _ in range(16)]
    qdq = quantized(lcnet_blocks(tmp_path / "lcnet.onnx"), samples)
    result = api.build(qdq, "host", tmp_path / "b", sample_inputs=samples[0],
                       options=BuildOptions(offload=(), dump_ir=tmp_path / "ir"))
    plain = api.build(qdq, "host", tmp_path / "plain", sample_inputs=samples[0],
                      options=BuildOptions(offload=(), disabled_passes=("compute-at-load",)))
    assert result.manifest.verification["status"] == "verified"
    assert (result.manifest.load_function, plain.manifest.load_function) == ("main_load", None)
    dump = next((tmp_path / "ir").glob("*-compute-at-load.py")).read_text()
    main = dump[dump.index("def main("):]
    main = main[:main.find("\n    @")]
    assert "R.take(" in main and "256)" not in main.split("\n", 1)[1], main    # no op on a 256-entry table
    assert (result.bundle_dir / "params.bin").read_bytes() == (plain.bundle_dir / "params.bin").read_bytes()
    sample = {"x": (RNG.standard_normal((1, 8, 16, 16)) * 2).astype(np.float32)}
    expected = api.run(plain.bundle_dir, sample).outputs["y"]
    np.testing.assert_array_equal(api.run(result.bundle_dir, sample).outputs["y"], expected)
    np.testing.assert_array_equal(run_with_runner(result.bundle_dir, sample).outputs["y"], expected)
