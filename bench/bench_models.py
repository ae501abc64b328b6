#!/usr/bin/env python3
"""Time edgec against the model's reference runtime (onnxruntime / LiteRT) in the same run.

For each model: build a host bundle with edgec.api.build into a temporary directory, then time the
bundle (in process, through its own run.py) and the reference runtime on the same input with the same
thread count via edgec.api.bench, and measure the C++ runner's peak RSS. Prints a markdown table;
every number in it comes from this run.

    python bench/bench_models.py                                   # the generated MobileNetV2
    python bench/bench_models.py --runs 20 --threads 2 --json out.json
    python bench/bench_models.py --no-example model.tflite --model det.onnx:x:1x3x320x320
    python bench/bench_models.py det.onnx --input-shape x:1x3x320x320

Models: the generated MobileNetV2 (edgec.examples.mobilenet_v2, unless --no-example), every positional
PATH, and every --model PATH[:NAME:DIMS] (NAME:DIMS pins that model's input NAME to DIMS, e.g. 1x3x224x224).
--input-shape NAME:DIMS pins the input NAME of every positional model that has an input of that name.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgec import api
from edgec.errors import EdgecError
from edgec.frontends import inspect_model, parse_input_shapes
from edgec.reference import ReferenceRuntime

_MODEL_SPEC = re.compile(r"^(?P<path>.+):(?P<name>[^:]+):(?P<dims>\d+(?:x\d+)*)$")


@dataclass
class ModelArg:
    path: Path
    label: str
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)


def parse_model_spec(spec: str) -> ModelArg:
    """PATH or PATH:NAME:DIMS (the path itself may contain ':' as long as it does not end in ':NAME:DIMS')."""
    m = _MODEL_SPEC.match(spec)
    if m and not Path(spec).exists():
        path = Path(m["path"])
        return ModelArg(path, path.stem, parse_input_shapes([f"{m['name']}:{m['dims']}"]))
    return ModelArg(Path(spec), Path(spec).stem)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": datetime.date.today().isoformat(), "nproc": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(), "loadavg_1min": round(os.getloadavg()[0], 2)}


def bench_one(model: ModelArg, workdir: Path, args, say) -> dict:
    bundle = workdir / f"{model.label}-host"
    say(f"{model.label}: build host bundle")
    t0 = time.perf_counter()
    result = api.build(model.path, "host", bundle, input_shapes=model.input_shapes or None,
                       progress=lambda step: say(f"{model.label}:   {step}") if args.verbose else None)
    build_s = time.perf_counter() - t0
    say(f"{model.label}: built in {build_s:.1f}s; timing {args.runs} runs after {args.warmup} warm-up, "
        f"{args.threads} threads")
    compare_model = model.path
    try:
        ReferenceRuntime(model.path)
    except EdgecError as e:     # no onnxruntime / LiteRT installed: time edgec alone, say so
        say(f"{model.label}: no reference runtime ({e}); timing edgec only")
        compare_model = None
    b = api.bench(result.bundle_dir, runs=args.runs, warmup=args.warmup, threads=args.threads,
                  compare_model=compare_model)
    lat = lambda x: None if x is None else {  # noqa: E731
        "runs": x.runs, "warmup": x.warmup, "threads": x.threads, "median_ms": x.median_ms, "p90_ms": x.p90_ms,
        "min_ms": x.min_ms}
    return {
        "model": model.label, "file": str(model.path), "inputs": {s.name: list(s.shape) for s in result.manifest.inputs},
        "threads": b.edgec.threads, "edgec": lat(b.edgec), "reference": lat(b.reference),
        "reference_name": b.reference_name, "ratio_edgec_over_reference": b.ratio,
        "runner_peak_rss_bytes": b.peak_rss_bytes, "build_seconds": build_s,
        "build_phases_seconds": result.seconds, "bundle_bytes": result.bundle_bytes,
        "library_bytes": result.library_bytes, "param_bytes": result.compiled.param_bytes,
        "llvm_target": result.manifest.target["tvm_target"],
    }


def table(rows: list[dict]) -> str:
    head = ("| model | threads | edgec median ms | edgec p90 ms | reference | reference median ms "
            "| edgec / reference | runner peak RSS MB | build s | bundle MB |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['threads']} | error: {r['error']} |" + " |" * 7)
            continue
        e, ref = r["edgec"], r["reference"]
        ratio = r["ratio_edgec_over_reference"]
        rss = r["runner_peak_rss_bytes"]
        lines.append(
            f"| {r['model']} | {r['threads']} | {e['median_ms']:.2f} | {e['p90_ms']:.2f} "
            f"| {r['reference_name'] or 'n/a'} | {ref['median_ms']:.2f} | {ratio:.2f}x "
            f"| {'n/a' if rss is None else f'{rss / 1e6:.0f}'} | {r['build_seconds']:.1f} "
            f"| {r['bundle_bytes'] / 1e6:.2f} |" if ref else
            f"| {r['model']} | {r['threads']} | {e['median_ms']:.2f} | {e['p90_ms']:.2f} | n/a | n/a | n/a "
            f"| {'n/a' if rss is None else f'{rss / 1e6:.0f}'} | {r['build_seconds']:.1f} "
            f"| {r['bundle_bytes'] / 1e6:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("models", nargs="*", metavar="PATH", help="real .onnx / .tflite models to add")
    p.add_argument("--model", action="append", default=[], metavar="PATH[:NAME:DIMS]",
                   help="a model with an optional input pin, e.g. det.onnx:x:1x3x320x320 (repeatable)")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                   help="pin input NAME of the positional models that have it (repeatable)")
    p.add_argument("--no-example", action="store_true", help="skip the generated MobileNetV2")
    p.add_argument("--threads", type=int, default=2, help="threads for edgec and the reference (default 2)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per runtime (default 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs (default 5)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the results as JSON here")
    p.add_argument("--verbose", action="store_true", help="print each build step")
    args = p.parse_args(argv)

    start = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:
        pins = parse_input_shapes(args.input_shape)
        models = []
        for path in args.models:
            m = ModelArg(Path(path), Path(path).stem)
            if pins:
                names = {i[0] if isinstance(i, tuple) else i.name for i in inspect_model(m.path).inputs}
                m.input_shapes = {k: v for k, v in pins.items() if k in names}
            models.append(m)
        models += [parse_model_spec(s) for s in args.model]
    except EdgecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    load_before = round(os.getloadavg()[0], 2)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgec-bench-") as tmp:
        workdir = Path(tmp)
        if not args.no_example:
            from edgec.examples import mobilenet_v2

            models.insert(0, ModelArg(mobilenet_v2(workdir / "mobilenetv2.onnx"), "mobilenetv2 (generated)"))
        if not models:
            p.error("no models: drop --no-example or pass a model")
        for m in models:
            try:
                rows.append(bench_one(m, workdir, args, say))
            except EdgecError as e:
                say(f"{m.label}: error: {e}")
                rows.append({"model": m.label, "file": str(m.path), "threads": args.threads, "error": str(e)})

    info = dict(machine(), loadavg_1min_before=load_before)
    print(f"edgec bench, {info['date']}: {info['nproc']} CPUs ({info['cpu']}), 1-min load average "
          f"{load_before} before / {info['loadavg_1min']} after; {args.runs} runs after {args.warmup} warm-up; "
          "edgec and reference timed in the same process with the same threads\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "runs": args.runs, "warmup": args.warmup,
                                         "threads": args.threads, "results": rows}, indent=2) + "\n")
        say(f"wrote {args.json}")
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
