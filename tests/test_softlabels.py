"""Real teachers fill the soft-label cache: through Snakemake, killed mid-run, after a checkpoint change.

The ``trained`` fixture (conftest.py) runs the demo through ``snakemake softlabels``: 5 cases, one tiny
teacher fold, two shard jobs. Synthetic-data tests of the format are in test_cache.py.
"""

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from fastkd.cache import CacheError, SoftLabelCache
from fastkd.errors import FastkdError
from fastkd.softlabels import check_teachers, grid_differences
from wf import BIN, job_counts, nnunet_env, sha256, snakemake

DS = "Dataset900_FastkdDemo"
TEACHERS = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def stores(wd: Path) -> list[Path]:
    return sorted((wd / "fastkd_work" / DS / "softlabels").glob("*.zarr"))


def manifests(wd: Path) -> tuple[Path, Path]:
    return (wd / "fastkd_work" / DS / "teachers" / f"{TEACHERS}.json",
            wd / "fastkd_work" / DS / "preprocess" / "nnUNetPlans__3d_fullres.json")


def fastkd(*args, wd: Path, check=True) -> subprocess.CompletedProcess:
    run = subprocess.run([str(BIN / "fastkd"), *map(str, args)], env=nnunet_env(wd), capture_output=True, text=True)
    if check and run.returncode != 0:
        raise AssertionError(f"fastkd {' '.join(map(str, args))} failed:\n{run.stdout}\n{run.stderr}")
    return run


@pytest.mark.slow
def test_snakemake_fills_a_complete_verified_cache(trained):
    [store] = stores(trained)
    assert store.name == "3d_fullres__T3__mirror__step0.5__uint8__teachers-" + store.name.split("-")[-1]
    reader = SoftLabelCache(store)
    cases = [f"demo_{i:03d}" for i in range(5)]
    teacher_manifest, preprocess_manifest = manifests(trained)
    shapes = {c: v["shape"] for c, v in json.loads(preprocess_manifest.read_text())["cases"].items()}
    reader.check(temperature=3.0, labels={"background": 0, "organ": 1, "lesion": 2},
                 data_identifier="nnUNetPlans_3d_fullres", configuration="3d_fullres", shapes=shapes)
    p = reader.provenance
    assert p["channels"] == ["background", "organ", "lesion"] and p["activation"] == "softmax"
    assert p["mirror_axes"] == [0, 1, 2] and p["step_size"] == 0.5 and p["dtype"] == "uint8"
    folder = trained / "nnUNet_results" / DS / TEACHERS
    assert p["teachers"][0]["sha256"] == {"0": sha256(folder / "fold_0" / "checkpoint_final.pth")}
    # one tile per case (the demo case fits the patch), 8 mirror passes, one fold
    assert reader.attrs["teacher_forwards"] == 5 * 8

    # the two shard jobs covered every case exactly once
    markers = sorted((store.parent / store.name.replace(".zarr", ".shards")).glob("shard-*-of-2.json"))
    assert [m.name for m in markers] == ["shard-1-of-2.json", "shard-2-of-2.json"]
    written = [c for m in markers for c in json.loads(m.read_text())["computed"]]
    assert sorted(written) == cases

    verify = fastkd("cache", "verify", store, wd=trained)
    assert "checksums, values, sums and shapes OK" in verify.stdout
    assert "complete:      yes" in fastkd("cache", "info", store, wd=trained).stdout
    preview = store.with_name(store.name.replace(".zarr", ".preview.png"))
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Nothing to be done" in snakemake(trained, "-n", "--cores", "1", "softlabels").stdout


@pytest.mark.slow
def test_cache_agrees_with_nnunet_predictor(trained):
    """With one fold, the cache holds softmax(nnU-Net's sliding-window logits / T) within quantisation."""
    import blosc2
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    [store] = stores(trained)
    predictor = nnUNetPredictor(device=torch.device("cpu"), use_mirroring=True, perform_everything_on_device=False,
                                allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(str(trained / "nnUNet_results" / DS / TEACHERS), use_folds=(0,))
    reader = SoftLabelCache(store)
    agree = total = 0
    for case in ("demo_000", "demo_003"):
        image = blosc2.open(str(trained / "nnUNet_preprocessed" / DS / "nnUNetPlans_3d_fullres" / f"{case}.b2nd"))[:]
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(image)).float()
        probs = reader.read(case)
        tempered = torch.softmax(logits / 3.0, 0).numpy()
        assert np.abs(probs - tempered).max() < 1 / 255 + 1e-3
        # argmax is nnU-Net's prediction wherever quantisation cannot swap the top two classes
        top2 = np.sort(tempered, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 2 / 255
        agree += int((probs.argmax(0) == logits.argmax(0).numpy())[clear].sum())
        total += int(clear.sum())
    assert total > 0.5 * 2 * 32 * 40 * 32 and agree == total


@pytest.mark.slow
def test_new_temperature_keeps_the_old_cache_and_reruns_only_soft_labels(trained):
    run = snakemake(trained, "-n", "--cores", "1", "softlabels", "--config", "distillation={'temperature': 2.0}")
    assert job_counts(run.stdout) == {"softlabels_shard": 2, "softlabels_finalize": 1, "softlabels_preview": 1,
                                      "softlabels": 1}
    assert "3d_fullres__T2__mirror" in run.stdout
    assert len(stores(trained)) == 1  # a dry run writes nothing, and the T = 3 store stays


@pytest.mark.slow
def test_killed_writer_leaves_nothing_accepted_and_the_rerun_completes(trained, tmp_path):
    teacher_manifest, preprocess_manifest = manifests(trained)
    store = tmp_path / "killed.zarr"
    command = [str(BIN / "fastkd"), "softlabels", "fill", "-o", str(store), "-t", str(teacher_manifest),
               "-m", str(preprocess_manifest), "-T", "3", "--threads", "1"]
    job = subprocess.Popen(command, env=nnunet_env(trained), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    deadline = time.time() + 300
    while not (store / "demo_001" / "zarr.json").is_file():  # two cases done, the third being computed
        assert job.poll() is None and time.time() < deadline, "the soft-label job ended or stalled"
        time.sleep(0.05)
    os.killpg(job.pid, signal.SIGKILL)
    job.wait()
    done = sorted(p.name for p in store.iterdir() if p.is_dir())
    assert done[:2] == ["demo_000", "demo_001"] and len(done) < 5

    with pytest.raises(CacheError, match="no root zarr.json"):
        SoftLabelCache(store)
    verify = fastkd("cache", "verify", store, wd=trained, check=False)
    assert verify.returncode == 1 and "not finalized" in verify.stderr
    finalize = fastkd("softlabels", "finalize", store, "-m", preprocess_manifest, wd=trained, check=False)
    assert finalize.returncode == 1 and "demo_004: missing" in finalize.stderr

    rerun = subprocess.run(command, env=nnunet_env(trained), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    assert f"computed {5 - len(done)} cases, kept {len(done)} already cached" in rerun.stdout
    fastkd("softlabels", "finalize", store, "-m", preprocess_manifest, wd=trained)
    fastkd("cache", "verify", store, wd=trained)
    assert not store.with_name("killed.zarr.partial").exists()
    [reference] = stores(trained)
    ours, theirs = SoftLabelCache(store), SoftLabelCache(reference)
    assert ours.provenance == theirs.provenance
    for case in ours.cases:
        assert np.abs(ours.read(case) - theirs.read(case)).max() <= 1 / 255 + 1e-6


@pytest.mark.slow
def test_changed_teacher_checkpoint_recomputes_every_case(trained, tmp_path):
    import torch

    wd = tmp_path / "copy"
    shutil.copytree(trained, wd, symlinks=True)
    checkpoint = wd / "nnUNet_results" / DS / TEACHERS / "fold_0" / "checkpoint_final.pth"
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for weights in state["network_weights"].values():
        weights.mul_(1.01)
    torch.save(state, checkpoint)
    run = snakemake(wd, "-n", "--cores", "1", "softlabels")
    assert job_counts(run.stdout) == {"teacher_manifest": 1, "softlabels_shard": 2, "softlabels_finalize": 1,
                                      "softlabels_preview": 1, "softlabels": 1}
    snakemake(wd, "--cores", "2", "softlabels")
    [store] = stores(wd)
    markers = list(store.parent.glob("*.shards/shard-*.json"))
    assert sorted(c for m in markers for c in json.loads(m.read_text())["computed"]) == [f"demo_{i:03d}" for i in range(5)]
    assert SoftLabelCache(store).provenance["teachers"][0]["sha256"]["0"] == sha256(checkpoint)


def write_teacher(folder: Path, plans: dict, labels: dict) -> dict:
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return {"model_folder": str(folder), "plans_name": plans["plans_name"], "configuration": "3d_fullres"}


def test_teachers_on_another_grid_are_refused(tmp_path):
    def plans(name, spacing, data_identifier="nnUNetPlans_3d_fullres"):
        return {"plans_name": name, "transpose_forward": [0, 1, 2], "configurations": {"3d_fullres": {
            "data_identifier": data_identifier, "spacing": spacing, "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {}, "_kw_requires_import": []}}}}

    labels = {"background": 0, "a": 1}
    grid = plans("nnUNetPlans", [1, 1, 1])
    same = write_teacher(tmp_path / "resenc", plans("nnUNetResEncUNetMPlans", [1, 1, 1]), labels)
    check_teachers([same], grid, "3d_fullres", {"labels": labels})
    other = write_teacher(tmp_path / "other", plans("X", [1, 1, 2], "X_3d_fullres"), {"background": 0, "b": 1})
    assert grid_differences(json.loads((tmp_path / "other" / "plans.json").read_text()), "3d_fullres", grid,
                            "3d_fullres") == ["data_identifier: teacher X_3d_fullres vs grid nnUNetPlans_3d_fullres",
                                              "spacing: teacher [1, 1, 2] vs grid [1, 1, 1]"]
    with pytest.raises(FastkdError) as info:
        check_teachers([same, other], grid, "3d_fullres", {"labels": labels})
    message = str(info.value)
    assert str(tmp_path / "other") in message and "spacing: teacher [1, 1, 2] vs grid [1, 1, 1]" in message
    assert "labels: teacher {'background': 0, 'b': 1}" in message and "resenc" not in message
