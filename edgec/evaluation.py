"""`edgec eval`: a bundle and the reference runtime on every sample of a data set, side by side.

Per output: SQNR (dB) and max abs error of the bundle against the reference over the whole set, and where the
output looks like class scores ([B, C]), top-1 agreement and, on a labelled set, each one's top-1 accuracy; for
the model: bundle size against the model file's, and median latency. This is the table that says whether a
quantized bundle can ship; `build --quantize` prints it for its held-back calibration samples.

For the numbers, the bundle runs in this process (run.py's Model, as `edgec run` does for host bundles) beside
the reference runtime, on the same threads. Latency is timed apart, as `edgec bench` times it: each runtime in a
worker process of its own on the first sample, in alternated blocks. Timed in one process, the two runtimes'
thread pools slowed each other (the example MobileNetV2 int8 on 2 threads: 8.8 ms there, 3.7 ms alone).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dataset import Dataset, open_dataset
from .errors import EdgecError
from .reference import decibels

_BLOCK = 32   # samples per block: the bundle's outputs of one block are held for the comparison
_TIMING = {"runs": 5, "blocks": 3, "warmup": 2}   # per runtime: 15 timed runs after 2 untimed ones


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    shape: tuple[int, ...]
    dtype: str
    sqnr_db: float | None          # 10 log10(sum ref^2 / sum (out - ref)^2) over elements finite on both sides;
                                   # None when there is no error there (see exact) or the reference is all 0
    exact: bool                    # every element equal (or both NaN)
    max_abs_error: float           # over the elements finite on both sides
    nonfinite_mismatches: int      # elements where one side is NaN or infinite and the other differs
    class_scores: bool             # shaped [B, C] with C >= 2: top-1 applies
    top1_agreement: float | None   # fraction of rows whose argmax is the same on both sides
    top1_bundle: float | None      # accuracy against the labels (labelled sets only)
    top1_reference: float | None

    def to_json(self) -> dict:
        return {**vars(self), "shape": list(self.shape)}


@dataclass(frozen=True)
class Evaluation:
    bundle: Path
    data: Path
    samples: int
    labelled: bool
    reference: str                 # the reference runtime, e.g. "onnxruntime 1.31.1"
    reference_model: Path
    threads: int
    bundle_bytes: int              # every file of the bundle, manifest included
    shared_library_bytes: int      # of which the shared libraries it ships (lib/), the same for every model
    model_bytes: int               # the reference model file
    latency_ms: dict[str, float]   # {"bundle", "reference"}: median of the timed runs on the first sample, numpy
                                   # in to numpy out, each runtime in its own process
    outputs: tuple[OutputMetrics, ...]
    notes: tuple[str, ...]         # what the numbers do not cover, and why

    def to_json(self) -> dict:
        return {"bundle": str(self.bundle), "data": str(self.data), "samples": self.samples,
                "labelled": self.labelled, "threads": self.threads,
                "reference": {"runtime": self.reference, "model": str(self.reference_model)},
                "bytes": {"bundle": self.bundle_bytes, "shared_libraries": self.shared_library_bytes,
                          "model": self.model_bytes},
                "latency_ms": dict(self.latency_ms), "outputs": [o.to_json() for o in self.outputs],
                "notes": list(self.notes)}

    def text(self) -> str:
        def pct(x):
            return "-" if x is None else f"{100 * x:.2f}%"

        def sqnr(o):
            if o.sqnr_db is not None:
                return f"{o.sqnr_db:.1f} dB"
            if o.exact:
                return "inf (identical)"
            return "n/a (non-finite values differ)" if o.nonfinite_mismatches else "n/a (reference all 0)"

        head = [("", f"bundle {self.bundle.name}", f"{self.reference} ({self.reference_model.name})"),
                ("size", f"{(self.bundle_bytes - self.shared_library_bytes) / 1e6:.2f} MB"
                 + (f" + lib/ {self.shared_library_bytes / 1e6:.2f} MB" if self.shared_library_bytes else ""),
                 f"{self.model_bytes / 1e6:.2f} MB"),
                ("latency, median (own process)", f"{self.latency_ms['bundle']:.4g} ms",
                 f"{self.latency_ms['reference']:.4g} ms")]
        head += [(f"top-1 '{o.name}'", pct(o.top1_bundle), pct(o.top1_reference))
                 for o in self.outputs if o.top1_bundle is not None]
        rows = [("output", "shape", "SQNR", "max abs error", "top-1 agreement")]
        rows += [(o.name, "[" + ",".join(map(str, o.shape)) + "]", sqnr(o),
                  f"{o.max_abs_error:.3g}" + (f" ({o.nonfinite_mismatches} non-finite differ)"
                                              if o.nonfinite_mismatches else ""),
                  pct(o.top1_agreement)) for o in self.outputs]
        lines = [f"{self.samples} samples{' (labelled)' if self.labelled else ''} from {self.data}, "
                 f"{self.threads} threads", *_table(head), "", *_table(rows)]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


def _table(rows) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


@dataclass
class _Accumulator:
    """One output's running sums over the samples."""
    name: str
    classes: int | None            # C for a class-score output [B, C]
    signal: float = 0.0
    noise: float = 0.0
    max_abs: float = 0.0
    exact: bool = True
    nonfinite: int = 0
    rows: int = 0
    agree: int = 0
    correct: dict[str, int] = field(default_factory=lambda: {"bundle": 0, "reference": 0})

    def add(self, out: np.ndarray, ref: np.ndarray, label: np.ndarray | None):
        o, r = out.astype(np.float64), ref.astype(np.float64)
        same = (o == r) | (np.isnan(o) & np.isnan(r))
        finite = np.isfinite(o) & np.isfinite(r)
        self.exact = self.exact and bool(same.all())
        self.nonfinite += int((~same & ~finite).sum())
        d = (o - r)[finite]
        self.noise += float(np.dot(d, d))
        self.signal += float(np.dot(r[finite], r[finite]))
        if d.size:
            self.max_abs = max(self.max_abs, float(np.abs(d).max()))
        if self.classes is None:
            return
        top_o, top_r = out.argmax(axis=-1), ref.argmax(axis=-1)
        self.rows += top_o.size
        self.agree += int((top_o == top_r).sum())
        if label is not None:
            self.correct["bundle"] += int((top_o == label.reshape(top_o.shape)).sum())
            self.correct["reference"] += int((top_r == label.reshape(top_r.shape)).sum())

    def result(self, shape, dtype, labelled: bool) -> OutputMetrics:
        # no number when exact (infinite), when only non-finite elements differ, or when the reference is all 0
        sqnr = float(decibels(self.signal, self.noise))
        sqnr = sqnr if math.isfinite(sqnr) else None
        rate = (lambda n: n / self.rows) if self.classes else (lambda n: None)
        return OutputMetrics(self.name, tuple(shape), dtype, sqnr, self.exact, self.max_abs, self.nonfinite,
                             self.classes is not None, rate(self.agree),
                             rate(self.correct["bundle"]) if labelled else None,
                             rate(self.correct["reference"]) if labelled else None)


def _class_count(shape: tuple[int, ...], dtype: str) -> int | None:
    """C when an output is shaped like class scores, [B, C] with C >= 2, floating point or int8/uint8 (a full-integer
    model's quantized scores; int32/int64 [B, C] are rather indices), else None (also for a dimension known only
    at run time: None in the manifest)."""
    if (len(shape) == 2 and None not in shape and shape[1] >= 2
            and (np.issubdtype(np.dtype(dtype), np.floating) or dtype in ("int8", "uint8"))):
        return shape[1]
    return None


def _check_label(label: np.ndarray, index: int, name: str, shape: tuple[int, ...]):
    rows, classes = shape
    if label.size != rows:
        raise EdgecError(f"sample {index} has {label.size} label(s) and output '{name}' scores {rows} row(s)",
                         f"give {rows} label(s) per sample, one per row of the output")
    if label.min() < 0 or label.max() >= classes:
        raise EdgecError(f"sample {index} has label {int(label.min() if label.min() < 0 else label.max())} and "
                         f"output '{name}' scores {classes} classes", f"labels are class indices 0..{classes - 1}")


def _refuse_other_machine(manifest, bundle_dir: Path):
    from .runtime import IN_PROCESS, choose_runner
    from .toolchain import host_arch

    if manifest.arch != host_arch() or choose_runner(manifest.target) != IN_PROCESS:
        raise EdgecError(f"{bundle_dir} is built for {manifest.target.name} ({manifest.arch}) and edgec eval runs "
                         f"bundles for this machine ({host_arch()}) only",
                         "evaluate a --target host build of the same model, then check the board's bundle with "
                         "edgec run --compare")


def _latency(bundle_dir: Path, reference_model: Path, threads: int, inputs: dict[str, np.ndarray]
             ) -> dict[str, float]:
    """{"bundle", "reference"}: median ms of each runtime, in a worker process of its own, alternated blocks."""
    from .benchmark import WorkerSpec, latency, run_blocks

    specs = [WorkerSpec("edgec", bundle_dir, threads), WorkerSpec("reference", reference_model, threads)]
    timing = run_blocks(specs, inputs, **_TIMING)
    return {key: latency(name, pid, _TIMING["warmup"], timing.blocks, threads).median_ms
            for key, name, pid in zip(("bundle", "reference"), timing.names, timing.pids)}


def _input_quantization(data: Path, reference_model: Path) -> dict[str, tuple[float, int]] | None:
    """A full-integer TFLite model's input scales and zero points, which an image folder's pixels are quantized
    with (edgec.images); the bundle's manifest keeps only the integer dtype."""
    if not (data.is_dir() and reference_model.is_file() and reference_model.suffix.lower() == ".tflite"):
        return None
    from .frontends.tflite import input_quantization

    return input_quantization(reference_model)


def evaluate(bundle_dir: str | Path, data: str | Path | Dataset, reference_model: str | Path, *,
             threads: int | None = None, verify: bool = True, preprocess=None) -> Evaluation:
    """Run the bundle and the reference runtime on every sample of `data` (a DATA path, or a Dataset such as a
    held-back part of a calibration set) and measure how far apart they are. `preprocess`: for a DATA path that
    is an image folder (open_dataset); a Dataset was opened with its own."""
    from .manifest import MANIFEST_NAME, Manifest, sha256_file
    from .reference import ReferenceRuntime
    from .runtime import bundle_errors
    from .runtime.local import load_bundle

    if isinstance(data, Dataset) and preprocess is not None:   # not applied twice, nor dropped without a word
        raise EdgecError("evaluate got a Dataset and a preprocess: a Dataset is already opened, with the "
                         "preprocessing open_dataset was given", "pass preprocess to open_dataset, or pass evaluate "
                         "the DATA path instead of a Dataset")
    bundle_dir, reference_model = Path(bundle_dir), Path(reference_model)
    manifest = Manifest.load(bundle_dir)
    _refuse_other_machine(manifest, bundle_dir)
    dataset = data if isinstance(data, Dataset) else open_dataset(data, manifest.inputs, preprocess,
                                                                  _input_quantization(Path(data), reference_model))
    if not reference_model.is_file():
        raise EdgecError(f"reference model {reference_model} does not exist",
                         "pass the .onnx or .tflite file the bundle was built from")
    threads = threads or manifest.target.device.threads
    reference = ReferenceRuntime(reference_model, threads=threads)
    reference_name = reference.name
    bundle_inputs, bundle_outputs = [s.name for s in manifest.inputs], [s.name for s in manifest.outputs]
    if set(reference.input_names) != set(bundle_inputs) or not set(bundle_outputs) <= set(reference.output_names):
        raise EdgecError(f"{reference_model.name} takes {reference.input_names} and gives {reference.output_names}; "
                         f"the bundle takes {bundle_inputs} and gives {bundle_outputs}",
                         "pass the model the bundle was built from (a bundle built with --const-input cannot be "
                         "compared this way)")
    notes = [dataset.description] if dataset.description else []
    if sha256_file(reference_model) != manifest.model_sha256:
        notes.append(f"{reference_model.name} is not the file the bundle was built from (another sha256)")
    classes = {s.name: _class_count(s.shape, s.dtype) for s in manifest.outputs}
    for s in manifest.outputs:
        if classes[s.name] is None:
            notes.append(f"output '{s.name}' [{','.join(map(str, s.shape))}] does not look like class scores "
                         "([B, C]): no top-1")
    if dataset.labelled and not any(classes.values()):
        notes.append("the data has labels, but no output looks like class scores: labels not used")
    model = load_bundle(bundle_dir, threads, verify)
    acc = {s.name: _Accumulator(s.name, classes[s.name]) for s in manifest.outputs}
    first = None
    for block in dataset.batches(_BLOCK):
        first = block[0].inputs if first is None else first
        with bundle_errors():
            outs = [model.run(sample.inputs) for sample in block]
        for sample, out in zip(block, outs):
            ref = reference.run(sample.inputs)
            for s in manifest.outputs:
                if ref[s.name].shape != out[s.name].shape:
                    raise EdgecError(f"output '{s.name}' is {list(out[s.name].shape)} from the bundle and "
                                     f"{list(ref[s.name].shape)} from {reference.name}",
                                     "pass the model the bundle was built from")
                label = sample.label if dataset.labelled and classes[s.name] else None
                if label is not None:
                    _check_label(label, sample.index, s.name, s.shape)
                acc[s.name].add(out[s.name], ref[s.name], label)
    del model, reference       # onnxruntime's pool goes with its session: none left beside the timed workers
    size = sum(e.size for e in manifest.files.values()) + (bundle_dir / MANIFEST_NAME).stat().st_size
    return Evaluation(bundle_dir, dataset.source, len(dataset), dataset.labelled, reference_name, reference_model,
                      threads, size, manifest.shared_library_bytes, reference_model.stat().st_size,
                      _latency(bundle_dir, reference_model, threads, first),
                      tuple(acc[s.name].result(s.shape, s.dtype, dataset.labelled) for s in manifest.outputs),
                      tuple(notes))
