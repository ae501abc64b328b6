"""The 8-bit dot products the int8 kernels tensorize with (`intrinsic`), registered with TVM on first use.

TVM has these in `tvm.s_tir.tensor_intrin`, but importing any module of that package imports all of it: some 450
TVMScript functions for CUDA, ROCm, Hexagon, Arm and x86, each parsed at import with an `inspect.stack()` that
grows with the caller's stack. From edgec's command line that import took 68 of a build's first 70 s, for every
build, including ones that fail on their first line. Here the two intrinsics are parsed once a kernel needs them.
TVM 0.27's own VNNI one is not usable anyway: it passes `vpdpbusd.512` i32x16 operands, where LLVM 21+ declares it
(i32x16, u8x64, i8x64).
"""
from __future__ import annotations

from typing import NamedTuple

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


class DotProduct(NamedTuple):
    """C[lanes] += A[4] . B[lanes, 4] in int32, B int8, as one instruction of CPUs with `feature`."""
    name: str
    lanes: int
    a_dtype: str
    feature: str
    llvm_intrinsic: str


DOT_PRODUCTS = {"vnni": DotProduct("edgec_dot_16x4_u8i8_vnni", 16, "uint8", "avx512vnni",
                                   "llvm.x86.avx512.vpdpbusd.512"),
                "sdot": DotProduct("edgec_dot_4x4_i8i8_sdot", 4, "int8", "dotprod",
                                   "llvm.aarch64.neon.sdot.v4i32.v16i8")}


def _desc(lanes: int, a_dtype: str):
    """What the intrinsic computes, for tensorize to match the acc block's inner loops against."""

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), a_dtype, offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _impl(lanes: int, a_dtype: str, llvm_intrinsic: str):
    """One instruction: A's 4 bytes broadcast to every lane, B's lanes x 4 bytes, C's lanes int32 sums."""
    a_vector, b_vector = f"{a_dtype}x{4 * lanes}", f"int8x{4 * lanes}"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((4,), a_dtype, offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{a_dtype}x4"), dtype="int32"), lanes),
                              dtype=a_vector)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(llvm_intrinsic), C.vload([0], dtype=f"int32x{lanes}"), a,
                B.vload([0, 0], dtype=b_vector), dtype=f"int32x{lanes}")

    return impl


def intrinsic(kind: str) -> str:
    """The registered name of the `kind` dot product ("vnni" or "sdot"), registering it the first time."""
    dot = DOT_PRODUCTS[kind]
    if TensorIntrin.get(dot.name, allow_missing=True) is None:
        TensorIntrin.register(dot.name, _desc(dot.lanes, dot.a_dtype),
                              _impl(dot.lanes, dot.a_dtype, dot.llvm_intrinsic))
    return dot.name
