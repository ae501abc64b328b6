"""Human-readable summaries for the CLI; --json prints the same data from the *_json functions."""
from __future__ import annotations

from .api import BenchResult, BuildResult
from .build import ActivationMemory
from .frontends import ModelInfo


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:.2f} MB"


def build_json(result: BuildResult) -> dict:
    c = result.compiled
    before, after = c.ops_around_fusion()
    return {
        "bundle": str(result.bundle_dir), "archive": str(result.archive) if result.archive else None,
        "model": c.model.name, "target": c.target.name,
        "operators_before_fusion": before, "operators_after_fusion": after, "kernels": c.kernels,
        "param_bytes": c.param_bytes,
        "activations": {"tensor_bytes": c.memory.tensor_bytes, "planned_bytes": c.memory.planned_bytes,
                        "dynamic_allocations": c.memory.dynamic_allocations},
        "library_bytes": result.library_bytes, "bundle_bytes": result.bundle_bytes,
        "seconds": {k: round(v, 3) for k, v in result.seconds.items()},
        "passes": [{"name": r.name, "phase": r.phase, "seconds": round(r.seconds, 4), "calls": r.calls}
                   for r in c.passes],
        "skipped_passes": {p.name: p.reason for p in c.planned if not p.enabled},
        "codegen_passes": {name: round(s, 4) for name, s in sorted(c.codegen_passes.items(), key=lambda kv: -kv[1])},
    }


def _activations(m: ActivationMemory) -> str:
    text = (f"activation buffers: {_mb(m.planned_bytes)} after memory planning ({_mb(m.tensor_bytes)} without)"
            if m.planned_bytes is not None else f"activation buffers: {_mb(m.tensor_bytes)} (memory planning off)")
    return text + (f", plus {m.dynamic_allocations} of dynamic size" if m.dynamic_allocations else "")


def build_text(result: BuildResult) -> str:
    d = build_json(result)
    c = result.compiled
    lines = [f"built {d['model']} for {d['target']} -> {d['bundle']}"]
    lines += [f"  {'pass':<26} {'time':>9} {'calls after':>12}"]
    lines += [f"  {p['name']:<26} {p['seconds'] * 1e3:>7.1f}ms {p['calls']:>12}" for p in d["passes"]]
    if d["skipped_passes"]:
        lines.append("  skipped: " + ", ".join(f"{k} ({v})" for k, v in d["skipped_passes"].items()))
    lines += [
        f"  operators: {d['operators_before_fusion']} before fusion, {d['operators_after_fusion']} after; "
        f"{d['kernels']} kernels",
        f"  parameters: {_mb(d['param_bytes'])}; {_activations(c.memory)}",
        f"  library: {_mb(d['library_bytes'])}; bundle: {_mb(d['bundle_bytes'])}"
        + (f"; archive: {d['archive']}" if d["archive"] else ""),
        "  time: " + ", ".join(f"{k} {v:.2f}s" for k, v in d["seconds"].items()),
    ]
    return "\n".join(lines)


def _shape(dims) -> str:
    return "x".join(str(d) for d in dims) or "scalar"


def inspect_json(info: ModelInfo) -> dict:
    return {
        "model": str(info.path), "format": info.format,
        "inputs": [{"name": n, "shape": list(s), "dtype": t} for n, s, t in info.inputs],
        "outputs": [{"name": n, "shape": list(s), "dtype": t} for n, s, t in info.outputs],
        "operators": info.op_histogram, "param_count": info.param_count, "param_bytes": info.param_bytes,
        "macs": info.macs, "unsupported_operators": info.unsupported_ops,
    }


def inspect_text(info: ModelInfo) -> str:
    lines = [f"{info.path.name} ({info.format})"]
    lines += [f"  input  {n}: {t} {_shape(s)}" for n, s, t in info.inputs]
    lines += [f"  output {n}: {t} {_shape(s)}" for n, s, t in info.outputs]
    lines.append(f"  parameters: {info.param_count:,} ({_mb(info.param_bytes)})")
    lines.append(f"  MACs: {info.macs:,}" if info.macs is not None else "  MACs: unknown (dynamic shapes)")
    lines.append(f"  operators ({sum(info.op_histogram.values())}):")
    lines += [f"    {op:<28} {n}" for op, n in info.op_histogram.items()]
    if info.unsupported_ops:
        lines.append("  cannot import: " + ", ".join(f"{op} (x{n})" for op, n in info.unsupported_ops.items()))
    else:
        lines.append("  every operator is supported")
    return "\n".join(lines)


def bench_json(result: BenchResult) -> dict:
    def lat(x):
        return None if x is None else {"runs": x.runs, "warmup": x.warmup, "threads": x.threads,
                                       "median_ms": round(x.median_ms, 4), "p90_ms": round(x.p90_ms, 4),
                                       "min_ms": round(x.min_ms, 4)}

    return {"edgec": lat(result.edgec), "peak_rss_bytes": result.peak_rss_bytes,
            "reference": lat(result.reference), "reference_name": result.reference_name,
            "ratio_edgec_over_reference": None if result.ratio is None else round(result.ratio, 3)}


def bench_text(result: BenchResult) -> str:
    e = result.edgec
    lines = [f"edgec: median {e.median_ms:.3f} ms, p90 {e.p90_ms:.3f} ms, min {e.min_ms:.3f} ms "
             f"({e.runs} runs after {e.warmup} warm-up, {e.threads} threads)"]
    if result.peak_rss_bytes is not None:
        lines.append(f"peak memory (C++ runner RSS): {_mb(result.peak_rss_bytes)}")
    if result.reference is not None:
        r = result.reference
        lines.append(f"{result.reference_name}: median {r.median_ms:.3f} ms, p90 {r.p90_ms:.3f} ms, "
                     f"min {r.min_ms:.3f} ms (same input, {r.threads} threads)")
        lines.append(f"ratio edgec / {result.reference_name.split()[0]}: {result.ratio:.2f}x "
                     + ("(edgec slower)" if result.ratio > 1 else "(edgec faster)"))
    return "\n".join(lines)
