"""edgec's converters of classic machine-learning operators (edgec/frontends/onnx_ml.py): TfIdfVectorizer and the
ai.onnx.ml TreeEnsemble, Binarizer, ArrayFeatureExtractor and LabelEncoder, each on a small model against
onnxruntime, as bench/onnx_suite.py runs a case; string forms refused with one line and exit 2."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from test_onnx_semantics import _assert_matches_reference, edgec_host  # noqa: F401
from verify import assert_refused_in_one_line

F32, F64, I64 = TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.INT64
ML = "ai.onnx.ml"


def _model(node, inputs: dict, outputs: dict):
    """One node at opset 19 / ai.onnx.ml 5; inputs and outputs: name -> (elem type, shape)."""
    graph = helper.make_graph([node], "m", [helper.make_tensor_value_info(n, *t) for n, t in inputs.items()],
                              [helper.make_tensor_value_info(n, *t) for n, t in outputs.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19), helper.make_opsetid(ML, 5)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def _tree_ensemble(aggregate_function: int, dtype=F32, post_transform: int = 0, feature_ids=(0, 1, 2, 0)):
    """Two trees over three features: tree 0 tests x0 < 0.5, then x1 in {1, 3, 7} (NaN goes true); tree 1 tests
    x2 == 2, then x0 >= -1. Leaves write targets 0 and 1."""
    np_dt = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    node = helper.make_node(
        "TreeEnsemble", ["x"], ["y"], domain=ML, n_targets=2, aggregate_function=aggregate_function,
        post_transform=post_transform, tree_roots=[0, 2],
        nodes_featureids=list(feature_ids), nodes_modes=numpy_helper.from_array(np.array([1, 6, 4, 2], np.uint8)),
        nodes_splits=numpy_helper.from_array(np.array([0.5, np.nan, 2, -1], np_dt)),
        membership_values=numpy_helper.from_array(np.array([1, 3, 7, np.nan], np_dt)),
        nodes_missing_value_tracks_true=[0, 1, 0, 0],
        nodes_truenodeids=[1, 0, 0, 2], nodes_trueleafs=[0, 1, 1, 1],
        nodes_falsenodeids=[0, 1, 3, 3], nodes_falseleafs=[1, 1, 0, 1],
        leaf_targetids=[0, 1, 0, 1, 0, 1], leaf_weights=numpy_helper.from_array(
            np.array([1.5, -2.0, 4.0, 0.25, 8.0, -3.0], np_dt)))
    return _model(node, {"x": (dtype, [6, 3])}, {"y": (dtype, [6, 2])})


@pytest.mark.parametrize("aggregate_function", [0, 1, 2, 3])
def test_tree_ensemble(edgec_host, tmp_path, aggregate_function):
    x = np.array([[0.2, 3, 2], [0.7, 1, 2], [0.1, np.nan, 5], [0.5, 7, 2], [-3, 2, 1], [0.4, 0, 2]], np.float32)
    _assert_matches_reference(edgec_host, _tree_ensemble(aggregate_function), [x], tmp_path)


def test_tree_ensemble_double(edgec_host, tmp_path):
    x = np.array([[0.2, 3, 2], [0.7, 1, 2], [0.1, np.nan, 5], [0.5, 7, 2], [-3, 2, 1], [0.4, 0, 2]], np.float64)
    _assert_matches_reference(edgec_host, _tree_ensemble(1, F64), [x], tmp_path)


def test_binarizer(edgec_host, tmp_path):
    model = _model(helper.make_node("Binarizer", ["x"], ["y"], domain=ML, threshold=0.25),
                   {"x": (F32, [2, 5])}, {"y": (F32, [2, 5])})
    x = np.array([[-1, 0.25, 0.26, 3, np.nan], [0, 0.1, 0.3, -0.25, 1]], np.float32)
    _assert_matches_reference(edgec_host, model, [x], tmp_path)


@pytest.mark.parametrize("threshold", [-0.5, 2.5, -1e30, 1e30, 9.3e18, float("nan")])
def test_binarizer_integer_with_fractional_threshold(edgec_host, tmp_path, threshold):
    """x > threshold on integers with a float threshold (onnx's reference; onnxruntime has no integer Binarizer):
    0 > -0.5 holds; the threshold cast to the integer type would make it 0 > 0."""
    model = _model(helper.make_node("Binarizer", ["x"], ["y"], domain=ML, threshold=threshold),
                   {"x": (I64, [6])}, {"y": (I64, [6])})
    x = np.array([-2, -1, 0, 1, 2, 3], np.int64)
    _assert_matches_reference(edgec_host, model, [x], tmp_path)


@pytest.mark.parametrize("x_shape", [[5], [2, 3, 5]])
def test_array_feature_extractor(edgec_host, tmp_path, x_shape):
    model = _model(helper.make_node("ArrayFeatureExtractor", ["x", "i"], ["y"], domain=ML),
                   {"x": (F32, x_shape), "i": (I64, [2, 2])}, {"y": (F32, [*(x_shape[:-1] or [1]), 4])})
    x = np.arange(np.prod(x_shape), dtype=np.float32).reshape(x_shape)
    _assert_matches_reference(edgec_host, model, [x, np.array([[4, 0], [2, 2]], np.int64)], tmp_path)


def _label_encoder(x_type: int, y_type: int, **attrs):
    node = helper.make_node("LabelEncoder", ["x"], ["y"], domain=ML, **attrs)
    return _model(node, {"x": (x_type, [7])}, {"y": (y_type, [7])})


def test_label_encoder_int_to_float(edgec_host, tmp_path):
    model = _label_encoder(I64, F32, keys_int64s=[3, -1, 7], values_floats=[0.5, 1.5, 2.5],
                           default_float=-4.0)
    _assert_matches_reference(edgec_host, model, [np.array([3, -1, 7, 0, 8, 3, -2], np.int64)], tmp_path)


@pytest.mark.parametrize("defaults", [{}, {"default_int64": 5}])
def test_label_encoder_tensor_without_default_tensor(edgec_host, tmp_path, defaults):
    """Integer values_tensor without default_tensor: default_int64, -1 unless set (the spec; onnxruntime)."""
    model = _label_encoder(I64, I64, keys_tensor=numpy_helper.from_array(np.array([1, 2], np.int64)),
                           values_tensor=numpy_helper.from_array(np.array([10, 20], np.int64)), **defaults)
    _assert_matches_reference(edgec_host, model, [np.array([1, 2, 3, 0, 2, 1, 9], np.int64)], tmp_path)


def test_label_encoder_tensor_float_to_int(edgec_host, tmp_path):
    model = _label_encoder(F32, I64,
                           keys_tensor=numpy_helper.from_array(np.array([0.5, -2, 1e6], np.float32)),
                           values_tensor=numpy_helper.from_array(np.array([10, 20, 30], np.int64)),
                           default_tensor=numpy_helper.from_array(np.array([-7], np.int64)))
    x = np.array([0.5, -2, 1e6, 0, np.nan, 0.25, 0.5], np.float32)
    _assert_matches_reference(edgec_host, model, [x], tmp_path)


def _tfidf(mode: str, **attrs):
    # 4 unigrams, 4 bigrams, 2 trigrams; two n-grams share output column 3
    node = helper.make_node("TfIdfVectorizer", ["x"], ["y"], mode=mode, ngram_counts=[0, 4, 12],
                            ngram_indexes=[0, 1, 2, 3, 4, 5, 6, 7, 8, 3], pool_int64s=[
                                2, 3, 5, 9, 2, 3, 3, 5, 5, 2, 9, 9, 2, 3, 5, 3, 5, 2], **attrs)
    return node


@pytest.mark.parametrize("mode,x_shape,grams", [("TF", [2, 9], (1, 3)), ("IDF", [11], (2, 3)),
                                                ("TFIDF", [2, 9], (1, 2))])
def test_tfidf_vectorizer(edgec_host, tmp_path, mode, x_shape, grams):
    """Unigrams, bigrams and trigrams with skips up to 2; weights for IDF and TFIDF."""
    weights = {"weights": list(np.linspace(0.5, 2, 9))} if mode != "TF" else {}
    node = _tfidf(mode, min_gram_length=grams[0], max_gram_length=grams[1], max_skip_count=2, **weights)
    model = _model(node, {"x": (I64, x_shape)}, {"y": (F32, [*x_shape[:-1], 9])})
    x = np.random.default_rng(2).choice([2, 3, 5, 9], x_shape).astype(np.int64)
    _assert_matches_reference(edgec_host, model, [x], tmp_path)


REFUSALS = {
    "label-encoder-strings": (
        lambda: _label_encoder(TensorProto.STRING, I64, keys_strings=["a", "b"], values_int64s=[1, 2]),
        "is a string tensor",
        lambda: _label_encoder(I64, I64, keys_int64s=[1, 2], values_int64s=[1, 2])),
    "label-encoder-repeated-key": (  # onnxruntime maps it to its first value, onnx's reference to its last
        lambda: _label_encoder(I64, I64, keys_int64s=[1, 2, 1], values_int64s=[1, 2, 3]), "lists a key twice",
        lambda: _label_encoder(I64, I64, keys_int64s=[1, 2], values_int64s=[1, 2])),
    "tree-ensemble-post-transform": (lambda: _tree_ensemble(1, post_transform=2), "post_transform=2",
                                     lambda: _tree_ensemble(1)),
    "tfidf-too-few-ngram-indexes": (
        lambda: _model(helper.make_node("TfIdfVectorizer", ["x"], ["y"], mode="TF", ngram_counts=[0, 2],
                                        ngram_indexes=[0, 1], pool_int64s=[2, 3, 2, 3, 3, 5], min_gram_length=1,
                                        max_gram_length=2, max_skip_count=0), {"x": (I64, [9])}, {"y": (F32, [2])}),
        "has 2 ngram_indexes for 4 pool n-grams",
        lambda: _model(_tfidf("TF", min_gram_length=1, max_gram_length=2, max_skip_count=0), {"x": (I64, [9])},
                       {"y": (F32, [9])})),
    "tree-ensemble-feature-out-of-range": (lambda: _tree_ensemble(1, feature_ids=[0, 1, 3, 0]),
                                           "names a feature outside [0, 3)", lambda: _tree_ensemble(1)),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refused_with_one_line_and_exit_2(case, tmp_path):
    refused, words, accepted = REFUSALS[case]
    assert_refused_in_one_line(refused(), words, accepted(), tmp_path)
