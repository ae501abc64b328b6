"""Compile an imported model for a target: run edgec's pipeline, generate code, link the library."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tvm
from tvm import relax

from .errors import EdgecError, last_line
from .frontends import ImportedModel
from .passes import PassOptions, PassRecord, PlannedPass, pipeline_for, run_pipeline
from .targets import Target


@dataclass(frozen=True)
class BuildOptions:
    opt_level: int = 2
    disabled_passes: tuple[str, ...] = ()
    dump_ir: Path | None = None


@dataclass(frozen=True)
class MemoryEstimate:
    """Activation memory of main from relax.analysis.estimate_memory_usage (weights not included)."""
    unplanned_bytes: int
    planned_bytes: int


@dataclass
class CompiledModel:
    model: ImportedModel
    target: Target
    executable: relax.VMExecutable
    params: dict[str, np.ndarray]            # VM parameter name -> value, in call order
    passes: list[PassRecord]
    planned: list[PlannedPass]
    kernels: int
    memory: MemoryEstimate
    seconds: dict[str, float] = field(default_factory=dict)   # phase -> seconds

    @property
    def param_bytes(self) -> int:
        return sum(a.nbytes for a in self.params.values())

    def ops_around_fusion(self) -> tuple[int, int]:
        """Operator calls in main right before and right after the fuse phase."""
        before = [r.calls for r in self.passes if r.phase in ("graph", "quantize", "params", "legalize")]
        after = [r.calls for r in self.passes if r.phase in ("graph", "quantize", "params", "legalize", "fuse")]
        return (before[-1] if before else 0), (after[-1] if after else 0)


_ESTIMATE = re.compile(r"(Without|With) memory planning, there are \d+ constant-size memory allocation\(s\) "
                       r"with total size ([0-9.e+-]+) GB")


def estimate_memory(mod: tvm.IRModule) -> MemoryEstimate:
    text = relax.analysis.estimate_memory_usage(mod["main"])
    gib = {kind: float(size) for kind, size in _ESTIMATE.findall(text)}
    return MemoryEstimate(round(gib.get("Without", 0.0) * (1 << 30)), round(gib.get("With", 0.0) * (1 << 30)))


def compile_model(model: ImportedModel, target: Target, options: BuildOptions = BuildOptions(),
                  progress=None) -> CompiledModel:
    """Run the pass pipeline for the target and generate code; `progress(step)` reports each step."""
    tvm_target = target.tvm()
    pass_options = PassOptions(tvm_target, target, options.opt_level)
    planned = pipeline_for(pass_options, options.disabled_passes)
    memory = MemoryEstimate(0, 0)

    def observe(spec, mod):
        nonlocal memory
        if spec.phase in ("lower", "plan"):     # allocations are explicit here and not yet VM builtins
            memory = estimate_memory(mod)

    t0 = time.perf_counter()
    mod, records = run_pipeline(model.mod, planned, pass_options, options.dump_ir,
                                on_pass=lambda name: progress and progress(f"pass {name}"), after_pass=observe)
    t_passes = time.perf_counter() - t0
    mod, detached = relax.frontend.detach_params(mod)
    func = mod["main"]
    num_input = len(model.inputs)
    names = [p.name for p in func.params[num_input:]]
    params = {n: v.numpy() for n, v in zip(names, detached.get("main", []))}
    if len(params) != len(names):
        raise EdgecError(f"internal error: {len(names)} weight parameters but {len(params)} values",
                         "report this with the model and --dump-ir output")
    kernels = sum(1 for _, f in mod.functions_items() if isinstance(f, tvm.tirx.PrimFunc))
    if progress:
        progress("generate code")
    t0 = time.perf_counter()
    try:
        executable = tvm.compile(mod, tvm_target, relax_pipeline=None)
    except Exception as e:
        raise EdgecError(f"code generation for {target.name} failed: {last_line(e)}",
                         "rerun with --verbose; try -O0 to rule out an optimization") from e
    seconds = {"import": model.import_seconds, "passes": t_passes, "codegen": time.perf_counter() - t0}
    return CompiledModel(model, target, executable, params, records, planned, kernels, memory, seconds)


def export_library(compiled: CompiledModel, path: Path) -> float:
    """Link the model library with the target's compiler; returns seconds taken."""
    from tvm.support import cc

    from .toolchain import find_tool

    chain = compiled.target.toolchain
    compiler = find_tool(chain.compiler, chain.apt_package)
    t0 = time.perf_counter()
    try:
        compiled.executable.export_library(str(path), fcompile=cc.cross_compiler(compiler))
    except Exception as e:
        raise EdgecError(f"linking the model library with {chain.compiler} failed: {last_line(e)}",
                         f"check the toolchain: sudo apt-get install {chain.apt_package}") from e
    seconds = time.perf_counter() - t0
    compiled.seconds["link"] = seconds
    return seconds
