"""Run a bundle through its own C++ runner (edgec_run), natively or under qemu-user: the deployed code path."""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import EdgecError
from ..manifest import Manifest
from ..signature import check_inputs, tensor_file_name
from ..toolchain import build_runner, emulator_command, runtime_dir

_TIMING = re.compile(r"^edgec_run: load_ms=(\S+) first_ms=(\S+) median_ms=(\S+) min_ms=(\S+) peak_rss_kb=(\d+)", re.M)


@dataclass(frozen=True)
class RunnerResult:
    outputs: dict[str, np.ndarray]
    load_ms: float
    first_ms: float
    median_ms: float
    min_ms: float
    peak_rss_bytes: int  # the runner process's peak RSS; under qemu it includes the emulator's own memory
    emulated: bool
    command: list[str]


def run_with_runner(bundle_dir: str | Path, inputs: dict[str, np.ndarray], repeat: int = 1, warmup: int = 0,
                    threads: int | None = None) -> RunnerResult:
    """Build (cached) and run the bundle's edgec_run on `inputs`; `threads` defaults to the manifest's."""
    bundle_dir = Path(bundle_dir).resolve()
    manifest = Manifest.load(bundle_dir)
    check_inputs(manifest.inputs, inputs)

    runner = build_runner(bundle_dir, manifest.target)
    emulator = emulator_command(manifest.target)
    env = dict(os.environ)
    # qemu-user passes its environment to the guest, so the same variables work natively and emulated.
    lib_dir = str(runtime_dir(manifest.arch) / "lib")
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [lib_dir, env.get("LD_LIBRARY_PATH")]))
    threads = threads if threads is not None else manifest.target.get("threads")
    if threads is not None:
        env["TVM_NUM_THREADS"] = str(threads)

    with tempfile.TemporaryDirectory(prefix="edgec-run-") as tmp:
        in_paths = []
        for i, spec in enumerate(manifest.inputs):
            in_paths.append(os.path.join(tmp, f"in{i}.npy"))
            np.save(in_paths[-1], np.ascontiguousarray(inputs[spec.name]))
        out_dir = os.path.join(tmp, "out")
        command = [*emulator, str(runner), "-d", str(bundle_dir), "-o", out_dir,
                   "-n", str(repeat), "-w", str(warmup), *in_paths]
        proc = subprocess.run(command, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [f"no output, exit code {proc.returncode}"])[-1]
            raise EdgecError(f"the bundle's runner failed: {last}", f"the command was: {' '.join(command)}")
        m = _TIMING.search(proc.stdout)
        if m is None:
            raise EdgecError(f"the bundle's runner printed no timing line: {proc.stdout.strip()[-200:]!r}",
                             "rebuild the bundle with this edgec")
        outputs = {s.name: np.load(os.path.join(out_dir, tensor_file_name(s.name))) for s in manifest.outputs}
    load_ms, first_ms, median_ms, min_ms = map(float, m.groups()[:4])
    return RunnerResult(outputs, load_ms, first_ms, median_ms, min_ms, int(m.group(5)) * 1024, bool(emulator), command)
