"""The one place where edgec finds external tools: compilers, cmake, qemu and the TVM runtime libraries."""
from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EdgecError, last_stderr_line
from .fsutil import atomic_write, new_dir

if TYPE_CHECKING:
    from .targets import Target

# The pip platform tag of the TVM runtime wheels per architecture. Compilers and emulators are not here:
# they come from the target descriptor (its [toolchain] and [emulator] tables, copied into the manifest).
_WHEEL_PLATFORMS = {"x86_64": "manylinux_2_28_x86_64", "aarch64": "manylinux_2_28_aarch64"}
# The runtime .so files do not depend on the Python version; pip just needs one that has wheels.
_WHEEL_PYTHON = "3.11"
# Debian's name for each architecture, and its multiarch library directory (usr/lib/<dir>).
_DEBIAN_ARCH = {"x86_64": ("amd64", "x86_64-linux-gnu"), "aarch64": ("arm64", "aarch64-linux-gnu")}
_OWNERS = "edgec-owners.json"   # in a deb_sysroot: file path -> the package it came from
# LLVM's names of the instruction-set extensions (x86, then Arm), by prefix, that it may use in generated code
# without an intrinsic asking for them (vector units, bit manipulation, atomics): code built for one stops with
# SIGILL on a CPU without it. Crypto, CRC and the like are left out: LLVM emits them only for their intrinsics, which
# no kernel calls, and a CPU may lack them where LLVM's CPU model lists them (the Raspberry Pi 4's Cortex-A72 has no
# AES). LLVM's other CPU features (fast-*, slow-*, fuse-*...) only tune code generation.
_ISA_FEATURE = re.compile(r"(avx|amx|sse|ssse3|fma|f16c|bmi|lzcnt|popcnt|movbe|gfni"
                          r"|neon|sve|sme|dotprod|i8mm|bf16|fullfp16|fp16fml|lse|rcpc|rdm)")


def cache_dir() -> Path:
    """$EDGEC_CACHE_DIR, or ~/.cache/edgec."""
    env = os.environ.get("EDGEC_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "edgec"


def find_tool(command: str, apt_package: str) -> str:
    """Absolute path of an executable on PATH, or an EdgecError naming the apt package that provides it."""
    path = shutil.which(command)
    if path is None:
        raise EdgecError(f"{command} not found", f"install it with: sudo apt-get install {apt_package}")
    return path


def host_arch() -> str:
    """The machine this process runs on: "x86_64" or "aarch64"."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def cpu_features(tvm_target) -> list[str]:
    """The instruction-set extensions a tvm.target.Target's code may use, by LLVM's names, sorted: what a CPU must
    have to run it (the manifest's cpu_features, which the runners check). Nothing for a GPU target, whose host code is
    generic."""
    from tvm.target import codegen

    if tvm_target.kind.name != "llvm":
        return []
    return sorted(f for f in codegen.llvm_get_cpu_features(tvm_target) if _ISA_FEATURE.match(f))


def features_this_cpu_lacks(tvm_target) -> list[str]:
    """The instruction-set extensions a tvm.target.Target's code may use that this machine's CPU lacks."""
    import tvm
    from tvm.target import codegen

    here = tvm.target.Target({"kind": "llvm", "mtriple": codegen.llvm_get_system_triple(),
                              "mcpu": codegen.llvm_get_system_cpu()})
    return sorted(set(cpu_features(tvm_target)) - set(cpu_features(here)))


def _check_arch(arch: str) -> str:
    if arch not in _WHEEL_PLATFORMS:
        raise EdgecError(f"no TVM runtime for architecture '{arch}'",
                         f"edgec runs bundles for {' and '.join(_WHEEL_PLATFORMS)}; TVM publishes no runtime wheels "
                         "for others")
    return _WHEEL_PLATFORMS[arch]


def tvm_versions() -> tuple[str, str]:
    """Installed (apache-tvm, apache-tvm-ffi) versions: the runtime must match the compiler that built the bundle.
    The one place edgec looks them up (the manifest's "versions" too)."""
    try:
        return importlib.metadata.version("apache-tvm"), importlib.metadata.version("apache-tvm-ffi")
    except importlib.metadata.PackageNotFoundError as e:
        raise EdgecError(f"{e.name} is not installed", f"install it with: pip install {e.name}") from e


def runtime_dir(arch: str) -> Path:
    """A dir with lib/libtvm_runtime.so, lib/libtvm_ffi.so and include/ (tvm-ffi + dlpack headers) for `arch`."""
    _check_arch(arch)
    tvm_v, ffi_v = tvm_versions()
    if arch == host_arch():
        return _host_runtime_dir(tvm_v, ffi_v)
    final = cache_dir() / "runtime" / f"{arch}-tvm{tvm_v}-ffi{ffi_v}"
    if not (final / "lib" / "libtvm_runtime.so").is_file():
        _fetch_runtime(arch, tvm_v, ffi_v, final)
    return final


def _host_runtime_dir(tvm_v: str, ffi_v: str) -> Path:
    """Symlinks into the installed wheels; keyed by their location so two venvs never share a (dangling) dir."""
    # find_spec locates the packages without importing them (importing tvm takes seconds)
    tvm_pkg, ffi_pkg = (Path(importlib.util.find_spec(m).origin).parent for m in ("tvm", "tvm_ffi"))
    sources = {"lib/libtvm_runtime.so": tvm_pkg / "lib" / "libtvm_runtime.so",
               "lib/libtvm_ffi.so": ffi_pkg / "lib" / "libtvm_ffi.so",
               "include": ffi_pkg / "include"}
    for src in sources.values():
        if not src.exists():
            raise EdgecError(f"the installed TVM wheels lack {src}",
                             f"reinstall them: pip install apache-tvm=={tvm_v} apache-tvm-ffi=={ffi_v}")
    key = hashlib.sha256(str(tvm_pkg.resolve()).encode()).hexdigest()[:12]
    final = cache_dir() / "runtime" / f"{host_arch()}-tvm{tvm_v}-ffi{ffi_v}-{key}"
    if not final.is_dir():
        with new_dir(final) as tmp:
            for rel, src in sources.items():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                (tmp / rel).symlink_to(src)
    return final


def _fetch_runtime(arch: str, tvm_v: str, ffi_v: str, final: Path) -> None:
    """pip-download the target's wheels and extract only the runtime libs and the tvm-ffi headers."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--platform", _check_arch(arch), "--python-version", _WHEEL_PYTHON,
           f"apache-tvm=={tvm_v}", f"apache-tvm-ffi=={ffi_v}"]
    with new_dir(final) as tmp:
        wheels = tmp / "wheels"
        proc = subprocess.run([*cmd, "--dest", str(wheels)], capture_output=True, text=True)
        if proc.returncode != 0:
            last = last_stderr_line(proc.stderr, "no output")
            raise EdgecError(f"could not download the {arch} TVM runtime wheels ({last})",
                             "check the network and that these versions have wheels for the target; "
                             f"the command was: {' '.join(cmd)}")
        wanted = {"tvm/lib/libtvm_runtime.so": "lib/libtvm_runtime.so",
                  "tvm_ffi/lib/libtvm_ffi.so": "lib/libtvm_ffi.so"}
        for whl in wheels.glob("*.whl"):
            with zipfile.ZipFile(whl) as z:
                for name in z.namelist():
                    if name.startswith("tvm_ffi/include/") and not name.endswith("/"):
                        dest = tmp / "include" / name[len("tvm_ffi/include/"):]
                    elif name in wanted:
                        dest = tmp / wanted[name]
                    else:
                        continue
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(name) as src, open(dest, "wb") as out:
                        shutil.copyfileobj(src, out)
        missing = [rel for rel in (*wanted.values(), "include/tvm/ffi/function.h") if not (tmp / rel).is_file()]
        if missing:
            raise EdgecError(f"the {arch} TVM wheels lack {', '.join(missing)}", "the wheel layout changed; "
                             "pin apache-tvm and apache-tvm-ffi to versions edgec supports")
        shutil.rmtree(wheels)


def deb_sysroot(arch: str, packages: tuple[str, ...]) -> Path:
    """A directory holding the Debian packages for `arch` extracted as they would be installed (usr/include,
    usr/lib/<multiarch>/), fetched with `apt-get download` on first use and cached. They are never installed:
    arm64 library packages are not co-installable with the host's. Needs apt to know the architecture
    (`dpkg --add-architecture`, then `apt-get update`: root, done by cross/setup-aarch64.sh); the download
    itself does not need root."""
    if arch not in _DEBIAN_ARCH:
        raise EdgecError(f"no Debian architecture for '{arch}'", f"edgec fetches packages for {', '.join(_DEBIAN_ARCH)}")
    deb_arch = _DEBIAN_ARCH[arch][0]
    # v2: with the record of which package holds which file
    key = hashlib.sha256("\0".join(["v2", *sorted(packages)]).encode()).hexdigest()[:12]
    final = cache_dir() / "sysroots" / f"{arch}-{key}"
    if final.is_dir():
        return final
    apt_get, dpkg_deb = find_tool("apt-get", "apt"), find_tool("dpkg-deb", "dpkg")
    fix = (f"run: sudo sh cross/setup-{arch}.sh" if arch == "aarch64" else
           f"run: sudo dpkg --add-architecture {deb_arch} && sudo apt-get update")
    with new_dir(final) as tmp:
        debs = tmp / "debs"
        debs.mkdir()
        proc = subprocess.run([apt_get, "download", *(f"{p}:{deb_arch}" for p in packages)], cwd=debs,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            last = last_stderr_line(proc.stderr, f"exit code {proc.returncode}")
            raise EdgecError(f"could not download the {deb_arch} packages {' '.join(packages)} ({last})", fix)
        owners = {}
        for deb in sorted(debs.glob("*.deb")):
            listing = subprocess.run([dpkg_deb, "-f", str(deb), "Package"], capture_output=True, text=True)
            proc = subprocess.run([dpkg_deb, "-x", str(deb), str(tmp)], capture_output=True, text=True)
            contents = subprocess.run([dpkg_deb, "--fsys-tarfile", str(deb)], capture_output=True)
            if proc.returncode or listing.returncode or contents.returncode:
                raise EdgecError(f"could not extract {deb.name} ({last_stderr_line(proc.stderr, 'no output')})", fix)
            with tarfile.open(fileobj=io.BytesIO(contents.stdout)) as tar:
                owners.update({os.path.normpath(name): listing.stdout.strip() for name in tar.getnames()})
        (tmp / _OWNERS).write_text(json.dumps(owners, sort_keys=True))
        shutil.rmtree(debs)
    return final


def package_notice(path: Path, sysroot: Path | None = None) -> tuple[str, Path] | None:
    """(Debian package, its copyright file) for a library file: of the package installed here that owns it, or
    of the fetched package it came from when `sysroot` (a deb_sysroot) holds it. None when no package owns it
    (a library built by hand). Bundles ship the file with the library: the licenses require the notice."""
    if sysroot is not None:
        owners = json.loads((sysroot / _OWNERS).read_text())
        package = owners.get(path.relative_to(sysroot).as_posix())
        doc_root = sysroot
    else:
        dpkg = shutil.which("dpkg")
        proc = subprocess.run([dpkg, "-S", str(path)], capture_output=True, text=True) if dpkg else None
        package = proc.stdout.split(":", 1)[0] if proc and proc.returncode == 0 else None
        doc_root = Path("/")
    notice = doc_root / "usr" / "share" / "doc" / (package or "") / "copyright"
    return (package, notice) if package and notice.is_file() else None


def deb_lib_dir(sysroot: Path, arch: str) -> Path:
    """Where a deb_sysroot holds the architecture's shared libraries."""
    return sysroot / "usr" / "lib" / _DEBIAN_ARCH[arch][1]


# The runner's sources, the same bytes in every bundle of one edgec version (templates/bundle).
RUNNER_SOURCES = ("main.cc", "CMakeLists.txt")


def build_runner(bundle_dir: Path, target: Target) -> Path:
    """Build the bundle's edgec_run with the target's compiler via cmake. Cached by the sources, compiler and
    runtime dir: main.cc is the same in every bundle, so this builds once per architecture.

    `target` is a validated Target (Target.from_json of the manifest), so the compiler is a bare command name,
    resolved on PATH here. The sources are read once: the bytes hashed for the cache key are the bytes built.
    That they are the bundle's own, unmodified, is for the caller to check (api.run verifies the bundle)."""
    bundle_dir = Path(bundle_dir)
    sources = {}
    for name in RUNNER_SOURCES:
        try:
            sources[name] = (bundle_dir / name).read_bytes()
        except OSError as e:
            raise EdgecError(f"cannot read bundle file {bundle_dir / name} ({e.strerror})",
                             "copy the whole bundle directory") from e
    cmake = find_tool("cmake", "cmake")
    cxx = find_tool(target.toolchain.compiler, target.toolchain.apt_package)
    rt = runtime_dir(target.arch)
    h = hashlib.sha256(f"{target.arch}\0{cxx}\0{rt}\0".encode())
    for data in sources.values():
        h.update(hashlib.sha256(data).digest())
    runner = cache_dir() / "runners" / f"edgec_run-{target.arch}-{h.hexdigest()[:16]}"
    if runner.is_file():
        return runner
    # Build in a scratch dir: the bundle stays untouched and a failed build leaves nothing behind.
    with tempfile.TemporaryDirectory(prefix="edgec-build-") as tmp:
        src_dir, build_dir = Path(tmp) / "src", Path(tmp) / "build"
        src_dir.mkdir()
        for name, data in sources.items():
            (src_dir / name).write_bytes(data)
        configure = [cmake, "-S", str(src_dir), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                     f"-DTVM_RUNTIME_DIR={rt}", f"-DCMAKE_CXX_COMPILER={cxx}"]
        if target.arch != host_arch():
            configure += ["-DCMAKE_SYSTEM_NAME=Linux", f"-DCMAKE_SYSTEM_PROCESSOR={target.arch}"]
        for step in (configure, [cmake, "--build", str(build_dir), "--parallel", "2"]):
            proc = subprocess.run(step, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
                raise EdgecError(f"building the {target.arch} runner failed:\n{tail}",
                                 f"check {bundle_dir / 'main.cc'} and the compiler {cxx}")
        runner.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(runner, (build_dir / "edgec_run").read_bytes(), mode=0o777)
    return runner


def emulator_command(target: Target) -> list[str]:
    """Command prefix that runs the target's binaries here: [] natively, else its emulator with its sysroot.

    `target` is a validated Target: the emulator is a bare command name (resolved on PATH here) and the sysroot
    an absolute, normalised path, which must also be an existing directory on this machine."""
    if target.arch == host_arch():
        return []
    emulator = target.emulator
    if emulator is None:
        raise EdgecError(f"target {target.name} is {target.arch} and its descriptor names no emulator",
                         "add an [emulator] table to the descriptor, or run the bundle on the board")
    command = find_tool(emulator.command, emulator.apt_package)
    if not os.path.isdir(emulator.sysroot):
        raise EdgecError(f"the {target.arch} sysroot {emulator.sysroot} does not exist",
                         f"install the target's C++ runtime: sudo apt-get install {target.toolchain.apt_package}")
    return [command, "-L", emulator.sysroot]


def emulator_env(target: Target) -> dict[str, str]:
    """Environment for the emulator: the descriptor's CPU model (QEMU_CPU, as qemu-user reads it), so that the
    library kernels chosen at run time by the CPU's features are the board's."""
    emulator = target.emulator
    if target.arch == host_arch() or emulator is None or emulator.cpu is None:
        return {}
    return {"QEMU_CPU": emulator.cpu}


if __name__ == "__main__":
    # `python -m edgec.toolchain fetch-runtime ARCH`: pre-fetch a runtime; `fetch-offload ARCH`: the sysroots of
    # the offload backends with packages for ARCH (cross/setup-aarch64.sh calls both).
    if len(sys.argv) != 3 or sys.argv[1] not in ("fetch-runtime", "fetch-offload"):
        sys.exit("usage: python -m edgec.toolchain fetch-runtime|fetch-offload ARCH")
    try:
        if sys.argv[1] == "fetch-runtime":
            print(runtime_dir(sys.argv[2]))
        else:
            from .offload import all_backends

            for backend in all_backends().values():
                if sys.argv[2] in backend.linkage.debs:
                    print(deb_sysroot(sys.argv[2], backend.linkage.debs[sys.argv[2]]))
    except EdgecError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
