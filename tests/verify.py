"""The one way tests check a bundle: run it and compare with the reference runtime on the same inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from edgec import api
from models import ATOL, RTOL


def assert_close_to_reference(model_path: Path, bundle_dir: Path, inputs: dict[str, np.ndarray] | None = None, *,
                              emulate: bool | None = None, expect_mode: str | None = None,
                              atol: float = ATOL, rtol: float = RTOL):
    """Run the bundle (in process, native runner or qemu) and assert every output matches onnxruntime / LiteRT."""
    result = api.run(bundle_dir, inputs, emulate=emulate)
    if expect_mode is not None:
        assert result.mode == expect_mode, result.mode
    stats, ref_name, ok = api.compare(result, model_path, atol=atol, rtol=rtol)
    assert ok, f"{bundle_dir.name} ({result.mode}) vs {ref_name}: {stats}"
    print(f"{bundle_dir.name} ({result.mode}) vs {ref_name}: "
          + ", ".join(f"{s['name']} max abs {s['max_abs']:.3g} (rel {s['max_rel']:.3g})" for s in stats))
    return result, stats
