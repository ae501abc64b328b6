#!/usr/bin/env python3
"""int8 against fp32 on the host: edgec fp32, edgec int8 (two ways), onnxruntime fp32 and onnxruntime int8, latency
and size.

The int8 model is onnxruntime's static QDQ model, made the way onnxruntime documents it: quant_pre_process
(ONNX shape inference, BatchNormalization folded into Conv), then quantize_static(QuantFormat.QDQ, per_channel=True,
uint8 activations, int8 weights) calibrated on --calibration inputs of the model's kind (uniform noise for the
generated MobileNetV2, the tests' synthetic text images, other seeds than the timed one, for PP-OCRv4 det).
edgec int8 is that same QDQ file built by edgec for host; edgec int8 (own) is the float model built with
`--quantize int8 --calibration` on the same calibration inputs (minmax; the last one held back); onnxruntime int8
runs the QDQ file with its default (all) graph optimizations, i.e. its fused QLinear kernels. On a CPU without VNNI both sum u8 x s8 products in saturating
16-bit pairs (oneDNN's and onnxruntime's MLAS kernels alike), exact for 7-bit weights only: there the weights are
7-bit (`reduce_range=True`, as onnxruntime advises for such CPUs; `--reduce-range` chooses).

Latency: the five runtimes, each in its own process, in alternated blocks (edgec.benchmark.run_blocks, as
`edgec bench`), with the same threads. Sizes: each edgec bundle's params.bin and model.so (both ship the same
lib/libdnnl.so.2, so it is left out), each ONNX file. Closeness: edgec int8's outputs against onnxruntime's int8 on
the timed input, in quantization steps of each output (the scale of the DequantizeLinear that makes it), against
onnxruntime with graph optimizations disabled (QDQ run as float math: the exact QDQ semantics) and enabled.

    python bench/bench_int8.py                            # mobilenetv2 and ppocrv4_det, as in bench/README.md
    python bench/bench_int8.py mobilenetv2 --runs 5 --blocks 2   # a quick look
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from onnx import numpy_helper

import edgec
from edgec import api, benchmark
from edgec.context import BuildOptions
from edgec.errors import EdgecError
from edgec.quantize import QuantizeOptions

from bench_models import Model, progress_printer, resolve, timing_options


def calibration_data(model: Model, samples: int) -> list[dict[str, np.ndarray]]:
    """`samples` inputs of the model's kind: text images for PP-OCRv4 det (not the timed one, seed 0), else uniform
    noise."""
    from bench_models import _test_models

    if model.inputs is not None:
        text_image = _test_models().text_image
        return [{"x": text_image(seed=seed)} for seed in range(1, samples + 1)]
    rng = np.random.default_rng(1)
    return [{i.name: rng.random(_shape(i), dtype=np.float32) for i in onnx.load(str(model.path)).graph.input}
            for _ in range(samples)]


def qdq_model(model: Model, workdir: Path, data: list[dict[str, np.ndarray]], reduce_range: bool) -> Path:
    """onnxruntime's static QDQ model of `model`, calibrated on `data` (`reduce_range`: 7-bit weights)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter(data)

        def get_next(self):
            return next(self.it, None)

    source, pre = model.path, workdir / f"{model.path.stem}_pre.onnx"
    out = workdir / f"{model.path.stem}_qdq.onnx"
    opset = next(o.version for o in onnx.load(str(source)).opset_import if o.domain in ("", "ai.onnx"))
    if opset < 13:      # per-channel DequantizeLinear (its axis) is opset 13; PP-OCRv4 det is opset 12
        source = workdir / f"{model.path.stem}_opset13.onnx"
        onnx.save(onnx.version_converter.convert_version(onnx.load(str(model.path)), 13), str(source))
    # symbolic shape inference fails on PP-OCRv4 det's dynamic shapes; ONNX's shape inference and the folding stay
    quant_pre_process(str(source), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=reduce_range)
    return out


def _host_lacks_vnni() -> bool:
    from edgec.offload.backends.onednn import BACKEND
    from edgec.targets import load_target

    return BACKEND.int8_limits(load_target("host").tvm()) is not None


def _shape(value_info) -> tuple[int, ...]:
    return tuple(d.dim_value for d in value_info.type.tensor_type.shape.dim)


def output_steps(qdq: Path) -> dict[str, float | None]:
    """Each output's quantization step: the scale of the DequantizeLinear that makes it (None: not made by one)."""
    graph = onnx.load(str(qdq)).graph
    scales = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    makers = {o.name: next(n for n in graph.node if o.name in n.output) for o in graph.output}
    return {name: float(scales[n.input[1]]) if n.op_type == "DequantizeLinear" else None for name, n in makers.items()}


def steps(qdq: Path, ours: dict[str, np.ndarray], inputs: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per onnxruntime graph optimization level: (fraction of elements within one step, max steps) of edgec's
    int8 outputs against onnxruntime's on the same QDQ model (an output not made by a DequantizeLinear: in units
    of 1e-3 absolute instead)."""
    output_step = output_steps(qdq)
    result = {}
    for label, level in (("disabled", ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                         ("enabled", ort.GraphOptimizationLevel.ORT_ENABLE_ALL)):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(str(qdq), options, providers=["CPUExecutionProvider"])
        within, worst, total = 0, 0.0, 0
        for o, expected in zip(session.get_outputs(), session.run(None, inputs)):
            step = output_step[o.name] or 1e-3
            off = np.abs(ours[o.name].astype(np.float64) - expected) / step
            within, worst, total = within + int((off <= 1 + 1e-3).sum()), max(worst, float(off.max())), total + off.size
        result[label] = (within / total, worst)
    return result


@dataclass(frozen=True)
class Row:
    runtime: str
    latency: benchmark.Latency
    size: str


def _size(path: Path) -> int:
    return path.stat().st_size


def measure(model: Model, workdir: Path, args, say) -> tuple[list[Row], dict, str]:
    inputs = _inputs(model)
    say(f"{model.label}: quantize with onnxruntime (static QDQ, {args.calibration} calibration inputs"
        f"{', 7-bit weights' if args.reduce_range else ''})")
    data = calibration_data(model, args.calibration)
    qdq = qdq_model(model, workdir, data, args.reduce_range)
    say(f"{model.label}: build edgec fp32")
    fp32 = api.build(model.path, "host", workdir / f"{model.path.stem}-fp32", input_shapes=model.input_shapes,
                     sample_inputs=inputs).bundle_dir
    say(f"{model.label}: build edgec int8")
    # verified like any build: against onnxruntime running the QDQ model's exact math (the quantized rule)
    int8 = api.build(qdq, "host", workdir / f"{model.path.stem}-int8", input_shapes=model.input_shapes,
                     sample_inputs=inputs).bundle_dir
    closeness = steps(qdq, api.run(int8, inputs).outputs, inputs)
    say(f"{model.label}: build edgec int8 with its own quantization")
    calibration = workdir / f"{model.path.stem}-calibration.npz"
    np.savez(calibration, **{name: np.concatenate([d[name] for d in data]) for name in data[0]})
    own = api.build(model.path, "host", workdir / f"{model.path.stem}-int8-own", input_shapes=model.input_shapes,
                    options=BuildOptions(quantize=QuantizeOptions("int8", calibration))).bundle_dir
    say(f"{model.label}: time 5 runtimes, {args.blocks} alternated blocks of {args.runs} runs")
    bundles = {"edgec fp32": fp32, "edgec int8": int8, "edgec int8 (own)": own}
    specs = [*(benchmark.WorkerSpec("edgec", b, args.threads) for b in bundles.values()),
             benchmark.WorkerSpec("reference", model.path, args.threads),
             benchmark.WorkerSpec("reference", qdq, args.threads)]
    timing = benchmark.run_blocks(specs, inputs, runs=args.runs, blocks=args.blocks, warmup=args.warmup)
    labels = [*bundles, "onnxruntime fp32", "onnxruntime int8"]
    sizes = [f"params.bin {_mb(_size(b / 'params.bin'))} + model.so {_mb(_size(b / 'model.so'))}"
             for b in bundles.values()]
    sizes += [f"{_mb(_size(p))} .onnx" for p in (model.path, qdq)]
    bundle = {label: _size(b / "params.bin") + _size(b / "model.so") for label, b in bundles.items()}
    rows = [Row(label, benchmark.latency(name, pid, args.warmup, timing.blocks, args.threads), size)
            for label, name, pid, size in zip(labels, timing.names, timing.pids, sizes)]
    # three places: the goal is 0.3, which two would round to
    ratios = (bundle[k] / bundle["edgec fp32"] for k in ("edgec int8", "edgec int8 (own)"))
    return rows, closeness, " and ".join(f"{r:.3f}" for r in ratios)


def _inputs(model: Model) -> dict[str, np.ndarray]:
    if model.inputs is not None:
        return model.inputs
    return {i.name: np.random.default_rng(0).random(_shape(i), dtype=np.float32)
            for i in onnx.load(str(model.path)).graph.input}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"


def table(results: list[tuple[Model, list[Row], dict, str]]) -> str:
    lines = ["| model | runtime | median ms (p10-p90) | vs edgec fp32 | vs onnxruntime int8 | size |",
             "|---|---|---|---|---|---|"]
    for model, rows, _, _ in results:
        base = rows[0].latency.median_ms
        ort_int8 = next(r for r in rows if r.runtime == "onnxruntime int8").latency.median_ms
        for r in rows:
            lat = r.latency
            lines.append(f"| {model.label} | {r.runtime} | {lat.median_ms:.2f} ({lat.p10_ms:.2f}-{lat.p90_ms:.2f}) | "
                         f"{base / lat.median_ms:.2f}x | {ort_int8 / lat.median_ms:.2f}x | {r.size} |")
    lines += ["", "| model | int8 bundle / fp32 bundle (params.bin + model.so; QDQ file and own) | edgec int8 vs "
              "onnxruntime int8, "
              "optimizations disabled: within one step, max steps | enabled: within one step, max steps |",
              "|---|---|---|---|"]
    for model, _, closeness, ratio in results:
        (d_within, d_max), (e_within, e_max) = closeness["disabled"], closeness["enabled"]
        lines.append(f"| {model.label} | {ratio} | {d_within:.2%}, {d_max:.0f} | {e_within:.2%}, {e_max:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    doc = __doc__.splitlines()
    p = argparse.ArgumentParser(description=doc[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc[2:]))
    p.add_argument("models", nargs="*", metavar="MODEL", default=["mobilenetv2", "ppocrv4_det"],
                   help="mobilenetv2, ppocrv4_det or PATH[:NAME:DIMS] (default: the first two)")
    p.add_argument("--threads", type=int, default=2, help="threads for every runtime (default 2)")
    timing_options(p)
    p.add_argument("--calibration", type=int, default=8, help="calibration inputs for quantize_static (default 8)")
    p.add_argument("--reduce-range", choices=("auto", "on", "off"), default="auto",
                   help="7-bit weights (quantize_static's reduce_range); auto: on where the CPU lacks VNNI")
    args = p.parse_args(argv)
    args.reduce_range = {"on": True, "off": False}.get(args.reduce_range, _host_lacks_vnni())
    say = progress_printer()

    machine = benchmark.machine()           # before this run adds to the load average
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="edgec-bench-int8-") as tmp:
            for name in args.models:
                model = resolve(name, Path(tmp))
                results.append((model, *measure(model, Path(tmp), args, say)))
    except EdgecError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"python bench/bench_int8.py {shlex.join(argv if argv is not None else sys.argv[1:])}")
    print(f"{machine.cpu} (LLVM: {machine.llvm_cpu}; {', '.join(machine.flags)}), {machine.cores} cores, 1-min load "
          f"{machine.load_1min} before / {round(os.getloadavg()[0], 2)} after; edgec {edgec.__version__}, TVM "
          f"{version('apache-tvm')}, onnxruntime {ort.__version__}; {args.blocks} alternated blocks of {args.runs} "
          f"runs per runtime after a {args.warmup}-run warm-up, each in its own process, {args.threads} threads"
          f"{'; 7-bit weights (reduce_range)' if args.reduce_range else ''}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
