"""Tensor signatures shared by every stage: what a model takes and returns."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .errors import EdgecError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], tuple(int(x) for x in d["shape"]), d["dtype"])

    def check(self, array: np.ndarray, what: str = "input") -> None:
        """Raise a user-facing error when an array does not match this spec."""
        if tuple(array.shape) != self.shape:
            raise EdgecError(
                f"{what} '{self.name}' has shape {list(array.shape)}, the model expects {list(self.shape)}",
                f"pass an array of shape {'x'.join(map(str, self.shape))}",
            )
        if str(array.dtype) != self.dtype:
            raise EdgecError(
                f"{what} '{self.name}' has dtype {array.dtype}, the model expects {self.dtype}",
                f"convert it with array.astype('{self.dtype}')",
            )

    def random(self, rng: np.random.Generator) -> np.ndarray:
        """A deterministic test input: uniform [0, 1) floats, small non-negative integers."""
        dt = np.dtype(self.dtype)
        if np.issubdtype(dt, np.floating):
            return rng.random(self.shape, dtype=np.float32).astype(dt)
        if dt == np.bool_:
            return rng.integers(0, 2, self.shape).astype(dt)
        return rng.integers(0, min(16, np.iinfo(dt).max), self.shape).astype(dt)


def check_inputs(specs: tuple[TensorSpec, ...], inputs: dict[str, np.ndarray]) -> None:
    """Raise a user-facing error unless `inputs` holds exactly one matching array per spec."""
    names = [s.name for s in specs]
    if set(inputs) != set(names):
        raise EdgecError(f"inputs {sorted(inputs)} do not match the model's inputs {names}",
                         "pass one array per model input, keyed by input name")
    for spec in specs:
        spec.check(np.asarray(inputs[spec.name]))


def tensor_file_name(name: str) -> str:
    """The .npy file a tensor is stored in; the bundle's runners (main.cc, run.py) use the same mapping."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name) + ".npy"


def random_inputs(specs: tuple[TensorSpec, ...] | list[TensorSpec], seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: s.random(rng) for s in specs}
