"""The report in the workflow: the summary job in the default target and by name, and `snakemake --report` holding every table and figure of a finished run."""

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest

from fastkd.paths import Paths

from workflow_runs import clone, job_counts, snakemake, workdir


# -- slow: the real workflow -----------------------------------------------------------------------
def dice_by_hand(predictions: Path, labels: Path, cases: list[str]) -> dict[str, float]:
    """Mean Dice per class over ``cases`` (nnU-Net's convention: a case where the class is absent from both
    maps does not count)."""
    import SimpleITK as sitk

    scores = {"organ": [], "lesion": []}
    for case in cases:
        pred, ref = (sitk.GetArrayFromImage(sitk.ReadImage(str(f / f"{case}.nii.gz"))) for f in (predictions, labels))
        for value, name in ((1, "organ"), (2, "lesion")):
            tp, fp, fn = ((pred == value) & (ref == value)).sum(), ((pred == value) & (ref != value)).sum(), \
                ((pred != value) & (ref == value)).sum()
            if tp + fp + fn:
                scores[name].append(2 * tp / (2 * tp + fp + fn))
    return {name: float(np.mean(v)) for name, v in scores.items()}


def report_pages(html_file) -> dict[str, bytes]:
    """Every file a Snakemake report embeds (a data URI each), by file name."""
    text = html_file.read_text()
    return {name: base64.b64decode(data) for name, data in
            re.findall(r"data:[\w/+.-]+;charset=[\w-]+;filename=([^;\"]+);base64,([A-Za-z0-9+/=]+)", text)}


def test_the_workflow_runs_the_summary_in_all_and_by_name(tmp_path):
    wd = workdir(tmp_path)
    run = snakemake(wd, "-n", "--cores", "1", "summary")
    counts = job_counts(run.stdout)
    assert counts["report_summary"] == 1 and counts["summary"] == 1 and counts["evaluate"] == 1
    assert counts["export_onnx"] == 6 and counts["train_teacher"] == 5  # 3 seeds of the student and baseline
    p = Paths({"paths": {"nnunet_raw": "r", "nnunet_preprocessed": "p", "nnunet_results": "s", "work": "fastkd_work"},
               "dataset": {"raw": "demo", "demo": {"id": 900, "name": "FastkdDemo"}}})
    for path in (p.report_table("models"), p.report_table("speed", "tsv"), p.report_curves):
        assert str(path) in run.stdout
    assert str(p.report_table("models", "png")) == "fastkd_work/Dataset900_FastkdDemo/report/models.png"
    assert job_counts(snakemake(wd, "-n", "--cores", "1").stdout)["report_summary"] == 1  # the default target too


@pytest.mark.ci
def test_snakemake_report_holds_every_table_and_figure(finished, tmp_path):
    """On a copy of the session's finished workflow (its exports, evaluation and report pages, made by
    ``snakemake`` with the default target): `snakemake --report` with all of them in it."""
    copy = clone(finished, tmp_path)
    # the evaluation's Dice of every model is the Dice of its predictions against the held-out labels
    evaluation = json.loads((copy / "fastkd_work" / "Dataset900_FastkdDemo" / "evaluation" / "test" / "dice.json").read_text())
    assert len(evaluation["cases"]) == 4 and evaluation["classes"] == ["organ", "lesion"]
    assert sorted(row["short"] for row in evaluation["rows"]) == sorted(["teacher ensemble (1 fold)", "KD r2 fold 1",
                                                                        "no-KD r2 fold 1"])
    for row in evaluation["rows"]:
        predictions = copy / "fastkd_work" / "Dataset900_FastkdDemo" / "evaluation" / "test" / "predictions" / row["label"]
        assert row["dice"] == pytest.approx(dice_by_hand(predictions, copy / evaluation["labels"], evaluation["cases"]),
                                            abs=1e-9), row["label"]
    snakemake(copy, "--report", "report.html")
    pages = report_pages(copy / "report.html")

    dice, models, speed, cache = (pages[f"{name}.html"].decode() for name in ("dice", "models", "speed", "cache"))
    assert "Dataset900_FastkdDemo: Dice per class" in dice and "test: 4 cases, none of them seen in training" in dice
    for row in ("teacher ensemble (1 fold)", "KD r2 fold 1", "no-KD r2 fold 1"):
        assert f"<td>{row}</td>" in dice and f"<td>{row}</td>" in speed
    assert "Dice organ" in dice and "Dice lesion" in dice and "speed-up vs teachers" in speed
    assert "GFLOPs / patch" in models and "ONNX MB" in models and "PlainConvUNet" in models
    for row in ("teachers", "KD r2", "no-KD r2"):
        assert f"<tr><td>{row}</td>" in models
    assert models.count('<td class="n">-</td></tr>') == 1  # ONNX MB: the students' exports, no teacher export
    assert "fastkd cache verify: OK" in cache and "5 of 5" in cache
    figures = {"dice.png", "models.png", "nnUNetPlans_fastkdR2.report.png",
               "nnUNetTrainer__nnUNetPlans__3d_fullres__fold_0.png",
               "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres__fold_1.png",
               "nnUNetTrainerFastKDNoKD__nnUNetPlans_fastkdR2__3d_fullres__fold_1.png"}
    assert figures <= set(pages) and any(name.endswith(".preview.png") for name in pages)
    assert all(pages[name].startswith(b"\x89PNG") for name in figures)
    text = (copy / "report.html").read_text()
    for caption in ("Size and cost of the teachers", "Inference speed of every prediction",
                    "The soft-label cache the students learnt from", "nnU-Net's own training curves"):
        assert caption in text
