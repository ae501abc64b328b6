"""Reference runtimes (onnxruntime for .onnx, LiteRT for .tflite) that compiled models are verified against."""
from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import numpy as np

from .errors import EdgecError

_HINT = "pip install 'edgec[verify]'"


class ReferenceRuntime:
    """Runs a model in its framework's own runtime on CPU; `run` returns outputs in the model's output order."""

    def __init__(self, model_path, threads: int | None = None):
        self.path = Path(model_path)
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            self._init_onnx(threads)
        elif suffix == ".tflite":
            self._init_tflite(threads)
        else:
            raise EdgecError(f"no reference runtime for '{self.path.name}'", "use a .onnx or .tflite model")

    def _init_onnx(self, threads):
        try:
            import onnxruntime as ort
        except ImportError:
            raise EdgecError("onnxruntime is not installed", _HINT) from None
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        self._sess = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        self.name = f"onnxruntime {ort.__version__}"
        self.input_names = [i.name for i in self._sess.get_inputs()]
        self.output_names = [o.name for o in self._sess.get_outputs()]
        self._run = lambda feeds: self._sess.run(self.output_names, feeds)

    def _init_tflite(self, threads):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:
            raise EdgecError("ai-edge-litert is not installed", _HINT) from None
        self._interp = Interpreter(model_path=str(self.path), num_threads=threads)
        self._interp.allocate_tensors()
        self.name = f"LiteRT {version('ai-edge-litert')}"
        # Detail order is the subgraph's input/output order, which is also the order of the parameters and
        # tuple fields of `main` made by tvm.relax.frontend.tflite.from_tflite.
        self._inputs = self._interp.get_input_details()
        self._outputs = self._interp.get_output_details()
        self.input_names = [d["name"] for d in self._inputs]
        self.output_names = [d["name"] for d in self._outputs]
        self._run = self._run_tflite

    def _run_tflite(self, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        for d in self._inputs:
            self._interp.set_tensor(d["index"], feeds[d["name"]])
        self._interp.invoke()
        # get_tensor copies, so results survive the next invoke.
        return [self._interp.get_tensor(d["index"]) for d in self._outputs]

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        """Run on named inputs. Names the runtime does not know are matched by position instead, because a
        compiled model's input names may differ from the runtime's (e.g. TFLite's "serving_default_x:0")."""
        if set(inputs) != set(self.input_names):
            if len(inputs) != len(self.input_names):
                raise EdgecError(f"got {len(inputs)} inputs {list(inputs)}, the model takes {self.input_names}",
                                 "pass one array per model input")
            inputs = dict(zip(self.input_names, inputs.values()))
        return [np.asarray(o) for o in self._run(inputs)]


def compare(outputs: list[np.ndarray], refs: list[np.ndarray]) -> list[dict]:
    """Per output: max absolute error, max error relative to max |ref|, and whether the shapes agree."""
    if len(outputs) != len(refs):
        raise EdgecError(f"the model gave {len(outputs)} outputs, the reference {len(refs)}")
    stats = []
    for out, ref in zip(outputs, refs):
        out, ref = np.asarray(out), np.asarray(ref)
        s = {"shape": list(out.shape), "ref_shape": list(ref.shape), "shape_ok": out.shape == ref.shape}
        if s["shape_ok"]:
            diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
            scale = float(np.abs(ref).max()) if ref.size else 0.0
            s["max_abs"] = float(diff.max()) if diff.size else 0.0
            s["ref_absmax"] = scale
            s["max_rel"] = s["max_abs"] / scale if scale > 0 else (0.0 if s["max_abs"] == 0 else float("inf"))
        stats.append(s)
    return stats


def within_tolerance(stats: list[dict], atol: float, rtol: float) -> bool:
    """True when every output has the right shape and max_abs <= atol + rtol * max |ref| (allclose with the
    relative part taken against the output's range, since elementwise rtol is meaningless near zero)."""
    return all(s["shape_ok"] and s["max_abs"] <= atol + rtol * s["ref_absmax"] for s in stats)
