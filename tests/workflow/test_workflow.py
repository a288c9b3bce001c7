"""The Snakemake workflow: the dry-run DAG, config errors at parse time, and real tiny runs.

Each test runs the real ``snakemake`` command on a copy of the workflow in a temporary directory.
The tests with a tier marker read the session's ``trained`` fixture (tests/conftest.py: the demo
preprocessed, one tiny teacher fold, its soft labels) and run stock ``nnUNetv2_predict`` on it; tests that
change it work on a ``clone``.
"""

import json
import os
import shutil
import subprocess

import pytest

from workflow_runs import BIN, HIPPOCAMPUS, clone, job_counts, nnunet_env, sha256, snakemake, workdir


def test_dry_run_dag_of_the_demo(tmp_path):
    run = snakemake(workdir(tmp_path), "-n", "--cores", "2")
    assert job_counts(run.stdout) == {"demo_data": 1, "plan_preprocess": 1, "train_teacher": 5,
                                      "teacher_manifest": 1, "softlabels_shard": 2, "softlabels_finalize": 1,
                                      "softlabels_preview": 1, "student_plans": 1, "student_info": 1,
                                      "train_student": 3, "train_baseline": 3, "student_report": 1,
                                      "export_onnx": 6, "predict_teachers": 1, "predict_student": 6,
                                      "evaluate": 1, "report_summary": 1, "all": 1}  # 3 seeds of each student
    for seed in ("", "_s1", "_s2"):
        assert f"nnUNetTrainerFastKD{seed}__nnUNetPlans_fastkdR2__3d_fullres/fold_0/validation/summary.json" in run.stdout
    for fold in range(5):
        assert f"fold_{fold}/checkpoint_final.pth" in run.stdout
    assert "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres/fold_0/validation/summary.json" in run.stdout
    assert "nnUNetTrainerFastKDNoKD__nnUNetPlans_fastkdR2__3d_fullres/fold_0/validation/summary.json" in run.stdout
    assert "export/nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres/fold_0.onnx" in run.stdout
    off = job_counts(snakemake(workdir(tmp_path, {"export": {"onnx": False}}, name="no_export"), "-n", "--cores", "2").stdout)
    assert "export_onnx" not in off


def test_dry_run_students_per_reduction_factor_fold_and_kind(tmp_path):
    wd = workdir(tmp_path, {"distillation": {"reduction_factors": [2, 4]}, "student": {"folds": [1, "all"]}})
    counts = job_counts(snakemake(wd, "-n", "--cores", "1", "student").stdout)
    assert counts["student_plans"] == 2 and counts["train_student"] == 12 and counts["train_baseline"] == 12
    assert counts["student_report"] == 2
    wd = workdir(tmp_path, {"distillation": {"alpha": 0.0}, "student": {"augmentation": "da5"}}, name="nokd")
    run = snakemake(wd, "-n", "--cores", "1", "student")
    counts = job_counts(run.stdout)
    assert "train_student" not in counts and counts["train_baseline"] == 3 and "softlabels_shard" not in counts
    assert "nnUNetTrainerFastKDNoKD_DA5__nnUNetPlans_fastkdR2__3d_fullres/fold_0" in run.stdout


def test_dry_run_named_targets_and_fold_subset(tmp_path):
    wd = workdir(tmp_path, {"teachers": {"folds": [1, 3]}})
    assert job_counts(snakemake(wd, "-n", "--cores", "1", "preprocessed").stdout) == {
        "demo_data": 1, "plan_preprocess": 1, "preprocessed": 1}
    counts = job_counts(snakemake(wd, "-n", "--cores", "1", "teachers").stdout)
    assert counts == {"demo_data": 1, "plan_preprocess": 1, "train_teacher": 2, "teacher_manifest": 1, "teachers": 1}


def test_dry_run_declares_every_preprocessed_case(tmp_path):
    wd = workdir(tmp_path, {"dataset": {"demo": {"n_cases": 7}}, "plans": {"configurations": ["3d_fullres", "2d"]}})
    run = snakemake(wd, "-n", "--cores", "1", "preprocessed")
    for cfg in ("3d_fullres", "2d"):
        for i in range(7):
            assert f"nnUNetPlans_{cfg}/demo_{i:03d}.b2nd" in run.stdout
            assert f"nnUNetPlans_{cfg}/demo_{i:03d}_seg.b2nd" in run.stdout


def test_bad_config_stops_snakemake_before_any_job(tmp_path):
    wd = workdir(tmp_path, {"distillation": {"alpha": -0.5}, "teachers": {"folds": [0, 7]}})
    run = snakemake(wd, "--cores", "1", check=False, no_jobs=True)
    assert run.returncode != 0
    assert "distillation.alpha = -0.5 (float): must be >= 0" in run.stderr
    assert "teachers.folds[1] = 7 (int): must be <= 4" in run.stderr
    assert not (wd / "nnUNet_raw").exists() and not (wd / "fastkd_work").exists()


def test_data_preprocessed_elsewhere_must_be_there(tmp_path):
    """plans.preprocess: false adopts what nnUNetv2_plan_and_preprocess wrote; without it, a clear error."""
    wd = workdir(tmp_path, {"plans": {"preprocess": False}})
    run = snakemake(wd, "-n", "--cores", "1", check=False)
    out = run.stdout + run.stderr
    assert run.returncode != 0
    assert ("plans.preprocess = false: nnUNet_preprocessed/Dataset900_FastkdDemo/nnUNetPlans.json does not exist: "
            "Dataset900_FastkdDemo is not preprocessed with the teacher plans nnUNetPlans") in out
    assert "nnUNetv2_plan_and_preprocess -d 900 -c 3d_fullres`" in out


@pytest.mark.ci  # needs ../shared
def test_hippocampus_dag_takes_cases_from_dataset_json(tmp_path):
    assert HIPPOCAMPUS.is_dir(), f"real data expected at {HIPPOCAMPUS} (see ../shared/README.md)"
    wd = workdir(tmp_path, {"dataset": {"raw": str(HIPPOCAMPUS)}})
    run = snakemake(wd, "-n", "--cores", "2")
    assert job_counts(run.stdout) == {"plan_preprocess": 1, "train_teacher": 5, "teacher_manifest": 1,
                                      "softlabels_shard": 2, "softlabels_finalize": 1, "softlabels_preview": 1,
                                      "student_plans": 1, "student_info": 1, "train_student": 3,
                                      "train_baseline": 3, "student_report": 1, "export_onnx": 6,
                                      # the Decathlon's test images carry no labels: fold 0's validation cases
                                      "evaluation_cases": 1, "predict_teachers": 1, "predict_student": 6,
                                      "evaluate": 1, "report_summary": 1, "all": 1}
    cases = sorted(p.name[: -len("_0000.nii.gz")] for p in (HIPPOCAMPUS / "imagesTr").glob("*_0000.nii.gz"))
    assert len(cases) == 200
    for case in cases:
        assert f"Dataset004_Hippocampus/nnUNetPlans_3d_fullres/{case}.b2nd" in run.stdout


@pytest.mark.smoke
def test_real_run_writes_nnunet_artifacts_and_manifests(trained):
    ds = "Dataset900_FastkdDemo"
    manifest = json.loads((trained / "fastkd_work" / ds / "preprocess" / "nnUNetPlans__3d_fullres.json").read_text())
    assert sorted(manifest["cases"]) == [f"demo_{i:03d}" for i in range(5)]
    assert all(c["shape"] == [1, 32, 40, 32] for c in manifest["cases"].values())
    assert manifest["spacing"] == [1.0, 1.0, 1.0] and manifest["data_identifier"] == "nnUNetPlans_3d_fullres"
    splits = json.loads((trained / "nnUNet_preprocessed" / ds / "splits_final.json").read_text())
    assert len(splits) == 5 and sorted(sum((s["val"] for s in splits), [])) == sorted(manifest["cases"])

    folder = trained / "nnUNet_results" / ds / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    teachers = json.loads((trained / "fastkd_work" / ds / "teachers" / f"{folder.name}.json").read_text())
    assert list(teachers["folds"]) == ["0"]
    assert teachers["folds"]["0"]["sha256"] == sha256(folder / "fold_0" / "checkpoint_final.pth")
    assert teachers["plans_name"] == "nnUNetPlans" and teachers["labels"] == {"background": 0, "organ": 1, "lesion": 2}
    summary = json.loads((folder / "fold_0" / "validation" / "summary.json").read_text())
    assert set(summary["mean"]) == {"1", "2"}
    # the schedule override reached nnU-Net: one epoch, and plans.json keeps the planned batch size
    log = next((folder / "fold_0").glob("training_log_*.txt")).read_text()
    assert "Epoch 0" in log and "Epoch 1" not in log
    assert (folder / "fold_0" / "progress.png").is_file()

    # nothing left to do: every output is complete and up to date
    assert "Nothing to be done" in snakemake(trained, "-n", "--cores", "1", "teachers").stdout


@pytest.mark.smoke
def test_adopting_preprocessed_data_lists_it_and_rewrites_nothing(trained, tmp_path):
    ds = "Dataset900_FastkdDemo"
    preprocessed = trained / "nnUNet_preprocessed" / ds
    before = {p: p.stat().st_mtime_ns for p in preprocessed.rglob("*") if p.is_file()}
    dag = snakemake(trained, "-n", "--cores", "1", "preprocessed", "--config", "plans={'preprocess': False}",
                    "--forcerun", "adopt_preprocessed")
    assert job_counts(dag.stdout) == {"adopt_preprocessed": 1, "preprocessed": 1}
    manifest = tmp_path / "manifest.json"
    adopt = [str(BIN / "fastkd"), "preprocess", "adopt", "-d", ds, "-c", "3d_fullres", "--manifests", str(manifest)]
    run = subprocess.run([*adopt, "-p", "nnUNetPlans"], env=nnunet_env(trained), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    workflows = json.loads((trained / "fastkd_work" / ds / "preprocess" / "nnUNetPlans__3d_fullres.json").read_text())
    assert json.loads(manifest.read_text()) == workflows
    assert {p: p.stat().st_mtime_ns for p in preprocessed.rglob("*") if p.is_file()} == before
    run = subprocess.run([*adopt, "-p", "nnUNetResEncUNetMPlans"], env=nnunet_env(trained), capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 1
    assert f"{preprocessed}/nnUNetResEncUNetMPlans.json does not exist: {ds} is not preprocessed" in run.stderr


@pytest.mark.smoke
def test_trained_teacher_loads_in_nnunet_predictor_and_stock_cli(trained, tmp_path):
    """Stock nnUNetv2_predict runs the workflow's teacher and writes what the soft-label cache says: the
    argmax of the cached fold-0 probabilities (same mirroring and step) wherever they are not a near-tie."""
    import numpy as np
    import SimpleITK as sitk

    from fastkd.cache import SoftLabelCache

    ds = "Dataset900_FastkdDemo"
    image = trained / "nnUNet_raw" / ds / "imagesTr" / "demo_001_0000.nii.gz"
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(image, inputs)
    e = nnunet_env(trained)
    e.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="0")
    subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(inputs), "-o", str(tmp_path / "out"), "-d", "900",
                    "-c", "3d_fullres", "-f", "0", "-device", "cpu", "-npp", "1", "-nps", "1"],
                   env=e, check=True, capture_output=True, text=True, timeout=600)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "out" / "demo_001.nii.gz")))
    assert seg.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
    [store] = (trained / "fastkd_work" / ds / "softlabels").glob("3d_fullres__T1__mirror__step0.5__*.zarr")
    probs = SoftLabelCache(store).read("demo_001")
    assert probs.shape[1:] == seg.shape  # the demo's preprocessing keeps the image's grid
    top2 = np.sort(probs, axis=0)[-2:]
    clear = top2[1] - top2[0] > 2 / 255  # not decided by the cache's uint8 rounding
    assert clear.mean() > 0.5
    assert (probs.argmax(0) == seg)[clear].mean() == 1.0


@pytest.mark.extended
def test_teachers_trained_elsewhere_are_validated_and_reused(trained, tmp_path):
    ds = "Dataset900_FastkdDemo"
    folder = trained / "nnUNet_results" / ds / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    raw = trained / "nnUNet_raw" / ds

    missing = workdir(tmp_path, {"dataset": {"raw": str(raw)}, "teachers": {"model_folder": str(folder), "folds": [0, 1]}},
                      name="missing")
    run = snakemake(missing, "-n", "--cores", "1", check=False)
    assert run.returncode != 0
    assert "missing fold_1/checkpoint_final.pth (found: fold_0: checkpoint_best.pth, checkpoint_final.pth)" in run.stdout + run.stderr

    wd = workdir(tmp_path, {"dataset": {"raw": str(raw)}, "plans": {"num_processes": 1},
                            "teachers": {"model_folder": str(folder), "folds": [0]}}, name="reuse")
    assert job_counts(snakemake(wd, "-n", "--cores", "1", "preprocessed", "teachers").stdout) == {
        "plan_preprocess": 1, "teacher_manifest": 1, "preprocessed": 1, "teachers": 1}
    snakemake(wd, "--cores", "1", "preprocessed", "teachers")
    manifest = json.loads((wd / "fastkd_work" / ds / "teachers" / f"{folder.name}.json").read_text())
    assert manifest["model_folder"] == str(folder)
    assert manifest["folds"]["0"]["sha256"] == sha256(folder / "fold_0" / "checkpoint_final.pth")
    # preprocessing used the teachers' own plans, not a fresh plan
    plans = json.loads((wd / "nnUNet_preprocessed" / ds / "nnUNetPlans.json").read_text())
    teacher_plans = json.loads((folder / "plans.json").read_text())
    assert plans["configurations"] == teacher_plans["configurations"]
    assert (wd / "nnUNet_raw" / ds).is_symlink() and (wd / "nnUNet_raw" / ds).resolve() == raw.resolve()


@pytest.mark.extended
def test_killed_teacher_resumes_from_its_latest_checkpoint(trained, tmp_path):
    """SIGKILL after the first epoch's checkpoint; the rerun continues at epoch 1, not from scratch."""
    import signal
    import time

    import torch

    trained = clone(trained, tmp_path)
    e = nnunet_env(trained)
    command = [str(BIN / "fastkd"), "teachers", "train", "-d", "900", "-c", "3d_fullres", "-f", "1", "--epochs", "3",
               "--iterations", "2", "--val-iterations", "1", "--batch-size", "2", "--save-every", "1", "--threads", "1"]
    fold = trained / "nnUNet_results" / "Dataset900_FastkdDemo" / "nnUNetTrainer__nnUNetPlans__3d_fullres" / "fold_1"
    job = subprocess.Popen(command, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    # nnU-Net writes checkpoint_latest.pth at the end of epoch 0, before it logs "Epoch 1"
    while not any("Epoch 1" in p.read_text() for p in fold.glob("training_log_*.txt")):
        assert job.poll() is None and time.time() < deadline, "training ended or stalled before epoch 1"
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    assert (fold / "checkpoint_latest.pth").is_file() and not (fold / "checkpoint_final.pth").exists()

    rerun = subprocess.run(command, env=e, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming fold 1 from" in rerun.stderr and "at epoch 1" in rerun.stderr
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 3 and final["trainer_name"] == "nnUNetTrainer"
