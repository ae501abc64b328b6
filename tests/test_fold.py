"""fold-constants: numpy folds the common all-constant calls first, and must give exactly what TVM's FoldConstant
(which compiles and runs a kernel per call) gives; what numpy cannot promise stays for TVM."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax

from edgec.context import BuildContext, BuildOptions
from edgec.frontends import load_model
from edgec.passes import PassTimer, pass_context
from edgec.passes.fold import _numpy_fold, fold_constants
from edgec.targets import load_target
from models import real_model

CTX = BuildContext(load_target("host"), BuildOptions(offload=()), offload=())


def module(build) -> tvm.IRModule:
    """main(x) = x + build(): every call build() makes has constant inputs only."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            folded = build(bb)
            out = bb.emit_output(bb.emit(relax.op.add(x, folded)))
        bb.emit_func_output(out)
    return bb.get()


def calls_left(mod: tvm.IRModule) -> list[str]:
    names = []

    @relax.expr_functor.visitor
    class Calls(relax.PyExprVisitor):
        def visit_call_(self, call):
            names.append(call.op.name)

    Calls().visit_expr(mod["main"])
    return names


def fold_both(mod):
    dce = relax.transform.DeadCodeElimination(["main"])
    with pass_context(CTX, PassTimer()):
        return dce(relax.transform.FoldConstant()(mod)), dce(fold_constants(CTX)(mod)), dce(_numpy_fold(mod))


rng = np.random.default_rng(0)
W = rng.standard_normal((4, 3, 2)).astype(np.float32)
Q = rng.integers(-128, 127, (2, 3, 4)).astype(np.int8)


def chain(bb):
    """The weight idioms of TFLite and ONNX imports: transposes, fp16 casts, reshapes, dequantize, arithmetic."""
    w = bb.emit(relax.op.permute_dims(relax.const(W), [2, 1, 0]))
    w = bb.emit(relax.op.astype(relax.op.astype(w, "float16"), "float32"))
    w = bb.emit(relax.op.reshape(relax.op.reshape(w, (6, 4)), (2, 3, 4)))
    w = bb.emit(relax.op.squeeze(relax.op.expand_dims(w, 0), [0]))
    scale = relax.const(rng.random(3).astype(np.float32) / 50)
    zero_point = relax.const(np.array([0, 3, -2], np.int8))
    q = bb.emit(relax.op.dequantize(relax.const(Q), scale, zero_point, axis=1))
    w = bb.emit(relax.op.multiply(relax.op.add(w, q), relax.const(np.float32(0.3))))
    w = bb.emit(relax.op.divide(relax.op.subtract(w, relax.const(np.float32(1.5))), relax.const(np.float32(7.0))))
    ints = bb.emit(relax.op.astype(relax.op.add(relax.const(np.int8([100] * 4)), relax.const(np.int8([100, 1, 2, 3]))),
                                   "float32"))         # wraps to -56, as TVM's int8 kernel does
    return bb.emit(relax.op.add(w, ints))


def test_numpy_fold_gives_what_tvm_folds():
    tvm_folded, edgec_folded, numpy_only = fold_both(module(chain))
    tvm.ir.assert_structural_equal(edgec_folded, tvm_folded, map_free_vars=True)   # constants compared by value
    assert calls_left(tvm_folded) == calls_left(numpy_only) == ["relax.add"]       # numpy did all of it


@pytest.mark.parametrize("value,dtype", [(300.0, "int8"), (np.nan, "int32"), (7, "int32")],
                         ids=["out-of-range", "nan", "int-divide"])
def test_what_numpy_cannot_promise_is_left_to_tvm(value, dtype):
    if isinstance(value, int):                  # integer division: C truncates, numpy floors
        def build(bb):
            q = relax.op.divide(relax.const(np.int32([-value, value, 3, -3])), relax.const(np.int32([2] * 4)))
            return bb.emit(relax.op.astype(q, "float32"))
    else:                                       # float -> int out of range: undefined in C, TVM's kernel decides
        def build(bb):
            return bb.emit(relax.op.astype(relax.op.astype(relax.const(np.float32([value, 1.5, -2.5, 0])), dtype),
                                           "float32"))
    tvm_folded, edgec_folded, numpy_only = fold_both(module(build))
    assert calls_left(numpy_only) != ["relax.add"], "numpy folded a call it cannot promise to fold exactly"
    tvm.ir.assert_structural_equal(edgec_folded, tvm_folded, map_free_vars=True)


def test_real_model_folds_as_tvm_does():
    """hand_landmark_lite: 153 fp16 casts, weight transposes and reshapes (TVM alone: ~6 s here)."""
    model = load_model(real_model("hand_landmark_lite"))
    tvm_folded, edgec_folded, numpy_only = fold_both(model.mod)
    tvm.ir.assert_structural_equal(edgec_folded, tvm_folded, map_free_vars=True)
    assert sorted(calls_left(numpy_only)) == sorted(calls_left(tvm_folded)), "numpy folded all of it"
