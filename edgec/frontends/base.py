"""The frontend boundary types and the helpers all frontends share."""
from __future__ import annotations

import collections
import math
from dataclasses import dataclass, field
from pathlib import Path

import tvm

from ..errors import EdgecError
from ..signature import TensorSpec


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
    """Output signature: the model's output names with shapes and dtypes from the imported main's return type."""
    from tvm import relax

    ret = mod["main"].ret_ty
    leaves = list(ret.fields) if isinstance(ret, relax.TupleType) else [ret]
    if len(leaves) != len(names):
        raise EdgecError(f"internal error: the imported module returns {len(leaves)} values for "
                         f"{len(names)} model outputs", "report this with the model")
    return tuple(TensorSpec(name, tuple(int(d) for d in leaf.shape.values) if leaf.shape is not None else (),
                            str(leaf.dtype)) for name, leaf in zip(names, leaves))


def histogram(names) -> dict[str, int]:
    return dict(collections.Counter(names).most_common())
