"""Tensor signatures shared by every stage: what a model takes and returns."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A dimension of None (an output's only) is known at run time: the manifest writes it as null."""
    name: str
    shape: tuple[int | None, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(None if x is None else int(x) for x in d["shape"]), d["dtype"])

    def random(self, rng: np.random.Generator) -> np.ndarray:
        """A deterministic test input: uniform [0, 1) floats, small non-negative integers."""
        dt = np.dtype(self.dtype)
        if np.issubdtype(dt, np.floating):
            return rng.random(self.shape, dtype=np.float32).astype(dt)
        if dt == np.bool_:
            return rng.integers(0, 2, self.shape).astype(dt)
        return rng.integers(0, min(16, np.iinfo(dt).max), self.shape).astype(dt)


def check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray]) -> None:
    """Raise a user-facing error unless `inputs` holds exactly one array per spec, of its shape and dtype.
    The check is the bundle runner's own (run.py), so edgec and a deployed bundle refuse the same inputs."""
    from .runtime import bundle_errors

    with bundle_errors() as runner:
        runner.check_inputs([s.to_json() for s in specs], inputs)


def tensor_file(index: int, name: str) -> str:
    """The .npy file name of the index-th input or output (docs/bundle-format.md): unique, and safe on any
    file system whatever the tensor's name."""
    return f"{index}-{re.sub(r'[^A-Za-z0-9._-]', '_', name)[:64]}.npy"


def random_inputs(specs: tuple[TensorSpec, ...] | list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: s.random(rng) for s in specs}
