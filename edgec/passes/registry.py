"""The pass registry: every pass declares its name, phase, order and the -O level that turns it on.

A pipeline is data: `pipeline_for(target, opt_level)` sorts the registered passes by phase and order
and drops the ones the opt level or the target leaves out, so `edgec passes` prints exactly what
`edgec build` runs. Adding a pass is one `@register_pass` in one file.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import tvm

from ..errors import EdgecError

# Phases run in this order; a pass's `order` places it within its phase.
PHASES = ("graph", "quantize", "params", "legalize", "fuse", "lower", "plan", "finalize")


@dataclass(frozen=True)
class PassSpec:
    name: str
    phase: str
    order: int
    opt_level: int                 # the lowest -O level that runs this pass
    required: bool                 # lowering steps a runnable module needs; these cannot be disabled
    description: str
    make: Callable[["PassOptions"], tvm.transform.Pass]
    applies: Callable[["PassOptions"], bool] = lambda options: True

    @property
    def sort_key(self) -> tuple[int, int]:
        return PHASES.index(self.phase), self.order


@dataclass(frozen=True)
class PassOptions:
    """What a pass factory may look at: the TVM target and the target descriptor."""
    tvm_target: tvm.target.Target
    descriptor: object             # edgec.targets.Target (kept loose to avoid an import cycle)
    opt_level: int


_REGISTRY: dict[str, PassSpec] = {}


def register_pass(name: str, *, phase: str, order: int, opt_level: int = 1, required: bool = False,
                  applies: Callable[[PassOptions], bool] | None = None):
    """Decorator for a factory `(PassOptions) -> tvm.transform.Pass`; its docstring is the description."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; phases are {PHASES}")

    def wrap(make):
        if name in _REGISTRY:
            raise ValueError(f"pass {name!r} is registered twice")
        _REGISTRY[name] = PassSpec(name, phase, order, 0 if required else opt_level, required,
                                   (make.__doc__ or "").strip().splitlines()[0], make,
                                   applies or (lambda options: True))
        return make

    return wrap


def all_passes() -> list[PassSpec]:
    return sorted(_REGISTRY.values(), key=lambda p: p.sort_key)


@dataclass(frozen=True)
class PlannedPass:
    spec: PassSpec
    enabled: bool
    reason: str = ""               # why a pass is skipped


def pipeline_for(options: PassOptions, disabled: tuple[str, ...] = ()) -> list[PlannedPass]:
    """Every registered pass in run order, each marked enabled or skipped with the reason."""
    unknown = sorted(set(disabled) - set(_REGISTRY))
    if unknown:
        raise EdgecError(f"unknown pass {', '.join(unknown)} in --disable-pass",
                         f"'edgec passes' lists them: {', '.join(p.name for p in all_passes())}")
    planned = []
    for spec in all_passes():
        if spec.name in disabled:
            if spec.required:
                raise EdgecError(f"pass '{spec.name}' cannot be disabled: the build needs it to produce runnable code",
                                 "disable only optional passes; 'edgec passes' marks required ones")
            planned.append(PlannedPass(spec, False, "disabled"))
        elif spec.opt_level > options.opt_level:
            planned.append(PlannedPass(spec, False, f"needs -O{spec.opt_level}"))
        elif not spec.applies(options):
            planned.append(PlannedPass(spec, False, "not for this target"))
        else:
            planned.append(PlannedPass(spec, True))
    return planned
