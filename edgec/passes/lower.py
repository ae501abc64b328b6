"""edgec's policy for the passes TVM's lowering phases run.

The phases themselves come from TVM for each target (see registry.TVM_PHASES). This table names the passes
they hold for CPU and GPU targets, says what each does, and marks the ones a build may skip: those are
optimizations (fusion, folding, memory planning), everything else is needed for a runnable module.
"""
import tvm
from tvm import relax, tirx

from .registry import adopt_tvm_pass, register_pass

# TVM pass name -> (edgec name, what it does, lowest -O level or None when required)
_TVM_PASSES = {
    "DispatchSampling": ("dispatch-sampling", "Lower sampling ops (multinomial) to library or TIR kernels", None),
    "DispatchSortScan": ("dispatch-sort-scan", "Lower sort, scan and top-k ops to library or TIR kernels", None),
    "LegalizeOps": ("legalize-ops", "Lower every high-level op to a TIR kernel (call_tir)", None),
    "AnnotateTIROpPattern": ("annotate-op-pattern", "Mark each kernel's fusion pattern (elementwise, injective...)",
                             None),
    "FuseOps": ("fuse-ops", "Group kernels into fusable functions (conv + bias + relu6 become one group)", 1),
    "FuseTIR": ("fuse-tir", "Merge each fused group's kernels into a single TIR kernel", 1),
    "ApplyDefaultSchedule": ("gpu-default-schedule", "Give every GPU kernel a default thread binding (dlight)",
                             None),
    "RewriteDataflowReshape": ("rewrite-reshape", "Turn reshapes into zero-copy views", None),
    "ToNonDataflow": ("leave-dataflow", "Leave dataflow blocks", None),
    "RemovePurityChecking": ("remove-purity-checks", "Drop purity annotations before explicit allocation", None),
    "CallTIRRewrite": ("explicit-allocation", "Make each kernel call allocate its outputs explicitly", None),
    "StaticPlanBlockMemory": ("plan-memory", "Reuse activation buffers whose lifetimes do not overlap", 1),
    "LowerAllocTensor": ("lower-alloc-tensor", "Turn tensor allocations into storage allocations", None),
    "KillAfterLastUse": ("kill-after-last-use", "Release each tensor right after its last use", None),
    "LowerRuntimeBuiltin": ("lower-builtins", "Lower runtime builtins to VM calls", None),
    "ComputePrimValue": ("compute-prim-values", "Compute symbolic scalar values for the VM", None),
    "VMShapeLower": ("lower-shapes", "Lower shape computations and checks to VM instructions", None),
    "AttachGlobalSymbol": ("attach-symbols", "Name every function for the linked library", None),
}

for _tvm_name, (_name, _description, _opt_level) in _TVM_PASSES.items():
    adopt_tvm_pass(_tvm_name, _name, _description, opt_level=_opt_level or 0, required=_opt_level is None)


@tvm.transform.module_pass(opt_level=0, name="DropUnusedKernels")
def _drop_unused_kernels(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    called = {gv for _, func in mod.functions_items() if isinstance(func, relax.Function)
              for gv in relax.analysis.all_global_vars(func)}
    unused = [gv for gv, func in mod.functions_items() if isinstance(func, tirx.PrimFunc) and gv not in called]
    if not unused:
        return mod
    mod = mod.clone()   # IRModule deletion mutates in place; the pass must not touch its input
    for gv in unused:
        del mod[gv]
    return mod


@register_pass("drop-unused-kernels", phase="dataflow-lower", after=("rewrite-reshape",), opt_level=0)
def drop_unused_kernels(ctx) -> tvm.transform.Pass:
    """Drop kernels nothing calls (a reshape turned into a view leaves its copy kernel in the library)"""
    return _drop_unused_kernels
