"""Run a bundle through its own C++ runner (edgec_run), natively or under qemu-user: the deployed code path."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgecError, last_stderr_line
from ..manifest import Manifest
from ..signature import check_inputs
from ..toolchain import build_runner, emulator_command, emulator_env, runtime_dir

_TIMING = re.compile(r"^edgec_run: load_ms=(\S+) first_ms=(\S+) median_ms=(\S+) min_ms=(\S+) peak_rss_kb=(\d+) "
                     r"repeat=\d+ warmup=\d+ threads=(\d+)$", re.M)


@dataclass(frozen=True)
class RunnerResult:
    outputs: dict[str, np.ndarray] | list[dict[str, np.ndarray]]   # a list, one per step, for a stream
    load_ms: float
    first_ms: float
    median_ms: float
    min_ms: float
    peak_rss_bytes: int  # the runner process's peak RSS; under qemu it includes the emulator's own memory
    threads: int         # the TVM runtime's worker threads, as the runner reports them
    emulated: bool
    command: list[str]


def run_with_runner(bundle_dir: str | Path, inputs: dict[str, np.ndarray] | list[dict], repeat: int = 1,
                    warmup: int = 0, threads: int | None = None, verify: bool = True, stream: bool = False) -> RunnerResult:
    """Build (cached) and run the bundle's edgec_run on `inputs`; `threads` defaults to the manifest's. With
    `stream`, `inputs` is a list of steps without the state inputs, run in order from the initial state with the
    state fed back (edgec_run --stream), and the result's outputs are a list with each step's.

    edgec_run checks the bundle itself (files, sizes, sha256 unless verify=False) before it loads anything."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    steps = inputs if stream else [inputs]
    specs = manifest.stream_inputs if stream else manifest.inputs
    for step in steps:
        check_inputs(specs, step)
    if stream and not manifest.states:
        raise EdgecError("the model keeps no state between calls", "run each input on its own (drop --chunks)")
    target = manifest.target

    runner = build_runner(bundle_dir, target)
    emulator = emulator_command(target)
    env = {**os.environ, **emulator_env(target)}
    # qemu-user passes its environment to the guest, so the same variable works natively and emulated.
    lib_dir = str(runtime_dir(target.arch) / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [lib_dir, env.get("LD_LIBRARY_PATH")]))

    with tempfile.TemporaryDirectory(prefix="edgec-run-") as tmp:
        in_paths = []
        for k, step in enumerate(steps):
            for i, spec in enumerate(specs):
                in_paths.append(os.path.join(tmp, f"in{k}-{i}.npy"))
                np.save(in_paths[-1], np.require(step[spec.name], requirements="C"))   # ascontiguousarray makes 0-d 1-d
        out_dir = os.path.join(tmp, "out")
        command = [*emulator, str(runner), "-d", str(bundle_dir), "-o", out_dir, "-n", str(repeat), "-w", str(warmup),
                   *(["-t", str(threads)] if threads is not None else []), *([] if verify else ["--no-verify"]),
                   *(["--stream"] if stream else []), *in_paths]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = last_stderr_line(proc.stderr, f"no output, exit code {proc.returncode}")
            raise EdgecError(f"the bundle's runner failed: {last}", f"the command was: {' '.join(command)}")
        m = _TIMING.search(proc.stdout)
        if m is None:
            raise EdgecError(f"the bundle's runner printed no timing line: {proc.stdout.strip()[-200:]!r}",
                             "rebuild the bundle with this edgec")
        # a stream's step k writes into out/k/
        dirs = [os.path.join(out_dir, str(k)) for k in range(len(steps))] if stream else [out_dir]
        outputs = [{s.name: np.load(os.path.join(d, s.file), allow_pickle=False) for s in manifest.outputs}
                   for d in dirs]
    load_ms, first_ms, median_ms, min_ms = map(float, m.groups()[:4])
    return RunnerResult(outputs if stream else outputs[0], load_ms, first_ms, median_ms, min_ms, int(m.group(5)) * 1024, int(m.group(6)),
                        bool(emulator), command)
