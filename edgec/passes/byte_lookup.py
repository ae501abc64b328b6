"""A lookup of uint8 values in a 256-entry byte table as byte shuffles: x86 with AVX2, and AArch64.

int8-lookup-tables turns each elementwise chain of one 8-bit tensor into `take(table, x)`. LLVM vectorizes that
gather lane by lane (an index extracted, a byte loaded, a byte inserted): about a cycle a byte on x86. AVX2's
`vpshufb` looks 32 bytes up at once in a 16-entry table, so a 256-entry table is 16 of them, one per value of the
index's high nibble, and 15 `vpblendvb` pick among them by the nibble's bits: the same bytes (PP-OCRv4 det's
160x160x32 lookup, one thread: 0.30 -> 0.13 ms with a compare and a blend per row; the blend tree, 2 threads:
20x20x192 0.025 -> 0.024 ms, 80x80x48 0.063 -> 0.060 ms). AArch64's `tbl` looks 16 bytes up in 64 (four registers),
and `tbx` leaves the bytes whose index is out of those 64 as they were: four instructions cover the 256 entries.
"""
from __future__ import annotations

import math

import tvm
import tvm_ffi
from tvm import tirx
from tvm.script import tirx as T
from tvm.target.codegen import target_has_features
from tvm.tirx.buffer import BufferType


def shuffle_lookup(func: tirx.PrimFunc, target: tvm.target.Target, parallel_bytes: int) -> tirx.PrimFunc | None:
    """`func` rewritten with byte shuffles when it is a byte-table lookup and `target` has them, else None."""
    if target_has_features("avx2", target):
        lanes, shuffled = 32, _vpshufb
    elif bool(target.attrs.get("feature.is_aarch64", False)) and target_has_features("neon", target):
        lanes, shuffled = 16, _tbl
    else:
        return None
    shape = _lookup_shape(func)
    if shape is None:
        return None
    return _kernel(str(func.params[0].dtype), shape, lanes, shuffled, math.prod(shape) >= parallel_bytes)


def _lookup_shape(func: tirx.PrimFunc) -> tuple[int, ...] | None:
    """The index's shape when `func` is out[i...] = table[x[i...]] with a 256-entry 8-bit table and uint8 x."""
    if len(func.params) != 3 or not all(isinstance(p.ty, BufferType) for p in func.params):   # not a scalar param
        return None
    table, x, out = func.params
    try:
        shape = tuple(int(d) for d in x.shape)
        same = tuple(int(d) for d in out.shape) == shape and [int(d) for d in table.shape] == [256]
    except TypeError:   # a symbolic dimension
        return None
    if not same or str(x.dtype) != "uint8" or str(table.dtype) not in ("uint8", "int8") \
            or str(out.dtype) != str(table.dtype):
        return None
    stores = []
    tvm_ffi.structural_map(func.body, [(tirx.BufferStore, lambda s: stores.append(s) or s)])
    if len(stores) != 1 or not stores[0].buffer.same_as(out):
        return None
    load = stores[0].value
    if not (isinstance(load, tvm.ir.expr.TensorLoad) and load.source.same_as(table) and len(load.indices) == 1):
        return None
    index = load.indices[0]
    # take's clip of a uint8 index: max(0, x) and casts, which change no value of x
    while isinstance(index, tirx.Cast) or (isinstance(index, tirx.Max) and isinstance(index.a, tirx.IntImm)
                                            and index.a.value == 0):
        index = index.value if isinstance(index, tirx.Cast) else index.b
    if not (isinstance(index, tvm.ir.expr.TensorLoad) and index.source.same_as(x)
            and tvm_ffi.structural_equal(index.indices, stores[0].indices)):
        return None
    return shape


def _vpshufb(table, flat, at):
    """The 32 bytes table[flat[at:at + 32]]: vpshufb on each 16-byte row by the index's low nibble, then the row its
    high nibble names, picked bit by bit (4 to 7) by vpblendvb, which reads each mask byte's top bit: 15 blends on
    the index shifted left by adding it to itself, where comparing the nibble with each row took 16 compares and 16
    blends."""
    index = flat.vload([at], "uint8x32")
    vector = f"{table.dtype}x32"
    low = tirx.bitwise_and(index, tirx.Broadcast(tirx.const(15, "uint8"), 32))
    level = []
    for row in range(16):
        half = table.vload([row * 16], f"{table.dtype}x16")
        level.append(tirx.call_llvm_pure_intrin(vector, "llvm.x86.avx2.pshuf.b",
                                                tirx.Shuffle([half, half], list(range(16)) * 2), low))
    masks = [index]                      # bit 7 on top, then bit 6, 5, 4
    for _ in range(3):
        masks.append(masks[-1] + masks[-1])
    for mask in reversed(masks):         # bit 4 first: it tells adjacent rows apart
        level = [tirx.call_llvm_pure_intrin(vector, "llvm.x86.avx2.pblendvb", level[k], level[k + 1], mask)
                 for k in range(0, len(level), 2)]
    return level[0]


def _tbl(table, flat, at):
    """The 16 bytes table[flat[at:at + 16]]: tbl on entries 0-63, then tbx on each next 64 with the index shifted
    down (an index below them wraps above 63: out of range, its byte kept)."""
    index = flat.vload([at], "uint8x16")
    vector = f"{table.dtype}x16"
    result = None
    for quarter in range(4):
        rows = [table.vload([quarter * 64 + 16 * r], vector) for r in range(4)]
        shifted = index - tirx.Broadcast(tirx.const(64 * quarter, "uint8"), 16) if quarter else index
        result = tirx.call_llvm_pure_intrin(vector, "llvm.aarch64.neon.tbl4", *rows, shifted) if result is None \
            else tirx.call_llvm_pure_intrin(vector, "llvm.aarch64.neon.tbx4", result, *rows, shifted)
    return result


def _kernel(dtype: str, shape: tuple[int, ...], lanes: int, shuffled, parallel: bool) -> tirx.PrimFunc:
    n = math.prod(shape)
    vectors, tail = divmod(n, lanes)
    loop = T.parallel if parallel else T.serial     # a parallel loop is split into one range per thread

    @T.prim_func(s_tir=True)
    def lookup(table: T.Buffer((256,), dtype), x: T.Buffer(shape, "uint8"), out: T.Buffer(shape, dtype)):
        T.func_attr({"tirx.noalias": True})
        flat_x = T.decl_buffer((n,), "uint8", data=x.data)
        flat_out = T.decl_buffer((n,), dtype, data=out.data)
        for v in loop(vectors):
            flat_out[T.ramp(v * lanes, 1, lanes)] = shuffled(table, flat_x, v * lanes)
        for i in range(tail):
            flat_out[vectors * lanes + i] = table[flat_x[vectors * lanes + i]]

    return lookup
