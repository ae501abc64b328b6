#!/usr/bin/env python3
"""Every figure of README's "What was measured" table, for the models named, from one run.

For each model: build a host and an rpi4 bundle with edgec.api.build (wall time, sizes, operators, activation
buffers from the build summary), and host bundles with other --offload settings (`none`, `auto`); run each on the
same input with edgec.api.run (host in process, rpi4 through its C++ runner under qemu) and compare with the
reference runtime with edgec.api.compare; time the host bundles against their peers, the reference and IREE, with
edgec.benchmark.bench (each runtime in its own process, alternated blocks, threads really used). Prints the
machine, the README table and a latency table: every number comes from this run.

    python bench/bench_models.py                  # mobilenetv2 ppocrv4_det resnet-small transformer-block, as in README
    python bench/bench_models.py mobilenetv2 --runs 3 --blocks 2 --no-rpi4  # a quick look
    python bench/bench_models.py face_detection_short_range.tflite det.onnx:x:1x3x320x320 --json out.json

MODEL is an example edgec generates (`mobilenetv2`: MobileNetV2 224x224; `resnet-small`: CIFAR ResNet-20 32x32;
`transformer-block`: a pre-norm encoder block, 16 tokens x 64), `ppocrv4_det` (PP-OCRv4 det from the test
suite's model cache, tests/models.py, pinned to x:1x3x320x320 and compared on its synthetic text image, since
on noise its output is ~0 everywhere), or PATH[:NAME:DIMS] for any .onnx / .tflite model (NAME:DIMS pins input
NAME; random inputs, seed 0).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

import edgec
from edgec import api, benchmark, report
from edgec.build import BuildOptions
from edgec.errors import EdgecError
from edgec.examples import EXAMPLES
from edgec.frontends import parse_input_shapes
from edgec.offload import parse_option

TESTS = Path(__file__).resolve().parents[1] / "tests"
_PATH_PIN = re.compile(r"^(?P<path>.+):(?P<name>[^:]+):(?P<dims>\d+(?:x\d+)*)$")


@dataclass(frozen=True)
class Model:
    label: str                                  # the table's column head
    path: Path
    input_shapes: dict[str, tuple[int, ...]] | None
    inputs: dict[str, np.ndarray] | None        # the accuracy check's input; None: random, seed 0


def _test_models():
    """tests/models.py: one download-and-cache place for the real models, shared with the tests."""
    spec = importlib.util.spec_from_file_location("edgec_test_models", TESTS / "models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_EXAMPLE_LABELS = {"mobilenetv2": "MobileNetV2 (generated, 224x224)", "resnet-small": "ResNet-20 (generated, 32x32)",
                   "transformer-block": "transformer block (generated, 16x64)"}


def resolve(name: str, workdir: Path) -> Model:
    if name in EXAMPLES:
        return Model(_EXAMPLE_LABELS.get(name, name), EXAMPLES[name](workdir / f"{name}.onnx"), None, None)
    if name == "ppocrv4_det":
        models = _test_models()
        shapes = models.REAL["ppocrv4_det"][0]
        dims = "x".join(map(str, shapes["x"]))
        return Model(f"PP-OCRv4 det ({dims})", models.real_model("ppocrv4_det"), shapes,
                     models.inputs_for("ppocrv4_det"))
    m = _PATH_PIN.match(name)
    if m and not Path(name).exists():
        return Model(f"{Path(m['path']).stem} ({m['dims']})", Path(m["path"]),
                     parse_input_shapes([f"{m['name']}:{m['dims']}"]), None)
    return Model(Path(name).stem, Path(name), None, None)


@dataclass(frozen=True)
class TargetFigures:
    """One bundle of one model: the build summary (report.build_json) and its outputs against the reference."""
    build_seconds: float                        # wall time of edgec.api.build, its own verification run included
    summary: dict
    run_mode: str                               # how edgec.api.run ran it: in-process, qemu, ...
    comparison: dict                            # edgec.reference.Comparison.to_json()

    @property
    def max_abs(self) -> float:
        return max(o["max_abs"] for o in self.comparison["outputs"].values())

    @property
    def max_rel(self) -> float:
        return max(o["max_rel"] for o in self.comparison["outputs"].values())


def build_and_check(model: Model, target: str, workdir: Path, say, offload: str | None = None) -> TargetFigures:
    """A build with the target's default offload, or with `--offload OFFLOAD`."""
    name = target + (f" --offload {offload}" if offload else "")
    say(f"{model.label}: build for {name}")
    t0 = time.perf_counter()
    options = BuildOptions() if offload is None else BuildOptions(offload=parse_option(offload))
    built = api.build(model.path, target, workdir / f"{model.path.stem}-{target}-{offload or 'default'}",
                      input_shapes=model.input_shapes, options=options)
    seconds = time.perf_counter() - t0
    say(f"{model.label}: run the {name} bundle and compare with the reference")
    ran = api.run(built.bundle_dir, model.inputs)
    return TargetFigures(seconds, report.build_json(built), ran.mode, api.compare(ran, model.path).to_json())


@dataclass(frozen=True)
class ModelFigures:
    model: Model
    host: TargetFigures
    rpi4: TargetFigures | None                  # None with --no-rpi4
    offload: dict[str, TargetFigures]           # --offload value -> that host build, timed as a variant
    bench: benchmark.BenchResult


def measure(model: Model, workdir: Path, args, say) -> ModelFigures:
    host = build_and_check(model, "host", workdir, say)
    offload = {value: build_and_check(model, "host", workdir, say, value) for value in args.offload}
    rpi4 = None if args.no_rpi4 else build_and_check(model, "rpi4", workdir, say)
    say(f"{model.label}: time edgec ({len(offload) + 1} builds), {' and '.join(args.peers)}, {args.blocks} "
        f"alternated blocks of {args.runs} runs")
    timed = benchmark.bench(host.summary["bundle"], runs=args.runs, blocks=args.blocks, warmup=args.warmup,
                            threads=args.threads, compare_model=model.path, peers=args.peers,
                            variants=[(f"--offload {v}", f.summary["bundle"]) for v, f in offload.items()])
    return ModelFigures(model, host, rpi4, offload, timed)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def _ms(x: float) -> str:
    return f"{x:.4g} ms"


def _host_rpi4(r: "ModelFigures", fmt) -> str:
    return fmt(r.host) + " / " + ("not run" if r.rpi4 is None else fmt(r.rpi4))


def _error(t: TargetFigures) -> str:
    return f"{t.max_abs:.2g} ({t.max_rel:.2g} of the output range)"


def _activations(summary: dict) -> str:
    a = summary["activations"]
    planned = "not planned" if a["planned_bytes"] is None else _mb(a["planned_bytes"])
    return f"{planned} / {_mb(a['tensor_bytes'])}" + (f" + {a['dynamic_allocations']} dynamic"
                                                      if a["dynamic_allocations"] else "")


def _peer_latency(p: benchmark.PeerResult) -> str:
    return _ms(p.latency.median_ms) if p.latency else "not timed: " + p.skipped.replace("|", "\\|")


def _edgec_latency(r: ModelFigures, build: str) -> str:
    """An edgec build's median, then its ratio to each timed peer (per-block range in brackets)."""
    lat = r.bench.edgec if build == "default" else \
        next(v.latency for v in r.bench.variants if v.peer == f"--offload {build}")
    ratios = [(p, r.bench.ratio(lat, p)) for p in r.bench.peers if p.latency]
    return _ms(lat.median_ms) + "".join(f"; {q.value:.3g}x {p.runtime.split()[0]} ({q.low:.3g}-{q.high:.3g})"
                                        for p, q in ratios)


def readme_table(rows: list[ModelFigures], threads: int) -> str:
    """The table of README's "What was measured": one column per model, a latency row per peer."""
    def line(label, cell):
        return f"| {label} | " + " | ".join(cell(r) for r in rows) + " |"

    labels = [benchmark.PEERS[p.peer] for p in rows[0].bench.peers]    # every model has the same peers

    return "\n".join([
        "| | " + " | ".join(r.model.label for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        line("build time host / rpi4", lambda r: _host_rpi4(r, lambda t: f"{t.build_seconds:.1f} s")),
        line("bundle (library) host / rpi4", lambda r: _host_rpi4(
            r, lambda t: f"{_mb(t.summary['bundle_bytes'])} ({_mb(t.summary['library_bytes'])})")),
        line("operators before → after fusion",
             lambda r: f"{r.host.summary['operators_before_fusion']} → {r.host.summary['operators_after_fusion']}"),
        line("activation buffers (host), with / without memory planning", lambda r: _activations(r.host.summary)),
        line("max abs error vs reference runtime, host", lambda r: _error(r.host)),
        line("max abs error vs reference runtime, rpi4 under qemu",
             lambda r: "not run" if r.rpi4 is None else _error(r.rpi4)),
        *(line(f"host latency, {threads} threads, edgec {'default build' if build == 'default' else '--offload ' + build}"
               " (ratio of medians to each peer; per-block range)", lambda r, b=build: _edgec_latency(r, b))
          for build in ("default", *rows[0].offload)),
        *(line(f"host latency, {threads} threads, {label}", lambda r, i=i: _peer_latency(r.bench.peers[i]))
          for i, label in enumerate(labels)),
        line(f"threads used: edgec / {' / '.join(labels)}", lambda r: " / ".join(
            str(lat.threads.used) if lat else "-" for lat in (r.bench.edgec, *(p.latency for p in r.bench.peers)))
             + f" (of {r.bench.edgec.threads.configured})"),
        line("C++ runner peak RSS, host (one run)", lambda r: _mb(r.bench.runner_peak_rss_bytes)),
    ])


def latency_table(rows: list[ModelFigures]) -> str:
    lines = ["| model | runtime | median | p10 | p90 | block medians (ms) | threads used / configured "
             "| idle worker CPU (cores) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runtimes = [(lat.runtime, lat) for lat in (r.bench.edgec, *(p.latency for p in r.bench.peers if p.latency))]
        runtimes[1:1] = [(f"{v.runtime} {v.peer}", v.latency) for v in r.bench.variants]
        for name, lat in runtimes:
            lines.append(f"| {r.model.label} | {name} | {_ms(lat.median_ms)} | {_ms(lat.p10_ms)} "
                         f"| {_ms(lat.p90_ms)} | {' '.join(f'{x:.4g}' for x in lat.block_medians_ms)} "
                         f"| {lat.threads.used} / {lat.threads.configured} | {lat.idle_cores:.2f} |")
    return "\n".join(lines)


def header(machine: benchmark.Machine, load_after: float, rows: list[ModelFigures], args) -> str:
    peers = list(dict.fromkeys(p.runtime for r in rows for p in r.bench.peers if p.latency))
    return "\n".join([
        f"{datetime.date.today().isoformat()}: {machine.cpu} (LLVM: {machine.llvm_cpu}; "
        f"{', '.join(machine.flags) or 'no avx2/avx512f'}), {machine.cores} cores, 1-min load {machine.load_1min} "
        f"before / {load_after} after",
        f"edgec {edgec.__version__}, TVM {version('apache-tvm')} (untuned, -O2); peers: {', '.join(peers) or 'none'}",
        f"latency: {args.blocks} alternated blocks of {args.runs} runs per runtime after a {args.warmup}-run "
        f"warm-up block each, each runtime in its own process, {args.threads} threads; timed {benchmark.TIMED}",
        f"threads used: threads on a CPU for at least {benchmark.BUSY_FRACTION:.0%} of the timed wall time; "
        f"C++ runner peak RSS: {benchmark.RUNNER_RSS}",
        *([f"IREE: iree-import-onnx --opset-version {benchmark.IREE_IMPORT_OPSET}, then iree-compile "
           f"{' '.join(benchmark.IREE_COMPILE_FLAGS)} (untuned), inputs pinned to edgec's shapes, outputs checked "
           f"against the reference before timing; {args.threads} task workers, beside the calling thread that runs "
           "IREE's VM and issues the dispatches"]
          if "iree" in args.peers else []),
    ])


def timing_options(p: argparse.ArgumentParser) -> None:
    """The alternated-blocks options every timing script here takes (edgec.benchmark.run_blocks)."""
    p.add_argument("--runs", type=int, default=10, help="timed runs per block (default 10)")
    p.add_argument("--blocks", type=int, default=6, help="timed blocks per runtime (default 6)")
    p.add_argument("--warmup", type=int, default=5, help="runs in each runtime's warm-up block (default 5)")


def progress_printer():
    """say(msg): msg on stderr after the seconds since this call, so stdout keeps only the tables."""
    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    return say


def main(argv=None) -> int:
    doc = __doc__.splitlines()
    p = argparse.ArgumentParser(description=doc[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc[2:]))
    p.add_argument("models", nargs="*", metavar="MODEL", default=["mobilenetv2", "ppocrv4_det", "resnet-small", "transformer-block"],
                   help=f"{', '.join(EXAMPLES)}, ppocrv4_det or PATH[:NAME:DIMS] (default: all but PATHs)")
    p.add_argument("--offload", default="none;auto", type=lambda s: [v for v in s.split(";") if v], metavar="LIST",
                   help="host builds with these --offload values, ';'-separated, timed beside the default build "
                   "(default 'none;auto'; '' for none)")
    p.add_argument("--threads", type=int, default=2, help="threads for edgec and every peer (default 2)")
    p.add_argument("--peers", default="reference,iree", type=lambda s: s.split(","), metavar="LIST",
                   help=f"peers to time against edgec, comma-separated, of {', '.join(benchmark.PEERS)} "
                   "(default reference,iree)")
    timing_options(p)
    p.add_argument("--no-rpi4", action="store_true", help="skip the rpi4 build and its check under qemu")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every figure as JSON here")
    args = p.parse_args(argv)
    say = progress_printer()

    machine = benchmark.machine()           # before this run adds to the load average
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
            for name in args.models:
                rows.append(measure(resolve(name, Path(tmp)), Path(tmp), args, say))
    except EdgecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    load_after = round(os.getloadavg()[0], 2)
    print(f"python bench/bench_models.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(header(machine, load_after, rows, args) + "\n")
    print(readme_table(rows, args.threads) + "\n")
    print(latency_table(rows))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": asdict(machine), "load_1min_after": load_after, "argv": sys.argv[1:],
            "models": [{"label": r.model.label, "file": str(r.model.path), "host": asdict(r.host),
                        "rpi4": r.rpi4 and asdict(r.rpi4), "offload": {v: asdict(f) for v, f in r.offload.items()},
                        "bench": report.bench_json(r.bench)} for r in rows],
        }, indent=2, default=str) + "\n")
        say(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
