"""dataset.holdout: a real dataset's labelled cases held back as the test set. The seeded pick, the raw
folder nnU-Net sees (training cases only), the config checks, the evaluation's test set (the DAG:
tests/workflow/test_dry_runs.py).

The datasets here are empty files in nnU-Net naming: nothing reads an image, so every test takes seconds.
"""

import json
import os

import pytest

from fastkd import cases, nnunet
from fastkd.cases import (
    evaluation_sets,
    held_out_problems,
    holdout_cases,
    holdout_split,
    holds_out,
    is_optimistic,
)
from fastkd.checks import validate_config
from fastkd.cli import main
from fastkd.config import ConfigError
from fastkd.errors import FastkdError
from fastkd.paths import Paths
from fastkd.preprocess import HOLDOUT_RECORD, link_raw_dataset, training_cases

from fake_datasets import CASES, DATASET_JSON, _raw_dataset


def _config(tmp_path, raw, n_test=3, seed=0, **more):
    return validate_config({"dataset": {"raw": str(raw), "holdout": {"n_test": n_test, "seed": seed}},
                            "paths": {"work": str(tmp_path / "work")}, **more}, base_dir=tmp_path)


def test_the_pick_is_seeded_sorted_and_sized():
    cases = [f"c{i:03d}" for i in range(200)]
    pick = holdout_split(cases, 20, 0)
    assert len(pick) == 20 and pick == sorted(pick) and set(pick) <= set(cases)
    assert holdout_split(list(reversed(cases)), 20, 0) == pick  # the order cases are listed in does not matter
    assert holdout_split(cases, 20, 1) != pick
    assert holdout_split(cases, 21, 0) != pick and len(holdout_split(cases, 21, 0)) == 21
    assert holdout_split(cases, 0, 0) == []


def test_training_cases_leave_the_held_out_cases_out(tmp_path):
    raw = _raw_dataset(tmp_path)
    config = _config(tmp_path, raw)
    test = holdout_cases(config)
    assert test == holdout_split(CASES, 3, 0)
    assert training_cases(config) == [c for c in CASES if c not in test] and len(training_cases(config)) == 7
    assert holdout_cases(_config(tmp_path, raw, n_test=0)) == [] and training_cases(_config(tmp_path, raw, n_test=0)) == CASES
    assert holdout_cases(validate_config({}, base_dir=tmp_path)) == []  # the demo: dataset.demo.n_test instead


def test_nnunet_sees_a_folder_of_the_training_cases_only(tmp_path):
    source = _raw_dataset(tmp_path / "data")
    raw = tmp_path / "nnUNet_raw" / source.name
    link_raw_dataset(source, raw)  # without a holdout: the link of before
    assert raw.is_symlink() and raw.resolve() == source.resolve()

    link_raw_dataset(source, raw, n_test=3, seed=0)  # the old link is replaced
    test = holdout_split(CASES, 3, 0)
    training = [c for c in CASES if c not in test]
    assert raw.is_dir() and not raw.is_symlink()
    assert nnunet.raw_case_ids(raw) == training  # what nnU-Net's planner and preprocessor will find
    assert sorted(p.name for p in (raw / "imagesTr").iterdir()) == [f"{c}_{ch:04d}.nii.gz" for c in training
                                                                    for ch in range(2)]
    link = raw / "labelsTr" / f"{training[0]}.nii.gz"
    assert link.is_symlink() and link.resolve() == (source / "labelsTr" / f"{training[0]}.nii.gz").resolve()
    dataset_json = json.loads((raw / "dataset.json").read_text())
    assert dataset_json == {**DATASET_JSON, "numTraining": 7}
    assert json.loads((raw / HOLDOUT_RECORD).read_text()) == {"source": str(source.resolve()), "n_test": 3, "seed": 0,
                                                              "test_cases": test}
    stamp = (raw / HOLDOUT_RECORD).stat().st_mtime_ns
    link_raw_dataset(source, raw, n_test=3, seed=0)  # the same holdout: kept as it is
    assert (raw / HOLDOUT_RECORD).stat().st_mtime_ns == stamp

    link_raw_dataset(source, raw, n_test=3, seed=1)  # another seed: built again
    other = holdout_split(CASES, 3, 1)
    assert other != test and json.loads((raw / HOLDOUT_RECORD).read_text())["test_cases"] == other
    assert nnunet.raw_case_ids(raw) == [c for c in CASES if c not in other]
    assert all((source / "labelsTr" / f"{c}.nii.gz").is_file() for c in CASES)  # the links went, not the data
    assert [p.name for p in raw.parent.iterdir()] == [raw.name]  # no temporary folder left

    link_raw_dataset(source, raw)  # holdout off again: the link
    assert raw.is_symlink() and raw.resolve() == source.resolve()


def test_a_folder_in_the_way_or_a_missing_file_writes_nothing(tmp_path):
    source = _raw_dataset(tmp_path / "data")
    raw = tmp_path / "nnUNet_raw" / source.name
    (raw / "imagesTr").mkdir(parents=True)  # someone else's dataset
    with pytest.raises(FastkdError, match="already exists and is not"):
        link_raw_dataset(source, raw, n_test=3, seed=0)
    assert sorted(p.name for p in raw.iterdir()) == ["imagesTr"]
    (raw / "dataset.json").write_text("{}")  # a dataset kept in nnUNet_raw itself: no room for the folder
    with pytest.raises(FastkdError, match="is .* itself, where fastkd builds the folder"):
        link_raw_dataset(raw, raw, n_test=3, seed=0)

    raw = tmp_path / "raw2" / source.name
    link_raw_dataset(source, raw, n_test=3, seed=0)
    before = json.loads((raw / HOLDOUT_RECORD).read_text())
    training = [c for c in CASES if c not in holdout_split(CASES, 3, 5)]
    (source / "imagesTr" / f"{training[0]}_0001.nii.gz").unlink()
    with pytest.raises(FastkdError, match=rf"lacks 1 file\(s\) of its training cases: .*{training[0]}_0001.nii.gz"):
        link_raw_dataset(source, raw, n_test=3, seed=5)
    assert json.loads((raw / HOLDOUT_RECORD).read_text()) == before  # the previous folder, untouched
    assert sorted(p.name for p in raw.parent.iterdir()) == [raw.name]
    with pytest.raises(FastkdError, match="lacks 1 file"):
        link_raw_dataset(source, tmp_path / "raw3" / source.name, n_test=3, seed=5)
    assert not (tmp_path / "raw3" / source.name).exists()


def test_config_errors_name_the_values_and_what_is_valid(tmp_path):
    raw = _raw_dataset(tmp_path)
    _config(tmp_path, raw, n_test=5)  # leaves 5: the 5-fold split's minimum
    with pytest.raises(ConfigError, match=r"dataset.holdout.n_test = 6: .*has 10 labelled cases, which leaves 4 to "
                                          r"train on; nnU-Net's 5-fold split needs at least 5: use 0-5"):
        _config(tmp_path, raw, n_test=6)
    with pytest.raises(ConfigError, match=r"dataset.holdout.n_test = -1 \(int\): must be >= 0"):
        _config(tmp_path, raw, n_test=-1)
    with pytest.raises(ConfigError, match=r"dataset.holdout.n_test = 2: dataset.raw = 'demo' .*dataset.demo.n_test"):
        validate_config({"dataset": {"holdout": {"n_test": 2}}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.holdout.n_test = 3 and evaluation.test_images = 'imagesTs': one "
                                          "test set only"):
        _config(tmp_path, raw, evaluation={"test_images": "imagesTs", "test_labels": "labelsTs"})
    with pytest.raises(ConfigError, match=r"dataset.holdout.n_test = 3 needs plans.preprocess: true"):
        _config(tmp_path, raw, plans={"preprocess": False})
    for sub in ("imagesTs", "labelsTs"):
        (raw / sub).mkdir()
    with pytest.raises(ConfigError, match=r"has its own labelled test set \(imagesTs, labelsTs\); one test set only"):
        _config(tmp_path, raw)


def test_the_held_out_cases_are_the_test_set(tmp_path):
    raw = _raw_dataset(tmp_path)
    config = _config(tmp_path, raw, student={"folds": [0, "all"]})  # 'all' is fine: there is a test set
    assert holds_out(config) and evaluation_sets(config) == ["test"] and not is_optimistic("test")
    assert cases.test_set(config) is None  # no test folder on disk: linked cases
    p = Paths(config)
    linked = tmp_path / "work" / "Dataset123_Fake" / "evaluation" / "test" / "cases"
    assert (p.evaluation_images("test"), p.evaluation_labels("test")) == (linked / "images", linked / "labels")
    test = holdout_cases(config)
    images, labels = cases.test_set_files(config, p)
    assert images == [linked / "images" / f"{c}_{ch:04d}.nii.gz" for c in test for ch in range(2)]
    assert labels == [linked / "labels" / f"{c}.nii.gz" for c in test]
    assert evaluation_sets(_config(tmp_path, raw, n_test=0)) == ["fold_0_validation"]  # optimistic, as before


def test_cli_links_the_held_out_cases_from_the_source(tmp_path, capsys):
    raw = _raw_dataset(tmp_path)
    config = _config(tmp_path, raw)
    p, test = Paths(config), holdout_cases(config)
    images, labels = p.evaluation_images("test"), p.evaluation_labels("test")
    assert main(["evaluate", "cases", "--cases", *test, "--raw", str(raw), "--images", str(images),
                 "--labels", str(labels)]) == 0
    assert f"linked 3 cases into {images}" in capsys.readouterr().out
    assert sorted(f for f in os.listdir(images)) == [f"{c}_{ch:04d}.nii.gz" for c in test for ch in range(2)]
    assert (labels / f"{test[0]}.nii.gz").resolve() == (raw / "labelsTr" / f"{test[0]}.nii.gz").resolve()
    # the test set's check: complete, and no case a model trained on
    assert held_out_problems(images, labels, DATASET_JSON, training_cases(config)) == []
    assert held_out_problems(images, labels, DATASET_JSON, CASES)[0].endswith("none of the models trained on")
    assert main(["evaluate", "cases", "--cases", "nope", "--raw", str(raw), "--images", str(tmp_path / "i"),
                 "--labels", str(tmp_path / "l")]) == 1
    assert "3 file(s) of the cases to link are missing" in capsys.readouterr().err
    assert main(["evaluate", "cases", "--splits", "s.json", "--raw", str(raw), "--images", "i", "--labels", "l"]) == 1
    assert "--splits needs -f FOLD" in capsys.readouterr().err
    # `fastkd config show --paths` tells how many cases are held out, and where they are linked
    (tmp_path / "c.yaml").write_text(json.dumps({"dataset": {"raw": str(raw), "holdout": {"n_test": 3}}}))
    assert main(["config", "show", str(tmp_path / "c.yaml"), "--paths"]) == 0
    assert "# held-out test cases (3, linked): fastkd_work/Dataset123_Fake/evaluation/test/cases" in capsys.readouterr().out
