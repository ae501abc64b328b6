"""Mixed precision by error budget (`--min-sqnr DB`, `--max-error PCT`) and by hand (`--keep-float PATTERN`).

Which layers (analysis.Plan.layers: conv2d_0, add_3, ...) stay float so that the int8 graph's outputs stay within
the budget of the float model's on the calibration samples. The search compiles one module, the QDQ graph with a
switch per layer (qdq.rewrite(switchable=True)), and runs it on up to SEARCH_SAMPLES calibration samples for each
mix it tries: no recompiling per candidate.

1. Alone: each layer's harm, the output SQNR with that layer alone in int8 and every other float, on the first
   ALONE_SAMPLES samples (quantization noise from layers adds up, near enough, so this ranks them without the
   cross terms of a mix).
2. Bisect: the longest run of the least harmful layers that, all in int8 together, still meets the budget.
3. Greedy: each other layer, least harmful first, goes to int8 when the mix measured with it still meets the budget
   (so interactions count); one whose noise alone exceeds what is left of the budget is not tried.
Plain int8 that meets the budget ends the search at once. What stays float is what did not fit: the worst layers.
A mix tried in 2 or 3 is run sample by sample only until its noise so far shows it misses the budget.

SQNR is 10 log10(sum ref^2 / sum (q - ref)^2) per output over the samples; the budget holds when every output
meets it. --max-error P% is a relative RMS error, sqrt(sum (q - ref)^2 / sum ref^2) <= P/100, i.e. an SQNR of
-20 log10(P/100) dB (1% is 40 dB).
"""
from __future__ import annotations

import math
from fnmatch import fnmatchcase

import numpy as np
import tvm
from tvm import relax

from ..dataset import Dataset
from ..errors import EdgecError
from ..evaluation import _Accumulator
from ..progress import current
from ..reference import decibels
from . import QuantizeOptions, analysis, qdq
from .calibrate import on_host

SEARCH_SAMPLES = 32
ALONE_SAMPLES = 8     # of those, what each layer's harm alone is measured on (it only ranks them)
LATENCY_BASIS = "estimated from multiply-accumulates (the layer's share of the conv/matmul MACs), not measured"


class _Switched:
    """The switchable QDQ module compiled here, its float outputs on the search samples held."""

    def __init__(self, mod: tvm.IRModule, ranges: dict, data: Dataset, layers: list[str],
                 corrections: dict[str, np.ndarray] | None = None, rounded: dict[str, np.ndarray] | None = None,
                 weight_max: int = qdq.WEIGHT_MAX):
        current().detail("error budget: compile the switchable int8 graph")
        self.vm = on_host(qdq.rewrite(mod, ranges, switchable=True, corrections=corrections, rounded=rounded,
                                      weight_max=weight_max)[0])
        self.layers = layers
        names = [p.name for p in mod["main"].params]
        samples = next(iter(data.batches(SEARCH_SAMPLES)))
        self.inputs = [[tvm.runtime.tensor(s.inputs[n]) for n in names] for s in samples]
        self.reference = list(self._outputs(set(self.layers), len(self.inputs)))
        # per output, the most signal energy a mix can be measured against (the elements finite on both sides
        # count): a mix whose noise so far passes what the budget allows of it has missed the budget
        self.max_signal = [sum(float(np.dot(r[k][np.isfinite(r[k])], r[k][np.isfinite(r[k])]))
                               for r in self.reference) for k in range(len(self.reference[0]))]

    def _outputs(self, floats: set[str], count: int):
        """Each sample's outputs in turn (float64), with `floats` float and the other layers int8."""
        switch = tvm.runtime.tensor(np.array([n not in floats for n in self.layers], bool))
        for args in self.inputs[:count]:
            result = self.vm["main"](*args, switch)
            values = list(result) if isinstance(result, (tvm.ir.Array, list, tuple)) else [result]
            yield [v.numpy().astype(np.float64) for v in values]

    def sqnr(self, floats: set[str], count: int = SEARCH_SAMPLES, budget: float | None = None) -> float:
        """The worst output's SQNR (dB) against the float model with `floats` float and the other layers int8.
        With a `budget`: -inf as soon as the samples run so far show the mix misses it (the rest are not run)."""
        # the held-back table's sums: over elements finite on both sides, a NaN/infinity that differs misses any
        # budget (a NaN noise compared as never below the worst and passed)
        sums = [_Accumulator("", None) for _ in self.reference[0]]
        # float sums of non-negative terms only grow, and the margin covers np.dot's other summation order
        allowed = ([m * _noise(budget) * (1 + 1e-9) for m in self.max_signal] if budget is not None
                   else [math.inf] * len(sums))
        for got, ref in zip(self._outputs(floats, count), self.reference):
            for k, s in enumerate(sums):
                s.add(got[k], ref[k], None)
                if s.nonfinite or s.noise > allowed[k]:
                    return -math.inf
        return min((-math.inf if s.nonfinite else decibels(s.signal, s.noise) for s in sums), default=math.inf)


def _cost(plan: analysis.Plan, var: relax.Var) -> tuple[int, int]:
    """(multiply-accumulates, bytes its weights grow by in float32 instead of int8 plus a scale per channel)."""
    layer = plan.compute.get(var)
    if layer is None:
        return 0, 0
    w = layer.weight.value.numpy()
    return layer.macs, 3 * w.size - 4 * w.shape[layer.weight_axis]


def _layers_matching(names: list[str], patterns: tuple[str, ...]) -> set[str]:
    chosen = set()
    for pattern in patterns:
        hit = {n for n in names if fnmatchcase(n, pattern)}
        if not hit:
            raise EdgecError(f"--keep-float {pattern!r} matches no quantizable layer (there are {len(names)}: "
                             f"{', '.join(names[:6])}{', ...' if len(names) > 6 else ''})",
                             "give a glob on the layer names: op and position in graph order, e.g. conv2d_0, "
                             "'matmul_*'")
        chosen |= hit
    return chosen


def _noise(db: float) -> float:
    """Output noise energy relative to the signal's at an SQNR of `db`."""
    return 10 ** (-db / 10)


def choose_floats(mod: tvm.IRModule, ranges: dict, data: Dataset, options: QuantizeOptions,
                  corrections: dict[str, np.ndarray] | None = None,
                  rounded: dict[str, np.ndarray] | None = None,
                  weight_max: int = qdq.WEIGHT_MAX) -> tuple[set[str], dict]:
    """(the layers to leave float, the record of why and at what cost) for --keep-float and the budget;
    `corrections`: bias-correct-int8's, `rounded`: gptq-weights-int8's, `weight_max` the weights' range, as the
    int8 layers get them."""
    plan = analysis.plan(mod["main"])
    names = list(plan.layers.values())
    var_of = {n: v for v, n in plan.layers.items()}
    forced = _layers_matching(names, options.keep_float)
    if forced and len(forced) == len(names):
        raise EdgecError("--keep-float matches every quantizable layer: nothing would be int8",
                         "build without --quantize, or narrow the patterns")
    floats, record = set(forced), {}
    alone: dict[str, float | None] = {n: None for n in names}
    if options.min_sqnr_db is not None:
        floats, alone, record = _search(mod, ranges, data, options, names, forced, corrections, rounded,
                                        weight_max)
    total_macs = sum(_cost(plan, v)[0] for v in plan.compute) or 1
    rows = []
    for name in sorted(floats, key=names.index):
        macs, grown = _cost(plan, var_of[name])
        rows.append({"layer": name, "why": "--keep-float" if name in forced else "budget",
                     "sqnr_alone_db": alone[name], "macs": macs, "mac_share": macs / total_macs,
                     "bytes_added": grown})
    record = {**record, "float_layers": rows, "latency_cost": LATENCY_BASIS, "quantizable_layers": len(names)}
    return floats, _finite(record)


def _search(mod, ranges, data, options: QuantizeOptions, names: list[str], forced: set[str], corrections, rounded,
            weight_max: int):
    """The budget search: (float layers, each layer's SQNR alone in int8, the record's budget part)."""
    budget, say = options.min_sqnr_db, current()
    switched = _Switched(mod, ranges, data, names, corrections, rounded, weight_max)
    everything = set(names)
    plain = switched.sqnr(set())
    start = switched.sqnr(forced) if forced else plain
    alone: dict[str, float | None] = {n: None for n in names}
    int8 = everything - forced
    best = start
    if start < budget:
        candidates = sorted(int8, key=names.index)
        for i, name in enumerate(candidates, start=1):
            say.detail(f"error budget: layer {i}/{len(candidates)} ({name}) alone in int8")
            alone[name] = switched.sqnr(everything - {name}, ALONE_SAMPLES)
        order = sorted(candidates, key=lambda n: -alone[n])      # least harmful first
        # the longest run of the least harmful layers that meets the budget, by bisection
        low, high, best = 0, len(order), math.inf
        while low < high:
            mid = (low + high + 1) // 2
            say.detail(f"error budget: the {mid} least harmful layers in int8 (target {budget:g} dB)")
            db = switched.sqnr(everything - set(order[:mid]), budget=budget)
            if db >= budget:
                low, best = mid, db
            else:
                high = mid - 1
        int8 = set(order[:low])
        # then each other layer, least harmful first, where its noise alone fits in what is left of the budget
        for name in order[low + 1:]:
            if _noise(alone[name]) > _noise(budget) - _noise(best):
                continue
            say.detail(f"error budget: {best:.1f} dB with {len(int8)} int8 layers, trying {name}")
            db = switched.sqnr(everything - int8 - {name}, budget=budget)
            if db >= budget:
                int8.add(name)
                best = db
        if not int8:
            raise EdgecError(f"the error budget of {budget:g} dB SQNR is not reachable with any layer in int8: int8 "
                             f"gives {plain:.1f} dB on {len(switched.inputs)} calibration samples, the least harmful "
                             f"layer alone in int8 {max(alone[n] for n in order):.1f} dB (on "
                             f"{min(ALONE_SAMPLES, len(switched.inputs))})",
                             "relax --min-sqnr / --max-error, try another --calibration-method, or build float")
    record = {"budget": {"min_sqnr_db": budget, **({"max_error": options.max_error} if options.max_error else {}),
                         "measured_on": f"{len(switched.inputs)} calibration samples (each layer alone: "
                                        f"{min(ALONE_SAMPLES, len(switched.inputs))}), the QDQ graph on TVM against "
                                        "the float model"},
              "sqnr_db": {"int8": plain, **({"keep_float": start} if forced else {}), "mixed": best}}
    return everything - int8, alone, record


def _finite(value):
    """JSON has no infinity: an SQNR of a search step that matched float exactly is written as None, one with all
    noise and no signal (or a NaN/infinity that differs) as "-inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if value > 0 else "-inf"
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
