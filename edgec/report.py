"""Human-readable summaries for the CLI; --json prints the same data from the *_json functions."""
from __future__ import annotations

from dataclasses import asdict

from .api import BuildResult
from .benchmark import BUSY_FRACTION, RUNNER_RSS, SPREAD, BenchResult
from .build import ActivationMemory
from .frontends.custom_ops import CONVERTER_HINT, CUSTOM_SUFFIX
from .inspection import Inspection
from .manifest import MANIFEST_NAME, sha256_file
from .passes.dot_products import VECTOR_LOOP


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def build_json(result: BuildResult) -> dict:
    c = result.compiled
    before, after = c.ops_around_fusion()
    return {
        "bundle": str(result.bundle_dir), "archive": str(result.archive) if result.archive else None,
        "model": result.manifest.model_name, "target": c.target.name,
        "operators_before_fusion": before, "operators_after_fusion": after, "kernels": c.kernels,
        "param_bytes": c.param_bytes,
        "activations": {"tensor_bytes": c.memory.tensor_bytes, "planned_bytes": c.memory.planned_bytes,
                        "dynamic_allocations": c.memory.dynamic_allocations},
        "library_bytes": result.library_bytes, "bundle_bytes": result.bundle_bytes,
        "shared_library_bytes": result.manifest.shared_library_bytes,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "passes": [{"name": r.name, "phase": r.phase, "seconds": round(r.seconds, 4), "calls": r.calls}
                   for r in c.passes],
        "skipped_passes": {p.name: p.reason for p in c.planned if not p.enabled},
        "verification": result.manifest.verification,
        # what a deployer compares to know the bundle is this build's: every file's digest is in the manifest
        "manifest_sha256": sha256_file(result.bundle_dir / MANIFEST_NAME),
        "codegen_passes": {name: round(s, 4) for name, s in sorted(c.codegen_passes.items(), key=lambda kv: -kv[1])},
        # which operators each offload backend took (and as which fused pattern), which stayed in TVM and why
        "offload": None if c.offload is None else [asdict(p) for p in c.offload],
        "shared_libs": list(result.manifest.shared_libs),
        "quantization": c.quantization,    # --quantize: the manifest's record; None without
        "int8_kernels": c.int8_kernels,    # int8 chains TVM computes as integer kernels; None: none met int8-kernels
    }


def _activations(m: ActivationMemory) -> str:
    text = (f"activation buffers: {_mb(m.planned_bytes)} after memory planning ({_mb(m.tensor_bytes)} without)"
            if m.planned_bytes is not None else f"activation buffers: {_mb(m.tensor_bytes)} (memory planning off)")
    return text + (f", plus {m.dynamic_allocations} of dynamic size" if m.dynamic_allocations else "")


def _verification(v: dict) -> str:
    if v["status"] != "verified":
        return f"  NOT VERIFIED: {v['reason']}"
    worst = max(v["outputs"].values(), key=lambda o: o["max_rel"])
    head = (f"  verified against {v['reference']} ({v['runner']}): max abs error {worst['max_abs']:.3g}, "
            f"{worst['max_rel']:.3g} of the output range")
    if "rule" in v:     # a quantized or reduced-precision build: its error against the graph's own rounding error
        worst = min(v["outputs"].values(), key=lambda o: o["margin_db"] if o["margin_db"] is not None else float("inf"))
        margin = "no error" if worst["margin_db"] is None else f"{worst['margin_db']:.1f} dB"
        # how far the graph itself is from the float model: the rule bounds the bundle by it, never checks it
        own = [o["quantization_sqnr_db"] for o in v["outputs"].values() if o["quantization_sqnr_db"] is not None]
        sqnr = f" (SQNR {min(own):.1f} dB)" if own else ""
        return f"{head}; {v['rule']['name']} rule: {margin} below the graph's own rounding error{sqnr}"
    return f"{head} (tolerance atol {v['tolerance']['atol']:g}, rtol {v['tolerance']['rtol']:g})"


def quantization_line(record: dict) -> str:
    """The summary's line of the quantization record's plain values; a step that did not run (None) is left out."""
    return "  quantization: " + "; ".join(f"{k.replace('_', ' ')} {v}" for k, v in record.items()
                                          if v is not None and not isinstance(v, (dict, list)))


def _mixed_precision(q: dict) -> list[str]:
    """The error budget's outcome and each layer left float with its cost (edgec.quantize.budget's record)."""
    def db(x):   # None: no error (inf); "-inf": no signal, or a NaN/infinity that differs
        return "inf" if x is None else f"{x} dB" if isinstance(x, str) else f"{x:.1f} dB"

    lines = []
    if "budget" in q:
        s = q["sqnr_db"]
        lines.append(f"  error budget: SQNR >= {q['budget']['min_sqnr_db']:.4g} dB on {q['budget']['measured_on']}: "
                     f"int8 {db(s['int8'])}" + (f", with --keep-float {db(s['keep_float'])}" if "keep_float" in s
                                                else "") + f", mixed {db(s['mixed'])}")
    if "float_layers" in q:
        lines.append(f"  float layers: {len(q['float_layers'])} of {q['quantizable_layers']} (latency "
                     f"{q['latency_cost']})")
        for r in q["float_layers"]:
            alone = "-" if r["sqnr_alone_db"] is None else db(r["sqnr_alone_db"])
            lines.append(f"    {r['layer']:<14} {r['why']:<13} SQNR with it alone in int8 {alone:>8}, "
                         f"{100 * r['mac_share']:.1f}% of MACs, +{r['bytes_added'] / 1e3:.1f} KB")
    return lines


def build_text(result: BuildResult) -> str:
    d = build_json(result)
    c = result.compiled
    lines = [f"built {d['model']} for {d['target']} -> {d['bundle']}"]
    lines += [f"  {'pass':<26} {'time':>9} {'calls after':>12}"]
    lines += [f"  {p['name']:<26} {p['seconds'] * 1e3:>7.1f}ms {p['calls']:>12}" for p in d["passes"]]
    if d["skipped_passes"]:
        lines.append("  skipped: " + ", ".join(f"{k} ({v})" for k, v in d["skipped_passes"].items()))
    lines += [
        _verification(d["verification"]),
        f"  manifest sha256: {d['manifest_sha256']}",
        f"  operators: {d['operators_before_fusion']} before fusion, {d['operators_after_fusion']} after; "
        f"{d['kernels']} kernels",
        f"  parameters: {_mb(d['param_bytes'])}; {_activations(c.memory)}",
        f"  library: {_mb(d['library_bytes'])}; bundle: {_mb(d['bundle_bytes'])}"
        + (f" ({_mb(d['shared_library_bytes'])} of it the shared libraries in lib/)" if d["shared_library_bytes"]
           else "")
        + (f"; archive: {d['archive']}" if d["archive"] else ""),
        "  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in d["seconds"].items()),
    ]
    if c.quantization:
        lines.append(quantization_line(c.quantization))
        lines += _mixed_precision(c.quantization.get("mixed_precision", {}))
    if c.int8_kernels:
        k = c.int8_kernels
        lines.append(f"  int8 kernels in TVM: {k['layers']} int8 layers, {k['kernels']} kernels, {k['instruction']}"
                     + (f", {k['depthwise']} depthwise: {VECTOR_LOOP}" if k["depthwise"] else "")
                     + "".join(f"; float: {n} {why}" for why, n in k["refused"].items())
                     + "".join(f"; left float: {why}" for why in k["left"]))
    if c.offload is not None:
        lines.append("  offload (operator calls -> where they run):" if c.offload else
                     "  offload: no operator matched a backend's patterns")
        lines += [f"    {p.operator} x{p.count} -> "
                  + (f"{p.backend} ({p.detail})" if p.backend else f"TVM: {p.detail}") for p in c.offload]
        if d["shared_libs"]:
            lines.append("    ships " + ", ".join(d["shared_libs"]))
    return "\n".join(lines)


def _shape(dims) -> str:
    return "x".join(str(d) for d in dims) or "scalar"


def inspect_json(inspection: Inspection) -> dict:
    info = inspection.info
    return {
        "model": str(info.path), "format": info.format,
        "inputs": [{"name": n, "shape": list(s), "dtype": t} for n, s, t in info.inputs],
        "outputs": [{"name": n, "shape": list(s), "dtype": t} for n, s, t in info.outputs],
        "operators": info.op_histogram, "param_count": info.param_count, "param_bytes": info.param_bytes,
        "macs": info.macs, "unsupported_operators": info.unsupported_ops,
        # the import a build runs, run for real (no passes, no code generation)
        "imports": inspection.import_error is None, "import_error": inspection.import_error,
        "imported_operator_calls": inspection.relax_calls,
    }


def inspect_text(inspection: Inspection) -> str:
    info = inspection.info
    lines = [f"{info.path.name} ({info.format})"]
    lines += [f"  input  {n}: {t} {_shape(s)}" for n, s, t in info.inputs]
    lines += [f"  output {n}: {t} {_shape(s)}" for n, s, t in info.outputs]
    lines.append(f"  parameters: {info.param_count:,} ({_mb(info.param_bytes)})")
    lines.append(f"  MACs: {info.macs:,}" if info.macs is not None else "  MACs: unknown (dynamic shapes)")
    lines.append(f"  operators ({sum(info.op_histogram.values())}):")
    lines += [f"    {op:<28} {n}" for op, n in info.op_histogram.items()]
    if info.unsupported_ops:
        lines.append("  cannot import: " + ", ".join(f"{op} (x{n})" for op, n in info.unsupported_ops.items()))
        if any(op.endswith(CUSTOM_SUFFIX) for op in info.unsupported_ops):
            lines.append(f"  {CONVERTER_HINT}")
    elif inspection.import_error is not None:
        lines.append(f"  import fails: {inspection.import_error}")
    else:
        lines.append(f"  imports: {inspection.relax_calls} operator calls in Relax (imported as a build would, "
                     "without compiling)")
    return "\n".join(lines)


def bench_json(result: BenchResult) -> dict:
    """Everything the benchmark measured: every run's time, every block in the order it ran, every thread's
    CPU share, each peer's result or why it was not timed, with the definitions of the derived figures."""
    return {**asdict(result),
            "definitions": {"timed": result.timed, "threads_used": f"threads on a CPU for at least "
                            f"{BUSY_FRACTION:.0%} of the timed wall time", "ratio": "median of all edgec runs / "
                            "median of all the peer's runs", "ratio_spread": SPREAD,
                            "idle_cores": "CPU a worker used while another worker was timed, in cores",
                            "runner_peak_rss_bytes": RUNNER_RSS}}


def bench_text(result: BenchResult) -> str:
    rows = [result.edgec, *(p.latency for p in result.peers if p.latency is not None)]
    blocks = len(result.edgec.block_medians_ms)
    order = ", ".join(r.runtime.split()[0] for r in rows)
    m = result.machine
    lines = [f"{blocks} timed blocks of {result.runs_per_block} runs per runtime"
             + (f", alternated {order}, {order}, ..." if len(rows) > 1 else "")
             + (f", after one warm-up block of {result.edgec.warmup} runs" if result.edgec.warmup else ", no warm-up")
             + "; each runtime in its own process",
             f"timed: {result.timed}",
             f"machine: {m.cpu} (LLVM: {m.llvm_cpu}; {', '.join(m.flags) or 'no avx2/avx512f'}), {m.cores} cores, "
             f"1-min load {m.load_1min} before",
             f"  {'runtime':<28} {'median':>10} {'p10':>10} {'p90':>10}  threads used / configured  block medians (ms)"]
    for r in rows:
        used = "?" if r.threads.used is None else r.threads.used
        lines.append(f"  {r.runtime:<28} {r.median_ms:>7.3f} ms {r.p10_ms:>7.3f} ms {r.p90_ms:>7.3f} ms  "
                     f"{f'{used} / {r.threads.configured}':>25}  " + " ".join(f"{x:.4g}" for x in r.block_medians_ms))
    lines += [f"  {p.runtime:<28} not timed: {p.skipped}" for p in result.peers if p.skipped]
    lines.append(f"threads used: threads on a CPU for at least {BUSY_FRACTION:.0%} of the timed wall time")
    idle = ", ".join(f"{r.runtime.split()[0]} {r.idle_cores:.2f}" for r in rows if r.idle_cores is not None)
    if idle:
        lines.append(f"CPU used by the idle workers while another was timed (cores): {idle}")
    for p in result.peers:
        if p.ratio is not None:
            lines.append(f"ratio edgec / {p.runtime.split()[0]} (medians of all runs): {p.ratio.value:.2f}x, "
                         f"per-block range {p.ratio.low:.2f}x-{p.ratio.high:.2f}x "
                         + ("(edgec slower)" if p.ratio.value > 1 else "(edgec faster)"))
    if result.runner_peak_rss_bytes is not None:
        lines.append(f"C++ runner peak RSS: {_mb(result.runner_peak_rss_bytes)} ({RUNNER_RSS})")
    return "\n".join(lines + _profile(result))


PROFILE_SHOWN = 15    # the slowest calls listed; --json has all


def _profile(result: BenchResult) -> list[str]:
    """--profile: where a run's time goes, per function the VM calls and per kind."""
    if not result.profile:
        return []
    total = sum(c.median_ms for c in result.profile)
    kinds: dict[str, float] = {}
    for c in result.profile:
        kinds[c.kind] = kinds.get(c.kind, 0.0) + c.median_ms
    lines = [f"profile: edgec's calls over {result.profile_runs} runs after its timed blocks (the VM's instrument hook, "
             f"a few microseconds per call added), median per run, sum {total:.3f} ms against the median run "
             f"{result.edgec.median_ms:.3f} ms:",
             "  by kind: " + ", ".join(f"{k} {v:.3f} ms ({v / total:.0%})" for k, v in
                                       sorted(kinds.items(), key=lambda kv: -kv[1])),
             f"  {'ms per run':>10} {'share':>6} {'calls':>6}  {'kind':<8} function"]
    lines += [f"  {c.median_ms:>10.3f} {c.median_ms / total:>6.1%} {c.calls:>6g}  {c.kind:<8} {c.name}"
              for c in result.profile[:PROFILE_SHOWN]]
    if len(result.profile) > PROFILE_SHOWN:
        rest = result.profile[PROFILE_SHOWN:]
        lines.append(f"  {sum(c.median_ms for c in rest):>10.3f} {'':>6} {'':>6}  {'':<8} "
                     f"{len(rest)} other functions (--json lists all)")
    return lines
