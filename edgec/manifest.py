"""manifest.json: the contract between a bundle and everything that runs it (docs/bundle-format.md).

edgec writes it from the `Manifest` dataclass. Reading and checking it is the bundle's own run.py (edgec's
copy, see edgec.runtime): one implementation of the checks, the same for edgec and for a deployed bundle.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from .errors import EdgecError
from .reference import DEFAULT_TOLERANCE, Tolerance
from .runtime import bundle_errors
from .signature import TensorSpec
from .targets import Target

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 3


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class BundleTensor(TensorSpec):
    """An input or output with the .npy file name it has in sample/ and in a runner's output directory."""
    file: str

    def to_json(self) -> dict:
        return {**super().to_json(), "file": self.file}

    @classmethod
    def from_json(cls, d: dict) -> "BundleTensor":
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d["file"])


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    size: int

    @classmethod
    def of(cls, path: Path) -> "FileEntry":
        return cls(sha256_file(path), path.stat().st_size)


@dataclass(frozen=True)
class SampleDirs:
    """Where the sample inputs and the reference's outputs for them live, relative to the bundle."""
    inputs: str = "sample/inputs"
    expected: str = "sample/expected"


def _list(value, origin: str) -> list:
    if not isinstance(value, list):
        raise EdgecError(f"{origin}: offload_auto is not a list", "rebuild the bundle")
    return value


def _record(value, origin: str) -> dict | None:
    if value is not None and not isinstance(value, dict):
        raise EdgecError(f"{origin}: quantization is not an object", "rebuild the bundle")
    return value


def not_verified(reason: str, tolerance: Tolerance = DEFAULT_TOLERANCE) -> dict:
    """The manifest's "verification" entry of a bundle whose outputs were not compared with a reference."""
    return {"status": "not verified", "reason": reason, "reference": None, "runner": None,
            "tolerance": tolerance.to_json(), "outputs": {}}


@dataclass(frozen=True)
class OffloadDecision:
    """One operator group `--offload auto` timed at build time, and where it runs (docs/bundle-format.md)."""
    operator: str          # "conv2d", "matmul"
    group: str             # the backend's pattern and the data input's shape, "onednn.conv2d_bias_clip 1x48x48x16"
    calls: int             # call sites of this group in the model
    backend: str           # the backend whose library call was timed
    backend_ms: float
    tvm_ms: float          # TVM's kernel for the same group
    runs_in: str           # the backend's name, or "tvm"

    @classmethod
    def from_json(cls, d, origin: str) -> "OffloadDecision":
        """An entry of a manifest's offload_auto, which run.py leaves unchecked (runners do not use it)."""
        types = {"operator": str, "group": str, "calls": int, "backend": str, "backend_ms": (int, float),
                 "tvm_ms": (int, float), "runs_in": str}
        if not isinstance(d, dict) or any(not isinstance(d.get(k), t) or isinstance(d.get(k), bool)
                                          for k, t in types.items()):
            raise EdgecError(f"{origin}: an offload_auto entry is not {{{', '.join(types)}}} with their types",
                             "rebuild the bundle")
        return cls(**{k: d[k] for k in types})


@dataclass(frozen=True)
class StateRecord:
    """A streaming model's state: runners feed output `output` back into input `input` (docs/bundle-format.md)."""
    name: str
    input: str
    output: str


@dataclass(frozen=True)
class Manifest:
    model_name: str
    model_file: str                     # the source model's file name
    model_sha256: str
    entry: str                          # the VM function runners call
    load_function: str | None           # "load": called once at load with the weights; its results follow the inputs in
                                        # every call of `entry` (None: `entry` takes the weights themselves)
    inputs: tuple[BundleTensor, ...]
    outputs: tuple[BundleTensor, ...]
    library: str                        # the compiled Relax VM executable, relative to the bundle
    params: str | None                  # tvm param dict keyed by the parameter names of `load` (else `entry`)
    target: Target
    versions: dict[str, str]            # {"edgec", "tvm", "tvm_ffi"}
    passes: tuple[str, ...]             # pass names in the order they ran
    sample: SampleDirs | None           # None when no sample was written
    verification: dict                  # see docs/bundle-format.md; not_verified() until a reference agreed
    files: dict[str, FileEntry]         # every file but the manifest, by relative POSIX path
    shared_libs: tuple[str, ...] = ()   # libraries runners load before `library`, in order (offload backends')
    cpu_features: tuple[str, ...] = ()  # instruction-set extensions the code may use (LLVM's names; CPU targets):
                                        # the runners refuse a CPU that lacks one, where it would stop with SIGILL
    offload_auto: tuple[OffloadDecision, ...] = ()   # --offload auto's measured decisions; runners ignore them
    states: tuple[StateRecord, ...] = ()  # a streaming model's state pairs
    initial_states: str | None = None   # tvm param dict of the states' initial values, keyed by state input name
    quantization: dict | None = None    # --quantize: mode, calibration method, what stayed float; runners ignore it

    @property
    def arch(self) -> str:
        return self.target.arch

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(**self.verification["tolerance"])

    @property
    def shared_library_bytes(self) -> int:
        """The bytes of the shared libraries it ships (lib/: the offload backends', the same in every bundle for the
        target; an onnxruntime model file does not count onnxruntime's either)."""
        return sum(self.files[path].size for path in self.shared_libs if path in self.files)

    def to_json(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "model": {"name": self.model_name, "file": self.model_file, "sha256": self.model_sha256},
            "entry": self.entry,
            "load": self.load_function,
            "inputs": [t.to_json() for t in self.inputs],
            "outputs": [t.to_json() for t in self.outputs],
            "library": self.library,
            "params": self.params,
            "target": self.target.to_json(),
            "versions": self.versions,
            "passes": list(self.passes),
            "sample": vars(self.sample) if self.sample else None,
            "verification": self.verification,
            "files": {rel: vars(entry) for rel, entry in sorted(self.files.items())},
            **({"shared_libs": list(self.shared_libs)} if self.shared_libs else {}),
            **({"cpu_features": list(self.cpu_features)} if self.cpu_features else {}),
            **({"offload_auto": [vars(d) for d in self.offload_auto]} if self.offload_auto else {}),
            **({"quantization": self.quantization} if self.quantization else {}),
            **({"states": {"initial": self.initial_states, "pairs": [vars(s) for s in self.states]}}
               if self.states else {}),
        }

    @classmethod
    def from_json(cls, d: dict, origin: str) -> "Manifest":
        """A manifest that run.py's load_manifest has checked; `origin` names it in errors."""
        return cls(
            model_name=d["model"]["name"], model_file=d["model"]["file"], model_sha256=d["model"]["sha256"],
            entry=d["entry"], load_function=d["load"], inputs=tuple(BundleTensor.from_json(t) for t in d["inputs"]),
            outputs=tuple(BundleTensor.from_json(t) for t in d["outputs"]), library=d["library"],
            params=d["params"], target=Target.from_json(d["target"], origin), versions=d["versions"],
            passes=tuple(d["passes"]), sample=SampleDirs(**d["sample"]) if d["sample"] else None,
            verification=d["verification"], files={rel: FileEntry(**e) for rel, e in d["files"].items()},
            shared_libs=tuple(d.get("shared_libs", ())), cpu_features=tuple(d.get("cpu_features", ())),
            offload_auto=tuple(OffloadDecision.from_json(e, origin) for e in _list(d.get("offload_auto", []), origin)),
            quantization=_record(d.get("quantization"), origin),
            states=tuple(StateRecord(**{k: p[k] for k in ("name", "input", "output")})
                         for p in (d["states"]["pairs"] if d.get("states") else ())),
            initial_states=d["states"]["initial"] if d.get("states") else None)

    @property
    def stream_inputs(self) -> tuple[BundleTensor, ...]:
        """The inputs a caller gives each step of a stream (the state inputs are fed back by the runners)."""
        fed = {s.input for s in self.states}
        return tuple(t for t in self.inputs if t.name not in fed)

    @classmethod
    def load(cls, bundle_dir: str | Path, *, check_files: bool = False, verify: bool = True) -> "Manifest":
        """Read and check a bundle's manifest (structure, types, consistency). With check_files, also refuse a
        bundle whose files differ from it: missing, unlisted, a symlink, another size, or another sha256
        (verify=False skips the sha256s and says so on stderr)."""
        bundle_dir = Path(bundle_dir)
        with bundle_errors() as runner:
            data = runner.load_manifest(bundle_dir)
            if check_files:
                runner.check_files(bundle_dir, data, verify)
        return cls.from_json(data, str(bundle_dir / MANIFEST_NAME))
