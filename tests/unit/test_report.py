"""The report's own pages: fastkd.report, `fastkd report summary`, the report_summary rule, `snakemake --report`.

The tests build tiny nnU-Net model folders, evaluation tables and a soft-label cache by hand; the report of
a real run: tests/workflow/test_report_pages.py.
"""

import json
import re
import shutil
from pathlib import Path

import blosc2
import numpy as np
import pytest
from PIL import Image

from fastkd import report
from fastkd.cli import main
from fastkd.errors import FastkdError
from fake_stores import flip_a_byte, make_store

DATASET_JSON = {"channel_names": {"0": "x"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "file_ending": ".nii.gz", "numTraining": 5}


def tiny_plans(features: list[int], r: int | None = None) -> dict:
    """A two-stage 3d PlainConvUNet on an 8 x 8 x 8 patch, one conv per stage."""
    arch = {"n_stages": 2, "features_per_stage": features, "conv_op": "torch.nn.modules.conv.Conv3d",
            "kernel_sizes": [[3, 3, 3], [3, 3, 3]], "strides": [[1, 1, 1], [2, 2, 2]], "n_conv_per_stage": [1, 1],
            "n_conv_per_stage_decoder": [1], "conv_bias": True,
            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
            "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True}}
    plans = {"dataset_name": "Dataset999_T", "plans_name": "P" if r is None else f"P_fastkdR{r}",
             "label_manager": "LabelManager",
             "configurations": {"3d_fullres": {
                 "data_identifier": "P_3d_fullres", "patch_size": [8, 8, 8], "spacing": [1, 1, 1],
                 "architecture": {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                                  "arch_kwargs": arch,
                                  "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    if r is not None:
        plans["fastkd"] = {"reduction_factor": r}
    return plans


def model_folder(root, name, plans, fold_bytes: dict) -> list:
    """An nnU-Net model folder whose fold f holds a checkpoint of fold_bytes[f] bytes and a progress.png
    (1200 x 60 pixels, of gray level f)."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    checkpoints = []
    for fold, size in fold_bytes.items():
        (folder / f"fold_{fold}").mkdir()
        checkpoints.append(folder / f"fold_{fold}" / "checkpoint_final.pth")
        checkpoints[-1].write_bytes(b"\0" * size)
        Image.new("L", (1200, 60), color=fold).save(folder / f"fold_{fold}" / "progress.png")
    return checkpoints


@pytest.fixture
def models(tmp_path):
    """(label, checkpoint) of a teacher (two folds) and a KD student (fold 1), and the student's ONNX export."""
    teacher = model_folder(tmp_path / "results", "nnUNetTrainer__P__3d_fullres", tiny_plans([8, 16]), {0: 3000, 1: 5000})
    student = model_folder(tmp_path / "results", "nnUNetTrainerFastKD__P_fastkdR2__3d_fullres", tiny_plans([4, 8], 2),
                           {1: 1000})
    onnx = tmp_path / "export" / "fold_1.onnx"
    onnx.parent.mkdir()
    onnx.write_bytes(b"\0" * 700)
    return [("teachers", teacher[0]), ("teachers", teacher[1]), ("KD r2", student[0])], [("KD r2", onnx)]


def evaluation(root: Path, rows: dict[str, float]) -> Path:
    """A case set's dice.json (as `fastkd evaluate table` writes it) and each prediction's record."""
    kinds = {"teachers": ("teacher ensemble", "teacher ensemble (2 folds)", None),
             "S__fold_1": ("student (KD)", "KD r2 fold 1", 2)}
    table = {"case_set": "test", "optimistic": False, "cases": ["c0", "c1"], "labels": "labelsTs",
             "classes": ["organ", "lesion"], "rows": []}
    for label, seconds in rows.items():
        kind, short, r = kinds[label]
        table["rows"].append({"label": label, "short": short, "kind": kind, "r": r, "model": f"/m/{label}",
                              "folds": [1], "mirroring": True, "seconds_per_case": seconds,
                              "dice": {"organ": 0.9, "lesion": 0.25}, "mean_dice": 0.575, "cases": 2,
                              "optimistic": False})
        predictions = root / "predictions" / label
        predictions.mkdir(parents=True)
        (predictions / "fastkd_predict.json").write_text(json.dumps(
            {"model": f"/m/{label}", "backend": "torch", "folds": [1], "device": "cpu", "mirroring": True,
             "step_size": 0.5, "tile_batch": 1, "jit": True, "cases": 2, "seconds_total": 2 * seconds,
             "seconds_per_case": seconds}))
    (root / "dice.json").write_text(json.dumps(table))
    return root / "dice.json"


def verified_cache(tmp_path):
    """A finalized soft-label cache and the preprocessed cases whose shapes it must match."""
    store, _ = make_store(tmp_path)
    folder = tmp_path / "preprocessed"
    folder.mkdir()
    for case, shape in {"case_a": (10, 12, 9), "case_b": (7, 5, 11)}.items():
        blosc2.asarray(np.zeros((1, *shape), np.float32), urlpath=str(folder / f"{case}.b2nd"), mode="w")
    return store, folder


# -- fast -------------------------------------------------------------------------------------------
def test_parameters_and_flops_match_a_hand_count_and_sizes_are_the_files(models):
    checkpoints, onnx = models
    teacher, student = report.model_rows(checkpoints, onnx)
    # the student's network, layer by layer: multiply-adds = output voxels x C_out x C_in x kernel voxels
    # (a transposed conv: input voxels x C_out x C_in x kernel voxels)
    macs = (8 ** 3 * 4 * 1 * 27    # encoder stage 0: conv 1 -> 4, 3x3x3, on the 8x8x8 patch
            + 4 ** 3 * 8 * 4 * 27  # encoder stage 1: conv 4 -> 8, stride 2, 4x4x4 out
            + 4 ** 3 * 8 * 4 * 8   # transposed conv 8 -> 4, 2x2x2 kernel, from 4x4x4
            + 8 ** 3 * 4 * 8 * 27  # decoder conv (4 + 4 skip) -> 4 on 8x8x8
            + 8 ** 3 * 3 * 4)      # 1x1x1 segmentation head 4 -> 3 classes
    params = ((27 * 1 * 4 + 4) + 2 * 4 + (27 * 4 * 8 + 8) + 2 * 8  # encoder convs (+ bias), instance norms
              + (8 * 8 * 4 + 4) + (27 * 8 * 4 + 4) + 2 * 4 + (4 * 3 + 3))  # transposed conv, decoder conv, norm, head
    assert student["flops"] == 2 * macs and student["parameters"] == params
    # the teacher (features 8, 16): 4x every layer's multiply-adds but the first conv's and the head's (2x: one
    # input channel, three classes whatever the width)
    assert teacher["flops"] == 2 * (4 * macs - 2 * (8 ** 3 * 4 * 1 * 27 + 8 ** 3 * 3 * 4))
    assert student["teacher_flops_ratio"] == teacher["flops"] / student["flops"] and teacher["teacher_flops_ratio"] == 1
    assert student["teacher_params_ratio"] == teacher["parameters"] / params
    assert (teacher["r"], student["r"]) == (None, 2) and teacher["folds"] == ["0", "1"] and student["folds"] == ["1"]
    assert teacher["network"] == "PlainConvUNet" and student["features_per_stage"] == [4, 8]
    assert teacher["checkpoint_bytes"] == 4000 and teacher["onnx_bytes"] is None  # mean of the two folds
    assert student["checkpoint_bytes"] == 1000 and student["onnx_bytes"] == 700


def test_summary_writes_every_table_page_figure_and_curve(models, tmp_path):
    checkpoints, onnx = models
    dice = evaluation(tmp_path / "evaluation" / "test", {"teachers": 8.0, "S__fold_1": 2.0})
    store, preprocessed = verified_cache(tmp_path)
    out = tmp_path / "report"
    result = report.write_summary(out, checkpoints, onnx, [dice], [store], preprocessed, title="Dataset999_T")

    models_tsv = [line.split("\t") for line in (out / "models.tsv").read_text().splitlines()]
    assert models_tsv[0] == list(report.MODEL_COLUMNS)
    assert [row[0] for row in models_tsv[1:]] == ["teachers", "KD r2"]
    assert models_tsv[2][7] == str(result["models"][1]["parameters"]) and models_tsv[2][12] == "0.00"
    assert models_tsv[1][12] == "-" and models_tsv[1][4] == "0,1"
    speed = [line.split("\t") for line in (out / "speed.tsv").read_text().splitlines()]
    assert speed[0] == list(report.SPEED_COLUMNS)
    assert speed[2][:3] == ["test", "KD r2 fold 1", "student (KD)"] and speed[2][-3:] == ["4.00", "2.000", "4.00"]
    cache_tsv = [line.split("\t") for line in (out / "cache.tsv").read_text().splitlines()]
    assert dict(zip(*cache_tsv))["verify"] == "ok" and dict(zip(*cache_tsv))["cases"] == "2"
    assert "2 (2 labelled, 0 unlabelled images)" in (out / "cache.html").read_text()

    page = (out / "models.html").read_text()
    assert "<h1>Dataset999_T: model size and cost</h1>" in page and "GFLOPs / patch" in page
    assert f"{result['models'][0]['parameters']:,}" in page and str(tmp_path / "results") in page
    page = (out / "dice.html").read_text()
    assert "test: 2 cases, none of them seen in training" in page and "Dice lesion" in page
    assert "<td>KD r2 fold 1</td><td>student (KD)</td>" in page and '<td class="n">0.2500</td>' in page
    assert "speed-up vs teachers" in (out / "speed.html").read_text()
    assert "fastkd cache verify: OK" in (out / "cache.html").read_text()
    assert (out / "models.png").read_bytes().startswith(b"\x89PNG")
    assert sorted(p.name for p in (out / "curves").iterdir()) == [
        "nnUNetTrainerFastKD__P_fastkdR2__3d_fullres__fold_1.png", "nnUNetTrainer__P__3d_fullres__fold_0.png",
        "nnUNetTrainer__P__3d_fullres__fold_1.png"]
    with Image.open(out / "curves" / "nnUNetTrainer__P__3d_fullres__fold_1.png") as curve:  # scaled to 900 wide
        assert curve.size == (900, 45) and curve.getpixel((0, 0)) == 1

    # a fold trained elsewhere may have no progress.png: no curve, said so; nothing else changes
    (checkpoints[0][1].parent / "progress.png").unlink()
    result = report.write_summary(out, checkpoints, onnx, [dice], [store], preprocessed)
    assert result["no_curves"] == [checkpoints[0][1].parent] and len(list((out / "curves").iterdir())) == 2
    (checkpoints[1][1].parent / "progress.png").write_bytes(b"not a png")
    with pytest.raises(FastkdError, match=r"fold_1/progress.png is not a readable PNG"):
        report.write_summary(out, checkpoints, onnx, [dice], [store], preprocessed)
    assert len(list((out / "curves").iterdir())) == 2 and not list(out.glob(".curves.*"))  # the old ones stay


def test_a_corrupt_cache_chunk_is_shown_on_the_cache_page(models, tmp_path):
    store, preprocessed = verified_cache(tmp_path)
    flip_a_byte(store, "case_b")
    out = tmp_path / "report"
    assert main(["report", "summary", *(f"{label}={path}" for label, path in models[0]), "--cache", str(store),
                 "--preprocessed", str(preprocessed), "-o", str(out)]) == 0
    page = (out / "cache.html").read_text()
    assert '<p class="bad">fastkd cache verify: 1 problem</p>' in page and "case_b: unreadable" in page
    status = dict(zip(*[line.split("\t") for line in (out / "cache.tsv").read_text().splitlines()]))
    assert status["verify"] == "1 problem" and "checksum" in status["problems"]
    assert "No evaluation tables given." in (out / "dice.html").read_text()


@pytest.mark.parametrize("break_it, message", [
    (lambda c, d, s: c[2][1].unlink(), r"KD r2: checkpoint .*fold_1/checkpoint_final.pth does not exist"),
    (lambda c, d, s: (c[2][1].parents[1] / "plans.json").unlink(),
     r"plans file .*fastkdR2__3d_fullres/plans.json does not"),
    (lambda c, d, s: d.write_text("{broken"), r"evaluation table .*dice.json is not valid JSON"),
    (lambda c, d, s: d.write_text(json.dumps({**json.loads(d.read_text()), "rows": [{"label": "teachers"}]})),
     r"dice.json is not an evaluation table \(it needs case_set, .*rows with dice, kind, label"),
    (lambda c, d, s: (d.parent / "predictions" / "S__fold_1" / "fastkd_predict.json").unlink(),
     r"prediction record .*S__fold_1/fastkd_predict.json does not exist"),
    (lambda c, d, s: shutil.rmtree(s), r"c.zarr does not exist"),
])
def test_bad_inputs_are_errors_naming_the_file_and_nothing_is_written(models, tmp_path, capsys, break_it, message):
    checkpoints, onnx = models
    dice = evaluation(tmp_path / "evaluation" / "test", {"teachers": 8.0, "S__fold_1": 2.0})
    store, preprocessed = verified_cache(tmp_path)
    break_it(checkpoints, dice, store)
    out = tmp_path / "report"
    assert main(["report", "summary", *(f"{label}={path}" for label, path in checkpoints),
                 "--onnx", *(f"{label}={path}" for label, path in onnx),
                 "--evaluation", str(dice), "--cache", str(store), "--preprocessed", str(preprocessed),
                 "-o", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastkd report summary: error: ") and re.search(message, err), err
    assert not out.exists()


def test_labels_exports_and_model_folders_are_checked(models, tmp_path):
    checkpoints, onnx = models
    with pytest.raises(FastkdError, match=r"'teachers': expected LABEL=CHECKPOINT, e.g. 'KD r2="):
        report.parse_pairs(["teachers"], "CHECKPOINT")
    with pytest.raises(FastkdError, match=r"ONNX exports of \['KD r4'\], which are no model given"):
        report.model_rows(checkpoints, [("KD r4", onnx[0][1])])
    with pytest.raises(FastkdError, match=r"teachers: checkpoints of several model folders"):
        report.model_rows([("teachers", checkpoints[0][1]), ("teachers", checkpoints[2][1])])
    with pytest.raises(FastkdError, match=r"is no nnU-Net model folder"):
        report.model_rows([("x", tmp_path / "plain" / "fold_0" / "checkpoint_final.pth")])


def _validated_fold(results: Path, model: str, dice: dict) -> Path:
    """A fold folder with only nnU-Net's final-validation summary.json (no checkpoint: no curves)."""
    fold = results / model / "fold_0"
    (fold / "validation").mkdir(parents=True)
    (fold / "validation" / "summary.json").write_text(json.dumps(
        {"mean": {c: {"Dice": d} for c, d in dice.items()}, "foreground_mean": {"Dice": sum(dice.values()) / len(dice)}}))
    return fold


def test_the_student_report_names_teachers_weaker_than_the_baseline(tmp_path, capsys):
    teacher = _validated_fold(tmp_path, "nnUNetTrainer__nnUNetPlans__3d_fullres", {"1": 0.9, "2": 0.3})
    baseline = _validated_fold(tmp_path, "nnUNetTrainerFastKDNoKD__nnUNetPlans_fastkdR2__3d_fullres", {"1": 0.8, "2": 0.6})
    student = _validated_fold(tmp_path, "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres", {"1": 0.7, "2": 0.2})
    png, tsv = tmp_path / "r2.png", tmp_path / "r2.tsv"
    main(["student", "report", f"teacher fold 0={teacher}", f"no-KD r2 fold 0={baseline}",
          f"KD r2 fold 0={student}", "-o", str(png), "--tsv", str(tsv)])
    printed = capsys.readouterr().out
    weak = [line for line in printed.splitlines() if line.startswith("Weak teachers")]
    assert weak == ["Weak teachers: teacher fold 0 has Dice 0.300 on 2, below no-KD r2 fold 0's 0.600; distillation "
                    "cannot add what the teachers do not know (train the teachers longer, or keep the no-KD student "
                    "for this class)"]
    assert png.stat().st_size > 10_000 and tsv.read_text().count("\n") == 4
    # teachers ahead on every class: nothing said
    ahead = _validated_fold(tmp_path / "b", "nnUNetTrainer__nnUNetPlans__3d_fullres", {"1": 0.9, "2": 0.7})
    main(["student", "report", f"teacher fold 0={ahead}", f"no-KD r2 fold 0={baseline}",
          "-o", str(png), "--tsv", str(tsv)])
    assert "Weak teachers" not in capsys.readouterr().out
