"""Students trained for real on the session's soft-label cache: stock nnU-Net model folders, ONNX exports, the cache check, resume after SIGKILL, fold rotation, the DA5 baseline."""

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from workflow_runs import BIN, clone, nnunet_env, snakemake

DS = "Dataset900_FastkdDemo"


def _env(wd):
    e = nnunet_env(wd)
    e.update(nnUNet_n_proc_DA="0", nnUNet_def_n_proc="1")
    return e


def _train_student(wd, *args, sets=(), **popen):
    """``fastkd student train ARGS --set ...`` with a tiny schedule; ``sets``: more ``KEY=VALUE`` settings."""
    cmd = [str(BIN / "fastkd"), "student", "train", "-d", "900", "-c", "3d_fullres", *args, "--set",
           "student.schedule.batch_size=2", "student.schedule.val_iterations_per_epoch=1", *sets]
    return subprocess.Popen(cmd, env=_env(wd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def _cache(wd):
    return next((wd / "fastkd_work" / DS / "softlabels").glob("*.zarr"))


# -- slow: real nnU-Net -----------------------------------------------------------------------------
@pytest.mark.smoke
def test_snakemake_trains_stock_nnunet_students(students):
    wd = students
    results = wd / "nnUNet_results" / DS
    kd_fold = results / "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres" / "fold_1"
    base_fold = results / "nnUNetTrainerFastKDNoKD__nnUNetPlans_fastkdR2__3d_fullres" / "fold_1"
    for fold in (kd_fold, base_fold):
        ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        assert ckpt["trainer_name"] == "nnUNetTrainer" and ckpt["current_epoch"] == 2
        summary = json.loads((fold / "validation" / "summary.json").read_text())
        assert set(summary["mean"]) == {"1", "2"} and "Dice" in summary["mean"]["1"]
        assert not list(fold.glob("*.partial"))
    kd_settings = json.loads((kd_fold / "fastkd_student.json").read_text())
    assert kd_settings["alpha"] == 1.0 and kd_settings["temperature"] == 1.0 and kd_settings["cache"].endswith(".zarr")
    assert (kd_settings["loss"], kd_settings["scales"], kd_settings["class_balanced"]) == ("additive", "full", True)
    assert json.loads((base_fold / "fastkd_student.json").read_text())["alpha"] == 0.0
    losses = json.loads((kd_fold / "kd_losses.json").read_text())
    assert [r["epoch"] for r in losses] == [0, 1] and all(r["kd_loss"] > 0 for r in losses)
    assert not (base_fold / "kd_losses.json").exists()
    teacher = json.loads((wd / "nnUNet_preprocessed" / DS / "nnUNetPlans.json").read_text())
    student = json.loads((kd_fold.parent / "plans.json").read_text())
    arch = lambda p: p["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]  # noqa: E731
    assert arch(student)["features_per_stage"] == [max(f // 2, 8) for f in arch(teacher)["features_per_stage"]]
    assert student["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    tsv = (wd / "fastkd_work" / DS / "student" / "nnUNetPlans_fastkdR2.report.tsv").read_text().splitlines()
    assert tsv[0] == "model\tDice 1\tDice 2\tmean\toptimistic"
    assert [line.split("\t")[0] for line in tsv[1:]] == ["KD r2 fold 1", "no-KD r2 fold 1"]  # teacher fold 1 not trained
    assert (wd / "fastkd_work" / DS / "student" / "nnUNetPlans_fastkdR2.report.png").stat().st_size > 10_000
    assert "Nothing to be done" in snakemake(wd, "-n", "--cores", "2", "student").stdout
    # nnU-Net's own predictor loads the baseline as the stock network at half the teachers' width (stock
    # nnUNetv2_predict on a student: test_predict_parity.py)
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(base_fold.parent), (1,), "checkpoint_final.pth")
    assert type(predictor.network).__name__ == "PlainConvUNet"
    assert predictor.network.encoder.stages[0][0].convs[0].conv.out_channels == arch(student)["features_per_stage"][0]


@pytest.mark.smoke
def test_snakemake_exports_verified_onnx_students(exported):
    """`snakemake export`: both students of the fixture as ONNX, checked on real preprocessed patches."""
    import onnx

    wd = exported
    for trainer in ("nnUNetTrainerFastKD", "nnUNetTrainerFastKDNoKD"):
        out = wd / "fastkd_work" / DS / "export" / f"{trainer}__nnUNetPlans_fastkdR2__3d_fullres" / "fold_1.onnx"
        record = json.loads(out.with_name("fold_1.onnx.json").read_text())
        assert record["passed"] and record["real_patches"] == 2
        assert all(c["max_abs_diff"] < 1e-3 and c["agreement"] >= 0.999 for c in record["checks"])
        meta = json.loads({p.key: p.value for p in onnx.load(out).metadata_props}["fastkd"])
        assert meta["trainer"] == trainer and meta["fold"] == 1 and meta["labels"]["lesion"] == 2
    assert "Nothing to be done" in snakemake(wd, "-n", "--cores", "1", "export").stdout


@pytest.mark.smoke
def test_temperature_must_match_the_cache(students, tmp_path):
    wd = clone(students, tmp_path)
    run = _train_student(wd, "-p", "nnUNetPlans_fastkdR2", "-f", "2", "--cache", str(_cache(wd)),
                         sets=["distillation.temperature=2", "student.schedule.epochs=1",
                               "student.schedule.iterations_per_epoch=1"])
    out, _ = run.communicate(timeout=300)
    assert run.returncode == 1, out
    assert "temperature: the cache was made with T = 1.0, expected T = 2.0" in out
    assert "Traceback" not in out
    fold = wd / "nnUNet_results" / DS / "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres" / "fold_2"
    assert not (fold / "checkpoint_final.pth").exists()


@pytest.mark.ci
def test_resume_after_sigkill_mid_epoch(students, tmp_path):
    """Killed during epoch 2 (after checkpoint_latest of epoch 1): the rerun continues at epoch 2."""
    wd = clone(students, tmp_path)
    plans = wd / "nnUNet_preprocessed" / DS / "nnUNetPlans_fastkdR4.json"
    subprocess.run([str(BIN / "fastkd"), "student", "plans", str(wd / "nnUNet_preprocessed" / DS / "nnUNetPlans.json"),
                    "-r", "4", "-o", str(plans)], check=True, env=_env(wd), capture_output=True, timeout=120)
    args = ["-p", "nnUNetPlans_fastkdR4", "-f", "0", "--cache", str(_cache(wd))]
    sets = ["student.schedule.epochs=4", "student.schedule.iterations_per_epoch=4", "student.schedule.save_every=1"]
    fold = wd / "nnUNet_results" / DS / "nnUNetTrainerFastKD__nnUNetPlans_fastkdR4__3d_fullres" / "fold_0"
    run = _train_student(wd, *args, sets=sets, start_new_session=True)
    deadline = time.time() + 300
    # wait for epoch 2 to start: checkpoint_latest (epoch 1 done) exists and the log names epoch 2
    while time.time() < deadline:
        logs = sorted(fold.glob("training_log_*.txt"))
        if logs and "Epoch 2" in logs[-1].read_text() and (fold / "checkpoint_latest.pth").exists():
            break
        assert run.poll() is None, run.stdout.read()
        time.sleep(0.2)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    latest = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert latest["current_epoch"] == 2 and latest["optimizer_state"]["state"]
    assert not (fold / "checkpoint_final.pth").exists()
    rerun = _train_student(wd, *args, sets=sets)
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "resuming" in out and "at epoch 2" in out
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == 4
    log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    assert "Epoch 0\n" not in log and "Epoch 2" in log and "Epoch 3" in log
    # nnU-Net's poly schedule continues where it stopped: epoch 2 of 4 -> 0.01 * (1 - 2/4) ** 0.9
    assert f"Current learning rate: {round(0.01 * 0.5 ** 0.9, 5)}" in log
    assert [r["epoch"] for r in json.loads((fold / "kd_losses.json").read_text())] == [0, 1, 2, 3]


@pytest.mark.ci
def test_fold_rotation_really_rotates_the_split(students, tmp_path):
    wd = clone(students, tmp_path)
    run = _train_student(wd, "-p", "nnUNetPlans_fastkdR2", "-f", "3", "--cache", str(_cache(wd)),
                         sets=["student.schedule.epochs=2", "student.schedule.iterations_per_epoch=1",
                               "student.schedule.rotate_every=1"])
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out
    fold = wd / "nnUNet_results" / DS / "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres" / "fold_3"
    log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    assert "fold rotation: epoch 1 trains on split 4 (was 3)" in log
    splits = json.loads((wd / "nnUNet_preprocessed" / DS / "splits_final.json").read_text())
    assert "Desired fold for training: 3" in log and "Desired fold for training: 4" in log
    assert splits[3]["train"] != splits[4]["train"]
    # split 4's validation cases were training cases of split 3: said so where the Dice is
    note = json.loads((fold / "validation" / "summary.json").read_text())["fastkd"]
    assert note["optimistic"] and "splits [3, 4]" in note["reason"]


@pytest.mark.extended
def test_baseline_with_da5_on_all_cases(students, tmp_path):
    """alpha 0 needs no cache; DA5 and fold 'all' train for real into their own stock folder."""
    wd = clone(students, tmp_path)
    run = _train_student(wd, "-p", "nnUNetPlans_fastkdR2", "-f", "all", "--baseline",
                         sets=["student.augmentation=da5", "student.schedule.epochs=1",
                               "student.schedule.iterations_per_epoch=1"])
    out, _ = run.communicate(timeout=600)
    assert run.returncode == 0, out
    fold = wd / "nnUNet_results" / DS / "nnUNetTrainerFastKDNoKD_DA5__nnUNetPlans_fastkdR2__3d_fullres" / "fold_all"
    assert (fold / "validation" / "summary.json").is_file()
    log = sorted(fold.glob("training_log_*.txt"))[-1].read_text()
    assert "This split has" not in log  # fold 'all': nnU-Net trains and validates on every case
    assert torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["fastkd"]["trainer"] \
        == "nnUNetTrainerFastKDNoKD_DA5"
