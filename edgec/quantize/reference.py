"""What an int8 bundle is verified against at build time.

onnxruntime on the float model gives the float answer, which an int8 bundle is not meant to reproduce: its
distance from it is measured on the held-back calibration samples (the before/after table). The build checks
that the bundle computes the quantized graph it was given, against that graph (the module `quantize-int8` left)
compiled here by TVM without offload, with each quantize → dequantize run in float as the QDQ form says.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..frontends import ImportedModel

NAME = "edgec's int8 QDQ graph on TVM (llvm, no offload)"


def quantized_reference(qdq: tvm.IRModule, model: ImportedModel, steps: list[dict[str, np.ndarray]]):
    """A ReferenceRun (edgec.verification) of the QDQ module on the sample steps."""
    from ..verification import ReferenceRun

    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(qdq, target=tvm.target.Target("llvm"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    names = [p.name for p in qdq["main"].params]
    outputs = []
    for step in steps:
        result = vm["main"](*[tvm.runtime.tensor(step[n]) for n in names])
        values = list(result) if isinstance(result, (tvm.ir.Array, list, tuple)) else [result]
        outputs.append({spec.name: v.numpy() for spec, v in zip(model.outputs, values)})
    return ReferenceRun(NAME, tuple(steps), tuple(outputs), frozenset())
