"""Reference runtimes (onnxruntime for .onnx, LiteRT for .tflite) that compiled models are verified against,
and the tolerance rule that decides whether two sets of outputs agree."""
from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np

from .errors import EdgecError, last_line

_HINT = "pip install 'edgec[verify]'"


class ReferenceUnavailable(EdgecError):
    """The reference runtime cannot give outputs for this model here: it is not installed, there is none for
    the format, it refuses the model (e.g. an IR version or opset it does not know), or it fails on the input.
    A build goes on and marks the bundle "not verified" with this reason."""


class ReferenceRuntime:
    """Runs a model in its framework's own runtime on CPU, with inputs and outputs keyed by name."""

    def __init__(self, model_path, threads: int | None = None, observe: tuple[str, ...] = ()):
        """`observe`: TFLite tensors inside the graph to return with the outputs, by name (a streaming model's
        variable writes, which LiteRT keeps to itself)."""
        self.path = Path(model_path)
        self.quantized_outputs: frozenset[str] = frozenset()   # outputs holding quantized values (one step: 1)
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            self._init_onnx(threads)
        elif suffix == ".tflite":
            self._init_tflite(threads, observe)
        else:
            raise ReferenceUnavailable(f"no reference runtime for '{self.path.name}'", "use a .onnx or .tflite model")

    def _source(self) -> str | bytes:
        """The path, or the file's bytes when the path is not valid UTF-8 (file names are bytes on Linux),
        which both runtimes refuse as a path."""
        try:
            str(self.path).encode("utf-8")
            return str(self.path)
        except UnicodeEncodeError:
            return self.path.read_bytes()

    def _refused(self, error: Exception) -> ReferenceUnavailable:
        return ReferenceUnavailable(f"{self.name} cannot load {self.path.name}: {last_line(error)}",
                                    "check that this runtime version supports the model (IR version, opsets)")

    def _init_onnx(self, threads):
        try:
            import onnxruntime as ort
        except ImportError:
            raise ReferenceUnavailable("onnxruntime is not installed", _HINT) from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self.name = f"onnxruntime {ort.__version__}"
        try:
            self._sess = ort.InferenceSession(self._source(), opts, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a model it refuses
            raise self._refused(e) from e
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self._run = lambda feeds: self._sess.run(self.output_names, feeds)

    def _init_tflite(self, threads, observe):
        import warnings

        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise ReferenceUnavailable("ai-edge-litert is not installed", _HINT) from None
        self.name = f"LiteRT {version('ai-edge-litert')}"
        source = self._source()
        try:
            with warnings.catch_warnings():   # preserving tensors is "for debugging": reading them is the point here
                warnings.simplefilter("ignore")
                self._interp = Interpreter(**{"model_content" if isinstance(source, bytes) else "model_path": source},
                                           num_threads=threads, experimental_preserve_all_tensors=bool(observe))
            self._interp.allocate_tensors()
        except Exception as e:  # LiteRT raises ValueError or RuntimeError for a model it refuses
            raise self._refused(e) from e
        # Detail order is the subgraph's input/output order, which is also the order of the parameters and
        # tuple fields of `main` made by tvm.relax.frontend.tflite.from_tflite.
        self._inputs = self._interp.get_input_details()
        tensors = {d["name"]: d for d in self._interp.get_tensor_details()}
        self._outputs = self._interp.get_output_details() + [tensors[name] for name in observe]
        self.quantized_outputs = frozenset(d["name"] for d in self._outputs if d["quantization"][0] != 0)
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]
        self._run = self._run_tflite

    def _run_tflite(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for d in self._inputs:
            self._interp.set_tensor(d["index"], feeds[d["name"]])
        self._interp.invoke()
        # get_tensor copies, so results survive the next invoke.
        return [self._interp.get_tensor(d["index"]) for d in self._outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run on inputs keyed by the model's exact input names; returns the outputs by name."""
        if set(inputs) != set(self.input_names):
            raise EdgecError(f"inputs {sorted(inputs)} do not match {self.path.name}'s inputs {self.input_names}",
                             "pass one array per model input, keyed by its name in the model")
        try:
            outputs = self._run(inputs)
        except Exception as e:  # e.g. an index input out of range for the model: the runtime's own error types
            raise ReferenceUnavailable(f"{self.name} failed on the input: {last_line(e)}",
                                       "give a valid input with --input") from e
        return {name: np.asarray(out) for name, out in zip(self.output_names, outputs)}

    def stream(self, steps: list[dict[str, np.ndarray]], states, constants: dict | None = None) -> list[dict]:
        """Outputs of each step of a stream, from the model's initial state. A state the model file takes as an input
        (ONNX) is fed its output of the step before (`states`: frontends.State); LiteRT keeps a TFLite model's
        variables itself across invokes (construct with observe= the state outputs to see them)."""
        fed = [s for s in states if s.input in self.input_names]
        values = {s.input: s.initial for s in fed}
        results = []
        for step in steps:
            out = self.run({**step, **values, **(constants or {})})
            values = {s.input: out[s.output] for s in fed}
            results.append(out)
        return results


@dataclass(frozen=True)
class Tolerance:
    """Outputs match when max |out - ref| <= atol + rtol * max |ref| (see compare_outputs)."""
    atol: float
    rtol: float

    def to_json(self) -> dict:
        return {"atol": self.atol, "rtol": self.rtol}


DEFAULT_TOLERANCE = Tolerance(atol=1e-5, rtol=1e-3)
# quantized integer outputs: within one quantization step
QUANTIZED_TOLERANCE = Tolerance(atol=1, rtol=0)


@dataclass(frozen=True)
class OutputComparison:
    name: str
    max_abs: float
    max_rel: float                 # max_abs / max |ref|
    ok: bool
    problem: str | None            # a missing output, a shape or dtype mismatch; None when the numbers compare


@dataclass(frozen=True)
class Comparison:
    against: str                   # what the outputs were compared with, e.g. "onnxruntime 1.23.2"
    tolerance: Tolerance
    outputs: dict[str, OutputComparison]   # every name on either side

    @property
    def ok(self) -> bool:
        return all(o.ok for o in self.outputs.values())

    def to_json(self) -> dict:
        return {"against": self.against, "ok": self.ok, **self.tolerance.to_json(),
                "outputs": {n: vars(o) for n, o in self.outputs.items()}}


def compare_outputs(outputs: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                    tol: Tolerance = DEFAULT_TOLERANCE, against: str = "the reference") -> Comparison:
    """Compare outputs with reference outputs by name, with the one tolerance rule every edgec check uses:
    the bundle's run.py `compare` (what `run.py --check` applies), so edgec and a deployed bundle agree."""
    from .runtime import bundle_runner

    report = bundle_runner().compare(outputs, reference, tol.atol, tol.rtol)
    return Comparison(against, tol, {name: OutputComparison(name, **r) for name, r in report.items()})
