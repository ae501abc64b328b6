"""Measuring workers: a child Python process that loads one thing (a runtime, a library of kernels) and answers
pickled requests, so that each runtime's thread pool runs in a process of its own (two spinning pools in one
process ruin both timings). `edgec bench` times runtimes with them, `--offload auto` kernels.

The protocol: the parent sends the first request, the worker answers ("ready", payload); then each request gets
("answer", payload), until the parent sends None. A failure in the worker comes back as ("error", (message, hint)).
"""
from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NoReturn

from .errors import EdgecError, last_line

# A handler takes the first request and returns the "ready" payload and the function that answers the others.
Handler = Callable[[Any], tuple[Any, Callable[[Any], Any]]]


class WorkerTimeout(EdgecError):
    """The worker did not answer before the deadline (it was killed)."""


def thread_cpu_ns(pid: int) -> dict[int, int] | None:
    """Nanoseconds each thread of a process has run (schedstat's first field); None where the kernel has none."""
    out = {}
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return None
    for task in tasks:
        try:
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
        except FileNotFoundError:       # the thread exited between listing and reading
            continue
        except OSError:
            return None
    return out


def wait_until_idle(pid: int, poll_s: float = 0.01, limit_s: float = 2.0) -> None:
    """Return once a process uses under 10% of one core over a poll: runtimes' pool threads spin for a while
    after a run (onnxruntime's do by default), which would slow the other runtime's next block down."""
    deadline = time.monotonic() + limit_s
    last = thread_cpu_ns(pid)
    while last is not None and time.monotonic() < deadline:
        time.sleep(poll_s)
        now = thread_cpu_ns(pid)
        if now is None or sum(now.values()) - sum(last.values()) < 0.1 * poll_s * 1e9:
            return
        last = now


class WorkerProcess:
    """The parent's handle on `python -m MODULE worker`, started with this edgec on its path."""

    def __init__(self, module: str, first_request, *, what: str, hint: str | None = None,
                 env: dict[str, str] | None = None):
        self.what, self.hint = what, hint           # for errors: "the onnxruntime worker", and what to do
        self._stderr = tempfile.TemporaryFile()
        path = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")]))
        self.process = subprocess.Popen([sys.executable, "-m", module, "worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=self._stderr,
                                        env={**os.environ, **(env or {}), "PYTHONPATH": path})
        self.pid = self.process.pid
        self.send(first_request)

    def send(self, message) -> None:
        try:
            pickle.dump(message, self.process.stdin)
            self.process.stdin.flush()
        except BrokenPipeError:
            self._died()

    def receive(self, expected: str, deadline: float | None = None):
        """The payload of the next answer, which must be of kind `expected`; WorkerTimeout past `deadline`
        (time.monotonic())."""
        if deadline is not None:
            ready, _, _ = select.select([self.process.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.process.kill()
                self.process.wait()
                raise WorkerTimeout(f"{self.what} did not answer in time", self.hint)
        try:
            kind, payload = pickle.load(self.process.stdout)
        except EOFError:
            self._died()
        if kind == "error":
            message, hint = payload
            raise EdgecError(message, hint or self.hint)
        assert kind == expected, (kind, expected)
        return payload

    def wait_until_idle(self) -> None:
        """Return once this worker's threads stop using CPU (see wait_until_idle)."""
        wait_until_idle(self.pid)

    def _died(self) -> NoReturn:
        self.process.kill()
        self.process.wait()
        self._stderr.seek(0)
        reason = last_line(Exception(self._stderr.read().decode(errors="replace")))
        raise EdgecError(f"{self.what} exited with code {self.process.returncode}: {reason}", self.hint) from None

    def stop(self) -> None:
        if self.process.stdout.closed:
            return
        try:
            pickle.dump(None, self.process.stdin)
            self.process.stdin.close()
            self.process.wait(10)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self._stderr.close()


def serve(handler: Handler) -> None:
    """The worker's side: answer the first request with `handler`, then every request until None."""
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)   # whatever a runtime or a library prints goes to stderr, never into the answers

    def answer(kind: str, payload) -> None:
        pickle.dump((kind, payload), answers)
        answers.flush()

    try:
        ready, respond = handler(pickle.load(requests))
        answer("ready", ready)
        while (request := pickle.load(requests)) is not None:
            answer("answer", respond(request))
    except EOFError:       # the parent went away
        pass
    except Exception as e:  # EdgecError and run.py's BundleError carry a message and a hint; others: one line
        answer("error", (getattr(e, "message", None) or f"{type(e).__name__}: {last_line(e)}",
                         getattr(e, "hint", None)))
