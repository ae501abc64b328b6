"""Write a bundle: library, params, manifest, runners and README, rendered from templates/bundle.

Everything is written into a temporary sibling directory and renamed into place at the end, so an error
never leaves a half-written bundle behind, and a previous bundle at the same path stays intact until
the new one is complete.
"""
from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import jinja2
import numpy as np

from . import __version__
from .build import CompiledModel, export_library
from .errors import EdgecError
from .manifest import MANIFEST_NAME, Manifest, sha256_file
from .signature import tensor_file_name
from .resources import data_dir

LIBRARY_NAME = "model.so"
PARAMS_NAME = "params.bin"
# run.py --check passes when the max error relative to the output range stays below this.
CHECK_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Sample:
    """A sample input with the reference runtime's outputs for it, shipped in sample/."""
    inputs: dict[str, np.ndarray]
    expected: dict[str, np.ndarray]
    reference: str                   # e.g. "onnxruntime 1.31.1"


def _versions() -> dict:
    from importlib.metadata import version

    return {"edgec": __version__, "tvm": version("apache-tvm"), "tvm_ffi": version("apache-tvm-ffi")}


def _render_all(out: Path, context: dict) -> None:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(data_dir("templates") / "bundle"),
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    for template in env.list_templates(filter_func=lambda n: n.endswith(".j2")):
        (out / template[:-3]).write_text(env.get_template(template).render(**context))


def _prepare_destination(out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir / MANIFEST_NAME).is_file() and any(out_dir.iterdir()):
        raise EdgecError(f"{out_dir} exists and is not an edgec bundle",
                         "pick an empty or new directory for -o; edgec only replaces its own bundles")
    out_dir.parent.mkdir(parents=True, exist_ok=True)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Swap the finished bundle into place; the old one is removed only after the rename."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        out_dir.rename(old / out_dir.name)
    tmp.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_archive(bundle_dir: Path) -> Path:
    archive = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        tar.add(bundle_dir, arcname=bundle_dir.name)
    tmp.rename(archive)
    return archive


def write_bundle(compiled: CompiledModel, out_dir: Path, sample: Sample | None = None) -> Manifest:
    """Export the library and write the whole bundle to out_dir atomically."""
    out_dir = Path(out_dir).resolve()
    _prepare_destination(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)   # mkdtemp makes it private; a bundle is meant to be copied and shared
    try:
        manifest = _write_into(compiled, tmp, out_dir.name, sample)
        _publish(tmp, out_dir)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_into(compiled: CompiledModel, tmp: Path, bundle_name: str, sample: Sample | None) -> Manifest:
    import tvm

    model, target = compiled.model, compiled.target
    export_library(compiled, tmp / LIBRARY_NAME)
    params_name = None
    if compiled.params:
        params_name = PARAMS_NAME
        tvm.runtime.save_param_dict_to_file({k: tvm.runtime.tensor(v) for k, v in compiled.params.items()},
                                            str(tmp / PARAMS_NAME))
    if sample is not None:
        for sub, arrays in (("inputs", sample.inputs), ("expected", sample.expected)):
            (tmp / "sample" / sub).mkdir(parents=True, exist_ok=True)
            for name, array in arrays.items():
                np.save(tmp / "sample" / sub / tensor_file_name(name), array)
    target_json = target.to_json()
    versions = _versions()
    io = {"inputs": [dict(s.to_json(), file=tensor_file_name(s.name)) for s in model.inputs],
          "outputs": [dict(s.to_json(), file=tensor_file_name(s.name)) for s in model.outputs]}
    _render_all(tmp, {
        "model_name": model.name, "model_file": model.path.name, "target": target_json, "versions": versions,
        "library": LIBRARY_NAME, "params": params_name, "bundle_name": bundle_name, **io,
        "param_mb": f"{compiled.param_bytes / 1e6:.2f}", "has_sample": sample is not None,
        "reference": sample.reference if sample else None, "tolerance": CHECK_TOLERANCE,
    })
    files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = Manifest(
        model_name=model.name, model_file=model.path.name, model_sha256=sha256_file(model.path),
        inputs=model.inputs, outputs=model.outputs, library=LIBRARY_NAME, params=params_name,
        target=target_json, versions=versions,
        passes=tuple(p.spec.name for p in compiled.planned if p.enabled), files=files)
    (tmp / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest
