"""The edgec command line. Each command parses its options and calls edgec.api; nothing else lives here."""
from __future__ import annotations

import contextlib
import gc
import io
import json
import os
import signal
import sys
import traceback
from pathlib import Path

import click

from . import fsutil, progress
from .errors import EdgecError, last_line
from .quantize import FP16_MIN_SQNR_DB
from .reference import DEFAULT_TOLERANCE

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1
_STDERR = "edgec.stderr"      # ctx.meta key: the stream edgec's own stderr lines go to


def _is_fd2(stream) -> bool:
    try:
        return stream.fileno() == 2
    except (AttributeError, OSError, io.UnsupportedOperation):
        return False


@contextlib.contextmanager
def _own_stderr(quiet: bool):
    """Yield the stream for edgec's own stderr lines. With `quiet`, everything else sent to stderr goes to
    /dev/null: TVM's C++ log lines and onnxruntime's warnings (fd 2), the libraries' Python warnings and logging
    (sys.stderr). --verbose lets all of it through."""
    if not quiet:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved_fd, saved_stream = os.dup(2), sys.stderr
    user = open(saved_fd, "w", buffering=1, closefd=False, encoding=saved_stream.encoding, errors="replace") \
        if _is_fd2(saved_stream) else saved_stream
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(os.devnull, "w")
    try:
        yield user
    finally:
        gc.collect()
        sys.stderr.close()
        sys.stderr = saved_stream
        user.flush()
        os.dup2(saved_fd, 2)
        os.close(saved_fd)


def _err(line: str) -> None:
    """One of edgec's own stderr lines (progress, a warning, the error), never hidden with the libraries'."""
    click.echo(line, file=click.get_current_context().meta.get(_STDERR, sys.stderr))


def _interrupted(signum: int) -> tuple[str, int]:
    return f"error: interrupted by {signal.Signals(signum).name}", 128 + signum


def _usage_line(e: click.ClickException) -> str:
    """A bad option or argument as one line, instead of click's usage block."""
    message = e.format_message().rstrip(".")
    where = e.ctx.command_path if isinstance(e, click.UsageError) and e.ctx else "edgec"
    return f"error: {message[:1].lower()}{message[1:]}; see '{where} --help'"


class _Group(click.Group):
    """Turns every error into one line on stderr; --verbose adds the traceback and the libraries' own output.
    SIGINT, SIGTERM and SIGHUP clean up like Ctrl-C and exit 130, 143, 129."""

    def invoke(self, ctx):
        with fsutil.signals_as_interrupts(), _own_stderr(quiet=not ctx.params.get("verbose")) as stream:
            ctx.meta[_STDERR] = stream
            try:
                return super().invoke(ctx)
            except (click.exceptions.Exit, click.exceptions.Abort):
                raise
            except (Exception, KeyboardInterrupt) as e:
                line, code = self._describe(e)
                if ctx.params.get("verbose"):
                    traceback.print_exc()
                _err(line)
            # Exiting from outside the except block lets the error's traceback go, and with it the TVM objects
            # that print from their destructors ("BlockBuilder destroyed..."), while stderr is still quiet.
            ctx.exit(code)

    def make_context(self, info_name, args, parent=None, **extra):
        # edgec's own options are parsed before invoke(): a bad one needs the same one line
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.ClickException as e:
            click.echo(_usage_line(e), err=True)
            sys.exit(EXIT_USER_ERROR)

    @staticmethod
    def _describe(e: BaseException) -> tuple[str, int]:
        if fsutil.received_signal() is not None:   # also when TVM rewrapped the Interrupted raised inside it
            return _interrupted(fsutil.received_signal())
        if isinstance(e, KeyboardInterrupt):
            return _interrupted(getattr(e, "signum", signal.SIGINT))
        if isinstance(e, click.ClickException):
            return _usage_line(e), EXIT_USER_ERROR
        if isinstance(e, OSError) and e.filename:
            e = fsutil.as_user_error(e, Path(e.filename)) or e
        if isinstance(e, EdgecError):
            # a user error unless the error says otherwise (a failed verification is edgec's fault, exit 1)
            return f"error: {e.message}" + (f"; {e.hint}" if e.hint else ""), getattr(e, "exit_code", EXIT_USER_ERROR)
        # a bug in edgec or TVM: still one line unless --verbose
        return (f"error: internal error ({type(e).__name__}: {last_line(e)}); rerun with --verbose and report it",
                EXIT_INTERNAL_ERROR)


def _reporting(force: bool):
    """Progress of the command's long steps on edgec's stderr: live on a terminal; on a pipe only with --progress
    (or --verbose), so that a failing build in a script or CI prints exactly one error line."""
    ctx = click.get_current_context()
    return progress.reporting(ctx.meta.get(_STDERR, sys.stderr), force=force or ctx.find_root().params["verbose"])


_PROGRESS_HELP = "Report each long step on stderr even when it is not a terminal (always on a terminal)."
_PREPROCESS_HELP = ("For DATA that is a folder of images: how an image becomes the model's input, KEY=VALUE pairs "
                    "separated by commas: resize=N (shorter side, then a center crop to the input's size) or HxW, "
                    "crop=N or HxW (center), scale=S (default 1/255), mean=M[,M,M], std=S[,S,S] (x = (pixel * scale - "
                    "mean) / std; a float input needs one of these three), channels=RGB|BGR, layout=NCHW|NHWC "
                    "(default: from the input's shape). An int8/uint8 input with a scale and zero point (full-integer "
                    "TFLite) takes the declared normalization quantized with them; undeclared, uint8 inputs take the "
                    "pixels, int8 inputs pixel - 128. "
                    "E.g. resize=256,crop=224,mean=0.485,0.456,0.406,std=0.229,0.224,0.225")


def _preprocess(text: str | None):
    from .images import parse_preprocess

    return None if text is None else parse_preprocess(text)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--verbose", is_flag=True, help="Print tracebacks and TVM's own messages on errors.")
@click.version_option(package_name="edgec", message="edgec %(version)s")
@click.pass_context
def main(ctx, verbose):
    """edgec: compile ONNX and TFLite models into verified bundles for edge boards."""
    ctx.obj = {"verbose": verbose}


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-t", "--target", default="host", show_default=True, help="Target name (edgec targets) or a .toml path.")
@click.option("-o", "--output", "out_dir", type=click.Path(path_type=Path), help="Bundle directory [default: MODEL-TARGET].")
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=2, show_default=True, help="Optimization level 0-3.")
@click.option("--input-shape", multiple=True, metavar="NAME:DIMS", help="Pin an input's shape, e.g. x:1x3x320x320.")
@click.option("--const-input", multiple=True, metavar="NAME=FILE.npy",
              help="Fold an input to this constant at build time (shapes, axes, pads, scales the model takes as "
                   "inputs); it is no longer an input of the bundle.")
@click.option("--state", multiple=True, metavar="OUT=IN",
              help="ONNX streaming state: output OUT is fed back into input IN at the next call, e.g. stateN=state "
                   "(default: an output named as an input plus a suffix; 'none': no state). TFLite: from its variables.")
@click.option("--disable-pass", multiple=True, metavar="NAME", help="Skip an optional pass (see edgec passes).")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the IR after each pass to this directory.")
@click.option("--archive", is_flag=True, help="Also write BUNDLE.tar.gz.")
@click.option("--force", is_flag=True, help="Overwrite an existing archive or --dump-ir files, replace a modified bundle.")
@click.option("--strict-memory", is_flag=True, help="Refuse a model whose estimated memory exceeds the target's.")
@click.option("-i", "--input", "sample", multiple=True, metavar="[NAME=]FILE.npy",
              help="Sample input the bundle is verified on and ships [default: the first held-back --calibration "
                   "sample, else seeded random inputs].")
@click.option("--offload", metavar="none|auto|NAME[,NAME]",
              help="Kernel libraries that run convolutions and matrix products, in priority order (onednn on x86, "
                   "xnnpack on aarch64), or none, or auto: the target's backends, each operator group timed here "
                   "against TVM's kernel and the faster kept (host only; decisions cached) [default: the target's "
                   "[offload] backends].")
@click.option("--converter", multiple=True, type=click.Path(path_type=Path), metavar="FILE.py",
              help="Python file of converters for TFLite custom operators (examples/tflite_converters.py).")
@click.option("--quantize", type=click.Choice(["int8", "fp16", "int8-weights"]),
              help="int8: post-training quantization to int8 QDQ (uint8 activations, int8 per-channel weights), "
                   "calibrated on --calibration; prints the int8 bundle against the float model on held-back "
                   "samples. fp16: compute in fp16 (targets with device.fp16, e.g. rpi5). int8-weights: weights "
                   "stored as int8 per channel, dequantized at load, compute float32 (any target; no calibration).")
@click.option("--calibration", type=click.Path(path_type=Path), metavar="DATA",
              help="Calibration samples for --quantize: an .npz keyed by input name (first axis: samples) or a "
                   "folder of them, or a folder of images (--preprocess), as for edgec eval; the last fifth (at most "
                   "100) is held back for the table.")
@click.option("--preprocess", metavar="SPEC", help=_PREPROCESS_HELP)
@click.option("--calibration-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="How a tensor's range is chosen from the calibration samples.")
@click.option("--percentile", type=click.FloatRange(50, 100, min_open=True), default=99.99, show_default=True,
              help="For --calibration-method percentile: the share of values kept inside the range.")
@click.option("--min-sqnr", metavar="DB",
              help="Error budget for --quantize int8, e.g. 30 or 30dB: the worst layers stay float until every "
                   "output's SQNR against the float model on the calibration samples is at least DB. For "
                   "--quantize fp16: the fp16 graph's output SQNR against float32 on the sample input below which "
                   f"the build is refused [default: {FP16_MIN_SQNR_DB:g}].")
@click.option("--max-error", metavar="PCT",
              help="Error budget for --quantize int8 (or fp16's floor) as a relative RMS error of the outputs, "
                   "e.g. 1% (the same as --min-sqnr 40).")
@click.option("--keep-float", multiple=True, metavar="PATTERN",
              help="Leave the --quantize int8 layers whose names match this glob float (conv2d_0, 'add_*'; names: "
                   "op and position in graph order, as the build summary reports them). Repeatable.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON.")
@click.option("--progress", "show_progress", is_flag=True, help=_PROGRESS_HELP)
def build(model, target, out_dir, opt_level, input_shape, const_input, disable_pass, dump_ir, archive, force,
          strict_memory, sample, offload, converter, quantize, calibration, calibration_method, percentile, min_sqnr,
          max_error, keep_float, as_json, show_progress, state, preprocess):
    """Compile MODEL for a target and write a deployable bundle."""
    from . import api, report
    from .build import BuildOptions
    from .frontends import parse_const_inputs, parse_input_shapes, parse_state_pairs

    if dump_ir is not None and dump_ir.exists():
        if not dump_ir.is_dir():
            raise EdgecError(f"--dump-ir {dump_ir} is a file", "pass a new or empty directory")
        if any(dump_ir.iterdir()) and not force:
            raise EdgecError(f"--dump-ir {dump_ir} is not empty", "pass --force to write into it anyway, or pick a "
                             "new or empty directory")
    from .offload import parse_option
    from .quantize import CALIBRATED, QuantizeOptions, error_budget

    if (quantize in CALIBRATED) != (calibration is not None):
        raise EdgecError("--quantize int8 and --calibration go together",
                         "pass both: --quantize int8 --calibration DATA.npz (fp16 and int8-weights take none)")
    if preprocess is not None and calibration is None:
        raise EdgecError("--preprocess is for --calibration DATA, a folder of images",
                         "add --quantize int8 --calibration IMAGES, or drop --preprocess")
    budget = error_budget(min_sqnr, max_error, keep_float, quantize)
    options = BuildOptions(opt_level, tuple(disable_pass), dump_ir,
                           None if offload is None else parse_option(offload), tuple(converter),
                           parse_const_inputs(const_input),
                           quantize and QuantizeOptions(quantize, calibration, calibration_method, percentile,
                                                        preprocess=_preprocess(preprocess), **budget))
    out_dir = out_dir or Path(f"{model.stem}-{Path(target).stem}")
    with _reporting(show_progress) as steps:
        result = api.build(model, target, out_dir, input_shapes=parse_input_shapes(input_shape), options=options,
                           archive=archive, force=force, strict_memory=strict_memory,
                           sample_inputs=list(sample) or None, state_pairs=parse_state_pairs(state), progress=steps)
    for warning in result.warnings:
        _err(f"warning: {warning}")
    if as_json:
        summary = report.build_json(result)
        if result.evaluation is not None:
            summary["evaluation"] = result.evaluation.to_json()
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(report.build_text(result))
        if result.evaluation is not None:
            click.echo(f"\nint8 against the float model on the held-back samples:\n{result.evaluation.text()}")


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-i", "--input", "inputs", multiple=True, metavar="[NAME=]FILE.npy",
              help="Input array; random inputs (seed 0) when none is given.")
@click.option("--chunks", multiple=True, metavar="[NAME=]FILE.npy",
              help="Stream a model that keeps state: the chunks of each input it takes besides its state, stacked "
                   "along a first axis, run in order from the initial state with the state fed back.")
@click.option("--emulate/--no-emulate", default=None,
              help="Run through the bundle's C++ runner (under qemu for another architecture). "
                   "Default: in process for host bundles, emulated otherwise.")
@click.option("--compare", "compare_model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Compare the outputs with onnxruntime / LiteRT running this model.")
@click.option("--atol", default=DEFAULT_TOLERANCE.atol, show_default=True, help="Absolute tolerance for --compare.")
@click.option("--rtol", default=DEFAULT_TOLERANCE.rtol, show_default=True,
              help="Tolerance relative to the output's range for --compare.")
@click.option("--no-verify", is_flag=True, help="Skip the sha256 check of the bundle's files (sizes and the file "
                                                 "list are still checked).")
@click.option("--output-dir", type=click.Path(path_type=Path), help="Save each output as NAME.npy here.")
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads [default: the target's].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--progress", "show_progress", is_flag=True, help=_PROGRESS_HELP)
def run(bundle, inputs, chunks, emulate, compare_model, atol, rtol, no_verify, output_dir, threads, as_json,
        show_progress):
    """Run a bundle and optionally check it against the reference runtime."""
    import numpy as np

    from . import api
    from .manifest import Manifest
    from .reference import Tolerance
    from .toolchain import host_arch

    manifest = Manifest.load(bundle)
    if no_verify:
        _err("warning: --no-verify: the bundle's files are not checked against their sha256 (their list and sizes are)")
    if chunks:
        return _run_stream(bundle, manifest, chunks, inputs, emulate, compare_model, Tolerance(atol, rtol), no_verify,
                           output_dir, threads, as_json, show_progress)
    with _reporting(show_progress) as steps:
        # a foreign bundle runs under qemu: a minute or more for a real model
        steps("run under qemu" if emulate is not False and manifest.arch != host_arch() else "run")
        result = api.run(bundle, api.load_inputs(manifest, list(inputs)), emulate=emulate, threads=threads,
                         verify=not no_verify)
    report = {"mode": result.mode, "outputs": {}}
    for spec in manifest.outputs:
        value = result.outputs[spec.name]
        report["outputs"][spec.name] = {"shape": list(value.shape), "dtype": str(value.dtype),
                                        "min": float(value.min()), "max": float(value.max())}
        if output_dir:
            output_dir.mkdir(parents=True, exist_ok=True)
            np.save(output_dir / spec.file, value)
    ok = True
    if compare_model:
        comparison = api.compare(result, compare_model, Tolerance(atol, rtol))
        ok = comparison.ok
        report["compare"] = comparison.to_json()
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"ran {bundle} ({result.mode})")
        for name, o in report["outputs"].items():
            click.echo(f"  {name}: {o['dtype']}{o['shape']} min {o['min']:.6g} max {o['max']:.6g}")
        for name, o in report.get("compare", {}).get("outputs", {}).items():
            click.echo(f"  vs {report['compare']['against']}: {name} "
                       + (o["problem"] or f"max abs {o['max_abs']:.3g}, max rel {o['max_rel']:.3g}"))
    if not ok:
        raise EdgecError(f"outputs differ from {report['compare']['against']} beyond atol={atol}, rtol={rtol}",
                         "check the model's inputs, or rebuild with -O0 to rule out an optimization")


def _run_stream(bundle, manifest, chunks, inputs, emulate, compare_model, tolerance, no_verify, output_dir, threads,
                as_json, show_progress):
    """`edgec run --chunks`: every step's outputs (saved in OUTPUT_DIR/STEP/), compared step by step with the
    reference runtime streaming the same chunks from its own initial state."""
    import numpy as np

    from . import api
    from .reference import ReferenceRuntime, compare_outputs

    if inputs:
        raise EdgecError("--chunks and --input do not go together", "stream with --chunks, or run one input with -i")
    steps = api.load_chunks(manifest, list(chunks))
    with _reporting(show_progress) as say:
        say("stream")
        outputs = api.stream(bundle, steps, emulate=emulate, threads=threads, verify=not no_verify)
    report = {"steps": [], "compare": None}
    for k, step in enumerate(outputs):
        report["steps"].append({name: {"shape": list(v.shape), "dtype": str(v.dtype), "min": float(v.min()),
                                       "max": float(v.max())} for name, v in step.items()})
        if output_dir:
            (output_dir / str(k)).mkdir(parents=True, exist_ok=True)
            for spec in manifest.outputs:
                np.save(output_dir / str(k) / spec.file, step[spec.name])
    failed = []
    if compare_model:
        ref = ReferenceRuntime(compare_model, states=manifest.states)
        expected = ref.stream(steps, api.bundle_states(bundle))
        report["compare"] = {"against": ref.name, "steps": []}
        for k, (got, want) in enumerate(zip(outputs, expected)):
            comparison = compare_outputs(got, want, tolerance, against=ref.name)
            report["compare"]["steps"].append(comparison.to_json())
            failed += [f"{name} at step {k}" for name, o in comparison.outputs.items() if not o.ok]
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"streamed {len(outputs)} chunks through {bundle}")
        for k, step in enumerate(report["steps"]):
            for name, o in step.items():
                click.echo(f"  step {k} {name}: {o['dtype']}{o['shape']} min {o['min']:.6g} max {o['max']:.6g}")
        if report["compare"]:
            for k, c in enumerate(report["compare"]["steps"]):
                worst = max(c["outputs"].values(), key=lambda o: o["max_rel"])
                click.echo(f"  vs {c['against']}, step {k}: max rel {worst['max_rel']:.3g} ({worst['name']})")
    if failed:
        raise EdgecError(f"outputs differ from {report['compare']['against']} beyond atol={tolerance.atol}, "
                         f"rtol={tolerance.rtol}: {', '.join(failed[:3])}",
                         "check the chunks, or rebuild with -O0 to rule out an optimization")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", multiple=True, metavar="NAME:DIMS", help="Pin an input's shape, as for build.")
@click.option("--converter", multiple=True, type=click.Path(path_type=Path), metavar="FILE.py",
              help="Converters for TFLite custom operators, as for build.")
@click.option("--json", "as_json", is_flag=True)
@click.option("--progress", "show_progress", is_flag=True, help=_PROGRESS_HELP)
def inspect(model, input_shape, converter, as_json, show_progress):
    """Describe MODEL (operators, parameters, MACs, signature) and import it as a build would, without compiling."""
    from . import report
    from .frontends import parse_input_shapes
    from .inspection import inspect

    with _reporting(show_progress) as steps:
        steps("import model")
        result = inspect(model, input_shapes=parse_input_shapes(input_shape), converters=converter)
    click.echo(json.dumps(report.inspect_json(result), indent=2) if as_json else report.inspect_text(result))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", type=click.IntRange(min=1), default=10, show_default=True, help="Timed runs per block.")
@click.option("--blocks", type=click.IntRange(min=1), default=6, show_default=True,
              help="Timed blocks per runtime; with --compare, alternated edgec, peer 1, peer 2, edgec, ...")
@click.option("--warmup", type=click.IntRange(min=0), default=5, show_default=True,
              help="Runs in each runtime's untimed warm-up block.")
@click.option("--threads", type=click.IntRange(min=1), help="Worker threads [default: the target's].")
@click.option("--compare", "compare_model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Also time the peers on this model, same input and threads, each in its own process.")
@click.option("--peers", metavar="LIST", help="With --compare: peers to time, comma-separated: 'reference' "
              "(onnxruntime / LiteRT), 'iree' (IREE, compiled for this CPU; outputs checked against the reference "
              "first) [default: reference].")
@click.option("--no-memory", is_flag=True, help="Skip the C++ runner's peak RSS (needs a C++ compiler and cmake).")
@click.option("--profile", "profile_runs", type=click.IntRange(min=1), is_flag=False, flag_value=20, default=None,
              metavar="[RUNS]", help="Then time each function the bundle calls (its kernels, offload library calls, "
              "allocations) over RUNS runs [20], after the timed blocks, in edgec's worker.")
@click.option("--json", "as_json", is_flag=True, help="Print every run, block and thread as JSON.")
def bench(bundle, runs, blocks, warmup, threads, compare_model, peers, no_memory, profile_runs, as_json):
    """Latency of a host bundle, threads really used, and with --compare the ratio to each peer runtime."""
    from . import benchmark, report

    if peers is not None and compare_model is None:
        raise EdgecError("--peers needs --compare MODEL", "pass the model file the peers run")
    result = benchmark.bench(bundle, runs=runs, blocks=blocks, warmup=warmup, threads=threads,
                             compare_model=compare_model, peers=(peers or "reference").split(","),
                             measure_memory=not no_memory, profile_runs=profile_runs or 0)
    click.echo(json.dumps(report.bench_json(result), indent=2) if as_json else report.bench_text(result))


@main.command(name="eval")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", required=True, type=click.Path(path_type=Path), metavar="DATA",
              help="Samples: a .npz with one array per input keyed by input name, first axis indexing samples "
                   "(optional integer 'labels' or 'y'), or a folder of them, or a folder of images (--preprocess; "
                   "labels: class folders, their sorted names are the classes 0, 1, ...).")
@click.option("--preprocess", metavar="SPEC", help=_PREPROCESS_HELP)
@click.option("--reference", "reference_model", required=True, type=click.Path(path_type=Path), metavar="MODEL",
              help="The .onnx / .tflite model the bundle was built from, run by onnxruntime / LiteRT.")
@click.option("--threads", type=click.IntRange(min=1), help="Threads for both [default: the target's].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(bundle, data, reference_model, threads, as_json, preprocess):
    """Run a host bundle and the reference runtime on every sample of DATA: top-1, agreement, SQNR, max error,
    size, latency."""
    from . import api

    result = api.evaluate(bundle, data, reference_model, threads=threads, preprocess=_preprocess(preprocess))
    click.echo(json.dumps(result.to_json(), indent=2) if as_json else result.text())


@main.command()
@click.option("-t", "--target", default="host", show_default=True)
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=2, show_default=True)
@click.option("--disable-pass", multiple=True, metavar="NAME")
@click.option("--offload", metavar="none|auto|NAME[,NAME]", help="As for build [default: the target's backends].")
def passes(target, opt_level, disable_pass, offload):
    """List the pass pipeline build runs for a target."""
    from .context import BuildContext, BuildOptions
    from .offload import for_build, parse_option, resolve
    from .passes import plan
    from .targets import load_target

    descriptor = load_target(target)
    options = BuildOptions(opt_level, tuple(disable_pass), offload=None if offload is None else parse_option(offload))
    backends = for_build(descriptor, options.offload)
    resolve(backends, descriptor.arch)
    steps = plan(BuildContext(descriptor, options, offload=backends))
    click.echo(f"pipeline for {descriptor.name} at -O{opt_level}, TVM target {json.dumps(descriptor.tvm_target)}:")
    phase = None
    for i, step in enumerate(steps, start=1):
        if step.phase != phase:
            phase = step.phase
            sources = sorted({s.source for s in steps if s.phase == phase})
            click.echo(f"  {phase} (from {', '.join(sources)})")
        state = "run " if step.enabled else "skip"
        note = "required" if step.spec.required else (step.reason or f"-O{step.spec.opt_level}+")
        click.echo(f"    {i:2d}. {state} {step.name:<26} {note:<14} {step.spec.description}")


@main.group(invoke_without_command=True)
@click.pass_context
def targets(ctx):
    """List the target descriptors (built in and ~/.config/edgec/targets)."""
    if ctx.invoked_subcommand is None:
        from .targets import all_targets

        for t in all_targets():
            click.echo(f"  {t.name:<12} {t.arch:<8} {t.description}")


@targets.command("show")
@click.argument("name")
def targets_show(name):
    """Show one target descriptor, resolved."""
    from .targets import load_target
    from .toolchain import cpu_features

    t = load_target(name)
    # what the board's CPU must have: the bundles' manifests list it and their runners check it
    features = cpu_features(t.tvm())
    # Tables nothing reads yet are shown as such, never silently accepted.
    click.echo(json.dumps({**t.to_json(), **({"cpu_features": features} if features else {}), "file": t.origin,
                           "not_used_yet": t.not_used_yet()}, indent=2))


@main.command()
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the model [default: NAME.onnx].")
@click.option("--force", is_flag=True, help="Overwrite an existing file.")
def example(name, output, force):
    """Generate an example model (run without NAME to list them)."""
    from .examples import EXAMPLES

    if name is None:
        for key in EXAMPLES:
            click.echo(key)
        return
    if name not in EXAMPLES:
        raise EdgecError(f"unknown example '{name}'", f"examples: {', '.join(EXAMPLES)}")
    path = output or Path(f"{name}.onnx")
    fsutil.check_overwrite(path, force, "-o")
    # Generated in the workspace and renamed into place: an interrupted run leaves no partial model.
    with fsutil.workspace() as tmp, fsutil.writing_to(path.absolute().parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fsutil.atomic_write(path, EXAMPLES[name](tmp / path.name).read_bytes())
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
