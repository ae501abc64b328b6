"""Converters for TFLite custom operators, supplied by the user (`edgec build --converter my_ops.py`).

A converter file is plain Python that registers one function per custom operator name:

    from tvm import relax
    from edgec.frontends.custom_ops import tflite_custom_op

    @tflite_custom_op("MyOp")
    def my_op(op):                 # op: CustomOp
        x, = op.inputs
        return relax.op.nn.relu(x)

The function returns the operator's output as a Relax expression (a tuple of them for several outputs); edgec
checks its shapes and dtypes against the ones the model declares. Files are executed only when the user names
them: nothing is ever loaded because a model asks for it. `examples/tflite_converters.py` maps MediaPipe's
`Convolution2DTransposeBias`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..errors import EdgecError, last_line

# how a custom operator is named in operator lists and errors, and what the user can do about one
CUSTOM_SUFFIX = " (custom)"
CONVERTER_HINT = ("map a custom operator to Relax with a converter file: --converter my_ops.py "
                  "(examples/tflite_converters.py maps MediaPipe's Convolution2DTransposeBias)")


@dataclass(frozen=True)
class CustomOp:
    """One custom operator node, as its converter sees it."""
    name: str                              # the custom code, e.g. "Convolution2DTransposeBias"
    inputs: tuple                          # Relax expressions, in the node's input order (None: an omitted input)
    input_shapes: tuple                    # as the model declares them (None: an omitted input)
    output_shapes: tuple[tuple[int, ...], ...]   # as the model declares them
    output_dtypes: tuple[str, ...]
    options: bytes                         # the node's custom options, raw (MediaPipe stores C structs here)

    def flexbuffer(self) -> dict[str, Any]:
        """The custom options decoded as a flexbuffer map (what TFLite's own converter writes)."""
        from tvm.relax.frontend.tflite.tflite_flexbuffer import FlexBufferDecoder

        return FlexBufferDecoder(self.options).decode()

    def constant(self, index: int) -> np.ndarray | None:
        """The value of input `index` when it is a constant in the imported graph (weights), else None."""
        import tvm

        expr = self.inputs[index]
        return expr.value.numpy() if isinstance(expr, tvm.ir.expr.GenericConst) else None


Converter = Callable[[CustomOp], Any]


@dataclass(frozen=True)
class Registered:
    function: Converter
    source: Path                           # the file that registered it, named in errors


_LOADING: contextvars.ContextVar[tuple[Path, dict] | None] = contextvars.ContextVar("edgec_loading", default=None)
_ACTIVE: contextvars.ContextVar[dict[str, Registered]] = contextvars.ContextVar("edgec_custom_ops", default={})


def tflite_custom_op(name: str) -> Callable[[Converter], Converter]:
    """Register the decorated function as the converter of the TFLite custom operator `name`."""
    def register(function: Converter) -> Converter:
        loading = _LOADING.get()
        if loading is None:
            raise EdgecError(f"tflite_custom_op('{name}') was called outside a converter file edgec loads",
                             "pass the file to edgec with --converter (or BuildOptions(converters=...))")
        source, table = loading
        if name in table:
            raise EdgecError(f"the custom operator '{name}' has two converters ({table[name].source.name} and "
                             f"{source.name})", "pass one converter per custom operator")
        table[name] = Registered(function, source)
        return function
    return register


def load_converters(paths) -> dict[str, Registered]:
    """Execute the user's converter files (their own code, named by them) and return what they registered."""
    import runpy

    table: dict[str, Registered] = {}
    for path in map(Path, paths):
        if not path.is_file() or path.suffix != ".py":
            raise EdgecError(f"converter file {path} does not exist or is not a .py file",
                             "pass the path of a Python file that registers converters with tflite_custom_op")
        before = len(table)
        token = _LOADING.set((path, table))
        try:
            runpy.run_path(str(path), run_name=f"edgec_converters_{path.stem}")
        except EdgecError:
            raise
        except Exception as e:  # the user's code: any error is theirs to fix, shown as one line
            raise EdgecError(f"converter file {path.name} failed to load: {type(e).__name__}: {last_line(e)}",
                             "fix the file (edgec --verbose shows the traceback)") from e
        finally:
            _LOADING.reset(token)
        if len(table) == before:
            raise EdgecError(f"converter file {path.name} registers no converter",
                             "decorate a function with @tflite_custom_op('OpName')")
    return table


@contextlib.contextmanager
def active(converters: dict[str, Registered]):
    """Make `converters` the ones the TFLite frontend uses (inspect and import) for the duration."""
    token = _ACTIVE.set(dict(converters))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_converters() -> dict[str, Registered]:
    return _ACTIVE.get()
