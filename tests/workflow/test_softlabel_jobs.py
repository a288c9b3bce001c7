"""Real teachers fill the soft-label cache: through Snakemake, after a re-preprocessed case, with a diverged
teacher, and out-of-fold (each case from the teacher folds that held it out).

The ``trained`` fixture (conftest.py) runs the demo through ``snakemake softlabels``: 5 cases, one tiny
teacher fold, two shard jobs. Synthetic-data tests of the format are in test_cache.py; a writer killed
inside a case: test_cache_integrity.py; a run killed while it rewrites the cache after a teacher
checkpoint changed, and resumed: test_reruns.py.
"""

import json
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastkd import cache
from fastkd.cache import SoftLabelCache
from fastkd.errors import FastkdError
from fastkd.softlabels import check_teachers, fill_cache, grid_differences, out_of_fold, provenance, read_splits
from workflow_runs import BIN, job_counts, nnunet_env, sha256, snakemake

DS = "Dataset900_FastkdDemo"
TEACHERS = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def stores(wd: Path) -> list[Path]:
    return sorted((wd / "fastkd_work" / DS / "softlabels").glob("*.zarr"))


def manifests(wd: Path) -> tuple[Path, Path]:
    return (wd / "fastkd_work" / DS / "teachers" / f"{TEACHERS}.json",
            wd / "fastkd_work" / DS / "preprocess" / "nnUNetPlans__3d_fullres.json")


def fastkd(*args, wd: Path, check=True) -> subprocess.CompletedProcess:
    run = subprocess.run([str(BIN / "fastkd"), *map(str, args)], env=nnunet_env(wd), capture_output=True, text=True,
                         timeout=300)
    if check and run.returncode != 0:
        raise AssertionError(f"fastkd {' '.join(map(str, args))} failed:\n{run.stdout}\n{run.stderr}")
    return run


@pytest.mark.smoke
def test_snakemake_fills_a_complete_verified_cache(trained):
    [store] = stores(trained)
    assert store.name == "3d_fullres__T1__mirror__step0.5__uint8__teachers-" + store.name.split("-")[-1]
    reader = SoftLabelCache(store)
    cases = [f"demo_{i:03d}" for i in range(5)]
    teacher_manifest, preprocess_manifest = manifests(trained)
    shapes = {c: v["shape"] for c, v in json.loads(preprocess_manifest.read_text())["cases"].items()}
    reader.check(temperature=1.0, labels={"background": 0, "organ": 1, "lesion": 2},
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


@pytest.mark.smoke
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
        tempered = torch.softmax(logits / 1.0, 0).numpy()
        assert np.abs(probs - tempered).max() < 1 / 255 + 1e-3
        # argmax is nnU-Net's prediction wherever quantisation cannot swap the top two classes
        top2 = np.sort(tempered, axis=0)[-2:]
        clear = (top2[1] - top2[0]) > 2 / 255
        agree += int((probs.argmax(0) == logits.argmax(0).numpy())[clear].sum())
        total += int(clear.sum())
    assert total > 0.5 * 2 * 32 * 40 * 32 and agree == total


@pytest.mark.smoke
def test_new_temperature_keeps_the_old_cache_and_reruns_only_soft_labels(trained):
    run = snakemake(trained, "-n", "--cores", "1", "softlabels", "--config", "distillation={'temperature': 2.0}")
    assert job_counts(run.stdout) == {"softlabels_shard": 2, "softlabels_finalize": 1, "softlabels_preview": 1,
                                      "softlabels": 1}
    assert "3d_fullres__T2__mirror" in run.stdout
    assert len(stores(trained)) == 1  # a dry run writes nothing, and the T = 1 store stays


@pytest.mark.smoke
def test_soft_label_jobs_ask_for_the_memory_of_the_largest_case(trained):
    from fastkd.softlabels import mem_mb

    _, preprocess_manifest = manifests(trained)
    expected = mem_mb(preprocess_manifest, trained / "nnUNet_preprocessed" / DS / "dataset.json")
    run = snakemake(trained, "-n", "--forcerun", "softlabels_shard", "--cores", "1", "softlabels")
    asked = [line for line in run.stdout.splitlines() if "resources:" in line and f"mem_mb={expected}," in line]
    assert len(asked) == 2, run.stdout[-3000:]  # both shard jobs
    run = snakemake(trained, "-n", "--forcerun", "softlabels_shard", "--config",
                    "resources={'softlabels': {'mem_mb': 1234}}", "--cores", "1", "softlabels")
    assert run.stdout.count("mem_mb=1234,") == 2


@pytest.mark.ci
def test_a_re_preprocessed_case_recomputes_only_its_soft_labels(trained, tmp_path, monkeypatch):
    import blosc2

    preprocessed = tmp_path / "nnUNet_preprocessed"
    shutil.copytree(trained / "nnUNet_preprocessed", preprocessed, symlinks=True)
    monkeypatch.setenv("nnUNet_preprocessed", str(preprocessed))
    teacher_manifest, preprocess_manifest = manifests(trained)
    store = tmp_path / "c.zarr"
    settings = dict(step_size=0.5, mirroring=False, dtype="uint8", device="cpu", progress=False)
    first = fill_cache(store, [teacher_manifest], preprocess_manifest, 3.0, **settings)
    assert len(first["computed"]) == 5
    cache.finalize(store, {c: v["shape"] for c, v in json.loads(preprocess_manifest.read_text())["cases"].items()},
                   preprocessed / DS / "nnUNetPlans_3d_fullres")
    assert cache.verify(store) == []
    b2nd = preprocessed / DS / "nnUNetPlans_3d_fullres" / "demo_002.b2nd"
    image = blosc2.open(str(b2nd), mode="r")[:]
    blosc2.asarray(np.ascontiguousarray(image[:, ::-1]), urlpath=str(b2nd), mode="w")  # as if re-preprocessed
    assert any("demo_002: the preprocessed case changed" in p for p in cache.verify(store))
    second = fill_cache(store, [teacher_manifest], preprocess_manifest, 3.0, **settings)
    assert second["computed"] == ["demo_002"] and len(second["skipped"]) == 4
    assert cache.case_attrs(store, "demo_002")["preprocessed_sha256"] == sha256(b2nd)


@pytest.mark.smoke
def test_a_teacher_with_non_finite_output_fails_naming_case_and_fold_and_keeps_the_store(trained, tmp_path,
                                                                                          monkeypatch):
    import torch

    from fastkd.teachers import write_manifest

    monkeypatch.setenv("nnUNet_preprocessed", str(trained / "nnUNet_preprocessed"))
    teacher_manifest, preprocess_manifest = manifests(trained)
    [reference] = stores(trained)
    store = tmp_path / "c.zarr"
    shutil.copytree(reference, store)
    root = (store / "zarr.json").read_text()
    source = trained / "nnUNet_results" / DS / TEACHERS
    folder = tmp_path / TEACHERS
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("fold_*"))
    (folder / "fold_0").mkdir()
    state = torch.load(source / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for key, weights in state["network_weights"].items():
        if "seg_layers" in key and key.endswith("bias"):
            weights.fill_(float("nan"))  # a diverged training
    torch.save(state, folder / "fold_0" / "checkpoint_final.pth")
    write_manifest(folder, "3d_fullres", [0], "checkpoint_final.pth", tmp_path / "broken.json")
    settings = dict(step_size=0.5, mirroring=False, dtype="uint8", device="cpu", progress=False)
    with pytest.raises(FastkdError, match=rf"demo_000: {TEACHERS} fold 0 produced non-finite logits \(NaN or inf\)"):
        fill_cache(store, [tmp_path / "broken.json"], preprocess_manifest, 3.0, **settings)
    assert (store / "zarr.json").read_text() == root  # nothing was written: the complete store stays complete
    SoftLabelCache(store).read("demo_000")


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


# -- out-of-fold soft labels (softlabels.folds_per_case = out_of_fold) --------------------------------------
# nnU-Net's splits_final.json for cases a-f; fold 0 validates two of them, fold 4 none
SPLITS = [{"train": ["c", "d", "e", "f"], "val": ["a", "b"]}, {"train": ["a", "b", "d", "e", "f"], "val": ["c"]},
          {"train": ["a", "b", "c", "e", "f"], "val": ["d"]}, {"train": ["a", "b", "c", "d", "f"], "val": ["e", "f"]},
          {"train": ["a", "b", "c", "d", "e", "f"], "val": []}]


def test_out_of_fold_picks_the_folds_that_held_each_case_out(tmp_path):
    # manifest keys are strings, config folds ints; a fold "all" trained on every case and holds none out
    picked = out_of_fold(["a", "c", "e"], [["0", "1", "all"], [3, 4]], SPLITS)
    assert picked == {"a": [["0"], []], "c": [["1"], []], "e": [[], [3]]}
    # a custom split may validate a case in several folds: all of them hold it out
    custom = [{"val": ["a"]}, {"val": ["a", "b"]}]
    assert out_of_fold(["a", "b"], [[0, 1], [1]], custom) == {"a": [[0, 1], [1]], "b": [[1], [1]]}

    with pytest.raises(FastkdError) as info:
        out_of_fold(["a", "d", "z"], [[0, 1], ["all"]], SPLITS, names=["A", "B"], source="splits_final.json")
    message = str(info.value)
    assert "no teacher fold holds out 2 case(s) (split splits_final.json; teacher folds A: 0, 1; B: all)" in message
    assert "- d: validated by fold 2" in message and "- z: in no fold's validation set" in message
    assert "- a" not in message

    (tmp_path / "splits.json").write_text(json.dumps(SPLITS))
    assert read_splits(tmp_path / "splits.json") == SPLITS
    (tmp_path / "bad.json").write_text(json.dumps({"train": [], "val": []}))
    with pytest.raises(FastkdError, match="bad.json: expected a list with one"):
        read_splits(tmp_path / "bad.json")


def test_provenance_records_the_fold_selection_and_another_mode_or_split_recomputes(tmp_path):
    plans = {"dataset_name": DS, "plans_name": "nnUNetPlans", "transpose_forward": [0, 1, 2], "configurations": {
        "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres", "spacing": [1, 1, 1], "patch_size": [4, 4, 4],
                       "architecture": {"network_class_name": "PlainConvUNet", "arch_kwargs": {},
                                        "_kw_requires_import": []}}}}
    ensemble = SimpleNamespace(softmax=True, channels=lambda: ["background", "a"], mirror_axes=[],
                               label_manager=SimpleNamespace(has_regions=False))
    teacher = {"model_folder": f"/t/{TEACHERS}", "trainer": "nnUNetTrainer", "plans_name": "nnUNetPlans",
               "configuration": "3d_fullres", "checkpoint": "checkpoint_final.pth",
               "folds": {"0": {"sha256": "ab"}, "1": {"sha256": "cd"}}}

    def prov(*selection):
        return provenance([teacher], [1.0], plans, "3d_fullres", {"labels": {"background": 0, "a": 1}}, ensemble,
                          3.0, 0.5, True, "uint8", *selection)

    everything, held_out, other_split = prov(), prov("out_of_fold", "1" * 64), prov("out_of_fold", "2" * 64)
    assert everything["folds_per_case"] == "all" and everything["splits_sha256"] is None
    assert held_out["folds_per_case"] == "out_of_fold" and held_out["splits_sha256"] == "1" * 64
    assert "over the folds that held the case out" in held_out["ensemble"]
    store, probs = tmp_path / "oof.zarr", np.full((2, 4, 4, 4), 0.5, np.float32)
    cache.write_case(store, "a", probs, held_out, {"teacher_folds": [[1]]})
    assert cache.is_current(store, "a", held_out, probs.shape)
    assert not cache.is_current(store, "a", everything, probs.shape)
    assert not cache.is_current(store, "a", other_split, probs.shape)
    cache.finalize(store, {"a": [4, 4, 4]})
    report = cache.info(store)
    assert report["provenance"]["folds_per_case"] == "out_of_fold" and report["cases"]["a"]["teacher_folds"] == [[1]]
    text = cache.format_info(report, list_cases=True)
    assert "folds/case:    out_of_fold (split sha256 1111111111111111...)" in text and "[[1]]" in text


def test_fill_rejects_an_unknown_fold_selection_before_writing(tmp_path):
    store = tmp_path / "s.zarr"
    run = subprocess.run([str(BIN / "fastkd"), "softlabels", "fill", "-o", str(store), "-t", str(tmp_path / "t.json"),
                          "-m", str(tmp_path / "m.json"), "--folds-per-case", "leave_one_out"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1
    assert "softlabels.folds_per_case = 'leave_one_out': must be one of all, out_of_fold" in run.stderr
    assert not store.exists()


@pytest.mark.ci
def test_out_of_fold_fill_runs_only_the_fold_that_held_each_case_out(trained, tmp_path, monkeypatch):
    """Teacher folds 0, 1 (fold 0 with its output layer negated) and 2 (unreadable, validates no case of the
    shard): per case only the held-out fold runs, and a fold no case needs is never loaded."""
    import torch
    import zarr

    from fastkd.teachers import write_manifest

    monkeypatch.setenv("nnUNet_preprocessed", str(trained / "nnUNet_preprocessed"))
    source = trained / "nnUNet_results" / DS / TEACHERS
    folder = tmp_path / TEACHERS
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("fold_*"))
    (folder / "fold_0").mkdir()
    shutil.copy(source / "fold_0" / "checkpoint_final.pth", folder / "fold_0")
    state = torch.load(source / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    for key, weights in state["network_weights"].items():
        if "seg_layers" in key:
            weights.neg_()
    for fold in (1, 2):
        (folder / f"fold_{fold}").mkdir()
        torch.save(state, folder / f"fold_{fold}" / "checkpoint_final.pth")
    both, single = tmp_path / "folds012.json", [tmp_path / "fold0.json", tmp_path / "fold1.json"]
    write_manifest(folder, "3d_fullres", [0, 1, 2], "checkpoint_final.pth", both)
    for fold, manifest in enumerate(single):
        write_manifest(folder, "3d_fullres", [fold], "checkpoint_final.pth", manifest)
    (folder / "fold_2" / "checkpoint_final.pth").write_bytes(b"loading this fails")
    _, preprocess_manifest = manifests(trained)
    splits = tmp_path / "splits_final.json"
    val = [["demo_000", "demo_003"], ["demo_001", "demo_004"], [], ["demo_002"], []]
    splits.write_text(json.dumps([{"train": sorted({f"demo_{i:03d}" for i in range(5)} - set(v)), "val": v}
                                  for v in val]))
    settings = dict(step_size=0.5, mirroring=False, dtype="uint8", device="cpu", progress=False)
    store = tmp_path / "oof.zarr"

    def fill(manifest, n_shards, shard, out=store, **kwargs):
        return fill_cache(out, [manifest], preprocess_manifest, 3.0, n_shards=n_shards, shard=shard, **settings,
                          **kwargs)

    # shard 1 of 2 (demo_000, demo_002, demo_004): fold 3 validates demo_002 and is no teacher; nothing runs
    with pytest.raises(FastkdError, match=r"holds out 1 case\(s\) \(split .*splits_final.json; teacher folds "
                                          rf"{TEACHERS}: 0, 1, 2\):\n  - demo_002: validated by fold 3"):
        fill(both, 2, 0, folds_per_case="out_of_fold", splits=splits)
    # the default split is nnU-Net's, written when fold 0 trained (5 cases, one per fold)
    with pytest.raises(FastkdError, match=f"split {trained / 'nnUNet_preprocessed' / DS / 'splits_final.json'}"):
        fill(both, 1, 0, folds_per_case="out_of_fold")
    assert not store.exists()

    # shard 2 of 2 (demo_001, demo_003): one fold each, one pass of one tile (the case fits the patch); fold 2
    # is not loaded (its checkpoint no longer matches the manifest: loading it would fail)
    summary = fill(both, 2, 1, folds_per_case="out_of_fold", splits=splits)
    assert summary["computed"] == ["demo_001", "demo_003"] and summary["teacher_forwards"] == 2
    prov = cache.case_attrs(store, "demo_001")["provenance"]
    assert prov["folds_per_case"] == "out_of_fold" and prov["splits_sha256"] == sha256(splits)
    assert prov["teachers"][0]["folds"] == [0, 1, 2]
    for case, folds in (("demo_001", [[1]]), ("demo_003", [[0]])):
        attrs = cache.case_attrs(store, case)
        assert attrs["teacher_folds"] == folds and attrs["teacher_forwards"] == 1

    def read(path, case):  # stored uint8 values, probability x 255
        return zarr.open_array(str(path / case), mode="r")[...].astype(np.int16)

    # each case is softmax(logits / T) of its held-out fold alone: what the all-folds fill of a teacher set of
    # that one fold writes (shard k + 1 of 5 is demo_00k)
    for fold, case in ((0, "demo_003"), (1, "demo_001")):
        one = tmp_path / f"fold{fold}.zarr"
        fill(single[fold], 5, int(case[-1]), out=one)
        assert cache.case_attrs(one, case)["provenance"]["folds_per_case"] == "all"
        assert np.abs(read(store, case) - read(one, case)).max() <= 1  # uint8 quantisation
    [reference] = stores(trained)  # fold 0, mirrored: far from fold 1 (output layer negated)
    assert np.abs(read(store, "demo_001") - read(reference, "demo_001")).mean() > 10
