"""Tests for the demo's unlabelled images (``n_unlabelled``, ``imagesUnlabelled/``)."""

import json
import re

import nibabel as nib
import numpy as np
import pytest

from fastkd.demo import (
    DEFAULT_N_CASES,
    DEFAULT_N_TEST,
    UNLABELLED_FOLDER,
    case_ids,
    check_options,
    cli_options,
    held_out_case_ids,
    make_demo_dataset,
    organ_lesion,
    resources,
    unlabelled_case_ids,
    writer,
)

# many structures, two channels and noisy training labels, on a small grid: the atlas path of the writer
MANY = {"n_cases": 5, "n_test": 2, "shape": (32, 32, 16), "spacing": (1.5, 1.5, 3.0), "n_structures": 6,
        "n_channels": 2, "label_noise": 0.5}


def _all_bytes(out_dir):
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in files}


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "Dataset970_Demo"
    make_demo_dataset(out)
    return out


@pytest.fixture(scope="module")
def unl_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("unl") / "Dataset970_Demo"
    make_demo_dataset(out, n_unlabelled=3)
    return out


def test_unlabelled_case_ids():
    assert unlabelled_case_ids(0) == []
    assert unlabelled_case_ids(3) == ["demo_unl_000", "demo_unl_001", "demo_unl_002"]
    ids = unlabelled_case_ids(1001)
    assert ids[999:] == ["demo_unl_999", "demo_unl_1000"] and len(set(ids)) == 1001
    assert not set(ids) & set(case_ids(500)) and not set(ids) & set(held_out_case_ids(500))
    assert UNLABELLED_FOLDER == "imagesUnlabelled"


def test_layout_no_labels(unl_dir):
    assert sorted(p.name for p in unl_dir.iterdir()) == [
        "dataset.json", "imagesTr", "imagesTs", UNLABELLED_FOLDER, "labelsTr", "labelsTs"]
    assert sorted(p.name for p in (unl_dir / UNLABELLED_FOLDER).iterdir()) == [
        f"{c}_0000.nii.gz" for c in unlabelled_case_ids(3)]
    # no label of an unlabelled case anywhere
    assert [p for p in unl_dir.rglob("*demo_unl*") if p.parent.name != UNLABELLED_FOLDER] == []
    meta = json.loads((unl_dir / "dataset.json").read_text())
    assert meta["numTraining"] == DEFAULT_N_CASES
    assert meta["fastkd_demo"]["n_unlabelled"] == 3
    # the same geometry and dtype as the training images
    ref = nib.load(unl_dir / "imagesTr" / "demo_000_0000.nii.gz")
    for c in unlabelled_case_ids(3):
        img = nib.load(unl_dir / UNLABELLED_FOLDER / f"{c}_0000.nii.gz")
        assert img.shape == ref.shape and img.get_data_dtype() == np.float32
        np.testing.assert_array_equal(img.affine, ref.affine)


def test_unlabelled_drawn_like_training_cases(unl_dir):
    """Each unlabelled image is the clean training-case image of RNG index UNLABELLED_INDEX + i."""
    shape, spacing = nib.load(unl_dir / "imagesTr" / "demo_000_0000.nii.gz").shape, (1.0, 1.0, 1.0)
    for i, c in enumerate(unlabelled_case_ids(3)):
        expected, _ = organ_lesion._synthesize_case(0, writer.UNLABELLED_INDEX + i, shape, spacing)
        got = np.asanyarray(nib.load(unl_dir / UNLABELLED_FOLDER / f"{c}_0000.nii.gz").dataobj)
        np.testing.assert_array_equal(got, expected)
    assert writer.UNLABELLED_INDEX == 200_000 and writer.TEST_INDEX == 100_000


def test_training_and_test_files_unchanged(plain_dir, unl_dir):
    plain, unl = _all_bytes(plain_dir), _all_bytes(unl_dir)
    assert "n_unlabelled" not in json.loads(plain["dataset.json"])["fastkd_demo"]
    assert set(unl) - set(plain) == {f"{UNLABELLED_FOLDER}/{c}_0000.nii.gz" for c in unlabelled_case_ids(3)}
    assert set(plain) <= set(unl)
    for name in plain:
        if name != "dataset.json":
            assert unl[name] == plain[name], name
    meta = json.loads(unl["dataset.json"])
    assert meta["fastkd_demo"].pop("n_unlabelled") == 3
    assert meta == json.loads(plain["dataset.json"])
    # n_unlabelled=0 is the default demo, dataset.json included, byte for byte
    assert writer._dataset_json(DEFAULT_N_CASES, DEFAULT_N_TEST, False, 0, "synthetic", (32, 40, 32),
                                (1.0, 1.0, 1.0), {"n_structures": 2, "n_channels": 1, "regions": False,
                                                  "label_noise": 0.0, "n_unlabelled": 0}) == plain["dataset.json"].decode()


def test_unlabelled_images_differ_from_labelled(unl_dir):
    files = _all_bytes(unl_dir)
    labelled = {v for k, v in files.items() if k.startswith(("imagesTr/", "imagesTs/"))}
    unlabelled = [v for k, v in files.items() if k.startswith(f"{UNLABELLED_FOLDER}/")]
    assert len(labelled) == DEFAULT_N_CASES + DEFAULT_N_TEST and len(unlabelled) == 3
    assert len(set(unlabelled)) == 3 and not labelled & set(unlabelled)


def test_many_structures_two_channels(tmp_path):
    plain, unl = tmp_path / "plain" / "Dataset971_Many", tmp_path / "unl" / "Dataset971_Many"
    make_demo_dataset(plain, **MANY)
    make_demo_dataset(unl, **MANY, n_unlabelled=2)
    plain_files, unl_files = _all_bytes(plain), _all_bytes(unl)
    new = {f"{UNLABELLED_FOLDER}/{c}_{k:04d}.nii.gz" for c in unlabelled_case_ids(2) for k in range(2)}
    assert set(unl_files) == set(plain_files) | new
    for name in plain_files:
        if name != "dataset.json":
            assert unl_files[name] == plain_files[name], name
    meta = json.loads(unl_files["dataset.json"])
    assert meta["fastkd_demo"].pop("n_unlabelled") == 2
    assert meta == json.loads(plain_files["dataset.json"])
    labelled = {v for k, v in plain_files.items() if k.startswith(("imagesTr/", "imagesTs/"))}
    assert not labelled & {unl_files[name] for name in new} and len({unl_files[name] for name in new}) == 4
    for c in unlabelled_case_ids(2):
        ch0, ch1 = (np.asanyarray(nib.load(unl / UNLABELLED_FOLDER / f"{c}_{k:04d}.nii.gz").dataobj) for k in range(2))
        assert ch0.shape == ch1.shape == MANY["shape"] and not np.array_equal(ch0, ch1)


@pytest.mark.parametrize("bad", [-1, 1.5, "x", True, None])
def test_invalid_n_unlabelled(tmp_path, bad):
    with pytest.raises(ValueError, match=r"n_unlabelled must be an integer >= 0") as info:
        make_demo_dataset(tmp_path / "Dataset972_Bad", n_cases=5, n_unlabelled=bad)
    assert repr(bad) in str(info.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=re.escape(f"got {bad!r}")):
        unlabelled_case_ids(bad)
    with pytest.raises(ValueError, match=re.escape(f"n_unlabelled must be an integer >= 0 (unlabelled images in "
                                                   f"imagesUnlabelled/; 0: none), got {bad!r}")):
        check_options({"n_unlabelled": bad})


def test_failure_in_unlabelled_case_leaves_old_dataset(tmp_path, monkeypatch, plain_dir):
    out = tmp_path / "raw" / "Dataset970_Demo"
    make_demo_dataset(out)
    real_write = writer._write_case
    calls = []

    def failing_write(root, case_id, *args, **kwargs):
        calls.append(case_id)
        if case_id == "demo_unl_001":
            raise OSError("disk full (simulated)")
        real_write(root, case_id, *args, **kwargs)

    monkeypatch.setattr(writer, "_write_case", failing_write)
    with pytest.raises(OSError, match="simulated"):
        make_demo_dataset(out, n_unlabelled=3)
    assert calls[-2:] == ["demo_unl_000", "demo_unl_001"]
    assert _all_bytes(out) == _all_bytes(plain_dir)  # the old dataset, untouched, and no temporary folder
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_cli_flag(tmp_path, capsys):
    from fastkd.cli import main

    out = tmp_path / "Dataset973_Cli"
    assert main(["demo", "write", str(out), "--n-cases", "5", "--n-test", "1", "--n-channels", "2",
                 "--n-unlabelled", "2"]) == 0
    assert "wrote 5 demo training cases, 1 test cases and 2 unlabelled images" in capsys.readouterr().out
    assert sorted(p.name for p in (out / UNLABELLED_FOLDER).iterdir()) == [
        "demo_unl_000_0000.nii.gz", "demo_unl_000_0001.nii.gz", "demo_unl_001_0000.nii.gz", "demo_unl_001_0001.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["fastkd_demo"]["n_unlabelled"] == 2
    assert main(["demo", "write", str(tmp_path / "Dataset974_None"), "--n-cases", "5", "--n-test", "0"]) == 0
    assert "and 0 unlabelled images" in capsys.readouterr().out
    assert not (tmp_path / "Dataset974_None" / UNLABELLED_FOLDER).exists()
    with pytest.raises(SystemExit) as info:
        main(["demo", "write", str(tmp_path / "Dataset975_Bad"), "--n-unlabelled", "-1"])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "--n-unlabelled" in err and "dataset.demo.n_unlabelled" in err and "-1" in err, err
    assert not (tmp_path / "Dataset975_Bad").exists()


def test_config_reaches_the_command(tmp_path):
    from fastkd.checks import validate_config
    from fastkd.cli import build_parser
    from fastkd.config import ConfigError
    from fastkd.demo import image_options

    demo = validate_config({"dataset": {"demo": {"n_unlabelled": 7}}}, base_dir=tmp_path)["dataset"]["demo"]
    # the workflow writes them in a job of its own: demo_data's command never carries the count
    assert cli_options(demo) == "" and image_options(demo) == ""
    assert build_parser().parse_args(["demo", "unlabelled", "out", "--n-unlabelled", "7"]).n_unlabelled == 7
    assert build_parser().parse_args(["demo", "write", "out", "--n-unlabelled", "7"]).n_unlabelled == 7
    assert build_parser().parse_args(["demo", "write", "out"]).n_unlabelled == 0
    assert cli_options({"label_noise": 0.5, "n_unlabelled": 2}) == "--label-noise 0.5"
    assert image_options({"n_channels": 2, "label_noise": 0.5, "regions": True}) == "--n-channels 2"
    for bad in (-1, 1.5, "x"):
        with pytest.raises(ConfigError, match="n_unlabelled"):
            validate_config({"dataset": {"demo": {"n_unlabelled": bad}}}, base_dir=tmp_path)


def test_unlabelled_command_adds_the_same_images_and_touches_nothing_else(tmp_path):
    from fastkd.cli import main

    both, later = tmp_path / "Dataset971_Both", tmp_path / "Dataset972_Later"
    make_demo_dataset(both, n_cases=5, n_test=1, n_channels=2, n_unlabelled=3)
    make_demo_dataset(later, n_cases=5, n_test=1, n_channels=2)
    before = {p: p.stat().st_mtime_ns for p in later.rglob("*") if p.is_file()}
    main(["demo", "unlabelled", str(later), "--n-unlabelled", "3", "--n-channels", "2"])
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the labelled dataset is left alone
    written = sorted(p.name for p in (later / UNLABELLED_FOLDER).iterdir())
    assert written == sorted(p.name for p in (both / UNLABELLED_FOLDER).iterdir()) and len(written) == 6
    for name in written:
        assert (later / UNLABELLED_FOLDER / name).read_bytes() == (both / UNLABELLED_FOLDER / name).read_bytes()
    main(["demo", "unlabelled", str(later), "--n-unlabelled", "0"])
    assert not (later / UNLABELLED_FOLDER).exists() and not list(tmp_path.glob(".*tmp*"))


def test_resources_count_unlabelled_cases():
    big = {"shape": [512, 512, 300]}
    base = resources(big)
    more = resources({**big, "n_unlabelled": 100})
    assert more["mem_mb"] == base["mem_mb"]  # one case in memory at a time
    # 16 cases -> 116 cases: the runtime grows with the cases (21 -> 152 minutes, past the 10-minute floor)
    assert base["runtime"] > 10 and more["runtime"] >= 7 * base["runtime"]
    assert resources({**big, "n_unlabelled": 0}) == base
    assert resources({}) == resources({"n_unlabelled": 0}) == {"mem_mb": 2000, "runtime": 10}
    with pytest.raises(ValueError, match=re.escape("got -2")):
        resources({**big, "n_unlabelled": -2})
