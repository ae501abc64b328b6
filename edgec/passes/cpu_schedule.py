"""A default schedule for the CPU kernels TVM leaves unscheduled.

LegalizeOps emits every kernel as plain loop nests: one thread, no vector instructions. This pass gives each
kernel nobody has scheduled yet (no `tirx.is_scheduled`) a default: small producers (copies, bias, activation)
inlined into their consumers, the outer spatial loops fused and run in parallel across the target's cores, the
innermost spatial loop vectorized at the target's vector width (moved under the reduction loops, so a
convolution or matmul accumulates a vector of outputs per weight), the epilogue (bias, clamp, residual
add) computed right after each parallel slice while it is in cache, and float32 exp, erf, tanh and sigmoid as
arithmetic the vector loops can hold (cpu_math.py) instead of one C library call per element. A lookup in a byte
table becomes byte shuffles where the CPU has them (byte_lookup.py). Reductions are never split (no rfactor):
only the spatial loops around them are parallel or vector loops, so every sum keeps its order.

A kernel the schedule primitives refuse stays exactly as it was; each kernel says what happened in its
attributes (`edgec.cpu_schedule`), which `--dump-ir` shows and `schedule_summary()` counts.
"""
from __future__ import annotations

import math
from collections import Counter

import tvm
import tvm_ffi
from tvm import s_tir, tirx
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.target.codegen import llvm_get_vector_width

from ..context import BuildContext
from .byte_lookup import shuffle_lookup
from .cpu_math import vectorizable_math
from .registry import register_pass

ATTR = "edgec.cpu_schedule"          # "scheduled", or why the kernel was left as it was
_SCHEDULED = "tirx.is_scheduled"     # TVM's mark: dlight, MetaSchedule and this pass skip such kernels
_has_if_then_else = tvm.get_global_func("s_tir.schedule.HasIfThenElse")
_TASKS_PER_CORE = 4                  # parallel iterations per core before fusing stops: some load balance
# Loop iterations below which a kernel stays on one thread: waking the pool's workers costs tens of microseconds
# (more when another process holds the cores), longer than such a kernel takes alone.
_MIN_PARALLEL_WORK = 1 << 16


@register_pass("cpu-default-schedule", phase="legalize", after=("fuse-tir",),
               applies=BuildContext.on_cpu)
def cpu_default_schedule(ctx: BuildContext) -> tvm.transform.Pass:
    """Schedule unscheduled CPU kernels: parallel outer loops, vectorized inner loops"""
    return CpuDefaultSchedule(ctx.tvm_target())


def parallel_tasks(target: tvm.target.Target) -> int:
    """Parallel iterations a kernel needs for the target's cores (_TASKS_PER_CORE each)."""
    return int(target.attrs.get("num-cores", 0) or 4) * _TASKS_PER_CORE


class _Left(Exception):
    """A kernel this schedule does not handle; the message is the reason recorded on it."""


@tvm.transform.module_pass(opt_level=0, name="CpuDefaultSchedule")
class CpuDefaultSchedule:
    def __init__(self, target: tvm.target.Target):
        self.target = target
        self.vector_bits = llvm_get_vector_width(target) if target.kind.name == "llvm" else 0
        self.tasks = parallel_tasks(target)

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc) or _scheduled(func):
                continue
            lookup = shuffle_lookup(func, self.target, _MIN_PARALLEL_WORK)
            if lookup is not None:
                updates[gvar] = lookup.with_attrs(dict(func.attrs)).with_attr(_SCHEDULED, True) \
                    .with_attr(ATTR, "scheduled")
                continue
            sch = s_tir.Schedule(func)
            try:
                self._schedule(sch)
            except _Left as e:
                updates[gvar] = func.with_attr(ATTR, str(e))
            except s_tir.ScheduleError as e:
                updates[gvar] = func.with_attr(ATTR, f"refused: {_first_line(e)}")
            else:
                scheduled = vectorizable_math(sch.mod["main"])
                updates[gvar] = scheduled.with_attr(_SCHEDULED, True).with_attr(ATTR, "scheduled")
        mod = mod.clone()   # assigning a function mutates the module in place: the caller's copy stays as it was
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod

    def _schedule(self, sch: s_tir.Schedule) -> None:
        if _has_empty_loop(sch):
            raise _Left("a zero-size loop (nothing to compute)")
        _inline_producers(sch)
        blocks = _blocks(sch)
        if not blocks:
            raise _Left("no loops")
        handled = set()
        for block in blocks:
            if block.name in handled:
                continue
            outer = self._tile(sch, block)
            # the elementwise consumers of a reduction (bias, clamp, residual) run under its parallel slice
            if outer is not None and block.is_reduction():
                for consumer in sch.get_consumers(block.block_rv):
                    if not _elementwise_over(sch.get(consumer), sch.get(block.block_rv).writes[0].source):
                        continue
                    try:
                        sch.reverse_compute_at(consumer, outer, preserve_unit_loops=True)
                    except s_tir.ScheduleError:
                        continue   # read by more than this slice: it gets its own loop nest below
                    self._vectorize_innermost(sch, consumer)
                    handled.add(sch.get(consumer).name_hint)

    def _tile(self, sch: s_tir.Schedule, block) -> s_tir.schedule.LoopRV | None:
        """Parallel fused outer spatial loops, the innermost spatial loop vectorized below the reduction loops.

        Returns the fused outer loop (None when the block has no spatial loop).
        """
        work = 1
        for it in block.iters:
            work *= _extent(sch, it.loop_rv)
        spatial = [it.loop_rv for it in block.iters if it.kind == "S"]
        reduce = [it.loop_rv for it in block.iters if it.kind == "R"]
        if not spatial:
            return None
        vector = None
        lanes = self._transposing(sch, block)
        if lanes:
            # one vector's lanes: its stores are scalar, and longer vectors only spill (32 lanes took 1.7x of 16)
            outer_part, vector = sch.split(spatial[-2], factors=[None, lanes])
            spatial = spatial[:-2] + [outer_part, spatial[-1]]
        elif _extent(sch, spatial[-1]) > 1 and _vectorizable(sch, block):
            split = self._split_vector(sch, spatial[-1], block.block_rv)
            spatial, vector = spatial[:-1] + split[:-1], split[-1]
        outer, rest = _fuse_outer(sch, spatial, self.tasks)
        sch.reorder(*(([outer] if outer is not None else []) + rest + reduce + ([vector] if vector else [])))
        if outer is not None and work >= _MIN_PARALLEL_WORK:
            sch.parallel(outer)
        if vector is not None:
            sch.vectorize(vector)
            if reduce:   # zero the accumulators in a vector loop of their own, not per reduction step
                sch.decompose_reduction(block.block_rv, reduce[0])
        return outer

    def _lanes(self, stmt) -> int:
        """One vector's lanes for the block's widest type."""
        return max(self.vector_bits // _widest_bits(stmt), 1)

    def _transposing(self, sch: s_tir.Schedule, block) -> int:
        """Vector lanes along the second innermost index where the block writes a few channels innermost, read
        from planes contiguous along that index (NCHW -> NHWC with 3 channels): vectors along it, stored with a
        stride, instead of 3-lane vectors gathered from three planes (PP-OCRv4 det's input quantize and
        transpose, 320x320x3: 0.108 -> 0.040 ms). 0 for any other block."""
        stmt = sch.get(block.block_rv)
        spatial = [it for it in block.iters if it.kind == "S"]
        if block.is_reduction() or len(spatial) < 2 or len(stmt.writes) != 1 or _bfloat16(stmt):
            return 0
        lanes = self._lanes(stmt)
        inner, next_inner = spatial[-1].var, spatial[-2].var
        reads = [read.region[-1].min for read in stmt.reads if read.source.shape]
        transposing = (2 * _extent(sch, spatial[-1].loop_rv) <= lanes
                       and _extent(sch, spatial[-2].loop_rv) % lanes == 0
                       and stmt.writes[0].region[-1].min.same_as(inner)
                       and not any(_unit_stride(index, inner) for index in reads)
                       and any(_unit_stride(index, next_inner) for index in reads))
        return lanes if transposing else 0

    def _split_vector(self, sch, loop, block_rv) -> list:
        """[outer, vector] loops for the innermost spatial loop ([loop] alone when it fits a few vectors). Where the
        block's value depends on which segment of that index it is in (a concatenation along it), the vector loop
        stays inside one segment, so that each lane computes one input's expression."""
        lanes = self._lanes(sch.get(block_rv))
        extent = _extent(sch, loop)
        segment = math.gcd(extent, _segments(sch.get(block_rv)))
        if segment < extent:
            factor = next(f for f in range(min(4 * lanes, segment), 0, -1) if segment % f == 0)
            if factor >= lanes:
                return list(sch.split(loop, factors=[None, factor]))
        if extent <= 4 * lanes:
            return [loop]
        factor = next((f for f in range(4 * lanes, lanes - 1, -1) if extent % f == 0), lanes)
        return list(sch.split(loop, factors=[None, factor]))

    def _vectorize_innermost(self, sch, block_rv) -> None:
        loop = sch.get_loops(block_rv)[-1]
        if _extent(sch, loop) > 1 and not _bfloat16(sch.get(block_rv)):
            sch.vectorize(self._split_vector(sch, loop, block_rv)[-1])


def _elementwise_over(consumer, buffer) -> bool:
    """The consumer maps `buffer` element by element over exactly its shape. Only then is moving it under the
    producer's loops safe: reverse_compute_at sizes its loops from the producer's region, so a consumer with a
    larger domain (one that pads the result) would silently lose the iterations outside it."""
    iters = consumer.iter_vars
    if any(v.iter_type != tirx.IterVar.DataPar for v in iters) or len(iters) != len(buffer.shape):
        return False
    if not all(isinstance(v.dom.extent, tirx.IntImm) and isinstance(n, tirx.IntImm) and v.dom.extent.value == n.value
               for v, n in zip(iters, buffer.shape)):
        return False
    return all(all(r.min.same_as(v.var) for r, v in zip(read.region, iters))
               for read in consumer.reads if read.source.same_as(buffer))


def _vectorizable(sch: s_tir.Schedule, block) -> bool:
    """Worth a vector loop: the innermost spatial iterator is the output's last index (contiguous stores), and a
    reduction also reads an input contiguously along it (a row max or sum reads across it, a stride-2
    convolution every other element: their vector lanes would be gathered one load at a time)."""
    stmt = sch.get(block.block_rv)
    inner = [it.var for it in block.iters if it.kind == "S"][-1]
    if len(stmt.writes) != 1 or not stmt.writes[0].region[-1].min.same_as(inner) or _bfloat16(stmt):
        return False
    return not block.is_reduction() or any(_unit_stride(read.region[-1].min, inner) for read in stmt.reads
                                           if read.source.shape)


def _segments(stmt) -> int:
    """The gcd of the constants the block's innermost spatial index is compared with (a concatenation's boundaries
    along it), 0 where it is compared with none. A vector loop across a boundary computed every input's expression
    in every lane and selected one: PP-OCRv4 det's neck concatenation of four 24-channel QDQ chains, vectorized 48
    channels wide, took 2.9x the time of 24 (AVX2 Zen 3, the kernel alone)."""
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    bounds = []

    def note(compare) -> None:
        for side, other in ((compare.a, compare.b), (compare.b, compare.a)):
            if spatial and side.same_as(spatial[-1]) and isinstance(other, tirx.IntImm):
                bounds.append(int(other.value))

    tvm_ffi.structural_walk(stmt.body, [(kind, note) for kind in (tirx.LT, tirx.LE, tirx.GT, tirx.GE)])
    return math.gcd(*bounds) if bounds else 0


def _widest_bits(stmt) -> int:
    """Bits of the widest type the block loads, stores or converts to float. Vector lanes sized by its store alone
    made a QDQ kernel (uint8 stored, float32 computed) a 256-lane vector loop whose every float op took 16
    registers: 4x the code of lanes sized by the float32 it computes in."""
    bits = [b.source.dtype.bits for b in (*stmt.reads, *stmt.writes)]

    def note(cast: tirx.Cast) -> None:
        if str(cast.ty.dtype).startswith(("float", "bfloat")):   # not an index's int64
            bits.append(cast.ty.dtype.bits)

    tvm_ffi.structural_walk(stmt.body, [(tirx.Cast, note)])
    return max(bits)


def _bfloat16(stmt) -> bool:
    """The block stores bfloat16: TVM 0.27's code generation fails on a vector of them (it stores them as uint16)."""
    return any(str(w.source.dtype) == "bfloat16" for w in stmt.writes)


def _unit_stride(index, var) -> bool:
    coefficients = tvm.sym.pattern.detect_linear_equation(index, [var])
    return len(coefficients) == 2 and isinstance(coefficients[0], tirx.IntImm) and coefficients[0].value == 1


def _inline_producers(sch: s_tir.Schedule) -> None:
    """Inline every block that copies or maps elements into its consumer (or producer); padding blocks stay
    apart: inlined, the bounds check would run on every multiply-add of the convolution and block its vectors."""
    changed = True
    while changed:
        changed = False
        for block in sch.get_child_blocks(sch.get_sblock("root")):
            if _has_if_then_else(sch.get(block)):
                continue
            for inline in (sch.compute_inline, sch.reverse_compute_inline):
                if inline == sch.reverse_compute_inline and not _reads_all_of_producers(sch, block):
                    continue
                try:
                    inline(block)
                except s_tir.ScheduleError:
                    continue
                except tvm.error.InternalError as e:
                    # an internal check (TVM 0.27: a select inlined along a broadcast axis) rather than a refusal:
                    # the schedule may be half-changed, so the kernel is left exactly as it was
                    raise _Left(f"TVM failed inlining {sch.get(block).name_hint}: {_first_line(e)}") from None
                changed = True
                break
            if changed:
                break


def _has_empty_loop(sch: s_tir.Schedule) -> bool:
    """A loop of extent 0 (a zero-size tensor): the schedule primitives divide by its extent."""
    return any(isinstance(sch.get(loop).extent, tirx.IntImm) and sch.get(loop).extent.value == 0
               for block in sch.get_child_blocks(sch.get_sblock("root")) for loop in sch.get_loops(block))


def _reads_all_of_producers(sch: s_tir.Schedule, block) -> bool:
    """The block iterates over at least as many points as each producer writes. Reverse-inlined, a consumer that
    reads only a part (a slice of a padded tensor) becomes a predicate, and TVM 0.27 writes that predicate over an
    undefined loop variable: code generation then fails."""
    extents = [v.dom.extent for v in sch.get(block).iter_vars]
    written = [w.source for p in sch.get_producers(block) for w in sch.get(p).writes]
    if not all(isinstance(d, tirx.IntImm) for d in [*extents, *(d for b in written for d in b.shape)]):
        return False
    points = math.prod(e.value for e in extents)
    return all(points >= math.prod(d.value for d in b.shape) for b in written)


def _blocks(sch: s_tir.Schedule):
    blocks = normalize_prim_func(sch)
    if blocks is None:
        raise _Left("loops not one per block iterator")
    for block in blocks:
        if "O" in block.dom_kind():
            raise _Left(f"block {block.name} has an iterator that is neither spatial nor a reduction")
    return blocks


def _fuse_outer(sch, spatial: list, enough: int):
    """Fuse leading spatial loops until there are `enough` parallel iterations; (fused loop, the rest)."""
    taken, extent = 0, 1
    while taken < len(spatial) and extent < enough:
        extent *= _extent(sch, spatial[taken])
        taken += 1
    if taken == 0:
        return None, spatial
    outer = sch.fuse(*spatial[:taken]) if taken > 1 else spatial[0]
    return outer, spatial[taken:]


def _extent(sch, loop) -> int:
    extent = sch.get(loop).extent
    if not isinstance(extent, tirx.IntImm):
        raise _Left("dynamic loop extent")
    return int(extent)


def _scheduled(func: tirx.PrimFunc) -> bool:
    return bool(func.attrs and func.attrs.get(_SCHEDULED, False))


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def schedule_summary(mod: tvm.IRModule) -> Counter:
    """How many kernels this pass scheduled, and how many it left for each reason."""
    return Counter(str(f.attrs[ATTR]) for _, f in mod.functions_items()
                   if isinstance(f, tirx.PrimFunc) and f.attrs and ATTR in f.attrs)
