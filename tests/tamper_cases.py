"""Ways to damage or tamper with a bundle, shared by the tests of every runner (run.py, edgec run, edgec_run).

CASES maps a case name to a function that mutates a copy of a valid bundle in place. Every runner must then
refuse the bundle before loading anything: exit code 2, one `error:` line naming what is wrong (the case's
MENTIONS words), no traceback. Each case breaks exactly one rule of docs/bundle-format.md, so a runner that
skips that rule runs the bundle and the test fails.
"""
from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def _write_manifest(bundle: Path, manifest: dict) -> None:
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def _flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _relist(bundle: Path, rel: str) -> None:
    """Make the manifest agree with the file as it is now: what someone who edits both would do."""
    m = _manifest(bundle)
    data = (bundle / rel).read_bytes()
    m["files"][rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    _write_manifest(bundle, m)


def edited_param_byte(bundle: Path) -> None:
    _flip_byte(bundle / "params.bin", (bundle / "params.bin").stat().st_size - 1)


def swapped_library(bundle: Path) -> None:
    """Another library of the same size: only the sha256 tells them apart."""
    _flip_byte(bundle / "model.so", (bundle / "model.so").stat().st_size // 2)


def truncated_params(bundle: Path) -> None:
    path = bundle / "params.bin"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def missing_params(bundle: Path) -> None:
    (bundle / "params.bin").unlink()


def manifest_drops_a_file(bundle: Path) -> None:
    m = _manifest(bundle)
    del m["files"]["README.md"]
    _write_manifest(bundle, m)


def absolute_path(bundle: Path) -> None:
    m = _manifest(bundle)
    m["files"]["/etc/hostname"] = m["files"]["README.md"]
    _write_manifest(bundle, m)


def dotdot_path(bundle: Path) -> None:
    m = _manifest(bundle)
    m["files"]["sample/../../outside.txt"] = m["files"]["README.md"]
    _write_manifest(bundle, m)


def symlink_out(bundle: Path) -> None:
    """README.md moved out of the bundle and linked back: same bytes, but read from outside."""
    outside = bundle.parent / f"{bundle.name}-outside-README.md"
    (bundle / "README.md").rename(outside)
    (bundle / "README.md").symlink_to(outside)


def unlisted_extra_file(bundle: Path) -> None:
    (bundle / "sample" / "extra.txt").write_text("not from edgec\n")


def truncated_manifest(bundle: Path) -> None:
    path = bundle / "manifest.json"
    path.write_bytes(path.read_bytes()[:200])


def duplicate_manifest_key(bundle: Path) -> None:
    """JSON parsers keep the last of two equal keys; a second "params" would silently win."""
    text = (bundle / "manifest.json").read_text()
    (bundle / "manifest.json").write_text(text.replace('"entry":', '"params": null,\n  "entry":', 1))


def old_format_version(bundle: Path) -> None:
    m = _manifest(bundle)
    m["format_version"] = 1
    _write_manifest(bundle, m)


def wrong_field_type(bundle: Path) -> None:
    m = _manifest(bundle)
    m["inputs"][0]["shape"] = "1x3x8x8"
    _write_manifest(bundle, m)


def library_not_shared_object(bundle: Path) -> None:
    """TVM's load_module would hand a .tar to a C compiler: only a .so may be named."""
    (bundle / "model.so").rename(bundle / "model.tar")
    m = _manifest(bundle)
    m["library"] = "model.tar"
    m["files"]["model.tar"] = m["files"].pop("model.so")
    _write_manifest(bundle, m)


def garbage_library(bundle: Path) -> None:
    """A library that passes every file check (the manifest re-hashed) but is not a library at all."""
    (bundle / "model.so").write_bytes(b"\x7fELF this is not a shared object" * 64)
    _relist(bundle, "model.so")


def garbage_params(bundle: Path) -> None:
    (bundle / "params.bin").write_bytes(b"not a TVM parameter file" * 8)
    _relist(bundle, "params.bin")


CASES: dict[str, Callable[[Path], None]] = {f.__name__: f for f in (
    edited_param_byte, swapped_library, truncated_params, missing_params, manifest_drops_a_file, absolute_path,
    dotdot_path, symlink_out, unlisted_extra_file, truncated_manifest, duplicate_manifest_key, old_format_version,
    wrong_field_type, library_not_shared_object, garbage_library, garbage_params)}

# Words the one error line must hold for each case: the file or field at fault.
MENTIONS: dict[str, tuple[str, ...]] = {
    "edited_param_byte": ("params.bin", "sha256"),
    "swapped_library": ("model.so", "sha256"),
    "truncated_params": ("params.bin", "size"),
    "missing_params": ("params.bin", "missing"),
    "manifest_drops_a_file": ("README.md",),
    "absolute_path": ("/etc/hostname",),
    "dotdot_path": ("outside.txt",),
    "symlink_out": ("README.md", "link"),
    "unlisted_extra_file": ("sample/extra.txt",),
    "truncated_manifest": ("manifest.json",),
    "duplicate_manifest_key": ("manifest.json", "params"),
    "old_format_version": ("format version", "1"),
    "wrong_field_type": ("inputs[0].shape",),
    "library_not_shared_object": ("library",),
    "garbage_library": ("model.so",),
    "garbage_params": ("params.bin",),
}
# Cases a size check alone must refuse, so --no-verify does not let them through.
SIZE_CASES = ("truncated_params",)
