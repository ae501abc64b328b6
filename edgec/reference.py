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

    def __init__(self, model_path, threads: int | None = None, states: tuple = (),
                 content: bytes | None = None, exact: bool = False):
        """`states`: a streaming model's states (frontends.State, or a manifest's): a TFLite model's variable writes,
        which LiteRT keeps to itself, are returned with the outputs, by the state's output name. `content`: an ONNX model to run instead of the file's
        (qdq_float_twin's). `exact`: onnxruntime without graph optimizations, so a QDQ model runs as its
        float (de)quantize math says rather than through fused QLinear kernels that round their own way."""
        self.path = Path(model_path)
        self._content, self._exact = content, exact
        self.quantized_outputs: frozenset[str] = frozenset()   # outputs holding quantized values (one step: 1)
        self.zero_points: dict[str, int] = {}                  # each one's zero point: its value 0
        suffix = self.path.suffix.lower()
        if suffix == ".onnx":
            self._init_onnx(threads)
        elif suffix == ".tflite":
            self._init_tflite(threads, tuple(s.output for s in states))
        else:
            raise ReferenceUnavailable(f"no reference runtime for '{self.path.name}'", "use a .onnx or .tflite model")

    def _source(self) -> str | bytes:
        """The path, or the file's bytes when the path is not valid UTF-8 (file names are bytes on Linux),
        which both runtimes refuse as a path."""
        if self._content is not None:
            return self._content
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
        if self._exact:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        self.name = f"onnxruntime {ort.__version__}" + (" (graph optimizations off)" if self._exact else "")
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
        self.zero_points = {d["name"]: int(d["quantization"][1]) for d in self._outputs if d["quantization"][0] != 0}
        self.quantized_outputs = frozenset(self.zero_points)
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
        variables itself across invokes (construct with states= to see them)."""
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


def qdq_model(path: Path):
    """The ONNX model at `path` in QDQ form, the form the quantized rule reads (`qdq_float_twin`, `qdq_nudged`), and
    whether it was rewritten to it: a QOperator model's QLinear nodes as DequantizeLinear -> float operator ->
    QuantizeLinear (frontends.onnx_quant.qdq_form, the operators as edgec imports them), any other model as it is.
    Its weights are read but not its external data: None where it has external weights (the rewrites here are run
    from bytes, where they cannot be found) or a QOperator node that form cannot state."""
    import onnx

    from .frontends.onnx_quant import has_qlinear_nodes, qdq_form

    with open(path, "rb") as f:    # any file name, as _source
        model = onnx.load(f, load_external_data=False)
    if any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer):
        return None
    rewritten = has_qlinear_nodes(model.graph)
    if rewritten and qdq_form(model) is None:
        return None
    _unsigned_integer_weights(model.graph)
    return model, rewritten


def _unsigned_integer_weights(graph) -> None:
    """Each MatMulInteger / ConvInteger with constant int8 weights takes them as uint8 (w + 128, zero point + 128):
    the same integers, which the reference must sum exactly as the ONNX spec says. onnxruntime's u8 x s8 kernels on
    x86 without VNNI add pairs of products in int16 (vpmaddubsw) and saturate; its u8 x u8 kernels widen first.
    Unchanged where onnxruntime's own numbers are exact; a dynamically quantized model (quantize_dynamic's int8
    weights) would otherwise be refused for being closer to its float twin than onnxruntime is. Changes `graph`."""
    from onnx import TensorProto, numpy_helper

    constants = {i.name: i for i in graph.initializer}
    # inputs known to be uint8 (u8 x u8 is the pair onnxruntime's integer kernels all take)
    unsigned = ({n.output[0] for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
                | {i.name for i in graph.input if i.type.tensor_type.elem_type == TensorProto.UINT8}
                | {i.name for i in graph.initializer if i.data_type == TensorProto.UINT8})
    for k, node in enumerate(graph.node):
        if node.op_type not in ("MatMulInteger", "ConvInteger") or len(node.input) < 2 or node.input[0] not in unsigned:
            continue
        weights = constants.get(node.input[1])
        if weights is None or weights.data_type != TensorProto.INT8:
            continue
        zero = (constants.get(node.input[3]) if len(node.input) > 3 and node.input[3]
                else numpy_helper.from_array(np.zeros((), np.int8)))
        if zero is None:    # a zero point computed at run time: left as the model has it
            continue
        for index, tensor in ((1, weights), (3, zero)):
            name = f"edgec_u8_{k}_{index}"    # new names: another node may share the int8 constant
            value = numpy_helper.to_array(tensor).astype(np.int16) + 128
            graph.initializer.append(numpy_helper.from_array(value.astype(np.uint8), name))
            node.input.extend([""] * (index + 1 - len(node.input)))
            node.input[index] = name


def qdq_forms(path: Path) -> tuple:
    """What the quantized rule reads of the ONNX model at `path`: its QDQ form (qdq_model; None where it has none),
    whether that was rewritten, and its float twin (qdq_float_twin; None for a float model). A rewrite that fails
    (a model it does not foresee: a bug in edgec) leaves the model unverifiable, in one line, not a traceback."""
    try:
        qdq, rewritten = qdq_model(path) or (None, False)
        return qdq, rewritten, None if qdq is None else qdq_float_twin(qdq)
    except Exception as e:  # any failure of the rewrites: onnx's and numpy's errors alike
        raise ReferenceUnavailable(f"cannot write {path.name} in the QDQ form its verification reads: "
                                   f"{last_line(e)}", "this is a bug in edgec: report it with the model") from e


def qdq_float_twin(model) -> bytes | None:
    """An ONNX QDQ model (an onnx.ModelProto, as qdq_model gives it) whose activations are not rounded: each
    QuantizeLinear -> DequantizeLinear pair becomes a
    Clip to the range the pair can represent, [(qmin - zero point) * scale, (qmax - zero point) * scale] (the
    saturation stays: quantizers drop a ReLU/Clip that the range already applies). Its distance from the QDQ model
    is the activations' rounding error alone, the error a rounding flip is part of; a dynamically quantized model's
    DynamicQuantizeLinear codes are left unrounded alike (_unround_dynamic). None when the model has neither (a float
    model), or one without constant per-tensor parameters."""
    from onnx import ModelProto, helper, numpy_helper

    model = ModelProto.FromString(model.SerializeToString())    # a copy: the caller's model stays the QDQ one
    graph = model.graph
    constants = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    quantizers = {n.output[0]: n for n in graph.node if n.op_type == "QuantizeLinear"}
    pairs = [n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in quantizers]
    for k, node in enumerate(pairs):
        q = quantizers[node.input[0]]
        scale = constants.get(q.input[1])
        zero = constants.get(q.input[2]) if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 or zero.dtype.kind not in "iu":
            return None
        info = np.iinfo(zero.dtype)
        bounds = [(float(v) - float(zero.item())) * float(scale.item()) for v in (info.min, info.max)]
        names = [f"edgec_twin_{k}_{side}" for side in ("lo", "hi")]
        graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), n) for v, n in zip(bounds, names))
        clip = helper.make_node("Clip", [q.input[0], *names], [node.output[0]])
        node.CopyFrom(clip)
    dynamic = _unround_dynamic(graph, constants)
    return None if dynamic is None or not (pairs or dynamic) else model.SerializeToString()


def _unround_dynamic(graph, constants: dict) -> bool | None:
    """A dynamically quantized graph (quantize_dynamic) with each DynamicQuantizeLinear's code not rounded: x / scale
    + zero point clipped to [0, 255] in float, less the zero point, which the ConvInteger / MatMulInteger nodes
    reading it take as Conv / MatMul with the weights centred here (constants). Changes `graph`; whether it had such
    a node, or None when one cannot be unrounded (its code read otherwise, weights that are not constants)."""
    from onnx import TensorProto, helper, numpy_helper

    quantizers = {n.output[0]: n for n in graph.node if n.op_type == "DynamicQuantizeLinear"}
    readers = [n for n in graph.node if any(i in quantizers for i in n.input)]
    if not quantizers:
        return False
    if any(n.op_type not in ("ConvInteger", "MatMulInteger") or n.input[0] not in quantizers or len(n.input) < 3
           or n.input[2] != quantizers[n.input[0]].output[2] or n.input[1] not in constants for n in readers):
        return None
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.float32), f"edgec_twin_u8_{v}") for v in (0, 255))
    nodes = []
    for k, node in enumerate(graph.node):
        name = f"edgec_twin_dynamic_{k}"
        if node.op_type == "DynamicQuantizeLinear":
            x, (code, scale, zero) = node.input[0], node.output
            nodes += [node, helper.make_node("Cast", [zero], [f"{name}_zero"], to=TensorProto.FLOAT),
                      helper.make_node("Div", [x, scale], [f"{name}_scaled"]),
                      helper.make_node("Add", [f"{name}_scaled", f"{name}_zero"], [f"{name}_shifted"]),
                      helper.make_node("Clip", [f"{name}_shifted", "edgec_twin_u8_0", "edgec_twin_u8_255"],
                                       [f"{name}_code"]),
                      helper.make_node("Sub", [f"{name}_code", f"{name}_zero"], [f"{code}_edgec_centred"])]
        elif node in readers:
            w = constants[node.input[1]].astype(np.float32)
            if len(node.input) > 3 and node.input[3]:
                if node.input[3] not in constants:
                    return None
                zero = constants[node.input[3]].astype(np.float32)       # per output channel or per tensor
                w = w - (zero.reshape((-1,) + (1,) * (w.ndim - 1)) if node.op_type == "ConvInteger" else zero)
            graph.initializer.append(numpy_helper.from_array(w, f"{name}_weight"))
            nodes.append(helper.make_node("Conv" if node.op_type == "ConvInteger" else "MatMul",
                                          [f"{node.input[0]}_edgec_centred", f"{name}_weight"], list(node.output),
                                          **{a.name: helper.get_attribute_value(a) for a in node.attribute}))
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return True


def qdq_nudged(model, factor: float) -> bytes:
    """The ONNX QDQ model with every computed tensor multiplied by `factor` (1 + a few float32 ulps) where it is
    quantized: another correct float32 requantization, as an integer kernel's (sum times the combined scale) or
    another summation order gives, which rounds values within that distance of a half step the other way. Its
    distance from the model is how far the model's own rounding flips move its outputs (QuantizedRule.nudges).
    `model`: as for qdq_float_twin (not changed)."""
    from onnx import ModelProto, helper, numpy_helper

    model = ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    constants = {i.name for i in graph.initializer}
    graph.initializer.append(numpy_helper.from_array(np.array(factor, np.float32), "edgec_nudge"))
    nodes = []
    for k, node in enumerate(graph.node):
        if node.op_type == "QuantizeLinear" and node.input[0] not in constants:
            nodes.append(helper.make_node("Mul", [node.input[0], "edgec_nudge"], [f"edgec_nudged_{k}"]))
            node.input[0] = f"edgec_nudged_{k}"
        elif node.op_type == "DynamicQuantizeLinear":    # its code from the nudged x, with its own scale, zero point
            code, scale, zero = node.output
            nodes += [helper.make_node("Mul", [node.input[0], "edgec_nudge"], [f"edgec_nudged_{k}"]),
                      helper.make_node("QuantizeLinear", [f"edgec_nudged_{k}", scale, zero], [code])]
            node.output[0] = f"edgec_unnudged_{k}"
        nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    return model.SerializeToString()


@dataclass(frozen=True)
class QuantizedRule:
    """How a quantized bundle is compared with its quantized reference (docs/architecture.md, "Verifying
    quantized bundles"). Rounding a value that lies on a quantization boundary may go either way between two
    correct compilations (FMA contraction, another summation order), and the whole step it moves is amplified by
    the layers after it (an untrained MobileNetV2: a few flips move its logits by 5 output steps), so no
    elementwise bound separates a correct int8 bundle from a wrong one. What the rule measures against is the
    rounding's own error on the same input: the reference against the same graph with its activations not
    rounded (`floats`: saturation kept, see qdq_float_twin). A bundle that computes the quantized graph is closer
    to it than that graph is to its unrounded self; a wrong zero point, scale, weight, bias or requantization near
    the input or the output errs on whole channels or tensors, at or beyond it. Accepted when, per output, the
    bundle's error energy is at least `margin_db` below the rounding's (sum (out - ref)^2 <= sum (ref - float)^2
    / 10^(margin_db / 10)) and at most `max_fraction` of the elements are off by more than the rounding's rms
    error. Measured (docs/architecture.md): correct bundles 5.5 dB / 2.9% (untrained MobileNetV2) and
    19 dB / 0.28% (PP-OCRv4 det); a single fault deep inside the untrained MobileNetV2 can stay below both, as
    small at the output as the flips are. On a network that amplifies one flip through its depth (an untrained
    one), the reference itself lands beyond `max_fraction` when its requantization is nudged by a few ulps:
    where a bundle is beyond it, the element bound becomes the worst such nudged reference's (`nudges`)."""
    margin_db: float = 0.0
    max_fraction: float = 0.05
    name: str = "quantized"
    # relative nudges of the reference's requantization (each quantized tensor times 1 + nudge before rounding, in
    # qdq_nudged or quantize.reference.nudged): correct float32 requantizations differ by an ulp or two, these by 4
    # and 16. A bundle beyond `max_fraction` is held to the largest fraction off that a nudged reference measures
    # instead (the energy bound too, below, where `nudged_energy`); a network that does not amplify flips keeps
    # `max_fraction`.
    nudges: tuple[float, ...] = ()
    # The energy bound too then becomes the lowest margin a nudged reference measures, where below `margin_db`. Not
    # where the nudged graphs are edgec's own import and the reference another runtime's (INTEGER_RULE: LiteRT),
    # as a fault in that import would move the nudged references with the bundle.
    nudged_energy: bool = True
    # the energy margin again per channel (the last axis) of an output with at least `channel_size` elements in each
    # channel: a fault in one channel (its weight scale, bias, weights) is 1/C of the output's energy and elements,
    # below both bounds above, while flips spread over all channels. None: not checked.
    channel_margin_db: float | None = None
    channel_size: int = 1024
    # an output within this many steps of the reference everywhere passes as it is (the integer rule's one step,
    # which holds for a shallow model: its small outputs, e.g. 10 scores, are too few for the statistics above)
    within: float | None = None

    def to_json(self) -> dict:
        extra = ({} if self.channel_margin_db is None else
                 {"channel_margin_db": self.channel_margin_db, "channel_size": self.channel_size})
        extra.update({} if self.within is None else {"within": self.within})
        extra.update({"nudges": list(self.nudges), "nudged_energy": self.nudged_energy} if self.nudges else {})
        return {"name": self.name, "margin_db": self.margin_db, "max_fraction": self.max_fraction, **extra}


QUANTIZED_RULE = QuantizedRule(nudges=(2.0 ** -22, -2.0 ** -22, 2.0 ** -20, -2.0 ** -20))
# fp16 builds (edgec/passes/precision.py): `floats` is the reference runtime's float32 answer, the reference the fp16
# graph on TVM. Energy only: a bundle within the fp16 graph's own rounding error of it is within twice that error of
# float32 in rms (triangle inequality), its SQNR at most 6.02 dB below the graph's. No element count: fp16's last
# rounding moves an output by one ulp where two correct compilations' fp32 sums straddle a boundary (4.4% of an
# untrained MobileNetV2's logits), while a fault must stay below fp16 rounding's energy (~50 dB under the signal).
PRECISION_RULE = QuantizedRule(max_fraction=1.0, name="precision")

# full-integer models (a pre-quantized TFLite model) whose bundle is more than one step off the reference runtime:
# `floats` are the model's unrounded twin (unrounded_integers) on TVM. See docs/architecture.md for the margin.
INTEGER_RULE = QuantizedRule(margin_db=6.0, name="integer", channel_margin_db=3.0, within=1,
                             nudges=QUANTIZED_RULE.nudges, nudged_energy=False)


def decibels(signal: float, noise: float) -> float:
    """10 log10(signal / noise); +inf for no noise (JSON-safe callers round it to None)."""
    if noise == 0:
        return float("inf")
    return 10 * np.log10(signal / noise) if signal > 0 else float("-inf")


def compare_quantized(outputs: list[dict[str, np.ndarray]], reference: list[dict[str, np.ndarray]],
                      floats: list[dict[str, np.ndarray]], rule: QuantizedRule = QUANTIZED_RULE,
                      zero_points: dict[str, int] | None = None,
                      nudged: list[list[dict[str, np.ndarray]]] | None = None) -> dict[str, dict]:
    """The quantized rule over every step's outputs, by name: for each reference output, what was measured —
    "sqnr_db" (bundle vs reference), "quantization_sqnr_db" (reference vs float model), "margin_db" (the
    bundle's error energy below the quantization's), "fraction_off" (elements off by more than the quantization's
    rms error), "max_abs", "max_rel", "max_quantization_rms" (the worst element in units of that rms error) —
    with "ok" and "problem" (a missing output, a size mismatch, values that are not finite). Where the reference
    equals the float model (no quantization error) only an identical output passes. `zero_points`: integer
    outputs' (by name), subtracted first so that the SQNRs measure values, not their codes. `nudged`: the
    reference's outputs with its requantization nudged (a list of steps per rule.nudges); the largest fraction of
    elements one is off by more than the rms ("nudged_fraction_off") is the element bound where it exceeds
    rule.max_fraction, and the smallest margin one measures ("nudged_margin_db") the energy bound where it is below
    rule.margin_db: a bundle is never held closer to the reference than the reference's own nudges land (an output
    of a few elements, e.g. a detector's one score, that flips amplify beyond its rounding error)."""
    report = {}
    for name in reference[0]:
        missing = next((k for k, o in enumerate(outputs) if name not in o), None)
        if missing is not None:
            report[name] = {"ok": False, "problem": "missing from the outputs"}
            continue
        zero = (zero_points or {}).get(name, 0)

        def values(side):
            return np.concatenate([np.asarray(o[name], np.float64).ravel() for o in side]) - zero

        out, ref, flt = (values(side) for side in (outputs, reference, floats))
        if out.shape != ref.shape or flt.shape != ref.shape:
            report[name] = {"ok": False, "problem": f"{out.size} values, the reference has {ref.size}"}
            continue
        error, quantization = ((out - ref) ** 2).sum(), ((ref - flt) ** 2).sum()
        rms = np.sqrt(quantization / ref.size)
        diff = np.abs(out - ref)
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        r = {"sqnr_db": decibels((ref ** 2).sum(), error), "quantization_sqnr_db": decibels((flt ** 2).sum(), quantization),
             "margin_db": decibels(quantization, error), "fraction_off": float((diff > rms).mean()),
             "max_abs": float(diff.max()), "max_rel": float(diff.max()) / scale if scale > 0 else 0.0,
             "max_quantization_rms": float(diff.max() / rms) if rms > 0 else None, "problem": None}
        if not (np.isfinite(out).all() and np.isfinite(ref).all() and np.isfinite(flt).all()):
            r["problem"] = "values that are not finite"     # no energy to compare: refused
        max_fraction, margin_db = rule.max_fraction, rule.margin_db
        if nudged:
            moved = [values(side) - ref for side in nudged]
            r["nudged_fraction_off"] = max(float((np.abs(m) > rms).mean()) for m in moved)
            max_fraction = max(max_fraction, r["nudged_fraction_off"])
            if rule.nudged_energy and quantization > 0:     # else only an identical output passes, as without nudges
                r["nudged_margin_db"] = min(decibels(quantization, (m ** 2).sum()) for m in moved)
                margin_db = min(margin_db, r["nudged_margin_db"])
        ok = r["margin_db"] >= margin_db and r["fraction_off"] <= max_fraction
        channels = np.shape(reference[0][name])[-1] if np.ndim(reference[0][name]) else 1
        if rule.channel_margin_db is not None and ref.size >= rule.channel_size * channels:
            per_channel = [decibels(q, e) for q, e in zip(((ref - flt) ** 2).reshape(-1, channels).sum(0),
                                                        ((out - ref) ** 2).reshape(-1, channels).sum(0))]
            r["worst_channel_margin_db"] = min(per_channel)
            ok = ok and r["worst_channel_margin_db"] >= rule.channel_margin_db
        r["ok"] = r["problem"] is None and (ok or (rule.within is not None and r["max_abs"] <= rule.within))
        report[name] = r
    return report


def unrounded_integers(mod, states: tuple = ()):
    """A pre-quantized model's Relax graph (a full-integer TFLite model's, as imported) computed without rounding:
    each per-tensor quantize(x, s, z) becomes clip(x / s + z, qmin, qmax) in float32 and each dequantize of such a
    value (y - z) * s, so every integer tensor — the outputs included — holds the value it rounds, in its own units.
    Saturation stays, as in qdq_float_twin; a quantize with per-channel or non-constant parameters is kept (its
    rounding then counts as part of the model: a stricter rule). Its distance from the reference runtime's integer
    outputs is the model's own rounding error, which QuantizedRule measures a bundle against. A streaming model's
    state inputs (`states`: frontends.State) take float32 here: the twin is fed its own unrounded state, so that
    over a stream it leaves every rounding out, those carried from step to step included."""
    import tvm
    from tvm import relax

    from .frontends.tflite_convert import _constant as constant

    @relax.expr_functor.mutator
    class Unround(relax.PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            name = call.op.name if isinstance(call.op, tvm.ir.Op) else None
            if name not in ("relax.quantize", "relax.dequantize"):
                return call
            data, scale, zero = call.args[0], constant(call.args[1]), constant(call.args[2])
            if scale is None or zero is None or scale.size != 1 or zero.size != 1:
                return call
            s, z = float(scale.item()), float(zero.item())
            if name == "relax.dequantize":     # of an unrounded value: float; of an int8 weight or input: unchanged
                return call if str(data.ty.dtype) != "float32" else (
                    relax.op.multiply(relax.op.subtract(data, relax.const(z, "float32")), relax.const(s, "float32")))
            info = np.iinfo(str(call.attrs.out_dtype))
            shifted = relax.op.add(relax.op.divide(data, relax.const(s, "float32")), relax.const(z, "float32"))
            return relax.op.clip(shifted, float(info.min), float(info.max))

    main, unround = mod["main"], Unround(mod)
    fed = {s.input for s in states}
    params = [relax.Var(p.name, relax.TensorType(p.ty.shape, "float32")) if p.name in fed else p for p in main.params]
    for old, new in zip(main.params, params):
        if new is not old:
            unround.set_var_remap(old, new)
    body = unround.visit_expr(main.body)
    out = tvm.IRModule(dict(mod.functions))
    out["main"] = relax.Function(params, body, is_pure=main.is_pure, attrs=main.attrs)
    return relax.transform.DeadCodeElimination(["main"])(out)
