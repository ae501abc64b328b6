"""Model importers: a model file becomes an ImportedModel (Relax module + signature).

Each frontend registers itself by file suffix; `load_model` picks one and checks the file first, so a
missing file or an unknown format fails with one clear line before any heavy import happens.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..errors import EdgecError
from .base import ImportedModel, ModelInfo, parse_input_shapes

# suffix -> (import function, inspect function); filled in by the frontend modules below
_FRONTENDS: dict[str, tuple[Callable[..., ImportedModel], Callable[[Path], ModelInfo]]] = {}


def register_frontend(suffix: str, importer: Callable[..., ImportedModel], inspector: Callable[[Path], ModelInfo]):
    _FRONTENDS[suffix] = (importer, inspector)


def _frontend_for(path: str | Path):
    path = Path(path)
    if not path.exists():
        raise EdgecError(f"model file {path} does not exist", "check the path")
    if not path.is_file():
        raise EdgecError(f"{path} is not a file", "pass a .onnx or .tflite model file")
    entry = _FRONTENDS.get(path.suffix.lower())
    if entry is None:
        known = ", ".join(sorted(_FRONTENDS))
        raise EdgecError(f"{path} has an unsupported model format '{path.suffix}'", f"edgec reads {known} files")
    return path, entry


def load_model(path: str | Path, input_shapes: dict[str, tuple[int, ...]] | None = None) -> ImportedModel:
    """Import a model file into Relax; `input_shapes` pins dynamic input dimensions."""
    path, (importer, _) = _frontend_for(path)
    return importer(path, input_shapes or {})


def inspect_model(path: str | Path) -> ModelInfo:
    """Describe a model (operators, parameters, MACs, signature) without building it."""
    path, (_, inspector) = _frontend_for(path)
    return inspector(path)


from . import onnx as _onnx  # noqa: E402,F401  (registers .onnx)
from . import tflite as _tflite  # noqa: E402,F401  (registers .tflite)

__all__ = ["ImportedModel", "ModelInfo", "load_model", "inspect_model", "parse_input_shapes", "register_frontend"]
