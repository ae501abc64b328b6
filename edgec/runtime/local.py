"""Run a host bundle in this process through the bundle's own run.py, the code a deployer runs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import EdgecError, last_line
from ..manifest import Manifest


def load_bundle_runner(bundle_dir: Path, threads: int | None = None):
    """The bundle's run.py `Model`, loaded from the bundle itself so edgec tests exactly what ships."""
    spec = importlib.util.spec_from_file_location(f"edgec_bundle_{abs(hash(str(bundle_dir)))}", bundle_dir / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.Model(bundle_dir, threads=threads)


def run_in_process(bundle_dir: Path, manifest: Manifest, inputs: dict[str, np.ndarray],
                   threads: int | None = None):
    """Returns (outputs by name, the loaded model for timing)."""
    try:
        model = load_bundle_runner(bundle_dir, threads)
    except Exception as e:
        raise EdgecError(f"cannot load bundle {bundle_dir}: {last_line(e)}",
                         f"it was built for {manifest.target['name']} ({manifest.arch}); "
                         "run bundles for other architectures with --emulate") from e
    return model.run(inputs), model
