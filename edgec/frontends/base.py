"""The frontend boundary types and the helpers all frontends share."""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from ..errors import EdgecError
from ..signature import TensorSpec


@dataclass(frozen=True, eq=False)
class State:
    """What a streaming model carries from one call to the next: its value enters as the input `input` and the
    call's new value leaves as the output `output` (same shape and dtype), starting from `initial`."""
    name: str                        # the TFLite variable's shared name; for ONNX, the input's name
    input: str
    output: str
    initial: "np.ndarray"

    def to_json(self) -> dict:
        return {"name": self.name, "input": self.input, "output": self.output}


@dataclass(frozen=True)
class ImportedModel:
    """A model in Relax. Weights are bound as constants; the pass pipeline lifts them out again."""
    name: str
    path: Path
    format: str                      # "onnx" | "tflite"
    mod: tvm.IRModule
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    import_seconds: float
    import_records: tuple = ()       # PassRecords of the frontend's "import" steps
    # graph inputs folded to constants (--const-input): not in `inputs`; the reference runtime still takes them
    constants: dict = field(default_factory=dict)
    # streaming state: input/output pairs fed back between calls (TFLite variables, ONNX --state or detected)
    states: tuple[State, ...] = ()

    def stream_inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs a caller gives each step of a stream (the state inputs are fed back)."""
        fed = {s.input for s in self.states}
        return tuple(s for s in self.inputs if s.name not in fed)


@dataclass(frozen=True)
class ModelInfo:
    """What `edgec inspect` reports, computed from the model file alone."""
    path: Path
    format: str
    inputs: tuple[TensorSpec | tuple, ...]   # dims that are dynamic are kept as strings ("?", "batch")
    outputs: tuple[TensorSpec | tuple, ...]
    op_histogram: dict[str, int]
    param_count: int
    param_bytes: int
    macs: int | None                 # None when shapes are dynamic and MACs cannot be counted
    unsupported_ops: dict[str, int] = field(default_factory=dict)


# TVM indexes tensors with int32 unless told otherwise; a pin beyond that is a typo, refused before anything
# is allocated for it.
MAX_INPUT_ELEMENTS = 2**31 - 1


def parse_input_shapes(specs: tuple[str, ...] | list[str]) -> dict[str, tuple[int, ...]]:
    """Parse repeated `--input-shape name:1x3x224x224` options."""
    shapes = {}
    for spec in specs:
        name, sep, dims = spec.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shape = tuple(int(d) for d in dims.lower().split("x"))
            if any(d <= 0 for d in shape):
                raise ValueError
        except ValueError:
            raise EdgecError(f"cannot parse --input-shape '{spec}'",
                             "write it as NAME:DIMS with positive dims, e.g. input:1x3x224x224") from None
        elements = math.prod(shape)
        if elements > MAX_INPUT_ELEMENTS:
            raise EdgecError(f"--input-shape '{spec}' asks for {elements:.3g} elements per input "
                             f"({elements * 4 / 2**30:.3g} GiB as float32); edgec builds inputs of up to 2^31-1 "
                             "elements", "check the dims")
        if shapes.get(name, shape) != shape:
            raise EdgecError(f"--input-shape pins '{name}' twice, as {'x'.join(map(str, shapes[name]))} and "
                             f"{'x'.join(map(str, shape))}", "pass one --input-shape per input")
        shapes[name] = shape
    return shapes


def parse_const_inputs(specs: tuple[str, ...] | list[str]) -> dict:
    """Parse repeated `--const-input NAME=FILE.npy` options into arrays by name (read as the runners read inputs).
    Whether each fits the model is the frontend's check."""
    from ..runtime import bundle_errors

    arrays = {}
    for spec in specs:
        name, sep, file = spec.partition("=")
        if not (sep and name and file):
            raise EdgecError(f"cannot parse --const-input '{spec}'", "write it as NAME=FILE.npy")
        if name in arrays:
            raise EdgecError(f"--const-input gives '{name}' twice", "pass one --const-input per input")
        with bundle_errors() as runner:
            arrays[name] = runner.load_npy(file, f"--const-input file {file}")
    return arrays


def parse_state_pairs(specs: tuple[str, ...] | list[str]) -> dict[str, str] | None:
    """Parse repeated `--state OUT=IN` options into {input: output}; `--state none` turns detection off ({}),
    no option leaves it on (None)."""
    if list(specs) == ["none"]:
        return {}
    if not specs:
        return None
    pairs = {}
    for spec in specs:
        output, sep, name = spec.partition("=")
        if not (sep and output and name) or spec == "none":
            raise EdgecError(f"cannot parse --state '{spec}'",
                             "write it as OUTPUT=INPUT (the output fed back into the input), or --state none alone")
        if name in pairs or output in pairs.values():
            raise EdgecError(f"--state names '{name if name in pairs else output}' twice", "pass one --state per pair")
        pairs[name] = output
    return pairs


def resolve_states(path: Path, inputs, outputs, pairs: dict[str, str] | None, found: tuple = ()) -> tuple:
    """The model's states: `found` by the frontend (TFLite variables), else the user's `pairs` ({input: output}),
    else pairs detected by name (an output named as an input plus a suffix, of its shape and dtype, when exactly
    one output fits and no other input claims it). Initial values: zeros."""
    import numpy as np

    ins, outs = {s.name: s for s in inputs}, {s.name: s for s in outputs}
    if found:
        if pairs:
            raise EdgecError(f"--state is for ONNX models; {path.name} keeps its state in variables, which edgec "
                             "pairs by itself", "drop --state")
        return found
    if pairs is None:
        candidates = {i: [o for o in outs if o != i and o.startswith(i) and
                          (outs[o].shape, outs[o].dtype) == (ins[i].shape, ins[i].dtype)] for i in ins}
        pairs = {i: fits[0] for i, fits in candidates.items() if len(fits) == 1}
        claimed = list(pairs.values())
        pairs = {i: o for i, o in pairs.items() if claimed.count(o) == 1}
    states = []
    for name, output in pairs.items():
        if name not in ins or output not in outs:
            what, known, side = (f"input '{name}'", ins, "inputs") if name not in ins else (f"output '{output}'", outs,
                                                                                           "outputs")
            raise EdgecError(f"--state {output}={name}: {path.name} has no {what}", f"its {side} are: {', '.join(known)}")
        a, b = ins[name], outs[output]
        if (a.shape, a.dtype) != (b.shape, b.dtype):
            raise EdgecError(f"--state {output}={name}: the output is {b.dtype}{list(b.shape)} and the input "
                             f"{a.dtype}{list(a.shape)}", "pair an output with the input of its shape and dtype")
        states.append(State(name, name, output, np.zeros(a.shape, a.dtype)))
    return tuple(states)


def unsupported_error(path: Path, missing: dict[str, int], fmt: str) -> EdgecError:
    ops = ", ".join(f"{op} (x{n})" for op, n in sorted(missing.items(), key=lambda kv: (-kv[1], kv[0])))
    return EdgecError(f"{path.name} uses {fmt} operators edgec cannot import: {ops}",
                      "replace them in the model or export it with other operators; 'edgec inspect' lists them")


def check_pins(path: Path, input_shapes: dict, known: list[str]) -> None:
    unknown = sorted(set(input_shapes) - set(known))
    if unknown:
        raise EdgecError(f"--input-shape names {', '.join(unknown)}, which {path.name} has no input called",
                         f"its inputs are: {', '.join(known)}")


def relax_outputs(mod: tvm.IRModule, names: list[str]) -> tuple[TensorSpec, ...]:
    """Output signature: the model's output names with shapes and dtypes from the imported main's return type; a
    dimension computed at run time (NonMaxSuppression's box count) is None."""
    from tvm import relax, tirx

    main = mod["main"]
    # the returned value's own type: main's return type drops a shape that has a variable defined in the body
    ret = main.body.body.ty if isinstance(main.body, relax.SeqExpr) else main.ret_ty
    leaves = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if len(leaves) != len(names):
        raise EdgecError(f"internal error: the imported module returns {len(leaves)} values for "
                         f"{len(names)} model outputs", "report this with the model")
    for name, leaf in zip(names, leaves):
        if leaf.shape is None and leaf.ndim < 0:
            raise EdgecError(f"output '{name}' has a rank known only at run time, which a bundle cannot describe",
                             "export the model with outputs of a fixed rank")
    return tuple(TensorSpec(name, tuple(int(d) if isinstance(d, tirx.IntImm) else None for d in leaf.shape.values)
                            if leaf.shape is not None else (None,) * leaf.ndim, str(leaf.dtype))
                 for name, leaf in zip(names, leaves))


def histogram(names) -> dict[str, int]:
    return dict(collections.Counter(names).most_common())
