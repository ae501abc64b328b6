"""offload-layout's transpose sinking: where a transpose moves below an op, and where it must stay."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
from tvm import relax

import edgec.passes  # noqa: F401  (registers the passes; edgec.offload.passes imports them)
from edgec.offload.passes import _drop_transpose_pairs


def test_size_one_constant_of_higher_rank_keeps_the_transpose_above():
    """add(permute(x), c) with c of shape (1, 1, 1, 1) and x of rank 3 is rank 4: the transpose cannot go below."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 3, 4), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            t = bb.emit(relax.op.permute_dims(x, [1, 0, 2]))
            out = bb.emit_output(relax.op.add(t, relax.const(np.ones((1, 1, 1, 1), "float32"))))
        bb.emit_func_output(out)
    mod = _drop_transpose_pairs(bb.get())
    assert "R.permute_dims(x, axes=[1, 0, 2])" in mod.script(), mod


def test_concat_of_a_bound_tuple_sinks_the_transposes():
    """concat(tup) with tup = (permute(a), permute(b)) bound to a var: one transpose below the concat."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((1, 2, 3, 4), "float32"))
    b = relax.Var("b", relax.TensorType((1, 2, 3, 4), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            parts = bb.emit(relax.Tuple([bb.emit(relax.op.permute_dims(v, [0, 3, 1, 2])) for v in (a, b)]))
            out = bb.emit_output(relax.op.concat(parts, axis=1))
        bb.emit_func_output(out)
    script = _drop_transpose_pairs(bb.get()).script()
    assert "R.concat((a, b), axis=3)" in script and script.count("R.permute_dims") == 1, script


def _between_transposes(constant_shape: tuple[int, ...]) -> str:
    """NHWC u8 -> NCHW, QDQ's multiply and add by dequantized constants of `constant_shape`, -> NHWC, after the pass."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 4, 4, 16), "uint8"))
    scale, zero = relax.const(np.float32(0.1)), relax.const(np.uint8(128))

    def dequantized_constant(value):
        return bb.emit(relax.op.dequantize(relax.const(np.full(constant_shape, value, "uint8")), scale, zero))

    with bb.function("main", [x]):
        with bb.dataflow():
            d = bb.emit(relax.op.dequantize(bb.emit(relax.op.permute_dims(x, [0, 3, 1, 2])), scale, zero))
            v = bb.emit(relax.op.multiply(dequantized_constant(140), d))
            v = bb.emit(relax.op.add(v, dequantized_constant(131)))
            q = bb.emit(relax.op.quantize(v, scale, zero, out_dtype="uint8"))
            out = bb.emit_output(relax.op.permute_dims(q, [0, 2, 3, 1]))
        bb.emit_func_output(out)
    return _drop_transpose_pairs(bb.get()).script()


def test_transposes_cancel_across_dequantized_scalars():
    """QDQ's hardswish multiplies and adds dequantize(constant) scalars (before fold-constants makes them constants):
    the transpose moves through them and meets its inverse; a dequantized per-channel constant (1, 16, 1, 1), which
    broadcasts along the channels of NCHW only, keeps both."""
    for shape in ((1,), ()):
        assert "R.permute_dims" not in _between_transposes(shape), shape
    assert _between_transposes((1, 16, 1, 1)).count("R.permute_dims") == 2


_SELF_INVERSE = """
import numpy as np
from tvm import relax
import edgec.passes
from edgec.offload.passes import _drop_transpose_pairs

bb = relax.BlockBuilder()
a = relax.Var("a", relax.TensorType((1, 4, 6), "uint8"))
b = relax.Var("b", relax.TensorType((1, 6, 4), "uint8"))
scale, zero = relax.const(np.float32(0.1)), relax.const(np.int8(3))
with bb.function("main", [a, b]):
    with bb.dataflow():
        t = bb.emit(relax.op.permute_dims(relax.op.dequantize(a, scale, zero), [0, 2, 1]))
        out = bb.emit_output(relax.op.add(t, relax.op.dequantize(b, scale, zero)))
    bb.emit_func_output(out)
print(_drop_transpose_pairs(bb.get()).script().count("R.permute_dims"))
"""


def test_a_transpose_that_is_its_own_inverse_stays_beside_a_dequantized_operand():
    """add(permute(dequantize(a), [0, 2, 1]), dequantize(b)): moving the transpose to b's side gives an add whose
    other side is again a dequantize beside a [0, 2, 1] transpose, and the rewrite never ended (PP-OCRv4 rec int8's
    layer norms). In a child process with a time limit: the old code loops forever."""
    done = subprocess.run([sys.executable, "-c", _SELF_INVERSE], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1"]
