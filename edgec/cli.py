"""The edgec command line. Each command parses its options and calls edgec.api; nothing else lives here."""
from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import click

from .errors import EdgecError, last_line

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


class _Group(click.Group):
    """Turns every error into one line on stderr; --verbose adds the traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except EdgecError as e:
            self._fail(ctx, f"error: {e.message}" + (f"; {e.hint}" if e.hint else ""), EXIT_USER_ERROR)
        except KeyboardInterrupt:
            self._fail(ctx, "error: interrupted", 130)
        except Exception as e:  # a bug in edgec or TVM: still one line unless --verbose
            self._fail(ctx, f"error: internal error ({type(e).__name__}: {last_line(e)}); rerun with --verbose and "
                            "report it", EXIT_INTERNAL_ERROR)

    @staticmethod
    def _fail(ctx, line, code):
        if ctx.obj and ctx.obj.get("verbose"):
            traceback.print_exc()
        click.echo(line, err=True)
        ctx.exit(code)


def _progress(enabled: bool):
    start = time.perf_counter()

    def say(step: str):
        if enabled:
            click.echo(f"[{time.perf_counter() - start:6.1f}s] {step}", err=True)

    return say


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
@click.option("--disable-pass", multiple=True, metavar="NAME", help="Skip an optional pass (see edgec passes).")
@click.option("--dump-ir", type=click.Path(path_type=Path), help="Write the IR after each pass to this directory.")
@click.option("--archive", is_flag=True, help="Also write BUNDLE.tar.gz.")
@click.option("--json", "as_json", is_flag=True, help="Print the build summary as JSON.")
def build(model, target, out_dir, opt_level, input_shape, disable_pass, dump_ir, archive, as_json):
    """Compile MODEL for a target and write a deployable bundle."""
    from . import api, report
    from .build import BuildOptions
    from .frontends import parse_input_shapes

    options = BuildOptions(opt_level, tuple(disable_pass), dump_ir)
    out_dir = out_dir or Path(f"{model.stem}-{Path(target).stem}")
    # Progress goes to an interactive terminal only, so that a failing build in a script or CI prints
    # exactly one error line.
    show_progress = sys.stderr.isatty() or click.get_current_context().obj["verbose"]
    result = api.build(model, target, out_dir, input_shapes=parse_input_shapes(input_shape), options=options,
                       archive=archive, progress=_progress(show_progress))
    click.echo(json.dumps(report.build_json(result), indent=2) if as_json else report.build_text(result))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("-i", "--input", "inputs", multiple=True, metavar="[NAME=]FILE.npy",
              help="Input array; random inputs (seed 0) when none is given.")
@click.option("--emulate/--no-emulate", default=None,
              help="Run through the bundle's C++ runner (under qemu for another architecture). "
                   "Default: in process for host bundles, emulated otherwise.")
@click.option("--compare", "compare_model", type=click.Path(path_type=Path),
              help="Compare the outputs with onnxruntime / LiteRT running this model.")
@click.option("--atol", default=1e-4, show_default=True, help="Absolute tolerance for --compare.")
@click.option("--rtol", default=1e-3, show_default=True, help="Tolerance relative to the output's range for --compare.")
@click.option("--output-dir", type=click.Path(path_type=Path), help="Save each output as NAME.npy here.")
@click.option("--threads", type=int, help="Worker threads [default: the target's].")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def run(bundle, inputs, emulate, compare_model, atol, rtol, output_dir, threads, as_json):
    """Run a bundle and optionally check it against the reference runtime."""
    import numpy as np

    from . import api
    from .signature import tensor_file_name
    from .manifest import Manifest

    manifest = Manifest.load(bundle)
    result = api.run(bundle, api.load_inputs(manifest, list(inputs)), emulate=emulate, threads=threads)
    report = {"mode": result.mode, "outputs": {}}
    for name, value in result.outputs.items():
        report["outputs"][name] = {"shape": list(value.shape), "dtype": str(value.dtype),
                                   "min": float(value.min()), "max": float(value.max())}
        if output_dir:
            output_dir.mkdir(parents=True, exist_ok=True)
            np.save(output_dir / tensor_file_name(name), value)
    ok = True
    if compare_model:
        stats, ref_name, ok = api.compare(result, compare_model, atol=atol, rtol=rtol)
        report["compare"] = {"reference": ref_name, "atol": atol, "rtol": rtol, "ok": ok, "outputs": stats}
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(f"ran {bundle} ({result.mode})")
        for name, o in report["outputs"].items():
            click.echo(f"  {name}: {o['dtype']}{o['shape']} min {o['min']:.6g} max {o['max']:.6g}")
        for s in report.get("compare", {}).get("outputs", []):
            click.echo(f"  vs {report['compare']['reference']}: {s['name']} max abs {s.get('max_abs', float('nan')):.3g}, "
                       f"max rel {s.get('max_rel', float('nan')):.3g}" + ("" if s["shape_ok"] else
                                                                         f" SHAPE {s['shape']} != {s['ref_shape']}"))
    if not ok:
        raise EdgecError(f"outputs differ from {report['compare']['reference']} beyond atol={atol}, rtol={rtol}",
                         "check the model's inputs, or rebuild with -O0 to rule out an optimization")


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def inspect(model, as_json):
    """Describe MODEL (operators, parameters, MACs, signature) before building it."""
    from . import report
    from .frontends import inspect_model

    info = inspect_model(model)
    click.echo(json.dumps(report.inspect_json(info), indent=2) if as_json else report.inspect_text(info))


@main.command()
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--runs", default=50, show_default=True)
@click.option("--warmup", default=5, show_default=True)
@click.option("--threads", type=int, help="Worker threads [default: the target's].")
@click.option("--compare", "compare_model", type=click.Path(path_type=Path),
              help="Time onnxruntime / LiteRT on the same input and threads and print the ratio.")
@click.option("--json", "as_json", is_flag=True)
def bench(bundle, runs, warmup, threads, compare_model, as_json):
    """Latency and peak memory of a host bundle."""
    from . import api, report

    result = api.bench(bundle, runs=runs, warmup=warmup, threads=threads, compare_model=compare_model)
    click.echo(json.dumps(report.bench_json(result), indent=2) if as_json else report.bench_text(result))


@main.command()
@click.option("-t", "--target", default="host", show_default=True)
@click.option("-O", "opt_level", type=click.IntRange(0, 3), default=2, show_default=True)
@click.option("--disable-pass", multiple=True, metavar="NAME")
def passes(target, opt_level, disable_pass):
    """List the pass pipeline build runs for a target."""
    from .context import BuildContext, BuildOptions
    from .passes import plan
    from .targets import load_target

    descriptor = load_target(target)
    steps = plan(BuildContext(descriptor, BuildOptions(opt_level, tuple(disable_pass))))
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

    t = load_target(name)
    # Tables nothing reads yet are shown as such, never silently accepted.
    click.echo(json.dumps({**t.to_json(), "file": t.origin, "not_used_yet": t.not_used_yet()}, indent=2))


@main.command()
@click.argument("name", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Where to write the model [default: NAME.onnx].")
def example(name, output):
    """Generate an example model (run without NAME to list them)."""
    from .examples import EXAMPLES

    if name is None:
        for key in EXAMPLES:
            click.echo(key)
        return
    if name not in EXAMPLES:
        raise EdgecError(f"unknown example '{name}'", f"examples: {', '.join(EXAMPLES)}")
    path = EXAMPLES[name](output or Path(f"{name}.onnx"))
    click.echo(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
