"""manifest.json: the contract between a bundle and everything that runs it."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import EdgecError
from .signature import TensorSpec

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    model_name: str
    model_file: str           # the source model's file name
    model_sha256: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    library: str              # compiled Relax VM executable, relative to the bundle
    params: str | None        # tvm param dict keyed by the VM's parameter names; None when weights are bound
    target: dict              # {"name", "arch", "triple", "tvm_target", "threads"}
    versions: dict            # {"edgec", "tvm", "tvm_ffi"}
    passes: tuple[str, ...]   # pass names in the order they ran
    files: dict = field(default_factory=dict)  # relative path -> sha256, every file but the manifest
    entry: str = "main"

    @property
    def arch(self) -> str:
        return self.target["arch"]

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "file": self.model_file, "sha256": self.model_sha256},
            "entry": self.entry,
            "inputs": [s.to_json() for s in self.inputs],
            "outputs": [s.to_json() for s in self.outputs],
            "library": self.library,
            "params": self.params,
            "target": self.target,
            "versions": self.versions,
            "passes": list(self.passes),
            "files": self.files,
        }

    @classmethod
    def from_json(cls, d: dict) -> "Manifest":
        return cls(
            model_name=d["model"]["name"], model_file=d["model"]["file"], model_sha256=d["model"]["sha256"],
            inputs=tuple(TensorSpec.from_json(s) for s in d["inputs"]),
            outputs=tuple(TensorSpec.from_json(s) for s in d["outputs"]),
            library=d["library"], params=d["params"], target=d["target"], versions=d["versions"],
            passes=tuple(d["passes"]), files=d["files"], entry=d.get("entry", "main"),
        )

    @classmethod
    def load(cls, bundle_dir: str | Path) -> "Manifest":
        path = Path(bundle_dir) / MANIFEST_NAME
        if not Path(bundle_dir).exists():
            raise EdgecError(f"bundle {bundle_dir} does not exist", "check the path given to edgec build -o")
        if not path.is_file():
            raise EdgecError(f"{bundle_dir} is not an edgec bundle: no {MANIFEST_NAME}",
                             "pass the directory written by 'edgec build -o DIR'")
        try:
            data = json.loads(path.read_text())
            if data.get("format_version") != FORMAT_VERSION:
                raise EdgecError(f"{path} has format version {data.get('format_version')}, "
                                 f"this edgec reads version {FORMAT_VERSION}", "rebuild the bundle with this edgec")
            return cls.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            raise EdgecError(f"{path} is not a valid manifest ({e})", "rebuild the bundle") from e

    def verify_files(self, bundle_dir: str | Path) -> None:
        """Fail when a bundle file is missing or was changed after the build."""
        for rel, digest in self.files.items():
            p = Path(bundle_dir) / rel
            if not p.is_file():
                raise EdgecError(f"bundle file {p} is missing", "copy the whole bundle directory")
            if sha256_file(p) != digest:
                raise EdgecError(f"bundle file {p} does not match its sha256 in the manifest",
                                 "the file was modified or corrupted; copy or rebuild the bundle")
