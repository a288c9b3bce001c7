"""Dry runs of the workflow: the jobs, inputs and flags Snakemake plans for a config, without running any."""

import re

from fastkd.cases import holdout_split

from fake_datasets import CASES, _raw_dataset
from sweep_configs import FORMS, SWEEP
from workflow_runs import job_counts, snakemake, workdir


def test_dry_run_of_a_sweep_has_a_job_per_student_and_cache_and_evaluates_every_student(tmp_path):
    run = snakemake(workdir(tmp_path, SWEEP), "-n", "-p", "--cores", "2")
    counts = job_counts(run.stdout)
    assert counts["train_student"] == 16 and counts["train_baseline"] == 2
    assert counts["softlabels_finalize"] == 4 and counts["softlabels_shard"] == 8 and counts["softlabels_preview"] == 4
    assert counts["predict_student"] == 18 and counts["evaluate"] == 1 and counts["predict_teachers"] == 1
    # the out-of-fold caches are filled with nnU-Net's split; the others with every fold
    shards = re.findall(r"fastkd softlabels fill .*", run.stdout)
    assert len(shards) == 8
    assert sum("--folds-per-case out_of_fold --splits" in s and "__oof__" in s for s in shards) == 4
    assert sum("--folds-per-case all" in s and "__oof__" not in s for s in shards) == 4
    assert {re.search(r" -T (\S+)", s).group(1) for s in shards} == {"1.0", "3.0"}
    # each student job trains with its own values, into its own folder
    trains = re.findall(r"fastkd student train .*", run.stdout)
    assert len(trains) == 18
    kd = [t for t in trains if "--baseline" not in t]
    assert sum("distillation.temperature=3.0" in t and "distillation.alpha=0.7" in t
               and "softlabels.folds_per_case=out_of_fold" in t and "student.seeds=[1]" in t for t in kd) == 1
    assert sum("student.seeds=[1]" in t for t in trains) == 9
    # the table's rows: one prediction per student, all of them evaluated
    predicted = set(re.findall(r"evaluation/test/predictions/([^/\s,]+)__fold_0", run.stdout))
    assert len(predicted) == 18
    assert "nnUNetTrainerFastKD_T3_a0.7_oof_s1__nnUNetPlans_fastkdR4__3d_fullres" in predicted
    assert "nnUNetTrainerFastKDNoKD_s1__nnUNetPlans_fastkdR4__3d_fullres" in predicted


def test_dry_run_passes_the_teachers_validation_mirroring(tmp_path):
    run = snakemake(workdir(tmp_path, {"teachers": {"validation_mirroring": False}}), "-n", "-p", "--cores", "1", "teachers")
    commands = re.findall(r"fastkd teachers train .*", run.stdout)
    assert len(commands) == 5 and all("--disable-validation-mirroring" in c for c in commands)
    run = snakemake(workdir(tmp_path, name="default"), "-n", "-p", "--cores", "1", "teachers")
    assert "--disable-validation-mirroring" not in run.stdout


def test_dry_run_of_a_loss_form_sweep_trains_each_form_with_its_own_values(tmp_path):
    run = snakemake(workdir(tmp_path, {**FORMS, "distillation": {**FORMS["distillation"], "alpha": 1.0}}), "-n", "-p",
                    "--cores", "2", "student")
    trains = [t for t in re.findall(r"fastkd student train .*", run.stdout) if "--baseline" not in t]
    assert len(trains) == 8
    combos = {(re.search(r"distillation.loss=(\w+)", t).group(1), re.search(r"distillation.scales=(\w+)", t).group(1),
               re.search(r"distillation.class_balanced=(\w+)", t).group(1)) for t in trains}
    assert combos == {(f, s, b) for f in ("additive", "convex") for s in ("full", "all") for b in ("false", "true")}


def test_dry_run_preprocesses_the_training_cases_and_evaluates_the_held_out_ones(tmp_path):
    raw = _raw_dataset(tmp_path / "data")
    wd = workdir(tmp_path, {"dataset": {"raw": str(raw), "holdout": {"n_test": 3, "seed": 7}}})
    run = snakemake(wd, "-n", "-p", "--cores", "1", "evaluation")
    counts = job_counts(run.stdout)
    assert counts["plan_preprocess"] == 1 and counts["evaluation_cases"] == 1 and counts["evaluate"] == 1
    test = holdout_split(CASES, 3, 7)
    assert "--holdout 3 --holdout-seed 7" in run.stdout
    assert f"fastkd evaluate cases --cases {' '.join(test)} --raw {raw}" in run.stdout
    assert "evaluation/test/cases/images" in run.stdout and "evaluation/test/dice.tsv" in run.stdout
    assert "fold_0_validation" not in run.stdout and "--optimistic" not in run.stdout
    for case in CASES:  # nnU-Net preprocesses every training case, and no held-out one
        assert (f"nnUNetPlans_3d_fullres/{case}.b2nd" in run.stdout) == (case not in test)


def test_dry_run_evaluates_test_set_or_each_folds_validation_cases(tmp_path):
    run = snakemake(workdir(tmp_path, {"distillation": {"reduction_factors": [2, 4]}, "student": {"folds": [0, 1]}}),
                    "-n", "--cores", "1", "evaluation")
    counts = job_counts(run.stdout)
    # the test set: one teacher ensemble prediction, every student fold and baseline (3 seeds each), one table
    assert (counts["predict_teachers"], counts["predict_student"], counts["evaluate"]) == (1, 24, 1)
    assert "evaluation_cases" not in counts and "evaluation/test/dice.tsv" in run.stdout
    wd = workdir(tmp_path, {"dataset": {"demo": {"n_test": 0}}, "student": {"folds": [0, 1]}}, name="validation")
    run = snakemake(wd, "-n", "--cores", "1", "evaluation")
    counts = job_counts(run.stdout)
    # no test set: each fold's students on that fold's validation cases, the teachers there too
    assert (counts["evaluation_cases"], counts["predict_teachers"], counts["predict_student"], counts["evaluate"]) \
        == (2, 2, 12, 2)
    assert "evaluation/fold_1_validation/dice.tsv" in run.stdout
    assert "evaluation/fold_1_validation/predictions/nnUNetTrainerFastKDNoKD__nnUNetPlans_fastkdR2__3d_fullres" \
           "__fold_1" in run.stdout
    off = job_counts(snakemake(workdir(tmp_path, {"evaluation": {"enabled": False}}, name="off"), "-n", "--cores",
                               "1").stdout)
    assert "evaluate" not in off and "predict_teachers" not in off


def test_the_workflow_builds_engines_only_when_enabled(tmp_path):
    wd = workdir(tmp_path, {"export": {"tensorrt": {"enabled": True, "precision": "int8", "max_batch": 2}}})
    run = snakemake(wd, "-n", "-p", "--cores", "1", "export")
    counts = job_counts(run.stdout)
    assert counts["export_trt"] == 6 and counts["export_onnx"] == 6  # 3 seeds of the student and baseline
    engine = "export/nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres/fold_0.engine"
    assert f"{engine} --precision int8 --max-batch 2 --workspace-gb 4.0 --calibration " \
           "nnUNet_preprocessed/Dataset900_FastkdDemo/nnUNetPlans_3d_fullres" in run.stdout
    # engines batch tiles: with TensorRT on, the (otherwise static) ONNX exports get a dynamic batch
    exports = [line for line in run.stdout.splitlines() if "fastkd export onnx" in line]
    assert len(exports) == 6 and all(" --batch 0 --tensorrt" in line for line in exports), exports
    off_run = snakemake(workdir(tmp_path, name="off"), "-n", "-p", "--cores", "1", "export")
    off = job_counts(off_run.stdout)
    assert "export_trt" not in off and off["export_onnx"] == 6 and "--batch 0" not in off_run.stdout
