"""Target descriptors: one TOML file per board (targets/*.toml) drives everything target-specific.

Nothing in the code asks which board it is building for; it reads these fields. A user adds a board
by writing one file and passing its path to --target (or dropping it in ~/.config/edgec/targets/).
"""
from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import EdgecError, last_line
from .resources import data_dir

USER_TARGETS_DIR = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "edgec" / "targets"

# field path -> (allowed python types, required, what to write there). "detect"/"auto" are resolved on load.
_SCHEMA: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "name": ((str,), True, "the board's short name, e.g. \"rpi4\""),
    "description": ((str,), True, "one line describing the board"),
    "arch": ((str,), True, "the CPU architecture: \"x86_64\", \"aarch64\", or \"detect\""),
    "tvm": ((dict,), True, "a [tvm] table"),
    "tvm.target": ((dict,), True, "a TVM target in dict form, e.g. { kind = \"llvm\", mtriple = \"aarch64-linux-gnu\" }"),
    "tvm.host": ((dict,), False, "the host TVM target in dict form (only for GPU targets)"),
    "toolchain": ((dict,), True, "a [toolchain] table"),
    "toolchain.triple": ((str,), True, "the GNU triple, e.g. \"aarch64-linux-gnu\""),
    "toolchain.compiler": ((str,), True, "the C++ compiler command that links the model library"),
    "toolchain.apt_package": ((str,), True, "the Debian package that provides the compiler"),
    "device": ((dict,), True, "a [device] table"),
    "device.threads": ((int, str), True, "the number of worker threads, or \"auto\""),
    "device.memory_mb": ((int, str), True, "the memory budget in MiB, or \"auto\""),
    "emulator": ((dict,), False, "an [emulator] table"),
    "emulator.command": ((str,), True, "the user-mode emulator, e.g. \"qemu-aarch64-static\""),
    "emulator.sysroot": ((str,), True, "the target's library root, e.g. \"/usr/aarch64-linux-gnu\""),
    "emulator.apt_package": ((str,), True, "the Debian package that provides the emulator"),
    "rpc": ((dict,), False, "an [rpc] table"),
    "rpc.key": ((str,), True, "the device key the board registers with at the RPC tracker"),
    "tuning": ((dict,), False, "a [tuning] table"),
    "tuning.trials": ((int,), False, "total MetaSchedule trials"),
    "tuning.trials_per_task": ((int,), False, "MetaSchedule trials per task"),
    "tuning.runner": ((str,), False, "\"local\" or \"rpc\""),
}


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


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    path: Path
    arch: str
    tvm_target: dict
    tvm_host: dict | None
    toolchain: Toolchain
    threads: int
    memory_bytes: int
    emulator: Emulator | None
    rpc_key: str | None
    tuning: dict

    def tvm(self):
        """The tvm.target.Target this descriptor compiles for."""
        import tvm

        try:
            return tvm.target.Target(self.tvm_target, self.tvm_host)
        except Exception as e:
            raise EdgecError(f"{self.path}: field 'tvm.target' is not a valid TVM target ({last_line(e)})",
                             "use the dict form, e.g. { kind = \"llvm\", mtriple = \"aarch64-linux-gnu\" }") from e

    def to_json(self) -> dict:
        return {"name": self.name, "description": self.description, "arch": self.arch,
                "tvm_target": self.tvm_target, "tvm_host": self.tvm_host, "toolchain": asdict(self.toolchain),
                "threads": self.threads, "memory_mb": self.memory_bytes // (1 << 20), "rpc_key": self.rpc_key,
                "emulator": asdict(self.emulator) if self.emulator else None, "tuning": self.tuning,
                "file": str(self.path)}


def _host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _validate(data: dict, path: Path) -> None:
    def fail(field, message, fix):
        raise EdgecError(f"{path}: field '{field}' {message}", fix)

    for field, (types, required, what) in _SCHEMA.items():
        parent, _, key = field.rpartition(".")
        table = data
        for part in filter(None, parent.split(".")):
            table = table.get(part)
        if not isinstance(table, dict):
            continue                                  # the optional parent table is absent
        if key not in table:
            if required:
                fail(field, "is missing", f"add it: {what}")
            continue
        value = table[key]
        if not isinstance(value, types) or isinstance(value, bool):
            fail(field, f"has the wrong type ({type(value).__name__})", f"it must be {what}")
        if isinstance(value, str) and int in types and value != "auto":
            fail(field, f"is '{value}'", f"it must be {what}")
    known_tables = {f.split(".")[0] for f in _SCHEMA}
    for key, value in data.items():
        if key not in known_tables:
            fail(key, "is not a known field", f"known fields: {', '.join(sorted(known_tables))}")
        if isinstance(value, dict) and key != "tvm":
            for sub in value:
                if f"{key}.{sub}" not in _SCHEMA:
                    allowed = [f for f in _SCHEMA if f.startswith(key + ".")]
                    fail(f"{key}.{sub}", "is not a known field", f"known fields here: {', '.join(allowed)}")


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


def load_target_file(path: Path) -> Target:
    try:
        data = tomllib.loads(path.read_text())
    except OSError as e:
        raise EdgecError(f"cannot read target file {path} ({e.strerror})", "check the path") from e
    except tomllib.TOMLDecodeError as e:
        raise EdgecError(f"{path} is not valid TOML ({e})", "fix the syntax at that line") from e
    _validate(data, path)
    device, chain = data["device"], data["toolchain"]
    emulator = Emulator(**data["emulator"]) if "emulator" in data else None
    threads = os.cpu_count() or 1 if device["threads"] == "auto" else device["threads"]
    memory = _host_memory_bytes() if device["memory_mb"] == "auto" else device["memory_mb"] << 20
    arch = platform.machine() if data["arch"] == "detect" else data["arch"]
    return Target(data["name"], data["description"], path, arch, _resolve_detect(data["tvm"]["target"]),
                  data["tvm"].get("host"), Toolchain(**chain), threads, memory, emulator,
                  data.get("rpc", {}).get("key"), data.get("tuning", {}))


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
