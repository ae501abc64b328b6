"""The pass registry and the pipeline planner.

A *pass* is registered once by name (what it does, the -O level that turns it on, whether a runnable module
needs it). A *stage* is a place in the pipeline where a pass runs: a phase plus `after=` constraints on other
stages of the same phase. A pass may have several stages (constant folding runs in the graph phase and again
where TVM's legalize phase puts it) without a renamed copy.

The lowering phases are not edgec's: `plan()` asks TVM's per-target phase functions
(`tvm.relax.pipeline.library_dispatch_passes(target)`, ...) for their passes, so a GPU target gets its dlight
schedules and a library target its dispatch without an edgec copy. Each TVM pass becomes one named, timed,
dumpable step; the ones edgec knows by name (`tvm_name=`) get its name, -O level and disable switch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tvm

from ..context import BuildContext
from ..errors import EdgecError

# Phases run in this order. "import" steps run inside a frontend before the Relax pipeline starts.
PHASES = ("import", "graph", "quantize", "params", "library-dispatch", "legalize", "dataflow-lower", "finalize")
# Lowering phases and the tvm.relax.pipeline function that lists each one's passes for a target.
TVM_PHASES = {"library-dispatch": "library_dispatch_passes", "legalize": "legalize_passes",
              "dataflow-lower": "dataflow_lower_passes", "finalize": "finalize_passes"}


@dataclass(frozen=True)
class PassSpec:
    name: str
    description: str
    opt_level: int                 # the lowest -O level that runs it
    required: bool                 # a runnable module needs it: it runs at every -O level and cannot be disabled
    make: Callable[[BuildContext], tvm.transform.Pass] | None   # None: only TVM's phases run it
    applies: Callable[[BuildContext], bool]
    tvm_name: str | None = None    # the TVM pass this name stands for inside TVM's phases
    frontend: str | None = None    # "import" steps: the model format whose frontend runs it
    skip_reason: str = "not for this target"    # what `edgec passes` says when `applies` is false


@dataclass(frozen=True)
class Stage:
    pass_name: str
    phase: str
    after: tuple[str, ...]         # names of stages in the same phase that must run first


_PASSES: dict[str, PassSpec] = {}
_BY_TVM_NAME: dict[str, str] = {}
_STAGES: list[Stage] = []


def _add_spec(spec: PassSpec) -> None:
    if spec.name in _PASSES:
        raise ValueError(f"pass {spec.name!r} is registered twice")
    _PASSES[spec.name] = spec
    if spec.tvm_name:
        _BY_TVM_NAME[spec.tvm_name] = spec.name


def schedule(name: str, *, phase: str, after: tuple[str, ...] = ()) -> None:
    """Run an already registered pass (again) at another place in the pipeline."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {PHASES}")
    if name not in _PASSES:
        raise ValueError(f"schedule({name!r}): no such pass is registered")
    _STAGES.append(Stage(name, phase, tuple(after)))


def register_pass(name: str, *, phase: str, after: tuple[str, ...] = (), opt_level: int = 1,
                  required: bool = False, applies: Callable[[BuildContext], bool] | None = None,
                  tvm_name: str | None = None, frontend: str | None = None,
                  skip_reason: str = "not for this target"):
    """Decorator for a factory `(BuildContext) -> tvm.transform.Pass`; its docstring is the description.

    `tvm_name` makes the same name stand for that TVM pass where TVM's own phases run it; `frontend` marks an
    "import" step that the named model format's frontend runs itself; `skip_reason` says why a step whose
    `applies` is false does not run (default: the target does not want it).
    """
    def wrap(make):
        _add_spec(PassSpec(name, (make.__doc__ or "").strip().splitlines()[0], 0 if required else opt_level,
                           required, make, applies or (lambda ctx: True), tvm_name, frontend, skip_reason))
        schedule(name, phase=phase, after=after)
        return make

    return wrap


def adopt_tvm_pass(tvm_name: str, name: str, description: str, *, opt_level: int = 1, required: bool = False) -> None:
    """Give a pass that only TVM's phases run an edgec name, a description, an -O level and a disable switch."""
    _add_spec(PassSpec(name, description, 0 if required else opt_level, required, None, lambda ctx: True, tvm_name))


def all_passes() -> list[PassSpec]:
    return list(_PASSES.values())


@dataclass(frozen=True)
class PlannedStep:
    spec: PassSpec
    phase: str
    source: str                    # "edgec", or the TVM function whose list it came from
    enabled: bool
    reason: str = ""               # why a step is skipped
    tvm_pass: tvm.transform.Pass | None = None    # the instance TVM built for this target

    @property
    def name(self) -> str:
        return self.spec.name

    def make(self, ctx: BuildContext) -> tvm.transform.Pass:
        return self.tvm_pass if self.tvm_pass is not None else self.spec.make(ctx)


def tvm_phase_passes(phase: str, target: tvm.target.Target) -> tuple[str, list[tvm.transform.Pass]]:
    """TVM's passes for one lowering phase and target, with the name of the function that chose them."""
    from tvm import relax

    function = TVM_PHASES[phase]
    try:
        return f"tvm.relax.pipeline.{function}", getattr(relax.pipeline, function)(target)
    except AttributeError as e:
        # TVM 0.27's relax.backend.cpu_generic and .cuda define dataflow_lower_passes in their pipeline.py but
        # do not export it, so relax.pipeline's dispatcher fails for llvm and cuda: call the definition itself.
        impl = getattr(getattr(e.obj, "pipeline", None), function, None)
        if impl is None:
            raise
        return f"{e.obj.__name__}.pipeline.{function}", impl(target)


def _spec_for_tvm_pass(p: tvm.transform.Pass, source: str) -> PassSpec:
    name = _BY_TVM_NAME.get(p.info.name)
    if name is not None:
        return _PASSES[name]
    # A pass edgec has no policy for (e.g. a GPU phase's ApplyDefaultSchedule): TVM put it there, so it runs.
    return PassSpec(p.info.name, f"TVM's {p.info.name}, from {source}", 0, True, None, lambda ctx: True, p.info.name)


def _order(nodes: list[tuple[str, tuple[str, ...], bool]]) -> list[int]:
    """Indices of (name, after, from_tvm) nodes in run order.

    TVM's steps keep TVM's order; an edgec stage runs as early as its `after=` allows (before the next TVM step),
    ties broken by registration order. An `after` name absent from the phase is satisfied trivially: that stage
    does not exist for this target.
    """
    present = {name for name, _, _ in nodes}
    tvm_steps = [i for i, (_, _, from_tvm) in enumerate(nodes) if from_tvm]
    order: list[int] = []
    remaining = list(range(len(nodes)))
    while remaining:
        placed = {nodes[i][0] for i in order}
        next_tvm = next((i for i in tvm_steps if i not in order), None)
        ready = [i for i in remaining if (not nodes[i][2] or i == next_tvm)
                 and all(a in placed or a not in present for a in nodes[i][1])]
        if not ready:
            raise ValueError(f"the after= constraints of {', '.join(nodes[i][0] for i in remaining)} form a cycle")
        pick = min(ready, key=lambda i: (nodes[i][2], i))
        remaining.remove(pick)
        order.append(pick)
    return order


def plan(ctx: BuildContext, model_format: str | None = None) -> list[PlannedStep]:
    """Every step of the pipeline for this target, in run order, each marked run or skip with the reason.

    `model_format` filters the frontend's "import" steps; None lists those of every format.
    """
    from .. import frontends  # noqa: F401  (the frontends register their "import" steps)

    disabled = set(ctx.options.disabled_passes)
    tvm_target = ctx.tvm_target()
    unknown = sorted(disabled - set(_PASSES))
    if unknown:
        raise EdgecError(f"unknown pass {', '.join(unknown)} in --disable-pass",
                         f"'edgec passes' lists them: {', '.join(_PASSES)}")
    steps: list[PlannedStep] = []
    for phase in PHASES:
        # (spec, source, tvm pass or None, after)
        entries: list[tuple[PassSpec, str, tvm.transform.Pass | None, tuple[str, ...]]] = []
        if phase in TVM_PHASES:
            source, passes = tvm_phase_passes(phase, tvm_target)
            entries += [(_spec_for_tvm_pass(p, source), source, p, ()) for p in passes]
        for stage in _STAGES:
            spec = _PASSES[stage.pass_name]
            if stage.phase == phase and (model_format is None or spec.frontend in (None, model_format)):
                entries.append((spec, "edgec" if spec.frontend is None else f"{spec.frontend} frontend", None,
                                stage.after))
        order = _order([(spec.name, after, tvm_pass is not None) for spec, _, tvm_pass, after in entries])
        for i in order:
            spec, source, tvm_pass, _ = entries[i]
            steps.append(PlannedStep(spec, phase, source, *_decide(spec, ctx, disabled), tvm_pass=tvm_pass))
    return steps


def _decide(spec: PassSpec, ctx: BuildContext, disabled: set[str]) -> tuple[bool, str]:
    if spec.name in disabled:
        if spec.required:
            raise EdgecError(f"pass '{spec.name}' cannot be disabled: the build needs it to produce runnable code",
                             "disable only optional passes; 'edgec passes' marks required ones")
        return False, "disabled"
    if spec.opt_level > ctx.opt_level:
        return False, f"needs -O{spec.opt_level}"
    if not spec.applies(ctx):
        return False, spec.skip_reason
    return True, ""
