#!/usr/bin/env python3
"""int8 against fp32 on the board itself: edgec's bundles run by their own C++ runner, onnxruntime int8 beside them.

Two steps, because the board needs neither edgec nor TVM (an edge box, a Raspberry Pi, a rented server):

    python bench/bench_board.py prepare DIR --target board.toml [--models M ...]  # here: quantize, build
    python3 DIR/bench_board.py run DIR [--threads 2]                            # there: python3, numpy, onnxruntime

`prepare` makes onnxruntime's static QDQ model of each model as bench_int8.py does (full-range weights where the
target's oneDNN sums u8 x s8 exactly, i.e. it has VNNI; 7-bit where not), builds edgec bundles of the float and the
QDQ model for the target, each with the target's offload backends and with `--offload none` (TVM's own kernels:
for int8, its integer dot products for the target's CPU), builds the target's edgec_run, and writes DIR: the QDQ
models, the bundles, the timed input, onnxruntime's outputs on it (the QDQ models run with graph optimizations
disabled: their exact math), this script and plan.json. A library several bundles ship (lib/libdnnl.so.2) is kept
once in DIR/shared and put back by `run`. The bundles are verified here only where this CPU can run them.

`run` first runs every bundle once and reports how far its outputs are from onnxruntime's from `prepare` (SQNR,
max abs error; int8 outputs in steps of their quantization scale too): the build verified each bundle where this
machine could run it, and this is the check on the board itself. A bundle that fails to run is left out. Then
each runtime runs in its own process, one process per timed block, the blocks alternated: edgec_run -n RUNS (its
median) and onnxruntime on the QDQ model with all graph optimizations (its fused QLinear kernels), the same
threads for all.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# (label, source model, offload): the bundles `prepare` builds per model
VARIANTS = (("edgec fp32", "float", None), ("edgec int8", "qdq", None),
            ("edgec fp32, offload none", "float", "none"), ("edgec int8, offload none", "qdq", "none"))
SHARED_LIBS = ("lib/libdnnl.so.2",)


# ---- prepare (here, with edgec) -------------------------------------------------------------------------------

def prepare(args) -> int:
    from bench_models import progress_printer

    say = progress_printer()
    out = Path(args.dir)
    if out.exists():
        print(f"error: {out} exists; name a new directory", file=sys.stderr)
        return 2
    try:
        _prepare(args, out, say)
    except BaseException:     # nothing half-written is left behind
        shutil.rmtree(out, ignore_errors=True)
        raise
    say(f"wrote {out}: run 'python3 {out.name}/bench_board.py run {out.name}' on the board")
    return 0


def _prepare(args, out: Path, say) -> None:
    import onnxruntime as ort

    from edgec import api
    from edgec.build import BuildOptions
    from edgec.offload import parse_option
    from edgec.offload.backends.onednn import BACKEND as ONEDNN
    from edgec.targets import load_target
    from edgec.toolchain import build_runner, runtime_dir

    from bench_int8 import _inputs, calibration_data, output_steps, qdq_model
    from bench_models import resolve

    target = load_target(args.target)
    full_range = ONEDNN.int8_limits(target.tvm()) is None
    (out / "shared").mkdir(parents=True)
    plan = {"target": target.name, "tvm_target": str(target.tvm()), "weights": "full range" if full_range else
            "7-bit (reduce_range)", "models": []}
    work = out / "work"
    work.mkdir()
    for name in args.models:
        model = resolve(name, work)
        inputs = _inputs(model)
        say(f"{model.label}: quantize with onnxruntime (static QDQ, {args.calibration} calibration inputs)")
        qdq = qdq_model(model, work, calibration_data(model, args.calibration), reduce_range=not full_range)
        stem = model.path.stem
        shutil.copy(qdq, out / f"{stem}_qdq.onnx")
        for i, v in enumerate(inputs.values()):
            np.save(out / f"{stem}-input{i}.npy", v)
        sources = {"float": model.path, "qdq": qdq}
        expected = {}
        for kind, path in sources.items():
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            for o, value in zip(session.get_outputs(), session.run(None, inputs)):
                np.save(out / f"{stem}-{kind}-{o.name}.npy", value)
                expected.setdefault(kind, {})[o.name] = f"{stem}-{kind}-{o.name}.npy"
        bundles = []
        for label, kind, offload in VARIANTS:
            tag = label.removeprefix("edgec ").replace(", offload ", "-").replace(" ", "")
            say(f"{model.label}: build {label} for {target.name}")
            options = BuildOptions(offload=parse_option(offload)) if offload else BuildOptions()
            bundle = api.build(sources[kind], args.target, out / f"{stem}-{tag}", input_shapes=model.input_shapes,
                               sample_inputs=inputs, options=options).bundle_dir
            shared = [lib for lib in SHARED_LIBS if (bundle / lib).is_file()]
            for lib in shared:       # one copy for all bundles (the same bytes in each); `run` puts it back
                kept = out / "shared" / Path(lib).name
                if kept.exists():
                    (bundle / lib).unlink()
                else:
                    (bundle / lib).rename(kept)
            bundles.append({"label": label, "dir": bundle.name, "kind": kind, "shared": shared,
                            "size": {f: (bundle / f).stat().st_size for f in ("params.bin", "model.so")}})
        plan["models"].append({"label": model.label, "inputs": [f"{stem}-input{i}.npy" for i in range(len(inputs))],
                               "qdq": f"{stem}_qdq.onnx", "expected": expected, "steps": output_steps(qdq),
                               "bundles": bundles})
    shutil.rmtree(work)
    say(f"build the {target.arch} edgec_run")
    runner = build_runner(out / plan["models"][0]["bundles"][0]["dir"], target)
    (out / "bin").mkdir()
    shutil.copy(runner, out / "bin" / "edgec_run")
    for lib in ("libtvm_runtime.so", "libtvm_ffi.so"):     # found next to the binary ($ORIGIN rpath)
        shutil.copy(runtime_dir(target.arch) / "lib" / lib, out / "bin" / lib)
    shutil.copy(__file__, out / "bench_board.py")
    (out / "plan.json").write_text(json.dumps(plan, indent=1))


# ---- run (on the board: numpy and onnxruntime only) ----------------------------------------------------------

def _edgec_block(root: Path, bundle: str, inputs: list[str], runs: int, warmup: int, threads: int) -> float:
    """One block of edgec_run in a process of its own; its outputs go to DIR/out/BUNDLE."""
    out_dir = root / "out" / bundle
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(root / "bin" / "edgec_run"), "-d", str(root / bundle), "-o", str(out_dir), "-n", str(runs),
           "-w", str(warmup), "-t", str(threads)]
    proc = subprocess.run(cmd + [str(root / i) for i in inputs], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"edgec_run {bundle}: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("edgec_run: "))
    return float(dict(kv.split("=") for kv in line.split()[1:])["median_ms"])


def _ort_block(model: str, inputs: list[str], runs: int, warmup: int, threads: int) -> float:
    """One onnxruntime block in a process of its own (this script's `ort-block`)."""
    proc = subprocess.run([sys.executable, __file__, "ort-block", model, str(runs), str(warmup), str(threads),
                           *inputs], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime {model}: {proc.stderr.strip().splitlines()[-1:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def ort_block(args) -> int:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = args.threads, 1
    session = ort.InferenceSession(args.model, options, providers=["CPUExecutionProvider"])
    feed = {i.name: np.load(p) for i, p in zip(session.get_inputs(), args.inputs)}
    for _ in range(args.warmup + 1):
        session.run(None, feed)
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t0) * 1e3)
    print(float(np.median(times)))
    return 0


def _closeness(root: Path, model: dict, bundle: dict, out_dir: Path) -> str:
    """How far the bundle's outputs on the board are from onnxruntime's: SQNR, max abs error, and for int8 outputs
    the share within one quantization step and the most steps off."""
    manifest = json.loads((root / bundle["dir"] / "manifest.json").read_text())
    parts = []
    for o in manifest["outputs"]:
        ours = np.load(out_dir / o["file"]).astype(np.float64)
        ref = np.load(root / model["expected"][bundle["kind"]][o["name"]]).astype(np.float64)
        noise = float(np.sum((ours - ref) ** 2))
        sqnr = "exact" if noise == 0 else f"SQNR {10 * np.log10(max(float(np.sum(ref ** 2)), 1e-30) / noise):.1f} dB"
        text = f"{o['name']}: {sqnr}, max abs error {float(np.abs(ours - ref).max()):.2g}"
        step = model["steps"].get(o["name"]) if bundle["kind"] == "qdq" else None
        if step:
            off = np.abs(ours - ref) / step
            text += f", {float((off <= 1 + 1e-3).mean()):.2%} within one step, max {off.max():.0f} steps"
        parts.append(text)
    return "; ".join(parts)


_ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "asimddp")   # /proc/cpuinfo's names


def _machine() -> str:
    """The CPU's name, cores and int8-relevant instruction sets, from /proc/cpuinfo."""
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
    flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith(("flags", "Features"))), [])
    return f"{cpu}, {os.cpu_count()} cores ({', '.join(f for f in _ISA_FLAGS if f in flags)})"


def run(args) -> int:
    root = Path(args.dir).resolve()
    plan = json.loads((root / "plan.json").read_text())
    print(f"python3 bench_board.py run {' '.join(sys.argv[2:])}")
    for model in plan["models"]:
        for b in model["bundles"]:
            for lib in b["shared"]:
                if not (root / b["dir"] / lib).exists():
                    shutil.copy(root / "shared" / Path(lib).name, root / b["dir"] / lib)
    import onnxruntime as ort

    print(f"{_machine()}; target {plan['target']} ({plan['tvm_target']}), {plan['weights']} int8 weights; "
          f"onnxruntime {ort.__version__}; {args.blocks} alternated blocks of {args.runs} runs after {args.warmup} "
          f"warm-up runs, each block a process of its own, {args.threads} threads")
    print("\n| model | runtime | median of block medians, ms (range) | vs edgec fp32 | vs onnxruntime int8 | size "
          "| outputs against onnxruntime |")
    print("|---|---|---|---|---|---|---|")
    for model in plan["models"]:
        timed, notes = [], {}
        for b in model["bundles"]:
            try:
                _edgec_block(root, b["dir"], model["inputs"], 1, 0, args.threads)
            except RuntimeError as e:
                notes[b["label"]] = f"did not run: {e}"
                continue
            notes[b["label"]] = _closeness(root, model, b, root / "out" / b["dir"])
            timed.append(b)
        runners = [(b["label"], lambda b=b: _edgec_block(root, b["dir"], model["inputs"], args.runs, args.warmup,
                                                          args.threads)) for b in timed]
        runners.append(("onnxruntime int8", lambda: _ort_block(str(root / model["qdq"]),
                                                               [str(root / i) for i in model["inputs"]],
                                                               args.runs, args.warmup, args.threads)))
        medians = {label: [] for label, _ in runners}
        for _ in range(args.blocks):
            for label, block in runners:
                medians[label].append(block())
        median = {label: float(np.median(v)) for label, v in medians.items()}
        sizes = {b["label"]: b["size"] for b in model["bundles"]}
        for label in [b["label"] for b in model["bundles"]] + ["onnxruntime int8"]:
            size = sizes.get(label)
            size_text = f"params.bin {size['params.bin'] / 1e6:.2f} MB + model.so {size['model.so'] / 1e6:.2f} MB" \
                if size else f"{(root / model['qdq']).stat().st_size / 1e6:.2f} MB .onnx"
            if label not in median:
                print(f"| {model['label']} | {label} | - | - | - | {size_text} | {notes.get(label, '')} |")
                continue
            v, ours = medians[label], median[label]
            fp32 = median.get("edgec fp32" if "offload none" not in label else "edgec fp32, offload none")
            print(f"| {model['label']} | {label} | {ours:.2f} ({min(v):.2f}-{max(v):.2f}) | "
                  f"{f'{fp32 / ours:.2f}x' if fp32 else '-'} | {median['onnxruntime int8'] / ours:.2f}x | "
                  f"{size_text} | {notes.get(label, 'reference')} |")
    return 0


def main(argv=None) -> int:
    doc = __doc__.splitlines()
    p = argparse.ArgumentParser(description=doc[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc[2:]))
    sub = p.add_subparsers(dest="command", required=True)
    pre = sub.add_parser("prepare", help="here: quantize, build the bundles and the runner into DIR")
    pre.add_argument("dir", metavar="DIR")
    pre.add_argument("--target", required=True, help="the board's descriptor (a name or a .toml)")
    pre.add_argument("--models", nargs="+", metavar="MODEL", default=["mobilenetv2", "ppocrv4_det"],
                     help="as bench_int8.py's (default: mobilenetv2 ppocrv4_det)")
    pre.add_argument("--calibration", type=int, default=8, help="calibration inputs for quantize_static (default 8)")
    go = sub.add_parser("run", help="on the board: check and time what `prepare` wrote into DIR")
    go.add_argument("dir", metavar="DIR")
    go.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    go.add_argument("--runs", type=int, default=20, help="timed runs per block (default 20)")
    go.add_argument("--blocks", type=int, default=6, help="timed blocks per runtime (default 6)")
    go.add_argument("--warmup", type=int, default=5, help="untimed runs at the start of each block (default 5)")
    blk = sub.add_parser("ort-block", help="internal (run): one onnxruntime block in a process of its own")
    blk.add_argument("model")
    for name in ("runs", "warmup", "threads"):
        blk.add_argument(name, type=int)
    blk.add_argument("inputs", nargs="+")
    args = p.parse_args(argv)
    return {"prepare": prepare, "run": run, "ort-block": ort_block}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
