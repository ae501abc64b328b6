"""The Python API behind the CLI: build, run, compare, bench, inspect. Tests call these directly."""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .benchmark import BenchResult, bench  # edgec.api is the API surface; the benchmark lives there
from .build import CompiledModel, compile_model
from .dataset import Dataset, open_dataset   # DATA for eval and calibration
from .evaluation import Evaluation, evaluate  # edgec eval; build --quantize's table on held-back samples
from .context import BuildContext, BuildOptions
from . import fsutil
from .bundle import Sample, archive_path, check_outputs, write_bundle
from .errors import EdgecError
from .frontends import inspect_model, load_model, model_format
from .frontends.custom_ops import active as custom_ops, load_converters
from .passes import plan
from .progress import current
from .passes.precision import check_target, precision_reference
from .quantize.reference import quantized_reference
from .manifest import Manifest
from .offload import for_build, resolve
from .reference import DEFAULT_TOLERANCE, Comparison, Tolerance, compare_outputs
from .runtime import bundle_errors
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
    warnings: tuple[str, ...] = ()   # for the user, e.g. the estimated memory exceeds the target's
    evaluation: Evaluation | None = None   # --quantize: the bundle against the float model on held-back samples


def _memory_over_budget(compiled: CompiledModel) -> str | None:
    activations = compiled.memory.planned_bytes
    if activations is None:
        activations = compiled.memory.tensor_bytes
    needed, budget = compiled.held_weight_bytes + activations, compiled.target.device.memory_bytes
    if needed <= budget:
        return None
    return (f"the model needs an estimated {needed / 2**20:.1f} MiB (weights and activations), more than "
            f"{compiled.target.name}'s memory_mb = {budget >> 20}")


def build(model_path: str | Path, target: str, out_dir: str | Path, *, input_shapes=None,
          options: BuildOptions = BuildOptions(), archive: bool = False, force: bool = False,
          strict_memory: bool = False, sample_inputs: dict[str, np.ndarray] | list[str] | None = None,
          state_pairs: dict[str, str] | None = None, progress=None) -> BuildResult:
    """Import, optimize, compile, verify and bundle a model for a target.

    One build at a time per out_dir (a second one fails at once); temporary files live in an edgec workspace.
    `strict_memory` refuses a model whose estimated memory exceeds the target's (else it is a warning).
    `sample_inputs` is the sample the bundle is verified on and ships, as arrays by name or as `--input`
    values (default: the first held-back calibration sample with --calibration, else seeded random inputs); a
    streaming model's sample leaves out the state inputs.
    `state_pairs` ({input: output}; {} for none) names an ONNX model's streaming state; None detects it by name
    (an output called as an input plus a suffix). TFLite models declare theirs (resource variables).
    """
    with fsutil.output_lock(out_dir), fsutil.workspace():
        return _build(model_path, target, Path(out_dir), input_shapes, options, archive, force, strict_memory,
                      sample_inputs, state_pairs, progress)


def _build(model_path, target, out_dir: Path, input_shapes, options, archive, force, strict_memory,
           given_sample, state_pairs, progress) -> BuildResult:
    from .verification import (STREAM_STEPS, reference_outputs, sample_inputs, stream_steps, verify_staged,
                               with_initial_state)

    from .toolchain import find_tool

    say = progress or current()
    check_outputs(out_dir, archive, force)
    descriptor = load_target(target)
    if options.quantize is not None:
        check_target(options.quantize.mode, descriptor)
    # Fail before minutes of compiling, not at the link step.
    find_tool(descriptor.toolchain.compiler, descriptor.toolchain.apt_package)
    offload = for_build(descriptor, options.offload)
    # an unknown backend, one without a build for the target, packages it cannot fetch
    resolve(offload, descriptor.arch, fetch=True)
    ctx = BuildContext(descriptor, options, offload=offload)
    steps = plan(ctx, model_format(model_path))
    converters = load_converters(options.converters)
    if options.dump_ir is not None:
        options.dump_ir.mkdir(parents=True, exist_ok=True)
    say("import model")
    with custom_ops(converters):
        model = load_model(model_path, input_shapes,
                           tuple(s.name for s in steps if s.phase == "import" and s.enabled), options.dump_ir,
                           options.const_inputs, state_pairs)
    held_back = None
    if options.quantize is not None and options.quantize.calibration is not None:
        # checked before minutes of compiling; the last samples are kept out of calibration for the table
        data = open_dataset(options.quantize.calibration, model.inputs, options.quantize.preprocess)
        if len(data) < 2:
            raise EdgecError(f"--calibration {options.quantize.calibration} holds {len(data)} sample",
                             "give at least 2 (a few hundred representative inputs calibrate well)")
        calibration, held_back = data.split(options.quantize.held_back(len(data)))
        ctx = replace(ctx, calibration=calibration)
    compiled = compile_model(model, ctx, steps, progress=say)
    over_budget = _memory_over_budget(compiled)
    if over_budget and strict_memory:
        raise EdgecError(over_budget, "drop --strict-memory to build anyway, or use a smaller model or input shape")
    say("reference run")
    more = None
    if held_back is not None:
        # the user's own data, not a random one: a quantized graph's rounding flips, which the quantized rule
        # measures, are amplified most on inputs unlike the calibration's (PP-OCRv4 rec int8 was refused on noise)
        held = [{s.name: h.inputs[s.name] for s in model.stream_inputs()}    # a stream's state left out
                for h in itertools.islice(held_back.samples(), STREAM_STEPS)]
        given_sample, more = (held[0], held[1:]) if given_sample is None else (given_sample, held)
    inputs = sample_inputs(model, given_sample)
    steps = stream_steps(model, inputs, given_sample is not None, more)
    if compiled.quantized_graph is not None:   # checked against the quantized graph, not the float model
        reference = (quantized_reference if compiled.quantization["mode"] == "int8" else precision_reference)(
            compiled.quantized_graph, model, steps)
    else:
        reference = reference_outputs(model, steps)
    sample = (None if isinstance(reference, str)
              else Sample(with_initial_state(model, inputs), reference.outputs[0], reference.name))
    say("write the bundle")
    t0 = time.perf_counter()
    verify_seconds = []

    def verify(staged: Path) -> dict:
        say("verify the staged bundle")
        t_verify = time.perf_counter()
        try:
            return verify_staged(staged, descriptor, reference, stream=bool(model.states))
        finally:
            verify_seconds.append(time.perf_counter() - t_verify)

    manifest = write_bundle(compiled, out_dir, sample, archive=archive, force=force, verify=verify)
    bundle_dir = out_dir.resolve()
    link = compiled.seconds.get("link", 0.0)
    seconds = dict(compiled.seconds, verify=verify_seconds[0],
                   bundle=time.perf_counter() - t0 - link - verify_seconds[0])
    sizes = [p.stat().st_size for p in bundle_dir.rglob("*") if p.is_file()]
    warnings, evaluation = [over_budget] if over_budget else [], None
    if held_back is not None:
        elsewhere = _runs_elsewhere(manifest)
        if elsewhere is None:
            say(f"evaluate on {len(held_back)} held-back samples")
            evaluation = evaluate(bundle_dir, held_back, model_path)
            warnings += _budget_missed(options.quantize, evaluation)
        else:
            warnings.append(f"no before/after table: {elsewhere}; build the same model with --target host "
                            "--quantize to see it, or use edgec eval")
    return BuildResult(bundle_dir, manifest, compiled, (bundle_dir / manifest.library).stat().st_size,
                       sum(sizes), archive_path(bundle_dir) if archive else None, seconds, tuple(warnings),
                       evaluation)


def _runs_elsewhere(manifest: Manifest) -> str | None:
    """Why the bundle cannot run in this process (None: it can)."""
    from .runtime import check_runs_here

    if manifest.arch != host_arch():
        return f"the bundle is for {manifest.arch}"
    try:
        check_runs_here(manifest.target)
    except EdgecError as e:
        return e.message
    return None


def _budget_missed(options, evaluation: Evaluation) -> list[str]:
    """The error budget is met on the calibration samples it was searched on; say where the held-back ones miss it."""
    budget, missed = options.min_sqnr_db, []
    for o in [] if budget is None else evaluation.outputs:
        if o.nonfinite_mismatches:      # the SQNR counts finite elements only
            got = f"{o.nonfinite_mismatches} NaN/infinite elements differing"
        elif o.sqnr_db is not None and o.sqnr_db < budget:
            got = f"{o.sqnr_db:.1f} dB SQNR"
        elif o.sqnr_db is None and o.max_abs_error > 0:     # an error on an all-0 reference: -inf dB
            got = f"an error of up to {o.max_abs_error:.3g} where the float model gives 0"
        else:
            continue
        missed.append(f"output '{o.name}': {got} on the held-back samples, below the error budget of {budget:g} dB "
                      "met on the calibration samples (give more representative calibration data)")
    return missed


@dataclass(frozen=True)
class RunResult:
    outputs: dict[str, np.ndarray]
    inputs: dict[str, np.ndarray]
    mode: str                      # "in-process", "native runner", "qemu"


def load_inputs(manifest: Manifest, paths: list[str] | None, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs from --input values (NAME=FILE.npy, or FILE.npy in input order; a path holding '=' works too),
    read as run.py reads them, or random ones (seeded) when none are given. Shapes and dtypes: run() checks."""
    if not paths:
        return random_inputs(manifest.inputs, seed)
    with bundle_errors() as runner:
        return runner.read_inputs([s.to_json() for s in manifest.inputs], list(paths))


def run(bundle_dir: str | Path, inputs: dict[str, np.ndarray] | None = None, *, emulate: bool | None = None,
        threads: int | None = None, verify: bool = True) -> RunResult:
    """Run a bundle the way its target runs here (runtime.choose_runner): in process for this machine's
    architecture, else through its C++ runner under the descriptor's emulator.

    emulate=True forces the C++ runner (under qemu when the architecture differs) even for a host bundle.
    Every runner checks the bundle's files against its manifest first; verify=False skips the sha256s.
    """
    from .runtime import IN_PROCESS, NATIVE_RUNNER, choose_runner, run_bundle

    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    inputs = inputs if inputs is not None else random_inputs(manifest.inputs)
    check_inputs(manifest.inputs, inputs)
    if emulate is False and manifest.arch != host_arch():
        raise EdgecError(f"the bundle is for {manifest.arch} and this machine is {host_arch()}",
                         "run it under emulation (drop --no-emulate) or on the board")
    runner = choose_runner(manifest.target)
    if emulate and runner == IN_PROCESS:
        runner = NATIVE_RUNNER
    return RunResult(run_bundle(bundle_dir, inputs, runner, threads, verify), inputs, runner)


class LoadedModel:
    """A host bundle loaded once (run.py's Model, every file checked): run() any number of inputs, or stream()
    a streaming model's chunks with its state kept inside (reset() starts again from the initial state)."""

    def __init__(self, bundle_dir: str | Path, threads: int | None = None, verify: bool = True):
        from .runtime import check_runs_here
        from .runtime.local import load_bundle

        manifest = Manifest.load(bundle_dir)
        if manifest.arch != host_arch():
            raise EdgecError(f"the bundle is for {manifest.arch} and this machine is {host_arch()}",
                             "use edgec.api.stream() or api.run(), which run it under emulation, or run it on the board")
        check_runs_here(manifest.target)
        self.manifest = manifest
        self._model = load_bundle(bundle_dir, threads, verify)

    @property
    def state(self) -> dict[str, np.ndarray] | None:
        """The state the next stream() call takes, by state input name (None before the first)."""
        return self._model.state

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with bundle_errors():
            return self._model.run(inputs)

    def stream(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One chunk: the inputs without the state inputs; returns every output (the new state's too)."""
        with bundle_errors():
            return self._model.stream(inputs)

    def reset(self) -> None:
        with bundle_errors():
            self._model.reset()


def load(bundle_dir: str | Path, *, threads: int | None = None, verify: bool = True) -> LoadedModel:
    """Load a host bundle once for many calls (api.run loads it per call)."""
    return LoadedModel(bundle_dir, threads, verify)


def stream(bundle_dir: str | Path, chunks: list[dict[str, np.ndarray]], *, emulate: bool | None = None,
           threads: int | None = None, verify: bool = True) -> list[dict[str, np.ndarray]]:
    """Run a streaming bundle over `chunks` (its inputs without the state inputs, one dict per step) from its
    initial state, the way its target runs here (in process, or its C++ runner under qemu); each step's outputs."""
    from .runtime import IN_PROCESS, NATIVE_RUNNER, choose_runner, stream_bundle

    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    if not manifest.states:
        raise EdgecError("the model keeps no state between calls", "run each input on its own (edgec run -i)")
    for chunk in chunks:
        check_inputs(manifest.stream_inputs, chunk)
    runner = choose_runner(manifest.target)
    if emulate and runner == IN_PROCESS:
        runner = NATIVE_RUNNER
    return stream_bundle(bundle_dir, chunks, runner, threads, verify)


def bundle_states(bundle_dir: str | Path) -> tuple:
    """A streaming bundle's states (frontends.State) with their initial values, from its checked states file."""
    import tvm

    from .frontends import State

    bundle_dir = Path(bundle_dir)
    manifest = Manifest.load(bundle_dir)
    if not manifest.states:
        return ()
    with bundle_errors() as runner:
        data = runner.read_file(bundle_dir, runner.load_manifest(bundle_dir), manifest.initial_states)
    values = tvm.runtime.load_param_dict(data)
    return tuple(State(s.name, s.input, s.output, values[s.input].numpy()) for s in manifest.states)


def load_chunks(manifest: Manifest, paths: list[str]) -> list[dict[str, np.ndarray]]:
    """`--chunks` values, [NAME=]FILE.npy per streamed input (as --input reads them), each holding the steps
    along its first axis, split into one dict per step."""
    if not manifest.states:
        raise EdgecError("the model keeps no state between calls", "run each input on its own (edgec run -i)")
    specs = manifest.stream_inputs
    with bundle_errors() as runner:
        arrays = runner.read_inputs([s.to_json() for s in specs], list(paths))
    steps = set()
    for s in specs:
        a = arrays[s.name]
        if a.shape[1:] != s.shape or a.ndim != len(s.shape) + 1:
            raise EdgecError(f"--chunks for '{s.name}' has shape {list(a.shape)}; the input is {list(s.shape)}",
                             f"stack the chunks along a first axis: [STEPS, {', '.join(map(str, s.shape))}]")
        steps.add(a.shape[0])
    if len(steps) != 1 or 0 in steps:
        raise EdgecError(f"--chunks files hold different numbers of steps ({sorted(steps)})",
                         "give every streamed input the same number of chunks (at least one)")
    return [{s.name: arrays[s.name][k] for s in specs} for k in range(steps.pop())]


def compare(run_result: RunResult, model_path: str | Path, tolerance: Tolerance = DEFAULT_TOLERANCE) -> Comparison:
    """Compare a run's outputs, by name, with the reference runtime's on the same inputs."""
    from .reference import ReferenceRuntime

    ref = ReferenceRuntime(Path(model_path))
    return compare_outputs(run_result.outputs, ref.run(run_result.inputs), tolerance, against=ref.name)


__all__ = ["BuildOptions", "BuildResult", "RunResult", "BenchResult", "LoadedModel", "build", "run", "load", "stream",
           "compare", "bench",
           "inspect_model", "load_inputs", "Dataset", "open_dataset", "Evaluation", "evaluate"]
