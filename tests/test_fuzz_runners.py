"""A bounded fuzz (fixed seed) of the bundle's two runners, edgec_run and run.py, with mutated .npy inputs and
mutated manifests. Whatever the mutation, a runner ends with exit code 0, 1 or 2, is not killed by a signal,
prints no traceback, and reports an error in one line on stderr.

edgec_run runs in a fresh process per case. run.py runs in this process through its main(argv) (a fresh Python
would import TVM for every case, about 2 s each), plus a few cases as the deployer's `python run.py`."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgec.manifest import Manifest
from edgec.signature import random_inputs
from edgec.toolchain import build_runner, host_arch
from test_runner import INPUTS, tiny_onnx, write_bundle

SEED = 20261122
CASES_PER_KIND = 75        # .npy mutations and manifest mutations: 150 cases per runner
RUN_PY_PROCESSES = 4       # of them also through `python run.py` in its own process

# Replacements for a token of a .npy header, and for a value anywhere in the manifest.
NPY_TOKENS = ["", "(", ")", "'", ",", ":", "{", "}", "\x00", "\xff", "-1", "1e3", "'a'", "None", "True",
              "99999999999999999999", "(" + "1," * 40 + ")", "(4611686018427387904, 4)", "'|O'", "'>f4'", "'<f4"]
MANIFEST_VALUES = [None, True, 0, -1, 2 ** 63, 10 ** 30, 1.5, float("nan"), "", "x" * 5000, [], {}, [[[]]],
                   "../../etc/passwd", "/etc/passwd", "0-x.npy", {"sha256": "0" * 64, "size": 1}, ["x"] * 3]


def mutate_npy(rng: random.Random, data: bytes) -> tuple[str, bytes]:
    how = rng.choice(["flip", "flip", "truncate", "header", "header", "length", "append"])
    b = bytearray(data)
    if how == "flip":            # mostly in the 128-byte magic + header
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(128) if rng.random() < 0.7 else rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        return how, bytes(b)
    if how == "truncate":
        return how, bytes(b[:rng.randrange(len(b))])
    if how == "append":
        return how, bytes(b) + rng.randbytes(rng.randint(1, 64))
    header_len = int.from_bytes(b[8:10], "little")
    if how == "length":          # header length field and format version
        b[6] = rng.choice([1, 2, 3, 0, 255])
        b[8:10] = rng.choice([0, 1, 0xFFFF, rng.randrange(1 << 16)]).to_bytes(2, "little")
        return how, bytes(b)
    text = b[10:10 + header_len].decode("latin1")
    tokens = [t for t in ("'descr'", "'<f4'", "'<i4'", "False", "'fortran_order'", "'shape'", "(1, 3, 8, 8)",
                          "(1, 10)", ",", ":", "}", "{", "'") if t in text]
    token = rng.choice(tokens)
    start = text.index(token)
    text = text[:start] + rng.choice(NPY_TOKENS) + text[start + len(token):]
    raw = text.encode("latin1")
    length = len(raw) if rng.random() < 0.5 else header_len        # keep the length field right, or not
    return f"header {token!r}", bytes(b[:8]) + min(length, 0xFFFF).to_bytes(2, "little") + raw + bytes(b[10 + header_len:])


def _paths(value, path=()):
    yield path
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, sub in items:
        yield from _paths(sub, (*path, key))


def mutate_manifest(rng: random.Random, text: str) -> tuple[str, bytes]:
    how = rng.choice(["flip", "flip", "truncate", "swap", "swap", "swap", "delete"])
    data = bytearray(text.encode())
    if how == "flip":
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        return how, bytes(data)
    if how == "truncate":
        return how, bytes(data[:rng.randrange(len(data))])
    doc = json.loads(text)
    path = rng.choice([p for p in _paths(doc) if p])
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if how == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = rng.choice(MANIFEST_VALUES)
    return f"{how} {'.'.join(map(str, path))}", json.dumps(doc).encode()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    return write_bundle(tmp_path_factory.mktemp("fuzz") / "host", host_arch(), tiny_onnx())


@pytest.fixture(scope="module")
def cases(bundle, tmp_path_factory) -> list[tuple[str, str, bytes]]:
    """(which file: "x", "offset" or "manifest", how it was mutated, its new bytes), the same for both runners."""
    rng = random.Random(SEED)
    valid = {}
    for spec, array in random_inputs(INPUTS, seed=1).items():
        f = io.BytesIO()
        np.save(f, array)
        valid[spec] = f.getvalue()
    text = (bundle / "manifest.json").read_text()
    out = []
    for _ in range(CASES_PER_KIND):
        which = rng.choice(sorted(valid))
        out.append((which, *mutate_npy(rng, valid[which])))
    out += [("manifest", *mutate_manifest(rng, text)) for _ in range(CASES_PER_KIND)]
    return out


class Case:
    """A bundle copy and input files holding one mutation; the arguments of each runner for it."""

    def __init__(self, bundle: Path, work: Path):
        self.bundle = Path(shutil.copytree(bundle, work / "bundle"))
        self.manifest = (self.bundle / "manifest.json").read_bytes()
        self.inputs = {spec.name: work / f"{spec.name}.npy" for spec in INPUTS}
        self.out = work / "out"
        self.valid = random_inputs(INPUTS, seed=1)

    def apply(self, which: str, data: bytes) -> None:
        (self.bundle / "manifest.json").write_bytes(data if which == "manifest" else self.manifest)
        for name, path in self.inputs.items():
            if name == which:
                path.write_bytes(data)
            else:
                np.save(path, self.valid[name])
        shutil.rmtree(self.out, ignore_errors=True)

    def run_py_args(self) -> list[str]:
        return [a for name, path in self.inputs.items() for a in ("--input", f"{name}={path}")] + [
            "--output-dir", str(self.out)]


def problem(returncode: int, stderr: str | bytes) -> str | None:
    """What breaks the promise, if anything."""
    if isinstance(stderr, bytes):
        try:
            stderr = stderr.decode()
        except UnicodeDecodeError:
            return "stderr is not UTF-8 text"
    lines = stderr.strip().splitlines()
    if returncode not in (0, 1, 2):
        return f"exit code {returncode}" + (" (killed by a signal)" if returncode < 0 else "")
    if "Traceback" in stderr:
        return "a traceback"
    if returncode != 0 and len(lines) != 1:
        return f"{len(lines)} lines on stderr"
    return None


def assert_no_problems(found: list[str]) -> None:
    assert not found, f"{len(found)} cases broke the promise (seed {SEED}):\n" + "\n".join(found[:20])


def test_fuzz_edgec_run(bundle, cases, tmp_path):
    runner = build_runner(bundle, Manifest.load(bundle).target)
    case = Case(bundle, tmp_path)
    found = []
    for i, (which, how, data) in enumerate(cases):
        case.apply(which, data)
        proc = subprocess.run([str(runner), "-d", str(case.bundle), "-o", str(case.out), "-t", "1",
                               *map(str, case.inputs.values())], capture_output=True, timeout=60)
        why = problem(proc.returncode, proc.stderr)
        if why:
            found.append(f"case {i} ({which}: {how}): {why}: {proc.stderr.strip()[:300]!r}")
    assert_no_problems(found)


def test_fuzz_run_py(bundle, cases, tmp_path):
    case = Case(bundle, tmp_path)
    # the copy's own run.py, so that its BUNDLE_DIR is the mutated copy
    spec = importlib.util.spec_from_file_location("edgec_fuzzed_run_py", case.bundle / "run.py")
    run_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(run_py)
    as_process = set(random.Random(SEED).sample(range(len(cases)), RUN_PY_PROCESSES))
    found = []
    for i, (which, how, data) in enumerate(cases):
        case.apply(which, data)
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = run_py.main([*case.run_py_args(), "--threads", "1"])
        # run.py's catch-all reports a bug of its own as "unexpected": hostile data must never get there
        why = problem(code, stderr.getvalue()) or ("an unexpected exception" if "unexpected" in stderr.getvalue() else None)
        if i in as_process:
            case.apply(which, data)
            proc = subprocess.run([sys.executable, str(case.bundle / "run.py"), *case.run_py_args()],
                                  capture_output=True, timeout=300)
            why = why or problem(proc.returncode, proc.stderr)
            if proc.returncode != code:
                why = why or f"exit code {proc.returncode} as a process, {code} in process"
        if why:
            found.append(f"case {i} ({which}: {how}): {why}: {stderr.getvalue().strip()[:300]!r}")
    assert_no_problems(found)
