"""int8 post-training quantization (`edgec build --quantize int8 --calibration DATA`).

Two passes of edgec's pipeline (edgec/passes/quantize.py): `calibrate` runs the float model on the calibration
samples with taps on the tensors quantization needs and records a range for each; `quantize-int8` rewrites the
graph into QDQ form — `dequantize(quantize(x))` on those tensors, int8 weights with a per-channel dequantize, int32
biases — the form TVM's ONNX importer gives a QDQ model from onnxruntime.quantization, which the offload backends
turn into integer kernels. `analysis` decides which tensors those are, the same way for both passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MODES = ("int8", "fp16", "int8-weights")   # fp16 and int8-weights: edgec/passes/precision.py, no calibration
CALIBRATED = ("int8",)
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"
DEFAULT_PERCENTILE = 99.99


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str                        # a MODES entry
    calibration: Path | None         # DATA (edgec.dataset) for CALIBRATED modes: samples, the last ones held back
    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE

    def held_back(self, samples: int) -> int:
        """Samples kept out of calibration for the before/after table: a fifth, at most 100."""
        return min(max(samples // 5, 1), 100)
