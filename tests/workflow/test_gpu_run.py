"""benchmarks/gpu/run.py, the GPU validation driver, on the CPU with its tiny schedule: the same commands in the
same order as on the GPU machine, on 7 Hippocampus cases (../shared), and its results folder.

The budget arithmetic of the GPU schedule (epochs from the calibration) is checked without running anything.
"""

import importlib.util
import json
import subprocess
import sys

import pytest

from workflow_runs import HIPPOCAMPUS, REPO, env

_spec = importlib.util.spec_from_file_location("gpu_run", REPO / "benchmarks" / "gpu" / "run.py")
gpu_run = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_run)
TIMEOUT_S = 900


def driver(tmp_path, *extra):
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu" / "run.py"), "--raw", str(HIPPOCAMPUS), "--work",
           str(tmp_path / "work"), "--out", str(tmp_path / "out"), "--schedule", "tiny", "--device", "cpu", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=TIMEOUT_S)


@pytest.mark.ci  # needs ../shared
def test_tiny_run_writes_the_results_folder(tmp_path):
    assert HIPPOCAMPUS.is_dir(), f"real data expected at {HIPPOCAMPUS} (see ../shared/README.md)"
    run = driver(tmp_path)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out[-5000:]
    files = {p.name: p.stat().st_size for p in (tmp_path / "out").iterdir()}
    assert {"results.json", "dice.tsv", "timing.tsv", "dice.png", "models.tar.00"} <= set(files)
    assert len(files) <= 8 and max(files.values()) <= 16 * 2**20
    header = (tmp_path / "out" / "dice.tsv").read_text().splitlines()
    assert header[0].split("\t")[:2] == ["model", "kind"] and "mean_dice" in header[0].split("\t")
    assert len(header) == 1 + 1 + 4  # the teacher ensemble, KD and no-KD students r = 2 and 4 (one seed)
    timing = [line.split("\t") for line in (tmp_path / "out" / "timing.tsv").read_text().splitlines()]
    assert timing[0] == ["kind", "name", "seconds", "detail"]
    steps = [row[1] for row in timing if row[0] == "step"]
    assert steps == ["preprocess", "train_teacher", "teacher_manifest", "softlabels_shard", "softlabels_finalize",
                     "student_plans", "train_student", "evaluation_cases", "predict", "evaluate",
                     "predict_tile_batch_1_resample_device", "predict_tile_batch_8_resample_device",
                     "predict_tile_batch_8_resample_cpu"]
    assert sum(row[0] == "train" for row in timing) == 5 + 4
    predict = {row[1].split(" fold 0 ")[1]: float(row[2]) for row in timing if row[0] == "predict"}
    assert len(predict) == 9 and all(v > 0 for v in predict.values())  # whole run, network, start-up of each
    for timed in ("tile batch 1 resample device", "tile batch 8 resample device", "tile batch 8 resample cpu"):
        assert predict[f"{timed}: s/case network"] < predict[f"{timed}: s/case whole run"]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [" ".join(line.split()[:2]) for line in results["lines"]] == ["PASS trained", "PASS evaluate:",
                                                                          "PASS predict", "PASS packed"]
    assert "4 students (KD r2 s0, no-KD r2 s0, KD r4 s0, no-KD r4 s0)" in results["lines"][0]
    assert "PASS gpu run" in run.stdout and "FAIL" not in out
    # the packed checkpoints (weights only, fp16): the students, then teacher folds while the 8 files allow
    packed = [m["label"] for m in results["models"]["packed"]]
    assert packed[:4] == ["KD r2 s0 fold 0", "no-KD r2 s0 fold 0", "KD r4 s0 fold 0", "no-KD r4 s0 fold 0"]
    assert sorted(packed[4:] + results["models"]["left_out"]) == [f"teacher fold {f}" for f in range(5)]
    import tarfile

    tar = tmp_path / "models.tar"
    tar.write_bytes(b"".join((tmp_path / "out" / p).read_bytes() for p in results["models"]["parts"]))
    with tarfile.open(tar) as t:
        names = t.getnames()
    assert "models/nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres/fold_0/checkpoint_final.pth" in names
    assert "models/nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres/plans.json" in names


def fake_raw(tmp_path, n_cases):
    raw = tmp_path / "raw" / "Dataset004_Hippocampus"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".nii.gz", "channel_names": {"0": "MRI"},
                                                  "labels": {"background": 0, "a": 1}, "numTraining": n_cases}))
    for i in range(n_cases):
        (raw / "imagesTr" / f"c_{i:03d}_0000.nii.gz").write_bytes(b"")
        (raw / "labelsTr" / f"c_{i:03d}.nii.gz").write_bytes(b"")
    return raw


def run_on(raw, tmp_path, *extra):
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu" / "run.py"), "--raw", str(raw), "--work",
                           str(tmp_path / "work"), "--out", str(tmp_path / "out"), *extra],
                          capture_output=True, text=True, env=env(), timeout=120)


@pytest.mark.ci  # ~25 s: nnU-Net's planner starts before it finds the images unreadable
def test_a_failing_step_fails_the_run_naming_it(tmp_path):
    run = run_on(fake_raw(tmp_path, 7), tmp_path)  # 7 cases whose images are empty files
    assert run.returncode == 1
    assert "FAIL step 'preprocess'" in run.stderr and "Unable to determine a reader" in run.stderr
    assert "FAIL gpu run" in run.stdout
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert [(s["step"], s["ok"]) for s in results["steps"]] == [("preprocess", False)]
    assert results["lines"][-1].startswith("FAIL step 'preprocess'")


def test_bad_input_fails_before_any_step(tmp_path):
    run = run_on(fake_raw(tmp_path, 3), tmp_path, "--cases", "5")
    assert run.returncode == 1, run.stderr
    assert "FAIL --cases 5: " in run.stderr and "has 3 labelled cases; 5 (nnU-Net's folds) up to that is valid" in run.stderr
    assert json.loads((tmp_path / "out" / "results.json").read_text())["lines"][-1].startswith("FAIL --cases 5")


def test_a_config_the_schema_refuses_fails_before_any_step(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("distillation:\n  temperature: -1\n")
    run = run_on(fake_raw(tmp_path, 7), tmp_path, "--config", str(bad))
    assert run.returncode == 1, run.stderr
    assert "FAIL invalid fastkd config" in run.stderr and "distillation.temperature" in run.stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert "steps" not in results and results["lines"][-1].startswith("FAIL invalid fastkd config")


def test_budget_epochs_fill_the_time_left_and_refuse_too_little():
    s = gpu_run.SCHEDULES["gpu"]
    calibration = {"teacher_s_per_it": 0.1, "overhead_s": 40, "student_slowdown": 1.6}
    # 500 s left - 170 reserve - 2 x 40 overhead = 250 s: 60 % teachers at 55 x 0.1 s per epoch, 40 % students
    assert gpu_run.budget_epochs(s, calibration, 500) == (int(150 / 5.5), int(100 / (5.5 * 1.6)))
    assert gpu_run.budget_epochs(s, {**calibration, "teacher_s_per_it": 10}, 500) == (2, 2)
    with pytest.raises(gpu_run.StepFailed, match="raise --budget"):
        gpu_run.budget_epochs(s, calibration, 300)
