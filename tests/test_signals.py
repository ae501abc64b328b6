"""SIGINT, SIGTERM and SIGHUP during a build are handled like Ctrl-C: the build cleans up (no bundle, no staging
dir next to -o, no workspace in the cache), prints one line and exits 128 + the signal (130, 143, 129).

Real `python -m edgec.cli build` processes of a MobileNetV2 big enough to take seconds. "During codegen" is
after the progress line "generate code" (--verbose prints progress); "during link" is while a fake compiler
from a copy of the host descriptor sleeps. Each test has its own EDGEC_CACHE_DIR.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edgec.examples import mobilenet_v2
from test_cli_errors import check_error, fake_compiler, host_target

STAGING = ".out.edgec-staging-"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return mobilenet_v2(tmp_path_factory.mktemp("signals") / "mbv2.onnx", width=0.35, resolution=96)


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEC_CACHE_DIR", str(tmp_path / "cache"))


def debris(tmp_path: Path) -> list[str]:
    """The bundle, staging dirs next to it, and workspaces: none may be left by an interrupted build."""
    root = tmp_path / "cache" / "tmp"
    return (sorted(p.name for p in tmp_path.iterdir() if p.name == "out" or p.name.startswith(STAGING))
            + (sorted(p.name for p in root.iterdir()) if root.is_dir() else []))


def build(model: Path, tmp_path: Path, *args: str, verbose: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgec.cli", *(["--verbose"] if verbose else []), "build",
                             str(model), "-o", "out", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def slow_linker(tmp_path: Path, monkeypatch) -> tuple[Path, Path]:
    """A host target whose compiler writes its pid to a marker file and sleeps: the link can be interrupted."""
    marker = tmp_path / "linking"
    bin_dir = fake_compiler(tmp_path, "edgec-slow-cc", f'echo $$ > "{marker}"; exec sleep 60')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return host_target(tmp_path, compiler="edgec-slow-cc"), marker


def wait_for(marker: Path, proc: subprocess.Popen) -> None:
    # generous: under pytest -n 2 the other worker's builds share the 2 cores (a build here then took over 120 s)
    deadline = time.monotonic() + 600
    while not (marker.exists() and marker.read_text().strip()):
        assert proc.poll() is None, f"the build ended before linking: {proc.communicate()}"
        assert time.monotonic() < deadline, "the build never reached the link step"
        time.sleep(0.05)


def gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
                return True
        except FileNotFoundError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_codegen(model, tmp_path, sig):
    proc = build(model, tmp_path, verbose=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if "generate code" in line:
            proc.send_signal(sig)
            break
    else:
        pytest.fail(f"no 'generate code' progress line: {''.join(seen)}")
    _, rest = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, "".join(seen) + rest
    assert rest.splitlines()[-1] == f"error: interrupted by {sig.name}", rest
    assert debris(tmp_path) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP], ids=["SIGTERM", "SIGINT", "SIGHUP"])
def test_signal_during_link(model, tmp_path, monkeypatch, sig):
    target, marker = slow_linker(tmp_path, monkeypatch)
    proc = build(model, tmp_path, "-t", str(target))
    wait_for(marker, proc)
    assert any(p.name.startswith(STAGING) for p in tmp_path.iterdir()), "control: the bundle is being staged"
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=120)
    check_error(stderr, proc.returncode, f"interrupted by {sig.name}", code=128 + sig)
    assert debris(tmp_path) == []
    assert gone(int(marker.read_text())), "the compiler edgec started is stopped with it"


def test_debris_of_a_sigkilled_build_is_removed_by_the_next(model, tmp_path, monkeypatch):
    target, marker = slow_linker(tmp_path, monkeypatch)
    proc = build(model, tmp_path, "-t", str(target))
    wait_for(marker, proc)
    proc.kill()                              # SIGKILL: no handler runs
    proc.wait(timeout=60)
    os.kill(int(marker.read_text()), signal.SIGKILL)
    left = debris(tmp_path)
    assert any(n.startswith(STAGING) for n in left) and any(n.startswith("run-") for n in left), left
    proc = build(model, tmp_path)            # the real compiler this time
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert debris(tmp_path) == ["out"]
    assert (tmp_path / "out" / "manifest.json").is_file()
