#!/usr/bin/env python3
"""Latency of a host bundle while other processes hold the cores, beside onnxruntime under the same load.

A default host build offloads convolutions and matrix products to oneDNN, whose OpenMP team also runs the parallel
loops of TVM's kernels left in the model (one pool per process; TVM's own pool never gets work). OpenMP's workers
spin a while after each parallel region before they sleep: that makes back-to-back kernels fast, but when other
processes want the same cores, spinning threads take the time slices the working ones need. The runners set
GOMP_SPINCOUNT=10000 (about 100 us of spinning; libgomp's default is about 3 ms). This measures that default against
the settings OpenMP reads from the environment:

    OMP_WAIT_POLICY=PASSIVE           OpenMP workers sleep at once instead of spinning
    GOMP_SPINCOUNT=300000             libgomp's own default spin
    GOMP_SPINCOUNT=1000               about 10 us (the runners' default before 2026-11-25)
    OMP_PROC_BIND=true                each team member bound to its own core (with the default spin)

For each count of busy neighbours (processes spinning on a core each), every runtime and setting runs in its own
process, in alternated rounds; each process times `--runs` runs after a warm-up and reports its median and 90th
percentile. The table gives the median of the rounds' medians and the worst round's 90th percentile.
`--baseline BUNDLE` adds a bundle of the same model built by another edgec (before a change) as a row.
`--pace MS` sleeps that long before each run, as an application running the model on each camera frame does
(33 ms: 30 frames a second): the workers then sleep between runs, and every run wakes them. The model is one
edgec generates or an ONNX file (`--input-shape` as for `edgec build`); onnxruntime runs the bundle's sample input.

    python bench/bench_under_load.py                          # mobilenetv2, 0/1/2 neighbours, 3 rounds
    python bench/bench_under_load.py --model resnet-small --neighbours 0 2 --rounds 5
    python bench/bench_under_load.py --model cls.onnx --input-shape x:1x3x48x192 --neighbours 0 --pace 33
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from edgec import api, benchmark
from edgec.examples import EXAMPLES
from edgec.frontends import parse_input_shapes

SETTINGS = {
    "default": {},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "GOMP_SPINCOUNT=300000": {"GOMP_SPINCOUNT": "300000"},
    "GOMP_SPINCOUNT=1000": {"GOMP_SPINCOUNT": "1000"},
    "OMP_PROC_BIND=true": {"OMP_PROC_BIND": "true"},
}

# One timed process: prints {"median": ms, "p90": ms}. argv: runtime, model path (onnxruntime) or "-", the bundle
# (whose sample input both runtimes take), threads, runs, pace (ms of sleep before each run).
_WORKER = r"""
import json, sys, time
import numpy as np
runtime, model, bundle, threads, runs, pace = (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]),
                                               int(sys.argv[5]), float(sys.argv[6]))
sys.path.insert(0, bundle)
import run
manifest = run.load_manifest(bundle)     # the sample read as files: no edgec model (nor its threads) beside onnxruntime
feeds = {t["name"]: np.load(f"{bundle}/{manifest['sample']['inputs']}/{t['file']}") for t in manifest["inputs"]}
if runtime == "edgec":
    edgec = run.Model(bundle, threads=threads)
    call = lambda: edgec.run(feeds)
else:
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    call = lambda: session.run(None, feeds)
for _ in range(5):
    call()
times = []
for _ in range(runs):
    time.sleep(pace / 1e3)
    start = time.perf_counter()
    call()
    times.append((time.perf_counter() - start) * 1e3)
times.sort()
print(json.dumps({"median": times[len(times) // 2], "p90": times[int(len(times) * 0.9)]}))
"""


def timed(runtime: str, model: Path, bundle: Path, env: dict, threads: int, runs: int, pace: float) -> dict:
    proc = subprocess.run([sys.executable, "-c", _WORKER, runtime, str(model), str(bundle), str(threads), str(runs),
                           str(pace)], env={**os.environ, **env}, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.splitlines()[-1])


def under_load(neighbours: int, candidates: list[tuple[str, str, Path, dict]], model: Path, threads: int, runs: int,
               rounds: int, pace: float) -> dict[str, list[dict]]:
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(neighbours)]
    try:
        results: dict[str, list[dict]] = {label: [] for label, *_ in candidates}
        for _ in range(rounds):
            for label, runtime, bundle, env in candidates:
                results[label].append(timed(runtime, model, bundle, env, threads, runs, pace))
        return results
    finally:
        for p in busy:
            p.kill()
            p.wait()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mobilenetv2",
                        help=f"an example edgec generates ({', '.join(sorted(EXAMPLES))}) or an ONNX file")
    parser.add_argument("--input-shape", action="append", default=[], metavar="NAME:DIMS",
                        help="pin an input's shape, as for edgec build (an ONNX file's)")
    parser.add_argument("--neighbours", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pace", type=float, default=0.0, metavar="MS", help="sleep before each run (default 0)")
    parser.add_argument("--baseline", type=Path, help="a bundle of the same model from another edgec build, timed too")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgec-load-") as tmp:
        if args.model in EXAMPLES:
            model = EXAMPLES[args.model](Path(tmp) / f"{args.model}.onnx")
        else:
            model = Path(args.model).resolve()
        bundle = Path(tmp) / "bundle"
        api.build(model, "host", bundle, input_shapes=parse_input_shapes(args.input_shape))
        candidates = [(f"edgec, {name}", "edgec", bundle, env) for name, env in SETTINGS.items()]
        if args.baseline:
            candidates.append(("edgec baseline bundle", "edgec", args.baseline.resolve(), {}))
        candidates.append(("onnxruntime", "onnxruntime", bundle, {}))
        machine = benchmark.machine()
        pace = f", {args.pace:g} ms pause before each run" if args.pace else ""
        print(f"{Path(args.model).name}, {args.threads} threads, {machine.cpu} ({machine.cores} cores), "
              f"{args.rounds} alternated rounds of {args.runs} runs{pace}; ms: median of round medians (worst round's "
              "p90)\n")
        print("| runtime | " + " | ".join(f"{n} busy neighbour{'s' if n != 1 else ''}" for n in args.neighbours) + " |")
        print("|---" * (len(args.neighbours) + 1) + "|")
        table = {n: under_load(n, candidates, model, args.threads, args.runs, args.rounds, args.pace)
                 for n in args.neighbours}
        for label, *_ in candidates:
            cells = []
            for n in args.neighbours:
                rounds = table[n][label]
                cells.append(f"{statistics.median(r['median'] for r in rounds):.2f} "
                             f"({max(r['p90'] for r in rounds):.1f})")
            print(f"| {label} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
