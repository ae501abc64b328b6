"""Calibration: the float model run on the calibration samples with taps on the tensors `analysis.plan` picks,
and a range [lo, hi] for each from what the samples put through it.

The taps are extra outputs of a copy of main compiled for this machine (calibration runs here whatever the
target). Samples go through in batches of `BATCH`; min/max come from a first sweep, and `percentile` and
`entropy` make a second one to fill a histogram of `BINS` bins over that range.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from ..dataset import Dataset
from ..errors import EdgecError
from ..progress import current
from . import analysis

BATCH = 32
BINS = 2048


def _tap_module(mod: tvm.IRModule, keys: list[str]) -> tvm.IRModule:
    """main returning (its own result, every tapped tensor), the tensors found again by key in a non-dataflow copy
    (dataflow vars cannot leave their block)."""
    flat = relax.transform.ToNonDataflow()(mod)
    func = flat["main"]
    found = {k: t for k, t in analysis.plan(func).tensors}
    if list(found) != keys:
        raise EdgecError("internal error: calibration taps changed when leaving dataflow form",
                         "report this with the model and --dump-ir output")
    body = func.body
    taps = relax.BlockBuilder().normalize(relax.SeqExpr(body.blocks, relax.Tuple([body.body, *found.values()])))
    out = tvm.IRModule({gv: f for gv, f in flat.functions_items() if gv.name_hint != "main"})
    out["main"] = relax.Function(func.params, taps, attrs=func.attrs)
    return relax.transform.Normalize()(out)


def on_host(mod: tvm.IRModule, llvm_opt_level: int = 3) -> relax.VirtualMachine:
    """`mod` compiled for this machine to run here (calibration taps, the quantized reference), in its own
    PassContext: the build's one (its -O level, instruments and target options) is for the target.
    `llvm_opt_level` 1 for a graph run on a few samples: LLVM's -O1 halves the compile (MobileNetV2: 4.1 -> 2.2 s, of
    7 s with the machine code) and the run takes 15% longer (0.20 -> 0.23 s), bit for bit the same outputs (no
    fast-math)."""
    with tvm.transform.PassContext(opt_level=3):
        executable = tvm.compile(mod, target=tvm.target.Target({"kind": "llvm", "opt-level": llvm_opt_level}))
    return relax.VirtualMachine(executable, tvm.cpu())


class Runner:
    """A module whose main returns (the model's result, *taps), compiled here; `names`: the inputs it takes."""

    def __init__(self, tapped: tvm.IRModule, names: list[str]):
        self.vm = on_host(tapped)
        self.names = names

    @classmethod
    def tapping(cls, mod: tvm.IRModule, keys: list[str], cache: list | None = None) -> "Runner":
        """main with the tensors `analysis.plan` keys as `keys` tapped; `cache` (a build's BuildContext.tap_runners)
        gives the runner made before for the same main and keys (compiling MobileNetV2 with its taps: 8 s)."""
        func = mod["main"]
        for tapped, tapped_keys, runner in cache or ():
            if tapped.same_as(func) and tapped_keys == keys:
                return runner
        runner = cls(_tap_module(mod, keys), [p.name for p in func.params])
        if cache is not None:
            cache[:] = [(func, list(keys), runner)]     # the last one only: a later pass taps the graph it left
        return runner

    def taps(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        args = [tvm.runtime.tensor(inputs[n]) for n in self.names if n in inputs]
        result = self.vm["main"](*args)
        return [t.numpy() for t in list(result)[1:]]


def sweep(runner: Runner, data: Dataset, what: str, visit) -> None:
    say = current()
    batches = -(-len(data) // BATCH)
    for i, batch in enumerate(data.batches(BATCH), start=1):
        say.detail(f"{what}: batch {i}/{batches} ({len(data)} samples)")
        for sample in batch:
            visit(runner.taps(sample.inputs))


def _percentile_range(hist: np.ndarray, lo: float, hi: float, percentile: float) -> tuple[float, float]:
    """The values below which (100 - p)% and p% of the samples fall, on the histogram over [lo, hi]."""
    edges = np.linspace(lo, hi, len(hist) + 1)
    cdf = np.cumsum(hist) / hist.sum()
    tail = 1 - percentile / 100
    low = edges[np.searchsorted(cdf, tail, side="right")] if lo < 0 else lo
    high = edges[min(np.searchsorted(cdf, 1 - tail, side="left") + 1, len(hist))]
    return float(low), float(high)


def _kl_range(hist: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    """The window [a, b] of [lo, hi] (0 inside it) whose uint8 quantization loses the least information: the
    Kullback-Leibler divergence from the clipped distribution P to its quantized copy Q (TensorRT's method).

    As TensorRT: each candidate window of i bins, P its bins with the tails clipping moves folded into the edge
    bins, Q the window's own counts merged into the 256 levels uint8 puts on it and spread back over the bins nonzero
    in P. Unlike TensorRT, whose histogram is of |x| with 128 levels (int8, symmetric), the histogram is of x and
    the window the range the asymmetric uint8 pair gets: it shrinks toward 0 keeping 0's place in [lo, hi], so a
    hardswish output ([-0.19, 52]) is measured with the 255 steps it gets, not 128 on |x| (which clipped PP-OCRv4
    det's to 5.6). And Q is not renormalized: it lacks the clipped tails' mass m, which costs -log(1 - m) on top of
    the divergence from the renormalized Q; without that a window holding only tails (an input with no values near
    0, which every window holds) has Q = P and divergence 0."""
    hist = hist.astype(np.float64)
    total, n = hist.sum(), len(hist)
    if total == 0:
        return lo, hi
    zero = n * min(max(-lo / (hi - lo), 0.0), 1.0)     # 0's bin; at the end for all-negative x (it past hi)
    levels = 256
    best, best_kl = (0, n), np.inf
    for i in range(levels, n + 1):
        a = int(round(zero * (1 - i / n)))
        b = a + i
        p = hist[a:b].copy()
        p[0] += hist[:a].sum()
        p[-1] += hist[b:].sum()
        nonzero = p > 0
        starts = np.linspace(0, i, levels + 1).astype(int)[:-1]
        sums = np.add.reduceat(hist[a:b], starts)
        counts = np.add.reduceat(nonzero.astype(np.float64), starts)
        level = np.repeat(np.arange(levels), np.diff(np.append(starts, i)))
        q = np.where(nonzero, (sums / np.maximum(counts, 1))[level], 0.0)
        kl = float(np.sum(p[nonzero] * np.log(p[nonzero] / np.maximum(q[nonzero], 1e-12 * total)))) / total
        if kl < best_kl:
            best, best_kl = (a, b), kl
    edges = np.linspace(lo, hi, n + 1)
    return float(min(edges[best[0]], 0.0)), float(max(edges[best[1]], 0.0))


def calibrate(mod: tvm.IRModule, data: Dataset, method: str, percentile: float,
              runners: list | None = None) -> dict[str, tuple[float, float]]:
    """{tensor key: (lo, hi)} over `data` for every tensor `analysis.plan` gives a pair, by `method` (`runners`: as
    Runner.tapping's cache)."""
    keys = analysis.plan(mod["main"]).keys()
    if not keys:
        return {}
    current().detail("calibration: compile the float model with taps")
    runner = Runner.tapping(mod, keys, runners)
    lo = np.full(len(keys), np.inf)
    hi = np.full(len(keys), -np.inf)

    def minmax(taps):
        for j, t in enumerate(taps):
            lo[j], hi[j] = min(lo[j], float(t.min())), max(hi[j], float(t.max()))

    sweep(runner, data, "calibration min/max", minmax)
    if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        bad = keys[int(np.argmin(np.isfinite(lo) & np.isfinite(hi)))]
        raise EdgecError(f"calibration: tensor {bad.split(':', 1)[1]!r} takes non-finite values on the calibration "
                         "samples", "check the calibration data (preprocessing, dtype) or build without --quantize")
    if method == "minmax":
        return {k: (float(a), float(b)) for k, a, b in zip(keys, lo, hi)}
    hists = [np.zeros(BINS, np.int64) for _ in keys]

    def histogram(taps):
        for j, t in enumerate(taps):
            # entropy leaves exact zeros out: 0 is exact in every range (the zero point), and ReLU's spike of zeros
            # would otherwise dominate the divergence and clip ReLU6 outputs to a quarter of their range
            if hi[j] > lo[j]:
                hists[j] += np.histogram(t if method == "percentile" else t[t != 0], BINS, (lo[j], hi[j]))[0]

    sweep(runner, data, f"calibration {method} histograms", histogram)
    ranges = {}
    for j, key in enumerate(keys):
        if hi[j] <= lo[j]:
            ranges[key] = (float(lo[j]), float(hi[j]))
        elif method == "percentile":
            ranges[key] = _percentile_range(hists[j], lo[j], hi[j], percentile)
        else:
            ranges[key] = _kl_range(hists[j], lo[j], hi[j])
    return ranges
