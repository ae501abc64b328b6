"""`--offload auto`: each operator group the backends took is timed on this machine against TVM's own kernel for
the same group, and the faster is kept; the groups TVM wins go back into the graph (un-partitioned), where
TVM's pipeline fuses them like any other operator. An int8 chain's TVM kernel is its integer kernel (int8-kernels');
a chain without one stays offloaded, untimed.

Why this shape. A library call has a fixed cost (a primitive to run, a thread team to wake) that a small group does
not earn back, and where that line falls depends on the CPU and the thread count, so it is measured, not guessed.
Equal groups are measured once (same pattern, shapes and attributes: the structural hash of the group), all groups
of one variant are compiled into one module (one compile, one link per variant, not per group), and each variant
runs in a worker process of its own, the two timed in alternated rounds with edgec.benchmark's method (only one
process runs at a time, the next starting once the last one's threads are idle): per round the lowest of a few
repeats, then the median over rounds. Decisions are cached in the user's cache, keyed by the CPU, the thread count,
TVM's version, the backend's code, TVM's kernels' code and the group, so a rebuild does not measure again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import tvm
import tvm_ffi
from tvm import relax

from ..context import BuildContext
from ..errors import EdgecError
from ..passes import int8_kernels
from ..runtime import bundle_runner
from ..workers import WorkerProcess, WorkerTimeout, serve
from .backend import Backend
from .fusion import read_fused, static_shape
from .quantized import is_quantized, read_quantized
from .passes import LOAD_SUFFIX, Measured, Placement, placement_of, with_placement

TIME_LIMIT_S = 120.0       # timing both variants (compiling them is not counted): rounds run while they fit
ROUNDS = 5                 # alternated rounds per variant; each gives one value per group, the median is kept
REPEATS = 5                # per round and group: repeats of at least MIN_REPEAT_MS each, the lowest kept (load
MIN_REPEAT_MS = 1          # from other processes only adds time: a stalled thread team, on 2 busy cores 12 ms)
_CACHE = "offload-auto"


@dataclass(frozen=True)
class Group:
    """One partitioned function in main (FuseOpsByPattern made one per distinct group)."""
    symbol: str            # its name in the module
    backend: str
    composite: str         # the backend's pattern, e.g. "onednn.conv2d_bias_clip"
    operator: str          # the anchor, e.g. "conv2d"
    shape: str             # the data input's shape, e.g. "1x48x48x16"
    calls: int             # call sites in main
    key: str               # what its timings are cached under (see _cache_key)


@dataclass(frozen=True)
class Timing:
    backend_ms: float
    tvm_ms: float

    @property
    def library_wins(self) -> bool:
        return self.backend_ms <= self.tvm_ms   # a tie keeps the descriptor's choice


def check_target(target) -> None:
    """auto measures here: the target's code must be this machine's (architecture and CPU), with a backend."""
    from tvm.target import codegen

    from . import for_target
    from ..toolchain import host_arch

    here, cpu = host_arch(), codegen.llvm_get_system_cpu()
    mcpu = target.tvm_target.get("mcpu")
    if target.arch != here or mcpu not in (None, cpu) or target.device.kind != "cpu":
        theirs = ", ".join(filter(None, (target.arch, mcpu, None if target.device.kind == "cpu" else
                                         target.device.kind)))
        raise EdgecError(f"--offload auto measures each operator on this machine ({here}, {cpu}), which cannot "
                         f"run {target.name}'s code ({theirs})",
                         f"pass --offload {','.join(for_target(target)) or 'none'} or --offload none for "
                         f"{target.name} (measuring on the board over RPC comes with tuning)")
    if not for_target(target):
        raise EdgecError(f"--offload auto: {target.name} lists no offload backend for {target.arch}",
                         "pass --offload none, or a backend name")


def auto_pass(ctx: BuildContext, backends: tuple[Backend, ...]) -> Callable[[tvm.IRModule], tvm.IRModule]:
    """The offload-auto step. A Python callable, not a tvm Pass: an exception raised inside a Python pass comes
    out of TVM's FFI as a RuntimeError, and a user error or Ctrl-C while measuring must reach the build as it is."""
    def offload_auto(mod: tvm.IRModule) -> tvm.IRModule:
        groups = find_groups(mod, ctx, backends)
        if not groups:
            return mod
        timings = {g.key: t for g in groups if (t := _cached(g.key)) is not None}
        missing = list({g.key: g for g in groups if g.key not in timings}.values())
        if missing:
            measured = measure(mod, missing, ctx, backends)
            for key, timing in measured.items():
                _store(key, timing)
            timings.update(measured)
        return decide(mod, groups, timings, ctx.tvm_target())

    return offload_auto


def find_groups(mod: tvm.IRModule, ctx: BuildContext, backends: tuple[Backend, ...]) -> list[Group]:
    """The partitioned functions main calls, in first-call order, with their call counts and cache keys."""
    calls: dict[str, int] = {}
    for call in _partition_calls(mod):
        calls[call.op.name_hint] = calls.get(call.op.name_hint, 0) + 1
    first = _first_calls(mod)
    by_name = {b.name: b for b in backends}
    context = _context_key(ctx)
    target = ctx.tvm_target()
    groups = []
    for symbol, count in calls.items():
        func = mod[symbol]
        backend = by_name[str(func.attrs["Codegen"])]
        # an int8 chain's TVM side is its integer kernel (int8-kernels'), built from the constants main passes it;
        # where it has none, TVM's alternative would be the float QDQ operators: it stays offloaded
        quantized = is_quantized(func)
        if quantized and not (int8_kernels.takes(func, target) and all(
                isinstance(first[symbol].args[k], tvm.ir.expr.GenericConst) for k in backend.operands(func).packed)):
            continue
        fused = read_quantized(func) if quantized else read_fused(func)
        shape = "x".join(map(str, static_shape(fused.anchor.args[0]) or ["?"]))
        structure = tvm_ffi.structural_hash(_plain(func), map_free_vars=True)
        key = hashlib.sha256(json.dumps([context, backend.name, _code_digest(backend), fused.composite,
                                         structure], default=str).encode()).hexdigest()[:32]
        groups.append(Group(symbol, backend.name, fused.composite, fused.anchor.op.name.rsplit(".", 1)[-1], shape,
                            count, key))
    return groups


def _partition_calls(mod: tvm.IRModule) -> list[relax.Call]:
    """main's calls of partitioned functions, in order."""
    return [b.value for block in mod["main"].body.blocks for b in block.bindings
            if isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.GlobalVar)
            and "Codegen" in (mod[b.value.op].attrs or {})]


def _first_calls(mod: tvm.IRModule) -> dict[str, relax.Call]:
    """main's first call of each partitioned function, by name."""
    first: dict[str, relax.Call] = {}
    for call in _partition_calls(mod):
        first.setdefault(call.op.name_hint, call)
    return first


def decide(mod: tvm.IRModule, groups: list[Group], timings: dict[str, Timing],
           target: tvm.target.Target) -> tvm.IRModule:
    """Keep the groups whose library call is faster; inline the others back into main as plain operators (an int8
    chain: its integer kernel); record each decision with both timings in the placement."""
    timed = Counter()
    for g in groups:
        timed[(g.operator, g.backend, g.composite)] += g.calls
    # the checks' refusals stay as they were, and so do the offloaded calls auto did not time (int8 chains without
    # an integer kernel in TVM)
    rows = [p if p.backend is None else replace(p, count=p.count - timed[(p.operator, p.backend, p.detail)])
            for p in placement_of(mod) or ()]
    rows = [p for p in rows if p.count > 0]
    losers = [g for g in groups if not timings[g.key].library_wins]
    if losers:
        mod = mod.clone()   # IRModule assignment mutates in place; the pass must not touch its input
        chains = {g.symbol for g in losers if is_quantized(mod[g.symbol])}
        for g in losers:
            if g.symbol not in chains:
                mod[mod.get_global_var(g.symbol)] = _plain(mod[g.symbol])
        mod = tvm.transform.Sequential([relax.transform.InlinePrivateFunctions(),
                                        relax.transform.CanonicalizeBindings()])(mod)
        if chains:      # an int8 chain goes back to TVM as its integer kernel, which int8-kernels gave the others
            mod = int8_kernels.replace_chains(mod, target, chains)
    for g in groups:
        t = timings[g.key]
        measured = Measured(f"{g.composite} {g.shape}", g.backend, t.backend_ms, t.tvm_ms)
        if t.library_wins:
            rows.append(Placement(g.operator, g.backend, f"{g.composite} on {g.shape}; auto: {g.backend} "
                                  f"{_ms(t.backend_ms)} vs TVM {_ms(t.tvm_ms)}", g.calls, measured))
        else:
            rows.append(Placement(g.operator, None, f"auto: TVM {_ms(t.tvm_ms)} vs {g.backend} {_ms(t.backend_ms)} "
                                  f"({g.composite} on {g.shape})", g.calls, measured))
    return with_placement(mod, rows)


def _ms(ms: float) -> str:
    return f"{ms:.3g} ms"


def _plain(func: relax.Function) -> relax.Function:
    """A partitioned function as the plain operators it groups: its composite function, private (so that
    InlinePrivateFunctions puts its body where it is called) and without the Composite attribute."""
    inner = []
    relax.analysis.post_order_visit(func.body, lambda e: inner.append(e) if isinstance(e, relax.Function) else None)
    return inner[0].without_attr("Composite")


# ---- the cache ----------------------------------------------------------------------------------------------

def _context_key(ctx: BuildContext) -> list:
    """What TVM's side of a timing depends on besides the group: this CPU, the threads and how idle ones wait, TVM
    and how it lowers."""
    from ..benchmark import _cpuinfo
    from ..passes import cpu_schedule, dot_products

    cpu, flags = _cpuinfo()
    return [cpu, sorted(flags), ctx.target.tvm_target, ctx.target.device.threads, tvm.__version__, ctx.opt_level,
            ctx.target.tvm_pass_config, [s.name for s in _lowering(ctx)],
            [_file_digest(m.__file__) for m in (cpu_schedule, int8_kernels, dot_products)], _spin_settings()]


def _code_digest(backend: Backend) -> str:
    """The backend's code: its module, and the shared pattern and C++ helpers its emitter uses."""
    from . import backend as backend_module, fusion

    files = (sys.modules[backend.emit.__module__].__file__, backend_module.__file__, fusion.__file__)
    return hashlib.sha256("".join(_file_digest(f) for f in files).encode()).hexdigest()


def _file_digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _cache_path(key: str) -> Path:
    from ..toolchain import cache_dir

    return cache_dir() / _CACHE / f"{key}.json"


def _cached(key: str) -> Timing | None:
    try:
        data = json.loads(_cache_path(key).read_text())
        timing = Timing(float(data["backend_ms"]), float(data["tvm_ms"]))
    except (OSError, ValueError, KeyError, TypeError):   # absent, or damaged: measured again
        return None
    return timing if all(np.isfinite([timing.backend_ms, timing.tvm_ms])) else None


def _store(key: str, timing: Timing) -> None:
    from ..fsutil import atomic_write

    path = _cache_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps({"backend_ms": timing.backend_ms, "tvm_ms": timing.tvm_ms}))


# ---- measuring ----------------------------------------------------------------------------------------------

def _lowering(ctx: BuildContext):
    """The steps the build runs on the partitioned graph: the backends' codegen and TVM's lowering phases (with
    cpu-default-schedule), as planned for this build (-O level, disabled passes). lift-params is not among them:
    the groups' weights are parameters already."""
    from ..passes import plan
    from ..passes.registry import PHASES

    return [s for s in plan(ctx) if s.enabled and (s.name == "offload-codegen" or
                                                   PHASES.index(s.phase) > PHASES.index("params"))]


def measure(mod: tvm.IRModule, groups: list[Group], ctx: BuildContext,
            backends: tuple[Backend, ...]) -> dict[str, Timing]:
    """Timings by cache key of `groups` (one per key): both variants compiled, linked and timed in workers."""
    from ..build import link_library

    steps = _lowering(ctx)
    with tempfile.TemporaryDirectory(prefix="offload-auto-") as tmp:
        libraries = []
        for library in (True, False):
            variant = _variant(mod, groups, library, backends, ctx.tvm_target())
            # a context of its own: the build's timer counts the build's passes, not these
            with tvm.transform.PassContext(opt_level=ctx.opt_level, config=ctx.target.tvm_pass_config):
                lowered = tvm.transform.Sequential([s.make(ctx) for s in steps], name="OffloadAutoLowering")(variant)
                executable = tvm.compile(lowered, ctx.tvm_target(), relax_pipeline=None)
            path = Path(tmp) / ("backend.so" if library else "tvm.so")
            link_library(executable, ctx.target, backends if library else (), path)
            libraries.append(path)
        by_name = {b.name: b for b in backends}
        shapes = []
        for g in groups:
            params = mod[g.symbol].params
            order, num_input = _order(mod[g.symbol], by_name[g.backend])
            shapes.append(([(static_shape(params[k]), str(params[k].ty.dtype)) for k in order], num_input))
        backend_ms, tvm_ms = _time(libraries, shapes, ctx.target.device.threads)
    return {g.key: Timing(b, t) for g, b, t in zip(groups, backend_ms, tvm_ms)}


def _order(func: relax.Function, backend: Backend) -> tuple[list[int], int]:
    """A group's parameters as g<i> takes them, as main does: the operands computed at run time first (the inputs),
    then those the backend packs at load (the weights); and how many come first. An operand the backend reads not
    at all (Operands) is an input here: g<i>_load leaves it out, as main_load does."""
    packed = backend.operands(func).packed
    runtime = [k for k in range(len(func.params)) if k not in packed]
    return runtime + list(packed), len(runtime)


def _variant(mod: tvm.IRModule, groups: list[Group], library: bool, backends: tuple[Backend, ...],
             target: tvm.target.Target) -> tvm.IRModule:
    """One module with a public function g<i>(inputs, weights) per group: calling its partitioned function (library;
    offload-codegen gives it g<i>_load, which packs the weights once) or holding its operators inlined (TVM; an int8
    chain: its integer kernel, built from main's constants, the weights passed to g<i> unused)."""
    by_name = {b.name: b for b in backends}
    bb = relax.BlockBuilder()
    chains, first = set(), _first_calls(mod)
    for i, g in enumerate(groups):
        func = mod[g.symbol]
        chain = not library and is_quantized(func)
        callee = bb.add_func(func if library or chain else _plain(func), g.symbol)
        order, num_input = _order(func, by_name[g.backend])
        params = [relax.Var(func.params[k].name, func.params[k].ty) for k in order]
        args = [params[order.index(k)] for k in range(len(order))]
        if chain:
            chains.add(g.symbol)
            args = [a if k in order[:num_input] else c for k, (a, c) in enumerate(zip(args, first[g.symbol].args))]
        with bb.function(f"g{i}", params, {"num_input": num_input}):
            with bb.dataflow():
                out = bb.emit_output(relax.Call(callee, args))
            bb.emit_func_output(out)
    variant = bb.get()
    if library:
        return variant
    if chains:
        variant = int8_kernels.replace_chains(variant, target, chains)
    return relax.transform.InlinePrivateFunctions()(variant)


_MEASURE_HINT = "pass the backends by name (--offload onednn) or --offload none to build without measuring"


def timing_environment(threads: int) -> dict[str, str]:
    """What the timing workers add to this process's environment: what the bundle's runners add (run.py's
    offload_thread_environment: TVM's idle pool asleep and unpinned, OpenMP's spin shortened, unless this environment
    says otherwise, OMP_WAIT_POLICY included), on the target's threads."""
    return {**bundle_runner().offload_thread_environment(os.environ), "TVM_NUM_THREADS": str(threads)}


def _spin_settings() -> dict[str, str | None]:
    """How idle threads wait in the timing workers, as in the runners: part of a timing's cache key."""
    env = {**os.environ, **timing_environment(1)}
    return {k: env.get(k) for k in ("TVM_THREAD_POOL_SPIN_COUNT", "TVM_BIND_THREADS", "GOMP_SPINCOUNT",
                                    "OMP_WAIT_POLICY")}


def _time(libraries: list[Path], shapes: list, threads: int) -> tuple[list[float], ...]:
    """Per library, each group's time in ms: the median over alternated rounds, one worker process per library."""
    deadline = time.monotonic() + TIME_LIMIT_S
    env = timing_environment(threads)
    workers = []
    try:
        for path in libraries:
            workers.append(WorkerProcess(__name__, (str(path), shapes), env=env, hint=_MEASURE_HINT,
                                         what=f"--offload auto: timing {path.stem}'s kernels"))
        for w in workers:
            w.receive("ready", deadline)              # loaded, each group called once (weights packed)
        rounds: list[list[tuple[float, ...]]] = [[] for _ in workers]
        started = time.monotonic()
        while len(rounds[0]) < ROUNDS:
            for w, results in zip(workers, rounds):
                w.send(True)
                results.append(w.receive("answer", deadline))
                w.wait_until_idle()               # library and TVM threads spin after a call
            per_round = (time.monotonic() - started) / len(rounds[0])
            if time.monotonic() + per_round > deadline:
                break
    except WorkerTimeout:
        raise EdgecError(f"--offload auto: timing the operator groups took over {TIME_LIMIT_S:.0f} s",
                         _MEASURE_HINT) from None
    finally:
        for w in workers:
            w.stop()
    return tuple([float(np.median(col)) for col in zip(*results)] for results in rounds)


def _serve(request) -> tuple:
    """In the worker: load one library, make random inputs and weights for each group (packed by its load function
    where it has one) and call each once (ready); then per request, each group's lowest of REPEATS timed repeats in
    ms. The calls are timed back to back in the VM (time_evaluator), as a model's kernels run, without Python
    between them."""
    library, shapes = request
    device = tvm.cpu()
    vm = relax.VirtualMachine(tvm.runtime.load_module(library), device)
    rng = np.random.default_rng(0)
    args = []
    for i, (group, num_input) in enumerate(shapes):
        a = [tvm.runtime.tensor((rng.standard_normal(s) * 0.1).astype(dtype), device) for s, dtype in group]
        if vm.module.implements_function(f"g{i}{LOAD_SUFFIX}"):   # the library's: packed here, as at a model's load
            a = a[:num_input] + list(vm[f"g{i}{LOAD_SUFFIX}"](*a[num_input:]))
        args.append(a)
    timers = [vm.time_evaluator(f"g{i}", device, number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS)
              for i in range(len(args))]
    for i, a in enumerate(args):
        vm[f"g{i}"](*a)
    return None, lambda _: tuple(min(timer(*a).results) * 1e3 for timer, a in zip(timers, args))


def manifest_decisions(placement: tuple[Placement, ...] | None) -> tuple:
    """The manifest's `offload_auto` entries (docs/bundle-format.md) for the placement's measured groups."""
    from ..manifest import OffloadDecision

    return tuple(OffloadDecision(p.operator, p.measured.group, p.count, p.measured.backend, p.measured.backend_ms,
                                 p.measured.tvm_ms, p.backend or "tvm")
                 for p in placement or () if p.measured is not None)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    serve(_serve)
