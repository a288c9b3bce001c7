"""TensorRT engines (fastkd.export.tensorrt, run by fastkd.predict.backends.tensorrt) without TensorRT: what
runs on any machine. The arguments are checked before TensorRT is asked for, a missing TensorRT or GPU is
one clear error that leaves the output alone, the up-to-date decision, the calibration data, the FP32
normalization rule, the engine loader's checks (the workflow's export_trt jobs: tests/workflow/test_dry_runs.py). Building and running an
engine needs TensorRT and a GPU."""

import json
import os
import re
import subprocess
import sys
import types

import numpy as np
import onnx
import pytest
import torch

from fastkd.errors import FastkdError
from fastkd.export import tensorrt as fastkd_trt
from fastkd.export.onnx import export_onnx
from fastkd.export.tensorrt import build_engine, calibration_batches, keep_fp32, read_onnx, resolve_profile
from fastkd.predict.backends import tensorrt as trt_backend
from fastkd.predict.backends.tensorrt import (BUILD_KEYS, TILE_BATCH, differences, load_engine_model, metadata_path,
                                             require_tensorrt)
from fake_models import DATASET_JSON, PLANS, write_model
from workflow_runs import BIN, env

PLATFORM = {"tensorrt_version": "10.3.0", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """A small student's static and dynamic ONNX exports, and one without fastkd's metadata."""
    tmp = tmp_path_factory.mktemp("exports")
    folder = write_model(tmp)
    export_onnx(folder, 0, tmp / "static.onnx")
    export_onnx(folder, 0, tmp / "dynamic.onnx", dynamic=True)
    plain = onnx.load(tmp / "static.onnx")
    del plain.metadata_props[:]
    onnx.save(plain, tmp / "plain.onnx")
    return tmp


@pytest.fixture
def no_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError


@pytest.fixture
def stub_tensorrt(tmp_path):
    """A PYTHONPATH entry whose `tensorrt` fails to import: a machine without TensorRT, wherever the test runs."""
    stub = tmp_path / "stub" / "tensorrt"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('No module named tensorrt')\n")
    return stub.parent


def test_the_command_without_tensorrt_fails_clearly_and_leaves_the_output_alone(exports, tmp_path, stub_tensorrt):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.engine").write_bytes(b"an engine built elsewhere")
    (out / "old.engine.json").write_text("{}")
    # the stub first, then whatever made this checkout's package win (a worktree's PYTHONPATH)
    run_env = {**env(), "PYTHONPATH": os.pathsep.join(filter(None, (str(stub_tensorrt), os.environ.get("PYTHONPATH"))))}
    for engine in ("new.engine", "old.engine"):
        run = subprocess.run([str(BIN / "fastkd"), "export", "trt", str(exports / "static.onnx"), "-o",
                              str(out / engine), "--max-batch", "1"], capture_output=True, text=True, env=run_env, timeout=600)
        assert run.returncode == 1 and run.stdout == ""
        wheel = f"tensorrt-cu{torch.version.cuda.split('.')[0]}" if torch.version.cuda else "tensorrt-cu12"
        assert run.stderr.startswith("fastkd export trt: error: TensorRT is not installed") and \
            f'pip install "{wheel}>=10.13,<11"' in run.stderr and "NVIDIA GPU" in run.stderr, run.stderr
    assert sorted(p.name for p in out.iterdir()) == ["old.engine", "old.engine.json"]
    assert (out / "old.engine").read_bytes() == b"an engine built elsewhere"


def test_tensorrt_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.13.3.9"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FastkdError, match="TensorRT needs an NVIDIA GPU; torch sees none"):
        require_tensorrt()


@pytest.mark.parametrize("onnx_name, kwargs, message", [
    ("static.onnx", {"precision": "fp8"}, "export.tensorrt.precision = 'fp8' (str): must be one of: fp32, fp16, int8"),
    ("static.onnx", {"workspace_gb": 0}, "export.tensorrt.workspace_gb = 0"),
    ("missing.onnx", {}, "missing.onnx: no such .onnx file; write one with `fastkd export onnx`"),
    ("plain.onnx", {}, "plain.onnx lacks the metadata fastkd, nnunet_plans, nnunet_dataset_json"),
    ("static.onnx", {"precision": "int8"}, "precision int8 needs calibration data: --calibration FOLDER"),
    ("static.onnx", {"calibration": "nowhere"}, "calibration folder nowhere does not exist"),
    ("static.onnx", {"min_agreement": 99.9}, "min agreement 99.9: must be a fraction in [0, 1]"),
    ("static.onnx", {"max_batch": 4}, "max batch 4: the ONNX input [1, 1, 16, 24, 16] has a static batch of 1"),
    ("static.onnx", {}, "max batch 8: the ONNX input [1, 1, 16, 24, 16] has a static batch of 1; an engine batches "
                        "up to 8 tiles by default: export the ONNX with a dynamic batch (fastkd export onnx --batch 0"),
    ("static.onnx", {"max_batch": 1, "profile": {"max": [2, 1, 16, 24, 16]}}, "profile max shape [2, 1, 16, 24, 16]: axis 0 is static"),
    ("dynamic.onnx", {"profile": {"opt": [1, 2, 16, 24, 16]}}, "profile opt shape [1, 2, 16, 24, 16]: 2 channels, "
                                                                "the network takes 1"),
    ("dynamic.onnx", {"profile": {"min": [1, 1, 16, 24]}}, "profile min shape [1, 1, 16, 24]: 4 dims, the ONNX "
                                                            "input takes 5 (b c x y z)"),
    ("dynamic.onnx", {"profile": {"max": [1, 1, 18, 24, 16]}}, "spatial dims multiples of [4, 4, 4]"),
    ("dynamic.onnx", {"profile": {"min": [9, 1, 16, 24, 16]}}, "profile min [9, 1, 16, 24, 16] <= opt "
                                                                "[8, 1, 16, 24, 16] <= max [8, 1, 16, 24, 16] fails on axis 0"),
    ("dynamic.onnx", {"profile": {"min": [1, 1, 32, 32, 32], "opt": [2, 1, 32, 32, 32], "max": [2, 1, 32, 32, 32]}},
     "excludes nnU-Net's patch [1, 1, 16, 24, 16]"),
    ("dynamic.onnx", {"profile": {"opt": [1, 1, 32, 24, 16], "max": [4, 1, 24, 24, 16]}}, "fails on axis 2"),
])
def test_arguments_are_checked_before_tensorrt_is_asked_for(exports, tmp_path, monkeypatch, no_tensorrt, onnx_name,
                                                           kwargs, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastkdError, match=re.escape(message)):
        build_engine(exports / onnx_name, tmp_path / "out" / "student.engine", **kwargs)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_valid_arguments_reach_the_tensorrt_check(exports, tmp_path, no_tensorrt):
    calibration = tmp_path / "preprocessed"
    calibration.mkdir()
    for onnx_name, kwargs in [("static.onnx", {"max_batch": 1}), ("dynamic.onnx", {"precision": "int8", "calibration": calibration,
                                                                      "profile": {"max": [2, 1, 32, 32, 32]}})]:
        with pytest.raises(FastkdError, match="TensorRT is not installed"):
            build_engine(exports / onnx_name, tmp_path / "out" / "student.plan", **kwargs)
    with pytest.raises(FastkdError, match=re.escape("must end in .engine or .plan")):
        build_engine(exports / "static.onnx", tmp_path / "student.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocessed"]


def test_profiles_default_to_the_onnx_shape_or_nnunets_patch(exports):
    static, _ = read_onnx(exports / "static.onnx")
    dynamic, _ = read_onnx(exports / "dynamic.onnx")
    patch = [1, 1, 16, 24, 16]
    assert resolve_profile(static["fastkd"], max_batch=1) == {"min": patch, "opt": patch, "max": patch}
    # a dynamic batch: min 1, opt the tiles predict batches on CUDA (or max, when smaller), max max_batch
    assert TILE_BATCH == 8
    assert resolve_profile(dynamic["fastkd"]) == {"min": patch, "opt": [8, 1, 16, 24, 16], "max": [8, 1, 16, 24, 16]}
    assert resolve_profile(dynamic["fastkd"], max_batch=4) == {"min": patch, "opt": [4, 1, 16, 24, 16],
                                                               "max": [4, 1, 16, 24, 16]}
    assert resolve_profile(dynamic["fastkd"], max_batch=16)["opt"] == [8, 1, 16, 24, 16]
    assert resolve_profile(dynamic["fastkd"], {"max": [2, 1, 32, 32, 32], "min": None}) == \
        {"min": patch, "opt": [2, 1, 16, 24, 16], "max": [2, 1, 32, 32, 32]}
    assert static["nnunet_plans"] == PLANS and static["nnunet_dataset_json"] == DATASET_JSON


BUILD = {**PLATFORM, "format_version": fastkd_trt.FORMAT_VERSION, "precision": "fp16",
         "profile": {"min": [1, 1, 16, 24, 16], "opt": [2, 1, 16, 24, 16], "max": [2, 1, 16, 24, 16]},
         "onnx_sha256": "ab" * 32, "workspace_gb": 4.0, "min_agreement": 0.999, "calibration_sha256": None}


def test_an_engine_is_rebuilt_when_anything_it_was_built_from_changes():
    assert set(BUILD_KEYS) == set(BUILD)
    recorded = json.loads(json.dumps({**BUILD, "parity": {"passed": True}, "fastkd_version": "0"}))
    assert differences(recorded, BUILD) == []
    for key, value in [("format_version", fastkd_trt.FORMAT_VERSION + 1), ("tensorrt_version", "10.14.1"),
                       ("gpu", {**PLATFORM["gpu"], "name": "NVIDIA A100"}), ("precision", "int8"),
                       ("profile", {**BUILD["profile"], "max": [4, 1, 16, 24, 16]}), ("onnx_sha256", "cd" * 32),
                       ("workspace_gb", 8.0), ("min_agreement", 0.99), ("calibration_sha256", "ef" * 32)]:
        changed = differences(recorded, {**BUILD, key: value})
        assert len(changed) == 1 and changed[0].startswith(f"{key} {json.dumps(recorded[key])} -> "), changed
    assert differences(None, BUILD) == differences([], BUILD) == ["no engine metadata"]
    assert differences(recorded, {**BUILD, "precision": "int8"}, keys=("tensorrt_version", "gpu")) == []


def test_build_keeps_an_up_to_date_engine_and_clears_a_stale_one(exports, tmp_path, monkeypatch):
    """The decision inside build_engine, with the platform faked: TensorRT itself cannot run here. Every
    build key, the int8 calibration data among them, rebuilds when it changes."""
    from fastkd.io import sha256

    monkeypatch.setattr(fastkd_trt, "require_tensorrt", lambda: types.SimpleNamespace(__version__="10.13.3"))
    monkeypatch.setattr(fastkd_trt, "running_platform", lambda: PLATFORM)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    builds = []

    def refuse(*args):
        builds.append(args[2])
        raise FastkdError("build attempted")

    monkeypatch.setattr(fastkd_trt, "_build", refuse)
    _write_cases(tmp_path / "cases", [(16, 24, 16)] * 2)
    _write_cases(tmp_path / "other", [(16, 24, 16)] * 3)
    engine = tmp_path / "out" / "student.engine"
    engine.parent.mkdir()
    patch = [1, 1, 16, 24, 16]
    fp16 = {**BUILD, "profile": {"min": patch, "opt": patch, "max": patch},
            "onnx_sha256": sha256(exports / "static.onnx"), "parity": {"passed": True}}
    int8 = {**fp16, "precision": "int8", "calibration_sha256": fastkd_trt.batches_sha256(
        fastkd_trt.calibration_batches(tmp_path / "cases", patch))}

    def install(record):
        engine.write_bytes(b"engine")
        metadata_path(engine).write_text(json.dumps(record))

    base = {"max_batch": 1, "calibration": tmp_path / "cases"}
    for record, kwargs in ((fp16, {}), (int8, {"precision": "int8"})):
        install(record)
        kept = build_engine(exports / "static.onnx", engine, **base, **kwargs)
        assert kept["built"] is False and kept["parity"] == {"passed": True} and builds == []
    stale = [(fp16, {"force": True}), (fp16, {"precision": "fp32"}), (fp16, {"workspace_gb": 8}),
             (fp16, {"min_agreement": 0.99}), ({**fp16, "format_version": fastkd_trt.FORMAT_VERSION - 1}, {}),
             (int8, {"precision": "int8", "calibration": tmp_path / "other"})]
    for record, kwargs in stale:
        install(record)
        with pytest.raises(FastkdError, match="build attempted"):
            build_engine(exports / "static.onnx", engine, **{**base, **kwargs})
        assert not engine.exists() and not metadata_path(engine).exists()  # never an old JSON beside a new engine
    assert builds == ["fp16", "fp32", "fp16", "fp16", "fp16", "int8"]
    install(fp16)
    metadata_path(engine).unlink()  # an engine without its metadata is rebuilt
    with pytest.raises(FastkdError, match="build attempted"):
        build_engine(exports / "static.onnx", engine, **base)
    assert sorted(p.name for p in engine.parent.iterdir()) == []


def test_a_build_without_real_patches_is_refused_naming_where_it_looked(exports, tmp_path, monkeypatch):
    monkeypatch.setattr(fastkd_trt, "require_tensorrt", lambda: types.SimpleNamespace(__version__="10.13.3"))
    monkeypatch.setattr(fastkd_trt, "running_platform", lambda: PLATFORM)
    monkeypatch.setattr(fastkd_trt, "_build", lambda *args: pytest.fail("built without real patches"))
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)
    engine = tmp_path / "student.engine"
    with pytest.raises(FastkdError, match=re.escape("no preprocessed <case>.b2nd for the parity gate (no "
                                                    "--calibration, and $nnUNet_preprocessed is not set)")):
        build_engine(exports / "static.onnx", engine, max_batch=1)
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    with pytest.raises(FastkdError, match=re.escape(f"(nnU-Net's folder of the model, {tmp_path / 'preprocessed'}/")):
        build_engine(exports / "static.onnx", engine, max_batch=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastkdError, match=re.escape(f"(--calibration {tmp_path / 'empty'})")):
        build_engine(exports / "static.onnx", engine, max_batch=1, calibration=tmp_path / "empty")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def _write_cases(folder, shapes, channels=1):
    import blosc2

    folder.mkdir()
    cases = []
    for i, shape in enumerate(shapes):
        data = np.random.default_rng(i).standard_normal((channels, *shape)).astype(np.float32)
        blosc2.asarray(data, urlpath=str(folder / f"case_{i}.b2nd"), mode="w")
        cases.append(data)
    blosc2.asarray(np.ones((1, 8, 8, 8), np.int16), urlpath=str(folder / "case_0_seg.b2nd"), mode="w")
    return cases


def test_calibration_batches_are_real_patches(tmp_path):
    cases = _write_cases(tmp_path / "preprocessed", [(20, 30, 12), (8, 8, 8), (16, 24, 16)])
    batches = calibration_batches(tmp_path / "preprocessed", [1, 1, 16, 24, 16])
    assert [b.shape for b in batches] == [(1, 1, 16, 24, 16)] * 3 and all(b.dtype == np.float32 for b in batches)
    np.testing.assert_array_equal(batches[0][0, :, :, :, :12], cases[0][:, 2:18, 3:27, :])  # the centre, zero-padded
    assert not batches[0][0, :, :, :, 12:].any()
    np.testing.assert_array_equal(batches[2][0], cases[2])
    pairs = calibration_batches(tmp_path / "preprocessed", [2, 1, 16, 24, 16])
    assert [b.shape for b in pairs] == [(2, 1, 16, 24, 16)]  # a last incomplete batch is left out
    assert len(calibration_batches(tmp_path / "preprocessed", [1, 1, 16, 24, 16], limit=2)) == 2
    with pytest.raises(FastkdError, match="cases have 1 channels, the network takes 2"):
        calibration_batches(tmp_path / "preprocessed", [1, 2, 16, 24, 16])
    with pytest.raises(FastkdError, match="3 cases, fewer than one batch of 4"):
        calibration_batches(tmp_path / "preprocessed", [4, 1, 16, 24, 16])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastkdError, match="empty: no preprocessed <case>.b2nd in it"):
        calibration_batches(tmp_path / "empty", [1, 1, 16, 24, 16])


def test_normalization_layers_are_held_in_fp32(exports):
    meta, norms = read_onnx(exports / "static.onnx")
    model = onnx.load(exports / "static.onnx")
    # fastkd exports InstanceNorm as staged means: every node of each norm's scope is normalization
    scopes = meta["fastkd"]["normalization_scopes"]
    assert len(scopes) == 5 and not any(n.op_type == "InstanceNormalization" for n in model.graph.node)
    assert norms == {n.name for n in model.graph.node if n.name.startswith(tuple(scopes))}
    assert {n.op_type for n in model.graph.node if n.name in norms} >= {"ReduceMean", "Sub", "Mul", "Sqrt", "Div"}
    node = sorted(norms)[0]
    assert keep_fp32("anything", "NORMALIZATION", set())  # TensorRT 10's parser: an INormalizationLayer
    assert keep_fp32(node, "PLUGIN_V2", norms)  # older parsers: the InstanceNormalization_TRT plugin ...
    assert keep_fp32(f"{node}_reduce_mean", "REDUCE", norms)  # ... or a subgraph named after the node
    conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    assert not keep_fp32(conv, "CONVOLUTION", norms)


def test_the_engine_loader_refuses_engines_it_cannot_trust(exports, tmp_path, monkeypatch):
    metadata, _ = read_onnx(exports / "static.onnx")
    engine = tmp_path / "student.engine"
    engine.write_bytes(b"engine")
    with pytest.raises(FastkdError, match="engine metadata .*student.engine.json does not exist"):
        load_engine_model(engine, torch.device("cuda"))
    metadata_path(engine).write_text(json.dumps({**PLATFORM, "metadata": {"fastkd": metadata["fastkd"]}}))
    with pytest.raises(FastkdError, match="lacks profile, metadata.nnunet_plans, metadata.nnunet_dataset_json"):
        load_engine_model(engine, torch.device("cuda"))
    small = [1, 1, 8, 8, 8]
    metadata_path(engine).write_text(json.dumps({**PLATFORM, "metadata": metadata, "onnx": "student.onnx",
                                                 "profile": {"min": small, "opt": small, "max": small}}))
    with pytest.raises(FastkdError, match=re.escape("nnU-Net's sliding window feeds [1, 1, 16, 24, 16]")):
        load_engine_model(engine, torch.device("cuda"))
    patch = [1, 1, 16, 24, 16]
    metadata_path(engine).write_text(json.dumps({**PLATFORM, "metadata": metadata, "onnx": "student.onnx",
                                                 "profile": {"min": patch, "opt": patch, "max": patch}}))
    other = {**PLATFORM, "gpu": {"name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}}
    monkeypatch.setattr(trt_backend, "running_platform", lambda: other)
    with pytest.raises(FastkdError, match=r"built for another platform \(gpu .*H100.* -> .*A100.*rebuild it with "
                                          r"`fastkd export trt student.onnx -o"):
        load_engine_model(engine, torch.device("cuda"))
    with pytest.raises(FastkdError, match="the trt backend takes an .engine or .plan file"):
        load_engine_model(exports / "static.onnx", torch.device("cuda"))
