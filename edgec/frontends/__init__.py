"""Model importers: a model file becomes an ImportedModel (Relax module + signature).

Each format registers a `Frontend` by file suffix; `load_model` runs the one import flow they share (check the
file, refuse unsupported operators, pin input shapes, run the format's visible import steps, convert with TVM),
so a missing file or an unknown format fails with one clear line before any heavy import happens.
"""
from __future__ import annotations

import contextlib
import io
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import EdgecError, last_line
from .base import (ImportedModel, ModelInfo, State, parse_const_inputs, parse_input_shapes, parse_state_pairs,
                   relax_outputs, resolve_states, unsupported_error)


@dataclass(frozen=True)
class Frontend:
    format: str                                                  # "onnx", "tflite"
    display_name: str                                            # "ONNX", "TFLite"
    load: Callable[[Path], Any]                                  # file -> parsed model; EdgecError if invalid
    unsupported_ops: Callable[[Any], dict[str, int]]
    signature: Callable[[Any, Path, dict], tuple[list, list[str]]]   # -> (input TensorSpecs, output names)
    convert: Callable[[Any, list], Any]                          # (model, inputs) -> tvm.IRModule
    inspect: Callable[[Path], ModelInfo]
    # name -> step(model) returning a one-line summary; run in order when enabled (see passes.registry "import")
    steps: dict[str, Callable[[Any], str]]
    # (model, path, {name: array}) folds those graph inputs to constants after checking they fit; None: refused
    fold_inputs: Callable[[Any, Path, dict], None] | None = None
    # model -> the States it keeps itself (TFLite resource variables), already inputs and outputs of the signature
    states: Callable[[Any], tuple] | None = None


_FRONTENDS: dict[str, Frontend] = {}


def register_frontend(suffix: str, frontend: Frontend) -> None:
    _FRONTENDS[suffix] = frontend


def _frontend_for(path: str | Path) -> tuple[Path, Frontend]:
    path = Path(path)
    if not path.exists():
        raise EdgecError(f"model file {path} does not exist", "check the path")
    if not path.is_file():
        raise EdgecError(f"{path} is not a file", "pass a .onnx or .tflite model file")
    frontend = _FRONTENDS.get(path.suffix.lower())
    if frontend is None:
        known = ", ".join(sorted(_FRONTENDS))
        raise EdgecError(f"{path} has an unsupported model format '{path.suffix}'", f"edgec reads {known} files")
    return path, frontend


def model_format(path: str | Path) -> str:
    return _frontend_for(path)[1].format


def load_model(path: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None,
               import_steps: tuple[str, ...] = (), dump_dir: Path | None = None,
               const_inputs: dict | None = None, state_pairs: dict[str, str] | None = None) -> ImportedModel:
    """Import a model file into Relax.

    `input_shapes` pins dynamic input dimensions; `import_steps` names the frontend steps to run (the enabled
    "import" steps of the plan); `dump_dir` receives each step's summary and the imported module; `const_inputs`
    (name -> array) are graph inputs folded to constants before anything else, so shape folding and TVM's importer
    see them as constants (shapes, axes, pads, scales...); `state_pairs` ({input: output}, {} for none, None to
    detect them) are the streaming state a model does not declare itself (see base.resolve_states).
    """
    from ..passes import PassRecord

    path, frontend = _frontend_for(path)
    model = frontend.load(path)
    missing = frontend.unsupported_ops(model)
    if missing:
        raise unsupported_error(path, missing, frontend.display_name)
    t0 = time.perf_counter()
    if const_inputs:
        if frontend.fold_inputs is None:
            raise EdgecError(f"--const-input is not supported for {frontend.display_name} models yet",
                             "drop it, or convert the model to ONNX")
        frontend.fold_inputs(model, path, const_inputs)
    inputs, output_names = frontend.signature(model, path, input_shapes or {})
    records = []
    for name in import_steps:
        t_step = time.perf_counter()
        summary = frontend.steps[name](model)
        records.append(PassRecord(name, "import", time.perf_counter() - t_step, 0))
        if dump_dir is not None:
            (dump_dir / f"00-import-{name}.txt").write_text(summary + "\n")
    # TVM's importers print their diagnostics to stdout, which belongs to edgec's own report: keep them for
    # the traceback that --verbose shows.
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter):
            mod = frontend.convert(model, inputs)
    except EdgecError:          # the frontend's own refusal, already one line for the user
        raise
    except Exception as e:  # TVM's importers raise anything from KeyError to their own errors on a bad graph
        if chatter.getvalue():
            e.add_note(chatter.getvalue())
        raise EdgecError(f"TVM's {frontend.display_name} importer failed on {path.name}: {last_line(e)}",
                         "run with --verbose for details") from e
    outputs = relax_outputs(mod, output_names)
    states = resolve_states(path, inputs, outputs, state_pairs, frontend.states(model) if frontend.states else ())
    if dump_dir is not None:
        (dump_dir / "00-imported.py").write_text(mod.script(show_meta=False))
    return ImportedModel(path.stem, path, frontend.format, mod, tuple(inputs), outputs, time.perf_counter() - t0,
                         tuple(records), dict(const_inputs or {}), states)


def inspect_model(path: str | Path) -> ModelInfo:
    """Describe a model (operators, parameters, MACs, signature) without building it."""
    path, frontend = _frontend_for(path)
    return frontend.inspect(path)


from . import onnx as _onnx  # noqa: E402,F401  (registers .onnx)
from . import tflite as _tflite  # noqa: E402,F401  (registers .tflite)

__all__ = ["Frontend", "ImportedModel", "ModelInfo", "load_model", "inspect_model", "model_format",
           "parse_const_inputs", "parse_input_shapes", "parse_state_pairs", "register_frontend", "State"]
