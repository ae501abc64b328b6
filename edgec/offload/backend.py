"""What an offload backend is: patterns with checks, a C++ emitter, and what its code needs to link and run."""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Callable

import tvm
from tvm import relax
from tvm.relax.dpl import DFPattern


@dataclass(frozen=True)
class Linkage:
    """What the emitted C++ needs at build time and in the bundle."""
    headers: tuple[str, ...]             # the library's headers, included ahead of the emitted code
    libs: tuple[str, ...]                # linker flags, placed after the objects (TVM puts options before them)
    packages: dict[str, str]             # architecture -> Debian package with the headers and libraries
    ship: tuple[str, ...]                # sonames copied into the bundle's lib/, dependencies first (load order)
    # architecture -> Debian packages fetched with `apt-get download` and extracted into a sysroot in edgec's cache
    # (never installed: arm64 libraries are not co-installable with the host's); the build compiles and links
    # against it and ships the libraries from it. Architectures absent here use the compiler's own paths.
    debs: dict[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class Pattern:
    """One composite the backend takes: `name` is "<backend>.<anchor>_<post-op>_...", which its emitter reads."""
    name: str
    pattern: DFPattern
    annotations: dict[str, DFPattern]
    # None when the match can run in the library, else the reason it stays in TVM
    check: Callable[[relax.transform.PatternCheckContext], str | None]
    anchor: str                          # the operator the build summary counts, e.g. "relax.nn.conv2d"


@dataclass(frozen=True)
class Int8Limits:
    """The int8 chains a backend's integer kernels sum exactly on some CPU; the others stay in TVM."""
    weight_max: int                      # the largest |weight| its products take without saturating
    activations: tuple[str, ...]         # the input types it takes
    why: str


@dataclass(frozen=True)
class Operands:
    """A partitioned function's parameters by index, as its emitted functions take them: `packed` by
    `<symbol>_pack` at load (constants), `runtime` by `<symbol>` at each call; any other is read by neither (a zero
    point or scale the pattern's check fixed), so it is not passed nor stored."""
    packed: tuple[int, ...]
    runtime: tuple[int, ...]

    def pack_position(self, operand: int | None) -> int:
        """`operand`'s index among `<symbol>_pack`'s arguments (`packed` in order); -1 for None."""
        return -1 if operand is None else self.packed.index(operand)

    def run_position(self, operand: int | None) -> int:
        """`operand`'s index among `<symbol>`'s arguments (the state, `runtime` in order, the output); -1 for None."""
        return -1 if operand is None else self.runtime.index(operand) + 1

    @property
    def run_count(self) -> int:
        """How many arguments `<symbol>` takes: the output is the last."""
        return len(self.runtime) + 2


@dataclass(frozen=True)
class Backend:
    name: str                            # codegen name: the functions go to relax.ext.<name>
    description: str
    patterns: Callable[[], list[Pattern]]          # most specific first: FuseOpsByPattern takes them in order
    layouts: dict[str, list[str]]                  # ConvertLayout's desired layouts, e.g. conv2d: NHWC, OIHW
    emit: Callable[[list[relax.Function]], str]    # one C++ source for the partitioned functions
    # which parameters of a partitioned function its emitted `<symbol>_pack` and `<symbol>` take (see passes.py)
    operands: Callable[[relax.Function], Operands]
    linkage: Linkage
    # int8 chains in QDQ form (quantized.py), partitioned before constant folding would make their weights float
    quantized_patterns: Callable[[], list[Pattern]] = lambda: []
    # which int8 chains its integer kernels compute exactly on a TVM target (None: every one its patterns take)
    int8_limits: Callable[[tvm.target.Target], Int8Limits | None] = lambda target: None

    def supports(self, arch: str) -> bool:
        return arch in self.linkage.packages


def c_float(value: float) -> str:
    """A float as a C++ float literal (infinities included) for emitted code."""
    return ("-" if value < 0 else "") + "INFINITY" if math.isinf(value) else f"{value!r}f"


def state_type_key(backend: str, prelude: str) -> str:
    """The tvm-ffi type key of a backend's per-call-site state object. Type keys are process-wide: the digest of the
    C++ that defines the object keeps libraries from other edgec versions, loaded together, from taking each other's
    objects for their own."""
    return f"edgec.{backend}.State.{hashlib.sha256(prelude.encode()).hexdigest()[:16]}"


# C++ shared by the emitters: the size of TVM's thread pool, which every library's threads follow so that --threads
# governs both, and the switch that runs TVM's kernels on the library's pool.
CPP_HELPERS = r"""
#include <tvm/runtime/c_backend_api.h>
// TVM's kernels start their parallel loops through these pointers, globals of model.so that TVM's loader points at
// its own pool whenever it loads the library. Weak: a model without parallel kernels (or barriers) has none.
extern "C" {
extern int (*__TVMBackendParallelLaunch)(FTVMParallelLambda, void*, int) __attribute__((weak));
extern int (*__TVMBackendParallelBarrier)(int, TVMParallelGroupEnv*) __attribute__((weak));
// where the linker put this library's first and past its last byte (hidden: never another library's)
extern const char __ehdr_start[] __attribute__((visibility("hidden")));
extern const char _end[] __attribute__((visibility("hidden")));
}

namespace edgec_offload {
inline int NumThreads() {
  static const auto num_threads = tvm::ffi::Function::GetGlobal("runtime.NumThreads");
  return num_threads ? (*num_threads)().cast<int>() : 1;
}

// Runs the parallel loops of TVM's kernels in this model.so through `launch`, on the library's pool: one pool per
// process, as two pools spinning against each other in turn cost 10-100x once other processes want the cores.
// Called by every _pack, so by the model's load function, after TVM's loader has set the pointers (a reload of the
// library resets them: its load function then sets them again). A model whose kernels use TVM's barrier keeps
// TVM's pool: a kernel running while the library is reloaded could pair one pool's launch with the other's barrier.
// So does one whose pointer the dynamic linker resolved to another library's (loaded RTLD_GLOBAL before it), whose
// kernels would otherwise call into this library after it is unloaded.
inline void RunTvmKernelsOn(int (*launch)(FTVMParallelLambda, void*, int)) {
  const char* pointer = reinterpret_cast<const char*>(&__TVMBackendParallelLaunch);
  if (pointer != nullptr && pointer >= __ehdr_start && pointer < _end && &__TVMBackendParallelBarrier == nullptr)
    __atomic_store_n(&__TVMBackendParallelLaunch, launch, __ATOMIC_RELEASE);
}

// The C ABI functions TVM calls by a call site's symbol (`exported` in backend.py) go through these, out of line:
// TVM_FFI_DLL_EXPORT_TYPED_FUNC converts each argument in line, 4.2 KB of code per call site (45 sites, 0.19 MB of
// PP-OCRv4 det's int8 model.so).
using SiteBody = void (*)(const TVMFFIAny* args, tvm::ffi::Any* result);
inline int CallSite(const char* name, const TVMFFIAny* args, int32_t num_args, int32_t expected, TVMFFIAny* result,
                    SiteBody body) {
  TVM_FFI_SAFE_CALL_BEGIN();
  if (num_args != expected) TVM_FFI_THROW(TypeError) << name << " takes " << expected << " arguments, not " << num_args;
  body(args, reinterpret_cast<tvm::ffi::Any*>(result));
  TVM_FFI_SAFE_CALL_END();
}

[[gnu::noinline]] inline tvm::ffi::TensorView TensorArg(const TVMFFIAny* args, int32_t index) {
  return reinterpret_cast<const tvm::ffi::AnyView*>(args)[index].cast<tvm::ffi::TensorView>();
}

// The call's state, borrowed (TVM holds it for the call): a reference's release in line was 300 bytes per call site.
// Null if it is not a T.
template <typename T>
[[gnu::noinline]] T* StateArg(const TVMFFIAny* args) {
  const tvm::ffi::Object* state = reinterpret_cast<const tvm::ffi::AnyView*>(args)[0].cast<tvm::ffi::ObjectRef>().get();
  return state && state->IsInstance<T>() ? const_cast<T*>(static_cast<const T*>(state)) : nullptr;
}
}  // namespace edgec_offload
"""


def run_export(symbol: str, operands: Operands, arguments: Callable[[Callable[[int], str], str], str]) -> str:
    """`<symbol>`, a call site's run function: TVM calls it with (state, the operands `runtime` in order, out), and it
    calls the backend's Run(state, "<symbol>", ...) (state: its State, null if it is not one) with
    `arguments(tensor, out)`, C++ expressions built from tensor(operand index) and the output, each a
    tvm::ffi::TensorView."""
    def tensor(i: int) -> str:
        return f"edgec_offload::TensorArg(args, {operands.run_position(i)})"

    out = f"edgec_offload::TensorArg(args, {operands.run_count - 1})"
    return exported(symbol, operands.run_count,
                    f'Run(edgec_offload::StateArg<State>(args), "{symbol}", {arguments(tensor, out)});')


def exported(symbol: str, arguments: int, body: str) -> str:
    """`__tvm_ffi_<symbol>`, the C ABI function TVM calls by `symbol`: it checks that it was given `arguments`
    arguments, then runs `body`, C++ statements that read them as `args` (edgec_offload::TensorArg(args, i),
    StateArg<State>(args)) and may set `*result`."""
    return f"""extern "C" TVM_FFI_DLL_EXPORT int __tvm_ffi_{symbol}(void*, const TVMFFIAny* args, int32_t n, TVMFFIAny* result) {{
  return edgec_offload::CallSite("{symbol}", args, n, {arguments}, result,
                                 [](const TVMFFIAny* args, tvm::ffi::Any* result) {{ {body} }});
}}
"""
