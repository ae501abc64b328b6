"""edgec's pass pipeline over Relax. Importing this package registers every pass module below."""
# quantize before offload: at equal constraints the first registered runs first, and offload takes the QDQ form
from . import cpu_schedule, dequantize, fold, lookup, lower, params, precision, quantize, simplify, upsample  # noqa: F401  (they register passes)
from ..offload import passes as _offload_passes  # noqa: F401,E402  (the offload steps, edgec/offload/passes.py)
from . import int8_kernels  # noqa: F401,E402  (after the offload steps, whose graph preparation it reuses)
from . import deconv  # noqa: F401,E402  (after the offload steps and int8-kernels: what they leave)
from .manager import PassError, PassRecord, PassTimer, count_calls, dump_name, pass_context, run_pipeline
from .registry import PHASES, PassSpec, PlannedStep, all_passes, plan, register_pass, schedule

__all__ = ["PHASES", "PassError", "PassRecord", "PassSpec", "PassTimer", "PlannedStep", "all_passes", "count_calls",
           "dump_name", "pass_context", "plan", "register_pass", "run_pipeline", "schedule"]
