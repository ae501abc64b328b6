"""edgec's pass pipeline over Relax. Importing this package registers every pass module below."""
from . import fold, fuse, lower, params, simplify  # noqa: F401  (each module registers its passes)
from .manager import PassError, PassRecord, count_calls, run_pipeline
from .registry import PHASES, PassOptions, PassSpec, PlannedPass, all_passes, pipeline_for, register_pass

__all__ = ["PHASES", "PassError", "PassOptions", "PassRecord", "PassSpec", "PlannedPass", "all_passes",
           "count_calls", "pipeline_for", "register_pass", "run_pipeline"]
