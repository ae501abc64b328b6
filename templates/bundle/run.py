#!/usr/bin/env python3
"""Runs an edgec bundle with the TVM runtime's Python API, after checking every file against manifest.json.

This file is the same in every bundle of one edgec version: everything model-specific (signature, entry
function, device, file names, tolerance) is read from manifest.json at run time, as data. edgec itself runs
its own copy of this file for `edgec run` and `edgec bench`, so what edgec tests is what ships.

Needs Python 3.9+, numpy, and the TVM runtime wheels named in manifest.json "versions":
    pip install numpy apache-tvm==VERSION apache-tvm-ffi==VERSION
Usage:
    python3 run.py                           # runs the sample input in sample/inputs
    python3 run.py --check                   # ... and compares with sample/expected
    python3 run.py --input NAME=x.npy --output-dir out/ --repeat 20
    python3 run.py --no-verify               # skips the sha256 checks (file sizes are still checked)
Exit codes: 0 ok; 2 bad bundle, input or command line; 1 the TVM runtime failed or --check found a
difference. Errors are one line on stderr.
"""
import argparse
import atexit
import functools
import hashlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

BUNDLE_DIR = Path(__file__).resolve().parent
MANIFEST = "manifest.json"
FORMAT_VERSION = 3
DEVICE_KINDS = ("cpu", "cuda", "opencl", "vulkan", "metal", "rocm")
TENSOR_FILE = re.compile(r"[0-9]+-[A-Za-z0-9._-]*\.npy\Z")
_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_COMMAND = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*\Z")
_MAX_MANIFEST_BYTES = 16 << 20
_REBUILD = "rebuild the bundle with edgec build"
_RECOPY = "the bundle was modified or damaged; copy or rebuild it"
_BOUND = "edgec.run"   # the entry function with the input tensors and weights bound (VM saved closure)


class BundleError(Exception):
    """A bad bundle, input or command line (exit code 2), or a failure inside the TVM runtime (exit code 1)."""

    def __init__(self, message, hint=None, exit_code=2):
        super().__init__(message)
        self.message, self.hint, self.exit_code = message, hint, exit_code

    def line(self):
        return "error: " + self.message + ("; " + self.hint if self.hint else "")


def shown(text):
    """A name from a bundle or the command line, safe to print on one line (control characters escaped)."""
    return text if text.isprintable() else ascii(text)[1:-1]


def _last_line(error):
    lines = [ln for ln in str(error).splitlines() if ln.strip()]
    return shown(lines[-1].strip()) if lines else type(error).__name__


# ------------------------------------------------------------------------------------------ manifest.json
# A schema is a type; a dict (an object with these keys, a key ending in "?" may be absent); a one-item
# list (a list of such values); a tuple (any one of these); None (JSON null); or a function returning what
# is wrong with a value (None when it is fine). Keys not in the schema are allowed and ignored.

def _rel_path(value):
    if not isinstance(value, str):
        return "is not a string"
    parts = value.split("/")
    if "\\" in value or "\0" in value or any(p in ("", ".", "..") for p in parts):
        return "is not a relative, normalised path inside the bundle"
    return None


def _library_path(value):
    # TVM's load_module compiles .tar/.o files with a C compiler: only a shared library is loaded.
    return _rel_path(value) or (None if value.endswith(".so") else "is not a .so file")


def _shared_lib_path(value):
    return _rel_path(value) or (None if re.search(r"\.so(\.[0-9]+)*$", value) else "is not a shared library")


def _sha256(value):
    return None if isinstance(value, str) and _SHA256.match(value) else "is not a sha256 hex digest"


def _command(value):
    return None if isinstance(value, str) and _COMMAND.match(value) else "is not a bare command name"


def _abs_path(value):
    ok = isinstance(value, str) and value.startswith("/") and os.path.normpath(value) == value
    return None if ok else "is not an absolute, normalised path"


def _tensor_file(value):
    return None if isinstance(value, str) and TENSOR_FILE.match(value) else "is not a tensor file name (N-NAME.npy)"


def _count(value):
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    return None if ok else "is not a non-negative integer"


def _number(value):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")
    return None if ok else "is not a finite non-negative number"


def _one_of(*values):
    return lambda value: None if value in values else "is not one of " + ", ".join(map(str, values))


class _Map:
    """A JSON object with any keys passing `key`, each value matching `value`."""

    def __init__(self, key, value):
        self.key, self.value = key, value


_TENSOR = {"name": str, "shape": [_count], "dtype": str, "file": _tensor_file}
# An output dimension may be null: known only at run time (the number of boxes NonMaxSuppression keeps).
_OUTPUT = {**_TENSOR, "shape": [(None, _count)]}
_SCHEMA = {
    "format_version": int,
    "model": {"name": str, "file": str, "sha256": _sha256},
    "entry": str,
    "load": (None, str),
    "inputs": [_TENSOR],
    "outputs": [_OUTPUT],
    "library": _library_path,
    "params": (None, _rel_path),
    "target": {
        "name": str, "description": str, "arch": str,
        "device": {"kind": _one_of(*DEVICE_KINDS), "threads": _count, "memory_mb": _count, "runtime_libs": [str]},
        "tvm": {"target": dict},
        "toolchain": {"triple": str, "compiler": _command, "apt_package": str},
        "emulator?": {"command": _command, "sysroot": _abs_path, "apt_package": str},
    },
    "versions": {"edgec": str, "tvm": str, "tvm_ffi": str},
    "passes": [str],
    "sample": (None, {"inputs": _rel_path, "expected": _rel_path}),
    "verification": {
        "status": _one_of("verified", "not verified"), "reason": (None, str), "reference": (None, str),
        "runner": (None, str), "tolerance": {"atol": _number, "rtol": _number},
        "outputs": _Map(str, {"max_abs": _number, "max_rel": _number}),
    },
    "files": _Map(_rel_path, {"sha256": _sha256, "size": _count}),
    "shared_libs?": [_shared_lib_path],
    "cpu_features?": [str],
    "states?": {"initial": _rel_path, "pairs": [{"name": str, "input": str, "output": str}]},
}


def _problem(value, schema, where):
    """(path, what is wrong) for the first part of `value` that does not match `schema`, else None."""
    if schema is None:
        return None if value is None else (where, "is not null")
    if isinstance(schema, type):
        ok = isinstance(value, schema) and not (isinstance(value, bool) and schema is not bool)
        return None if ok else (where, f"is not of type {schema.__name__}")
    if isinstance(schema, tuple):
        found = [_problem(value, s, where) for s in schema]
        return None if None in found else found[-1]
    if isinstance(schema, list):
        if not isinstance(value, list):
            return where, "is not a list"
        return next(filter(None, (_problem(v, schema[0], f"{where}[{i}]") for i, v in enumerate(value))), None)
    if isinstance(schema, dict):
        if not isinstance(value, dict):
            return where, "is not an object"
        for key, sub in schema.items():
            optional, key = key.endswith("?"), key.rstrip("?")
            if key not in value:
                if optional:
                    continue
                return f"{where}.{key}".lstrip("."), "is missing"
            found = _problem(value[key], sub, f"{where}.{key}".lstrip("."))
            if found:
                return found
        return None
    if isinstance(schema, _Map):
        if not isinstance(value, dict):
            return where, "is not an object"
        for key, sub in value.items():
            found = _problem(key, schema.key, where)
            if found:
                return where, f"has the key {key!r}, which {found[1]}"
            found = _problem(sub, schema.value, f"{where}[{key!r}]")
            if found:
                return found
        return None
    error = schema(value)
    return (where, error) if error else None


def _unique_keys(pairs):
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError(f"duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
    return dict(pairs)


def load_manifest(bundle_dir):
    """manifest.json of `bundle_dir`, checked for structure, types and consistency (not the files)."""
    root = Path(bundle_dir)
    path = root / MANIFEST
    if not root.exists():
        raise BundleError(f"bundle {shown(str(root))} does not exist", "check the path given to edgec build -o")
    if not root.is_dir():
        raise BundleError(f"{shown(str(root))} is not a bundle directory", "pass the directory written by edgec build -o")
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise BundleError(f"{shown(str(root))} is not an edgec bundle: no {MANIFEST}",
                          "pass the directory written by 'edgec build -o DIR'") from None
    if not stat.S_ISREG(st.st_mode) or st.st_size > _MAX_MANIFEST_BYTES:
        raise BundleError(f"{MANIFEST} is not a regular file of at most 16 MiB", _REBUILD)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, UnicodeDecodeError) as e:
        raise BundleError(f"{MANIFEST} is not valid JSON ({shown(str(e))})", _RECOPY) from None
    version = data.get("format_version") if isinstance(data, dict) else None
    if version != FORMAT_VERSION:
        raise BundleError(f"{MANIFEST} has format version {shown(str(version))}, this run.py reads version "
                          f"{FORMAT_VERSION}", _REBUILD)
    found = _problem(data, _SCHEMA, "")
    if found:
        raise BundleError(f"{MANIFEST}: '{shown(found[0])}' {found[1]}", _REBUILD)
    _check_consistent(data)
    return data


def _check_consistent(m):
    def fail(message):
        raise BundleError(f"{MANIFEST}: {message}", _REBUILD)

    for side in ("inputs", "outputs"):
        for key in ("name", "file"):
            values = [t[key] for t in m[side]]
            if len(set(values)) != len(values):
                fail(f"two {side} have the same {key}")
    if not m["outputs"]:
        fail("the model has no outputs")
    if MANIFEST in m["files"]:
        fail(f"'files' lists {MANIFEST} itself")
    states = m.get("states")
    if states is not None:
        inputs, outputs = ({t["name"]: t for t in m[side]} for side in ("inputs", "outputs"))
        for pair in states["pairs"]:
            i, o = inputs.get(pair["input"]), outputs.get(pair["output"])
            if i is None or o is None:
                fail(f"state '{shown(pair['name'])}' names an input or output the model does not have")
            if (i["shape"], i["dtype"]) != (o["shape"], o["dtype"]):
                fail(f"state '{shown(pair['name'])}' pairs tensors of different shapes or dtypes")
        for key in ("input", "output"):
            if len({p[key] for p in states["pairs"]}) != len(states["pairs"]):
                fail(f"two states have the same {key}")
    needed = ([m["library"]] + ([m["params"]] if m["params"] else []) + sample_files(m) + m.get("shared_libs", [])
              + ([states["initial"]] if states else []))
    for rel in needed:
        if rel not in m["files"]:
            fail(f"'{shown(rel)}' is not listed in 'files'")


def sample_files(manifest):
    """Paths of the sample inputs and expected outputs, relative to the bundle; [] without a sample."""
    sample = manifest["sample"]
    if sample is None:
        return []
    return ([f"{sample['inputs']}/{t['file']}" for t in manifest["inputs"]]
            + [f"{sample['expected']}/{t['file']}" for t in manifest["outputs"]])


# ------------------------------------------------------------------------------------------ bundle files

def _hash_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def survey(bundle_dir, manifest, verify=True):
    """How the bundle differs from its manifest: {"missing", "unlisted", "links", "resized", "changed"},
    each a sorted list of paths.

    "unlisted": regular files the manifest does not list; "links": symlinks and other non-regular entries
    (never followed); "resized": listed files of another size; "changed": listed files of the right size
    and another sha256 (only looked for with verify=True).
    """
    root = str(bundle_dir)
    listed = manifest["files"]
    present, unlisted, links, resized, changed = set(), [], [], [], []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            st = os.lstat(full)
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                links.append(rel)
            elif rel == MANIFEST:
                continue
            elif rel not in listed:
                unlisted.append(rel)
            else:
                present.add(rel)
                if st.st_size != listed[rel]["size"]:
                    resized.append(rel)
                elif verify and _hash_file(full) != listed[rel]["sha256"]:
                    changed.append(rel)
    return {"missing": sorted(set(listed) - present), "unlisted": sorted(unlisted), "links": sorted(links),
            "resized": sorted(resized), "changed": sorted(changed)}


def check_files(bundle_dir, manifest, verify=True, warn=None):
    """Refuse a bundle whose files are not exactly those of its manifest, each of the listed size and sha256.

    verify=False skips the sha256s (sizes are always checked) and says so through `warn` (default: stderr).
    """
    found = survey(bundle_dir, manifest, verify)
    if found["links"]:
        raise BundleError(f"bundle entry '{shown(found['links'][0])}' is a symbolic link or not a regular file",
                          "a bundle holds regular files only; copy it without links")
    if found["missing"]:
        raise BundleError(f"bundle file '{shown(found['missing'][0])}' is missing", "copy the whole bundle directory")
    if found["unlisted"]:
        raise BundleError(f"bundle file '{shown(found['unlisted'][0])}' is not listed in {MANIFEST}",
                          "a bundle holds only the files its manifest lists; remove it or rebuild")
    for key, what in (("resized", "size"), ("changed", "sha256")):
        if found[key]:
            raise BundleError(f"bundle file '{shown(found[key][0])}' does not match its {what} in {MANIFEST}", _RECOPY)
    if not verify:
        names = sorted(manifest["files"])
        (warn or _stderr)(f"run.py: --no-verify: sha256 not checked for {len(names)} files "
                          f"({', '.join(map(shown, names))}); sizes were checked")


def _stderr(message):
    print(message, file=sys.stderr)


def read_file(bundle_dir, manifest, rel, verify=True):
    """The bytes of a listed file, checked on these very bytes (size, and sha256 unless verify=False), so
    what is used is what was checked, even if the file changes on disk meanwhile."""
    entry = manifest["files"][rel]
    try:
        fd = os.open(os.path.join(str(bundle_dir), rel), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as e:
        raise BundleError(f"cannot read bundle file '{shown(rel)}' ({e.strerror})", _RECOPY) from None
    with os.fdopen(fd, "rb") as f:
        data = f.read(entry["size"] + 1)
    if len(data) != entry["size"]:
        raise BundleError(f"bundle file '{shown(rel)}' does not match its size in {MANIFEST}", _RECOPY)
    if verify and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise BundleError(f"bundle file '{shown(rel)}' does not match its sha256 in {MANIFEST}", _RECOPY)
    return data


_private_dir = []
_shared_libs = {}   # sha256 -> the loaded library: each is loaded once per process


def _private_copy(data, name):
    """Write `data` to `name` in this process's own directory (mode 0700, removed at exit)."""
    # A host program may remove the temp root it had when the first copy was made (edgec's build workspace):
    # then make a new directory.
    if not _private_dir or not os.path.isdir(_private_dir[-1]):
        _private_dir.append(tempfile.mkdtemp(prefix="edgec-run-"))
        atexit.register(shutil.rmtree, _private_dir[-1], True)
    path = os.path.join(_private_dir[-1], name)
    with open(path, "wb") as f:
        f.write(data)
    return path


# ------------------------------------------------------------------------------------------ tensors

_NPY_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def load_npy(source, what):
    """A numeric array from a .npy path or bytes, never unpickling anything."""
    import io

    try:
        f = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise BundleError(f"{what} does not exist", "check the path") from None
    except OSError as e:
        raise BundleError(f"cannot read {what} ({e.strerror})", "check the path") from None
    with f:
        try:
            read_header = _NPY_HEADERS.get(np.lib.format.read_magic(f))
            if read_header is None:
                raise ValueError("unsupported .npy version")
            if read_header(f)[2].hasobject:
                raise BundleError(f"{what} holds Python objects, not numbers", "save a numeric array with numpy.save")
            f.seek(0)
            return np.load(f, allow_pickle=False)
        except BundleError:
            raise
        except Exception:  # numpy's header parser raises whatever tokenize and ast raise on hostile bytes
            raise BundleError(f"{what} is not a .npy file", "save the array with numpy.save") from None


def check_inputs(specs, inputs):
    """Refuse inputs that are not exactly one array per spec ({"name", "shape", "dtype"}) of its shape and dtype."""
    names = [s["name"] for s in specs]
    if set(inputs) != set(names):
        raise BundleError(f"inputs {shown(str(sorted(inputs)))} do not match the model's inputs {shown(str(names))}",
                          "pass one array per model input, keyed by input name")
    for s in specs:
        a = np.asarray(inputs[s["name"]])
        if list(a.shape) != s["shape"]:
            raise BundleError(f"input '{shown(s['name'])}' has shape {list(a.shape)}, the model expects {s['shape']}",
                              f"pass an array of shape {'x'.join(map(str, s['shape']))}")
        if dtype_name(a.dtype) != s["dtype"]:
            raise BundleError(f"input '{shown(s['name'])}' has dtype {a.dtype}, the model expects {s['dtype']}",
                              f"convert it with array.astype('{s['dtype']}')")


def fits(shape, dims) -> bool:
    """Whether an array's shape is the manifest's, a null dim (set at run time) matching any size."""
    return len(shape) == len(dims) and all(d is None or d == n for n, d in zip(shape, dims))


@functools.lru_cache(maxsize=64)
def dtype_name(dtype):
    """str(dtype), which numpy computes in Python (microseconds: as long as a small model's run)."""
    return str(dtype)


def read_inputs(specs, items):
    """Arrays for --input values: NAME=FILE.npy, or FILE.npy for the next input not named. When the part
    before '=' is not an input name, the whole value is a path (file names may contain '=')."""
    names = [s["name"] for s in specs]
    if len(items) != len(names):
        raise BundleError(f"the model takes {len(names)} input(s) ({shown(', '.join(names))}), {len(items)} given",
                          "pass one --input per model input, as NAME=FILE.npy or in order")
    named, positional = {}, []
    for item in items:
        key, sep, path = item.partition("=")
        if sep and key in names:
            if key in named:
                raise BundleError(f"input '{shown(key)}' is given twice", "pass one --input per model input")
            named[key] = path
        else:
            positional.append(item)
    paths = dict(named)
    paths.update(zip([n for n in names if n not in named], positional))
    arrays = {}
    for name, path in paths.items():
        key, sep, _ = path.partition("=")
        if sep and path in positional and not os.path.exists(path):
            raise BundleError(f"input file {shown(path)} does not exist, and '{shown(key)}' is not an input name",
                              f"its inputs are: {shown(', '.join(names))}")
        arrays[name] = load_npy(path, f"input file {shown(path)}")
    return arrays


def compare(outputs, expected, atol, rtol):
    """The tolerance rule of edgec, one place for run.py --check and edgec's own comparisons.

    For each name in `expected` or `outputs`: {"max_abs", "max_rel", "ok", "problem"}. An output is ok when it
    exists on both sides with the same shape and dtype and max |out - ref| <= atol + rtol * max |ref| (the
    relative part is taken against the reference's range: elementwise rtol is meaningless near zero).
    NaN matches NaN and an infinity matches the same infinity; max |ref| is over finite values.
    """
    report = {}
    for name in list(expected) + [n for n in outputs if n not in expected]:
        out, ref = outputs.get(name), expected.get(name)
        problem = None
        if out is None or ref is None:
            problem = "missing from the outputs" if out is None else "not an expected output"
        else:
            out, ref = np.asarray(out), np.asarray(ref)
            if out.shape != ref.shape:
                problem = f"shape {list(out.shape)} differs from the expected {list(ref.shape)}"
            elif out.dtype != ref.dtype:
                problem = f"dtype {out.dtype} differs from the expected {ref.dtype}"
        if problem:
            report[name] = {"max_abs": float("inf"), "max_rel": float("inf"), "ok": False, "problem": problem}
            continue
        # flat: arithmetic on 0-d arrays gives numpy scalars, which cannot be assigned into below
        o, r = out.astype(np.float64).reshape(-1), ref.astype(np.float64).reshape(-1)
        with np.errstate(invalid="ignore"):
            diff = np.abs(o - r)
        diff[(o == r) | (np.isnan(o) & np.isnan(r))] = 0.0
        diff[np.isnan(diff)] = np.inf
        finite = np.abs(r[np.isfinite(r)])
        scale = float(finite.max()) if finite.size else 0.0
        max_abs = float(diff.max()) if diff.size else 0.0
        max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
        report[name] = {"max_abs": max_abs, "max_rel": max_rel, "ok": max_abs <= atol + rtol * scale, "problem": None}
    return report


# ------------------------------------------------------------------------------------------ the model

# A manifest's cpu_features (LLVM's names) as this machine reports them: x86 /proc/cpuinfo flags (the kernel's, so
# only what the OS also enables), Arm hwcaps (getauxval(AT_HWCAP or AT_HWCAP2), bit). A feature in neither table is
# not checked. main.cc holds the same tables.
_X86_FLAGS = {f: f for f in ("sse", "sse2", "ssse3", "sse4a", "avx", "avx2", "fma", "f16c", "bmi2", "popcnt", "movbe",
                             "gfni", "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl", "avx512ifma",
                             "avx512vbmi")}
_X86_FLAGS.update({"sse3": "pni", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "bmi": "bmi1", "lzcnt": "abm",
                   "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512bitalg": "avx512_bitalg",
                   "avx512vbmi2": "avx512_vbmi2", "avx512vpopcntdq": "avx512_vpopcntdq", "avx512fp16": "avx512_fp16",
                   "avxvnni": "avx_vnni", "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16"})
_AT_HWCAP, _AT_HWCAP2 = 16, 26
_ARM_HWCAPS = {"neon": (_AT_HWCAP, 1), "lse": (_AT_HWCAP, 8), "fullfp16": (_AT_HWCAP, 10), "rdm": (_AT_HWCAP, 12),
               "rcpc": (_AT_HWCAP, 15), "dotprod": (_AT_HWCAP, 20), "sve": (_AT_HWCAP, 22),
               "fp16fml": (_AT_HWCAP, 23), "sve2": (_AT_HWCAP2, 1), "i8mm": (_AT_HWCAP2, 13),
               "bf16": (_AT_HWCAP2, 14), "sme": (_AT_HWCAP2, 23)}


def cpu_features_lacking(features):
    """The manifest's cpu_features this machine's CPU does not have (those it cannot tell are taken as present)."""
    import platform

    machine = platform.machine()
    if machine in ("x86_64", "AMD64"):
        try:
            with open("/proc/cpuinfo") as f:
                flags = set(next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), []))
        except OSError:
            return []
        if not flags:       # no flags line: nothing to tell
            return []
        return [f for f in features if f in _X86_FLAGS and _X86_FLAGS[f] not in flags]
    if machine in ("aarch64", "arm64"):
        import ctypes

        getauxval = ctypes.CDLL(None).getauxval
        getauxval.restype, getauxval.argtypes = ctypes.c_ulong, [ctypes.c_ulong]
        return [f for f in features if f in _ARM_HWCAPS
                and not getauxval(_ARM_HWCAPS[f][0]) >> _ARM_HWCAPS[f][1] & 1]
    return []


def offload_thread_environment(environ):
    """The variables a bundle with offload libraries adds to `environ` before loading them (the environment's values
    win). The model's load function moves TVM's parallel loops onto the offload library's pool: one pool per
    process. TVM's pool is still made, idle (it only works for a model whose kernels use a barrier): its workers
    sleep at once. libgomp's (oneDNN's team) spin about 100 us, not 3 ms, before they sleep: gaps between kernels stay
    covered, and a thread waiting for a team member that lost its core to another process soon gives its own up
    (libgomp's default took MobileNetV2 to 440 ms a run beside one busy process on 2 cores). With the team kept off
    the caller's CPU (the oneDNN library), 10000 rounds were as fast as 1000 (about 10 us) beside busy processes and
    faster alone, the more so for a model run at intervals (bench/README.md, "Paced runs": MobileNetV2 4.4 against
    5.6 ms with 33 ms pauses; 3.6-4.2 / 7.7-7.9 / 8.1-9.9 ms back to back beside 0 / 1 / 2 busy processes).
    GOMP_SPINCOUNT is left alone under OMP_WAIT_POLICY, which it would override. libgomp reads both once, when it is
    loaded: a process that already has it (an earlier bundle, the application's own OpenMP) keeps the spin it
    started with. TVM's pool also pins the thread that starts it to the first THREADS cores, and OpenMP's team,
    started from that thread, inherits the pin: beside busy processes on those cores the whole team shares them
    while other cores idle, so the pool is told not to pin (TVM_BIND_THREADS=0). MobileNetV2 int8 on a 16-core
    Xeon, 4 threads beside 12 busy processes: 4.9-12.7 ms pinned (two runs), 1.5-2.0 ms not, onnxruntime
    2.0-2.5 ms; alone the same (bench/README.md). edgec's --offload auto times its candidates in this environment
    too."""
    added = {name: value for name, value in (("TVM_THREAD_POOL_SPIN_COUNT", "0"), ("TVM_BIND_THREADS", "0"))
             if name not in environ}
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        added["GOMP_SPINCOUNT"] = "10000"
    return added


class Model:
    """The compiled model, checked and loaded once: call run() many times. A Model owns its offload libraries'
    state (packed weights, operators), freed with it; its runs take turns (load one Model per thread to run in
    parallel)."""

    def __init__(self, bundle_dir=BUNDLE_DIR, threads=None, verify=True, warn=None):
        self.bundle_dir = Path(bundle_dir)
        self.verify = verify
        self.manifest = m = load_manifest(self.bundle_dir)
        check_files(self.bundle_dir, m, verify, warn)
        self.inputs, self.outputs = m["inputs"], m["outputs"]
        # a streaming model's state: input and output pairs, fed back by stream() from their initial values
        self.states = m["states"]["pairs"] if m.get("states") else []
        fed = {p["input"] for p in self.states}
        self.stream_inputs = [s for s in self.inputs if s["name"] not in fed]
        self.state = None   # the state stream() feeds next, by input name (None until reset() or stream())
        try:
            import tvm
            from tvm.runtime.vm import VirtualMachine
        except ImportError as e:
            raise BundleError(f"the TVM runtime is not installed ({_last_line(e)})",
                              f"pip install apache-tvm=={m['versions']['tvm']} "
                              f"apache-tvm-ffi=={m['versions']['tvm_ffi']}") from None
        target = m["target"]
        kind = target["device"]["kind"]
        self.device = tvm.device(kind, 0)
        self._on_host = kind == "cpu"
        if not self.device.exist:
            raise BundleError(f"this machine has no {kind} device, which the bundle was built for",
                              f"run it on {shown(target['name'])}")
        lacking = cpu_features_lacking(m.get("cpu_features", []))
        if lacking:
            raise BundleError(f"the bundle's code uses {', '.join(map(shown, lacking))}, which this machine's CPU "
                              "lacks (it would stop with an illegal instruction)",
                              f"run it on {shown(target['name'])}, or build it for this machine (edgec build -t host)")
        if m.get("shared_libs"):
            os.environ.update(offload_thread_environment(os.environ))
        config = tvm.get_global_func("runtime.config_threadpool", allow_missing=True)
        if config is not None:
            count = int(threads or target["device"]["threads"])
            # TVM caps the pool at TVM_NUM_THREADS, and without it at half the cores (one thread on 2 cores)
            os.environ["TVM_NUM_THREADS"] = str(count)
            config(0, count)   # 0: big cores first, as TVM_NUM_THREADS
        self._load_shared_libs()
        library = m["library"]
        code = read_file(self.bundle_dir, m, library, verify)
        # Loaded from a private copy named by its content: the dynamic loader hands back an already loaded
        # library of the same path, so a rebuilt bundle at the same path would otherwise run the old code.
        path = _private_copy(code, hashlib.sha256(code).hexdigest() + ".so")
        # With offload, `load` takes the weights and returns what the entry takes after the inputs: the weights
        # TVM's kernels use and, per library call site, its packed weights and operator (the state this Model owns).
        load = m["load"]
        try:
            self.vm = VirtualMachine(tvm.runtime.load_module(path), self.device)
            arity = self.vm.module["get_function_arity"](m["entry"])
            takes = load or m["entry"]
            first = 0 if load else len(self.inputs)
            weights = [self.vm.module["get_function_param_name"](takes, i)
                       for i in range(first, self.vm.module["get_function_arity"](takes))]
        except Exception as e:  # TVM raises its own error types for a library it cannot load
            raise BundleError(f"{shown(library)} cannot be loaded as the bundle's '{shown(m['entry'])}' "
                              f"function: {_last_line(e)}",
                              f"the bundle is for {shown(target['arch'])} ({kind}); {_REBUILD}") from None
        finally:
            os.unlink(path)
        self.weights = self._load_weights(tvm, weights)
        if load:
            try:
                self.weights = list(self.vm[load](*self.weights))
            except Exception as e:  # a library that cannot make its operators (TVM's or the library's error)
                raise BundleError(f"the model failed to load in the TVM runtime: {_last_line(e)}",
                                  exit_code=1) from None
        if len(self.inputs) + len(self.weights) != arity:
            raise BundleError(f"'{shown(m['entry'])}' takes {arity} arguments, the bundle gives "
                              f"{len(self.inputs) + len(self.weights)}", _REBUILD)
        self._bound = None   # made by the first run: see _bind
        # one call at a time: the VM's planned buffers and the bound input tensors are shared by its calls
        self._lock = threading.Lock()

    def _load_shared_libs(self):
        """Load the libraries the model library needs (shipped in the bundle, in the manifest's order) from
        private copies of the checked bytes: the model library then finds them loaded, by soname."""
        import ctypes

        for rel in self.manifest.get("shared_libs", []):
            data = read_file(self.bundle_dir, self.manifest, rel, self.verify)
            digest = hashlib.sha256(data).hexdigest()
            if digest in _shared_libs:
                continue
            path = _private_copy(data, digest + "-" + os.path.basename(rel))
            try:
                _shared_libs[digest] = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as e:
                raise BundleError(f"bundle file '{shown(rel)}' cannot be loaded: {_last_line(e)}",
                                  f"the bundle is for {shown(self.manifest['target']['arch'])}; {_REBUILD}") from None
            finally:
                os.unlink(path)

    def _load_weights(self, tvm, names):
        """The weights in the order the entry function takes them after its inputs, on the device."""
        m = self.manifest
        if not names:
            return []
        if not m["params"]:
            raise BundleError(f"'{shown(m['entry'])}' takes {len(names)} weights and the bundle has no params file",
                              _REBUILD)
        data = read_file(self.bundle_dir, m, m["params"], self.verify)
        try:
            params = tvm.runtime.load_param_dict(data)
        except Exception as e:  # TVM's own error for a malformed file
            raise BundleError(f"{shown(m['params'])} is not a TVM parameter file: {_last_line(e)}", _REBUILD) from None
        missing = [n for n in names if n not in params]
        if missing:
            raise BundleError(f"{shown(m['params'])} lacks the weight '{shown(missing[0])}'", _REBUILD)
        return [params[n] if self._on_host else params[n].copyto(self.device) for n in names]

    def _bind(self, arrays):
        """Input tensors of the model's own, bound once with the weights into a function of no arguments: a run
        copies the arrays into them and calls it. Allocating and converting every argument on every call took
        half the run of a 16-token transformer block (40 of 80 us with the outputs' conversion). Made from the
        first checked inputs, never from the manifest's shapes alone, so a bundle allocates what it is given."""
        import tvm

        try:
            self._input_tensors = [tvm.runtime.empty(a.shape, dtype_name(a.dtype), self.device) for a in arrays]
            # on the host, numpy views of those tensors: a copy into them goes through no TVM call
            self._input_views = [np.from_dlpack(t) for t in self._input_tensors] if self._on_host else None
            self.vm.save_function(self.manifest["entry"], _BOUND, *self._input_tensors, *self.weights)
            self._bound = self.vm[_BOUND]
        except Exception as e:  # TVM's own errors for tensors or a function it cannot make
            raise BundleError(f"the model failed in the TVM runtime: {_last_line(e)}", exit_code=1) from None

    def _set_inputs(self, inputs):
        check_inputs(self.inputs, inputs)
        arrays = [np.asarray(inputs[s["name"]]) for s in self.inputs]
        if self._bound is None:
            self._bind(arrays)
        for i, a in enumerate(arrays):
            if self._input_views is not None:
                self._input_views[i][...] = a
            else:
                self._input_tensors[i].copyfrom(np.require(a, requirements="C"))   # ascontiguousarray makes a 0-d array 1-d

    def _call(self):
        try:
            return self._bound()
        except Exception as e:  # a failure inside a kernel or the VM
            raise BundleError(f"the model failed in the TVM runtime: {_last_line(e)}", exit_code=1) from None

    def run(self, inputs):
        """inputs: {name: ndarray}. Returns {output name: ndarray} in the manifest's output order."""
        flat = []

        def collect(value):
            if hasattr(value, "numpy"):
                # a copy: the VM reuses the tensor's memory in the next run (numpy's own copy on the host, where
                # value.numpy() takes several times longer)
                flat.append(np.from_dlpack(value).copy() if self._on_host else value.numpy())
            else:
                for item in value:
                    collect(item)

        with self._lock:
            self._set_inputs(inputs)
            collect(self._call())
        if len(flat) != len(self.outputs):
            raise BundleError(f"the model returned {len(flat)} outputs, {MANIFEST} lists {len(self.outputs)}",
                              _REBUILD, exit_code=1)
        for spec, value in zip(self.outputs, flat):
            if not fits(value.shape, spec["shape"]) or dtype_name(value.dtype) != spec["dtype"]:
                raise BundleError(f"output '{shown(spec['name'])}' is {value.dtype}{list(value.shape)}, "
                                  f"{MANIFEST} says {spec['dtype']}{spec['shape']}", _REBUILD, exit_code=1)
        return {spec["name"]: value for spec, value in zip(self.outputs, flat)}

    def reset(self):
        """Start a new stream: the state goes back to the model's initial values (the manifest's "states")."""
        if not self.states:
            raise BundleError("the model keeps no state between calls", "call run() for each input")
        import tvm

        m = self.manifest
        rel = m["states"]["initial"]
        try:
            values = tvm.runtime.load_param_dict(read_file(self.bundle_dir, m, rel, self.verify))
        except BundleError:
            raise
        except Exception as e:  # TVM's own error for a malformed file
            raise BundleError(f"{shown(rel)} is not a TVM parameter file: {_last_line(e)}", _REBUILD) from None
        specs = {s["name"]: s for s in self.inputs}
        state = {}
        for pair in self.states:
            if pair["input"] not in values:
                raise BundleError(f"{shown(rel)} lacks the initial value of state '{shown(pair['name'])}'", _REBUILD)
            state[pair["input"]] = values[pair["input"]].numpy()
        check_inputs([specs[name] for name in state], state)
        self.state = state

    def stream(self, inputs):
        """One step of a stream: `inputs` are the model's inputs without its state inputs; the state is the
        previous step's (from the initial values after reset(), or on the first call). Returns every output, the
        state's new values too, which the next step takes."""
        if self.state is None:
            self.reset()
        check_inputs(self.stream_inputs, inputs)
        outputs = self.run({**inputs, **self.state})
        self.state = {p["input"]: outputs[p["output"]] for p in self.states}
        return outputs

    def time(self, inputs, repeat=10, warmup=2):
        """Milliseconds per call of the entry function for `repeat` calls after `warmup` calls."""
        times = []
        with self._lock:
            self._set_inputs(inputs)
            for _ in range(warmup):
                self._call()
            for _ in range(repeat):
                t0 = time.perf_counter()
                self._call()
                times.append((time.perf_counter() - t0) * 1e3)
        return times

    def sample(self, which):
        """The shipped sample arrays by tensor name: which="inputs" or "expected"."""
        m = self.manifest
        if m["sample"] is None:
            v = m["verification"]
            raise BundleError("the bundle has no sample" + (f" ({shown(v['reason'])})" if v["reason"] else ""),
                              "pass --input NAME=FILE.npy for each input")
        specs = m["inputs"] if which == "inputs" else m["outputs"]
        return {s["name"]: load_npy(read_file(self.bundle_dir, m, f"{m['sample'][which]}/{s['file']}", self.verify),
                                    f"sample file {s['file']}") for s in specs}


# ------------------------------------------------------------------------------------------ command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise BundleError(shown(message), "see python3 run.py --help")


def _main(argv):
    parser = _Parser(description="Run an edgec bundle (checks every file against manifest.json first).")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an input array (default: the sample in sample/inputs)")
    parser.add_argument("--output-dir", type=Path, help="write each output to the file manifest.json names for it")
    parser.add_argument("--repeat", type=int, default=1, help="runs to time")
    parser.add_argument("--threads", type=int, help="worker threads (default: the target's)")
    parser.add_argument("--check", action="store_true", help="compare with sample/expected (sample input only)")
    parser.add_argument("--no-verify", action="store_true", help="skip the sha256 checks (sizes are still checked)")
    args = parser.parse_args(argv)
    if args.check and args.input:
        raise BundleError("--check compares the sample input's outputs with sample/expected", "drop --input")
    if args.repeat < 1 or (args.threads is not None and args.threads < 1):
        raise BundleError("--repeat and --threads must be at least 1")
    model = Model(threads=args.threads, verify=not args.no_verify)
    inputs = read_inputs(model.inputs, args.input) if args.input else model.sample("inputs")
    outputs = model.run(inputs)
    times = sorted(model.time(inputs, repeat=args.repeat, warmup=0)) if args.repeat > 1 else []
    for spec in model.outputs:
        value = outputs[spec["name"]]
        span = f" min {value.min():.6g} max {value.max():.6g}" if value.size else ""
        print(f"{shown(spec['name'])}: {value.dtype}{list(value.shape)}{span}")
        if args.output_dir:
            args.output_dir.mkdir(parents=True, exist_ok=True)
            np.save(args.output_dir / spec["file"], value)
    if times:
        print(f"latency: median {times[len(times) // 2]:.3f} ms, min {times[0]:.3f} ms over {len(times)} runs")
    if args.check:
        tol = model.manifest["verification"]["tolerance"]
        report = compare(outputs, model.sample("expected"), tol["atol"], tol["rtol"])
        for name, r in report.items():
            print(f"check {shown(name)}: " + (r["problem"] or f"max abs {r['max_abs']:.3g}, max rel {r['max_rel']:.3g}")
                  + ("" if r["ok"] else " FAIL"))
        failed = [shown(n) for n, r in report.items() if not r["ok"]]
        if failed:
            raise BundleError(f"outputs differ from sample/expected beyond atol={tol['atol']}, rtol={tol['rtol']}: "
                              + ", ".join(failed), exit_code=1)
        print(f"check: ok (atol={tol['atol']}, rtol={tol['rtol']})")


def main(argv=None):
    try:
        _main(argv)
    except BundleError as e:
        print(e.line(), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in this file or an unexpected environment: still one line
        print(f"error: unexpected {type(e).__name__}: {_last_line(e)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
