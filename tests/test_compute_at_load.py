"""compute-at-load: what main computes from the weights alone (a weight transposed in main) moves to main_load."""
from __future__ import annotations

import numpy as np
import tvm
from onnx import helper, numpy_helper
from tvm import relax

from edgec import api
from edgec.build import BuildOptions
from edgec.passes.params import _compute_at_load, _lift_params
from edgec.runtime.native import run_with_runner
from verify import save_onnx

RNG = np.random.default_rng(11)
WEIGHT = RNG.standard_normal((24, 16)).astype(np.float32)     # [out, in], as ONNX's Gemm(transB=1) takes it
BIAS = RNG.standard_normal((1, 24)).astype(np.float32)
INPUTS = RNG.standard_normal((3, 1, 16)).astype(np.float32)


def _dense(transposed_in_main: bool) -> tvm.IRModule:
    """main(x) = x @ W^T + b, W^T computed in main (as the ONNX importer writes Gemm(transB=1)) or a constant."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 16), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            if transposed_in_main:
                weight = bb.emit(relax.op.permute_dims(relax.const(WEIGHT)))
            else:
                weight = relax.const(np.ascontiguousarray(WEIGHT.T))
            y = bb.emit_output(relax.op.add(relax.op.matmul(x, weight), relax.const(BIAS)))
        bb.emit_func_output(y)
    return bb.get()


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


def test_the_transpose_is_computed_at_load():
    """main keeps the matmul, main_load transposes the lifted weight; main's outputs are the module's."""
    lifted = _lift_params(_dense(transposed_in_main=True))
    assert _without_input(lifted["main"]), lifted["main"]      # the transpose, computed on every call
    mod = _compute_at_load(lifted)
    relax.analysis.well_formed(mod)
    assert not _without_input(mod["main"]), mod["main"]
    assert "params" not in mod["main"].attrs and "R.permute_dims(" not in mod["main"].script()
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    computed = [t.numpy() for t in vm["main_load"](*mod["main_load"].attrs["params"])]
    # the bias as it was, then the transposed weight: main needs W itself no more
    assert [t.shape for t in computed] == [(1, 24), (16, 24)]
    np.testing.assert_array_equal(computed[1], WEIGHT.T)
    plain = relax.VirtualMachine(tvm.compile(_dense(transposed_in_main=True), "llvm"), tvm.cpu())
    for x in INPUTS:
        np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(x), *map(tvm.runtime.tensor, computed)).numpy(),
                                      plain["main"](tvm.runtime.tensor(x)).numpy())


def test_nothing_to_compute_leaves_the_module():
    """A main whose weights feed only input-dependent ops gets no load function."""
    lifted = _lift_params(_dense(transposed_in_main=False))
    assert len(lifted["main"].params) == 3      # x and two lifted weights
    assert _compute_at_load(lifted).same_as(lifted)


def test_a_weight_transform_left_in_main_is_made_at_load(tmp_path):
    """Gemm(transB=1) with fold-constants disabled and --offload none: main_load, which only compute-at-load makes
    here, transposes the weight; main transposes nothing. params.bin is the same bytes as without the step, and both
    runners give the same outputs as that build."""
    model = save_onnx(tmp_path / "gemm.onnx", "gemm", [helper.make_node("Gemm", ["x", "w", "b"], ["y"], transB=1)],
                      {"x": [1, 16]}, {"y": [1, 24]},
                      [numpy_helper.from_array(WEIGHT, "w"), numpy_helper.from_array(BIAS.reshape(24), "b")])
    sample = {"x": INPUTS[0]}
    result = api.build(model, "host", tmp_path / "b", sample_inputs=sample,
                       options=BuildOptions(offload=(), disabled_passes=("fold-constants",), dump_ir=tmp_path / "ir"))
    plain = api.build(model, "host", tmp_path / "plain", sample_inputs=sample,
                      options=BuildOptions(offload=(), disabled_passes=("fold-constants", "compute-at-load")))
    assert result.manifest.verification["status"] == "verified"
    assert (result.manifest.load_function, plain.manifest.load_function) == ("main_load", None)
    dump = next((tmp_path / "ir").glob("*-compute-at-load.py")).read_text()
    main = dump[dump.index("def main("):]
    main = main[:main.find("\n    @")]
    assert "R.matmul(" in main and "R.permute_dims(" not in main, main
    assert (result.bundle_dir / "params.bin").read_bytes() == (plain.bundle_dir / "params.bin").read_bytes()
    for x in INPUTS[1:]:
        expected = api.run(plain.bundle_dir, {"x": x}).outputs["y"]
        np.testing.assert_array_equal(api.run(result.bundle_dir, {"x": x}).outputs["y"], expected)
        np.testing.assert_array_equal(run_with_runner(result.bundle_dir, {"x": x}).outputs["y"], expected)
