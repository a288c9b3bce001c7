"""The reference system's training command on the workflow's own soft-label cache: a real student trained."""

import json
import subprocess

import pytest

from workflow_runs import BIN, clone, nnunet_env

DS = "Dataset900_FastkdDemo"


# -- a real run ----------------------------------------------------------------------------------
@pytest.mark.extended
def test_trains_a_student_on_the_workflows_cache(trained, tmp_path):
    wd = clone(trained, tmp_path)
    env = {**nnunet_env(wd), "nnUNet_n_proc_DA": "0", "nnUNet_def_n_proc": "1", "OMP_NUM_THREADS": "1"}
    softlabels = wd / "fastkd_work" / DS / "softlabels"
    stores = sorted(softlabels.glob("*.zarr"))
    manifests = sorted((wd / "fastkd_work" / DS).glob("*/*.json"))
    mtimes = [p.stat().st_mtime_ns for p in manifests]
    base = [str(BIN / "nnUNetv2_distillation_train"), "-d", "900", "-f", "0", "-tf", "0", "-d_device", "cpu",
            "--work", str(wd / "fastkd_work")]
    run = subprocess.run([*base, "-e", "1", "--iterations", "2", "--val-iterations", "1", "--batch-size", "2",
                          "-a", "0.4", "--threads", "1"], cwd=wd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"reuse {stores[0].relative_to(wd)}" in run.stdout, run.stdout
    assert sorted(softlabels.glob("*.zarr")) == stores
    assert [p.stat().st_mtime_ns for p in manifests] == mtimes  # identical manifests are not rewritten
    plans = json.loads((wd / "nnUNet_preprocessed" / DS / "nnUNetPlans_fastkdR2.json").read_text())
    assert plans["fastkd"]["reduction_factor"] == 2
    # alpha 0.4 is off its default: it is in the model folder's name (fastkd.sweep.student_tag)
    fold = wd / "nnUNet_results" / DS / "nnUNetTrainerFastKD_a0.4__nnUNetPlans_fastkdR2__3d_fullres" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    settings = json.loads((fold / "fastkd_student.json").read_text())
    assert (settings["alpha"], settings["temperature"], settings["cache"]) == (0.4, 1.0, str(stores[0]))
    assert "nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d 900 -c 3d_fullres -f 0 -tr nnUNetTrainerFastKD_a0.4 " \
           "-p nnUNetPlans_fastkdR2" in run.stdout

    dry = subprocess.run([*base, "-temp", "2", "--dry-run"], cwd=wd, env=env, capture_output=True, text=True, timeout=600)
    assert dry.returncode == 0, dry.stderr
    assert f"build fastkd_work/{DS}/softlabels/3d_fullres__T2__mirror__step0.5__uint8__" in dry.stdout, dry.stdout
    assert str(stores[0].relative_to(wd)) not in dry.stdout
    assert sorted(softlabels.glob("*.zarr")) == stores
