"""edgec bench: a host bundle and its peers, each in its own process, timed in alternating blocks.

A peer is another runtime that runs the same model file: the reference (onnxruntime or LiteRT) and IREE, which
compiles the ONNX model ahead of time like edgec does. Why this shape. Two runtimes in one process disturb each
other (worker threads that keep spinning after a run made onnxruntime 2x slower right after TVM), and timing one
runtime after the other lets drift, thermal throttling and other load hit them unequally. So each runtime runs
in its own spawned worker process, started once and kept alive, and the parent asks them for timed blocks
A, B, C, A, B, C, ...: only one runtime runs at a time, and slow changes of the machine hit all alike. All are
timed the same way, numpy arrays in and numpy arrays out (input binding, the run, output fetch), in one loop.

The parent also reads every worker thread's CPU time around each block (/proc/PID/task/TID/schedstat), which
gives the threads a runtime really used, not the number it was asked for, and the CPU the idle workers burnt
while another one was timed (0 when their threads sleep between blocks).
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from importlib.metadata import version
from typing import Callable, Sequence

import numpy as np

from .errors import EdgecError, last_line
from .manifest import Manifest, sha256_file
from .reference import DEFAULT_TOLERANCE, ReferenceRuntime, compare_outputs
from .signature import random_inputs
from .runtime import check_runs_here
from .toolchain import cache_dir, host_arch
from .workers import WorkerProcess, serve, thread_cpu_ns

TIMED = "numpy in -> numpy out (input binding, run, output fetch), the same loop for every runtime"
# A thread counts as used when it was on a CPU for at least this share of the timed wall time: the runtime's
# own pool threads are busy most of a block, while helper threads (Python's, a logger's) are near 0.
BUSY_FRACTION = 0.2
RUNNER_RSS = ("the bundle's C++ runner (edgec_run) in a process of its own: TVM runtime, library and params "
              "loaded, one run; not the timed workers")
SPREAD = "lowest and highest ratio of paired block medians (block i of edgec / block i of the peer)"
_CPU_FLAGS = ("avx2", "avx512f", "asimd")
# The peers by name, with their label. The reference is the ground truth: it failing is an error, and every
# other peer's outputs are checked against it before it is timed; another peer that cannot load the model or
# disagrees with the reference is left out of the timing with the reason, and the benchmark goes on.
PEERS = {"reference": "reference", "iree": "IREE"}
REQUIRED = ("edgec", "reference")
# Older models are converted to this opset before IREE imports them: its ONNX importer matches some operators
# only in their newer forms (PP-OCRv4 det's opset-12 BatchNormalization is "explicitly marked illegal").
IREE_IMPORT_OPSET = 17
# IREE untuned, for this CPU: the same footing as an untuned host bundle.
IREE_COMPILE_FLAGS = ("--iree-hal-target-device=local", "--iree-hal-local-target-device-backends=llvm-cpu",
                      "--iree-llvmcpu-target-cpu=host")


@dataclass(frozen=True)
class Machine:
    cpu: str                    # /proc/cpuinfo model name (the architecture where it has none)
    llvm_cpu: str               # what LLVM detects, so what a host bundle is compiled for
    flags: tuple[str, ...]      # which of _CPU_FLAGS the CPU has
    cores: int
    load_1min: float


@dataclass(frozen=True)
class Threads:
    configured: int                  # what the runtime was asked for
    used: int | None                 # threads on a CPU >= BUSY_FRACTION of the timed wall time; None: unknown
    cpu_fraction: tuple[float, ...]  # per thread, CPU time over timed wall time, descending (those >= 1%)


@dataclass(frozen=True)
class Block:
    runtime: str                     # "edgec" or a name in PEERS
    pid: int                         # the worker that ran it
    start: float                     # time.monotonic() in the worker: one clock for every process on Linux
    end: float
    times_ms: tuple[float, ...]
    wall_s: float                    # measured by the parent around the block
    cpu_s: dict[int, float] | None   # CPU seconds of each of the worker's threads over the block
    idle_cpu_s: dict[int, float] | None  # CPU seconds of each other worker over the block, by pid (None: unknown)


@dataclass(frozen=True)
class Latency:
    runtime: str                     # display name, e.g. "edgec (TVM 0.27.0)", "onnxruntime 1.20.1"
    pid: int
    warmup: int                      # runs in the untimed warm-up block
    times_ms: tuple[float, ...]      # every timed run, in order
    block_medians_ms: tuple[float, ...]
    median_ms: float
    p10_ms: float                    # p10 / p90: numpy.percentile (linear interpolation) over all timed runs
    p90_ms: float
    min_ms: float
    threads: Threads
    idle_cores: float | None         # CPU this worker used while others were timed, in cores (0: it slept)


@dataclass(frozen=True)
class Ratio:
    """edgec over a peer: above 1 means edgec is slower."""
    value: float                     # median of all edgec runs / median of all the peer's runs
    low: float                       # the spread: see SPREAD
    high: float


@dataclass(frozen=True)
class PeerResult:
    peer: str                        # a name in PEERS
    runtime: str                     # display name, e.g. "onnxruntime 1.20.1"; the label when it never loaded
    latency: Latency | None          # None: not timed, see skipped
    ratio: Ratio | None              # edgec over this peer
    skipped: str | None              # one line: why it was not timed (cannot load the model, wrong outputs)


@dataclass(frozen=True)
class CallTime:
    """One function the bundle's VM calls, profiled (`edgec bench --profile`)."""
    name: str                        # a TVM kernel, an offload backend's call site, or a VM builtin
    kind: str                        # "tvm", "vm" (a builtin: allocation, shape checks) or the backend's name
    calls: float                     # per run
    median_ms: float                 # per run: its calls' summed wall time, median over the profiled runs


@dataclass(frozen=True)
class BenchResult:
    edgec: Latency
    peers: tuple[PeerResult, ...]    # in the order their blocks ran after edgec's and the variants'
    blocks: tuple[Block, ...]        # timed blocks in the order they ran
    runs_per_block: int
    runner_peak_rss_bytes: int | None  # the C++ runner process (runtime + library + params, one run); not the workers
    machine: Machine
    timed: str = TIMED
    # other builds of the same model (e.g. --offload none), timed in the same alternation right after edgec's
    # blocks; `peer` is the label given, the ratio is edgec over the variant
    variants: tuple[PeerResult, ...] = ()
    # --profile: every function the VM called, in the edgec worker after its timed blocks, slowest first
    profile: tuple[CallTime, ...] = ()
    profile_runs: int = 0

    def ratio(self, runtime: Latency, peer: PeerResult) -> Ratio | None:
        """`runtime` (edgec or a variant) over a timed peer, from the blocks of the same run."""
        if peer.latency is None:
            return None
        return ratio_of_medians(*([b.times_ms for b in self.blocks if b.pid == pid]
                                  for pid in (runtime.pid, peer.latency.pid)))


# ---- pure statistics, tested on given numbers -------------------------------------------------------------

def ratio_of_medians(a_blocks: Sequence[Sequence[float]], b_blocks: Sequence[Sequence[float]]) -> Ratio:
    """Ratio of the medians of all runs of A and of B, with the spread of the per-block-pair ratios."""
    if len(a_blocks) != len(b_blocks) or not a_blocks:
        raise ValueError("need the same number of blocks, at least one, for both runtimes")
    pairs = [float(np.median(a)) / float(np.median(b)) for a, b in zip(a_blocks, b_blocks)]
    value = float(np.median(np.concatenate(a_blocks))) / float(np.median(np.concatenate(b_blocks)))
    return Ratio(value, min(pairs), max(pairs))


def threads_used(cpu_s: dict[int, float] | None, wall_s: float, configured: int) -> Threads:
    """Threads from per-thread CPU seconds summed over the timed blocks and the blocks' summed wall time."""
    if cpu_s is None:
        return Threads(configured, None, ())
    fractions = sorted((c / wall_s for c in cpu_s.values()), reverse=True)
    return Threads(configured, sum(f >= BUSY_FRACTION for f in fractions),
                   tuple(round(f, 3) for f in fractions if f >= 0.01))


def latency(runtime: str, pid: int, warmup: int, blocks: Sequence[Block], configured: int) -> Latency:
    """The summary of the worker `pid` from all timed blocks: its own, and the other worker's for idle CPU."""
    own = [b for b in blocks if b.pid == pid]
    others = [b for b in blocks if b.pid != pid]
    times = [t for b in own for t in b.times_ms]
    p10, median, p90 = (float(x) for x in np.percentile(times, [10, 50, 90]))
    cpu = None
    if all(b.cpu_s is not None for b in own):
        cpu = {}
        for b in own:
            for tid, s in b.cpu_s.items():
                cpu[tid] = cpu.get(tid, 0.0) + s
    idle = (sum(b.idle_cpu_s[pid] for b in others) / sum(b.wall_s for b in others)
            if others and all(b.idle_cpu_s is not None for b in others) else None)
    return Latency(runtime, pid, warmup, tuple(times), tuple(float(np.median(b.times_ms)) for b in own), median,
                   p10, p90, min(times), threads_used(cpu, sum(b.wall_s for b in own), configured), idle)


# ---- measuring --------------------------------------------------------------------------------------------

def _cpuinfo() -> tuple[str, frozenset[str]]:
    """(/proc/cpuinfo's model name, or the architecture where it has none; the CPU's feature flags)."""
    cpu, flags = platform.machine(), frozenset()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == platform.machine():
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
    except OSError:
        pass
    return cpu, flags


def machine() -> Machine:
    from tvm.target import codegen

    cpu, flags = _cpuinfo()
    return Machine(cpu, codegen.llvm_get_system_cpu(), tuple(f for f in _CPU_FLAGS if f in flags),
                   os.cpu_count() or 1, round(os.getloadavg()[0], 2))


def _cpu_delta(before: dict[int, int] | None, after: dict[int, int] | None) -> dict[int, float] | None:
    if before is None or after is None:
        return None
    return {tid: (ns - before.get(tid, 0)) / 1e9 for tid, ns in after.items()}


# ---- IREE ---------------------------------------------------------------------------------------------------

def _tool_error(stderr: str, limit: int = 200) -> str:
    """The reason in an IREE tool's stderr, on one table-sized line: its first 'error:' diagnostic (the notes
    after it repeat the IR), else the last line (a Python traceback's exception)."""
    m = re.search(r"error: (.+)", stderr)
    reason = m[1].strip() if m else last_line(Exception(stderr))
    return reason if len(reason) <= limit else reason[:limit - 3] + "..."


def iree_module(model: Path, inputs: dict[str, np.ndarray]) -> Path:
    """`model` compiled by iree-compile for this CPU, its inputs pinned to the shapes of `inputs` (the shapes the
    bundle was built for) and its opset raised to IREE_IMPORT_OPSET; cached in edgec's cache dir by the model's
    sha256, those shapes, the compiler's version and flags and the CPU. An EdgecError with IREE's own one-line
    reason when it cannot."""
    try:
        import onnx
        from iree.compiler import version as compiler
        from iree.compiler.tools.binaries import find_tool
    except ImportError:
        raise EdgecError("IREE is not installed", "pip install 'edgec[bench]'") from None
    if model.suffix.lower() != ".onnx":
        raise EdgecError(f"edgec compiles only .onnx models with IREE, not {model.name}")
    cpu, flags = _cpuinfo()
    key = json.dumps([sha256_file(model), {n: a.shape for n, a in sorted(inputs.items())}, compiler.VERSION,
                      compiler.REVISIONS, IREE_IMPORT_OPSET, IREE_COMPILE_FLAGS, cpu, sorted(flags)])
    vmfb = cache_dir() / "iree" / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.vmfb"
    if vmfb.exists():
        return vmfb
    vmfb.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=vmfb.parent) as tmp:
        pinned, mlir, out = Path(tmp, "model.onnx"), Path(tmp, "model.mlir"), Path(tmp, "model.vmfb")
        proto = onnx.load(model)
        for value in proto.graph.input:
            if value.name in inputs:       # models of IR version < 4 list their weights as inputs too
                for dim, n in zip(value.type.tensor_type.shape.dim, inputs[value.name].shape):
                    dim.dim_value = n      # replaces a symbolic dim_param: they are one protobuf oneof
        onnx.save(proto, pinned)
        for name, command in (("iree-import-onnx", [sys.executable, "-m", "iree.compiler.tools.import_onnx",
                                                    str(pinned), "--opset-version", str(IREE_IMPORT_OPSET),
                                                    "-o", str(mlir)]),
                              ("iree-compile", [find_tool("iree-compile"), str(mlir), *IREE_COMPILE_FLAGS,
                                                "-o", str(out)])):
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode:
                raise EdgecError(f"{name} cannot compile {model.name}: {_tool_error(done.stderr)}")
        os.replace(out, vmfb)              # atomic: a concurrent benchmark never maps a half-written module
    return vmfb


def _iree_runner(model: Path, threads: int, inputs: dict[str, np.ndarray]) -> Callable[[dict], dict]:
    """A numpy-in numpy-out run function of the model compiled by IREE, on the local-task driver with
    `threads` task workers."""
    vmfb = iree_module(model, inputs)              # first: it says so when IREE is not installed
    import iree.runtime as rt
    import onnx

    # Process-wide and read when the device is made; an explicit group count, not the default topology
    # ("physical_cores"), which would count SMT siblings as one.
    rt.flags.parse_flags(f"--task_topology_group_count={threads}")
    config = rt.Config("local-task")
    module = rt.VmModule.mmap(config.vm_instance, str(vmfb))
    (entry,) = (f for f in module.function_names if not f.startswith("__") and not f.endswith("$async"))
    function = rt.SystemContext(vm_modules=[module], config=config).modules[module.name][entry]
    graph = onnx.load(model, load_external_data=False).graph
    weights = {t.name for t in graph.initializer}
    input_names = [v.name for v in graph.input if v.name not in weights]
    output_names = [v.name for v in graph.output]

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        results = function(*(feeds[n] for n in input_names))
        results = results if isinstance(results, (tuple, list)) else (results,)
        return {n: r.to_host() for n, r in zip(output_names, results)}

    return run


# ---- workers ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerSpec:
    kind: str             # "edgec": path is a bundle directory; a name in PEERS: path is the model file
    path: Path
    threads: int


def _call_kind(name: str) -> str:
    from .offload import all_backends

    # offload-codegen names a call site <backend>_<pattern>_<n>; FuseOps' own name (kept where that one was taken)
    # ends in _<backend>
    backend = next((b for b in all_backends() if name.startswith(f"{b}_") or name.endswith(f"_{b}")), None)
    return backend or ("vm" if name.startswith("vm.builtin.") else "tvm")


def _profile_calls(model, inputs: dict[str, np.ndarray], runs: int) -> tuple[tuple, ...]:
    """In the edgec worker: each function the VM of run.py's `model` calls, timed through the VM's instrument hook
    (a Python call before and after each, a few microseconds), over `runs` runs; CallTime's fields, as plain tuples
    (the worker's module is __main__, whose classes the parent cannot unpickle)."""
    per_run: list[dict[str, list]] = []
    started: list[float] = []

    def hook(func, name, before, ret, *args):
        if before:
            started.append(time.perf_counter())
        else:
            slot = per_run[-1].setdefault(str(name), [0, 0.0])
            slot[0] += 1
            slot[1] += time.perf_counter() - started.pop()
        return 0    # run the call (VMInstrumentReturnKind.NO_OP)

    model.vm.set_instrument(hook)
    try:
        for _ in range(runs):
            per_run.append({})
            model.run(inputs)
    finally:
        model.vm.set_instrument(None)
    names = {name for run in per_run for name in run}
    rows = [(name, _call_kind(name), sum(r.get(name, (0, 0))[0] for r in per_run) / runs,
             float(np.median([r.get(name, (0, 0.0))[1] for r in per_run])) * 1e3) for name in names]
    return tuple(sorted(rows, key=lambda r: -r[3]))


def _load(spec: WorkerSpec, inputs: dict[str, np.ndarray]) -> tuple[str, Callable[[dict], dict], dict,
                                                                      Callable[[int], tuple] | None]:
    """In the worker: (display name, numpy-in numpy-out run function, the outputs of one untimed run, the profiler:
    runs -> _profile_calls's rows, for an edgec bundle)."""
    profiler = None
    if spec.kind == "edgec":
        import tvm

        from .runtime.local import load_bundle

        model = load_bundle(spec.path, spec.threads)
        run, name = model.run, f"edgec (TVM {tvm.__version__})"
        profiler = functools.partial(_profile_calls, model, inputs)
    elif spec.kind == "iree":
        run = _iree_runner(spec.path, spec.threads, inputs)
        name = f"IREE {version('iree-base-runtime')} (llvm-cpu)"
    else:
        ref = ReferenceRuntime(spec.path, threads=spec.threads)
        run, name = ref.run, ref.name
    return name, run, run(inputs), profiler


def _serve(request) -> tuple:
    """In the worker: load one runtime; ready with (name, outputs of one untimed run); then per request (a run
    count), the block's (start, end, times_ms), or for ("profile", runs) an edgec bundle's _profile_calls."""
    spec, inputs = request
    name, run, outputs, profiler = _load(spec, inputs)

    def block(runs) -> tuple:
        if isinstance(runs, tuple):
            return profiler(runs[1])
        start, times = time.monotonic(), []
        for _ in range(runs):
            t0 = time.perf_counter()
            run(inputs)
            times.append((time.perf_counter() - t0) * 1e3)
        return start, time.monotonic(), tuple(times)

    return (name, outputs), block


class _Worker(WorkerProcess):
    """The parent's handle on one runtime's worker process (`python -m edgec.benchmark worker`)."""

    def __init__(self, spec: WorkerSpec, inputs: dict[str, np.ndarray]):
        super().__init__("edgec.benchmark", (spec, inputs), what=f"the {spec.kind} worker",
                         hint="run the bundle with 'edgec run' to see the failure" if spec.kind == "edgec" else None)
        self.spec = spec
        self.name = PEERS.get(spec.kind, spec.kind)    # until the worker says which runtime it loaded

    def wait_ready(self) -> dict[str, np.ndarray]:
        """The outputs of the worker's untimed first run, once it has loaded its runtime."""
        self.name, outputs = self.receive("ready")
        return outputs

    def profile(self, runs: int) -> tuple[CallTime, ...]:
        self.send(("profile", runs))
        return tuple(CallTime(*row) for row in self.receive("answer"))

    def block(self, runs: int, others: Sequence["_Worker"]) -> Block:
        before = thread_cpu_ns(self.pid)
        others_before = [thread_cpu_ns(o.pid) for o in others]
        t0 = time.perf_counter()
        self.send(runs)
        start, end, times = self.receive("answer")
        wall = time.perf_counter() - t0
        cpu = _cpu_delta(before, thread_cpu_ns(self.pid))
        idle = [_cpu_delta(b, thread_cpu_ns(o.pid)) for o, b in zip(others, others_before)]
        self.wait_until_idle()
        return Block(self.spec.kind, self.pid, start, end, times, wall, cpu,
                     None if None in idle else {o.pid: sum(d.values()) for o, d in zip(others, idle)})


@dataclass(frozen=True)
class Timing:
    names: tuple[str, ...]          # per worker spec: the runtime's display name
    pids: tuple[int, ...]           # per worker spec: its process
    skipped: tuple[str | None, ...]  # per worker spec: why it was left out of the timing; None: it was timed
    blocks: tuple[Block, ...]       # the timed blocks in the order they ran
    profile: tuple[CallTime, ...] = ()   # profile_runs: the first worker's (an edgec bundle's) calls


def run_blocks(specs: Sequence[WorkerSpec], inputs: dict[str, np.ndarray], *, runs: int, blocks: int,
               warmup: int, check: Callable[[dict[str, np.ndarray]], str | None] | None = None,
               profile_runs: int = 0) -> Timing:
    """Start one worker per spec, give each an untimed warm-up block on its own, then `blocks` rounds of one
    timed block per worker in spec order: A, B, C, A, B, C, ... A worker of a kind not in REQUIRED that fails to
    load, or whose first outputs `check` refuses (it returns the reason), is stopped and left out with the
    reason; any other failure raises. With `profile_runs`, the first worker (an edgec bundle's) then profiles its
    calls over that many runs, after the timed blocks. Workers are stopped on return."""
    workers, skipped = [], {}
    try:
        for spec in specs:                        # they load in parallel
            workers.append(_Worker(spec, inputs))
        for w in workers:
            try:
                outputs = w.wait_ready()
                if check is not None and w.spec.kind not in REQUIRED and (reason := check(outputs)):
                    skipped[w.pid] = reason
            except EdgecError as e:
                if w.spec.kind in REQUIRED:
                    raise
                skipped[w.pid] = str(e)
            if w.pid in skipped:
                w.stop()
        timed_workers = [w for w in workers if w.pid not in skipped]
        for w in timed_workers:
            if warmup:
                w.block(warmup, ())
        timed = [w.block(runs, [o for o in timed_workers if o is not w])
                 for _ in range(blocks) for w in timed_workers]
        profile = workers[0].profile(profile_runs) if profile_runs else ()
    finally:
        for w in workers:
            w.stop()
    return Timing(tuple(w.name for w in workers), tuple(w.pid for w in workers),
                  tuple(skipped.get(w.pid) for w in workers), tuple(timed), profile)


def _agrees_with_reference(model: Path, inputs: dict[str, np.ndarray]) -> Callable[[dict], str | None]:
    """check for run_blocks: None when outputs match the reference runtime's on `inputs` (the tolerance every
    edgec check uses), else the one-line reason. The reference runs in this process once, on one thread (no
    pool left spinning beside the workers), and only if a peer needs checking."""
    @functools.cache
    def reference() -> tuple[str, dict[str, np.ndarray]]:
        ref = ReferenceRuntime(model, threads=1)
        return ref.name, ref.run(inputs)

    def check(outputs: dict[str, np.ndarray]) -> str | None:
        name, expected = reference()
        comparison = compare_outputs(outputs, expected, DEFAULT_TOLERANCE, against=name)
        if comparison.ok:
            return None
        worst = max(comparison.outputs.values(), key=lambda o: (not o.ok, o.max_rel))
        return (f"outputs differ from {name} on '{worst.name}': " + (worst.problem or f"max abs error "
                f"{worst.max_abs:.3g} ({worst.max_rel:.3g} of its range)") + f", beyond atol="
                f"{DEFAULT_TOLERANCE.atol:g} + rtol={DEFAULT_TOLERANCE.rtol:g} * max|ref|")

    return check


def bench(bundle_dir: str | Path, *, runs: int = 10, blocks: int = 6, warmup: int = 5, threads: int | None = None,
          compare_model: str | Path | None = None, peers: Sequence[str] = ("reference",),
          measure_memory: bool = True, variants: Sequence[tuple[str, str | Path]] = (),
          profile_runs: int = 0) -> BenchResult:
    """Time a host bundle in `blocks` blocks of `runs` runs after a warm-up block of `warmup` runs; with
    compare_model, each of `peers` (names in PEERS) too on that model, each in its own process, the blocks
    alternated edgec, variant 1, ..., peer 1, peer 2, ... `variants` are (label, bundle) of other builds of the
    same model. All on the same random input (seed 0) with the same number of threads (default: the bundle
    target's)."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    for path in (bundle_dir, *(Path(v) for _, v in variants)):
        other = Manifest.load(path)
        if other.arch != host_arch():
            raise EdgecError(f"edgec bench times host bundles; {path} is for {other.arch}",
                             "build with --target host, or time it on the board with run.py --repeat")
        check_runs_here(other.target)
        if other.inputs != manifest.inputs:
            raise EdgecError(f"{path} takes other inputs than {bundle_dir}", "compare builds of one model")
    if runs < 1 or blocks < 1 or warmup < 0:
        raise EdgecError("runs and blocks must be at least 1, warmup at least 0")
    if unknown := [p for p in peers if p not in PEERS]:
        raise EdgecError(f"unknown peer {unknown[0]!r}", f"choose from {', '.join(PEERS)}")
    peers = tuple(dict.fromkeys(peers)) if compare_model is not None else ()
    threads = threads or manifest.target.device.threads
    host = machine()                              # before this run adds to the load average
    inputs = random_inputs(manifest.inputs)
    model = Path(compare_model).resolve() if peers else None
    specs = [WorkerSpec("edgec", bundle_dir, threads),
             *(WorkerSpec("edgec", Path(path).resolve(), threads) for _, path in variants),
             *(WorkerSpec(peer, model, threads) for peer in peers)]
    timing = run_blocks(specs, inputs, runs=runs, blocks=blocks, warmup=warmup,
                        check=_agrees_with_reference(model, inputs) if peers else None, profile_runs=profile_runs)

    def own_blocks(pid: int) -> list[tuple[float, ...]]:
        return [b.times_ms for b in timing.blocks if b.pid == pid]

    results = []
    labels = [label for label, _ in variants] + list(peers)
    for label, name, pid, reason in zip(labels, timing.names[1:], timing.pids[1:], timing.skipped[1:]):
        results.append(PeerResult(label, name, None, None, reason) if reason else PeerResult(
            label, name, latency(name, pid, warmup, timing.blocks, threads),
            ratio_of_medians(own_blocks(timing.pids[0]), own_blocks(pid)), None))
    peak = None
    if measure_memory:
        from .runtime.native import run_with_runner

        peak = run_with_runner(bundle_dir, inputs, threads=threads).peak_rss_bytes
    return BenchResult(latency(timing.names[0], timing.pids[0], warmup, timing.blocks, threads),
                       tuple(results[len(variants):]), timing.blocks, runs, peak, host,
                       variants=tuple(results[:len(variants)]), profile=timing.profile, profile_runs=profile_runs)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    serve(_serve)
