"""End to end on real models: build with edgec, run in process and through the C++ runner, and compare every
output with onnxruntime / LiteRT. The Raspberry Pi builds of the same models, under qemu, are in
test_offload_arm.py."""
from __future__ import annotations

import json
from pathlib import Path
import subprocess
import sys
import tarfile

import pytest
from click.testing import CliRunner

from edgec import api, report
from edgec.build import BuildOptions
from edgec.cli import main
from edgec.examples import mobilenet_v2
from edgec.manifest import Manifest, sha256_file
from models import inputs_for, real_model
from verify import assert_close_to_reference

DET_SHAPE = {"x": (1, 3, 320, 320)}
ELF_MACHINE = {"x86_64": 62}


def elf_machine(path) -> int:
    with open(path, "rb") as f:
        header = f.read(20)
    assert header[:4] == b"\x7fELF"
    return int.from_bytes(header[18:20], "little")


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """The MobileNetV2-style CNN: depthwise-separable convs, BN, ReLU6, 224x224, 3.5M parameters."""
    return mobilenet_v2(tmp_path_factory.mktemp("models") / "mobilenetv2.onnx")


@pytest.fixture(scope="module")
def small_cnn(tmp_path_factory):
    """A narrow 96x96 variant for option tests, where only the pipeline's behaviour matters."""
    return mobilenet_v2(tmp_path_factory.mktemp("models") / "mnv2_small.onnx", width=0.35, resolution=96)


@pytest.fixture(scope="module")
def cnn_host(cnn, tmp_path_factory):
    return api.build(cnn, "host", tmp_path_factory.mktemp("b") / "cnn-host", archive=True)


@pytest.fixture(scope="module")
def det_host(tmp_path_factory):
    return api.build(real_model("ppocrv4_det"), "host", tmp_path_factory.mktemp("b") / "det-host",
                     input_shapes=DET_SHAPE)


def test_cnn_host_in_process(cnn, cnn_host):
    assert_close_to_reference(cnn, cnn_host.bundle_dir, expect_mode="in-process")
    c = cnn_host.compiled
    # each conv + bias + clip chain becomes one call: offloaded to a library, or fused by TVM
    imported = next(r.calls for r in c.passes if r.phase == "graph")
    assert c.ops_around_fusion()[1] < imported / 2, "conv + bias + clip chains should be merged"
    assert c.memory.planned_bytes < c.memory.tensor_bytes
    assert "fold-batchnorm" in cnn_host.manifest.passes
    assert elf_machine(cnn_host.bundle_dir / "model.so") == ELF_MACHINE["x86_64"]
    # weights live in params.bin, not in the library
    assert (cnn_host.bundle_dir / "params.bin").stat().st_size > 10 * cnn_host.library_bytes


def test_cnn_host_cpp_runner(cnn, cnn_host):
    """The bundle's own C++ runner, compiled with the system g++, gives the reference's outputs."""
    assert_close_to_reference(cnn, cnn_host.bundle_dir, emulate=True, expect_mode="native runner")


def test_ppocr_det_host(det_host):
    inputs = inputs_for("ppocrv4_det")
    result, _ = assert_close_to_reference(real_model("ppocrv4_det"), det_host.bundle_dir, inputs)
    prob = next(iter(result.outputs.values()))
    assert (prob > 0.3).mean() > 0.05, "the text image must light up the detector, or the comparison is empty"



@pytest.mark.parametrize("name", ["hand_landmark_lite", "face_detection_short_range"])
def test_tflite_host(name, tmp_path):
    """The default host build offloads a TFLite model's convolutions to oneDNN (NHWC throughout) and matches LiteRT."""
    built = api.build(real_model(name), "host", tmp_path / name)
    assert len(built.manifest.outputs) == {"hand_landmark_lite": 4, "face_detection_short_range": 2}[name]
    assert_close_to_reference(real_model(name), built.bundle_dir, inputs_for(name))
    convs = {(p["backend"], p["detail"]): p["count"] for p in report.build_json(built)["offload"]
             if p["operator"] == "conv2d"}
    assert sum(convs.values()) == {"hand_landmark_lite": 47, "face_detection_short_range": 37}[name], convs
    assert all(backend == "onednn" for backend, _ in convs), convs


def test_ppocr_cls_shape_subgraphs_fold_after_pinning(tmp_path):
    """PP-OCR cls computes its Reshape target through Shape/Gather/Concat: it imports once dims are pinned."""
    built = api.build(real_model("ppocr_cls"), "host", tmp_path / "cls", input_shapes={"x": (1, 3, 48, 192)})
    assert_close_to_reference(real_model("ppocr_cls"), built.bundle_dir, inputs_for("ppocr_cls"))


def test_bundle_contents_and_manifest(cnn, cnn_host):
    b, m = cnn_host.bundle_dir, cnn_host.manifest
    for name in ("model.so", "params.bin", "manifest.json", "main.cc", "CMakeLists.txt", "run.py", "README.md"):
        assert (b / name).is_file(), name
    assert m.inputs[0].to_json() == {"name": "input", "shape": [1, 3, 224, 224], "dtype": "float32",
                                     "file": "0-input.npy"}
    assert m.outputs[0].shape == (1, 1000)
    assert m.model_sha256 == sha256_file(cnn)
    assert set(m.versions) == {"edgec", "tvm", "tvm_ffi"}
    assert all(m.files[rel].sha256 == sha256_file(b / rel) for rel in m.files)
    on_disk = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - {"manifest.json"}
    assert set(m.files) == on_disk and "params.bin" in on_disk and "sample/expected/0-logits.npy" in on_disk
    readme = (b / "README.md").read_text()
    assert "edgec_run" in readme and "run.py --check" in readme and "logits" in readme
    with tarfile.open(cnn_host.archive) as tar:
        assert f"{b.name}/manifest.json" in tar.getnames()
    assert not list(b.parent.glob(".*tmp*")), "no temporary directories left behind"


def test_bundle_run_py_standalone(cnn_host):
    """The deployer's Python runner works on its own and checks itself against the shipped reference."""
    proc = subprocess.run([sys.executable, str(cnn_host.bundle_dir / "run.py"), "--check", "--repeat", "2"],
                          capture_output=True, text=True, cwd="/")
    assert proc.returncode == 0, proc.stderr
    assert "check logits: max abs" in proc.stdout and "check: ok" in proc.stdout


@pytest.mark.parametrize("level", [0, 3])
def test_opt_levels_stay_correct(small_cnn, tmp_path, level):
    built = api.build(small_cnn, "host", tmp_path / f"O{level}", options=BuildOptions(opt_level=level))
    ran = {r.name for r in built.compiled.passes}
    if level == 0:
        assert not ran & {"fold-batchnorm", "fuse-ops", "fuse-tir", "plan-memory"}
    else:
        assert {"fold-batchnorm", "fuse-ops", "fuse-tir", "plan-memory", "fast-math"} <= ran
    assert_close_to_reference(small_cnn, built.bundle_dir)


def test_cli_build_dump_ir_disable_pass_json(small_cnn, tmp_path):
    out, dump = tmp_path / "bundle", tmp_path / "ir"
    res = CliRunner().invoke(main, ["build", str(small_cnn), "--target", "host", "-o", str(out), "-O2",
                                    "--disable-pass", "fuse-tir", "--dump-ir", str(dump), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    for key in ("operators_before_fusion", "operators_after_fusion", "kernels", "param_bytes",
                "activations", "verification", "manifest_sha256", "library_bytes", "seconds", "passes"):
        assert key in summary, key
    assert summary["skipped_passes"]["fuse-tir"] == "disabled"
    assert "fuse-tir" not in Manifest.load(out).passes
    dumps = sorted(p.name for p in dump.iterdir())
    assert dumps[:3] == ["00-import-fold-shape-subgraphs.txt", "00-imported.py", "01-fold-batchnorm.py"]
    assert len(dumps) == len(summary["passes"]) + 1   # the imported module, then one file per step
    assert "R.nn.batch_norm" in (dump / "00-imported.py").read_text()
    assert "R.nn.batch_norm" not in (dump / "01-fold-batchnorm.py").read_text()
    assert_close_to_reference(small_cnn, out)


def test_cli_passes_targets_inspect(cnn, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["passes", "--target", "rpi4", "-O1"])
    assert res.exit_code == 0 and "skip eliminate-common-subexpr" in res.stdout and "run  fuse-ops" in res.stdout
    res = runner.invoke(main, ["targets"])
    assert all(name in res.stdout for name in ("host", "rpi4", "rpi3", "rpi-zero2w"))
    shown = json.loads(runner.invoke(main, ["targets", "show", "rpi-zero2w"]).stdout)
    assert shown["device"]["memory_mb"] == 512 and shown["tvm"]["target"]["mcpu"] == "cortex-a53"
    assert shown["cpu_features"] == ["neon"], "what the board's CPU must have: bundles require it"
    assert set(shown["not_used_yet"]) == {"rpc", "tuning"}, "tables nothing reads are reported, not accepted silently"
    board = tmp_path / "my-board.toml"
    from edgec.targets import load_target
    board.write_text(Path(load_target("rpi4").origin).read_text().replace('name = "rpi4"', 'name = "my-board"'))
    assert json.loads(runner.invoke(main, ["targets", "show", str(board)]).stdout)["name"] == "my-board"
    info = json.loads(runner.invoke(main, ["inspect", str(cnn), "--json"]).stdout)
    assert info["operators"]["BatchNormalization"] == 52 and info["param_count"] == 3_538_986
    assert 280e6 < info["macs"] < 320e6   # MobileNetV2 at 224x224: ~300M MACs
    hand = json.loads(runner.invoke(main, ["inspect", str(real_model("hand_landmark_lite")), "--json"]).stdout)
    assert hand["macs"] > 0 and hand["unsupported_operators"] == {} and hand["inputs"][0]["shape"] == [1, 224, 224, 3]
