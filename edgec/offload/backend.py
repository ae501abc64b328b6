"""What an offload backend is: patterns with checks, a C++ emitter, and what its code needs to link and run."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tvm import relax
from tvm.relax.dpl import DFPattern


@dataclass(frozen=True)
class Linkage:
    """What the emitted C++ needs at build time and in the bundle."""
    headers: tuple[str, ...]             # the library's headers, included ahead of the emitted code
    libs: tuple[str, ...]                # linker flags, placed after the objects (TVM puts options before them)
    packages: dict[str, str]             # architecture -> Debian package with the headers and libraries
    ship: tuple[str, ...]                # sonames copied into the bundle's lib/, dependencies first (load order)


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
class Backend:
    name: str                            # codegen name: the functions go to relax.ext.<name>
    description: str
    patterns: Callable[[], list[Pattern]]          # most specific first: FuseOpsByPattern takes them in order
    layouts: dict[str, list[str]]                  # ConvertLayout's desired layouts, e.g. conv2d: NHWC, OIHW
    emit: Callable[[list[relax.Function]], str]    # one C++ source for the partitioned functions
    linkage: Linkage

    def supports(self, arch: str) -> bool:
        return arch in self.linkage.packages
