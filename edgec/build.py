"""Compile an imported model for a target: run edgec's pipeline, generate code, link the library."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .context import BuildContext, BuildOptions
from .errors import EdgecError, last_line
from .frontends import ImportedModel
from .offload import Placement, build_options, placement_of, used
from .offload.passes import LOAD_SUFFIX
from .passes import PassRecord, PassTimer, PlannedStep, pass_context, run_pipeline
from .passes.int8_kernels import RECORD_ATTR as INT8_RECORD
from .passes.quantize import quantization_of
from .progress import Progress, current
from .targets import Target

__all__ = ["ActivationMemory", "BuildOptions", "CompiledModel", "compile_model", "export_library"]

# the steps that leave the graph a quantized build is verified on (its reference), with their record
QUANTIZING_STEPS = ("quantize-int8", "to-fp16", "round-weights-int8")
_ALLOC_TENSOR = "relax.builtin.alloc_tensor"     # one buffer per tensor (before planning, and for outputs)
_ALLOC_STORAGE = "relax.memory.alloc_storage"    # a planned buffer that several tensors share in turn


@dataclass(frozen=True)
class ActivationMemory:
    """Buffers main allocates for intermediate and output tensors (weights and inputs not included).

    Read from the IR's allocation calls, not from TVM's text report. `tensor_bytes` is every tensor in its own
    buffer; `planned_bytes` is what the VM allocates once memory planning has made tensors share buffers (None
    when planning did not run, e.g. at -O0). Neither is a measured peak: planned storage is allocated once and
    held for the whole run, so it is an upper bound of what a run adds to the process.
    """
    tensor_bytes: int
    planned_bytes: int | None
    dynamic_allocations: int       # allocations of non-constant size, not counted in the byte figures


def _static_bytes(dims, dtype: tvm.DataType) -> int | None:
    """Bytes of a tensor of `dims` (PrimExprs) and `dtype`; None when a dimension is not a constant."""
    if not all(isinstance(d, tvm.tirx.IntImm) for d in dims):
        return None
    return (dtype.bits * dtype.lanes + 7) // 8 * int(np.prod([d.value for d in dims], dtype=np.int64))


def _allocated_bytes(mod: tvm.IRModule) -> dict[str, tuple[int, int]]:
    """op name -> (constant bytes allocated, allocations of dynamic size) over main's allocation calls."""
    totals = {_ALLOC_TENSOR: [0, 0], _ALLOC_STORAGE: [0, 0]}

    @relax.expr_functor.visitor
    class Allocations(relax.PyExprVisitor):
        def visit_call_(self, call):
            op = getattr(call.op, "name", None)
            if op == _ALLOC_TENSOR:
                size = _static_bytes(call.args[0].values, tvm.DataType(call.args[1].value))
            elif op == _ALLOC_STORAGE:
                size = _static_bytes(call.args[0].values, tvm.DataType("uint8"))
            else:
                return
            if size is None:
                totals[op][1] += 1
            else:
                totals[op][0] += size

    Allocations().visit_expr(mod["main"])
    return {op: tuple(v) for op, v in totals.items()}


class _MemoryWatch:
    """Reads the allocations right before memory planning and right after it (see ActivationMemory)."""

    def __init__(self):
        self.unplanned: tuple[int, int] = (0, 0)
        self.planned: int | None = None

    def __call__(self, step: PlannedStep, mod: tvm.IRModule) -> None:
        if step.phase == "dataflow-lower":        # every tensor now has its own explicit allocation
            self.unplanned = _allocated_bytes(mod)[_ALLOC_TENSOR]
        elif step.spec.tvm_name == "StaticPlanBlockMemory":
            totals = _allocated_bytes(mod)
            self.planned = totals[_ALLOC_STORAGE][0] + totals[_ALLOC_TENSOR][0]

    def result(self) -> ActivationMemory:
        return ActivationMemory(self.unplanned[0], self.planned, self.unplanned[1])


@dataclass
class CompiledModel:
    model: ImportedModel
    target: Target
    executable: relax.VMExecutable
    params: dict[str, np.ndarray]            # VM parameter name -> value, in call order
    passes: list[PassRecord]                 # import steps, then the Relax steps, as they ran
    planned: list[PlannedStep]
    kernels: int
    memory: ActivationMemory
    codegen_passes: dict[str, float]         # seconds per TVM pass inside tvm.compile, from the PassContext's timer
    seconds: dict[str, float] = field(default_factory=dict)   # phase -> seconds
    offload: tuple[Placement, ...] | None = None   # where offload-partition put each operator; None: it did not run
    load: str | None = None                  # the function runners call once with the weights (main_load)
    load_bytes: int = 0                      # the tensors load returns, which the model holds while it is loaded
    quantization: dict | None = None         # what --quantize did (the manifest's record); None: it did not run
    quantized_graph: tvm.IRModule | None = None   # the module a QUANTIZING_STEPS step left: what the build is verified on
    int8_kernels: dict | None = None         # int8-kernels' record (instruction, layers, kernels, left); None: no chain

    @property
    def param_bytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())

    @property
    def held_weight_bytes(self) -> int:
        """The weights as the loaded model holds them: load's results where they are larger than params.bin (int8
        weights dequantized, tables computed at load), else what it stores (an offload backend's packed weights
        are no tensor load returns)."""
        return max(self.param_bytes, self.load_bytes)

    def ops_around_fusion(self) -> tuple[int, int]:
        """Operator calls in main right before fuse-ops and right after fuse-tir (equal when fusion is off)."""
        names = [r.name for r in self.passes]
        if "fuse-ops" not in names:
            legalized = [r.calls for r in self.passes if r.phase == "legalize"]
            return (legalized[-1],) * 2 if legalized else (0, 0)
        before = self.passes[names.index("fuse-ops") - 1].calls
        after = next(r.calls for r in self.passes if r.name == "fuse-tir") if "fuse-tir" in names else before
        return before, after


def _returned_bytes(func: relax.Function) -> int:
    """Bytes of the tensors of static shape `func` returns (a tuple of them, or one; not its opaque objects)."""
    types = func.ret_ty.fields if isinstance(func.ret_ty, tvm.ir.TupleType) else [func.ret_ty]
    sizes = [_static_bytes(ty.shape.values, tvm.DataType(ty.dtype)) for ty in types
             if isinstance(ty, relax.TensorType) and isinstance(ty.shape, relax.ShapeExpr)]
    return sum(size for size in sizes if size is not None)


def refuse_compiler_only_calls(mod: tvm.IRModule) -> None:
    """Refuse a module that calls a function of TVM's compiler library: an operator's FCallPacked (relax.unique ->
    relax.run.unique, ...) is registered there only, so a bundle, which loads the TVM runtime alone, could not load."""
    operator_of = {}   # packed function -> the operator that lowers to it
    for name in tvm.ir.Op.list_op_names():
        packed = tvm.ir.Op.get(name).get_attr("FCallPacked")
        if packed is not None:
            operator_of[str(packed)] = name
    called = set()

    def visit(expr) -> None:
        if isinstance(expr, tvm.ir.Op) and expr.name in operator_of.values():
            called.add(expr.name)
        elif isinstance(expr, relax.ExternFunc) and expr.global_symbol in operator_of:
            called.add(operator_of[expr.global_symbol])

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            relax.analysis.post_order_visit(func, visit)
    if called:
        packed = {v: k for k, v in operator_of.items()}
        uses = ", ".join(f"{op} (TVM's {packed[op]})" for op in sorted(called))
        raise EdgecError(f"the model needs {uses}, a function of TVM's compiler library that a bundle's TVM runtime "
                         "does not have", "export the model without that operator (for ONNX Unique: compute it "
                         "outside the model); edgec runs NonZero and Compress with kernels of its own")


def compile_model(model: ImportedModel, ctx: BuildContext, steps: list[PlannedStep],
                  progress: Progress | None = None) -> CompiledModel:
    """Run the planned pipeline and generate code under one PassContext, reporting each step to `progress`."""
    say = progress or current()
    timer, memory = PassTimer(), _MemoryWatch()
    dump_dir = ctx.options.dump_ir
    t0 = time.perf_counter()
    with pass_context(ctx, timer):
        placement, quantization = [], []

        def after_step(step: PlannedStep, mod: tvm.IRModule) -> None:
            memory(step, mod)
            if step.name in ("offload-partition", "offload-auto"):   # auto revises what partition placed
                placement.append(placement_of(mod))
            if step.name in QUANTIZING_STEPS:
                quantization.append((quantization_of(mod), mod))
            elif quantization and step.name == "store-weights-int8":   # it adds the bytes it stored
                quantization[0] = (quantization_of(mod), quantization[0][1])

        say("passes", total=sum(1 for s in steps if s.enabled and s.phase != "import"))
        mod, records = run_pipeline(model.mod, steps, ctx, dump_dir=dump_dir, on_step=say.advance,
                                    after_step=after_step)
        t_passes = time.perf_counter() - t0
        attrs = mod.attrs
        mod, detached = relax.frontend.detach_params(mod)
        # detach_params builds a new module without the attributes, which hold the offload codegen's C++
        for key, value in (attrs or {}).items():
            mod = mod.with_attr(key, value)
        # main_load (offload's packing, int8-weights' dequantize, compute-at-load) takes the weights (all of them) at
        # load and gives main its arguments
        load = next((gv.name_hint for gv in mod.get_global_vars() if gv.name_hint == "main" + LOAD_SUFFIX), None)
        names = [p.name for p in mod[load].params] if load else [p.name for p in mod["main"].params[len(model.inputs):]]
        values = detached.get(load or "main", [])
        if len(values) != len(names):
            raise EdgecError(f"internal error: {len(names)} weight parameters but {len(values)} values",
                             "report this with the model and --dump-ir output")
        params = {n: v.numpy() for n, v in zip(names, values)}
        kernels = sum(1 for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
        refuse_compiler_only_calls(mod)
        say("generate code")
        before_codegen = dict(timer.seconds)
        t0 = time.perf_counter()
        try:
            executable = tvm.compile(mod, ctx.tvm_target(), relax_pipeline=None)
        except Exception as e:  # a TVM codegen failure of any type; the message carries TVM's reason
            raise EdgecError(f"code generation for {ctx.target.name} failed: {last_line(e)}",
                             "rerun with --verbose; try -O0 to rule out an optimization") from e
    codegen = {name: s - before_codegen.get(name, 0.0) for name, s in timer.seconds.items()
               if s > before_codegen.get(name, 0.0)}
    seconds = {"import": model.import_seconds, "passes": t_passes, "codegen": time.perf_counter() - t0}
    return CompiledModel(model, ctx.target, executable, params, [*model.import_records, *records], steps, kernels,
                         memory.result(), codegen, seconds, placement[-1] if placement else None, load,
                         _returned_bytes(mod[load]) if load else 0,
                         *(quantization[0] if quantization else (None, None)),
                         json.loads(str(attrs[INT8_RECORD])) if attrs and INT8_RECORD in attrs else None)


def export_library(compiled: CompiledModel, path: Path) -> float:
    """Link the model library with the target's compiler; returns seconds taken."""
    t0 = time.perf_counter()
    current()(f"link with {compiled.target.toolchain.compiler}")
    link_library(compiled.executable, compiled.target, used(compiled.offload), path)
    seconds = time.perf_counter() - t0
    compiled.seconds["link"] = seconds
    return seconds


def link_library(executable: relax.VMExecutable, target: Target, backends: tuple[Backend, ...], path: Path) -> None:
    """Link an executable into a shared library with the target's compiler and the backends' libraries."""
    from tvm.support import cc

    from .toolchain import find_tool

    chain = target.toolchain
    compiler = find_tool(chain.compiler, chain.apt_package)
    # TVM puts options before the objects, where the linker drops libraries nothing has needed yet: the
    # offload libraries go after them.
    libs = [flag for backend in backends for flag in backend.linkage.libs]
    # TVM compiles the backends' C++ sources with this command too, unoptimized unless told. That C++ only binds
    # arguments and calls the library, so it is optimized for size; only what its exported functions reach is linked.
    cxx = ["-Os", "-ffunction-sections", "-fdata-sections", "-fvisibility=hidden", "-fvisibility-inlines-hidden"]
    # -s: no debug info or static symbol table (a third of the library); the runtime finds every function by its
    # dynamic symbol
    options = (cxx if backends else []) + ["-s", "-Wl,--gc-sections"] + build_options(backends, target)
    if any(b.linkage.ship for b in backends):
        # Shipped libraries are found in the bundle's lib/ by anyone loading model.so from the bundle; DT_RPATH
        # (not RUNPATH) so that it also serves the libraries' own dependencies (libdnnl's libgomp).
        options.append("-Wl,--disable-new-dtags,-rpath,$ORIGIN/lib")
    try:
        # The triple names the architecture of the object TVM packs imported modules into (devc.o): without it
        # cross_compiler inherits the host compiler's, and an Arm library with imports failed to link.
        executable.export_library(str(path), fcompile=cc.cross_compiler(
            compiler, options=options, add_files=libs, get_target_triple=cc.get_target_by_dump_machine(compiler)))
    except Exception as e:  # the compiler's failure arrives as whatever TVM wraps it in
        # a backend with fetched packages for this architecture (its sysroot) is not apt-installed here
        packages = " ".join([chain.apt_package, *(b.linkage.packages[target.arch] for b in backends
                                                  if target.arch not in b.linkage.debs)])
        fetched = [b.name for b in backends if target.arch in b.linkage.debs]
        raise EdgecError(f"linking the model library with {chain.compiler} failed: {last_line(e)}",
                         f"check the toolchain: sudo apt-get install {packages}"
                         + (f", and refetch the {'/'.join(fetched)} packages: sudo sh cross/setup-{target.arch}.sh"
                            if fetched else "")
                         + ("; or build with --offload none" if backends else "")) from e
