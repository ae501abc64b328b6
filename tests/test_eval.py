"""`edgec eval` and api.evaluate (issue 9, item 6): a bundle and onnxruntime on every sample of a data set.

The classifier is trained here on sklearn's digits (a real labelled dataset shipped offline): a 64-32-10 MLP
exported to ONNX with onnx.helper, with a second, non-class output (the hidden layer as [1,2,16]), built for the
host by edgec. Its held-out split is the DATA; every reported number is checked against one computed here.
"""
from __future__ import annotations

import functools
import json
import warnings

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from edgec import api
from edgec.context import BuildOptions
from edgec.errors import EdgecError
from edgec.manifest import Manifest
from edgec.signature import TensorSpec
from test_cli_errors import check_error, cli
from verify import save_onnx

_OUTPUT_KEYS = {"name", "shape", "dtype", "sqnr_db", "exact", "max_abs_error", "nonfinite_mismatches", "class_scores",
                "top1_agreement", "top1_bundle", "top1_reference"}


@functools.cache
def _trained():
    """An MLP 64-32-10 trained on sklearn's digits: (weights w1, w2, b1, b2; held-out images [N,64] float32; their
    labels; sklearn's own accuracy on them)."""
    from sklearn.datasets import load_digits
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    images, labels = load_digits(return_X_y=True)
    images = (images / 16).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=0.25, random_state=0,
                                                        stratify=labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp = MLPClassifier(hidden_layer_sizes=(32,), max_iter=400, random_state=0).fit(x_train, y_train)
    return [*mlp.coefs_, *mlp.intercepts_], x_test, y_test.astype(np.int64), mlp.score(x_test, y_test)


def _digits_onnx(path, perturb: float = 0.0):
    """The MLP as ONNX, with its hidden layer as a second output [1,2,16]; `perturb` adds seeded noise of that
    scale to the weights, the way quantization would."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array((a + perturb * rng.standard_normal(a.shape)).astype(np.float32), n)
             for a, n in zip(_trained()[0], ["w1", "w2", "b1", "b2"])]
    inits.append(numpy_helper.from_array(np.array([1, 2, 16], np.int64), "hidden_shape"))
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"]),
             helper.make_node("Reshape", ["r", "hidden_shape"], ["hidden"])]
    return save_onnx(path, "digits_mlp", nodes, {"x": [1, 64]}, {"logits": [1, 10], "hidden": [1, 2, 16]}, inits)


def _digits_tflite(path):
    """The MLP as TFLite: FULLY_CONNECTED (ReLU fused), FULLY_CONNECTED."""
    from ai_edge_litert import schema_py_generated as schema

    from tests.tflite_builder import Graph

    w1, w2, b1, b2 = (a.astype(np.float32) for a in _trained()[0])
    g = Graph()
    x, h, y = g.tensor("x", (1, 64)), g.tensor("h", (1, 32)), g.tensor("logits", (1, 10))
    for src, w, b, dst, act in ((x, w1, b1, h, schema.ActivationFunctionType.RELU),
                                (h, w2, b2, y, schema.ActivationFunctionType.NONE)):
        options = schema.FullyConnectedOptionsT()
        options.fusedActivationFunction = act
        g.op(schema.BuiltinOperator.FULLY_CONNECTED,
             [src, g.tensor(f"w{dst}", w.T.shape, data=w.T), g.tensor(f"b{dst}", b.shape, data=b)], [dst],
             schema.BuiltinOptions.FullyConnectedOptions, options)
    return g.save(path, [x], [y])


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    model = _digits_onnx(d / "digits.onnx")
    _, x, y, sklearn_accuracy = _trained()
    bundle = api.build(model, "host", d / "bundle").bundle_dir
    np.savez(d / "test.npz", x=x, y=y)                        # [N,64] for the input [1,64]
    return {"dir": d, "model": model, "bundle": bundle, "x": x, "y": y, "sklearn": sklearn_accuracy}


def _onnxruntime_top1(model, x, y) -> float:
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    logits = np.concatenate([sess.run(["logits"], {"x": x[i:i + 1]})[0] for i in range(len(x))])
    return float((logits.argmax(axis=1) == y).mean())


def test_digits_eval_matches_onnxruntime(digits, monkeypatch):
    from edgec import benchmark

    timed = []          # latency: each runtime timed in a worker process of its own, as edgec bench does

    def run_blocks(specs, inputs, **kw):
        timed.append([(s.kind, s.path) for s in specs])
        return real_run_blocks(specs, inputs, **kw)

    real_run_blocks = benchmark.run_blocks
    monkeypatch.setattr(benchmark, "run_blocks", run_blocks)
    result = api.evaluate(digits["bundle"], digits["dir"] / "test.npz", digits["model"])
    assert timed == [[("edgec", digits["bundle"]), ("reference", digits["model"])]]
    assert result.samples == len(digits["y"]) == 450 and result.labelled
    logits, hidden = result.outputs
    assert (logits.name, logits.shape, logits.class_scores) == ("logits", (1, 10), True)
    # the reference's top-1 is onnxruntime's, computed here; the classifier learned (sklearn scores the same)
    assert logits.top1_reference == pytest.approx(_onnxruntime_top1(digits["model"], digits["x"], digits["y"]))
    assert abs(logits.top1_reference - digits["sklearn"]) <= 1 / 450 and logits.top1_reference > 0.9
    assert logits.top1_bundle == logits.top1_reference and logits.top1_agreement == 1.0
    assert logits.sqnr_db is None or logits.sqnr_db > 60, logits
    assert logits.max_abs_error < 1e-4 and logits.nonfinite_mismatches == 0
    # a hidden layer shaped [1,2,16] is not class scores: no top-1, said so
    assert (hidden.name, hidden.class_scores, hidden.top1_agreement, hidden.top1_bundle) == \
           ("hidden", False, None, None)
    assert hidden.sqnr_db is None or hidden.sqnr_db > 60
    assert any("'hidden'" in n and "class scores" in n for n in result.notes)
    files = [p for p in digits["bundle"].rglob("*") if p.is_file()]
    assert result.bundle_bytes == sum(p.stat().st_size for p in files)
    # the shared libraries it ships (lib/, the offload backends') apart: the same for every model, as onnxruntime's
    libraries = Manifest.load(digits["bundle"]).shared_libs
    assert result.shared_library_bytes == sum((digits["bundle"] / p).stat().st_size for p in libraries)
    assert (f"+ lib/ {result.shared_library_bytes / 1e6:.2f} MB" in result.text()) == bool(libraries)
    assert result.model_bytes == digits["model"].stat().st_size
    assert result.latency_ms["bundle"] > 0 and result.latency_ms["reference"] > 0
    print(result.text())


def test_metrics_against_another_model(digits):
    """Against a model with perturbed weights (as a quantized bundle differs from its float model), SQNR, max abs
    error and agreement are the ones computed here from onnxruntime's outputs of both models."""
    other = _digits_onnx(digits["dir"] / "perturbed.onnx", perturb=0.05)
    result = api.evaluate(digits["bundle"], digits["dir"] / "test.npz", other)
    run = {m: ort.InferenceSession(str(m), providers=["CPUExecutionProvider"]) for m in (digits["model"], other)}
    x = digits["x"]
    out, ref = ({name: np.concatenate([run[m].run([name], {"x": x[i:i + 1]})[0].reshape(1, -1) for i in range(len(x))])
                 for name in ("logits", "hidden")} for m in (digits["model"], other))
    for metrics in result.outputs:
        o, r = out[metrics.name].astype(np.float64), ref[metrics.name].astype(np.float64)
        assert not metrics.exact and metrics.nonfinite_mismatches == 0
        assert metrics.sqnr_db == pytest.approx(10 * np.log10((r ** 2).sum() / ((o - r) ** 2).sum()), abs=0.05)
        assert metrics.max_abs_error == pytest.approx(np.abs(o - r).max(), rel=1e-3)
    logits = result.outputs[0]
    assert logits.top1_agreement == pytest.approx((out["logits"].argmax(1) == ref["logits"].argmax(1)).mean())
    assert logits.top1_reference == pytest.approx((ref["logits"].argmax(1) == digits["y"]).mean())
    assert 10 < logits.sqnr_db < 60 and logits.top1_agreement < 1.0, logits
    assert any("not the file the bundle was built from" in n for n in result.notes)


def test_tflite_against_litert(digits):
    model = _digits_tflite(digits["dir"] / "digits.tflite")
    bundle = api.build(model, "host", digits["dir"] / "tflite").bundle_dir
    result = api.evaluate(bundle, digits["dir"] / "test.npz", model)
    (logits,) = result.outputs
    assert result.reference.startswith("LiteRT ") and result.samples == 450
    assert abs(logits.top1_reference - digits["sklearn"]) <= 1 / 450
    assert logits.top1_bundle == logits.top1_reference and logits.top1_agreement == 1.0
    assert logits.sqnr_db is None or logits.sqnr_db > 60, logits


def test_folder_and_forms_give_the_same_numbers(digits):
    """A folder of .npz files ([N,1,64] and [N,64] forms mixed) gives the numbers of the single file."""
    folder = digits["dir"] / "parts"
    folder.mkdir()
    x, y = digits["x"], digits["y"]
    np.savez(folder / "a.npz", x=x[:100, None, :], labels=y[:100])
    np.savez(folder / "b.npz", x=x[100:], labels=y[100:])
    whole = api.evaluate(digits["bundle"], digits["dir"] / "test.npz", digits["model"])
    parts = api.evaluate(digits["bundle"], folder, digits["model"])
    for a, b in zip(whole.outputs, parts.outputs):
        assert (a.top1_bundle, a.top1_reference, a.top1_agreement, a.max_abs_error, a.exact) == \
               (b.top1_bundle, b.top1_reference, b.top1_agreement, b.max_abs_error, b.exact)
        assert a.sqnr_db == pytest.approx(b.sqnr_db)


def test_held_back_part_through_the_api(digits):
    """What build --quantize is to do: evaluate the held-back end of a calibration set."""
    calibration, held_back = api.open_dataset(digits["dir"] / "test.npz",
                                              api.Manifest.load(digits["bundle"]).inputs).split(50)
    assert (len(calibration), len(held_back)) == (400, 50)
    result = api.evaluate(digits["bundle"], held_back, digits["model"])
    assert result.samples == 50
    expected = _onnxruntime_top1(digits["model"], digits["x"][400:], digits["y"][400:])
    assert result.outputs[0].top1_reference == pytest.approx(expected)


def test_preprocess_with_an_opened_dataset_refused(tmp_path):
    """A Dataset was opened with its preprocessing: evaluate refuses another rather than dropping it silently
    (refused before the bundle is read)."""
    np.savez(tmp_path / "set.npz", x=np.zeros((2, 64), np.float32))
    dataset = api.open_dataset(tmp_path / "set.npz", (TensorSpec("x", (1, 64), "float32"),))
    with pytest.raises(EdgecError, match="a Dataset and a preprocess") as e:
        api.evaluate(tmp_path / "bundle", dataset, tmp_path / "model.onnx", preprocess="scale=1")
    assert "pass preprocess to open_dataset" in e.value.hint


def test_cli_json_schema(digits):
    result = cli("eval", digits["bundle"], "--data", digits["dir"] / "test.npz", "--reference", digits["model"],
                 "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert set(report) == {"bundle", "data", "samples", "labelled", "threads", "reference", "bytes", "latency_ms",
                           "outputs", "notes"}
    assert report["samples"] == 450 and report["labelled"] is True and isinstance(report["threads"], int)
    assert report["reference"]["runtime"].startswith("onnxruntime ") and report["reference"]["model"].endswith(".onnx")
    assert set(report["bytes"]) == {"bundle", "shared_libraries", "model"} and all(isinstance(v, int) for v in report["bytes"].values())
    assert set(report["latency_ms"]) == {"bundle", "reference"}
    assert [o["name"] for o in report["outputs"]] == ["logits", "hidden"]
    for o in report["outputs"]:
        assert set(o) == _OUTPUT_KEYS
        assert isinstance(o["max_abs_error"], float) and isinstance(o["exact"], bool)
        assert o["sqnr_db"] is None or isinstance(o["sqnr_db"], float)
    logits = report["outputs"][0]
    assert logits["shape"] == [1, 10] and logits["top1_bundle"] == logits["top1_reference"] > 0.9
    assert all(isinstance(n, str) for n in report["notes"])


def test_cli_text_table(digits):
    result = cli("eval", digits["bundle"], "--data", digits["dir"] / "test.npz", "--reference", digits["model"])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "450 samples (labelled)" in out and "top-1 'logits'" in out and "latency, median (own process)" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith(("logits ", "hidden "))}
    assert set(rows) == {"logits", "hidden"} and "100.00%" in rows["logits"]


def test_unlabelled_data(digits):
    """Missing labels are fine: agreement and SQNR, no accuracy."""
    np.savez(digits["dir"] / "unlabelled.npz", x=digits["x"][:20])
    result = cli("eval", digits["bundle"], "--data", digits["dir"] / "unlabelled.npz", "--reference",
                 digits["model"], "--json")
    assert result.exit_code == 0, result.stderr
    logits = json.loads(result.stdout)["outputs"][0]
    assert logits["top1_agreement"] == 1.0 and logits["top1_bundle"] is None and logits["top1_reference"] is None


@pytest.mark.parametrize("case, keywords", [
    ("wrong_key", ["'image'", "neither an input", "(x)"]),
    ("wrong_shape", ["input 'x'", "[450,8,8]", "[1,64]", "[N,64] or [N,1,64]"]),
    ("wrong_dtype", ["input 'x'", "float64", "astype('float32')"]),
    ("bad_file", ["not a .npz file"]),
    ("label_count", ["'y'", "[449]", "450 samples"]),
    ("label_range", ["sample 7 has label 10", "10 classes", "0..9"]),
    ("label_rows", ["sample 0 has 2 label(s)", "'logits' scores 1 row(s)", "one per row"]),
    ("missing", ["does not exist"]),
    ("other_model", ["takes ['a']", "takes ['x']", "built from"]),
])
def test_errors_are_one_line(digits, case, keywords):
    d, x, y = digits["dir"], digits["x"], digits["y"]
    data, model = d / f"{case}.npz", digits["model"]
    if case == "wrong_key":
        np.savez(data, image=x, y=y)
    elif case == "wrong_shape":
        np.savez(data, x=x.reshape(-1, 8, 8), y=y)
    elif case == "wrong_dtype":
        np.savez(data, x=x.astype(np.float64), y=y)
    elif case == "bad_file":
        data.write_bytes(b"not a zip archive")
    elif case == "label_count":
        np.savez(data, x=x, y=y[:-1])
    elif case == "label_range":
        np.savez(data, x=x, y=np.where(np.arange(len(y)) == 7, 10, y))
    elif case == "label_rows":
        np.savez(data, x=x, y=np.stack([y, y], axis=1))
    elif case == "other_model":
        data = d / "test.npz"
        model = save_onnx(d / "other.onnx", "other", [helper.make_node("Relu", ["a"], ["b"])], {"a": [1, 64]},
                          {"b": [1, 64]}, [])
    result = cli("eval", digits["bundle"], "--data", data, "--reference", model)
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)


def test_cross_target_bundle_refused(digits):
    bundle = api.build(digits["model"], "rpi4", digits["dir"] / "rpi4", options=BuildOptions(offload=())).bundle_dir
    result = cli("eval", bundle, "--data", digits["dir"] / "test.npz", "--reference", digits["model"])
    check_error(result.stderr, result.exit_code, "rpi4 (aarch64)", "this machine (x86_64)", "--target host",
                exception=result.exception)


def test_class_scores_need_known_dimensions():
    from edgec.evaluation import _class_count

    assert _class_count((1, 10), "float32") == 10
    # a dimension known only at run time (NonMaxSuppression's box count) is not a class count, nor a row count
    assert _class_count((None, 3), "float32") is None and _class_count((4, None), "float32") is None
    assert _class_count((1, 10), "int64") is None
    assert _class_count((1, 10), "int8") == _class_count((1, 10), "uint8") == 10   # a full-integer model's scores
