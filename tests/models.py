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

# name -> (pip requirement, path of the model inside the wheel)
REAL_MODELS = {
    "ppocrv4_det": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ppocr_cls": ("rapidocr_onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx"),
    "hand_landmark_lite": ("mediapipe==0.10.21", "mediapipe/modules/hand_landmark/hand_landmark_lite.tflite"),
    "face_detection_short_range": ("mediapipe==0.10.21",
                                   "mediapipe/modules/face_detection/face_detection_short_range.tflite"),
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
                    _write_atomic(dest.parent / Path(mem).name, zf.read(mem))
    return dest


def _write_atomic(path: Path, data: bytes) -> None:
    # Write then rename, so a concurrent or interrupted run never sees a partial file.
    part = path.with_name(f"{path.name}.{os.getpid()}.part")
    part.write_bytes(data)
    os.replace(part, path)
