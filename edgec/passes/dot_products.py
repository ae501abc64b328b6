"""The 8-bit dot products the int8 kernels tensorize with (`intrinsic`), registered with TVM on first use.

TVM has these in `tvm.s_tir.tensor_intrin`, but importing any module of that package imports all of it: some 450
TVMScript functions for CUDA, ROCm, Hexagon, Arm and x86, each parsed at import with an `inspect.stack()` that
grows with the caller's stack. From edgec's command line that import took 68 of a build's first 70 s, for every
build, including ones that fail on their first line. Here the intrinsics are parsed once a kernel needs them.
TVM 0.27's own VNNI one is not usable anyway: it passes `vpdpbusd.512` i32x16 operands, where LLVM 21+ declares it
(i32x16, u8x64, i8x64).
"""
from __future__ import annotations

from typing import NamedTuple

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


class DotProduct(NamedTuple):
    """C[lanes] += A[group] . B[lanes, group] in int32, B int8 in memory, as the instruction of CPUs with `feature`.
    A's group is 32 bits, broadcast to every lane; where A is 16-bit, B's bytes are sign-extended to 16 bits."""
    name: str
    lanes: int
    group: int
    a_dtype: str
    feature: str
    llvm_intrinsic: str
    accumulates: bool        # the instruction adds into C itself (else C + its result)
    instruction: str         # for people: the build summary's int8 kernels line


DOT_PRODUCTS = {"vnni": DotProduct("edgec_dot_16x4_u8i8_vnni", 16, 4, "uint8", "avx512vnni",
                                   "llvm.x86.avx512.vpdpbusd.512", True, "AVX-512 VNNI vpdpbusd"),
                "sdot": DotProduct("edgec_dot_4x4_i8i8_sdot", 4, 4, "int8", "dotprod",
                                   "llvm.aarch64.neon.sdot.v4i32.v16i8", True, "Arm dotprod sdot"),
                # AVX2 without VNNI: vpmaddwd sums pairs of 16-bit products in 32 bits, exact for any 8-bit
                # operands, where vpmaddubsw's 16-bit pair sums (oneDNN's kernels) saturate for full-range weights
                "avx2": DotProduct("edgec_dot_8x2_i16i16_avx2", 8, 2, "int16", "avx2", "llvm.x86.avx2.pmadd.wd",
                                   False, "AVX2 vpmaddwd (16-bit pairs)")}
VECTOR_LOOP = "int32 vector loop"      # the kernels' sums without any of these


def _desc(dot: DotProduct):
    """What the intrinsic computes, for tensorize to match the acc block's inner loops against."""
    lanes, group = dot.lanes, dot.group

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((group,), dot.a_dtype, offset_factor=1), B: T.Buffer((lanes, group), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    return desc


def _impl(dot: DotProduct):
    """One instruction: A's group (32 bits) broadcast to every lane, B's lanes x group bytes, C's lanes int32 sums."""
    lanes, group, elements = dot.lanes, dot.group, dot.lanes * dot.group
    a_vector, b_bytes = f"{dot.a_dtype}x{elements}", f"int8x{elements}"

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((group,), dot.a_dtype, offset_factor=1), B: T.Buffer((lanes, group), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], f"{dot.a_dtype}x{group}"), dtype="int32"), lanes),
                              dtype=a_vector)
            c = C.vload([0], dtype=f"int32x{lanes}")
            if dot.accumulates:     # vpdpbusd, sdot: 8-bit operands
                C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(dot.llvm_intrinsic), c, a, B.vload([0, 0], dtype=b_bytes),
                    dtype=f"int32x{lanes}")
            else:                   # vpmaddwd: 16-bit operands
                C[T.ramp(T.int32(0), 1, lanes)] = c + T.call_llvm_pure_intrin(
                    T.llvm_lookup_intrinsic_id(dot.llvm_intrinsic), a,
                    T.Cast(a_vector, B.vload([0, 0], dtype=b_bytes)), dtype=f"int32x{lanes}")

    return impl


def intrinsic(kind: str) -> str:
    """The registered name of the `kind` dot product (a key of DOT_PRODUCTS), registering it the first time."""
    dot = DOT_PRODUCTS[kind]
    if TensorIntrin.get(dot.name, allow_missing=True) is None:
        TensorIntrin.register(dot.name, _desc(dot), _impl(dot))
    return dot.name
