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


# How a bundle runs on this machine: the values of choose_runner() and RunResult.mode.
IN_PROCESS, NATIVE_RUNNER, QEMU = "in-process", "native runner", "qemu"


def check_runs_here(target) -> None:
    """An EdgecError unless code built for `target` (a Target of this machine's architecture) runs here: its device
    exists, and this CPU has the instruction-set extensions the code may use (else SIGILL would stop edgec)."""
    import tvm

    from ..toolchain import features_this_cpu_lacks

    kind = target.device.kind
    if not tvm.device(kind, 0).exist:
        raise EdgecError(f"this machine has no {kind} device for {target.name}", "run the bundle on the board")
    lacking = features_this_cpu_lacks(target.tvm())
    if lacking:
        raise EdgecError(f"{target.name}'s code uses {', '.join(lacking)}, which this machine's CPU "
                         f"({tvm.target.codegen.llvm_get_system_cpu()}) lacks", "run the bundle on the board")


def choose_runner(target) -> str:
    """How this machine runs code built for `target` (a Target), from its descriptor: in process (run.py) for
    this architecture, on a device TVM finds here, where the CPU has the instructions the code uses; under the
    descriptor's emulator (the C++ runner in qemu-user) for another CPU architecture. An EdgecError says why neither
    works."""
    from ..toolchain import emulator_command, host_arch

    kind = target.device.kind
    if target.arch == host_arch():
        check_runs_here(target)
        return IN_PROCESS
    if kind != "cpu":
        raise EdgecError(f"{target.name} runs on a {kind} device of a {target.arch} machine, which cannot be "
                         "emulated here", "run the bundle on the board")
    emulator_command(target)   # raises when the emulator or its sysroot is missing
    return QEMU


def run_bundle(bundle_dir, inputs: dict, runner: str, threads: int | None = None, verify: bool = True) -> dict:
    """Outputs by name of one run of a bundle through `runner` (a choose_runner() value, or NATIVE_RUNNER for
    the C++ runner on this machine). Every runner checks the bundle's files first."""
    if runner == IN_PROCESS:
        from .local import run_in_process

        return run_in_process(bundle_dir, inputs, threads, verify)
    from ..manifest import Manifest
    from .native import run_with_runner

    # edgec builds the C++ runner from the bundle's main.cc: check it is the file the manifest lists first.
    Manifest.load(bundle_dir, check_files=True, verify=verify)
    return run_with_runner(bundle_dir, inputs, threads=threads, verify=verify).outputs


def stream_bundle(bundle_dir, steps: list[dict], runner: str, threads: int | None = None, verify: bool = True) -> list:
    """Outputs by name of each step of a stream through `runner`, from the model's initial state, each step's state
    fed back by the runner (run.py's Model.stream, or edgec_run --stream). `steps` hold the inputs without the
    state inputs."""
    if runner == IN_PROCESS:
        from .local import load_bundle

        model = load_bundle(bundle_dir, threads, verify)
        with bundle_errors():
            return [model.stream(step) for step in steps]
    from ..manifest import Manifest
    from .native import run_with_runner

    Manifest.load(bundle_dir, check_files=True, verify=verify)
    return run_with_runner(bundle_dir, steps, threads=threads, verify=verify, stream=True).outputs
