"""Progress of long steps on stderr: the step's name, seconds elapsed, a spinner or a counter.

On a terminal one live line is redrawn in place (a thread redraws it while TVM or a compiler holds the main
thread), and a step that took 2 s or more leaves a line behind when it ends; on a pipe (only with --progress)
each step and counted item is one plain line, so a CI log shows where a build spent its time. A disabled
reporter does nothing. Nothing goes to stdout, so `--json` output is never mixed with it.

The CLI opens one reporter per command (`reporting(...)`); library code reports through `current()`, which is a
silent reporter unless the CLI opened one.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

_SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
_REDRAW_SECONDS = 0.1
LONG_STEP_SECONDS = 2.0       # on a terminal, a finished step this long keeps its line


class Progress:
    """Steps one after another: `progress(name, total=None)` starts one (ending the one before);
    `progress.advance(item)` counts one item of a step started with a total; `close()` ends the last step."""

    def __init__(self, stream=None, *, live: bool = False):
        self.stream, self.live = stream, live
        self._lock = threading.Lock()
        self._start = time.perf_counter()
        self._step: str | None = None
        self._step_start = 0.0
        self._total: int | None = None
        self._done = 0
        self._item = ""
        self._drawn = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def __call__(self, step: str, total: int | None = None) -> None:
        if not self.enabled:
            return
        with self._lock:
            self._finish()
            self._step, self._step_start, self._total, self._done, self._item = \
                step, time.perf_counter(), total, 0, ""
            if self.live:
                self._draw()
            else:
                self._line(step if total is None else f"{step} ({total})")
        if self.live and self._thread is None:
            self._thread = threading.Thread(target=self._redraw, name="edgec-progress", daemon=True)
            self._thread.start()

    def advance(self, item: str = "") -> None:
        """One more item of the current step done or started (`item` names it, e.g. the pass now running)."""
        if not self.enabled or self._step is None:
            return
        with self._lock:
            self._done += 1
            self._item = item
            if self.live:
                self._draw()
            else:
                self._line(f"{self._step} {self._counter()}" + (f" {item}" if item else ""))

    def detail(self, item: str) -> None:
        """Say what the current item is doing now (a pass's own progress, e.g. calibration batches), uncounted."""
        if not self.enabled or self._step is None:
            return
        with self._lock:
            self._item = item
            if self.live:
                self._draw()
            else:
                self._line(f"{self._step} {self._counter()} {item}")

    def close(self) -> None:
        """End the last step and take the live line off the terminal (also on errors and Ctrl-C)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if not self.enabled:
            return
        with self._lock:
            self._finish()
            self._step = None

    def _counter(self) -> str:
        return f"{min(self._done, self._total)}/{self._total}" if self._total is not None else str(self._done)

    def _finish(self) -> None:
        """The current step is over: clear the live line, leaving the step's own line if it was long."""
        if self._step is None or not self.live:
            return
        seconds = time.perf_counter() - self._step_start
        self._clear()
        if seconds >= LONG_STEP_SECONDS:
            count = f" ({self._done} of {self._total})" if self._total is not None else ""
            self.stream.write(f"  {self._step}{count}: {seconds:.1f}s\n")
            self.stream.flush()

    def _line(self, text: str) -> None:
        self.stream.write(f"[{time.perf_counter() - self._start:7.1f}s] {text}\n")
        self.stream.flush()

    def _draw(self) -> None:
        now = time.perf_counter()
        mark = f"[{self._counter()}]" if self._total is not None else _SPINNER[int(now / _REDRAW_SECONDS) % len(_SPINNER)]
        text = f"{mark} {self._step}" + (f" {self._item}" if self._item else "") + f"  {now - self._step_start:.1f}s"
        self.stream.write("\r\x1b[K" + text)
        self.stream.flush()
        self._drawn = True

    def _clear(self) -> None:
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def _redraw(self) -> None:
        while not self._stop.wait(_REDRAW_SECONDS):
            with self._lock:
                if self._step is not None:
                    self._draw()


_SILENT = Progress()
_current = _SILENT


def current() -> Progress:
    """The reporter of the running command (a silent one outside the CLI)."""
    return _current


@contextmanager
def reporting(stream, *, force: bool = False):
    """Report progress on `stream` while the block runs: live on a terminal, plain lines on a pipe only when
    forced (--progress), else nothing. The live line is taken off however the block ends."""
    global _current
    live = _isatty(stream)
    progress = Progress(stream if live or force else None, live=live)
    previous, _current = _current, progress
    try:
        yield progress
    finally:
        _current = previous
        progress.close()


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):   # a closed or wrapped stream
        return False
