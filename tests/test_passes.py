"""The pass pipeline: planning (TVM's phases, ordering, repeats, disabling), each edgec pass on a small module
with its expected IR change, the frontend's visible shape folding, and the one PassContext reaching codegen."""
from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import tvm
from onnx import TensorProto, helper, numpy_helper
from tvm import relax

from edgec.build import compile_model
from edgec.context import BuildContext, BuildOptions
from edgec.errors import EdgecError
from edgec.frontends import load_model
from edgec.passes import PassError, plan, run_pipeline
from edgec.passes.registry import _order, tvm_phase_passes
from edgec.targets import load_target, load_target_file

RNG = np.random.default_rng(0)


def ctx_for(target="host", opt_level=2, disabled=()):
    return BuildContext(load_target(target), BuildOptions(opt_level, tuple(disabled)))


def save(graph, path, opset=17):
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, path)
    return path


def conv_bn_onnx(path):
    """x -> Conv(with bias) -> BatchNormalization -> Relu -> y, BN statistics far from identity."""
    c = 4
    inits = [numpy_helper.from_array((RNG.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(c).astype(np.float32), "b"),
             numpy_helper.from_array((RNG.random(c) + 0.5).astype(np.float32), "gamma"),
             numpy_helper.from_array(RNG.standard_normal(c).astype(np.float32), "beta"),
             numpy_helper.from_array(RNG.standard_normal(c).astype(np.float32), "mean"),
             numpy_helper.from_array((RNG.random(c) + 0.1).astype(np.float32), "var")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"], epsilon=1e-3),
         helper.make_node("Relu", ["n"], ["y"])],
        "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], inits)
    return save(graph, path)


def ops_in(mod: tvm.IRModule) -> list[str]:
    names = []

    @relax.expr_functor.visitor
    class Ops(relax.PyExprVisitor):
        def visit_call_(self, call):
            if isinstance(call.op, tvm.ir.Op):
                names.append(call.op.name)
            for arg in call.args:
                self.visit_expr(arg)

    Ops().visit_expr(mod["main"])
    return names


def run_relax(mod, inputs):
    ex = tvm.compile(mod, tvm.target.Target({"kind": "llvm"}))
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in inputs])
    return out.numpy()


def only(ctx, names):
    """The planned steps with these names, in plan order (the rest are dropped)."""
    return [s for s in plan(ctx, "onnx") if s.name in names]


# ------------------------------------------------------------------------------------------------ planning

def test_lowering_phases_come_from_tvm_per_target():
    for target in ("host", "rpi4"):
        steps = [s for s in plan(ctx_for(target), "onnx") if s.tvm_pass is not None]   # edgec's stages apart
        sources = {s.phase: s.source for s in steps}
        for phase, function in (("library-dispatch", "library_dispatch_passes"), ("legalize", "legalize_passes"),
                                ("dataflow-lower", "dataflow_lower_passes"), ("finalize", "finalize_passes")):
            assert sources[phase].startswith("tvm.relax") and sources[phase].endswith(function), sources
            expected = [p.info.name for p in tvm_phase_passes(phase, load_target(target).tvm())[1]]
            assert [s.spec.tvm_name for s in steps if s.phase == phase] == expected
        # TVM runs FoldConstant after LegalizeOps; edgec keeps it, and runs the same pass in the graph phase too
        assert [s.phase for s in plan(ctx_for(target), "onnx") if s.name == "fold-constants"] == ["graph", "legalize"]


MALI = """
name = "mali-board"
description = "an OpenCL GPU board"
arch = "aarch64"
[tvm]
target = { kind = "opencl", device = "mali" }
host = { kind = "llvm", mtriple = "aarch64-linux-gnu" }
[toolchain]
triple = "aarch64-linux-gnu"
compiler = "aarch64-linux-gnu-g++"
apt_package = "g++-aarch64-linux-gnu"
[device]
kind = "opencl"
threads = 4
memory_mb = 2048
runtime_libs = ["libtvm_runtime.so", "libtvm_ffi.so", "libOpenCL.so.1"]
"""


def test_gpu_target_gets_tvm_gpu_schedules(tmp_path):
    board = tmp_path / "mali.toml"
    board.write_text(MALI)
    steps = plan(BuildContext(load_target_file(board), BuildOptions()), "onnx")
    legalize = [s.name for s in steps if s.phase == "legalize"]
    assert legalize[-1] == "gpu-default-schedule", legalize   # dlight, chosen by TVM for a GPU target


def test_order_follows_after_constraints_and_keeps_tvm_order():
    # two TVM steps (chained), an edgec stage after the first, one with no constraint, one after a missing name
    nodes = [("A", (), True), ("B", (), True), ("x", ("A",), False), ("y", (), False), ("z", ("absent",), False)]
    assert [nodes[i][0] for i in _order(nodes)] == ["y", "z", "A", "x", "B"]
    with pytest.raises(ValueError, match="cycle"):
        _order([("p", ("q",), False), ("q", ("p",), False)])


def test_opt_levels_and_disabling():
    o0 = {s.name: s for s in plan(ctx_for(opt_level=0), "onnx") if s.phase != "legalize"}
    assert not o0["fold-batchnorm"].enabled and o0["fold-batchnorm"].reason == "needs -O1"
    assert not o0["plan-memory"].enabled and o0["lift-params"].enabled
    disabled = plan(ctx_for(disabled=["fold-constants"]), "onnx")
    assert [s.enabled for s in disabled if s.name == "fold-constants"] == [False, False]
    with pytest.raises(EdgecError, match="cannot be disabled"):
        plan(ctx_for(disabled=["legalize-ops"]), "onnx")
    with pytest.raises(EdgecError, match="unknown pass nope"):
        plan(ctx_for(disabled=["nope"]), "onnx")
    # the ONNX frontend's import step is listed for ONNX models only
    assert [s.name for s in plan(ctx_for(), "onnx") if s.phase == "import"] == ["fold-shape-subgraphs"]
    assert [s.name for s in plan(ctx_for(), "tflite") if s.phase == "import"] == []


# ------------------------------------------------------------------------------------------------ passes

def test_fold_batchnorm_removes_bn_and_keeps_numbers(tmp_path):
    model = load_model(conv_bn_onnx(tmp_path / "m.onnx"))
    ctx = ctx_for()
    assert "relax.nn.batch_norm" in ops_in(model.mod)
    with ctx.tvm_target():
        folded, _ = run_pipeline(model.mod, only(ctx, {"fold-batchnorm"}), ctx)
    assert "relax.nn.batch_norm" not in ops_in(folded) and "relax.nn.conv2d" in ops_in(folded)
    x = RNG.random((1, 3, 8, 8), dtype=np.float32)
    # the module as imported (BN decomposed only, so it runs) is the reference for the folded one
    with ctx.tvm_target():
        reference, _ = run_pipeline(model.mod, only(ctx, {"decompose-inference"}), ctx)
    np.testing.assert_allclose(run_relax(folded, [x]), run_relax(reference, [x]), rtol=1e-5, atol=1e-5)


def conv_affine_onnx(path, scale_shape):
    """x -> Conv(with bias) -> Mul(s) -> Add(t) -> HardSwish -> Mul(s2) -> y: PP-LCNetV3's learnable affine block
    after a conv (s, t scalars, or one per channel shaped `scale_shape`), another affine after its activation."""
    c = 4
    inits = [numpy_helper.from_array((RNG.standard_normal((c, 3, 3, 3)) * 0.3).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal(c).astype(np.float32), "b"),
             numpy_helper.from_array((RNG.random(scale_shape) + 0.5).astype(np.float32), "s"),
             numpy_helper.from_array(RNG.standard_normal(scale_shape).astype(np.float32), "t"),
             numpy_helper.from_array(np.float32(0.7), "s2")]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["s", "c"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"]),
         helper.make_node("HardSwish", ["a"], ["h"]), helper.make_node("Mul", ["h", "s2"], ["y"])],
        "conv_affine", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 8, 8])], inits)
    return save(graph, path)


@pytest.mark.parametrize("scale_shape", [(), (1, 4, 1, 1)])
def test_fold_batchnorm_folds_an_affine_after_a_conv(tmp_path, scale_shape):
    """fold-batchnorm moves conv -> * s + t into the conv's weights and bias (one multiply is left: the one after
    the activation, which is no conv's), and the numbers stay."""
    model = load_model(conv_affine_onnx(tmp_path / "m.onnx", scale_shape))
    ctx = ctx_for()
    with ctx.tvm_target():
        folded, _ = run_pipeline(model.mod, only(ctx, {"fold-batchnorm"}), ctx)
    assert ops_in(model.mod).count("relax.multiply") == 3 and ops_in(folded).count("relax.multiply") == 2
    assert ops_in(folded)[:2] == ["relax.nn.conv2d", "relax.add"], ops_in(folded)
    x = RNG.random((1, 3, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(run_relax(folded, [x]), run_relax(model.mod, [x]), rtol=1e-5, atol=1e-5)


def test_lift_params_moves_weights_out_of_the_code(tmp_path):
    model = load_model(conv_bn_onnx(tmp_path / "m.onnx"))
    ctx = ctx_for()
    with ctx.tvm_target():
        lifted, _ = run_pipeline(model.mod, only(ctx, {"fold-batchnorm", "lift-params"}), ctx)
    main = lifted["main"]
    assert int(main.attrs["num_input"]) == 1
    weights = [tuple(int(d) for d in p.ty.shape.values) for p in main.params[1:]]
    assert (4, 3, 3, 3) in weights and len(main.attrs["params"]) == len(weights)


def test_pass_failure_names_the_pass_and_history(tmp_path, monkeypatch):
    model = load_model(conv_bn_onnx(tmp_path / "m.onnx"))
    ctx = ctx_for()
    steps = only(ctx, {"fold-batchnorm", "canonicalize"})
    steps[1] = dataclasses.replace(steps[1], spec=dataclasses.replace(steps[1].spec, make=lambda c: _raise_pass()))
    with ctx.tvm_target(), pytest.raises(PassError) as e:
        run_pipeline(model.mod, steps, ctx)
    assert "pass 'canonicalize'" in e.value.message and "after fold-batchnorm" in e.value.message
    assert "boom" in e.value.message and "--disable-pass canonicalize" in e.value.hint


def _raise_pass():
    @tvm.transform.module_pass(opt_level=0, name="Boom")
    def boom(mod, ctx):
        raise ValueError("boom")
    return boom


# ------------------------------------------------------------------------------------------------ frontend

def shape_chain_onnx(path):
    """Reshape(x, Concat(Gather(Shape(x), 0), [-1])) plus a DequantizeLinear of int8 weights feeding a MatMul."""
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(RNG.integers(-127, 127, (12, 5)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.array(0.02, np.float32), "scale")]
    graph = helper.make_graph(
        [helper.make_node("Shape", ["x"], ["s"]),
         helper.make_node("Gather", ["s", "zero"], ["n"], axis=0),
         helper.make_node("Concat", ["n", "minus1"], ["target"], axis=0),
         helper.make_node("Reshape", ["x", "target"], ["flat"]),
         helper.make_node("DequantizeLinear", ["wq", "scale"], ["w"]),
         helper.make_node("MatMul", ["flat", "w"], ["y"])],
        "shape_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])], inits)
    return save(graph, path)


def test_frontend_folds_only_shape_computations(tmp_path):
    path = shape_chain_onnx(tmp_path / "m.onnx")
    dump = tmp_path / "ir"
    dump.mkdir()
    model = load_model(path, {"x": (2, 3, 4)}, ("fold-shape-subgraphs",), dump)
    summary = (dump / "00-import-fold-shape-subgraphs.txt").read_text()
    assert summary.startswith("folded 3 shape node(s)") and "[2, -1]" in summary
    assert [r.name for r in model.import_records] == ["fold-shape-subgraphs"]
    # the int8 weights reach Relax as int8, dequantized in the graph, not folded to float in the frontend
    assert "relax.dequantize" in ops_in(model.mod)
    int8_consts = [c for c in _constants(model.mod) if c.value.dtype == "int8"]
    assert (12, 5) in [tuple(c.value.shape) for c in int8_consts]
    # disabled, the chain reaches TVM's importer, which needs the Reshape target as a constant
    with pytest.raises(EdgecError, match="importer failed on m.onnx: Reshape requires"):
        load_model(path, {"x": (2, 3, 4)}, ())


def _constants(mod):
    found = []

    @relax.expr_functor.visitor
    class Consts(relax.PyExprVisitor):
        def visit_generic_const_(self, const):
            found.append(const)

    Consts().visit_expr(mod["main"])
    return found


def test_prequantized_qdq_model_keeps_int8_weights(tmp_path):
    """A QDQ model made by onnxruntime's quantize_static imports with its weights still int8 in the IR."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    float_model = conv_bn_onnx(tmp_path / "f.onnx")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.samples = iter([{"x": RNG.random((1, 3, 8, 8), dtype=np.float32)} for _ in range(4)])

        def get_next(self):
            return next(self.samples, None)

    quantize_static(str(float_model), str(tmp_path / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    model = load_model(tmp_path / "q.onnx", None, ("fold-shape-subgraphs",))
    weights = [c for c in _constants(model.mod) if tuple(c.value.shape) == (4, 3, 3, 3)]
    assert weights and all(c.value.dtype == "int8" for c in weights), [c.value.dtype for c in weights]


# ------------------------------------------------------------------------------------------------ build

def test_one_pass_context_reaches_passes_and_codegen(tmp_path):
    """The descriptor's pass_config and the -O level reach the steps (FuseOps reads both from the context)."""
    model = load_model(conv_bn_onnx(tmp_path / "m.onnx"))
    host = load_target("host")
    board = tmp_path / "no-fusion.toml"
    board.write_text(open(host.origin).read().replace("[toolchain]", '[tvm.pass_config]\n"relax.FuseOps.max_depth" = 1\n\n[toolchain]'))
    fused = compile_model(model, BuildContext(host, BuildOptions()), plan(BuildContext(host, BuildOptions()), "onnx"))
    capped_ctx = BuildContext(load_target_file(board), BuildOptions())
    capped = compile_model(model, capped_ctx, plan(capped_ctx, "onnx"))
    assert capped.ops_around_fusion()[1] > fused.ops_around_fusion()[1]
    assert capped.codegen_passes, "the PassContext's timer saw codegen's passes"


def test_kernels_skip_argument_checks_unless_the_descriptor_keeps_them(tmp_path):
    """By default (targets.DEFAULT_PASS_CONFIG) TVM's kernels have no per-call argument checks, whose only caller is
    the model's VM program: no error raised anywhere in their code. A descriptor's "tirx.disable_assert" = false
    keeps TVM's checks (type, rank, shape, dtype of each tensor), which raise a TypeError."""
    model = load_model(conv_bn_onnx(tmp_path / "m.onnx"))
    host = load_target("host")
    board = tmp_path / "checked.toml"
    board.write_text(open(host.origin).read().replace(
        "[toolchain]", '[tvm.pass_config]\n"tirx.disable_assert" = false\n\n[toolchain]'))

    def kernels_ir(target) -> str:
        ctx = BuildContext(target, BuildOptions())
        module = compile_model(model, ctx, plan(ctx, "onnx")).executable.mod
        pending = [module]    # the executable imports the kernels' LLVM module (through the offload's loader)
        while pending[0].kind != "llvm":
            pending = pending[1:] + list(pending[0].imports)
        return pending[0].inspect_source("ll")

    raised = "@TVMFFIErrorSetRaisedFromCStr"
    assert raised not in kernels_ir(host)
    assert raised in kernels_ir(load_target_file(board))


def test_activation_memory_from_the_ir(tmp_path):
    model = load_model(conv_bn_onnx(tmp_path / "m.onnx"))
    results = {}
    for level in (0, 2):
        ctx = ctx_for(opt_level=level)
        results[level] = compile_model(model, ctx, plan(ctx, "onnx")).memory
    assert results[0].planned_bytes is None, "-O0 does not plan memory and must not claim it did"
    # at -O2 the conv, bias add and relu fuse into one kernel whose output (1x4x8x8 float32) is all main allocates
    assert results[2].tensor_bytes == results[2].planned_bytes == 4 * 8 * 8 * 4
    assert results[0].tensor_bytes > results[2].tensor_bytes
