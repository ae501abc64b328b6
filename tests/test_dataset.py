"""DATA, the sample sets of `edgec eval` and calibration (edgec/dataset.py): the forms an array may take for an input,
labels, folders read one file at a time, the held-back split, and every mismatch refused in one EdgecError that
names the input, the expected and the found shape, and the fix."""
from __future__ import annotations

import numpy as np
import pytest

from edgec import dataset
from edgec.dataset import open_dataset
from edgec.errors import EdgecError
from edgec.signature import TensorSpec

X = (TensorSpec("x", (1, 64), "float32"),)
RNG = np.random.default_rng(0)


def _data(n=5):
    return RNG.random((n, 64), dtype=np.float32), np.arange(n, dtype=np.int64) % 3


@pytest.mark.parametrize("form", ["batch", "stacked"])
def test_batch_one_input_takes_both_forms(tmp_path, form):
    x, y = _data()
    np.savez(tmp_path / "d.npz", x=x if form == "batch" else x[:, None, :], labels=y)
    ds = open_dataset(tmp_path / "d.npz", X)
    assert len(ds) == 5 and ds.labelled
    samples = list(ds.samples())
    assert [s.index for s in samples] == list(range(5))
    for i, s in enumerate(samples):
        assert s.inputs["x"].shape == (1, 64) and s.inputs["x"].dtype == np.float32 and s.inputs["x"].flags.c_contiguous
        np.testing.assert_array_equal(s.inputs["x"][0], x[i])
        assert int(s.label) == y[i]


def test_forms_of_other_shapes(tmp_path):
    specs = (TensorSpec("img", (3, 4), "float32"), TensorSpec("k", (), "int64"))
    img = RNG.random((2, 3, 4), dtype=np.float32)
    np.savez(tmp_path / "d.npz", img=img, k=np.array([7, 9], np.int64))
    samples = list(open_dataset(tmp_path / "d.npz", specs).samples())
    np.testing.assert_array_equal(samples[1].inputs["img"], img[1])
    assert samples[1].inputs["k"].shape == () and int(samples[1].inputs["k"]) == 9
    assert samples[0].label is None
    np.savez(tmp_path / "one.npz", img=img[0], k=np.array(3, np.int64))       # exactly the input's shape: one sample
    (one,) = open_dataset(tmp_path / "one.npz", specs).samples()
    np.testing.assert_array_equal(one.inputs["img"], img[0])
    np.savez(tmp_path / "flat.npz", img=img.reshape(6, 4), k=np.array([7, 9], np.int64))   # [N*3,4]: no batch dim 1
    with pytest.raises(EdgecError) as e:
        open_dataset(tmp_path / "flat.npz", specs)
    assert "'img'" in e.value.message and "[6,4]" in e.value.message and "[3,4]" in e.value.message
    assert "[N,3,4]" in e.value.hint


def test_input_named_y_is_an_input(tmp_path):
    specs = (TensorSpec("y", (1, 2), "float32"),)
    np.savez(tmp_path / "d.npz", y=np.ones((3, 2), np.float32), labels=np.zeros(3, np.int32))
    ds = open_dataset(tmp_path / "d.npz", specs)
    assert len(ds) == 3 and ds.labelled


def test_folder_is_read_one_file_at_a_time(tmp_path, monkeypatch):
    x, y = _data(7)
    (tmp_path / "set").mkdir()
    np.savez(tmp_path / "set" / "0.npz", x=x[:3], y=y[:3])
    np.savez(tmp_path / "set" / "1.npz", x=x[3:], y=y[3:])
    loaded = []
    real_load = dataset._load
    monkeypatch.setattr(dataset, "_load", lambda part: loaded.append(part.file.name) or real_load(part))
    ds = open_dataset(tmp_path / "set", X)
    assert len(ds) == 7 and loaded == []              # opening reads headers only
    it = ds.samples()
    next(it)
    assert loaded == ["0.npz"]
    rest = list(it)
    assert loaded == ["0.npz", "1.npz"]
    np.testing.assert_array_equal(rest[-1].inputs["x"][0], x[6])
    assert [int(s.label) for s in rest] == list(y[1:])


def test_npy_files_for_a_single_input_model(tmp_path):
    x, _ = _data(4)
    (tmp_path / "set").mkdir()
    np.save(tmp_path / "set" / "a.npy", x[:1])                  # exactly [1,64]: one sample
    np.save(tmp_path / "set" / "b.npy", x[1:, None, :])         # [3,1,64]
    ds = open_dataset(tmp_path / "set", X)
    assert len(ds) == 4 and not ds.labelled
    np.testing.assert_array_equal(np.concatenate([s.inputs["x"] for s in ds.samples()]), x)
    two = (TensorSpec("a", (1,), "float32"), TensorSpec("b", (1,), "float32"))
    with pytest.raises(EdgecError, match="holds one array and the model takes 2 inputs"):
        open_dataset(tmp_path / "set" / "a.npy", two)


def test_split_and_batches(tmp_path):
    x, y = _data(10)
    (tmp_path / "set").mkdir()
    np.savez(tmp_path / "set" / "0.npz", x=x[:4], y=y[:4])
    np.savez(tmp_path / "set" / "1.npz", x=x[4:], y=y[4:])
    first, held_back = open_dataset(tmp_path / "set", X).split(3)
    assert (len(first), len(held_back)) == (7, 3)
    np.testing.assert_array_equal(np.concatenate([s.inputs["x"] for s in held_back.samples()]), x[7:])
    np.testing.assert_array_equal(np.concatenate([s.inputs["x"] for s in first.samples()]), x[:7])
    assert [len(b) for b in first.batches(3)] == [3, 3, 1]
    with pytest.raises(EdgecError, match="cannot hold back 7 of 7"):
        first.split(7)


def _save_bad(path, case):
    x, y = _data()
    if case == "wrong_key":
        np.savez(path, image=x)
    elif case == "missing_input":
        np.savez(path, labels=y)
    elif case == "wrong_shape":
        np.savez(path, x=x.reshape(5, 8, 8))
    elif case == "wrong_dtype":
        np.savez(path, x=x.astype(np.float64))
    elif case == "float_labels":
        np.savez(path, x=x, labels=y.astype(np.float32))
    elif case == "label_count":
        np.savez(path, x=x, y=y[:4])
    elif case == "labels_and_y":
        np.savez(path, x=x, y=y, labels=y)
    elif case == "pickled":
        np.savez(path, x=np.array([{"a": 1}] * 5, dtype=object))
    elif case == "counts_differ":
        np.savez(path, x=x, z=x[:4])
    elif case == "not_a_zip":
        path.write_bytes(b"PK? not really")
    elif case == "bad_member":
        import zipfile
        with zipfile.ZipFile(path, "w") as zf:
            zf.writestr("x.npy", b"\x93NUMPY garbage")
    elif case == "empty":
        np.savez(path, x=x[:0])


@pytest.mark.parametrize("case, keywords", [
    ("wrong_key", ["'image'", "neither an input", "(x)"]),
    ("missing_input", ["no array for input 'x'", "labels"]),
    ("wrong_shape", ["input 'x'", "[5,8,8]", "[1,64]", "[N,64] or [N,1,64]"]),
    ("wrong_dtype", ["input 'x'", "float64", "float32", "astype('float32')"]),
    ("float_labels", ["'labels'", "float32", "integer", "astype('int64')"]),
    ("label_count", ["'y'", "[4]", "5 samples", "[5]"]),
    ("labels_and_y", ["both 'labels' and 'y'"]),
    ("pickled", ["'x'", "object", "numeric"]),
    ("counts_differ", ["different numbers of samples", "x: 5, z: 4"]),
    ("not_a_zip", ["not a .npz file"]),
    ("bad_member", ["array 'x'", "not a .npy array"]),
    ("empty", ["no samples"]),
])
def test_refusals(tmp_path, case, keywords):
    path = tmp_path / f"{case}.npz"
    _save_bad(path, case)
    specs = X + ((TensorSpec("z", (1, 64), "float32"),) if case == "counts_differ" else ())
    with pytest.raises(EdgecError) as e:
        open_dataset(path, specs)
    line = f"{e.value.message}; {e.value.hint}"
    assert "\n" not in line and all(k in line for k in keywords), line


def test_folder_refusals(tmp_path):
    x, y = _data()
    with pytest.raises(EdgecError, match="does not exist"):
        open_dataset(tmp_path / "nope.npz", X)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgecError, match="is empty"):
        open_dataset(tmp_path / "empty", X)
    (tmp_path / "mixed").mkdir()
    np.savez(tmp_path / "mixed" / "a.npz", x=x, y=y)
    np.savez(tmp_path / "mixed" / "b.npz", x=x)
    with pytest.raises(EdgecError, match="'b.npz' has none"):
        open_dataset(tmp_path / "mixed", X)
    (tmp_path / "mixed" / "notes.txt").write_text("hi")
    with pytest.raises(EdgecError, match="'notes.txt', which is not a .npz, .npy or image file"):
        open_dataset(tmp_path / "mixed", X)
    (tmp_path / "d.csv").write_text("1,2")
    with pytest.raises(EdgecError, match="not a .npz or .npy file"):
        open_dataset(tmp_path / "d.csv", X)
