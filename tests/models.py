"""Real models for the tests, taken from PyPI wheels and cached on disk.

The packages are never installed (mediapipe pins numpy<2 and protobuf<5, rapidocr pulls opencv): the wheel is
downloaded with pip, the one model file is extracted, and the wheel is thrown away. Cache directory:
$EDGEC_TEST_MODELS, else ~/.cache/edgec/test-models/. A failed download raises, so the tests fail, not skip.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from edgec.fsutil import atomic_write

# name -> (pip requirement, path of the model inside the wheel)
REAL_MODELS = {
    "ppocrv4_det": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_cls": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "ppocrv4_rec": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "hand_landmark_lite": ("mediapipe==0.10.21", "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite"),
    "face_detection_short_range": ("mediapipe==0.10.21",
                                   "mediapipe/modules/face_detection/face_detection_short_range.tflite"),
    # custom operator Convolution2DTransposeBias; sparse fp16 weights (DENSIFY); PRELU, float32
    "selfie_segmentation": ("mediapipe==0.10.21", "mediapipe/modules/selfie_segmentation/selfie_segmentation.tflite"),
    "face_detection_full_range_sparse": ("mediapipe==0.10.21",
                                         "mediapipe/modules/face_detection/face_detection_full_range_sparse.tflite"),
    "iris_landmark": ("mediapipe==0.10.21", "mediapipe/modules/iris_landmark/iris_landmark.tflite"),
    # full-integer int8, streaming: VAR_HANDLE/READ_VARIABLE/ASSIGN_VARIABLE, SPLIT_V, STRIDED_SLICE
    "okay_nabu": ("pymicro-wakeword==2.5.0", "pymicro_wakeword/models/okay_nabu.tflite"),
    # streaming VAD: If on sr (16/8 kHz), nested Ifs on shapes, LSTM; state in and stateN out
    "silero_vad": ("silero-vad==6.2.3", "silero_vad/data/silero_vad.onnx"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("EDGEC_TEST_MODELS") or Path.home() / ".cache" / "edgec" / "test-models")


def real_model(name: str) -> Path:
    """Path of the cached model file, downloading its wheel on first use."""
    requirement, member = REAL_MODELS[name]
    dest = cache_dir() / Path(member).name
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        # --only-binary: never build an sdist; the wheel for this interpreter and platform is the one we want.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp, requirement]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise RuntimeError(f"could not download {requirement} for test model '{name}' "
                               f"(put {dest.name} into {dest.parent} to run offline):\n{proc.stderr[-2000:]}")
        # Extract every model this wheel provides, so the wheel is downloaded once.
        with zipfile.ZipFile(wheels[0]) as zf:
            for req, mem in REAL_MODELS.values():
                if req == requirement:
                    atomic_write(dest.parent / Path(mem).name, zf.read(mem))
    return dest


# Measured max |TVM - reference| (untuned llvm build, 3 seeds of the inputs below): mobilenetv2 9.1e-6
# (|ref| <= 6.2), ppocrv4_det 3.1e-5 on probabilities in [0, 1], hand_landmark_lite 1.1e-4 (|ref| <= 182),
# face_detection_short_range 7.6e-5 (|ref| <= 162); at most 3.1e-5 of each output's range. ~10x headroom:
ATOL, RTOL = 1e-5, 3e-4

# name -> ({input: shape}, {output: shape}) as the reference runtime reports them; the TVM Relax frontends name
# the parameters of `main` the same (ONNX dims pinned by shape_dict, since PP-OCR's are dynamic).
REAL = {
    "ppocrv4_det": ({"x": (1, 3, 320, 320)}, {"sigmoid_0.tmp_0": (1, 1, 320, 320)}),
    "ppocr_cls": ({"x": (1, 3, 48, 192)}, {"save_infer_model/scale_0.tmp_1": (1, 2)}),
    "hand_landmark_lite": ({"input_1": (1, 224, 224, 3)},
                           {"Identity": (1, 63), "Identity_1": (1, 1), "Identity_2": (1, 1), "Identity_3": (1, 63)}),
    "face_detection_short_range": ({"input": (1, 128, 128, 3)},
                                   {"regressors": (1, 896, 16), "classificators": (1, 896, 1)}),
}


def text_image(h: int = 320, w: int = 320, seed: int = 0) -> np.ndarray:
    """Rows of stroke 'glyphs' on white, ImageNet-normalised NCHW: PP-OCR det finds text in it, whereas on noise
    its output is ~1e-5 everywhere and a comparison would check nothing."""
    rng = np.random.default_rng(seed)
    img = np.ones((h, w), np.float32)
    gh, gw = 20, 12
    for row in range(20, h - 2 * gh, 2 * gh):
        for col in range(20, w - 2 * gw, gw + 2):
            g = img[row:row + gh, col:col + gw]
            for _ in range(3):
                if rng.random() < 0.5:
                    c = rng.integers(0, gw - 2)
                    g[:, c:c + 2] = 0
                else:
                    r = rng.integers(0, gh - 2)
                    g[r:r + 2, :] = 0
    rgb = (img[..., None] - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    return rgb.transpose(2, 0, 1)[None].astype(np.float32)


def inputs_for(name: str) -> dict[str, np.ndarray]:
    if name == "ppocrv4_det":
        return {"x": text_image()}
    rng = np.random.default_rng(0)
    return {k: rng.random(s, dtype=np.float32) for k, s in REAL[name][0].items()}
