"""Stateful (streaming) models end to end: state pairs found at import (TFLite resource variables; ONNX by name or
--state), recorded in the manifest with their initial values, fed back by every runner (run.py's Model.stream,
edgec_run --stream, `edgec run --chunks`), and verified over a sequence of steps against the reference runtime
streaming the same chunks (LiteRT keeps its own variables; onnxruntime is fed its own state outputs)."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import helper

from edgec import api
from edgec.build import BuildOptions
from edgec.reference import ReferenceRuntime
from models import real_model
from test_cli_errors import check_cli_error, cli
from verify import save_onnx

NO_OFFLOAD = BuildOptions(offload=())
AUDIO = "serving_default_input_audio:0"
SCORE = "StatefulPartitionedCall:0"


def wakeword_features(steps: int, seed: int = 0) -> np.ndarray:
    """micro-wakeword's input, [steps, 1, 3, 40] int8: three frames of 40 log-mel features per chunk, quantized
    as the model's input is (scale 0.102, zero point -128). A noise floor, then a harmonic tone that rises and
    fades, so the streamed state carries something that changes."""
    rng = np.random.default_rng(seed)
    frames = steps * 3
    mel = 3.0 + 0.8 * rng.standard_normal((frames, 40))
    envelope = np.clip(np.sin(np.linspace(-0.6, np.pi + 0.6, frames)), 0, None)
    for harmonic in (6, 12, 18, 24):
        mel[:, harmonic - 1:harmonic + 2] += 14.0 * envelope[:, None]
    q = np.clip(np.round(mel / 0.10196078568696976) - 128, -128, 127).astype(np.int8)
    return q.reshape(steps, 1, 3, 40)


@pytest.fixture(scope="module")
def okay_nabu(tmp_path_factory):
    """pymicro-wakeword 2.5.0's okay_nabu (full-integer int8, six streaming buffers in resource variables)."""
    out = tmp_path_factory.mktemp("nabu") / "okay_nabu-host"
    return api.build(real_model("okay_nabu"), "host", out, options=NO_OFFLOAD)


def test_okay_nabu_builds_with_its_variables_as_states(okay_nabu):
    manifest = json.loads((okay_nabu.bundle_dir / "manifest.json").read_text())
    pairs = manifest["states"]["pairs"]
    assert [p["name"] for p in pairs] == [f"stream_{i}/states" for i in range(6, 12)]
    inputs, outputs = {t["name"]: t for t in manifest["inputs"]}, {t["name"]: t for t in manifest["outputs"]}
    assert [t["name"] for t in manifest["inputs"]][0] == AUDIO and [t["name"] for t in manifest["outputs"]][0] == SCORE
    for p in pairs:
        assert inputs[p["input"]]["shape"] == outputs[p["output"]]["shape"] and inputs[p["input"]]["dtype"] == "int8"
    assert manifest["states"]["initial"] == "states.bin" and "states.bin" in manifest["files"]
    # the CALL_ONCE subgraph's initial values: the quantized zero (-128), not integer zeros
    model = api.load(okay_nabu.bundle_dir)
    model.reset()
    assert all((v == -128).all() for v in model.state.values()) and len(model.state) == 6
    v = manifest["verification"]
    assert v["status"] == "verified" and v["runner"] == "in-process, 4 steps streamed", v
    assert v["tolerance"] == {"atol": 1, "rtol": 0}        # one quantization step: every output is quantized


def test_okay_nabu_streams_within_one_step_of_litert(okay_nabu):
    """12 chunks through Model.stream, every output (the score and the six state buffers) of every step within one
    quantization step of LiteRT invoking the original model on the same chunks (its variables kept inside)."""
    chunks = wakeword_features(12)
    states = api.bundle_states(okay_nabu.bundle_dir)
    litert = ReferenceRuntime(real_model("okay_nabu"), states=states)
    model = api.load(okay_nabu.bundle_dir)
    worst, moved = 0, 0
    for step, chunk in enumerate(chunks):
        ours, ref = model.stream({AUDIO: chunk}), litert.run({AUDIO: chunk})
        assert set(ours) == set(ref)
        for name in ref:
            assert ours[name].dtype == ref[name].dtype and ours[name].shape == ref[name].shape
            diff = np.abs(ours[name].astype(int) - ref[name].astype(int)).max()
            assert diff <= 1, f"step {step}, {name}: {diff} quantization steps"
            worst = max(worst, diff)
        moved += int(np.ptp(ref[states[-1].output]) > 0)
    assert moved >= 6, "the deepest state buffer changes with the input: the comparison checks the streamed state"
    # reset() starts again: the first chunk gives the first step's outputs again
    model.reset()
    again = model.stream({AUDIO: chunks[0]})
    first = ReferenceRuntime(real_model("okay_nabu")).run({AUDIO: chunks[0]})
    assert abs(int(again[SCORE][0, 0]) - int(first[SCORE][0, 0])) <= 1


def test_okay_nabu_through_the_cpp_runner_and_the_cli(okay_nabu, tmp_path):
    """edgec_run --stream (api.stream with emulate=True) gives what Model.stream gives, step for step; `edgec run
    --chunks` streams the stacked chunks and compares each step with LiteRT."""
    chunks = wakeword_features(8, seed=1)
    steps = [{AUDIO: c} for c in chunks]
    native = api.stream(okay_nabu.bundle_dir, steps, emulate=True)
    model = api.load(okay_nabu.bundle_dir)
    for step, outputs in zip(steps, native):
        local = model.stream(step)
        assert all(np.array_equal(outputs[n], local[n]) for n in local)
    np.save(tmp_path / "chunks.npy", chunks)
    result = cli("run", okay_nabu.bundle_dir, "--chunks", tmp_path / "chunks.npy", "--compare",
                 real_model("okay_nabu"), "--atol", "1", "--rtol", "0", "--json", "--output-dir", tmp_path / "out")
    assert result.exit_code == 0, result.output + result.stderr
    report = json.loads(result.stdout)
    assert len(report["steps"]) == 8 and all(c["ok"] for c in report["compare"]["steps"])
    saved = np.load(tmp_path / "out" / "7" / "0-StatefulPartitionedCall_0.npy")
    assert np.array_equal(saved, native[7][SCORE])


# ------------------------------------------------------------------------------------------ a small ONNX stream

def leaky_state_model(path, h_out: str = "h_next", extra_output: bool = False):
    """y = x + 0.5 h; h' = tanh(y): a state that leaks, in [1, 4] float32."""
    nodes = [helper.make_node("Mul", ["h", "half"], ["hh"]), helper.make_node("Add", ["x", "hh"], ["y"]),
             helper.make_node("Tanh", ["y"], [h_out])]
    outputs = {"y": [1, 4], h_out: [1, 4]}
    if extra_output:   # a second output that looks like h's next value: detection must not guess
        nodes.append(helper.make_node("Identity", [h_out], ["h_copy"]))
        outputs["h_copy"] = [1, 4]
    return save_onnx(path, "leaky", nodes, {"x": [1, 4], "h": [1, 4]}, outputs,
                     [onnx.numpy_helper.from_array(np.float32(0.5), "half")])


def expected_stream(chunks):
    h, out = np.zeros((1, 4), np.float32), []
    for x in chunks:
        y = x + np.float32(0.5) * h
        h = np.tanh(y)
        out.append((y, h))
    return out


def test_onnx_state_detected_by_name_and_streamed(tmp_path):
    built = api.build(leaky_state_model(tmp_path / "leaky.onnx"), "host", tmp_path / "b", options=NO_OFFLOAD)
    assert [vars(s) for s in built.manifest.states] == [{"name": "h", "input": "h", "output": "h_next"}]
    assert built.manifest.verification["runner"] == "in-process, 4 steps streamed"
    chunks = [np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32) for i in range(5)]
    got = api.stream(built.bundle_dir, [{"x": c} for c in chunks], emulate=True)     # edgec_run --stream
    for outputs, (y, h) in zip(got, expected_stream(chunks)):
        np.testing.assert_allclose(outputs["y"], y, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(outputs["h_next"], h, rtol=1e-6, atol=1e-6)
    # the sample ships the first call with the initial state, for run.py --check
    assert np.array_equal(np.load(built.bundle_dir / "sample" / "inputs" / "1-h.npy"), np.zeros((1, 4), np.float32))


def test_onnx_state_flag_and_ambiguous_names(tmp_path):
    model = leaky_state_model(tmp_path / "two.onnx", extra_output=True)
    # h_next and h_copy both fit h: nothing is guessed, the model builds without state
    plain = api.build(model, "host", tmp_path / "plain", options=NO_OFFLOAD)
    assert plain.manifest.states == () and "states" not in json.loads((plain.bundle_dir / "manifest.json").read_text())
    result = cli("run", plain.bundle_dir, "--chunks", tmp_path / "none.npy")
    check_cli_error(result, "keeps no state")
    paired = cli("build", model, "-o", tmp_path / "paired", "--offload", "none", "--state", "h_copy=h")
    assert paired.exit_code == 0, paired.stderr
    assert json.loads((tmp_path / "paired" / "manifest.json").read_text())["states"]["pairs"] == [
        {"name": "h", "input": "h", "output": "h_copy"}]
    check_cli_error(cli("build", model, "-o", tmp_path / "x", "--state", "y=nope"), "has no input 'nope'", "x, h")
    check_cli_error(cli("build", model, "-o", tmp_path / "x", "--state", "stateN"), "cannot parse --state 'stateN'")
    none = cli("build", leaky_state_model(tmp_path / "one.onnx"), "-o", tmp_path / "none", "--offload", "none",
               "--state", "none")
    assert none.exit_code == 0 and "states" not in json.loads((tmp_path / "none" / "manifest.json").read_text())


def test_chunks_with_the_wrong_shape_is_one_line(tmp_path):
    built = api.build(leaky_state_model(tmp_path / "leaky.onnx"), "host", tmp_path / "b", options=NO_OFFLOAD)
    np.save(tmp_path / "flat.npy", np.zeros((1, 4), np.float32))
    check_cli_error(cli("run", built.bundle_dir, "--chunks", tmp_path / "flat.npy"), "--chunks for 'x' has shape [1, 4]",
                    "[STEPS, 1, 4]")
    np.save(tmp_path / "ok.npy", np.zeros((3, 1, 4), np.float32))
    check_cli_error(cli("run", built.bundle_dir, "--chunks", tmp_path / "ok.npy", "-i", tmp_path / "flat.npy"),
                    "--chunks and --input do not go together")


# ------------------------------------------------------------------------------------------ replacing old bundles

def test_force_replaces_a_format_2_bundle(tmp_path):
    """A bundle of an older edgec (format 2) is replaced like one of this version: intact with or without --force;
    never when it holds a file its manifest does not list."""
    model = leaky_state_model(tmp_path / "leaky.onnx")
    out = tmp_path / "b"
    api.build(model, "host", out, options=NO_OFFLOAD)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 2
    del manifest["load"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert cli("build", model, "-o", out, "--offload", "none", "--force").exit_code == 0
    assert json.loads((out / "manifest.json").read_text())["format_version"] == 3
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "notes.txt").write_text("mine")
    check_cli_error(cli("build", model, "-o", out, "--offload", "none", "--force"), "files edgec did not write",
                    "notes.txt")
    assert (out / "notes.txt").read_text() == "mine"


def test_cross_target_stream_verified_under_qemu(tmp_path):
    """An rpi4 build streams its 4 verification steps through edgec_run --stream under qemu (Cortex-A72)."""
    built = api.build(leaky_state_model(tmp_path / "leaky.onnx"), "rpi4", tmp_path / "rpi4", options=NO_OFFLOAD)
    assert built.manifest.verification["status"] == "verified"
    assert built.manifest.verification["runner"] == "qemu, 4 steps streamed"
    chunks = [np.random.default_rng(i).standard_normal((1, 4)).astype(np.float32) for i in range(3)]
    for outputs, (y, h) in zip(api.stream(built.bundle_dir, [{"x": c} for c in chunks]), expected_stream(chunks)):
        np.testing.assert_allclose(outputs["h_next"], h, rtol=1e-6, atol=1e-6)


def test_a_stream_that_forgets_its_state_stops_the_build(tmp_path, monkeypatch):
    """Verification compares every step: a runner that fed the initial state again at every step (here run.py's
    Model.stream made to forget) agrees with onnxruntime on the first step only, and nothing is published."""
    from edgec.runtime import bundle_runner
    from edgec.verification import VerificationFailed

    model_class = bundle_runner().Model
    forgetful = model_class.stream

    def stream(self, inputs):
        self.state = None
        return forgetful(self, inputs)

    monkeypatch.setattr(model_class, "stream", stream)
    with pytest.raises(VerificationFailed, match="on output 'y' at step 2 of 4 from the initial state"):
        api.build(leaky_state_model(tmp_path / "leaky.onnx"), "host", tmp_path / "b", options=NO_OFFLOAD)
    assert not (tmp_path / "b").exists()
