"""Lowering to the Relax VM: legalize ops to TIR, leave dataflow, plan memory, finalize for the VM.

These mirror TVM's CPU backend pipeline (relax/backend/cpu_generic/pipeline.py), split into named
steps so each can be timed, dumped and, where optional, disabled.
"""
import tvm
from tvm import relax

from .registry import register_pass


@register_pass("legalize", phase="legalize", order=10, required=True)
def legalize(options):
    """Lower every high-level op to a TIR kernel and annotate each kernel's fusion pattern."""
    return tvm.transform.Sequential([
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
    ], name="edgec.legalize")


@register_pass("lower-dataflow", phase="lower", order=10, required=True)
def lower_dataflow(options):
    """Leave dataflow form and make every kernel call allocate its outputs explicitly."""
    return tvm.transform.Sequential([
        relax.transform.RewriteDataflowReshape(),
        relax.transform.ToNonDataflow(),
        relax.transform.RemovePurityChecking(),
        relax.transform.CallTIRRewrite(),
    ], name="edgec.lower_dataflow")


@register_pass("plan-memory", phase="plan", order=10)
def plan_memory(options):
    """Reuse activation buffers whose lifetimes do not overlap (static memory planning)."""
    return relax.transform.StaticPlanBlockMemory()


@register_pass("finalize-vm", phase="finalize", order=10, required=True)
def finalize_vm(options):
    """Lower allocations, builtins and shape computations to VM instructions."""
    return tvm.transform.Sequential([
        relax.transform.LowerAllocTensor(),
        relax.transform.KillAfterLastUse(),
        relax.transform.LowerRuntimeBuiltin(),
        relax.transform.ComputePrimValue(),
        relax.transform.VMShapeLower(),
        relax.transform.AttachGlobalSymbol(),
    ], name="edgec.finalize_vm")
