"""Target descriptors: one TOML file per board (targets/*.toml) drives everything target-specific.

Nothing in the code asks which board it is building for; it reads these fields. A user adds a board
by writing one file and passing its path to --target (or dropping it in ~/.config/edgec/targets/).

The same schema serves both sides of a bundle: `Target.to_json()` is the resolved descriptor written into
manifest.json, and `Target.from_json()` validates it again when a bundle is run, so nothing a runner executes
(a compiler, an emulator) is taken from a manifest unchecked.
"""
from __future__ import annotations

import os
import platform
import posixpath
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgecError, last_line
from .resources import data_dir

USER_TARGETS_DIR = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "edgec" / "targets"

# Device kind -> the TVM target kind that generates code for it. A GPU target also needs a host target.
DEVICE_KINDS = {"cpu": "llvm", "cuda": "cuda", "opencl": "opencl", "vulkan": "vulkan", "metal": "metal", "rocm": "rocm"}
DEFAULT_RUNTIME_LIBS = ("libtvm_runtime.so", "libtvm_ffi.so")
# PassContext options every build starts from; a descriptor's tvm.pass_config overrides them. No argument checks in
# the kernels: TVM's packed API checks each tensor's type, rank, dtype, shape, strides and device at every call, 60%
# of the kernels' code (PP-OCRv4 det fp32: 152 -> 58 KB), and the only caller is the model's own VM program, whose
# arguments the compiler made to fit; the model's inputs are still checked by main (shapes and dtypes).
DEFAULT_PASS_CONFIG = {"tirx.disable_assert": True}
# A command a runner executes must be a bare name looked up on PATH: no path, no spaces, no shell syntax.
_COMMAND = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_LIBRARY = re.compile(r"^lib[A-Za-z0-9._+-]+\.so(\.[0-9]+)*$")

# field path -> (allowed python types, required, what to write there). "detect"/"auto" are resolved on load.
_SCHEMA: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "name": ((str,), True, "the board's short name, e.g. \"rpi4\""),
    "description": ((str,), True, "one line describing the board"),
    "arch": ((str,), True, "the CPU architecture: \"x86_64\", \"aarch64\", or \"detect\""),
    "tvm": ((dict,), True, "a [tvm] table"),
    "tvm.target": ((dict,), True, "a TVM target in dict form, e.g. { kind = \"llvm\", mtriple = \"aarch64-linux-gnu\" }"),
    "tvm.host": ((dict,), False, "the host TVM target in dict form (only for GPU targets)"),
    "tvm.pass_config": ((dict,), False, "TVM PassContext options, e.g. { \"tir.disable_vectorize\" = false }"),
    "toolchain": ((dict,), True, "a [toolchain] table"),
    "toolchain.triple": ((str,), True, "the GNU triple, e.g. \"aarch64-linux-gnu\""),
    "toolchain.compiler": ((str,), True, "the C++ compiler command that links the model library, e.g. \"g++\""),
    "toolchain.apt_package": ((str,), True, "the Debian package that provides the compiler"),
    "device": ((dict,), True, "a [device] table"),
    "device.kind": ((str,), False, f"where the model runs: one of {', '.join(DEVICE_KINDS)} (default cpu)"),
    "device.threads": ((int, str), True, "the number of worker threads, or \"auto\""),
    "device.memory_mb": ((int, str), True, "the memory budget in MiB, or \"auto\""),
    "device.runtime_libs": ((list,), False, "shared libraries a bundle needs on the board, e.g. [\"libtvm_runtime.so\"]"),
    "device.fp16": ((bool,), False, "true when the device computes in fp16 natively (Armv8.2-A FP16 CPUs, GPUs): "
                    "--quantize fp16 builds only for such targets (default false)"),
    "emulator": ((dict,), False, "an [emulator] table"),
    "emulator.command": ((str,), True, "the user-mode emulator command, e.g. \"qemu-aarch64-static\""),
    "emulator.sysroot": ((str,), True, "the target's library root, an absolute path, e.g. \"/usr/aarch64-linux-gnu\""),
    "emulator.apt_package": ((str,), True, "the Debian package that provides the emulator"),
    "emulator.cpu": ((str,), False, "the CPU model the emulator runs (qemu's QEMU_CPU), e.g. \"cortex-a72\""),
    "offload": ((dict,), False, "an [offload] table"),
    "offload.backends": ((list,), True, "library backends in priority order, e.g. [\"onednn\"] (edgec build "
                         "--offload lists them)"),
    "rpc": ((dict,), False, "an [rpc] table"),
    "rpc.key": ((str,), True, "the device key the board registers with at the RPC tracker"),
    "tuning": ((dict,), False, "a [tuning] table"),
    "tuning.trials": ((int,), False, "total MetaSchedule trials"),
    "tuning.trials_per_task": ((int,), False, "MetaSchedule trials per task"),
    "tuning.runner": ((str,), False, "\"local\" or \"rpc\""),
}
# Accepted so descriptors can carry them today, read by nothing yet: `edgec targets show` says so.
NOT_USED_YET = {"rpc": "remote runs over the TVM RPC tracker are not implemented yet",
                "tuning": "auto-tuning is not implemented yet; builds use TVM's default schedules"}


@dataclass(frozen=True)
class Toolchain:
    triple: str
    compiler: str
    apt_package: str


@dataclass(frozen=True)
class Emulator:
    command: str
    sysroot: str
    apt_package: str
    cpu: str | None = None           # the CPU model the emulator runs, None: its default


@dataclass(frozen=True)
class Device:
    kind: str                        # a DEVICE_KINDS key
    threads: int
    memory_mb: int
    runtime_libs: tuple[str, ...]
    fp16: bool = False               # fp16 arithmetic in hardware: --quantize fp16 is offered

    @property
    def memory_bytes(self) -> int:
        return self.memory_mb << 20


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    origin: str                      # the descriptor file, or the manifest it was read back from
    arch: str
    tvm_target: dict
    tvm_host: dict | None
    pass_config: dict
    toolchain: Toolchain
    device: Device
    emulator: Emulator | None
    rpc_key: str | None = None
    tuning: dict = field(default_factory=dict)
    offload: tuple[str, ...] = ()    # library backends (edgec.offload) in priority order

    @property
    def tvm_pass_config(self) -> dict:
        """The PassContext options a build runs under: edgec's defaults, then the descriptor's."""
        return {**DEFAULT_PASS_CONFIG, **self.pass_config}

    def tvm(self):
        """The tvm.target.Target this descriptor compiles for."""
        import tvm

        try:
            return tvm.target.Target(self.tvm_target, self.tvm_host)
        except Exception as e:  # TVM raises ValueError, TypeError or its own errors for a bad dict
            raise EdgecError(f"{self.origin}: field 'tvm.target' is not a valid TVM target ({last_line(e)})",
                             "use the dict form, e.g. { kind = \"llvm\", mtriple = \"aarch64-linux-gnu\" }") from e

    def to_json(self) -> dict:
        """The resolved descriptor in the TOML file's own shape ("detect"/"auto" replaced by their values)."""
        d = {"name": self.name, "description": self.description, "arch": self.arch,
             "tvm": {"target": self.tvm_target, **({"host": self.tvm_host} if self.tvm_host else {}),
                     **({"pass_config": self.pass_config} if self.pass_config else {})},
             "toolchain": vars(self.toolchain).copy(),
             "device": {"kind": self.device.kind, "threads": self.device.threads, "memory_mb": self.device.memory_mb,
                        "runtime_libs": list(self.device.runtime_libs),
                        **({"fp16": True} if self.device.fp16 else {})}}
        if self.emulator:
            d["emulator"] = {k: v for k, v in vars(self.emulator).items() if v is not None}
        if self.offload:
            d["offload"] = {"backends": list(self.offload)}
        if self.rpc_key:
            d["rpc"] = {"key": self.rpc_key}
        if self.tuning:
            d["tuning"] = dict(self.tuning)
        return d

    @classmethod
    def from_json(cls, data: dict, origin: str) -> "Target":
        """Read back a resolved descriptor (a manifest's "target"), validating it like a TOML file."""
        if not isinstance(data, dict):
            raise EdgecError(f"{origin}: 'target' is not an object", "rebuild the bundle with this edgec")
        return _from_table(data, origin)

    def not_used_yet(self) -> dict[str, str]:
        """Tables this descriptor sets that nothing reads yet, with the reason."""
        present = {"rpc": self.rpc_key is not None, "tuning": bool(self.tuning)}
        return {table: why for table, why in NOT_USED_YET.items() if present[table]}


def _host_memory_mb() -> int:
    return (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) >> 20


def _validate(data: dict, origin: str) -> None:
    def fail(field, message, fix):
        raise EdgecError(f"{origin}: field '{field}' {message}", fix)

    for field_path, (types, required, what) in _SCHEMA.items():
        parent, _, key = field_path.rpartition(".")
        table = data
        for part in filter(None, parent.split(".")):
            table = table.get(part)
        if not isinstance(table, dict):
            continue                                  # the optional parent table is absent
        if key not in table:
            if required:
                fail(field_path, "is missing", f"add it: {what}")
            continue
        value = table[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            fail(field_path, f"has the wrong type ({type(value).__name__})", f"it must be {what}")
        if isinstance(value, str) and int in types and value != "auto":
            fail(field_path, f"is '{value}'", f"it must be {what}")
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            fail(field_path, f"is {value}", f"it must be {what}, above 0")
    known_tables = {f.split(".")[0] for f in _SCHEMA}
    for key, value in data.items():
        if key not in known_tables:
            fail(key, "is not a known field", f"known fields: {', '.join(sorted(known_tables))}")
        if isinstance(value, dict) and key != "tvm":
            for sub in value:
                if f"{key}.{sub}" not in _SCHEMA:
                    allowed = [f for f in _SCHEMA if f.startswith(key + ".")]
                    fail(f"{key}.{sub}", "is not a known field", f"known fields here: {', '.join(allowed)}")
    for key in data["tvm"]:
        if f"tvm.{key}" not in _SCHEMA:
            fail(f"tvm.{key}", "is not a known field", "known fields here: tvm.target, tvm.host, tvm.pass_config")
    _validate_commands(data, fail)
    _validate_device(data, fail)
    for backend in data.get("offload", {}).get("backends", []):
        if not isinstance(backend, str) or not _COMMAND.match(backend):
            fail("offload.backends", f"holds {backend!r}", "list backend names, e.g. \"onednn\"")


def _validate_commands(data: dict, fail) -> None:
    """Whatever a runner executes later must be a bare command name and the sysroot a plain absolute path."""
    for table, key in (("toolchain", "compiler"), ("emulator", "command")):
        value = data.get(table, {}).get(key)
        if value is not None and not _COMMAND.match(value):
            fail(f"{table}.{key}", f"is {value!r}, not a bare command name",
                 "name a command found on PATH, e.g. \"aarch64-linux-gnu-g++\" (no paths, spaces or arguments)")
    cpu = data.get("emulator", {}).get("cpu")
    if cpu is not None and not _COMMAND.match(cpu):
        fail("emulator.cpu", f"is {cpu!r}, not a CPU model name", "name one of the emulator's CPU models, e.g. "
             "\"cortex-a72\" (qemu-aarch64-static -cpu help lists them)")
    sysroot = data.get("emulator", {}).get("sysroot")
    if sysroot is not None and (not sysroot.startswith("/") or posixpath.normpath(sysroot) != sysroot):
        fail("emulator.sysroot", f"is {sysroot!r}, not an absolute normalised path",
             "write the absolute directory, e.g. \"/usr/aarch64-linux-gnu\"")


def _validate_device(data: dict, fail) -> None:
    device, tvm_table = data["device"], data["tvm"]
    kind = device.get("kind", "cpu")
    if kind not in DEVICE_KINDS:
        fail("device.kind", f"is '{kind}'", f"it must be one of {', '.join(DEVICE_KINDS)}")
    target_kind = tvm_table["target"].get("kind")
    if target_kind != DEVICE_KINDS[kind]:
        fail("tvm.target", f"has kind '{target_kind}', which does not generate code for a {kind} device",
             f"use kind = \"{DEVICE_KINDS[kind]}\", or set device.kind to match")
    if kind != "cpu" and "host" not in tvm_table:
        fail("tvm.host", "is missing", "a GPU target needs the host CPU's target, e.g. { kind = \"llvm\" }")
    for lib in device.get("runtime_libs", []):
        if not isinstance(lib, str) or not _LIBRARY.match(lib):
            fail("device.runtime_libs", f"holds {lib!r}", "list shared library file names, e.g. \"libOpenCL.so.1\"")


def _resolve_detect(tvm_target: dict) -> dict:
    """'detect' asks LLVM for this machine's CPU and triple (TVM's own "native" silently means generic)."""
    resolved = dict(tvm_target)
    if "detect" in (resolved.get("mcpu"), resolved.get("mtriple")):
        import tvm

        if resolved.get("mcpu") == "detect":
            resolved["mcpu"] = tvm.target.codegen.llvm_get_system_cpu()
        if resolved.get("mtriple") == "detect":
            # LLVM's own answer names the distribution it was built on (x86_64-conda-linux-gnu).
            resolved["mtriple"] = f"{platform.machine()}-linux-gnu"
    if resolved.get("num-cores") == "auto":
        resolved["num-cores"] = os.cpu_count() or 1
    return resolved


def _from_table(data: dict, origin: str) -> Target:
    _validate(data, origin)
    device, chain, tvm_table = data["device"], data["toolchain"], data["tvm"]
    emulator = Emulator(**data["emulator"]) if "emulator" in data else None
    threads = (os.cpu_count() or 1) if device["threads"] == "auto" else device["threads"]
    memory_mb = _host_memory_mb() if device["memory_mb"] == "auto" else device["memory_mb"]
    arch = platform.machine() if data["arch"] == "detect" else data["arch"]
    return Target(data["name"], data["description"], origin, arch, _resolve_detect(tvm_table["target"]),
                  tvm_table.get("host"), dict(tvm_table.get("pass_config", {})), Toolchain(**chain),
                  Device(device.get("kind", "cpu"), threads, memory_mb,
                         tuple(device.get("runtime_libs", DEFAULT_RUNTIME_LIBS)), device.get("fp16", False)),
                  emulator, data.get("rpc", {}).get("key"), dict(data.get("tuning", {})),
                  tuple(data.get("offload", {}).get("backends", ())))


def load_target_file(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise EdgecError(f"cannot read target file {path} ({e.strerror})", "check the path") from e
    except UnicodeDecodeError as e:
        raise EdgecError(f"target file {path} is not UTF-8 text (byte {e.start})",
                         "save the descriptor as UTF-8") from e
    except tomllib.TOMLDecodeError as e:
        raise EdgecError(f"{path} is not valid TOML ({e})", "fix the syntax at that line") from e
    return _from_table(data, str(path))


def target_files() -> dict[str, Path]:
    """Built-in descriptors, overridden by the user's own of the same file name."""
    found = {}
    for directory in (data_dir("targets"), USER_TARGETS_DIR):
        if directory.is_dir():
            found.update({p.stem: p for p in sorted(directory.glob("*.toml"))})
    return found


def load_target(name_or_path: str) -> Target:
    """Look a target up by name (rpi4) or load it from a path (boards/my-board.toml)."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise EdgecError(f"target file {path} does not exist", "check the path, or pass a target name")
        return load_target_file(path)
    files = target_files()
    if name_or_path not in files:
        raise EdgecError(f"unknown target '{name_or_path}'",
                         f"known targets: {', '.join(sorted(files))}; or pass a path to your own .toml")
    return load_target_file(files[name_or_path])


def all_targets() -> list[Target]:
    return [load_target_file(p) for p in target_files().values()]
