"""int8 post-training quantization (`edgec build --quantize int8 --calibration DATA`).

Two passes of edgec's pipeline (edgec/passes/quantize.py): `calibrate` runs the float model on the calibration
samples with taps on the tensors quantization needs and records a range for each; `quantize-int8` rewrites the
graph into QDQ form — `dequantize(quantize(x))` on those tensors, int8 weights with a per-channel dequantize, int32
biases — the form TVM's ONNX importer gives a QDQ model from onnxruntime.quantization, which the offload backends
turn into integer kernels. `analysis` decides which tensors those are, the same way for both passes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import EdgecError

if TYPE_CHECKING:
    from ..images import Preprocess

MODES = ("int8", "fp16", "int8-weights")   # fp16 and int8-weights: edgec/passes/precision.py, no calibration
CALIBRATED = ("int8",)
METHODS = ("minmax", "percentile", "entropy")
DEFAULT_METHOD = "minmax"
DEFAULT_PERCENTILE = 99.99
# --quantize fp16 refuses an fp16 graph whose output SQNR against float32 on the sample is below this, unless
# --min-sqnr/--max-error set another floor: 1% relative RMS error (--max-error 1%). One fp16 rounding is about 70 dB
# under its value and the example MobileNetV2's 52 layers keep 50 dB, so 30 dB under one rounding is range lost
# (a cancelling sum, values below fp16's normal range), not rounding. The bundle stays within 6.02 dB of the graph
# (reference.PRECISION_RULE).
FP16_MIN_SQNR_DB = 40.0


@dataclass(frozen=True)
class QuantizeOptions:
    mode: str                        # a MODES entry
    calibration: Path | None         # DATA (edgec.dataset) for CALIBRATED modes: samples, the last ones held back
    method: str = DEFAULT_METHOD
    percentile: float = DEFAULT_PERCENTILE
    min_sqnr_db: float | None = None     # error budget (edgec.quantize.budget): output SQNR against float, dB;
    #                                      fp16: the fp16 graph's floor (None: FP16_MIN_SQNR_DB)
    max_error: float | None = None       # the budget as given by --max-error: relative RMS error, a fraction
    keep_float: tuple[str, ...] = ()     # globs on layer names left float whatever the budget
    preprocess: "Preprocess | None" = None   # --preprocess: how a calibration folder's images become inputs

    @property
    def mixed(self) -> bool:
        return self.min_sqnr_db is not None or bool(self.keep_float)

    def held_back(self, samples: int) -> int:
        """Samples kept out of calibration for the before/after table: a fifth, at most 100."""
        return min(max(samples // 5, 1), 100)


def error_budget(min_sqnr: str | None, max_error: str | None, keep_float: tuple[str, ...], mode: str | None) -> dict:
    """QuantizeOptions' budget fields from --min-sqnr DB / --max-error PCT / --keep-float as typed; one line refusing
    a malformed value, both budgets at once, a budget without --quantize int8 or fp16 (fp16: the floor of the fp16
    graph's SQNR, FP16_MIN_SQNR_DB by default), or --keep-float without --quantize int8."""
    if keep_float and mode not in CALIBRATED:
        raise EdgecError("--keep-float is for --quantize int8", "add --quantize int8 --calibration DATA, or drop "
                                                                "--keep-float")
    given = next((flag for flag, v in (("--min-sqnr", min_sqnr), ("--max-error", max_error)) if v), None)
    if given and mode not in (*CALIBRATED, "fp16"):
        raise EdgecError(f"{given} is for --quantize int8 or fp16", f"add --quantize int8 --calibration DATA (the "
                                                                    f"error budget) or --quantize fp16 (the fp16 "
                                                                    f"graph's floor), or drop {given}")
    if min_sqnr and max_error:
        raise EdgecError("--min-sqnr and --max-error both set the error budget", "give one of them")
    out: dict = {"keep_float": tuple(keep_float)}
    if min_sqnr:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(db)?\s*", min_sqnr, re.IGNORECASE)
        if match is None or float(match[1]) <= 0:
            raise EdgecError(f"--min-sqnr {min_sqnr!r} is not a positive number of dB", "e.g. --min-sqnr 30 or 30dB")
        out["min_sqnr_db"] = float(match[1])
    if max_error:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*%?\s*", max_error)
        if match is None or not 0 < float(match[1]) < 100:
            raise EdgecError(f"--max-error {max_error!r} is not a percentage between 0 and 100",
                             "e.g. --max-error 1% (relative RMS error of the outputs)")
        out["max_error"] = float(match[1]) / 100
        out["min_sqnr_db"] = -20 * math.log10(out["max_error"])
    return out
