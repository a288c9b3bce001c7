"""Soft-label filling without Snakemake: teacher checks, shards, out-of-fold selection, provenance."""

import json
import subprocess
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fastkd import cache
from fastkd.errors import FastkdError
from fastkd.softlabels import (
    check_teachers,
    grid_differences,
    out_of_fold,
    provenance,
    read_splits,
)

from workflow_runs import BIN

DS = "Dataset900_FastkdDemo"
TEACHERS = "nnUNetTrainer__nnUNetPlans__3d_fullres"


def write_teacher(folder: Path, plans: dict, labels: dict) -> dict:
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))
    return {"model_folder": str(folder), "plans_name": plans["plans_name"], "configuration": "3d_fullres"}


# -- out-of-fold soft labels (softlabels.folds_per_case = out_of_fold) --------------------------------------
# nnU-Net's splits_final.json for cases a-f; fold 0 validates two of them, fold 4 none
SPLITS = [{"train": ["c", "d", "e", "f"], "val": ["a", "b"]}, {"train": ["a", "b", "d", "e", "f"], "val": ["c"]},
          {"train": ["a", "b", "c", "e", "f"], "val": ["d"]}, {"train": ["a", "b", "c", "d", "f"], "val": ["e", "f"]},
          {"train": ["a", "b", "c", "d", "e", "f"], "val": []}]


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
