"""Runs a planned pipeline under one PassContext: times each step, checks and counts what it leaves, dumps IR,
and names the failing step with the steps that ran before it."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax

from ..context import BuildContext
from ..errors import EdgecError, last_line
from .registry import PlannedStep


class PassError(EdgecError):
    """A pass failed or broke the module; the message names it and what ran before it."""


@dataclass(frozen=True)
class PassRecord:
    name: str
    phase: str
    seconds: float
    calls: int          # operator and kernel calls left in main afterwards


@tvm.instrument.pass_instrument
class PassTimer:
    """Seconds per pass name, for every pass TVM runs in the context: edgec's steps and codegen's own passes."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._started: list[float] = []

    def run_before_pass(self, mod, info):
        self._started.append(time.perf_counter())

    def run_after_pass(self, mod, info):
        self.seconds[info.name] = self.seconds.get(info.name, 0.0) + time.perf_counter() - self._started.pop()


@contextmanager
def pass_context(ctx: BuildContext, timer: PassTimer):
    """The one context from the first pass to the linked library: -O level, the descriptor's TVM options, timing.

    Code generation (tvm.compile) runs inside it too, so a config or a tuning database set here reaches it.
    """
    with ctx.tvm_target(), tvm.transform.PassContext(opt_level=ctx.opt_level, config=ctx.target.tvm_pass_config,
                                                      instruments=[timer]):
        yield


def count_calls(mod: tvm.IRModule) -> int:
    """Calls in main to operators (R.nn.conv2d, call_tir, ...) and to fused subgraphs: the graph's nodes."""
    calls = 0

    @relax.expr_functor.visitor
    class Counter(relax.PyExprVisitor):
        def visit_call_(self, call):
            nonlocal calls
            if isinstance(call.op, (tvm.ir.Op, tvm.ir.GlobalVar)):
                calls += 1
            for arg in call.args:
                self.visit_expr(arg)

    Counter().visit_expr(mod["main"])
    return calls


def dump_name(index: int, name: str) -> str:
    return f"{index:02d}-{name}.py"


def run_pipeline(mod: tvm.IRModule, steps: list[PlannedStep], ctx: BuildContext, *, dump_dir: Path | None = None,
                 first_index: int = 1, on_step=None, after_step=None) -> tuple[tvm.IRModule, list[PassRecord]]:
    """Apply every enabled Relax step in order; call inside `pass_context`.

    `on_step(name)` is called before each step (progress), `after_step(step, mod)` after it (analyses).
    Import steps are skipped here: the frontend ran them.
    """
    records: list[PassRecord] = []
    history: list[str] = []
    for index, step in enumerate((s for s in steps if s.enabled and s.phase != "import"), start=first_index):
        if on_step:
            on_step(step.name)
        t0 = time.perf_counter()
        try:
            mod = step.make(ctx)(mod)
        except EdgecError:
            raise
        except Exception as e:  # TVM raises its own error types and plain Python ones; the step is what matters
            raise _failure(step, history, f"failed: {last_line(e)}") from e
        try:
            relax.analysis.well_formed(mod)
        except Exception as e:  # TVM's own error type, naming the offending node
            raise _failure(step, history, f"left a malformed module ({last_line(e)})") from e
        records.append(PassRecord(step.name, step.phase, time.perf_counter() - t0, count_calls(mod)))
        history.append(step.name)
        if dump_dir is not None:
            (dump_dir / dump_name(index, step.name)).write_text(mod.script(show_meta=False))
        if after_step:
            after_step(step, mod)
    return mod, records


def _failure(step: PlannedStep, history: list[str], what: str) -> PassError:
    ran = ", ".join(history[-4:]) or "nothing"
    hint = ("rerun with --dump-ir DIR to see its input" + ("" if step.spec.required else
                                                          f", or skip it with --disable-pass {step.name}"))
    return PassError(f"pass '{step.name}' ({step.phase}, from {step.source}) {what} (after {ran})", hint)
