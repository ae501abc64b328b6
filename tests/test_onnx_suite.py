"""The ONNX backend node suite (bench/onnx_suite.py) through edgec's import, passes and code generation for the
host: no wrong result that bench/onnx_suite_known.toml does not list, and every listed case still wrong (so the
list stays true). Takes a few minutes on 2 cores; the committed table is bench/onnx_suite.md."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))
import onnx_suite  # noqa: E402


def test_suite_has_no_unlisted_wrong_results():
    results = onnx_suite.run_suite(jobs=2)
    assert len(results) == len(onnx_suite.load_cases())
    problems = onnx_suite.check_known(results, onnx_suite.load_known(BENCH / "onnx_suite_known.toml"))
    assert not problems, "\n".join(problems)
    # A harness that broke (every case an import error, say) would have no wrong result either.
    committed = json.loads((BENCH / "onnx_suite.json").read_text())["totals"]["all cases"]["edgec"]["pass"]
    passed = sum(r.edgec == "pass" for r in results)
    assert passed >= 0.9 * committed, f"{passed} cases pass, the committed table has {committed}"


def test_comparison_rule():
    f32 = np.float32
    assert onnx_suite.mismatch(np.array([1.0, np.nan], f32), np.array([1.0005, np.nan], f32)) is None
    assert "elements differ" in onnx_suite.mismatch(np.array([1.0, 0.0], f32), np.array([1.0, np.nan], f32))
    assert "elements differ" in onnx_suite.mismatch(np.array([2e-7], f32), np.array([0.0], f32))   # atol 1e-7
    assert "dtype" in onnx_suite.mismatch(np.array([1], np.int64), np.array([1], np.int32))
    assert "shape" in onnx_suite.mismatch(np.zeros((1, 2), f32), np.zeros(2, f32))
    assert onnx_suite.mismatch([np.ones(2, f32)], [np.ones(2, f32)]) is None
    assert "sequence" in onnx_suite.mismatch(np.ones(2, f32), [np.ones(2, f32)])


def test_known_list_checks_both_ways():
    case = onnx_suite.CaseResult("test_a", "A", 8, False, "wrong", "output 0 differs")
    assert onnx_suite.check_known([case], {"test_a": "reason"}) == []
    assert "not in the known-issues list" in onnx_suite.check_known([case], {})[0]
    case.edgec = "pass"
    assert "no longer" not in onnx_suite.check_known([case], {"test_a": "reason"})[0]
    assert "now 'pass'" in onnx_suite.check_known([case], {"test_a": "reason"})[0]
