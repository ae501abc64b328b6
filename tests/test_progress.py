"""Progress of long steps on stderr: live on a terminal, plain lines on a pipe only with --progress, never on
stdout, and the live line taken off however the command ends."""
from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest

from edgec import progress
from tflite_builder import Graph, schema
from test_cli_errors import cli_process

STEP_LINE = re.compile(r"^\[\s*\d+\.\ds\] \S")


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """y = x + c: the build's every step, in a few seconds."""
    g = Graph()
    x = g.tensor("x", [1, 8])
    c = g.tensor("c", [1, 8], data=np.arange(8, dtype=np.float32))
    y = g.tensor("y", [1, 8])
    g.op(schema.BuiltinOperator.ADD, [x, c], [y])
    return g.save(tmp_path_factory.mktemp("model") / "add.tflite", [x], [y])


def test_build_progress_forced_into_a_pipe(small_model, tmp_path):
    proc = cli_process("build", small_model, "-o", tmp_path / "b", "--offload", "none", "--json", "--progress",
                       cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)                                  # stdout holds the JSON summary and nothing else
    lines = proc.stderr.splitlines()
    assert lines and all(STEP_LINE.match(line) for line in lines), proc.stderr
    steps = [line.split("] ", 1)[1] for line in lines]
    total = int(re.fullmatch(r"passes \((\d+)\)", next(s for s in steps if s.startswith("passes ("))).group(1))
    counted = [s for s in steps if re.match(r"passes \d+/", s)]
    assert len(counted) == total and counted[0].startswith(f"passes 1/{total} ") \
        and counted[-1].startswith(f"passes {total}/{total} "), steps
    for step in ("import model", "generate code", "reference run", "link with g++", "verify the staged bundle"):
        assert step in steps, steps


def test_no_progress_on_a_pipe_without_the_option(small_model, tmp_path):
    proc = cli_process("build", small_model, "-o", tmp_path / "b", "--offload", "none", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = cli_process("run", tmp_path / "b", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    proc = cli_process("run", tmp_path / "b", "--progress", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    json.loads(proc.stdout)
    assert [line.split("] ", 1)[1] for line in proc.stderr.splitlines()] == ["run"], proc.stderr


def test_failing_build_with_progress_ends_with_the_error_line(tmp_path):
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\0" * 64)
    proc = cli_process("build", bad, "--progress", cwd=tmp_path)
    lines = proc.stderr.splitlines()
    assert proc.returncode == 2 and lines[-1].startswith("error: ") and "no TFL3 identifier" in lines[-1], proc.stderr
    assert all(STEP_LINE.match(line) for line in lines[:-1]), proc.stderr


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_live_line_is_cleared_on_an_error():
    term = Terminal()
    with pytest.raises(KeyboardInterrupt), progress.reporting(term) as steps:
        steps("passes", total=3)
        steps.advance("fold-constants")
        assert progress.current() is steps
        raise KeyboardInterrupt
    assert progress.current() is not steps and not progress.current().enabled
    out = term.getvalue()
    assert "[1/3] passes fold-constants" in out
    assert out.endswith("\r\x1b[K") and "\n" not in out, repr(out)    # short steps leave nothing behind


def test_long_step_leaves_its_line_on_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "LONG_STEP_SECONDS", 0.0)
    term = Terminal()
    with progress.reporting(term) as steps:
        steps("generate code")
        steps("passes", total=2)
        steps.advance("a")
    lines = term.getvalue().replace("\r\x1b[K", "\n").split("\n")
    assert re.fullmatch(r"  generate code: \d+\.\ds", next(x for x in lines if "generate code:" in x))
    assert re.fullmatch(r"  passes \(1 of 2\): \d+\.\ds", next(x for x in lines if "passes (" in x))


def test_silent_reporter_writes_nothing():
    out = io.StringIO()                                     # not a terminal, not forced
    with progress.reporting(out) as steps:
        steps("passes", total=1)
        steps.advance("x")
    assert out.getvalue() == ""
