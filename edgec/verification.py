"""Build-time verification.

The staged bundle runs a sample input through the runner its target uses on this machine (see
`runtime.choose_runner`), and its outputs are compared, by name, with the reference runtime's (onnxruntime,
LiteRT) under the one tolerance rule. The manifest records the result: "verified" with the reference, the
runner and the errors, or "not verified" with the reason (no reference runtime, a model the reference refuses,
no way to run the target's code here). Outputs beyond the tolerance stop the build: a wrong number is never
shipped with a shrug.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .errors import EdgecError
from .frontends import ImportedModel
from .manifest import not_verified
from .reference import DEFAULT_TOLERANCE, ReferenceRuntime, ReferenceUnavailable, Tolerance, compare_outputs
from .signature import check_inputs, random_inputs
from .targets import Target


class VerificationFailed(EdgecError):
    """The compiled model disagrees with the reference runtime: a bug in edgec or TVM, not in the user's input."""
    exit_code = 1


def sample_inputs(model: ImportedModel, given: dict[str, np.ndarray] | list[str] | None) -> dict[str, np.ndarray]:
    """The user's sample, as arrays or as `--input` values (NAME=FILE.npy, read the way run.py reads them) — for
    models whose inputs must be valid, e.g. indices — or a seeded random one."""
    if given is None:
        return random_inputs(model.inputs)
    if not isinstance(given, dict):
        from .runtime import bundle_errors

        with bundle_errors() as runner:
            given = runner.read_inputs([{"name": s.name} for s in model.inputs], list(given))
    check_inputs(model.inputs, given)
    return given


def reference_outputs(model: ImportedModel, inputs: dict[str, np.ndarray]) -> tuple[str, dict] | str:
    """(reference name, outputs by name), or the reason the reference runtime cannot give them."""
    try:
        ref = ReferenceRuntime(model.path)
        return ref.name, ref.run({**inputs, **model.constants})   # the model file still takes the folded inputs
    except ReferenceUnavailable as e:
        return str(e)


def verify_staged(bundle_dir: Path, target: Target, inputs: dict[str, np.ndarray], reference: tuple[str, dict] | str,
                  tolerance: Tolerance = DEFAULT_TOLERANCE) -> dict:
    """Run the staged bundle on `inputs` and compare with `reference`; returns the manifest's "verification"."""
    from .runtime import choose_runner, run_bundle

    if isinstance(reference, str):
        return not_verified(reference, tolerance)
    try:
        runner = choose_runner(target)
    except EdgecError as e:
        return not_verified(f"cannot run {target.name} code here ({e.message})", tolerance)
    reference_name, expected = reference
    outputs = run_bundle(bundle_dir, inputs, runner)
    comparison = compare_outputs(outputs, expected, tolerance, against=reference_name)
    if not comparison.ok:
        worst = max(comparison.outputs.values(), key=lambda o: (not o.ok, o.max_rel))
        what = worst.problem or f"max abs error {worst.max_abs:.3g} ({worst.max_rel:.3g} of its range)"
        raise VerificationFailed(
            f"the compiled model disagrees with {reference_name} on output '{worst.name}': {what}, beyond "
            f"atol={tolerance.atol:g} + rtol={tolerance.rtol:g} * max|ref|; no bundle was written",
            "this is a bug in edgec or TVM: rebuild with -O0 or --disable-pass to find the pass, and report it "
            "with the model")
    return {"status": "verified", "reason": None, "reference": reference_name, "runner": runner,
            "tolerance": tolerance.to_json(),
            "outputs": {o.name: {"max_abs": o.max_abs, "max_rel": o.max_rel} for o in comparison.outputs.values()}}
