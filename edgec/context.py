"""What a build is asked to do (BuildOptions) and what every pipeline stage may read (BuildContext)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .targets import Target

if TYPE_CHECKING:
    from .dataset import Dataset
    from .quantize import QuantizeOptions

# --offload auto: the descriptor's backends, each operator group measured against TVM's kernel, the faster kept
OFFLOAD_AUTO = "auto"


@dataclass(frozen=True)
class BuildOptions:
    opt_level: int = 2
    disabled_passes: tuple[str, ...] = ()
    dump_ir: Path | None = None
    # offload backends in priority order; None: the descriptor's; OFFLOAD_AUTO: the descriptor's, measured
    offload: tuple[str, ...] | str | None = None
    # the user's converter files for TFLite custom operators (edgec.frontends.custom_ops), run by their choice
    converters: tuple[Path, ...] = ()
    # graph inputs folded to constants at build time (--const-input), by name; they leave the bundle's signature
    const_inputs: dict = field(default_factory=dict)
    # --quantize int8 --calibration DATA (edgec.quantize); None: the model's own precision
    quantize: QuantizeOptions | None = None


@dataclass(frozen=True)
class BuildContext:
    """Built once per build and handed to every pass factory.

    The last three fields are where later stages plug in (calibration for quantization, a MetaSchedule
    database for tuning, library offload backends); a pass that needs one declares `applies=` on it, so adding
    such a stage is adding a file, not editing the registry.
    """
    target: Target
    options: BuildOptions
    calibration: Dataset | None = None      # --quantize's calibration samples (without the held-back ones)
    tuning_database: Path | None = None
    offload: tuple[str, ...] = ()
    # calibration's compiled tap modules (quantize.calibrate.Runner.tapping), for the passes of this build that tap
    # the same graph again (calibrate's taps, then gptq-weights-int8's: one compilation)
    tap_runners: list = field(default_factory=list, compare=False, repr=False)

    @property
    def offload_auto(self) -> bool:
        return self.options.offload == OFFLOAD_AUTO

    @property
    def opt_level(self) -> int:
        return self.options.opt_level

    def tvm_target(self):
        return self.target.tvm()

    def on_cpu(self) -> bool:
        """Whether the build compiles for a CPU (an llvm target): what the CPU kernel passes need."""
        return self.tvm_target().kind.name == "llvm"
