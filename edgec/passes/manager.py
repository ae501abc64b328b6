"""Runs a planned pipeline: times each pass, counts the calls it leaves, dumps IR, names the failing pass."""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import tvm
from tvm import relax

from ..errors import EdgecError, last_line
from .registry import PassOptions, PlannedPass


class PassError(EdgecError):
    """A pass failed; the message names it so the failure can be reproduced with --dump-ir."""


@dataclass(frozen=True)
class PassRecord:
    name: str
    phase: str
    seconds: float
    calls: int          # operator and kernel calls left in main afterwards


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


def _dump(mod: tvm.IRModule, dump_dir: Path, index: int, name: str) -> None:
    (dump_dir / f"{index:02d}-{name}.py").write_text(mod.script(show_meta=False))


def run_pipeline(mod: tvm.IRModule, planned: list[PlannedPass], options: PassOptions,
                 dump_dir: Path | None = None, on_pass=None, after_pass=None) -> tuple[tvm.IRModule, list[PassRecord]]:
    """Apply every enabled pass in order under the target.

    `on_pass(name)` is called before each pass (progress), `after_pass(spec, mod)` after it (analyses).
    """
    if dump_dir is not None:
        dump_dir.mkdir(parents=True, exist_ok=True)
        _dump(mod, dump_dir, 0, "imported")
    records = []
    enabled = [p.spec for p in planned if p.enabled]
    with options.tvm_target, tvm.transform.PassContext(opt_level=3):
        for index, spec in enumerate(enabled, start=1):
            if on_pass:
                on_pass(spec.name)
            t0 = time.perf_counter()
            try:
                mod = spec.make(options)(mod)
            except EdgecError:
                raise
            except Exception as e:
                raise PassError(f"pass '{spec.name}' failed: {last_line(e)}",
                                f"rerun with --dump-ir DIR to see its input, or --disable-pass {spec.name}"
                                if not spec.required else "rerun with --dump-ir DIR and --verbose") from e
            records.append(PassRecord(spec.name, spec.phase, time.perf_counter() - t0, count_calls(mod)))
            if dump_dir is not None:
                _dump(mod, dump_dir, index, spec.name)
            if after_pass:
                after_pass(spec, mod)
    return mod, records
