"""Evaluation (fastkd.evaluate, `fastkd evaluate`; the rules' dry run: tests/workflow/test_dry_runs.py): case sets, nnU-Net's Dice on real
NIfTI label maps, the table's rows and its guards against incomplete or mismatched predictions."""

import json
import subprocess

import nibabel as nib
import numpy as np
import pytest

from fastkd.checks import validate_config

from fastkd.config import ConfigError
from fastkd.errors import FastkdError
from fastkd.evaluate import evaluate, write_validation_cases
from workflow_runs import BIN

DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 3, "file_ending": ".nii.gz"}


def _nifti(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), np.diag([1.0, 1.0, 2.0, 1.0])), str(path))


def _labels(folder, n=3):
    rng = np.random.default_rng(0)
    maps = {}
    for i in range(n):
        seg = np.zeros((12, 10, 8), np.uint8)
        seg[2:9, 2:8, 1:6] = 1
        seg[4:6, 4:6, 2:4] = 2
        seg[rng.integers(0, 12), rng.integers(0, 10), 7] = 2  # cases differ
        maps[f"case_{i}"] = seg
        _nifti(folder / f"case_{i}.nii.gz", seg)
    return maps


def _prediction(folder, maps, model, folds=(0,), mirroring=True, seconds=0.5, change=None, record=True, network=None):
    for case, seg in maps.items():
        _nifti(folder / f"{case}.nii.gz", change(seg) if change else seg)
    (folder / "plans.json").write_text("{}")  # nnU-Net writes its plans beside the predictions
    if record:
        (folder / "fastkd_predict.json").write_text(json.dumps(
            {"model": str(model), "backend": "torch", "folds": list(folds), "mirroring": mirroring,
             "seconds_per_case": seconds, "cases": len(maps),
             **({} if network is None else {"seconds_network_per_case": network})}))
    return folder


def _model(tmp_path, name, r=None):
    folder = tmp_path / "results" / name
    folder.mkdir(parents=True)
    plans = {"plans_name": name.split("__")[1], "configurations": {}}
    if r:
        plans["fastkd"] = {"reduction_factor": r}
    (folder / "plans.json").write_text(json.dumps(plans))
    return folder


def test_table_scores_each_model_with_nnunets_dice(tmp_path):
    maps = _labels(tmp_path / "labels")
    teachers = _model(tmp_path, "nnUNetTrainer__nnUNetPlans__3d_fullres")
    kd = _model(tmp_path, "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres", r=2)
    nokd = _model(tmp_path, "nnUNetTrainerFastKDNoKD__nnUNetPlans_fastkdR2__3d_fullres", r=2)
    preds = tmp_path / "predictions"

    def no_lesion(seg):
        return np.where(seg == 2, 1, seg)

    folders = [_prediction(preds / "teachers", maps, teachers, folds=range(5), seconds=4.0, network=2.5),
               _prediction(preds / f"{nokd.name}__fold_0", maps, nokd, change=no_lesion, seconds=0.2),  # an old record
               _prediction(preds / f"{kd.name}__fold_0", maps, kd, seconds=0.25, network=0.0123)]
    rows = evaluate(tmp_path / "labels", folders, tmp_path / "eval", dataset_json=DATASET_JSON, optimistic=False,
                    case_set="test", num_processes=1)
    assert [(r["kind"], r["r"]) for r in rows] == [("teacher ensemble", None), ("student (KD)", 2),
                                                   ("no-KD baseline", 2)]
    teacher, student, baseline = rows
    assert teacher["dice"] == {"organ": 1.0, "lesion": 1.0} and teacher["folds"] == [0, 1, 2, 3, 4]
    assert student["dice"] == {"organ": 1.0, "lesion": 1.0} and student["seconds_per_case"] == 0.25
    assert (teacher["network_seconds_per_case"], student["network_seconds_per_case"],
            baseline["network_seconds_per_case"]) == (2.5, 0.0123, None)
    # every lesion voxel called organ: no lesion found, organ Dice from the confusion alone
    organ = np.mean([2 * (m == 1).sum() / ((m == 1).sum() + (m > 0).sum()) for m in maps.values()])
    assert baseline["dice"]["lesion"] == 0.0 and baseline["dice"]["organ"] == pytest.approx(organ)
    assert baseline["mean_dice"] == pytest.approx(organ / 2)
    tsv = (tmp_path / "eval" / "dice.tsv").read_text().splitlines()
    assert tsv[0].split("\t") == ["model", "kind", "r", "temperature", "alpha", "loss", "scales", "class_balanced",
                                  "folds_per_case", "unlabelled_share", "seed", "folds",
                                  "mirroring", "dice_organ", "dice_lesion", "mean_dice", "seconds_per_case",
                                  "network_seconds_per_case", "cases", "optimistic"]
    assert tsv[3].split("\t")[:2] == [f"{nokd.name}__fold_0", "no-KD baseline"] and tsv[3].endswith("\t-\t3\tfalse")
    assert tsv[2].endswith("\t0.250\t0.012\t3\tfalse")
    md = (tmp_path / "eval" / "dice.md").read_text().splitlines()
    head = next(line for line in md if line.startswith("| model"))
    assert head.endswith("| mean Dice | s / case (whole run) | network s / case |")
    assert next(line for line in md if line.startswith("| teachers")).endswith("| 4.00 | 2.500 |")
    table = json.loads((tmp_path / "eval" / "dice.json").read_text())
    assert table["cases"] == ["case_0", "case_1", "case_2"] and not table["optimistic"]
    assert (tmp_path / "eval" / "dice.png").stat().st_size > 10_000
    assert "none of them seen in training" in (tmp_path / "eval" / "dice.md").read_text()
    assert "Weak teachers" not in (tmp_path / "eval" / "dice.md").read_text()  # the teachers are ahead everywhere
    summary = json.loads((tmp_path / "eval" / "summaries" / "teachers.json").read_text())
    assert len(summary["metric_per_case"]) == 3  # nnU-Net's own summary.json


def test_sweep_rows_carry_their_settings_and_repeats_give_mean_and_spread(tmp_path):
    """Each student of a sweep is its own row with its T, alpha, soft-label folds and seed (from its settings
    file); the seeds of one setting are summarised as mean and sample standard deviation."""
    maps = _labels(tmp_path / "labels")
    preds, folders = tmp_path / "predictions", []

    def lesion_lost(fraction):
        def change(seg):
            out = seg.copy()
            xs = np.argwhere(seg == 2)
            for x in xs[: int(len(xs) * fraction)]:
                out[tuple(x)] = 1
            return out
        return change

    settings = [("nnUNetTrainerFastKD_oof", 1.0, "out_of_fold", 0, 0.0),
                ("nnUNetTrainerFastKD_oof_s1", 1.0, "out_of_fold", 1, 0.5),
                ("nnUNetTrainerFastKD_T3", 3.0, "all", 0, 1.0)]
    for trainer, t, f, seed, lost in settings:
        model = _model(tmp_path, f"{trainer}__nnUNetPlans_fastkdR4__3d_fullres", r=4)
        (model / "fold_0").mkdir()
        (model / "fold_0" / "fastkd_student.json").write_text(json.dumps(
            {"temperature": t, "alpha": 1.0, "loss": "additive", "scales": "full", "class_balanced": True,
             "folds_per_case": f, "seed": seed}))
        folders.append(_prediction(preds / f"{model.name}__fold_0", maps, model, change=lesion_lost(lost)))
    rows = evaluate(tmp_path / "labels", folders, tmp_path / "eval", dataset_json=DATASET_JSON, optimistic=False,
                    case_set="test", num_processes=1)
    by_seed = {(r["temperature"], r["seed"]): r for r in rows}
    assert by_seed[(1.0, 1)]["short"] == "KD r4 oof s1 fold 0" and by_seed[(3.0, 0)]["short"] == "KD r4 T3 fold 0"
    assert by_seed[(1.0, 0)]["folds_per_case"] == "out_of_fold" and by_seed[(1.0, 0)]["alpha"] == 1.0
    table = json.loads((tmp_path / "eval" / "dice.json").read_text())
    groups = {g["label"]: g for g in table["groups"]}
    assert set(groups) == {"KD r4 oof fold 0", "KD r4 T3 fold 0"}
    oof = groups["KD r4 oof fold 0"]
    lesion = [by_seed[(1.0, s)]["dice"]["lesion"] for s in (0, 1)]
    assert oof["n"] == 2 and oof["seeds"] == [0, 1] and lesion[0] > lesion[1]
    assert oof["dice"]["lesion"]["mean"] == pytest.approx(np.mean(lesion))
    assert oof["dice"]["lesion"]["sd"] == pytest.approx(np.std(lesion, ddof=1))
    assert groups["KD r4 T3 fold 0"]["n"] == 1 and groups["KD r4 T3 fold 0"]["dice"]["lesion"]["sd"] == 0.0
    md = (tmp_path / "eval" / "dice.md").read_text()
    assert "Mean ± sample standard deviation over the seeds" in md
    assert f"| KD r4 oof fold 0 | 2 | {oof['dice']['organ']['mean']:.3f} ± {oof['dice']['organ']['sd']:.3f}" in md
    tsv = [line.split("\t") for line in (tmp_path / "eval" / "dice.tsv").read_text().splitlines()]
    forms = ["additive", "full", "true"]
    assert [row[3:11] for row in tsv[1:]] == [["3.0000", "1.0000", *forms, "all", "-", "0"],
                                              ["1.0000", "1.0000", *forms, "out_of_fold", "-", "0"],
                                              ["1.0000", "1.0000", *forms, "out_of_fold", "-", "1"]]


def test_incomplete_or_mismatched_predictions_are_errors(tmp_path):
    maps = _labels(tmp_path / "labels")
    model = _model(tmp_path, "nnUNetTrainer__nnUNetPlans__3d_fullres")
    killed = _prediction(tmp_path / "killed", maps, model, record=False)
    with pytest.raises(FastkdError, match="no fastkd_predict.json, so its prediction did not finish"):
        evaluate(tmp_path / "labels", [killed], tmp_path / "eval", dataset_json=DATASET_JSON, optimistic=False)
    partial = _prediction(tmp_path / "partial", dict(list(maps.items())[:2]), model)
    with pytest.raises(FastkdError, match=r"missing \['case_2'\]"):
        evaluate(tmp_path / "labels", [partial], tmp_path / "eval", dataset_json=DATASET_JSON, optimistic=False)
    assert not (tmp_path / "eval" / "dice.tsv").exists()


def test_validation_cases_are_linked_from_the_split(tmp_path):
    raw = tmp_path / "Dataset900_X"
    maps = _labels(raw / "labelsTr", n=4)
    for case, seg in maps.items():
        _nifti(raw / "imagesTr" / f"{case}_0000.nii.gz", seg * 10)
    (raw / "dataset.json").write_text(json.dumps(DATASET_JSON))
    splits = tmp_path / "splits_final.json"
    splits.write_text(json.dumps([{"train": ["case_0", "case_1"], "val": ["case_3", "case_2"]}]))
    cases = write_validation_cases(splits, 0, raw, tmp_path / "images", tmp_path / "labels")
    assert cases == ["case_2", "case_3"]
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["case_2_0000.nii.gz", "case_3_0000.nii.gz"]
    assert (tmp_path / "labels" / "case_2.nii.gz").resolve() == (raw / "labelsTr" / "case_2.nii.gz").resolve()
    with pytest.raises(FastkdError, match="no fold 3"):
        write_validation_cases(splits, 3, raw, tmp_path / "i2", tmp_path / "l2")


def test_cli_prints_the_table_and_marks_it_optimistic(tmp_path):
    maps = _labels(tmp_path / "labels")
    model = _model(tmp_path, "nnUNetTrainer__nnUNetPlans__3d_fullres")
    pred = _prediction(tmp_path / "teachers", maps, model, folds=range(5))
    (tmp_path / "dataset.json").write_text(json.dumps(DATASET_JSON))
    run = subprocess.run([str(BIN / "fastkd"), "evaluate", "table", str(pred), "-l", str(tmp_path / "labels"),
                          "--dataset-json", str(tmp_path / "dataset.json"), "-o", str(tmp_path / "eval"),
                          "--case-set", "fold_0_validation", "--optimistic"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "OPTIMISTIC" in run.stdout and "| teachers | teacher ensemble | - | 1.000 | 1.000 | 1.000 |" in run.stdout
    assert (tmp_path / "eval" / "dice.tsv").read_text().splitlines()[1].endswith("\ttrue")


def _raw_dataset(tmp_path, train=("a", "b", "c", "d", "e"), test=("t1", "t2"), labels=("t1", "t2")):
    raw = tmp_path / "Dataset004_Tiny"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({**DATASET_JSON, "numTraining": len(train)}))
    for folder, names, suffix in (("imagesTr", train, "_0000.nii.gz"), ("labelsTr", train, ".nii.gz"),
                                  ("imagesTs", test, "_0000.nii.gz"), ("labelsTs", labels, ".nii.gz")):
        (raw / folder).mkdir()
        for name in names:
            (raw / folder / f"{name}{suffix}").touch()
    return raw


def test_config_checks_the_test_set(tmp_path):
    test_set = {"test_images": "imagesTs", "test_labels": "labelsTs"}
    raw = _raw_dataset(tmp_path)
    validate_config({"dataset": {"raw": str(raw)}, "evaluation": test_set}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"test_labels: .*labelsTs lacks the label maps of 1 test cases \(t2\)"):
        validate_config({"dataset": {"raw": str(_raw_dataset(tmp_path / "x", labels=("t1",)))},
                         "evaluation": test_set}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"1 test cases are training cases \(a\)"):
        validate_config({"dataset": {"raw": str(_raw_dataset(tmp_path / "y", test=("a", "t1"), labels=("a", "t1")))},
                         "evaluation": test_set}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"evaluation.test_images = 'imagesTs', evaluation.test_labels = None: give both"):
        validate_config({"evaluation": {"test_images": "imagesTs"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"student.folds includes 'all'.*evaluation.test_images"):
        validate_config({"student": {"folds": ["all"]}, "dataset": {"demo": {"n_test": 0}}}, base_dir=tmp_path)
    validate_config({"student": {"folds": ["all"]}}, base_dir=tmp_path)  # the demo's test cases evaluate it
    with pytest.raises(ConfigError, match=r"the demo writes no test cases \(dataset.demo.n_test = 0\)"):
        validate_config({"dataset": {"demo": {"n_test": 0}}, "evaluation": test_set}, base_dir=tmp_path)
    validate_config({"student": {"folds": ["all"]}, "evaluation": {"enabled": False}}, base_dir=tmp_path)


def test_a_datasets_own_labelled_test_set_is_found(tmp_path):
    from fastkd.cases import evaluation_sets, test_set

    raw = _raw_dataset(tmp_path)
    config = validate_config({"dataset": {"raw": str(raw)}, "student": {"folds": [0, 2]}}, base_dir=tmp_path)
    assert test_set(config) == ("imagesTs", "labelsTs") and evaluation_sets(config) == ["test"]
    demo = validate_config({}, base_dir=tmp_path)
    assert evaluation_sets(demo) == ["test"]
    # the Decathlon's test images carry no labels: each fold's validation cases instead
    (raw / "labelsTs").rename(raw / "unlabelled")
    config = validate_config({"dataset": {"raw": str(raw)}, "student": {"folds": [0, 2]}}, base_dir=tmp_path)
    assert test_set(config) is None and evaluation_sets(config) == ["fold_0_validation", "fold_2_validation"]
    with pytest.raises(ConfigError, match="student.folds includes 'all'"):
        validate_config({"dataset": {"raw": str(raw)}, "student": {"folds": ["all"]}}, base_dir=tmp_path)
    # a labelled test set that holds a training case is refused even when found by default
    contaminated = _raw_dataset(tmp_path / "c", test=("a",), labels=("a",))
    with pytest.raises(ConfigError, match=r"1 test cases are training cases \(a\)"):
        validate_config({"dataset": {"raw": str(contaminated)}}, base_dir=tmp_path)


def test_teachers_below_the_baseline_on_a_class_are_named_in_words(tmp_path):
    """Distillation cannot add what the teachers do not know: the table says so where the teacher ensemble is
    below the no-KD baseline's mean over its seeds, class by class."""
    maps = _labels(tmp_path / "labels")
    teachers = _model(tmp_path, "nnUNetTrainer__nnUNetPlans__3d_fullres")
    preds = tmp_path / "predictions"
    folders = [_prediction(preds / "teachers", maps, teachers, folds=range(5),
                           change=lambda seg: np.where(seg == 2, 0, seg))]  # the teachers miss every lesion
    for seed in (0, 1):
        nokd = _model(tmp_path, f"nnUNetTrainerFastKDNoKD{'_s1' if seed else ''}__nnUNetPlans_fastkdR2__3d_fullres", r=2)
        (nokd / "fold_0").mkdir()
        (nokd / "fold_0" / "fastkd_student.json").write_text(json.dumps({"alpha": 0.0, "seed": seed}))
        folders.append(_prediction(preds / f"{nokd.name}__fold_0", maps, nokd))
    evaluate(tmp_path / "labels", folders, tmp_path / "eval", dataset_json=DATASET_JSON, optimistic=False,
             case_set="test", num_processes=1)
    md = (tmp_path / "eval" / "dice.md").read_text()
    weak = [line for line in md.splitlines() if line.startswith("**Weak teachers**")]
    assert len(weak) == 1, md  # the lesion only: on the organ the teachers are not below
    assert "Dice 0.000 on lesion, below the no-KD r2 fold 0 (mean of 2 seeds)'s 1.000" in weak[0]
    assert "distillation cannot add what the teachers do not know" in weak[0]
    table = json.loads((tmp_path / "eval" / "dice.json").read_text())
    assert len(table["notes"]) == 1 and table["notes"][0].split(": ", 1)[1] in weak[0]
    from fastkd.report import _dice_section  # the report's Dice page says it too

    assert "Dice 0.000 on lesion, below the no-KD r2 fold 0 (mean of 2 seeds)&#x27;s 1.000" in _dice_section(table)


def test_students_with_and_without_unlabelled_images_are_separate_settings():
    """student.unlabelled_share is a setting of its own in the table: its sweep [0, 0.5] gives two groups over
    the seeds, labelled apart (``u0``; the default 0.5 adds nothing to the name)."""
    from fastkd.evaluate import SETTING_KEYS, seed_groups

    assert "unlabelled_share" in SETTING_KEYS
    kd = {"temperature": 1.0, "alpha": 1.0, "loss": "additive", "scales": "full", "class_balanced": True,
          "folds_per_case": "all"}
    rows = [{"kind": "student (KD)", "r": 2, **kd, "unlabelled_share": share, "seed": seed, "folds": [0],
             "dice": {"organ": dice}, "mean_dice": dice, "seconds_per_case": 1.0, "network_seconds_per_case": 0.5}
            for share, seed, dice in ((0.0, 0, 0.7), (0.0, 1, 0.8), (0.5, 0, 0.9), (0.5, 1, 0.6))]
    groups = {g["label"]: g for g in seed_groups(rows, ["organ"])}
    assert set(groups) == {"KD r2 u0 fold 0", "KD r2 fold 0"}
    assert groups["KD r2 u0 fold 0"]["mean_dice"]["mean"] == pytest.approx(0.75)
    assert groups["KD r2 fold 0"]["unlabelled_share"] == 0.5 and groups["KD r2 fold 0"]["n"] == 2
