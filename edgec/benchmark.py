"""edgec bench: a host bundle and its reference runtime, each in its own process, timed in alternating blocks.

Why this shape. Two runtimes in one process disturb each other (worker threads that keep spinning after a run
made onnxruntime 2x slower right after TVM), and timing one runtime after the other lets drift, thermal
throttling and other load hit them unequally. So each runtime runs in its own spawned worker process, started
once and kept alive, and the parent asks them for timed blocks A, B, A, B, ...: only one runtime runs at a
time, and slow changes of the machine hit both alike. Both are timed the same way, numpy arrays in and numpy
arrays out (input binding, the run, output fetch), in the same loop.

The parent also reads every worker thread's CPU time around each block (/proc/PID/task/TID/schedstat), which
gives the threads a runtime really used, not the number it was asked for, and the CPU the idle worker burnt
while the other one was timed (0 when its threads sleep between blocks).
"""
from __future__ import annotations

import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .errors import EdgecError, last_line
from .manifest import Manifest
from .signature import random_inputs
from .toolchain import host_arch

TIMED = "numpy in -> numpy out (input binding, run, output fetch), the same loop for both runtimes"
# A thread counts as used when it was on a CPU for at least this share of the timed wall time: the runtime's
# own pool threads are busy most of a block, while helper threads (Python's, a logger's) are near 0.
BUSY_FRACTION = 0.2
RUNNER_RSS = ("the bundle's C++ runner (edgec_run) in a process of its own: TVM runtime, library and params "
              "loaded, one run; not the timed workers")
SPREAD = "lowest and highest ratio of paired block medians (block i of edgec / block i of the reference)"
_CPU_FLAGS = ("avx2", "avx512f", "asimd")


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
    runtime: str                     # "edgec" or "reference"
    pid: int                         # the worker that ran it
    start: float                     # time.monotonic() in the worker: one clock for every process on Linux
    end: float
    times_ms: tuple[float, ...]
    wall_s: float                    # measured by the parent around the block
    cpu_s: dict[int, float] | None   # CPU seconds of each of the worker's threads over the block
    idle_cpu_s: float | None         # CPU seconds of the other worker over the block (None: no other worker)


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
    idle_cores: float | None         # CPU this worker used while the other was timed, in cores (0: it slept)


@dataclass(frozen=True)
class Ratio:
    """edgec over the reference: above 1 means edgec is slower."""
    value: float                     # median of all edgec runs / median of all reference runs
    low: float                       # the spread: see SPREAD
    high: float


@dataclass(frozen=True)
class BenchResult:
    edgec: Latency
    reference: Latency | None
    ratio: Ratio | None
    blocks: tuple[Block, ...]        # timed blocks in the order they ran
    runs_per_block: int
    runner_peak_rss_bytes: int | None  # the C++ runner process (runtime + library + params, one run); not the workers
    machine: Machine
    timed: str = TIMED

    @property
    def reference_name(self) -> str | None:
        return self.reference.runtime if self.reference else None


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
    idle = (sum(b.idle_cpu_s for b in others) / sum(b.wall_s for b in others)
            if others and all(b.idle_cpu_s is not None for b in others) else None)
    return Latency(runtime, pid, warmup, tuple(times), tuple(float(np.median(b.times_ms)) for b in own), median,
                   p10, p90, min(times), threads_used(cpu, sum(b.wall_s for b in own), configured), idle)


# ---- measuring --------------------------------------------------------------------------------------------

def machine() -> Machine:
    from tvm.target import codegen

    cpu, flags = platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and cpu == platform.machine():
                cpu = value.strip()
            elif key.strip() in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return Machine(cpu, codegen.llvm_get_system_cpu(), tuple(f for f in _CPU_FLAGS if f in flags),
                   os.cpu_count() or 1, round(os.getloadavg()[0], 2))


def thread_cpu_ns(pid: int) -> dict[int, int] | None:
    """Nanoseconds each thread of a process has run (schedstat's first field); None where the kernel has none."""
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:       # the thread exited between listing and reading
            continue
        except OSError:
            return None
    return out


def _wait_until_idle(pid: int, poll_s: float = 0.01, limit_s: float = 2.0) -> None:
    """Return once a process uses under 10% of one core over a poll: runtimes' pool threads spin for a while
    after a run (onnxruntime's do by default), which would slow the other runtime's next block down."""
    deadline = time.monotonic() + limit_s
    last = thread_cpu_ns(pid)
    while last is not None and time.monotonic() < deadline:
        time.sleep(poll_s)
        now = thread_cpu_ns(pid)
        if now is None or sum(now.values()) - sum(last.values()) < 0.1 * poll_s * 1e9:
            return
        last = now


def _cpu_delta(before: dict[int, int] | None, after: dict[int, int] | None) -> dict[int, float] | None:
    if before is None or after is None:
        return None
    return {tid: (ns - before.get(tid, 0)) / 1e9 for tid, ns in after.items()}


@dataclass(frozen=True)
class WorkerSpec:
    kind: str             # "edgec": path is a bundle directory; "reference": path is the model file
    path: Path
    threads: int


def _load(spec: WorkerSpec, inputs: dict[str, np.ndarray]) -> tuple[str, Callable[[dict], object]]:
    """In the worker: (display name, numpy-in numpy-out run function), after one untimed run."""
    if spec.kind == "edgec":
        import tvm

        from .runtime.local import load_bundle

        run, name = load_bundle(spec.path, spec.threads).run, f"edgec (TVM {tvm.__version__})"
    else:
        from .reference import ReferenceRuntime

        ref = ReferenceRuntime(spec.path, threads=spec.threads)
        run, name = ref.run, ref.name
    run(inputs)
    return name, run


def _worker_main() -> None:
    """`python -m edgec.benchmark worker`: load one runtime, then run one block per request on stdin (pickled
    run counts; None stops) and answer each on stdout: ("ready", name), ("block", (start, end, times_ms)) or
    ("error", (message, hint))."""
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # whatever a runtime prints goes to stderr, never into the answers

    def answer(kind: str, payload) -> None:
        pickle.dump((kind, payload), answers)
        answers.flush()

    try:
        spec, inputs = pickle.load(requests)
        name, run = _load(spec, inputs)
        answer("ready", name)
        while (runs := pickle.load(requests)) is not None:
            start, times = time.monotonic(), []
            for _ in range(runs):
                t0 = time.perf_counter()
                run(inputs)
                times.append((time.perf_counter() - t0) * 1e3)
            answer("block", (start, time.monotonic(), tuple(times)))
    except EOFError:       # the parent went away
        pass
    except Exception as e:  # EdgecError and run.py's BundleError carry a message and a hint; others: one line
        answer("error", (getattr(e, "message", None) or f"{type(e).__name__}: {last_line(e)}",
                         getattr(e, "hint", None)))


class _Worker:
    """The parent's handle on one worker process."""

    def __init__(self, spec: WorkerSpec, inputs: dict[str, np.ndarray]):
        self.spec = spec
        self._stderr = tempfile.TemporaryFile()
        # The worker imports this same edgec, whatever the current directory.
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")])))
        self.process = subprocess.Popen([sys.executable, "-m", "edgec.benchmark", "worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._stderr, env=env)
        self.pid = self.process.pid
        self.name = ""
        self._send((spec, inputs))

    def _send(self, message) -> None:
        try:
            pickle.dump(message, self.process.stdin)
            self.process.stdin.flush()
        except BrokenPipeError:
            self._died()

    def _died(self):
        self.process.wait()
        self._stderr.seek(0)
        reason = last_line(Exception(self._stderr.read().decode(errors="replace")))
        raise EdgecError(f"the {self.spec.kind} worker exited with code {self.process.returncode}: {reason}",
                         "run the bundle with 'edgec run' to see the failure") from None

    def _receive(self, expected: str):
        try:
            kind, payload = pickle.load(self.process.stdout)
        except EOFError:
            self._died()
        if kind == "error":
            raise EdgecError(f"{self.spec.kind} worker: {payload[0]}", payload[1])
        assert kind == expected, (kind, expected)
        return payload

    def wait_ready(self) -> None:
        self.name = self._receive("ready")

    def block(self, runs: int, other: "_Worker | None") -> Block:
        before = thread_cpu_ns(self.pid)
        other_before = thread_cpu_ns(other.pid) if other else None
        t0 = time.perf_counter()
        self._send(runs)
        start, end, times = self._receive("block")
        wall = time.perf_counter() - t0
        cpu = _cpu_delta(before, thread_cpu_ns(self.pid))
        idle = _cpu_delta(other_before, thread_cpu_ns(other.pid)) if other else None
        _wait_until_idle(self.pid)
        return Block(self.spec.kind, self.pid, start, end, times, wall, cpu,
                     None if idle is None else sum(idle.values()))

    def stop(self) -> None:
        try:
            pickle.dump(None, self.process.stdin)
            self.process.stdin.close()
            self.process.wait(10)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self._stderr.close()


@dataclass(frozen=True)
class Timing:
    names: tuple[str, ...]          # per worker spec: the runtime's display name
    pids: tuple[int, ...]           # per worker spec: its process
    blocks: tuple[Block, ...]       # the timed blocks in the order they ran


def run_blocks(specs: Sequence[WorkerSpec], inputs: dict[str, np.ndarray], *, runs: int, blocks: int,
               warmup: int) -> Timing:
    """Start one worker per spec (one or two), give each an untimed warm-up block on its own, then `blocks`
    rounds of one timed block per worker in spec order: A, B, A, B, ... Workers are stopped on return."""
    assert 1 <= len(specs) <= 2
    workers = []
    try:
        for spec in specs:                        # they load in parallel
            workers.append(_Worker(spec, inputs))
        for w in workers:
            w.wait_ready()
        for w in workers:
            if warmup:
                w.block(warmup, None)
        timed = [w.block(runs, workers[1 - i] if len(workers) == 2 else None)
                 for _ in range(blocks) for i, w in enumerate(workers)]
    finally:
        for w in workers:
            w.stop()
    return Timing(tuple(w.name for w in workers), tuple(w.pid for w in workers), tuple(timed))


def bench(bundle_dir: str | Path, *, runs: int = 10, blocks: int = 6, warmup: int = 5, threads: int | None = None,
          compare_model: str | Path | None = None, measure_memory: bool = True) -> BenchResult:
    """Time a host bundle in `blocks` blocks of `runs` runs after a warm-up block of `warmup` runs; with
    compare_model, the reference runtime too, in its own process, the blocks alternated edgec, reference, ...
    Both on the same random input (seed 0) with the same number of threads (default: the bundle target's)."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    if manifest.arch != host_arch():
        raise EdgecError(f"edgec bench times host bundles; this one is for {manifest.arch}",
                         "build with --target host, or time it on the board with run.py --repeat")
    if runs < 1 or blocks < 1 or warmup < 0:
        raise EdgecError("runs and blocks must be at least 1, warmup at least 0")
    threads = threads or manifest.target.device.threads
    host = machine()                              # before this run adds to the load average
    inputs = random_inputs(manifest.inputs)
    specs = [WorkerSpec("edgec", bundle_dir, threads)]
    if compare_model is not None:
        specs.append(WorkerSpec("reference", Path(compare_model).resolve(), threads))
    timing = run_blocks(specs, inputs, runs=runs, blocks=blocks, warmup=warmup)
    summaries = [latency(name, pid, warmup, timing.blocks, threads) for name, pid in zip(timing.names, timing.pids)]
    ratio = None
    if compare_model is not None:
        ratio = ratio_of_medians(*([b.times_ms for b in timing.blocks if b.pid == pid] for pid in timing.pids))
    peak = None
    if measure_memory:
        from .runtime.native import run_with_runner

        peak = run_with_runner(bundle_dir, inputs, threads=threads).peak_rss_bytes
    return BenchResult(summaries[0], summaries[1] if compare_model is not None else None, ratio, timing.blocks, runs,
                       peak, host)


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    _worker_main()
