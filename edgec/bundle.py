"""Write a bundle: library, params, manifest, runners and README, rendered from templates/bundle.

Everything (and with --archive, BUNDLE.tar.gz) is written into a staging directory next to the bundle and
checked, then both are swapped into place at once: a failure at any step publishes nothing, and a previous
bundle at the same path stays intact until the new one is complete.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jinja2
import numpy as np

from . import __version__, fsutil
from .build import CompiledModel, export_library
from .errors import EdgecError
from .manifest import (MANIFEST_NAME, BundleTensor, FileEntry, Manifest, SampleDirs, StateRecord, not_verified,
                       sha256_file)
from .offload import shipped_libraries, used
from .offload.auto import manifest_decisions
from .resources import data_dir
from .runtime import bundle_runner
from .signature import tensor_file
from .toolchain import cpu_features

LIBRARY_NAME = "model.so"
SHARED_LIB_DIR = "lib"     # libraries model.so needs that a stock board lacks (offload backends'); see its rpath
PARAMS_NAME = "params.bin"
STATES_NAME = "states.bin"  # a streaming model's initial state values, keyed by state input name
# Copied byte for byte into every bundle: they read everything model-specific from manifest.json.
RUNNERS = ("run.py", "main.cc", "CMakeLists.txt")


@dataclass(frozen=True)
class Sample:
    """A sample input with the reference runtime's outputs for it, shipped in sample/; both keyed by the
    model's input and output names."""
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    reference: str                   # e.g. "onnxruntime 1.31.1"


def _versions() -> dict:
    from .toolchain import tvm_versions

    tvm, tvm_ffi = tvm_versions()
    return {"edgec": __version__, "tvm": tvm, "tvm_ffi": tvm_ffi}


class _Verbatim(str):
    """Template output that is already safe where it is placed (see _shell_word)."""


# What gives text a meaning in CommonMark, GitHub's extensions (tables, strikethrough, math, autolinks) or
# inline HTML, when the text is not at the start of a line (README.md.j2 never starts a line with a value):
# those characters, "_" unless inside a word, the "." of "www.", and a leading "#", "+", "-" or "=".
_MARKDOWN_SPECIAL = re.compile(r"[\\`*\[\]<>&|~$:@!]|(?<![A-Za-z0-9])_|_(?![A-Za-z0-9])|(?i:(?<=www)\.)|^[#+=-]")
_HTML_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def _markdown_text(value) -> str:
    """Every {{ value }} in README.md.j2 (jinja2 `finalize`): literal Markdown text on one line, whatever a
    model, a file name or a descriptor put in it. Control characters (newlines too) are shown escaped."""
    if isinstance(value, _Verbatim):
        return value
    text = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(value))
    return _MARKDOWN_SPECIAL.sub(lambda m: _HTML_ENTITIES.get(m[0], "\\" + m[0]), text)


def _shell_word(value: str, placeholder: str) -> _Verbatim:
    """`value` where a shell command in README.md shows it, if it is one harmless word; else `placeholder`."""
    return _Verbatim(value if re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._+-]*", value) else placeholder)


def _shape(dims) -> str:
    """A shape as README.md shows it: [1, 3, 224, 224], a dimension the model computes at run time (the manifest's
    null) as ?."""
    return "[" + ", ".join("?" if d is None else str(d) for d in dims) + "]"


def _render_all(out: Path, context: dict) -> None:
    """Copy the runners and render README.md, the one template, with every value escaped as Markdown text."""
    source = data_dir("templates") / "bundle"
    for name in RUNNERS:
        shutil.copyfile(source / name, out / name)
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(source), undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True, finalize=_markdown_text)
    env.filters["shell_word"] = _shell_word
    env.filters["shape"] = _shape
    (out / "README.md").write_text(env.get_template("README.md.j2").render(**context))


def _some(paths: list[str]) -> str:
    shown = bundle_runner().shown
    return ", ".join(map(shown, paths[:3])) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _older_bundle(out_dir: Path) -> dict | None:
    """The file list of a bundle written by an older edgec (an earlier format version), which runners refuse but
    edgec may replace: a manifest whose "files" has the current form. None for anything else."""
    runner = bundle_runner()
    try:
        data = json.loads((out_dir / MANIFEST_NAME).read_bytes().decode("utf-8"), object_pairs_hook=runner._unique_keys)
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    version = data.get("format_version") if isinstance(data, dict) else None
    if not (isinstance(version, int) and not isinstance(version, bool) and 1 <= version < runner.FORMAT_VERSION):
        return None
    files = data.get("files")
    if runner._problem(files, runner._SCHEMA["files"], "files") or MANIFEST_NAME in files:
        return None
    return {"files": files}


def _prepare_destination(out_dir: Path, force: bool) -> None:
    """Refuse an -o that edgec may not replace. A new path or an empty directory is fine; an existing bundle
    only when it is intact: its manifest parses and it holds exactly the listed files, each unchanged
    (`force` accepts changed listed files, never an unlisted one)."""
    runner = bundle_runner()
    where = runner.shown(str(out_dir))
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise EdgecError(f"-o {where} exists and is not a directory", "pick a new or empty directory for -o")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / MANIFEST_NAME).exists():
            found = runner.survey(out_dir, {"files": {}})
            foreign = found["unlisted"] + found["links"] or ["(empty directories)"]
            raise EdgecError(f"{where} holds files edgec did not write: {_some(foreign)}",
                             "pick another -o or move them")
        try:
            manifest = runner.load_manifest(out_dir)
        except runner.BundleError as e:
            manifest = _older_bundle(out_dir)
            if manifest is None:
                raise EdgecError(f"{where} holds a {MANIFEST_NAME} that is not an edgec bundle's ({e.message})",
                                 "pick another -o or move its files; edgec replaces only its own bundles") from None
        found = runner.survey(out_dir, manifest)
        foreign = found["unlisted"] + found["links"]
        if foreign:
            raise EdgecError(f"{where} holds files edgec did not write: {_some(foreign)}",
                             "pick another -o or move them")
        modified = found["resized"] + found["changed"]
        if modified and not force:
            raise EdgecError(f"{where} is an edgec bundle whose files were modified: {_some(modified)}",
                             "pass --force to replace it anyway, or pick another -o")


# ELF e_machine of each architecture a descriptor may name
_ELF_MACHINES = {"x86_64": 62, "aarch64": 183, "armv7l": 40, "armv6l": 40, "riscv64": 243, "i686": 3}


def _check_library(path: Path, target) -> None:
    """A compiler can exit 0 without writing its output (a wrapper script, a full disk): before anything is
    published, the library must be a non-empty ELF file for the target's machine."""
    compiler = target.toolchain.compiler
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except FileNotFoundError:
        head = b""
    if not head:
        raise EdgecError(f"{compiler} exited successfully but wrote no model library",
                         "check the target descriptor's [toolchain] compiler")
    if len(head) < 20 or head[:4] != b"\x7fELF":
        raise EdgecError(f"{compiler} wrote a model library that is not an ELF file",
                         "check the target descriptor's [toolchain] compiler")
    machine = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    expected = _ELF_MACHINES.get(target.arch)
    if expected is not None and machine != expected:
        raise EdgecError(f"{compiler} wrote a model library for another machine (ELF machine {machine}, "
                         f"{target.arch} is {expected})",
                         f"the descriptor's compiler must target {target.arch}, e.g. {target.toolchain.triple}-g++")


def archive_path(out_dir: Path) -> Path:
    """Where --archive writes: BUNDLE.tar.gz next to the bundle."""
    out_dir = Path(out_dir).resolve()
    return out_dir.with_name(out_dir.name + ".tar.gz")


def check_outputs(out_dir: Path, archive: bool, force: bool) -> None:
    """Refuse at once what a build could otherwise refuse only after compiling: a directory that cannot be
    written to, an -o edgec may not replace, an existing archive without --force."""
    # absolute, not resolved: an -o that is a symlink must be seen as one (and refused), not followed
    out_dir = Path(os.path.abspath(out_dir))
    _prepare_destination(out_dir, force)
    parent = next(p for p in out_dir.parents if p.exists())
    if not os.access(parent, os.W_OK):
        why = "read-only file system" if os.statvfs(parent).f_flag & os.ST_RDONLY else "permission denied"
        raise EdgecError(f"cannot write in {parent} ({why})", "pick a directory you can write to for -o")
    if archive:
        fsutil.check_overwrite(archive_path(out_dir), force, "--archive")


def write_archive(bundle_dir: Path, archive: Path, bundle_name: str) -> Path:
    """Pack a (staged) bundle as a .tar.gz whose top directory is `bundle_name`."""
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_name)
    return archive


def _publish(staging: Path, out_dir: Path, archive: Path | None) -> None:
    """Swap the staged bundle, and its archive, into place: both or neither. The previous bundle ends up in
    the staging dir, which is removed after."""
    with fsutil.uninterrupted():
        fsutil.swap_in(staging / "bundle", out_dir)
        if archive is not None:
            try:
                os.replace(staging / archive.name, archive)
            except BaseException:
                fsutil.swap_in(out_dir, staging / "bundle")
                raise


def write_bundle(compiled: CompiledModel, out_dir: Path, sample: Sample | None = None, *,
                 verify: Callable[[Path], dict] | None = None, archive: bool = False, force: bool = False) -> Manifest:
    """Export the library and write the whole bundle to out_dir (and with `archive`, OUT.tar.gz), atomically.

    `verify(staged_bundle_dir)` runs the complete staged bundle before anything is published and returns the
    manifest's "verification" entry (or raises, and nothing is published)."""
    out_dir = Path(os.path.abspath(out_dir))
    check_outputs(out_dir, archive, force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tarball = archive_path(out_dir) if archive else None
    try:
        with fsutil.staging_dir(out_dir) as staging:
            bundle = staging / "bundle"
            bundle.mkdir()
            artifacts = _write_artifacts(compiled, bundle, sample)
            manifest = _describe(compiled, bundle, out_dir.name, sample, artifacts, not_verified("not run"))
            if verify is not None:
                manifest = _describe(compiled, bundle, out_dir.name, sample, artifacts, verify(bundle))
            if tarball is not None:
                write_archive(bundle, staging / tarball.name, out_dir.name)
            _publish(staging, out_dir, tarball)
    except Exception as e:
        user = fsutil.as_user_error(e, out_dir.parent, Path(tempfile.gettempdir()))
        if user is None:
            raise
        raise user from e
    return manifest


def _text(name: str) -> str:
    """A file-derived name as valid Unicode: bytes a file name may hold that are not UTF-8 become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _write_artifacts(compiled: CompiledModel, tmp: Path, sample: Sample | None):
    """The library, the shared libraries it needs (lib/), params.bin and sample/; returns (params file name, input
    and output tensors, sample dirs, shared libraries in load order)."""
    import tvm

    model = compiled.model
    export_library(compiled, tmp / LIBRARY_NAME)
    _check_library(tmp / LIBRARY_NAME, compiled.target)
    shared_libs = []
    for lib in shipped_libraries(used(compiled.offload), compiled.target):
        (tmp / SHARED_LIB_DIR).mkdir(exist_ok=True)
        shutil.copyfile(lib.path, tmp / SHARED_LIB_DIR / lib.soname)
        shared_libs.append(f"{SHARED_LIB_DIR}/{lib.soname}")
        if lib.notice is not None:   # the libraries' licenses ask for their notice in every binary copy
            shutil.copyfile(lib.notice, tmp / SHARED_LIB_DIR / f"{lib.soname}.copyright")
    params_name = None
    if compiled.params:
        params_name = PARAMS_NAME
        tvm.runtime.save_param_dict_to_file({k: tvm.runtime.tensor(v) for k, v in compiled.params.items()},
                                            str(tmp / PARAMS_NAME))
    if model.states:
        tvm.runtime.save_param_dict_to_file({s.input: tvm.runtime.tensor(s.initial) for s in model.states},
                                            str(tmp / STATES_NAME))
    inputs = tuple(BundleTensor(s.name, s.shape, s.dtype, tensor_file(i, s.name)) for i, s in enumerate(model.inputs))
    outputs = tuple(BundleTensor(s.name, s.shape, s.dtype, tensor_file(i, s.name)) for i, s in enumerate(model.outputs))
    dirs = None
    if sample is not None:
        dirs = SampleDirs()
        for sub, tensors, arrays in ((dirs.inputs, inputs, sample.inputs), (dirs.expected, outputs, sample.expected)):
            (tmp / sub).mkdir(parents=True)
            for t in tensors:
                np.save(tmp / sub / t.file, arrays[t.name])
    return params_name, inputs, outputs, dirs, tuple(shared_libs)


def _describe(compiled: CompiledModel, tmp: Path, bundle_name: str, sample: Sample | None, artifacts,
              verification: dict) -> Manifest:
    """The runners, README.md and manifest.json over the artifacts already in `tmp` (again after verification,
    whose result the README and the manifest state)."""
    model, target = compiled.model, compiled.target
    params_name, inputs, outputs, dirs, shared_libs = artifacts
    versions = _versions()
    model_name, model_file = _text(model.name), _text(model.path.name)
    features = tuple(cpu_features(target.tvm()))
    _render_all(tmp, {
        "model_name": model_name, "model_file": model_file, "bundle_name": bundle_name, "target": target.to_json(),
        "versions": versions, "params": params_name, "param_mb": f"{compiled.param_bytes / 1e6:.2f}",
        "inputs": [t.to_json() for t in inputs], "outputs": [t.to_json() for t in outputs],
        "run_time_dims": any(None in t.shape for t in outputs),
        "sample": dirs is not None, "reference": sample.reference if sample else None, "verification": verification,
        "states": [s.to_json() for s in model.states], "cpu_features": features,
    })
    files = {p.relative_to(tmp).as_posix(): FileEntry.of(p) for p in sorted(tmp.rglob("*"))
             if p.is_file() and p.name != MANIFEST_NAME}
    manifest = Manifest(
        model_name=model_name, model_file=model_file, model_sha256=sha256_file(model.path), entry="main",
        load_function=compiled.load,
        inputs=inputs, outputs=outputs, library=LIBRARY_NAME, params=params_name, target=target, versions=versions,
        passes=tuple(r.name for r in compiled.passes), sample=dirs, verification=verification, files=files,
        shared_libs=shared_libs, cpu_features=features,
        offload_auto=manifest_decisions(compiled.offload), quantization=compiled.quantization,
        states=tuple(StateRecord(s.name, s.input, s.output) for s in model.states),
        initial_states=STATES_NAME if model.states else None)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest
