"""Real teachers fill the soft-label cache: through Snakemake, after a re-preprocessed case, with a diverged
teacher, and out-of-fold (each case from the teacher folds that held it out).

The ``trained`` fixture (conftest.py) runs the demo through ``snakemake softlabels``: 5 cases, one tiny
teacher fold, two shard jobs. Synthetic-data tests of the format are in tests/unit/cache/test_cache.py; a
writer killed inside a case: tests/unit/cache/test_cache_integrity.py; a run killed while it rewrites the
cache after a teacher checkpoint changed, and resumed: test_reruns.py; filling without Snakemake:
tests/unit/test_softlabels.py.
"""

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from fastkd import cache
from fastkd.cache import SoftLabelCache
from fastkd.errors import FastkdError
from fastkd.softlabels import fill_cache
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
