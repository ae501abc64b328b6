"""exp, erf, tanh and sigmoid on float32 as arithmetic a vector loop can hold.

TVM's LLVM code generation turns each of them into a call of the C library (expf, erff; tanh and sigmoid through
expf) per element: a vectorized loop over them is unpacked lane by lane around scalar calls (a GELU over 16 x 256
values: 16 us; as the polynomials below, under 1 us). The replacements are the usual single-precision ones:
exp with a two-constant ln 2 reduction and Cephes' polynomial (within 1.5 ulp; 0 below x = -86.9, where the result
is under 1.8e-38), erf and tanh as Eigen's rational approximations (within 6 ulp: 3.8e-7 and 2.8e-7 absolute),
errors of the kind onnxruntime's own kernels (MLAS) have. NaN stays NaN, infinities give the limits.

A fused QDQ chain converts each 8-bit value back: dequantize(quantize(x)) is float(int32(uint8(clamp(round(x / s)
+ z, 0, 255))) - z) * s, and the uint8 in the middle makes a float vector loop pack its lanes to bytes and unpack
them again (PP-OCRv4 det's neck kernel: 0.37 ms, 0.24 without). Where the value converted is an integer-valued float
already inside the 8-bit range, the round trip is the identity and is dropped: bit for bit the same values.
"""
from __future__ import annotations

import tvm
import tvm_ffi
from tvm import tirx

_F32 = "float32"


def _c(value: float) -> tirx.FloatImm:
    return tirx.const(value, _F32)


def _horner(x: tirx.PrimExpr, coefficients) -> tirx.PrimExpr:
    """c[0] * x^(n-1) + ... + c[n-1]."""
    result = _c(coefficients[0])
    for c in coefficients[1:]:
        result = result * x + _c(c)
    return result


def _clamp(x, lo: float, hi: float):
    return tirx.max(tirx.min(x, _c(hi)), _c(lo))


def _keep_nan(x, value):
    return tirx.Select(tirx.isnan(x), x, value)


def exp(x: tirx.PrimExpr) -> tirx.PrimExpr:
    xc = _clamp(x, -86.9, 88.72283)
    n = tirx.floor(xc * _c(1.44269504088896341) + _c(0.5))
    r = xc - n * _c(0.693359375) + n * _c(2.12194440e-4)   # ln 2 in two parts: n * 0.693359375 is exact
    p = _horner(r, (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1,
                    5.0000001201e-1)) * r * r + r + _c(1.0)
    # p * 2^n with 2^(n - 1) from its float bits (n + 126 in [1, 254]), then * 2: n = 128 does not overflow
    half_scale = tirx.reinterpret(_F32, (n.astype("int32") + 126) << 23)
    value = tirx.Select(x > _c(88.72283), _c(float("inf")),
                        tirx.Select(x < _c(-86.9), _c(0.0), p * half_scale * _c(2.0)))
    return _keep_nan(x, value)


def erf(x: tirx.PrimExpr) -> tirx.PrimExpr:
    xc = _clamp(x, -4.0, 4.0)
    x2 = xc * xc
    p = xc * _horner(x2, (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
                          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
                          -1.60960333262415e-02))
    q = _horner(x2, (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
                     -7.37332916720468e-03, -1.42647390514189e-02))
    return _keep_nan(x, p / q)


def tanh(x: tirx.PrimExpr) -> tirx.PrimExpr:
    xc = _clamp(x, -7.90531110763549805, 7.90531110763549805)
    x2 = xc * xc
    p = xc * _horner(x2, (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11,
                          5.12229709037114e-08, 1.48572235717979e-05, 6.37261928875436e-04,
                          4.89352455891786e-03))
    q = _horner(x2, (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03))
    # below 4e-4, tanh(x) is x in float32 (and x/1 keeps -0)
    return _keep_nan(x, tirx.Select(tirx.abs(x) < _c(0.0004), x, p / q))


def sigmoid(x: tirx.PrimExpr) -> tirx.PrimExpr:
    return _c(1.0) / (_c(1.0) + exp(-x))


_REPLACEMENTS = {tvm.ir.Op.get(f"tirx.{f.__name__}"): f for f in (exp, erf, tanh, sigmoid)}


_INTEGRAL_CALLS = {tvm.ir.Op.get(f) for f in ("tirx.round", "tirx.nearbyint", "tirx.floor", "prim.ceil", "tirx.trunc")}
_EIGHT_BIT_RANGE = {"uint8": (0, 255), "int8": (-128, 127)}


def _integral(e) -> bool:
    """Whether float `e` always holds an integer (or NaN): a sum of integers rounds to one, as every float32 from
    2^24 up is an integer."""
    if isinstance(e, tirx.FloatImm):
        return float(e.value).is_integer()
    if isinstance(e, tvm.ir.Call):
        return e.op in _INTEGRAL_CALLS
    if isinstance(e, (tirx.Add, tirx.Sub, tirx.Max, tirx.Min)):
        return _integral(e.a) and _integral(e.b)
    return False


def _bounds(e) -> tuple[float, float] | None:
    """The constant range a clamp (max of min, or min of max) keeps float `e` in."""
    lo = hi = None
    while isinstance(e, (tirx.Max, tirx.Min)) and isinstance(e.b, tirx.FloatImm):
        if isinstance(e, tirx.Max) and lo is None:
            lo = e.b.value
        elif isinstance(e, tirx.Min) and hi is None:
            hi = e.b.value
        else:
            break
        e = e.a
    return None if lo is None or hi is None else (lo, hi)


def _round_trip(e) -> tirx.PrimExpr | None:
    """The float32 value `e` converts, where `e` is float32(int32(int8 or uint8(v))) and v an integer in that range."""
    if not (isinstance(e, tirx.Cast) and str(e.ty.dtype) == _F32 and isinstance(e.value, tirx.Cast)
            and str(e.value.ty.dtype) == "int32" and isinstance(e.value.value, tirx.Cast)):
        return None
    v = e.value.value.value
    bounds, limits = _bounds(v), _EIGHT_BIT_RANGE.get(str(e.value.value.ty.dtype))
    if str(v.ty.dtype) != _F32 or limits is None or bounds is None or not _integral(v) \
            or not limits[0] <= bounds[0] <= bounds[1] <= limits[1]:
        return None
    return v


def _without_round_trip(cast: tirx.Cast) -> tirx.PrimExpr:
    """float32(int32(uint8(v)) -+ z) as v -+ z, and float32(int32(uint8(v))) as v (small integers: exact)."""
    kept = _round_trip(cast)
    if kept is not None:
        return kept
    inner = cast.value
    if str(cast.ty.dtype) == _F32 and isinstance(inner, (tirx.Add, tirx.Sub)) and isinstance(inner.b, tirx.IntImm) \
            and abs(inner.b.value) <= 255:
        kept = _round_trip(tirx.Cast(_F32, inner.a))
        if kept is not None:
            zero = tirx.const(float(inner.b.value), _F32)
            return kept + zero if isinstance(inner, tirx.Add) else kept - zero
    return cast


def vectorizable_math(func: tirx.PrimFunc) -> tirx.PrimFunc:
    """`func` with every float32 exp, erf, tanh and sigmoid call replaced by its arithmetic form, and 8-bit round
    trips of integer-valued floats dropped."""
    def replace(call: tvm.ir.Call):
        f = _REPLACEMENTS.get(call.op)
        if f is None or getattr(call.ty, "dtype", None) != _F32 or len(call.args) != 1:
            return call
        x = tirx.Var("x", _F32)   # the argument is used several times: computed once
        return tirx.Let(x, call.args[0], f(x))

    return tvm_ffi.structural_map(func, [(tvm.ir.Call, replace), (tirx.Cast, _without_round_trip)])
