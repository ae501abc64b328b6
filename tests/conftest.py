"""Test order: the longest files first, so that under pytest -n 2 --dist loadfile (README) neither worker is left
with a long file at the end while the other is idle (a clean-clone run had one worker alone for its last 12 min)."""
from __future__ import annotations

# the longest files of a clean-clone run (its --durations), longest first; the others keep their order after them
LONGEST_FIRST = ["test_onnx_suite.py", "test_signals.py", "test_quantize.py", "test_progress.py", "test_cli_errors.py",
                 "test_publish_safety.py", "test_offload_auto.py", "test_verify_quantized.py", "test_offload_int8_arm.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: each file's tests stay in order
