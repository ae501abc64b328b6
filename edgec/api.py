"""The Python API behind the CLI: build, run, compare, bench, inspect. Tests call these directly."""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .build import CompiledModel, compile_model
from .context import BuildContext, BuildOptions
from .bundle import Sample, write_archive, write_bundle
from .errors import EdgecError
from .frontends import ImportedModel, inspect_model, load_model, model_format
from .passes import plan
from .manifest import Manifest
from .signature import check_inputs, random_inputs
from .targets import load_target
from .toolchain import host_arch


@dataclass(frozen=True)
class BuildResult:
    bundle_dir: Path
    manifest: Manifest
    compiled: CompiledModel
    library_bytes: int
    bundle_bytes: int
    archive: Path | None
    seconds: dict[str, float]


def _reference_sample(model: ImportedModel) -> Sample | None:
    """A sample input with the reference runtime's outputs, or None when no reference runtime is installed."""
    from .reference import ReferenceRuntime

    try:
        ref = ReferenceRuntime(model.path)
    except EdgecError:
        return None
    sample_in = random_inputs(model.inputs)
    outputs = ref.run(sample_in)
    return Sample(sample_in, {s.name: out for s, out in zip(model.outputs, outputs)}, ref.name)


def build(model_path: str | Path, target: str, out_dir: str | Path, *, input_shapes=None,
          options: BuildOptions = BuildOptions(), archive: bool = False, progress=None) -> BuildResult:
    """Import, optimize, compile and bundle a model for a target."""
    from .toolchain import find_tool

    say = progress or (lambda step: None)
    ctx = BuildContext(load_target(target), options)
    steps = plan(ctx, model_format(model_path))
    descriptor = ctx.target
    # Fail before minutes of compiling, not at the link step.
    find_tool(descriptor.toolchain.compiler, descriptor.toolchain.apt_package)
    if options.dump_ir is not None:
        options.dump_ir.mkdir(parents=True, exist_ok=True)
    say("import model")
    model = load_model(model_path, input_shapes, tuple(s.name for s in steps if s.phase == "import" and s.enabled),
                       options.dump_ir)
    compiled = compile_model(model, ctx, steps, progress=say)
    say("reference sample")
    sample = _reference_sample(model)
    say(f"link with {descriptor.toolchain.compiler} and write bundle")
    t0 = time.perf_counter()
    manifest = write_bundle(compiled, Path(out_dir), sample)
    bundle_dir = Path(out_dir).resolve()
    seconds = dict(compiled.seconds, bundle=time.perf_counter() - t0 - compiled.seconds.get("link", 0.0))
    archive_path = write_archive(bundle_dir) if archive else None
    sizes = [p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file()]
    return BuildResult(bundle_dir, manifest, compiled, (bundle_dir / manifest.library).stat().st_size,
                       sum(sizes), archive_path, seconds)


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    mode: str                      # "in-process", "native runner", "qemu"


def load_inputs(manifest: Manifest, paths: list[str] | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from .npy files (NAME=FILE or FILE in input order), or random ones when none are given.
    Shapes and dtypes are checked by run()."""
    if not paths:
        return random_inputs(manifest.inputs, seed)
    names = [s.name for s in manifest.inputs]
    if len(paths) != len(names):
        raise EdgecError(f"the model takes {len(names)} input(s) ({', '.join(names)}), {len(paths)} given",
                         "pass one --input per model input, as NAME=FILE.npy or in order")
    inputs = {}
    for name, item in zip(names, paths):
        key, sep, path = item.partition("=")
        if sep:
            if key not in names:
                raise EdgecError(f"--input names '{key}', which the model has no input called",
                                 f"its inputs are: {', '.join(names)}")
            name = key
        else:
            path = item
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise EdgecError(f"input file {path} does not exist", "check the path") from None
        except (ValueError, OSError):
            raise EdgecError(f"input file {path} is not a .npy file", "save the array with numpy.save") from None
    return inputs


def run(bundle_dir: str | Path, inputs: dict[str, np.ndarray] | None = None, *, emulate: bool | None = None,
        threads: int | None = None) -> RunResult:
    """Run a bundle: in process when it is for this machine, else through its C++ runner under qemu.

    emulate=True forces the C++ runner (under qemu when the architecture differs) even for a host bundle.
    """
    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    manifest.verify_files(bundle_dir)
    inputs = inputs if inputs is not None else random_inputs(manifest.inputs)
    check_inputs(manifest.inputs, inputs)
    foreign = manifest.arch != host_arch()
    if emulate is False and foreign:
        raise EdgecError(f"the bundle is for {manifest.arch} and this machine is {host_arch()}",
                         "run it under emulation (drop --no-emulate) or on the board")
    if emulate or foreign:
        from .runtime.native import run_with_runner

        result = run_with_runner(bundle_dir, inputs, threads=threads)
        return RunResult(result.outputs, inputs, "qemu" if result.emulated else "native runner")
    from .runtime.local import run_in_process

    outputs, _ = run_in_process(bundle_dir, manifest, inputs, threads)
    return RunResult(outputs, inputs, "in-process")


def compare(run_result: RunResult, model_path: str | Path, *, atol: float, rtol: float):
    """Compare a run's outputs with the reference runtime on the same inputs: (stats, reference name, ok)."""
    from .reference import ReferenceRuntime, compare as compare_outputs, within_tolerance

    ref = ReferenceRuntime(Path(model_path))
    refs = ref.run(run_result.inputs)
    stats = compare_outputs(list(run_result.outputs.values()), refs)
    for s, name in zip(stats, run_result.outputs):
        s["name"] = name
    return stats, ref.name, within_tolerance(stats, atol, rtol)


@dataclass(frozen=True)
class Latency:
    runs: int
    warmup: int
    threads: int
    median_ms: float
    p90_ms: float
    min_ms: float

    @classmethod
    def from_times(cls, times: list[float], warmup: int, threads: int) -> "Latency":
        ordered = sorted(times)
        p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
        return cls(len(times), warmup, threads, statistics.median(ordered), p90, ordered[0])


@dataclass(frozen=True)
class BenchResult:
    edgec: Latency
    peak_rss_bytes: int | None     # the C++ runner's peak resident memory
    reference: Latency | None
    reference_name: str | None

    @property
    def ratio(self) -> float | None:
        """edgec latency over the reference's: below 1 means edgec is faster."""
        return self.edgec.median_ms / self.reference.median_ms if self.reference else None


def _time(fn, runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench(bundle_dir: str | Path, *, runs: int = 50, warmup: int = 5, threads: int | None = None,
          compare_model: str | Path | None = None, measure_memory: bool = True) -> BenchResult:
    """Latency of a host bundle in process and, with compare_model, of the reference runtime in the same run."""
    from .runtime.local import run_in_process

    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    if manifest.arch != host_arch():
        raise EdgecError(f"edgec bench times host bundles; this one is for {manifest.arch}",
                         "build with --target host, or time it on the board with run.py --repeat")
    threads = threads or manifest.target["threads"]
    inputs = random_inputs(manifest.inputs)
    ref_latency = ref_name = None
    if compare_model is not None:
        # The reference goes first and its session is released before TVM starts: each runtime's worker
        # threads keep spinning after a run and would slow the other down (measured: onnxruntime 2x slower
        # right after TVM in the same process).
        from .reference import ReferenceRuntime

        ref = ReferenceRuntime(Path(compare_model), threads=threads)
        ref_latency = Latency.from_times(_time(lambda: ref.run(inputs), runs, warmup), warmup, threads)
        ref_name = ref.name
        del ref
    _, model = run_in_process(bundle_dir, manifest, inputs, threads)
    latency = Latency.from_times(model.time(inputs, repeat=runs, warmup=warmup), warmup, threads)
    peak = None
    if measure_memory:
        from .runtime.native import run_with_runner

        peak = run_with_runner(bundle_dir, inputs, threads=threads).peak_rss_bytes
    return BenchResult(latency, peak, ref_latency, ref_name)


__all__ = ["BuildOptions", "BuildResult", "RunResult", "BenchResult", "build", "run", "compare", "bench",
           "inspect_model", "load_inputs"]
