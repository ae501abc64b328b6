"""A backend's emitter as TVM's external codegen `relax.ext.<name>`, which RunCodegen calls with the
partitioned functions: one C++ source module, compiled and linked into model.so at export."""
from __future__ import annotations

import tvm
import tvm_ffi

from .backend import Backend


def register_codegen(backend: Backend) -> None:
    def codegen(functions, options, constant_names):
        functions = list(functions)
        source = "".join(f"#include <{header}>\n" for header in backend.linkage.headers) + backend.emit(functions)
        # each function and the `_pack` that makes its state at load (see passes.pack_at_load)
        symbols = [f"{f.attrs['global_symbol']}{suffix}" for f in functions for suffix in ("", "_pack")]
        return [tvm.get_global_func("runtime.CSourceModuleCreate")(source, "cc", symbols, [])]

    tvm_ffi.register_global_func(f"relax.ext.{backend.name}", codegen, override=True)
