"""Converters for classic machine-learning operators on numeric tensors, per the ONNX spec (onnx's reference
implementation where the spec leaves a detail open): TfIdfVectorizer (default domain) and the ai.onnx.ml operators
TreeEnsemble, Binarizer, ArrayFeatureExtractor and LabelEncoder. String tensors cannot be compiled: their forms
(pool_strings, keys_strings, ...) are refused in one line, as string graph inputs are. Checked with
bench/onnx_suite.py; tests/test_onnx_ml.py holds a small model per converter.
"""
from __future__ import annotations

import numpy as np

from .onnx_ops import build_time_value, dtype, refuse, shape

# Default-domain operators converted here (onnx_semantics.EDGEC_OPS).
NEW_OPS = ("TfIdfVectorizer",)
# ai.onnx.ml operators converted here (onnx.py takes these nodes of that domain).
ML_DOMAIN_OPS = ("TreeEnsemble", "Binarizer", "ArrayFeatureExtractor", "LabelEncoder")
_STRINGS = "edgec compiles numeric tensors only: encode the strings to integers before the model"


def converts(node) -> bool:
    """Whether a node is an ai.onnx.ml operator this module converts."""
    return node.domain == "ai.onnx.ml" and node.op_type in ML_DOMAIN_OPS


def array(value) -> np.ndarray:
    """An attribute's list or tensor (TVM's importer passes TensorProtos through) value as numpy."""
    import onnx

    return onnx.numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.asarray(value)


def _tree_paths(attr: dict):
    """Every root-to-leaf path of the ensemble as (tree, [(test, branch taken)], leaf), and the tests the paths
    make: (node, member set or None) in the order onnx's reference builds them, which is the order
    membership_values lists the sets of MEMBER nodes in."""
    modes = array(attr["nodes_modes"]).reshape(-1)
    members = iter(array(attr.get("membership_values", np.zeros(0))).reshape(-1).tolist())
    tests, paths = [], []

    def walk(tree, index, is_leaf, path):
        if is_leaf:
            paths.append((tree, path, index))
            return
        found = None
        if modes[index] == 6:      # MEMBER: the values up to the next NaN
            found = set()
            for value in members:
                if np.isnan(value):
                    break
                found.add(value)
        tests.append((index, found))
        test = len(tests) - 1
        walk(tree, attr["nodes_truenodeids"][index], attr["nodes_trueleafs"][index], [*path, (test, True)])
        walk(tree, attr["nodes_falsenodeids"][index], attr["nodes_falseleafs"][index], [*path, (test, False)])

    for tree, root in enumerate(attr["tree_roots"]):
        leaf = (attr["nodes_trueleafs"][root] and attr["nodes_falseleafs"][root]
                and attr["nodes_truenodeids"][root] == attr["nodes_falsenodeids"][root])
        walk(tree, root, bool(leaf), [])
    return tests, paths


def ml_converters() -> dict:
    """op_type -> converter class, for onnx_semantics.from_onnx."""
    from tvm import relax
    from tvm.relax.frontend.onnx import onnx_frontend as tvm_onnx

    class Binarizer(tvm_onnx.OnnxOpConverter):
        """1 where x > threshold, else 0. Integer x compares with floor(threshold), clamped to the type's range: the
        float threshold cast to x's type would turn 0 > -0.5 into 0 > 0."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x = inputs[0]
            threshold = float(attr.get("threshold", 0.0))
            if "int" in dtype(x):
                info = np.iinfo(np.dtype(dtype(x)))
                if np.isnan(threshold):
                    return relax.op.zeros_like(x)
                floor = np.floor(threshold)
                below = floor < info.min     # every value is above
                bound = info.min if below else info.max if floor >= info.max else int(floor)
                compare = relax.op.greater_equal if below else relax.op.greater
                return relax.op.astype(compare(x, relax.const(bound, dtype(x))), dtype(x))
            return relax.op.astype(relax.op.greater(x, relax.const(threshold, dtype(x))), dtype(x))

    class ArrayFeatureExtractor(tvm_onnx.OnnxOpConverter):
        """X[..., indices] with the indices flattened; a 1-D X gives one row (onnxruntime's and the reference's
        shape). onnxruntime stops on an index outside [0, last dimension): edgec gives NaN there for float X, and
        takes integer X's indices only fixed at build time, where it checks them."""

        @classmethod
        def _impl_v1(cls, bb, inputs, attr, params):
            x, indices = inputs
            *lead, features = shape(x)
            count = int(np.prod(shape(indices)))
            flat = bb.emit(relax.op.reshape(relax.op.astype(indices, "int64"), (count,)))
            picked = bb.emit(relax.op.take(x, flat, axis=len(lead), mode="clip"))
            if "float" in dtype(x):
                inside = relax.op.logical_and(relax.op.greater_equal(flat, relax.const(0, "int64")),
                                              relax.op.less(flat, relax.const(features, "int64")))
                picked = bb.emit(relax.op.where(inside, picked, relax.const(float("nan"), dtype(x))))
            else:
                fix = "fix the indices with --const-input NAME=FILE.npy, or give float data"
                known = build_time_value("ArrayFeatureExtractor", attr, indices, "indices (of integer data)", fix)
                if ((known < 0) | (known >= features)).any():
                    refuse("ArrayFeatureExtractor", attr, f"has an index outside [0, {features})", fix)
            return relax.op.reshape(picked, (*(lead or [1]), count))

    class LabelEncoder(tvm_onnx.OnnxOpConverter):
        """The value of the key each element equals, the default where none."""

        @classmethod
        def _impl_v2(cls, bb, inputs, attr, params):
            x = inputs[0]
            if any(k in attr for k in ("keys_strings", "values_strings", "default_string")):
                refuse("LabelEncoder", attr, "maps strings", _STRINGS)
            keys = next((array(attr[k]) for k in ("keys_tensor", "keys_int64s", "keys_floats") if k in attr), None)
            values = next((array(attr[k]) for k in ("values_tensor", "values_int64s", "values_floats") if k in attr),
                          None)
            if keys is None or values is None or keys.size != values.size:
                refuse("LabelEncoder", attr, "has no numeric keys and values of one length",
                       "give LabelEncoder keys and values of one length")
            if "values_int64s" in attr:
                values = values.astype(np.int64)
            elif "values_floats" in attr:
                values = values.astype(np.float32)
            # without default_tensor, values_tensor's default is default_int64 / default_float too (onnxruntime)
            if "default_tensor" in attr:
                default = array(attr["default_tensor"]).reshape(-1)[0]
            elif np.issubdtype(values.dtype, np.integer):
                default = attr.get("default_int64", -1)
            else:
                default = attr.get("default_float", -0.0)
            if "keys_floats" in attr:
                keys = keys.astype(np.float32)
            if np.issubdtype(keys.dtype, np.floating) and np.isnan(keys).any():
                refuse("LabelEncoder", attr, "has a NaN key", "export the model without NaN keys")
            if len(np.unique(keys)) != keys.size:   # onnxruntime keeps the first value, the reference the last
                refuse("LabelEncoder", attr, "lists a key twice", "list each key once")
            table = dict(zip(keys.reshape(-1).tolist(), values.reshape(-1).tolist()))
            keys = relax.const(np.asarray(list(table), keys.dtype).astype(dtype(x)), dtype(x))
            values = np.asarray(list(table.values()), values.dtype)
            matches = bb.emit(relax.op.equal(relax.op.expand_dims(x, -1), keys))
            found = relax.op.max(relax.op.astype(matches, "int32"), axis=-1)
            which = relax.op.argmax(relax.op.astype(matches, "int32"), axis=-1)
            mapped = relax.op.take(relax.const(values, str(values.dtype)), which, axis=0)
            return relax.op.where(relax.op.astype(found, "bool"), mapped, relax.const(default, str(values.dtype)))

    class TreeEnsemble(tvm_onnx.OnnxOpConverter):
        """All node tests at once ((batch, tests) booleans), then which root-to-leaf path each row follows (the
        path whose tests all take its branches), then the leaves' weights aggregated per target."""

        @classmethod
        def _impl_v5(cls, bb, inputs, attr, params):
            x = inputs[0]
            dt = dtype(x)
            if attr.get("post_transform", 0) != 0:
                refuse("TreeEnsemble", attr, f"has post_transform={attr['post_transform']}",
                       "apply the transform after the model (edgec converts post_transform NONE)")
            aggregate = attr.get("aggregate_function", 1)
            if aggregate not in (0, 1, 2, 3):
                refuse("TreeEnsemble", attr, f"has aggregate_function={aggregate}",
                       "aggregate_function is 0 to 3 (the spec allows no other)")
            tests, paths = _tree_paths(attr)
            n_targets = int(attr["n_targets"])
            weights = array(attr["leaf_weights"]).astype(dt).reshape(-1)
            targets = np.asarray(attr["leaf_targetids"]).reshape(-1)
            if len(shape(x)) != 2:
                refuse("TreeEnsemble", attr, f"takes a {len(shape(x))}-D input", "give it [N, F] features")
            batch, n_features = shape(x)
            # out of range, the feature gather and the target scatter would read or write past their tensors
            used = np.asarray(attr["nodes_featureids"], np.int64).reshape(-1)
            if used.size and (used.min() < 0 or used.max() >= n_features) or (targets < 0).any() \
                    or (targets >= n_targets).any():
                refuse("TreeEnsemble", attr, f"names a feature outside [0, {n_features}) or a target outside "
                       f"[0, {n_targets})", "export the model with feature and target ids within the input's and "
                       "n_targets")

            reached = None
            if tests:
                nodes = [node for node, _ in tests]
                modes = array(attr["nodes_modes"]).reshape(-1)[nodes]
                splits = array(attr["nodes_splits"]).astype(dt).reshape(-1)[nodes]
                missing = np.asarray(attr.get("nodes_missing_value_tracks_true", [0] * (max(nodes) + 1)))[nodes]
                features = np.asarray(attr["nodes_featureids"])[nodes].astype(np.int64)
                values = bb.emit(relax.op.take(x, relax.const(features), axis=1))        # (batch, tests)
                split = relax.const(splits, dt)
                compare = {0: relax.op.less_equal, 1: relax.op.less, 2: relax.op.greater_equal, 3: relax.op.greater,
                           4: relax.op.equal, 5: relax.op.not_equal}
                truth = relax.const(np.zeros((batch, len(tests)), np.float32))   # each test's outcome, 1 or 0
                for mode in sorted(set(modes.tolist())):
                    if mode == 6:        # MEMBER: equal to one of the set (padded with NaN, equal to nothing)
                        width = max(len(s) for _, s in tests if s is not None) or 1
                        sets = np.full((len(tests), width), np.nan, dt)
                        for i, (_, found) in enumerate(tests):
                            sets[i, :len(found or ())] = sorted(found or ())
                        test = relax.op.max(relax.op.astype(relax.op.equal(relax.op.expand_dims(values, -1),
                                                                          relax.const(sets, dt)), "float32"), axis=-1)
                    elif mode in compare:
                        test = relax.op.astype(compare[mode](values, split), "float32")
                    else:
                        refuse("TreeEnsemble", attr, f"has a node of mode {mode}", "node modes are 0 to 6")
                    truth = bb.emit(relax.op.where(relax.const(modes == mode), test, truth))
                if missing.any():
                    tracked = relax.op.logical_and(relax.op.isnan(values), relax.const(missing.astype(bool)))
                    truth = bb.emit(relax.op.where(tracked, relax.const(1.0, "float32"), truth))
                # per path: +1 for a test it takes true, and for one it takes false (counted on the negation)
                takes_true = np.zeros((len(tests), len(paths)), np.float32)
                takes_false = np.zeros((len(tests), len(paths)), np.float32)
                for p, (_, steps, _) in enumerate(paths):
                    for test, branch in steps:
                        (takes_true if branch else takes_false)[test, p] = 1
                agree = relax.op.add(relax.op.matmul(truth, relax.const(takes_true)),
                                     relax.op.matmul(relax.op.subtract(relax.const(1.0, "float32"), truth),
                                                     relax.const(takes_false)))
                depth = np.asarray([len(steps) for _, steps, _ in paths], np.float32)
                reached = bb.emit(relax.op.equal(agree, relax.const(depth)))           # (batch, paths)
            else:
                reached = relax.const(np.ones((batch, len(paths)), bool))
            leaf_values = np.zeros((len(paths), n_targets), dt)
            for p, (_, _, leaf) in enumerate(paths):
                leaf_values[p, targets[leaf]] = weights[leaf]
            if aggregate in (0, 1):
                y = bb.emit(relax.op.matmul(relax.op.astype(reached, dt), relax.const(leaf_values, dt)))
                n_trees = len(attr["tree_roots"])
                return relax.op.divide(y, relax.const(n_trees, dt)) if aggregate == 0 else y
            # MIN / MAX over the reached leaves of each target; 0 for a target no reached leaf writes, as onnxruntime
            # gives (onnx's reference gives the type's largest / smallest value there)
            limit = np.finfo(dt).max if aggregate == 2 else np.finfo(dt).min
            aims = np.zeros((len(paths), n_targets), bool)
            for p, (_, _, leaf) in enumerate(paths):
                aims[p, targets[leaf]] = True
            counted = relax.op.logical_and(relax.op.expand_dims(reached, -1), relax.const(aims))
            candidates = relax.op.where(counted, relax.const(leaf_values, dt), relax.const(limit, dt))
            extreme = bb.emit((relax.op.min if aggregate == 2 else relax.op.max)(candidates, axis=1))
            written = relax.op.max(relax.op.astype(counted, "int32"), axis=1)
            return relax.op.where(relax.op.astype(written, "bool"), extreme, relax.const(0, dt))

    class TfIdfVectorizer(tvm_onnx.OnnxOpConverter):
        """Counts of the pool's n-grams in each row: an n-gram of n >= 2 is counted at every skip distance 1 to
        max_skip_count + 1, a 1-gram once, as the reference walks them; then TF, IDF or TFIDF weighting into the
        ngram_indexes columns."""

        @classmethod
        def _impl_v9(cls, bb, inputs, attr, params):
            x = inputs[0]
            if "pool_strings" in attr:
                refuse("TfIdfVectorizer", attr, "counts strings", _STRINGS)
            mode = attr.get("mode", b"TF")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            if mode not in ("TF", "IDF", "TFIDF"):
                refuse("TfIdfVectorizer", attr, f"has mode={mode!r}", "mode is TF, IDF or TFIDF")
            rank = len(shape(x))
            if rank not in (1, 2):
                refuse("TfIdfVectorizer", attr, f"takes a {rank}-D input", "give it [C] or [B, C] tokens")
            rows = bb.emit(relax.op.astype(relax.op.reshape(x, (-1, shape(x)[-1])), "int64"))
            length = shape(x)[-1]
            pool = np.asarray(attr.get("pool_int64s", []), np.int64)
            starts = list(attr["ngram_counts"])
            indexes = np.asarray(attr["ngram_indexes"], np.int64)
            width = int(indexes.max()) + 1
            lo, hi, skips = attr["min_gram_length"], attr["max_gram_length"], attr["max_skip_count"]
            columns = []       # per pool n-gram counted: its counts (rows, 1) and its output column
            first_id = 0
            for size, start in enumerate(starts, 1):
                end = starts[size] if size < len(starts) else len(pool)
                if (end - start) % size:
                    refuse("TfIdfVectorizer", attr, f"has {end - start} pool items for {size}-grams",
                           "give ngram_counts that split the pool into whole n-grams")
                grams = pool[start:end].reshape(-1, size)
                if lo <= size <= hi and len(grams):
                    if len(np.unique(grams, axis=0)) != len(grams):
                        refuse("TfIdfVectorizer", attr, f"lists a {size}-gram twice in its pool",
                               "list each n-gram once")
                    count = None
                    for distance in (range(1, skips + 2) if size > 1 else [1]):
                        span = length - (size - 1) * distance
                        if span <= 0:
                            continue
                        match = None
                        for j in range(size):
                            part = relax.op.strided_slice(rows, [1], [j * distance], [j * distance + span])
                            equal = relax.op.equal(relax.op.expand_dims(part, -1), relax.const(grams[:, j], "int64"))
                            match = equal if match is None else relax.op.logical_and(match, equal)
                        found = bb.emit(relax.op.sum(relax.op.astype(match, "float32"), axis=1))  # (rows, grams)
                        count = found if count is None else bb.emit(relax.op.add(count, found))
                    if count is not None:
                        columns.append((count, indexes[first_id:first_id + len(grams)]))
                first_id += len(grams)
            weights = np.asarray(attr.get("weights", []), np.float32)
            if first_id != len(indexes) or indexes.min() < 0 or 0 < weights.size < width:
                refuse("TfIdfVectorizer", attr, f"has {len(indexes)} ngram_indexes for {first_id} pool n-grams, a "
                       f"negative index or {weights.size} weights for {width} columns",
                       "give one non-negative ngram_index per pool n-gram and a weight per output column")
            counts = relax.const(np.zeros((shape(rows)[0], width), np.float32))
            for count, where in columns:
                scatter = np.zeros((len(where), width), np.float32)
                scatter[np.arange(len(where)), where] = 1
                counts = bb.emit(relax.op.add(counts, relax.op.matmul(count, relax.const(scatter))))
            if mode == "IDF":
                counts = bb.emit(relax.op.astype(relax.op.greater(counts, relax.const(0.0)), "float32"))
            if mode != "TF" and weights.size:
                counts = bb.emit(relax.op.multiply(counts, relax.const(weights[:width])))
            return relax.op.reshape(counts, (width,)) if rank == 1 else counts

    return {c.__name__: c for c in (Binarizer, ArrayFeatureExtractor, LabelEncoder, TreeEnsemble, TfIdfVectorizer)}
