"""ONNX export (fastkd.export.onnx): verified against PyTorch before it is kept, metadata inside, strict and
safe checkpoint loading. A small model folder is built here (nnU-Net's network from plans, random weights)."""

import json
import os
import re
import subprocess

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from fastkd.errors import FastkdError
from fastkd.nnunet import load_checkpoint
from fastkd.export.onnx import export_onnx
from fastkd.predict.backends.torch import load_student
from fastkd.nnunet import build_network
from fake_models import DATASET_JSON, PLANS, save_checkpoint, write_model
from workflow_runs import BIN


@pytest.fixture
def model(tmp_path):
    return write_model(tmp_path)


def test_static_export_matches_pytorch_and_carries_its_preprocessing(model, tmp_path):
    out = tmp_path / "out" / "student.onnx"
    record = export_onnx(model, 0, out)
    assert record["passed"] and record["checks"][0]["max_abs_diff"] < 1e-4 and record["checks"][0]["agreement"] == 1.0
    assert json.loads((tmp_path / "out" / "student.onnx.json").read_text()) == json.loads(json.dumps(record))
    m = onnx.load(out)
    onnx.checker.check_model(m, full_check=True)
    assert m.opset_import[0].version >= 17
    props = {p.key: json.loads(p.value) for p in m.metadata_props}
    assert props["nnunet_plans"] == PLANS and props["nnunet_dataset_json"] == DATASET_JSON
    meta = props["fastkd"]
    assert (meta["configuration"], meta["patch_size"], meta["spacing"], meta["divisible_by"]) == \
        ("3d_fullres", [16, 24, 16], [1.0, 1.0, 1.0], [4, 4, 4])
    assert meta["normalization_schemes"] == ["ZScoreNormalization"] and meta["labels"] == DATASET_JSON["labels"]
    assert meta["channel_names"] == {"0": "MRI"} and meta["num_outputs"] == 3 and not meta["regions"]
    assert len(meta["checkpoint_sha256"]) == 64 and meta["input"]["shape"] == [1, 1, 16, 24, 16]
    # one output, full resolution, deep supervision off; the file alone reproduces the network
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits"]
    x = np.random.default_rng(1).standard_normal((1, 1, 16, 24, 16)).astype(np.float32)
    network, _, _ = load_student(model, 0, "checkpoint_final.pth")
    with torch.no_grad():
        expected = network(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(session.run(None, {"image": x})[0], expected, atol=1e-4)
    with pytest.raises(Exception):  # static: another shape is refused
        session.run(None, {"image": np.zeros((1, 1, 24, 24, 16), np.float32)})


def test_dynamic_and_custom_shapes(model, tmp_path):
    record = export_onnx(model, 0, tmp_path / "dynamic.onnx", dynamic=True)
    assert [c["shape"] for c in record["checks"]] == [[1, 1, 16, 24, 16], [2, 1, 20, 28, 20]]
    session = ort.InferenceSession(str(tmp_path / "dynamic.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((3, 1, 32, 16, 8), np.float32)})[0].shape == (3, 3, 32, 16, 8)
    record = export_onnx(model, 0, tmp_path / "batch.onnx", batch=0)
    assert record["checks"][1]["shape"] == [2, 1, 16, 24, 16]
    record = export_onnx(model, 0, tmp_path / "custom.onnx", input_shape=[2, 1, 32, 32, 32])
    assert record["checks"][0]["shape"] == [2, 1, 32, 32, 32]
    for shape, message in [([1, 1, 18, 24, 16], "multiples of [4, 4, 4]"), ([1, 2, 16, 24, 16], "2 channels"),
                           ([1, 1, 16, 24], "4 dims")]:
        with pytest.raises(FastkdError, match=re.escape(message)):
            export_onnx(model, 0, tmp_path / "bad.onnx", input_shape=shape)
    assert not (tmp_path / "bad.onnx").exists()


def test_simplified_and_tensorrt_friendly_exports(model, tmp_path):
    plain = export_onnx(model, 0, tmp_path / "plain.onnx")
    slim = export_onnx(model, 0, tmp_path / "slim.onnx", simplify=True)
    assert slim["passed"] and len(onnx.load(tmp_path / "slim.onnx").graph.node) <= \
        len(onnx.load(tmp_path / "plain.onnx").graph.node)
    assert export_onnx(model, 0, tmp_path / "trt.onnx", tensorrt=True)["passed"] and plain["passed"]


def test_real_preprocessed_patches_join_the_parity_check(model, tmp_path):
    import blosc2

    data = tmp_path / "preprocessed"
    data.mkdir()
    for i, shape in enumerate([(1, 20, 30, 12), (1, 8, 8, 8)]):  # larger and smaller than the patch
        blosc2.asarray(np.random.default_rng(i).standard_normal(shape).astype(np.float32),
                       urlpath=str(data / f"case_{i}.b2nd"), mode="w")
    blosc2.asarray(np.zeros((1, 8, 8, 8), np.int16), urlpath=str(data / "case_0_seg.b2nd"), mode="w")
    record = export_onnx(model, 0, tmp_path / "real.onnx", preprocessed=data)
    assert record["real_patches"] == 2 and [c["input"] for c in record["checks"]][1:] == \
        ["preprocessed case 0", "preprocessed case 1"]


def test_a_checkpoint_that_does_not_fit_its_plans_leaves_no_model(model, tmp_path):
    """The reference exporter loads with strict=False and ships random weights; fastkd refuses."""
    network, _, _ = build_network(PLANS, "3d_fullres", DATASET_JSON)
    weights = network.state_dict()
    key = next(k for k in weights if k.endswith(".weight"))
    renamed = {("renamed." + k if k == key else k): v for k, v in weights.items()}
    save_checkpoint(model / "fold_0" / "checkpoint_final.pth", renamed)
    with pytest.raises(FastkdError, match=f"does not fit the network.*{key}"):
        export_onnx(model, 0, tmp_path / "x.onnx")
    weights[key] = weights[key][:1]  # a mis-shaped tensor
    save_checkpoint(model / "fold_0" / "checkpoint_final.pth", weights)
    with pytest.raises(FastkdError, match="size mismatch"):
        export_onnx(model, 0, tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]


def test_parity_failure_is_an_error_and_leaves_nothing(model, tmp_path, monkeypatch):
    run = ort.InferenceSession.run

    def off_by_a_bit(self, names, feeds):
        return [o + 0.01 for o in run(self, names, feeds)]

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_a_bit)
    with pytest.raises(FastkdError, match=r"max \|logit difference\| 0.01 \(tolerance 0.001\).*no model written"):
        export_onnx(model, 0, tmp_path / "x.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == [model.name]


class Exploit:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['EXPLOIT_MARKER']}",))


def test_a_checkpoint_carrying_a_malicious_pickle_is_refused(model, tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = model / "fold_0" / "checkpoint_final.pth"
    checkpoint = torch.load(path, weights_only=False)
    torch.save({**checkpoint, "logging": Exploit()}, path)
    with pytest.raises(FastkdError, match="cannot be loaded safely.*it asks for posix.system"):
        load_checkpoint(path)
    with pytest.raises(FastkdError, match="cannot be loaded safely"):
        export_onnx(model, 0, tmp_path / "x.onnx")
    assert not marker.exists() and not (tmp_path / "x.onnx").exists()


def test_export_command(model, tmp_path):
    fastkd = [str(BIN / "fastkd"), "export", "onnx", str(model)]
    run = subprocess.run([*fastkd, "-f", "0", "-o", str(tmp_path / "cli.onnx"), "--dynamic"], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "onnxruntime vs PyTorch on 2 inputs (0 real)" in run.stdout and (tmp_path / "cli.onnx.json").is_file()
    run = subprocess.run([*fastkd, "-f", "1", "-o", str(tmp_path / "no.onnx")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "fold_1/checkpoint_final.pth does not exist" in run.stderr
    run = subprocess.run([*fastkd, "-o", str(tmp_path / "no.txt")], capture_output=True, text=True, timeout=600)
    assert run.returncode == 1 and "must end in .onnx" in run.stderr
    assert not (tmp_path / "no.onnx").exists()


def test_teacher_checkpoints_are_checked_before_nnunet_unpickles_them(model, tmp_path, monkeypatch):
    """The soft-label pass hands teacher checkpoints to nnU-Net's predictor (torch.load weights_only=False)."""
    from fastkd.softlabels import TeacherEnsemble
    from fastkd.io import sha256

    marker = tmp_path / "pwned"
    monkeypatch.setenv("EXPLOIT_MARKER", str(marker))
    path = model / "fold_0" / "checkpoint_final.pth"
    torch.save({**torch.load(path, weights_only=False), "logging": Exploit()}, path)
    teacher = {"model_folder": str(model), "checkpoint": path.name,
               "folds": {"0": {"checkpoint": str(path), "sha256": sha256(path)}}}
    with pytest.raises(FastkdError, match="cannot be loaded safely.*it asks for posix.system"):
        TeacherEnsemble([teacher], [1.0], step_size=0.5, mirroring=False, device="cpu")
    assert not marker.exists()


# -- the reference's export commands ----------------------------------------------------------------
EXPORT_FLAGS = ["-d", "--dataset_id", "-c", "-f", "--fold", "-r", "--reduction_factor", "-cp", "-o", "--output",
                "-v", "--verbose", "-da", "-sim", "-da5"]
STANDARD_FLAGS = ["-is", "-nn"]
RESENC_FLAGS = ["-b", "--batch_size", "-spl", "--student_plans", "-p", "--plans", "-bs", "--block_strategy", "-fix",
                "--trt"]


@pytest.fixture
def results(model, tmp_path, monkeypatch):
    """nnU-Net's folders with the student where nnUNetv2_distillation_train puts it (r = 2, fold 0)."""
    ds = "Dataset900_FastkdDemo"
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / key / ds).mkdir(parents=True)
        monkeypatch.setenv(key, str(tmp_path / key))
    model.rename(tmp_path / "nnUNet_results" / ds / model.name)
    (tmp_path / "nnUNet_preprocessed" / ds / "nnUNetPlans.json").write_text(json.dumps({**PLANS, "plans_name": "nnUNetPlans"}))
    return tmp_path / "nnUNet_results" / ds / model.name


@pytest.mark.parametrize("command, flags", [
    ("nnUNetv2_distillation_export_onnx", EXPORT_FLAGS + STANDARD_FLAGS + ["--baseline"]),
    ("nnUNetv2_resenc_distillation_export_onnx", EXPORT_FLAGS + RESENC_FLAGS + ["--baseline"])])
def test_export_commands_list_every_reference_flag(command, flags):
    run = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, check=True, timeout=600)
    words = set(run.stdout.replace(",", " ").split())
    assert not [f for f in flags if f not in words]


def test_export_command_finds_the_trained_student(results, tmp_path, capsys):
    from fastkd.reference_export import export_onnx_command, resenc_export_onnx_command

    assert export_onnx_command(["-d", "900", "-f", "0", "-r", "2", "-v"]) == 0
    out = tmp_path / "fastkd_work" / "Dataset900_FastkdDemo" / "export" / results.name / "fold_0.onnx"
    text = capsys.readouterr().out
    assert f"-> {out}" in text and '"passed": true' in text and out.is_file()
    assert export_onnx_command(["-d", "Dataset900_FastkdDemo", "-da", "-o", str(tmp_path / "d.onnx")]) == 0
    assert json.loads((tmp_path / "d.onnx.json").read_text())["metadata"]["input"]["dynamic_axes"] == \
        {"0": "batch", "2": "x", "3": "y", "4": "z"}
    assert export_onnx_command(["-d", "900", "-is", "2", "1", "32", "32", "32", "-o", str(tmp_path / "s.onnx")]) == 0
    assert json.loads((tmp_path / "s.onnx.json").read_text())["metadata"]["input"]["shape"] == [2, 1, 32, 32, 32]
    assert export_onnx_command(["-d", "900", "-nn", "-sim", "-o", str(tmp_path / "nn.onnx")]) == 0
    assert json.loads((tmp_path / "nn.onnx.json").read_text())["metadata"]["input"]["shape"] == [1, 1, 16, 24, 16]
    # ResEnc: -o is a folder; -b 0 is a dynamic batch; -spl names the plans the student came from
    (tmp_path / "resenc").mkdir()
    assert resenc_export_onnx_command(["-d", "900", "-spl", "nnUNetPlans", "-b", "0", "--trt",
                                       "-o", str(tmp_path / "resenc")]) == 0
    record = json.loads((tmp_path / "resenc" / f"{results.name}__fold_0.onnx.json").read_text())
    assert record["metadata"]["input"]["dynamic_axes"] == {"0": "batch"} and record["passed"]
    capsys.readouterr()


@pytest.mark.parametrize("argv, message", [
    (["-r", "4"], "no student model folder"),
    (["-da5"], "nnUNetTrainerFastKD_DA5__nnUNetPlans_fastkdR2__3d_fullres; model folders in"),
    (["--baseline"], "nnUNetTrainerFastKDNoKD__"),
    (["-f", "3"], "fold_3/checkpoint_final.pth does not exist"),
    (["-nn", "-da"], "-nn exports nnU-Net's fixed patch: leave -is and -da out"),
    (["-d", "901"], "-d 901: no Dataset901_* folder"),
])
def test_export_command_errors(results, capsys, argv, message):
    from fastkd.reference_export import export_onnx_command

    assert export_onnx_command(["-d", "900", *argv] if argv[0] != "-d" else argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("nnUNetv2_distillation_export_onnx: error: ") and message in err, err


# -- fastkd predict ---------------------------------------------------------------------------------
def test_predict_refuses_models_it_cannot_run(model, tmp_path, capsys):
    from fastkd.cli import main

    (tmp_path / "in").mkdir()
    export_onnx(model, 0, tmp_path / "custom.onnx", input_shape=[2, 1, 16, 24, 16])
    plain = tmp_path / "plain.onnx"
    m = onnx.load(tmp_path / "custom.onnx")
    del m.metadata_props[:]
    onnx.save(m, plain)
    for argv, message in [
        (["-m", str(tmp_path / "custom.onnx")], "takes input [2, 1, 16, 24, 16]"),
        (["-m", str(plain)], "lacks the metadata fastkd, nnunet_plans, nnunet_dataset_json"),
        (["-m", str(tmp_path / "custom.onnx"), "--backend", "torch"], "the torch backend takes a model folder"),
        (["-m", str(model), "--backend", "onnx"], "the onnx backend takes a .onnx file"),
        (["-m", str(model), "-f", "2"], "fold_2/checkpoint_final.pth does not exist"),
    ]:
        assert main(["predict", "-i", str(tmp_path / "in"), "-o", str(tmp_path / "out"), *argv]) == 1
        assert message in capsys.readouterr().err, argv
    assert main(["predict", "-i", str(tmp_path / "nope"), "-o", str(tmp_path / "out"), "-m", str(model)]) == 1
    assert "not a folder of images" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_instance_norm_is_exported_accurate_at_brats_size(tmp_path):
    """onnxruntime's InstanceNormalization sums a whole volume in float32 (error 2.8e-4 on this input,
    PyTorch 1e-6); fastkd exports the staged form, as accurate as PyTorch."""
    from fastkd.export.onnx import StableInstanceNorm, stable_norms

    norm = torch.nn.InstanceNorm3d(2, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.5, 0.5]))
        norm.bias.copy_(torch.tensor([0.1, -0.2]))
    wrapped = torch.nn.Sequential(torch.nn.Identity(), norm)
    stable = stable_norms(wrapped)
    assert isinstance(stable[1], StableInstanceNorm) and wrapped[1] is norm  # a copy; the original stays
    x = (np.random.default_rng(0).standard_normal([1, 2, 96, 160, 160]) * 2 + 20).astype(np.float32)
    torch.onnx.export(stable, torch.zeros(x.shape), str(tmp_path / "n.onnx"), opset_version=17, dynamo=False,
                      input_names=["x"], output_names=["y"])
    assert "InstanceNormalization" not in {n.op_type for n in onnx.load(str(tmp_path / "n.onnx")).graph.node}
    got = ort.InferenceSession(str(tmp_path / "n.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    x64 = x.astype(np.float64)
    ref = (x64 - x64.mean((2, 3, 4), keepdims=True)) / np.sqrt(x64.var((2, 3, 4), keepdims=True) + 1e-5)
    ref = ref * np.array([1.5, 0.5]).reshape(1, 2, 1, 1, 1) + np.array([0.1, -0.2]).reshape(1, 2, 1, 1, 1)
    assert np.abs(got - ref).max() < 1e-5
    with torch.no_grad():
        assert (stable(torch.from_numpy(x)) - norm(torch.from_numpy(x))).abs().max() < 1e-5
