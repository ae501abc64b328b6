"""Image folders as DATA (edgec/images.py, issue 9 item 1): the declared preprocessing against numpy computing the same
steps by hand, images read one at a time, calibration and eval from image folders on a small ONNX image model, and
every refusal in one line. The images are generated here (no downloads)."""
from __future__ import annotations

import json
import sys

import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from PIL import Image

from edgec import api, images
from edgec.dataset import open_dataset
from edgec.errors import EdgecError
from edgec.images import parse_preprocess
from edgec.signature import TensorSpec
from test_cli_errors import check_error, cli
from verify import save_onnx

RNG = np.random.default_rng(0)
NCHW = (TensorSpec("x", (1, 3, 16, 16), "float32"),)
IMAGENET = "mean=0.485,0.456,0.406,std=0.229,0.224,0.225"


def _save(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _rgb(h, w):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _one(folder, specs, preprocess):
    (sample,) = open_dataset(folder, specs, preprocess).samples()
    return sample.inputs["x"]


@pytest.mark.parametrize("spec, preprocess, by_hand", [
    # torchvision's CenterCrop offsets (round((20-16)/2), round((24-16)/2)), ToTensor's /255, Normalize, CHW
    ((1, 3, 16, 16), f"crop=16,{IMAGENET}",
     lambda p: ((p[2:18, 4:20] / np.float32(255) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
     .transpose(2, 0, 1)[None]),
    # caffe style: BGR, mean on 0..255, NHWC
    ((1, 16, 16, 3), "crop=16x16,scale=1,mean=104,117,123,std=2,channels=BGR",
     lambda p: ((p[2:18, 4:20, ::-1] - [104, 117, 123]) / 2)[None]),
    # a 3-D input [C,H,W]: no batch axis
    ((3, 16, 16), "crop=16,scale=1/255", lambda p: (p[2:18, 4:20] / 255).transpose(2, 0, 1)),
])
def test_preprocessing_matches_numpy(tmp_path, spec, preprocess, by_hand):
    pixels = _save(tmp_path / "imgs" / "a.png", _rgb(20, 24))
    got = _one(tmp_path / "imgs", (TensorSpec("x", spec, "float32"),), preprocess)
    assert got.shape == spec and got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, by_hand(pixels.astype(np.float32)), rtol=1e-6, atol=1e-6)


def test_resize_is_pillows_bilinear(tmp_path):
    """resize=N shrinks with Pillow's antialiased bilinear filter, as torchvision's Resize on a PIL image: halving is
    the separable filter [1,3,3,1]/8 (renormalized at the borders), each pass rounded to 8 bits."""
    pixels = _save(tmp_path / "imgs" / "a.png", _rgb(32, 32))

    def halve(x, axis):
        x = np.moveaxis(x.astype(np.float64), axis, 0)
        rows = []
        for i in range(x.shape[0] // 2):
            taps = np.arange(2 * i - 1, 2 * i + 3)
            inside = (taps >= 0) & (taps < x.shape[0])
            weights = np.array([1, 3, 3, 1.0])[inside]
            rows.append(np.tensordot(weights / weights.sum(), x[taps[inside]], 1))
        return np.moveaxis(np.array(rows), 0, axis)

    got = _one(tmp_path / "imgs", NCHW, "resize=16,scale=1")
    np.testing.assert_allclose(got[0].transpose(1, 2, 0), halve(halve(pixels, 0), 1), atol=1)


def test_shorter_side_then_center_crop(tmp_path):
    """resize=N on a 40x30 (HxW) image: width 16, height int(16 * 40 / 30) = 21 (torchvision's arithmetic), then
    the default crop: the input's 16x16, centered (top round(2.5) = 2)."""
    pixels = _save(tmp_path / "imgs" / "a.png", _rgb(40, 30))
    resized = np.asarray(Image.fromarray(pixels).resize((16, 21), Image.Resampling.BILINEAR))
    got = _one(tmp_path / "imgs", NCHW, "resize=16,scale=1")
    np.testing.assert_array_equal(got[0].transpose(1, 2, 0), resized[2:18].astype(np.float32))
    exact = _one(tmp_path / "imgs", NCHW, "resize=16x16,scale=1")   # stretched, no crop
    np.testing.assert_array_equal(exact[0].transpose(1, 2, 0),
                                  np.asarray(Image.fromarray(pixels).resize((16, 16), Image.Resampling.BILINEAR)))


def test_gray_and_integer_inputs(tmp_path):
    """One channel: luma (0.299 R + 0.587 G + 0.114 B, Pillow rounds); uint8 takes the pixels, int8 pixel - 128."""
    pixels = _save(tmp_path / "imgs" / "a.png", _rgb(16, 16)).astype(np.float64)
    luma = pixels @ [0.299, 0.587, 0.114]
    u8 = _one(tmp_path / "imgs", (TensorSpec("x", (1, 16, 16, 1), "uint8"),), None)
    assert u8.dtype == np.uint8 and np.abs(u8[0, ..., 0] - luma).max() <= 0.5
    i8 = _one(tmp_path / "imgs", (TensorSpec("x", (1, 1, 16, 16), "int8"),), None)
    np.testing.assert_array_equal(i8.astype(np.int16), u8.reshape(1, 1, 16, 16).astype(np.int16) - 128)
    rgb = _one(tmp_path / "imgs", (TensorSpec("x", (1, 16, 16, 3), "uint8"),), "")
    np.testing.assert_array_equal(rgb[0], pixels)


IMAGENET_SCALE = (0.0186, -14)   # an int8 input calibrated on ImageNet-normalized images: floats -2.12..2.62


def _round_half_away(x):
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def test_quantized_integer_inputs(tmp_path):
    """An integer input with the model's scale and zero point: a declared normalization is quantized as TFLite's
    QUANTIZE does; undeclared, the pixels as they are only where the input's range says 0..1, -1..1 or 0..255."""
    pixels = _save(tmp_path / "imgs" / "a.png", _rgb(16, 16)).astype(np.float32)
    int8 = (TensorSpec("x", (1, 16, 16, 3), "int8"),)
    normalized = ((pixels / np.float32(255) - np.float32([0.485, 0.456, 0.406]))
                  / np.float32([0.229, 0.224, 0.225])).astype(np.float32)
    by_hand = np.clip(_round_half_away(normalized / np.float32(IMAGENET_SCALE[0])) + IMAGENET_SCALE[1], -128, 127)
    ds = open_dataset(tmp_path / "imgs", int8, IMAGENET, {"x": IMAGENET_SCALE})
    (sample,) = ds.samples()
    np.testing.assert_array_equal(sample.inputs["x"][0], by_hand.astype(np.int8))
    assert "quantized with scale 0.0186, zero point -14 (round half away from zero" in ds.description
    # the usual full-integer inputs: pixel - 128 for int8 at 1/255, -128 (0..1) and 1/128, 0 (-1..1), pixels for
    # uint8 at 1/128, 128 (-1..1)
    for spec, quantization, as_is in (("int8", (1 / 255, -128), pixels - 128), ("int8", (1 / 128, 0), pixels - 128),
                                      ("uint8", (0.0078125, 128), pixels)):
        ds = open_dataset(tmp_path / "imgs", (TensorSpec("x", (1, 16, 16, 3), spec),), None, {"x": quantization})
        np.testing.assert_array_equal(next(ds.samples()).inputs["x"][0], as_is)
        assert f"zero point {quantization[1]})" in ds.description
    # pixel - 128 would be the floats -2.12..2.62 quantized by another normalization: refused, not guessed
    with pytest.raises(EdgecError) as e:
        open_dataset(tmp_path / "imgs", int8, None, {"x": IMAGENET_SCALE})
    line = f"{e.value.message}; {e.value.hint}"
    assert "scale 0.0186, zero point -14" in line and "-2.12..2.6" in line and "declare the model's float" in line


def test_png_jpeg_bmp_read_lazily_in_name_order(tmp_path, monkeypatch):
    folder = tmp_path / "imgs"
    a = _save(folder / "a.png", _rgb(16, 16))
    b = _save(folder / "b.bmp", _rgb(16, 16))
    _save(folder / "c.jpg", _rgb(16, 16))
    decoded = []
    real_read = images.read
    monkeypatch.setattr(images, "read", lambda path, *args: decoded.append(path.name) or real_read(path, *args))
    ds = open_dataset(folder, NCHW, "scale=1")
    assert len(ds) == 3 and not ds.labelled and decoded == []      # opening reads headers only
    it = ds.samples()
    np.testing.assert_array_equal(next(it).inputs["x"][0].transpose(1, 2, 0), a)
    assert decoded == ["a.png"]
    np.testing.assert_array_equal(next(it).inputs["x"][0].transpose(1, 2, 0), b)
    jpeg = next(it).inputs["x"][0].transpose(1, 2, 0)
    np.testing.assert_array_equal(jpeg, np.asarray(Image.open(folder / "c.jpg")))   # Pillow's JPEG decoder
    assert decoded == ["a.png", "b.bmp", "c.jpg"]
    assert "NCHW float32" in ds.description and "no labels" in ds.description


def test_class_folders_are_labels_and_split_keeps_them(tmp_path):
    for name, count in (("n02", 2), ("n01", 3)):
        for i in range(count):
            _save(tmp_path / "set" / name / f"{i}.png", _rgb(16, 16))
    ds = open_dataset(tmp_path / "set", NCHW, "scale=1/255")
    assert ds.labelled and [int(s.label) for s in ds.samples()] == [0, 0, 0, 1, 1]
    assert "2 class folders" in ds.description and "0 = 'n01'" in ds.description
    calibration, held_back = ds.split(2)
    assert [int(s.label) for s in held_back.samples()] == [1, 1] and held_back.description == ds.description
    assert [len(b) for b in calibration.batches(2)] == [2, 1]


def test_parse_preprocess():
    p = parse_preprocess(f"resize=256, crop=224,scale=1/255,{IMAGENET},channels=bgr,layout=nchw")
    assert (p.resize, p.crop, p.channels, p.layout) == ((256,), (224, 224), "BGR", "NCHW")
    assert p.scale == pytest.approx(1 / 255) and p.mean == (0.485, 0.456, 0.406) and p.std == (0.229, 0.224, 0.225)
    assert parse_preprocess("resize=240x320").resize == (240, 320)


@pytest.mark.parametrize("text, keywords", [
    ("size=224", ["unknown key 'size'", "resize", "crop"]),
    ("resize=224,resize=256", ["resize twice"]),
    ("0.5,mean=1", ["not KEY=VALUE"]),
    ("resize=-3", ["resize=-3", "HxW"]),
    ("crop=224,256", ["crop=224,256", "one value"]),
    ("scale=1/0", ["scale=1/0", "positive number"]),
    ("std=0.2,0", ["std=0", "positive"]),
    ("channels=RGBA", ["channels=RGBA", "RGB or BGR"]),
    ("layout=CHW", ["layout=CHW", "NCHW or NHWC"]),
    ("resize=\u00b2", ["HxW"]),                                   # '²' is a digit to isdigit, not to int
    ("scale=1" + "0" * 400 + "/1", ["positive number"]),           # beyond float: OverflowError
])
def test_preprocess_refusals(text, keywords):
    with pytest.raises(EdgecError) as e:
        parse_preprocess(text)
    line = f"{e.value.message}; {e.value.hint}"
    assert "\n" not in line and all(k in line for k in keywords), line


def _bad_folder(folder, case):
    _save(folder / "a.png", _rgb(16, 16))
    if case == "unreadable":
        (folder / "b.png").write_bytes(b"\x89PNG not really")
    elif case == "sixteen_bit":
        Image.fromarray(np.zeros((16, 16), np.uint16)).save(folder / "b.png")
    elif case == "not_an_image":
        (folder / "notes.txt").write_text("hi")
    elif case == "mixed":
        _save(folder / "cat" / "c.png", _rgb(16, 16))
    elif case == "empty_class":
        (folder / "a.png").unlink()
        _save(folder / "cat" / "c.png", _rgb(16, 16))
        (folder / "dog").mkdir()
    elif case == "size":
        _save(folder / "b.png", _rgb(20, 24))
    elif case == "too_small":
        _save(folder / "b.png", _rgb(12, 24))


@pytest.mark.parametrize("case, specs, preprocess, keywords", [
    ("unreadable", NCHW, "scale=1", ["cannot read image 'b.png'", "replace or remove"]),
    ("sixteen_bit", NCHW, "scale=1", ["image 'b.png'", "not 8-bit"]),
    ("not_an_image", NCHW, "scale=1", ["'notes.txt'", "not an image file", ".png"]),
    ("mixed", NCHW, "scale=1", ["class folders and the file 'a.png'"]),
    ("empty_class", NCHW, "scale=1", ["class folder 'dog' holds no images"]),
    ("size", NCHW, "scale=1", ["image 'b.png' is 20x24", "takes 16x16", "resize=16 (shorter side", "resize=16x16"]),
    ("too_small", NCHW, "crop=16,scale=1", ["image 'b.png' is 12x24", "smaller than crop=16x16"]),
    ("ok", NCHW + (TensorSpec("k", (1,), "float32"),), "scale=1", ["takes 2 inputs (x, k)", ".npz"]),
    ("ok", (TensorSpec("x", (1, 4, 16, 16), "float32"),), "scale=1", ["[1,4,16,16]", "1 (gray) or 3 (RGB)"]),
    ("ok", (TensorSpec("x", (1, 4, 16, 16), "float32"),), "layout=NCHW,scale=1", ["takes 4 channels"]),
    ("ok", (TensorSpec("x", (1, 3, 16, 3), "float32"),), "scale=1", ["could be NCHW or NHWC", "layout=NCHW"]),
    ("ok", (TensorSpec("x", (2, 3, 16, 16), "float32"),), "scale=1", ["takes 2 images per call", "x:1x"]),
    ("ok", (TensorSpec("x", (1, 3, 16, 16), "int32"),), None, ["int32", "float, uint8 or int8"]),
    ("ok", NCHW, None, ["float32 input 'x' need a declared normalization", "scale=1/255"]),
    ("ok", NCHW, "crop=15,scale=1", ["crop=15x15", "takes 16x16"]),
    ("ok", NCHW, "mean=1,2,scale=1", ["mean has 2 values", "3 channel"]),
    ("ok", (TensorSpec("x", (1, 16, 16, 3), "uint8"),), "mean=128", ["uint8", "drop mean"]),
    ("ok", (TensorSpec("x", (1, 1, 16, 16), "float32"),), "channels=BGR,scale=1", ["one (gray) channel"]),
])
def test_image_folder_refusals(tmp_path, case, specs, preprocess, keywords):
    _bad_folder(tmp_path / "imgs", case)
    with pytest.raises(EdgecError) as e:
        open_dataset(tmp_path / "imgs", specs, preprocess)
    line = f"{e.value.message}; {e.value.hint}"
    assert "\n" not in line and all(k in line for k in keywords), line


def test_hidden_files_are_not_samples(tmp_path):
    _save(tmp_path / "imgs" / "cat" / "a.png", _rgb(16, 16))
    _save(tmp_path / "imgs" / "dog" / "b.png", _rgb(16, 16))
    (tmp_path / "imgs" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "imgs" / "cat" / "._a.png").write_bytes(b"\0\5\26\7")
    (tmp_path / "imgs" / ".ipynb_checkpoints").mkdir()
    data = open_dataset(tmp_path / "imgs", NCHW, "scale=1")
    assert len(data) == 2 and "2 class folders" in data.description


def test_preprocess_with_arrays_is_refused(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(EdgecError, match="--preprocess is for a folder of images"):
        open_dataset(tmp_path / "d.npz", NCHW, "scale=1")


def test_missing_pillow_names_the_extra(tmp_path, monkeypatch):
    _save(tmp_path / "imgs" / "a.png", _rgb(16, 16))
    monkeypatch.setitem(sys.modules, "PIL", None)      # import PIL raises ImportError
    with pytest.raises(EdgecError) as e:
        open_dataset(tmp_path / "imgs", NCHW, "scale=1")
    assert "needs Pillow" in e.value.message and "pip install 'edgec[images]'" in e.value.hint


# ------------------------------------------------------------------ a small image model, built and evaluated

def _color_model(path):
    """x [1,3,16,16] -> Conv 1x1 (identity) -> Relu -> GlobalAveragePool -> Flatten: the mean of R, G and B as
    class scores [1,3]; an image is its dominant channel's class."""
    w = numpy_helper.from_array(np.eye(3, dtype=np.float32).reshape(3, 3, 1, 1), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]), helper.make_node("Flatten", ["g"], ["scores"])]
    return save_onnx(path, "color", nodes, {"x": [1, 3, 16, 16]}, {"scores": [1, 3]}, [w])


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    """Class folders 0_red, 1_green, 2_blue of 4 noisy 20x24 images each, the class's channel brightest."""
    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for label, name in enumerate(("0_red", "1_green", "2_blue")):
        for i in range(4):
            pixels = rng.integers(0, 120, (20, 24, 3)).astype(np.uint8)
            pixels[..., label] += 120
            _save(d / "set" / name / f"{i}.png", pixels)
    model = _color_model(d / "color.onnx")
    return {"dir": d, "model": model, "set": d / "set", "bundle": api.build(model, "host", d / "float").bundle_dir}


def test_eval_on_class_folders(colors):
    result = cli("eval", colors["bundle"], "--data", colors["set"], "--reference", colors["model"],
                 "--preprocess", f"resize=16,{IMAGENET}", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (scores,) = report["outputs"]
    assert report["samples"] == 12 and report["labelled"] is True
    assert scores["top1_bundle"] == scores["top1_reference"] == 1.0 and scores["top1_agreement"] == 1.0
    assert any("3 class folders" in n and "resize=16 (shorter side" in n for n in report["notes"])
    # what the reference ran on is the image preprocessed by hand: 20x24 to 16x19 (shorter side 16), the center
    # 16 columns (left round(1.5) = 2)
    pixels = np.asarray(Image.open(colors["set"] / "2_blue" / "0.png").resize((19, 16), Image.Resampling.BILINEAR))
    by_hand = ((pixels[:, 2:18] / np.float32(255) - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225])
    sample = next(open_dataset(colors["set"], api.Manifest.load(colors["bundle"]).inputs,
                               f"resize=16,{IMAGENET}").split(4)[1].samples())
    np.testing.assert_allclose(sample.inputs["x"], by_hand.transpose(2, 0, 1)[None], rtol=1e-6, atol=1e-6)
    sess = ort.InferenceSession(str(colors["model"]), providers=["CPUExecutionProvider"])
    assert sess.run(None, sample.inputs)[0].argmax() == int(sample.label) == 2
    # read as BGR, red and blue trade places: only green stays right
    bgr = api.evaluate(colors["bundle"], colors["set"], colors["model"], preprocess="scale=1/255,channels=BGR,resize=16")
    assert bgr.outputs[0].top1_reference == pytest.approx(1 / 3) == bgr.outputs[0].top1_bundle


def test_int8_calibration_on_an_image_folder(colors):
    out = colors["dir"] / "int8"
    result = cli("build", colors["model"], "-o", out, "--quantize", "int8", "--calibration", colors["set"],
                 "--preprocess", "resize=16,scale=1/255", "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    record = json.loads((out / "manifest.json").read_text())["quantization"]
    assert record["calibration_samples"] == 10          # 12 images, the last 2 held back
    # all a deployment needs to feed the bundle the same numbers
    assert record["calibration_data"].startswith(
        "images read as resize=16 (shorter side, the other int(N * long / short); Pillow's bilinear, antialiased), "
        "crop=16x16 (center, offsets round((side - crop) / 2)), RGB, (pixel*0.003921569 - mean 0.0) / std 1.0 in "
        "float32, NCHW float32; ")
    evaluation = summary["evaluation"]
    assert evaluation["samples"] == 2 and evaluation["labelled"] is True
    assert evaluation["outputs"][0]["top1_bundle"] == evaluation["outputs"][0]["top1_reference"] == 1.0


@pytest.mark.parametrize("case, keywords", [
    ("unreadable", ["cannot read image '2_blue/bad.png'"]),
    ("no_preprocess", ["need a declared normalization", "--preprocess"]),
    ("bad_spec", ["--preprocess", "unknown key 'resise'"]),
])
def test_eval_errors_are_one_line(colors, case, keywords):
    data, spec = colors["set"], "resize=16,scale=1"
    if case == "unreadable":
        data = colors["dir"] / "bad_set"
        _save(data / "0_red" / "a.png", _rgb(16, 16))
        (data / "2_blue").mkdir()
        (data / "2_blue" / "bad.png").write_bytes(b"GIF89a but no")
    elif case == "bad_spec":
        spec = "resise=16"
    args = () if case == "no_preprocess" else ("--preprocess", spec)
    result = cli("eval", colors["bundle"], "--data", data, "--reference", colors["model"], *args)
    check_error(result.stderr, result.exit_code, *keywords, exception=result.exception)


def test_build_preprocess_needs_calibration(colors):
    result = cli("build", colors["model"], "-o", colors["dir"] / "x", "--preprocess", "scale=1")
    check_error(result.stderr, result.exit_code, "--preprocess is for --calibration", exception=result.exception)
    assert not (colors["dir"] / "x").exists()


def test_eval_full_integer_tflite_on_class_folders(colors):
    """A full-integer TFLite image model (int8 input at IMAGENET_SCALE, conv + fully-connected) evaluated from the
    class folders: eval reads the input's scale and zero point from the .tflite, quantizes the declared ImageNet
    normalization with them, and refuses pixel - 128 when nothing is declared."""
    from test_tflite_import import _options
    from test_tflite_int8 import _Int8Layers
    from tflite_builder import schema

    n = _Int8Layers()
    x = n.activation("image", (1, 16, 16, 3), *IMAGENET_SCALE)
    a = n.layer("Conv2D", x, (1, 8, 8, 8), (8, 3, 3, 3), 0, 27, schema.ActivationFunctionType.RELU, input_rms=60,
                padding=schema.Padding.SAME, strideH=2, strideW=2)
    flat = n.g.tensor("flat", (1, 512), np.int8, quant=([a[1]], [-128], 0))
    n.g.op(schema.BuiltinOperator.RESHAPE, [a[0], n.g.tensor("shape", (2,), np.int32, np.array([1, 512], np.int32))],
           [flat], *_options("Reshape", newShape=[1, 512]))
    scores = n.layer("FullyConnected", (flat, a[1]), (1, 3), (3, 512), 0, 512)
    model = n.g.save(colors["dir"] / "int8.tflite", [x[0]], [scores[0]])
    bundle = api.build(model, "host", colors["dir"] / "int8-host").bundle_dir
    result = cli("eval", bundle, "--data", colors["set"], "--reference", model, "--preprocess",
                 f"resize=16,{IMAGENET}", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    (out,) = report["outputs"]
    # within one quantization step of LiteRT; the int8 scores are class scores: top-1 on the class folders' labels
    assert report["samples"] == 12 and out["max_abs_error"] <= 1 and out["class_scores"]
    assert out["top1_bundle"] is not None and out["top1_reference"] is not None
    assert any("quantized with scale 0.0186, zero point -14" in note for note in report["notes"])
    undeclared = cli("eval", bundle, "--data", colors["set"], "--reference", model, "--preprocess", "resize=16")
    check_error(undeclared.stderr, undeclared.exit_code, "scale 0.0186, zero point -14", "declare the model's float",
                exception=undeclared.exception)
