"""Tests for fastkd.unlabelled: unlabelled images found and checked at parse time, then (ci tier) preprocessed for real
with nnU-Net's own preprocessor and the plans of a real (demo) dataset that nnU-Net planned and preprocessed."""

import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from fastkd.checks import validate_config
from fastkd.config import ConfigError
from fastkd.demo import make_demo_dataset
from fastkd.errors import FastkdError
from fastkd.unlabelled import (
    PREPROCESSED_FOLDER,
    RECORDS,
    _duplicates,
    check_case_ids,
    folder_cases,
    preprocess_unlabelled,
    reference_images,
    unlabelled_images,
    unlabelled_source,
)

ONE = {"file_ending": ".nii.gz", "channel_names": {"0": "T1"}}
TWO = {"file_ending": ".nii.gz", "channel_names": {"0": "T1", "1": "T2"}}
DS = "Dataset951_UnlPrep"
UNLABELLED = ["demo_unl_000", "demo_unl_001", "demo_unl_002"]
# nnU-Net's planning and preprocessing, run in a child process because nnU-Net reads its folders from the
# environment at import (as in tests/unit/student/test_plans.py)
PLAN = """
import sys
from pathlib import Path
from fastkd.preprocess import plan_preprocess
print(plan_preprocess(951, Path(sys.argv[1]), ["3d_fullres"], [Path(sys.argv[2])], planner_class="ExperimentPlanner",
                      teacher_folder=None, num_processes=1, gpu_memory_target_gb=None))
"""


def touch(folder: Path, *names: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"")
    return folder


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def mtimes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


# -- folder_cases ------------------------------------------------------------------------------------------


def test_folder_cases_groups_one_channel(tmp_path):
    folder = touch(tmp_path / "unl", "b_0000.nii.gz", "pat_01_a_0000.nii.gz", "a_0000.nii.gz")
    assert folder_cases(folder, ONE) == {"a": ["a_0000.nii.gz"], "b": ["b_0000.nii.gz"],
                                         "pat_01_a": ["pat_01_a_0000.nii.gz"]}


def test_folder_cases_groups_two_channels_in_channel_order(tmp_path):
    folder = touch(tmp_path / "unl", "y_0001.nii.gz", "x_0001.nii.gz", "y_0000.nii.gz", "x_0000.nii.gz")
    assert folder_cases(str(folder), TWO) == {"x": ["x_0000.nii.gz", "x_0001.nii.gz"],
                                              "y": ["y_0000.nii.gz", "y_0001.nii.gz"]}


def test_folder_cases_ignores_hidden_files(tmp_path):
    folder = touch(tmp_path / "unl", "a_0000.nii.gz", ".DS_Store", "._a_0000.nii.gz", ".b_0000.nii.gz")
    assert folder_cases(folder, ONE) == {"a": ["a_0000.nii.gz"]}


@pytest.mark.parametrize("stray", ["notes.txt", "a.nii.gz", "a_0000.nii", "a_000.nii.gz", "a_00000.nii.gz"])
def test_folder_cases_names_a_file_outside_nnunets_naming(tmp_path, stray):
    folder = touch(tmp_path / "unl", "a_0000.nii.gz", stray)
    with pytest.raises(FastkdError) as info:
        folder_cases(folder, ONE)
    assert f"{stray}: not named <case>_<channel:04d>.nii.gz" in str(info.value)
    assert str(folder) in str(info.value)


def test_folder_cases_names_a_case_missing_a_channel(tmp_path):
    folder = touch(tmp_path / "unl", "full_0000.nii.gz", "full_0001.nii.gz", "half_0000.nii.gz")
    with pytest.raises(FastkdError) as info:
        folder_cases(folder, TWO)
    message = str(info.value)
    assert "half: channels [0], the training images have 2 (_0000, _0001)" in message
    assert "full" not in message.replace(str(folder), "")


def test_folder_cases_names_a_case_with_an_extra_channel(tmp_path):
    folder = touch(tmp_path / "unl", "ok_0000.nii.gz", "extra_0000.nii.gz", "extra_0001.nii.gz")
    with pytest.raises(FastkdError) as info:
        folder_cases(folder, ONE)
    message = str(info.value)
    assert "extra: channels [0, 1], the training images have 1 (_0000)" in message
    assert "ok:" not in message


def test_folder_cases_names_a_case_with_a_wrong_channel_number(tmp_path):
    folder = touch(tmp_path / "unl", "c_0000.nii.gz", "c_0002.nii.gz")
    with pytest.raises(FastkdError, match=re.escape("c: channels [0, 2], the training images have 2")):
        folder_cases(folder, TWO)


def test_folder_cases_refuses_an_empty_folder(tmp_path):
    folder = touch(tmp_path / "unl", ".hidden")
    with pytest.raises(FastkdError, match=re.escape("no images named <case>_0000.nii.gz")):
        folder_cases(folder, ONE)


def test_folder_cases_refuses_what_is_not_a_folder(tmp_path):
    (tmp_path / "file_0000.nii.gz").write_bytes(b"")
    for path in (tmp_path / "file_0000.nii.gz", tmp_path / "missing"):
        with pytest.raises(FastkdError, match=re.escape(f"dataset.unlabelled: {path} is not a folder")):
            folder_cases(path, ONE)


# -- check_case_ids and _duplicates ------------------------------------------------------------------------


def test_check_case_ids_passes_new_ids():
    check_case_ids(["u1", "u2"], ["t1", "t2"], ["s1"])
    check_case_ids({}, ["t1"], [])


@pytest.mark.parametrize("what, training, test", [("training", ["a", "dup"], ["s"]), ("test", ["a"], ["s", "dup"])])
def test_check_case_ids_refuses_a_training_or_test_id(what, training, test):
    with pytest.raises(FastkdError) as info:
        check_case_ids(["dup", "new"], training, test)
    message = str(info.value)
    assert f"1 image(s) have the id of a {what} case (dup)" in message
    assert "new" not in message


def test_duplicates_finds_a_byte_identical_copy_under_another_name(tmp_path):
    references = [tmp_path / "imagesTr" / "t_000_0000.nii.gz", tmp_path / "imagesTr" / "t_001_0000.nii.gz"]
    references[0].parent.mkdir()
    references[0].write_bytes(b"training image zero")
    references[1].write_bytes(b"the other training image")
    unl = tmp_path / "unl"
    unl.mkdir()
    (unl / "copy_0000.nii.gz").write_bytes(references[1].read_bytes())
    (unl / "same_size_0000.nii.gz").write_bytes(b"training image ZERO")  # the size of references[0], other bytes
    (unl / "other_0000.nii.gz").write_bytes(b"unrelated")
    images = {case: [unl / f"{case}_0000.nii.gz"] for case in ("copy", "same_size", "other")}
    assert (unl / "same_size_0000.nii.gz").stat().st_size == references[0].stat().st_size
    assert _duplicates(images, references) == [f"copy: copy_0000.nii.gz is the same file as {references[1]}"]
    assert _duplicates(images, []) == []


def test_reference_images_are_the_training_and_test_images(tmp_path):
    raw = tmp_path / "Dataset950_Ref"
    touch(raw / "imagesTr", "a_0000.nii.gz", "b_0000.nii.gz", "notes.txt")
    touch(tmp_path / "test", "t_0000.nii.gz")
    assert reference_images(raw, tmp_path / "test", ONE) == [raw / "imagesTr" / "a_0000.nii.gz",
                                                             raw / "imagesTr" / "b_0000.nii.gz",
                                                             tmp_path / "test" / "t_0000.nii.gz"]
    assert reference_images(raw, None, ONE) == [raw / "imagesTr" / "a_0000.nii.gz", raw / "imagesTr" / "b_0000.nii.gz"]


# -- parse time: the config's unlabelled images ------------------------------------------------------------


@pytest.fixture(scope="module")
def labelled_raw(tmp_path_factory) -> Path:
    """A real raw dataset (the demo's files) with two unlabelled images in imagesUnlabelled/."""
    raw = tmp_path_factory.mktemp("labelled") / "Dataset950_Unl"
    make_demo_dataset(raw, n_cases=5, n_test=1, n_unlabelled=2, shape=(16, 16, 16))
    return raw


@pytest.mark.parametrize("n_channels", [1, 2])
def test_demo_unlabelled_images_are_known_from_the_config(tmp_path, n_channels):
    config = validate_config({"dataset": {"demo": {"n_unlabelled": 2, "n_channels": n_channels}}}, base_dir=tmp_path)
    raw = tmp_path / "nnUNet_raw" / "Dataset900_FastkdDemo"
    assert unlabelled_source(config, raw) == raw / "imagesUnlabelled"
    assert unlabelled_images(config, raw) == {
        c: [raw / "imagesUnlabelled" / f"{c}_{ch:04d}.nii.gz" for ch in range(n_channels)]
        for c in ("demo_unl_000", "demo_unl_001")}


def test_no_unlabelled_images_without_any(tmp_path, labelled_raw):
    for override in ({}, {"dataset": {"raw": str(labelled_raw)}}):
        config = validate_config(override, base_dir=tmp_path)
        assert unlabelled_source(config, labelled_raw) is None
        assert unlabelled_images(config, labelled_raw) == {}


def test_a_real_datasets_unlabelled_folder(tmp_path, labelled_raw):
    folder = labelled_raw / "imagesUnlabelled"
    config = validate_config({"dataset": {"raw": str(labelled_raw), "unlabelled": str(folder)}}, base_dir=tmp_path)
    assert unlabelled_source(config, labelled_raw) == folder
    assert unlabelled_images(config, labelled_raw) == {
        "demo_unl_000": [folder / "demo_unl_000_0000.nii.gz"], "demo_unl_001": [folder / "demo_unl_001_0000.nii.gz"]}


def test_the_demo_refuses_dataset_unlabelled(tmp_path):
    touch(tmp_path / "unl", "a_0000.nii.gz")
    with pytest.raises(ConfigError) as info:
        validate_config({"dataset": {"unlabelled": str(tmp_path / "unl")}}, base_dir=tmp_path)
    assert "with dataset.raw 'demo'" in str(info.value) and "dataset.demo.n_unlabelled" in str(info.value)


def test_a_badly_named_unlabelled_file_is_refused_at_parse_time(tmp_path, labelled_raw):
    folder = touch(tmp_path / "unl", "a_0000.nii.gz", "scan-17.nii.gz")
    with pytest.raises(ConfigError) as info:
        validate_config({"dataset": {"raw": str(labelled_raw), "unlabelled": "unl"}}, base_dir=tmp_path)
    assert "scan-17.nii.gz: not named <case>_<channel:04d>.nii.gz" in str(info.value)
    assert str(folder) in str(info.value)  # the relative folder, resolved against base_dir
    with pytest.raises(ConfigError, match="is not a folder"):
        validate_config({"dataset": {"raw": str(labelled_raw), "unlabelled": "nowhere"}}, base_dir=tmp_path)


# -- preprocessing for real --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict:
    """A 5-case demo dataset with 3 unlabelled images, planned and preprocessed by nnU-Net (3d_fullres), and
    its unlabelled images preprocessed once: {"raw", "folders", "plans", "dataset_json", "training", "test",
    "manifest", "result", "out"}."""
    from fastkd import nnunet
    from fastkd.cases import held_out_cases

    tmp = tmp_path_factory.mktemp("prepared")
    raw = tmp / "raw" / DS
    make_demo_dataset(raw, n_cases=5, n_test=1, n_unlabelled=3)
    folders = {key: str(tmp / key) for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}, **folders,
           "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", PLAN, str(raw), str(tmp / "labelled.json")], env=env, check=False,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    plans = run.stdout.strip().splitlines()[-1]
    dataset_json = nnunet.read_dataset_json(raw)
    training, test = nnunet.raw_case_ids(raw), held_out_cases(raw / "imagesTs", dataset_json)
    assert (len(training), test) == (5, ["demo_test_000"])
    with pytest.MonkeyPatch.context() as mp:
        _point_nnunet_at(mp, folders)
        result = preprocess_unlabelled(raw / "imagesUnlabelled", DS, plans, "3d_fullres", tmp / "unlabelled.json",
                                       references=reference_images(raw, raw / "imagesTs", dataset_json),
                                       training_cases=training, test_cases=test, progress=False)
    out = Path(folders["nnUNet_preprocessed"]) / DS / result["folder"]
    return {"raw": raw, "folders": folders, "plans": plans, "dataset_json": dataset_json, "training": training,
            "test": test, "manifest": tmp / "unlabelled.json", "result": result, "out": out}


def _point_nnunet_at(mp: pytest.MonkeyPatch, folders: dict) -> None:
    """nnU-Net's folders in the environment, and in nnunetv2.paths (which read the environment at import)."""
    import nnunetv2.paths

    for key, value in folders.items():
        mp.setenv(key, value)
        mp.setattr(nnunetv2.paths, key, value)


@pytest.fixture
def nnunet_folders(prepared, monkeypatch) -> dict:
    _point_nnunet_at(monkeypatch, prepared["folders"])
    return prepared


def run_again(prepared: dict, manifest: Path, source: Path | None = None) -> dict:
    """preprocess_unlabelled on the prepared dataset, with its training and test cases as references."""
    raw = prepared["raw"]
    return preprocess_unlabelled(source or raw / "imagesUnlabelled", DS, prepared["plans"], "3d_fullres", manifest,
                                 references=reference_images(raw, raw / "imagesTs", prepared["dataset_json"]),
                                 training_cases=prepared["training"], test_cases=prepared["test"],
                                 progress=False)


def copy_of_source(prepared: dict, tmp_path: Path) -> Path:
    source = tmp_path / "unl"
    shutil.copytree(prepared["raw"] / "imagesUnlabelled", source)
    return source


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_manifest_lists_every_case_with_its_preprocessed_shape(prepared):
    import blosc2

    result, out = prepared["result"], prepared["out"]
    assert json.loads(prepared["manifest"].read_text()) == result
    plans = json.loads((Path(prepared["folders"]["nnUNet_preprocessed"]) / DS / f"{prepared['plans']}.json").read_text())
    data_identifier = plans["configurations"]["3d_fullres"]["data_identifier"]
    assert result["unlabelled"] is True and result["preprocessed_now"] == 3
    assert result["folder"] == f"{PREPROCESSED_FOLDER}/{data_identifier}" == f"fastkd_unlabelled/{data_identifier}"
    assert (result["dataset_name"], result["plans_name"], result["configuration"]) == (DS, prepared["plans"],
                                                                                       "3d_fullres")
    assert result["data_identifier"] == data_identifier
    assert result["spacing"] == plans["configurations"]["3d_fullres"]["spacing"]
    assert result["source"] == str((prepared["raw"] / "imagesUnlabelled").resolve())
    assert sorted(result["cases"]) == UNLABELLED
    for case in UNLABELLED:
        assert result["cases"][case]["shape"] == list(blosc2.open(str(out / f"{case}.b2nd"), mode="r").shape)
        assert len(result["cases"][case]["shape"]) == 4
    # nnU-Net's own split and training folder know nothing of them
    split = json.loads((Path(prepared["folders"]["nnUNet_preprocessed"]) / DS / "splits_final.json").read_text())
    assert not {c for fold in split for c in fold["train"] + fold["val"]} & set(UNLABELLED)
    assert not list((out.parents[1] / data_identifier).glob("demo_unl_*"))


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_layout_is_nnunets_and_records_the_sources_and_plans(prepared):
    out = prepared["out"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [RECORDS] + [f"{c}{s}" for c in UNLABELLED for s in (".b2nd", "_seg.b2nd", ".pkl")])
    plans_file = Path(prepared["folders"]["nnUNet_preprocessed"]) / DS / f"{prepared['plans']}.json"
    for case in UNLABELLED:
        image = prepared["raw"] / "imagesUnlabelled" / f"{case}_0000.nii.gz"
        assert json.loads((out / RECORDS / f"{case}.json").read_text()) == {
            "sources": {image.name: sha(image)}, "plans_sha256": sha(plans_file)}


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_nnunets_dataset_class_loads_an_unlabelled_case_without_a_label(prepared):
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    out = prepared["out"]
    dataset_class = infer_dataset_class(str(out))
    dataset = dataset_class(str(out))
    assert sorted(dataset.identifiers) == UNLABELLED
    data, seg, seg_prev, properties = dataset.load_case("demo_unl_001")
    assert list(data.shape) == prepared["result"]["cases"]["demo_unl_001"]["shape"] and seg_prev is None
    assert seg.shape[1:] == data.shape[1:]
    values = set(np.unique(np.asarray(seg[:])).tolist())
    assert values <= {0, -1} and 0 in values  # 0 inside the nonzero mask, -1 outside: no label
    assert np.isfinite(np.asarray(data[:])).all()
    assert "class_locations" not in properties and "spacing" in properties
    with open(out / "demo_unl_002.pkl", "rb") as f:
        assert "class_locations" not in pickle.load(f)


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_an_unlabelled_image_is_preprocessed_exactly_like_a_training_image(scratch_dataset, nnunet_folders,
                                                                           tmp_path):
    """A copy of a training image, with no references to refuse it, comes out as nnU-Net's training case."""
    import blosc2

    source = tmp_path / "unl"
    source.mkdir()
    shutil.copy(nnunet_folders["raw"] / "imagesTr" / "demo_003_0000.nii.gz", source / "copy_0000.nii.gz")
    result = preprocess_unlabelled(source, DS, nnunet_folders["plans"], "3d_fullres", tmp_path / "m.json",
                                   progress=False)
    assert result["preprocessed_now"] == 1
    training = Path(nnunet_folders["folders"]["nnUNet_preprocessed"]) / DS / result["data_identifier"] / "demo_003.b2nd"
    mine = scratch_dataset / result["folder"] / "copy.b2nd"
    np.testing.assert_array_equal(blosc2.open(str(mine), mode="r")[:], blosc2.open(str(training), mode="r")[:])
    assert not (nnunet_folders["out"] / "copy.b2nd").exists()


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_a_second_run_preprocesses_nothing(nnunet_folders, tmp_path):
    out = nnunet_folders["out"]
    before = mtimes(out)
    result = run_again(nnunet_folders, tmp_path / "again.json")
    assert result["preprocessed_now"] == 0
    assert mtimes(out) == before
    assert result["cases"] == nnunet_folders["result"]["cases"]
    assert json.loads((tmp_path / "again.json").read_text()) == result


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_a_case_without_its_record_is_preprocessed_again(nnunet_folders, tmp_path):
    out = nnunet_folders["out"]
    before = mtimes(out)
    record = out / RECORDS / "demo_unl_001.json"
    kept = record.read_text()
    record.unlink()
    result = run_again(nnunet_folders, tmp_path / "again.json")
    assert result["preprocessed_now"] == 1
    after = mtimes(out)
    assert after["demo_unl_001.b2nd"] != before["demo_unl_001.b2nd"]
    assert {k: v for k, v in after.items() if "demo_unl_001" not in k} == \
           {k: v for k, v in before.items() if "demo_unl_001" not in k}
    assert record.read_text() == kept
    assert result["cases"] == nnunet_folders["result"]["cases"]


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_a_copy_of_a_training_image_is_refused(nnunet_folders, tmp_path):
    source = copy_of_source(nnunet_folders, tmp_path)
    training_image = nnunet_folders["raw"] / "imagesTr" / "demo_000_0000.nii.gz"
    shutil.copy(training_image, source / "dup_000_0000.nii.gz")
    with pytest.raises(FastkdError) as info:
        run_again(nnunet_folders, tmp_path / "new.json", source=source)
    message = str(info.value)
    assert "1 image(s) duplicate a training or test image" in message
    assert f"dup_000: dup_000_0000.nii.gz is the same file as {training_image.resolve()}" in message
    assert "demo_unl" not in message.replace(str(source), "")
    assert not (tmp_path / "new.json").exists()
    assert not list(nnunet_folders["out"].rglob("*dup_000*"))


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_a_copy_of_a_test_image_is_refused(nnunet_folders, tmp_path):
    source = copy_of_source(nnunet_folders, tmp_path)
    shutil.copy(nnunet_folders["raw"] / "imagesTs" / "demo_test_000_0000.nii.gz", source / "again_0000.nii.gz")
    with pytest.raises(FastkdError, match="again: again_0000.nii.gz is the same file as .*demo_test_000_0000.nii.gz"):
        run_again(nnunet_folders, tmp_path / "new.json", source=source)
    assert not (tmp_path / "new.json").exists()


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_an_unlabelled_image_with_a_training_cases_id_is_refused(nnunet_folders, tmp_path):
    source = copy_of_source(nnunet_folders, tmp_path)
    shutil.copy(source / "demo_unl_000_0000.nii.gz", source / "demo_001_0000.nii.gz")  # not the training image
    with pytest.raises(FastkdError, match=re.escape("have the id of a training case (demo_001)")):
        run_again(nnunet_folders, tmp_path / "new.json", source=source)
    assert not (tmp_path / "new.json").exists()
    assert not list(nnunet_folders["out"].rglob("demo_001*"))


@pytest.fixture
def scratch_dataset(nnunet_folders, tmp_path, monkeypatch) -> Path:
    """nnUNet_preprocessed/<DS> holding only the prepared dataset's plans and dataset.json, for runs that must
    not touch its unlabelled folder; returns that folder."""
    import nnunetv2.paths

    scratch = tmp_path / "preprocessed"
    (scratch / DS).mkdir(parents=True)
    for name in (f"{nnunet_folders['plans']}.json", "dataset.json"):
        shutil.copy(Path(nnunet_folders["folders"]["nnUNet_preprocessed"]) / DS / name, scratch / DS)
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_preprocessed", str(scratch))
    return scratch / DS


def write_image(path: Path, array: np.ndarray) -> None:
    """A float32 NIfTI at 1 mm (2-D, 3-D or 4-D)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.float32), np.eye(4)), path)


def assert_refused(nnunet_folders, tmp_path: Path, message: str) -> None:
    """Preprocessing the images in ``tmp_path/unl`` fails naming the case, and writes no manifest."""
    with pytest.raises(FastkdError, match=re.escape(message)):
        preprocess_unlabelled(tmp_path / "unl", DS, nnunet_folders["plans"], "3d_fullres", tmp_path / "m.json",
                              progress=False)
    assert not (tmp_path / "m.json").exists()


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_channels_of_another_shape_are_refused(scratch_dataset, nnunet_folders, tmp_path):
    dataset_json = json.loads((scratch_dataset / "dataset.json").read_text())
    dataset_json["channel_names"] = {"0": "a", "1": "b"}
    (scratch_dataset / "dataset.json").write_text(json.dumps(dataset_json))
    rng = np.random.default_rng(0)
    write_image(tmp_path / "unl" / "odd_0000.nii.gz", rng.random((16, 16, 16)))
    write_image(tmp_path / "unl" / "odd_0001.nii.gz", rng.random((16, 16, 12)))
    assert_refused(nnunet_folders, tmp_path, "dataset.unlabelled: odd: its channels differ in shape")


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_an_unreadable_image_is_refused_naming_it(scratch_dataset, nnunet_folders, tmp_path):
    (tmp_path / "unl").mkdir()
    (tmp_path / "unl" / "junk_0000.nii.gz").write_bytes(b"not a nifti file")
    assert_refused(nnunet_folders, tmp_path, "dataset.unlabelled: junk: cannot read ")


# Was a bug (fixed in fastkd/unlabelled.py, _check_geometry): nnU-Net's SimpleITKIO reads a 2-D image as a 3-D one of one
# slice (spacing 999 x the largest along the new axis), so the "dimensions of the training images" check
# (len(shape) == n_dims) never sees a 2-D image: it is preprocessed with the 3-D plans into a 999-slice volume
# ([1, 999, 40, 32] for a 32 x 40 slice at 1 mm). This test pins the fix.
@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_a_2d_image_in_a_3d_dataset_is_refused(scratch_dataset, nnunet_folders, tmp_path):
    write_image(tmp_path / "unl" / "flat_0000.nii.gz", np.random.default_rng(0).random((32, 40)))
    assert_refused(nnunet_folders, tmp_path, "dataset.unlabelled: flat: a 2-D image, the training images are 3-D")


# Was a bug (fixed in fastkd/unlabelled.py, _check_geometry): a 4-D file (several channels in one file, which SimpleITKIO
# reads as channels) passes the geometry check, which compares only the spatial shape; nnU-Net's preprocessor
# then fails with a bare "IndexError: list index out of range" (one normalization scheme per planned channel)
# instead of a FastkdError naming the case. This test pins the fix.
@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_a_4d_file_is_refused_naming_the_case(scratch_dataset, nnunet_folders, tmp_path):
    write_image(tmp_path / "unl" / "four_0000.nii.gz", np.random.default_rng(0).random((16, 16, 16, 2)))
    assert_refused(nnunet_folders, tmp_path, "dataset.unlabelled: four: ")


# -- the CLI -----------------------------------------------------------------------------------------------


def cli_args(prepared: dict, source: Path, manifest: Path) -> list[str]:
    raw = prepared["raw"]
    return ["preprocess", "unlabelled", str(source), "-d", DS, "-p", prepared["plans"], "-c", "3d_fullres",
            "--raw", str(raw), "--test-images", str(raw / "imagesTs"), "--manifest", str(manifest)]


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_cli_writes_the_manifest_and_prints_the_count(nnunet_folders, tmp_path, capsys):
    from fastkd.cli import main

    source = nnunet_folders["raw"] / "imagesUnlabelled"
    assert main(cli_args(nnunet_folders, source, tmp_path / "cli.json")) == 0
    manifest = json.loads((tmp_path / "cli.json").read_text())
    assert manifest["unlabelled"] is True and manifest["cases"] == nnunet_folders["result"]["cases"]
    out = capsys.readouterr().out
    assert re.search(rf"^3 unlabelled images of {re.escape(str(source))} preprocessed \(0 now, the rest reused\) "
                     rf"-> {re.escape(str(tmp_path / 'cli.json'))}$", out, re.MULTILINE), out


@pytest.mark.ci  # nnU-Net plans and preprocesses a demo dataset first (about 30 s)
def test_cli_reports_a_bad_folder(nnunet_folders, tmp_path, capsys):
    from fastkd.cli import main

    missing = tmp_path / "missing"
    assert main(cli_args(nnunet_folders, missing, tmp_path / "cli.json")) == 1
    err = capsys.readouterr().err
    assert f"fastkd preprocess unlabelled: error: dataset.unlabelled: {missing} is not a folder" in err
    assert not (tmp_path / "cli.json").exists()


def test_cli_refuses_a_missing_argument(capsys):
    from fastkd.cli import main

    with pytest.raises(SystemExit) as info:
        main(["preprocess", "unlabelled", "folder", "-d", DS, "-p", "nnUNetPlans", "-c", "3d_fullres"])
    assert info.value.code == 2
    assert "--raw" in capsys.readouterr().err
