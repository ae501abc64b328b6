"""Running bundles. `bundle_runner()` is edgec's own copy of the bundle's run.py, loaded once as a module:
it is byte-identical to the run.py every bundle ships, so edgec validates and runs bundles with exactly the
code that ships, and never executes Python taken from a bundle."""
from __future__ import annotations

import functools
import importlib.util
from contextlib import contextmanager
from types import ModuleType

from ..errors import EdgecError
from ..resources import data_dir


def run_py_path():
    """The run.py that write_bundle copies into every bundle."""
    return data_dir("templates") / "bundle" / "run.py"


@functools.cache
def bundle_runner() -> ModuleType:
    spec = importlib.util.spec_from_file_location("edgec._bundle_run", run_py_path())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@contextmanager
def bundle_errors():
    """Yields run.py's module; its BundleError becomes an EdgecError with the same message and hint."""
    runner = bundle_runner()
    try:
        yield runner
    except runner.BundleError as e:
        raise EdgecError(e.message, e.hint) from e
