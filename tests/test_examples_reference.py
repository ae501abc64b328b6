"""Sanity tests of the example model generator, the reference runtimes and the real test models."""
from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest

from edgec.errors import EdgecError
from edgec.examples import mobilenet_v2
from edgec.reference import ReferenceRuntime
from models import REAL, inputs_for, real_model

@pytest.fixture(scope="module")
def mbv2(tmp_path_factory):
    return mobilenet_v2(tmp_path_factory.mktemp("examples") / "mobilenetv2.onnx")


def test_mobilenet_v2_structure(mbv2):
    model = onnx.load(mbv2)
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    depthwise = [n for n in model.graph.node if n.op_type == "Conv"
                 and any(a.name == "group" and a.i > 1 for a in n.attribute)]
    assert ops.count("BatchNormalization") == ops.count("Conv") == 52
    assert len(depthwise) == 17 and ops.count("Clip") == 35 and ops.count("Add") == 10
    assert all(len(n.input) == 3 for n in model.graph.node if n.op_type == "Clip")  # opset-17 min/max inputs
    assert [i.name for i in model.graph.input] == ["input"] and [o.name for o in model.graph.output] == ["logits"]


def test_example_command_writes_the_generated_model(tmp_path):
    from click.testing import CliRunner

    from edgec.cli import main

    result = CliRunner().invoke(main, ["example", "mobilenetv2", "-o", str(tmp_path / "cli.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "cli.onnx").read_bytes() == mobilenet_v2(tmp_path / "api.onnx").read_bytes()


def test_mobilenet_v2_deterministic(tmp_path):
    a, b, c = (mobilenet_v2(tmp_path / f"{n}.onnx", seed=s) for n, s in [("a", 0), ("b", 0), ("c", 1)])
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_mobilenet_v2_runs(mbv2):
    ref = ReferenceRuntime(mbv2, threads=2)
    rng = np.random.default_rng(0)
    x1, x2 = (rng.random((1, 3, 224, 224), dtype=np.float32) for _ in range(2))
    y1, y2 = ref.run({"input": x1})["logits"], ref.run({"input": x2})["logits"]
    assert y1.shape == (1, 1000) and np.isfinite(y1).all()
    assert 0.1 < y1.std() < 100  # neither vanished nor exploded over the ~50 layers
    assert np.abs(y1 - y2).max() > 1e-3 * np.abs(y1).max()  # depends on the input


def test_mobilenet_v2_options(tmp_path):
    path = mobilenet_v2(tmp_path / "small.onnx", width=0.5, resolution=96, num_classes=10)
    y = ReferenceRuntime(path).run({"input": np.zeros((1, 3, 96, 96), np.float32)})["logits"]
    assert y.shape == (1, 10)
    head = next(n for n in onnx.load(path).graph.initializer if n.name == "head.weight")
    assert head.dims[0] == 1280  # the last conv never shrinks below 1280, as in the paper


@pytest.mark.parametrize("name", REAL)
def test_reference_runtime_real(name):
    ref = ReferenceRuntime(real_model(name), threads=2)
    ins, outs = REAL[name]
    assert ref.input_names == list(ins) and ref.output_names == list(outs)
    assert ref.name.startswith("onnxruntime 1." if name.startswith("ppocr") else "LiteRT 2.")
    results = ref.run(inputs_for(name))
    assert {k: r.shape for k, r in results.items()} == outs
    assert all(np.isfinite(r).all() for r in results.values())
    if name == "ppocrv4_det":
        assert (results["sigmoid_0.tmp_0"] > 0.3).mean() > 0.05  # text_image() really contains "text"


def test_reference_never_remaps_input_names():
    """A name the model does not have is an error naming both sets, never matched by position."""
    ref = ReferenceRuntime(real_model("face_detection_short_range"))
    x = inputs_for("face_detection_short_range")["input"]
    assert set(ref.run({"input": x})) == {"regressors", "classificators"}
    for wrong in ({"serving_default_input:0": x}, {"input": x, "b": x}):
        with pytest.raises(EdgecError, match="serving_default_input:0|'b'") as e:
            ref.run(wrong)
        assert "['input']" in e.value.message


def test_reference_errors(monkeypatch, mbv2, tmp_path):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` raise ImportError
    with pytest.raises(EdgecError, match="onnxruntime is not installed") as e:
        ReferenceRuntime(mbv2)
    assert "edgec[verify]" in e.value.hint
    with pytest.raises(EdgecError):
        ReferenceRuntime(tmp_path / "model.pb")
