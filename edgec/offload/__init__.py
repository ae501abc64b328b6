"""Library offload (BYOC): convolutions and matrix products run in a kernel library instead of TVM's kernels.

A backend (backend.Backend) is one module in `edgec/offload/backends/`, found by listing that package: its
patterns with checks, a C++ emitter registered as TVM's `relax.ext.<name>` codegen, and what the code needs
to link and run. The target descriptor's `[offload] backends` lists them in priority order; `edgec build
--offload` overrides it. The pipeline passes (passes.py) prepare the graph, partition it and generate code;
the build links the libraries and ships them in the bundle.
"""
from __future__ import annotations

import functools
import importlib
import pkgutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..context import OFFLOAD_AUTO
from ..errors import EdgecError
from .backend import Backend, Linkage, Pattern
from .passes import Placement, placement_of

if TYPE_CHECKING:
    from ..targets import Target

__all__ = ["Backend", "Linkage", "Pattern", "Placement", "all_backends", "build_options", "for_build", "for_target",
           "parse_option", "placement_of", "resolve", "ShippedLibrary", "shipped_libraries", "used"]


@functools.cache
def all_backends() -> dict[str, Backend]:
    """Every backend module in edgec/offload/backends, by name; each registers its relax.ext codegen."""
    from . import backends
    from .codegen import register_codegen

    found = {}
    for info in pkgutil.iter_modules(backends.__path__):
        backend = importlib.import_module(f"{backends.__name__}.{info.name}").BACKEND
        register_codegen(backend)
        found[backend.name] = backend
    return found


def parse_option(value: str) -> tuple[str, ...] | str:
    """`--offload none|auto|NAME[,NAME]` as backend names in priority order, or OFFLOAD_AUTO."""
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    if names == ("none",):
        return ()
    if names == (OFFLOAD_AUTO,):
        return OFFLOAD_AUTO
    if not names or {"none", OFFLOAD_AUTO} & set(names):
        raise EdgecError(f"--offload {value!r} is not 'none', 'auto' or a list of backends",
                         f"pass --offload none, auto, or names from: {', '.join(all_backends())}")
    return names


def for_build(target: Target, option: tuple[str, ...] | str | None) -> tuple[str, ...]:
    """The backends a build offloads to: BuildOptions.offload's, else the descriptor's (for auto once it is
    sure it can measure this target's code here)."""
    if option == OFFLOAD_AUTO:
        from .auto import check_target

        check_target(target)
    return for_target(target) if option in (None, OFFLOAD_AUTO) else option


def for_target(target: Target) -> tuple[str, ...]:
    """The descriptor's backends that have a build for its architecture: `host` lists one per architecture."""
    return tuple(b.name for b in resolve(target.offload, None) if b.supports(target.arch))


def resolve(names: tuple[str, ...], arch: str | None, *, fetch: bool = False) -> tuple[Backend, ...]:
    """The backends named, in order; an unknown one, or one without a build for `arch` (if given), is a user
    error. `fetch`: the packages a backend fetches for `arch` are fetched now (once), so that a build fails before
    compiling, not at the link."""
    known = all_backends()
    chosen = []
    for name in names:
        if name not in known:
            raise EdgecError(f"unknown offload backend '{name}'", f"backends: {', '.join(known)}, or none")
        if arch is not None and not known[name].supports(arch):
            raise EdgecError(f"offload backend '{name}' has no {arch} build",
                             f"it supports {', '.join(known[name].linkage.packages)}; pass --offload none")
        if fetch and arch in known[name].linkage.debs:
            from ..toolchain import deb_sysroot

            deb_sysroot(arch, known[name].linkage.debs[arch])
        chosen.append(known[name])
    return tuple(chosen)


def used(placement: tuple[Placement, ...] | None) -> tuple[Backend, ...]:
    """The backends that took at least one operator: the library links and ships only these."""
    names = {p.backend for p in placement or () if p.backend}
    return tuple(b for name, b in all_backends().items() if name in names)


def _lib_dir(backend: Backend, target: Target) -> Path | None:
    """The directory of the backend's libraries in the sysroot edgec fetches for the target (fetched on first
    use), or None when the compiler's own paths have them."""
    from ..toolchain import deb_lib_dir, deb_sysroot

    packages = backend.linkage.debs.get(target.arch)
    return deb_lib_dir(deb_sysroot(target.arch, packages), target.arch) if packages else None


def build_options(backends: tuple[Backend, ...], target: Target) -> list[str]:
    """Compiler options that find the backends' headers and libraries in their fetched sysroots."""
    options = []
    for backend in backends:
        lib_dir = _lib_dir(backend, target)
        if lib_dir is not None:
            # rpath-link: the library's own dependencies (libXNNPACK's libcpuinfo) are found there too
            options += [f"-I{lib_dir.parents[1] / 'include'}", f"-L{lib_dir}", f"-Wl,-rpath-link,{lib_dir}"]
    return options


@dataclass(frozen=True)
class ShippedLibrary:
    soname: str
    path: Path                           # the real file, copied into the bundle's lib/ as `soname`
    package: str | None                  # the Debian package it comes from; None: no package owns it
    notice: Path | None                  # that package's copyright file, shipped beside the library


def shipped_libraries(backends: tuple[Backend, ...], target: Target) -> list[ShippedLibrary]:
    """Each shared library the bundle ships, in load order: from the backend's fetched sysroot, else where the
    target's compiler links from; with the license notice of its package."""
    from ..toolchain import find_tool, package_notice

    found = []
    for backend in backends:
        lib_dir = _lib_dir(backend, target)
        for soname in backend.linkage.ship:
            if any(soname == known.soname for known in found):
                continue
            if lib_dir is not None:
                path = lib_dir / soname
                hint = f"delete {lib_dir.parents[2]} and build again, or run: sudo sh cross/setup-{target.arch}.sh"
            else:
                compiler = find_tool(target.toolchain.compiler, target.toolchain.apt_package)
                path = Path(subprocess.run([compiler, f"-print-file-name={soname}"], capture_output=True,
                                           text=True).stdout.strip())
                hint = f"install it: sudo apt-get install {backend.linkage.packages[target.arch]}"
            if not path.is_absolute() or not path.is_file():
                raise EdgecError(f"{lib_dir or target.toolchain.compiler} has no {soname}, which the "
                                 f"'{backend.name}' offload code needs in the bundle", hint)
            sysroot = lib_dir.parents[2] if lib_dir is not None else None
            notice = package_notice(path.resolve(), sysroot.resolve() if sysroot else None)
            found.append(ShippedLibrary(soname, path.resolve(), *(notice or (None, None))))
    return found
