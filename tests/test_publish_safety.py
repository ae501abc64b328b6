"""Nothing half-written, nothing of the user's overwritten unasked, no debris (issue 6, items 3 and 4).

Builds go through the CLI: in process, or as real processes where two must race or one is killed. Each test
has its own EDGEC_CACHE_DIR, so the workspaces it sees ($EDGEC_CACHE_DIR/tmp/run-*) are its own. Compilers
that misbehave are sh scripts put first on PATH and named by a copy of targets/host.toml.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import onnx
import pytest

from test_cli_errors import check_cli_error, check_error, cli, conv_relu_onnx, fake_compiler, host_target

STAGING = ".out.edgec-staging-"


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def model(tmp_path) -> Path:
    return conv_relu_onnx(tmp_path / "model.onnx")


def workspaces(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "tmp"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def debris(tmp_path: Path) -> list[str]:
    """Staging dirs next to -o, and workspaces: what a finished or failed build must not leave."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(STAGING)) + workspaces(tmp_path)


def use_compiler(tmp_path: Path, monkeypatch, script: str) -> Path:
    """A host target whose compiler runs `script`, on PATH for in-process builds and for child processes."""
    bin_dir = fake_compiler(tmp_path, "edgec-test-cc", script)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return host_target(tmp_path, compiler="edgec-test-cc")


def build_process(model: Path, target: Path, out: str, cwd: Path, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgec.cli", "build", str(model), "-t", str(target), "-o", out],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:   # pytest -n 2: a loaded machine
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the build ended before {path.name} appeared: {proc.communicate()}"
        assert time.monotonic() < deadline, f"{path.name} did not appear"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------- refusing to overwrite

def test_existing_archive_needs_force(model, tmp_path):
    (tmp_path / "out.tar.gz").write_text("mine\n")
    check_cli_error(cli("build", model, "--archive", "-o", "out"), "out.tar.gz", "exists", "--force")
    assert (tmp_path / "out.tar.gz").read_text() == "mine\n"
    assert not (tmp_path / "out").exists(), "refused before anything was built"
    result = cli("build", model, "--archive", "--force", "-o", "out")
    assert result.exit_code == 0, result.output
    with tarfile.open(tmp_path / "out.tar.gz") as tar:
        assert "out/manifest.json" in tar.getnames()


def test_non_empty_dump_ir_needs_force(model, tmp_path):
    (tmp_path / "ir").mkdir()
    (tmp_path / "ir" / "notes.txt").write_text("mine\n")
    check_cli_error(cli("build", model, "--dump-ir", "ir", "-o", "out"), "--dump-ir", "not empty", "--force")
    assert not (tmp_path / "out").exists()
    result = cli("build", model, "--dump-ir", "ir", "--force", "-o", "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ir" / "notes.txt").read_text() == "mine\n", "--force writes into it, removes nothing"
    assert len(list((tmp_path / "ir").iterdir())) > 1


def test_example_output_needs_force(tmp_path):
    (tmp_path / "m.onnx").write_text("mine\n")
    check_cli_error(cli("example", "mobilenetv2", "-o", "m.onnx"), "m.onnx", "exists", "--force")
    assert (tmp_path / "m.onnx").read_text() == "mine\n"
    result = cli("example", "mobilenetv2", "-o", "m.onnx", "--force")
    assert result.exit_code == 0, result.output
    onnx.checker.check_model(onnx.load(tmp_path / "m.onnx"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "m.onnx"], "no temp file left next to it"


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2-exchange", "two-renames"])
def test_rebuild_replaces_the_bundle(model, tmp_path, monkeypatch, exchange):
    """Replacing a bundle swaps it in whole, also where the filesystem cannot exchange two paths atomically."""
    import edgec.fsutil

    if not exchange:
        monkeypatch.setattr(edgec.fsutil, "_exchange", lambda a, b: False)
    assert cli("build", model, "-o", "out").exit_code == 0
    first = (tmp_path / "out" / "params.bin").read_bytes()
    result = cli("build", conv_relu_onnx(tmp_path / "model.onnx", seed=1), "-o", "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "params.bin").read_bytes() != first
    assert cli("run", "out").exit_code == 0
    assert debris(tmp_path) == []


# --------------------------------------------------------------------------------------------- failing builds

@pytest.mark.parametrize("script,words", [
    ("exit 0", ["edgec-test-cc", "wrote no model library"]),
    ('while [ $# -gt 0 ]; do [ "$1" = -o ] && echo junk > "$2"; shift; done', ["edgec-test-cc", "not an ELF"]),
], ids=["no-output", "not-elf"])
def test_compiler_exiting_0_without_a_library_publishes_nothing(model, tmp_path, monkeypatch, script, words):
    result = cli("build", model, "-o", "out")
    assert result.exit_code == 0, result.output
    before = (tmp_path / "out" / "manifest.json").read_bytes()
    target = use_compiler(tmp_path, monkeypatch, script)
    for out in ("new", "out"):          # a new -o, and a rebuild over an existing bundle
        check_cli_error(cli("build", model, "-t", target, "-o", out), *words)
    assert not (tmp_path / "new").exists()
    assert (tmp_path / "out" / "manifest.json").read_bytes() == before, "the previous bundle stays as it was"
    assert debris(tmp_path) == []


def test_archive_that_cannot_be_written_publishes_nothing(model, tmp_path, monkeypatch):
    import edgec.bundle

    def disk_full(bundle_dir, archive, name):
        archive.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(archive))

    monkeypatch.setattr(edgec.bundle, "write_archive", disk_full)
    check_cli_error(cli("build", model, "--archive", "-o", "out"), "no space left", "full")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tar.gz").exists()
    assert debris(tmp_path) == []


def test_archive_publish_failure_restores_the_previous_bundle(model, tmp_path, monkeypatch):
    """Bundle and archive are published both or neither: when the archive's rename fails after the bundle's
    swap, the previous bundle is swapped back."""
    result = cli("build", model, "-o", "out")
    assert result.exit_code == 0, result.output
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(".tar.gz"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    check_cli_error(cli("build", conv_relu_onnx(tmp_path / "model.onnx", seed=1), "--archive", "-o", "out"),
                    "cannot write in", str(tmp_path))
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()} == before
    assert not (tmp_path / "out.tar.gz").exists()
    assert debris(tmp_path) == []


# --------------------------------------------------------------------------------------------- processes

def test_two_builds_to_one_output(model, tmp_path, monkeypatch):
    """Both start at once; the link is slow (long enough for the other to start under pytest -n 2's load, where 3 s
    was not), so they overlap whichever takes the lock first."""
    target = use_compiler(tmp_path, monkeypatch, 'sleep 30; exec g++ "$@"')
    procs = [build_process(model, target, "out", tmp_path) for _ in range(2)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] != 0)
    check_error(loser[2], loser[0], "another edgec build is writing", str(tmp_path / "out"))
    result = cli("run", "out")              # verifies every file's sha256 before running
    assert result.exit_code == 0, result.output
    assert debris(tmp_path) == []


def test_running_build_keeps_its_workspace_while_another_builds(model, tmp_path, monkeypatch):
    """The sweep for stale workspaces must leave a live run's alone (its lock is held)."""
    marker = tmp_path / "linking"
    target = use_compiler(tmp_path, monkeypatch, f'touch "{marker}"; sleep 2; exec g++ "$@"')
    slow = build_process(model, target, "slow", tmp_path)
    wait_for(marker, slow)
    [live] = workspaces(tmp_path)
    assert any((tmp_path / "cache" / "tmp" / live).iterdir()), "TVM's own temp files (export_library) are in it"
    result = cli("build", model, "-o", "quick")
    assert result.exit_code == 0, result.output
    assert slow.wait(timeout=300) == 0, slow.communicate()
    assert (tmp_path / "slow" / "manifest.json").is_file()
    assert debris(tmp_path) == []


def test_debris_of_a_killed_build_is_removed_by_the_next(model, tmp_path, monkeypatch):
    marker = tmp_path / "linking"
    target = use_compiler(tmp_path, monkeypatch, f'touch "{marker}"; exec sleep 60')
    proc = build_process(model, target, "out", tmp_path, start_new_session=True)
    wait_for(marker, proc)
    os.killpg(proc.pid, signal.SIGKILL)     # the build and its compiler: nothing gets to clean up
    proc.wait(timeout=60)
    left = debris(tmp_path)
    assert any(n.startswith(STAGING) for n in left) and any(n.startswith("run-") for n in left), left
    assert not (tmp_path / "out").exists()
    result = cli("build", model, "-o", "out")
    assert result.exit_code == 0, result.output
    assert debris(tmp_path) == []
    assert cli("run", "out").exit_code == 0
