"""`edgec inspect`: what the model file says (operators, parameters, MACs, signature), and whether it really
imports: the import a build runs (the frontend's import steps, then TVM's importer with edgec's corrections) is
run, without passes or code generation, so a model that fails in the importer is reported with the reason."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import EdgecError
from .frontends import ModelInfo, inspect_model, load_model, model_format
from .frontends.custom_ops import active, load_converters


@dataclass(frozen=True)
class Inspection:
    info: ModelInfo
    import_error: str | None          # None: the model imports as a default build would import it
    relax_calls: int | None           # operator calls in the imported main (None when it does not import)


def inspect(model_path: str | Path, *, input_shapes: dict | None = None, converters=()) -> Inspection:
    from .context import BuildContext, BuildOptions
    from .passes import plan
    from .passes.manager import count_calls
    from .targets import load_target

    table = load_converters(converters)
    steps = tuple(s.name for s in plan(BuildContext(load_target("host"), BuildOptions()), model_format(model_path))
                  if s.phase == "import" and s.enabled)
    with active(table):
        info = inspect_model(model_path)
        try:
            model = load_model(model_path, input_shapes, steps)
        except EdgecError as e:
            return Inspection(info, e.message + (f"; {e.hint}" if e.hint else ""), None)
    return Inspection(info, None, count_calls(model.mod))

