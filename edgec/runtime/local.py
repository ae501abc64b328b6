"""Run a bundle in this process with edgec's own copy of run.py (edgec.runtime.bundle_runner): the code every
bundle ships, never Python taken from the bundle being run."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from . import bundle_errors


def load_bundle(bundle_dir: str | Path, threads: int | None = None, verify: bool = True):
    """run.py's `Model` for a bundle: every file checked against the manifest (sha256 unless verify=False),
    the library loaded from a private copy of the checked bytes. Its run() and time() raise run.py's
    BundleError; wrap calls in edgec.runtime.bundle_errors() for an EdgecError."""
    with bundle_errors() as runner:
        return runner.Model(Path(bundle_dir), threads=threads, verify=verify)


def run_in_process(bundle_dir: str | Path, inputs: dict[str, np.ndarray], threads: int | None = None,
                   verify: bool = True) -> dict[str, np.ndarray]:
    """Outputs by name of one run of a bundle on `inputs`."""
    model = load_bundle(bundle_dir, threads, verify)
    with bundle_errors():
        return model.run(inputs)
