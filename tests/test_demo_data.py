"""Tests for fastkd.demo_data: the synthetic nnU-Net v2 demo dataset."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from fastkd import demo_data
from fastkd.demo_data import (
    DEFAULT_N_CASES,
    DEFAULT_N_TEST,
    DEFAULT_SHAPE,
    LABELS,
    case_ids,
    demo_geometry,
    make_demo_dataset,
)


@pytest.fixture(scope="module")
def iso_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("iso") / "Dataset990_Demo"
    make_demo_dataset(out)
    return out


@pytest.fixture(scope="module")
def aniso_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("aniso") / "Dataset991_DemoAniso"
    make_demo_dataset(out, n_cases=5, anisotropic=True)
    return out


def _load(out_dir, case):
    image = nib.load(out_dir / "imagesTr" / f"{case}_0000.nii.gz")
    label = nib.load(out_dir / "labelsTr" / f"{case}.nii.gz")
    return image, label


def _arrays(out_dir, case):
    image, label = _load(out_dir, case)
    return np.asanyarray(image.dataobj), np.asanyarray(label.dataobj)


def _all_bytes(out_dir):
    files = sorted(p for p in out_dir.rglob("*") if p.is_file())
    return {p.relative_to(out_dir).as_posix(): p.read_bytes() for p in files}


def test_case_ids():
    assert case_ids(5) == ["demo_000", "demo_001", "demo_002", "demo_003", "demo_004"]
    assert case_ids(12)[:6] == case_ids(6)
    assert len(case_ids(DEFAULT_N_CASES)) == DEFAULT_N_CASES


def test_demo_geometry():
    assert demo_geometry(False) == (DEFAULT_SHAPE, (1.0, 1.0, 1.0))
    shape, spacing = demo_geometry(True)
    assert spacing == (1.0, 1.0, 3.0)
    assert shape == (32, 40, 11)  # same field of view in 3 mm slices
    # Same physical field of view within one slice.
    assert abs(shape[2] * spacing[2] - DEFAULT_SHAPE[2]) <= spacing[2]


def test_layout_and_dataset_json(iso_dir):
    ids = case_ids(DEFAULT_N_CASES)
    assert sorted(p.name for p in (iso_dir / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in ids]
    assert sorted(p.name for p in (iso_dir / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in ids]
    meta = json.loads((iso_dir / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "synthetic"}
    assert meta["labels"] == LABELS
    assert meta["numTraining"] == DEFAULT_N_CASES
    assert meta["file_ending"] == ".nii.gz"
    assert {"name", "description", "licence"} <= meta.keys()
    assert meta["fastkd_demo"] == {
        "n_cases": DEFAULT_N_CASES,
        "n_test": DEFAULT_N_TEST,
        "anisotropic": False,
        "seed": 0,
        "shape": list(DEFAULT_SHAPE),
        "spacing": [1.0, 1.0, 1.0],
    }
    # Nothing but the dataset: no temporary or moved-aside folders next to it.
    assert [p.name for p in iso_dir.parent.iterdir()] == [iso_dir.name]


def test_return_value_and_channel_name(tmp_path):
    out = tmp_path / "Dataset992_Ct"
    assert make_demo_dataset(out, n_cases=5, channel_name="CT") == case_ids(5)
    assert json.loads((out / "dataset.json").read_text())["channel_names"] == {"0": "CT"}


@pytest.mark.parametrize("anisotropic", [False, True])
def test_geometry(anisotropic, iso_dir, aniso_dir):
    out_dir = aniso_dir if anisotropic else iso_dir
    shape, spacing = demo_geometry(anisotropic)
    meta = json.loads((out_dir / "dataset.json").read_text())["fastkd_demo"]
    assert meta["shape"] == list(shape) and meta["spacing"] == list(spacing)
    for case in case_ids(meta["n_cases"]):
        image, label = _load(out_dir, case)
        assert image.shape == label.shape == shape
        assert image.header.get_data_dtype() == np.float32
        assert label.header.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.header.get_zooms(), spacing)
        np.testing.assert_array_equal(image.affine, label.affine)
        np.testing.assert_allclose(image.affine[:3, :3], np.diag(spacing))
        assert np.all(image.affine[:3, 3] != 0)
        for img in (image, label):
            assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
            np.testing.assert_allclose(img.get_qform(), img.get_sform())

        # SimpleITK is what nnU-Net reads .nii.gz with.
        s_image = sitk.ReadImage(str(out_dir / "imagesTr" / f"{case}_0000.nii.gz"))
        s_label = sitk.ReadImage(str(out_dir / "labelsTr" / f"{case}.nii.gz"))
        for s in (s_image, s_label):
            assert s.GetSize() == shape
            np.testing.assert_allclose(s.GetSpacing(), spacing)
        assert s_image.GetOrigin() == s_label.GetOrigin()
        assert s_image.GetDirection() == s_label.GetDirection()
        # RAS (nibabel) vs LPS (ITK) only flips signs.
        np.testing.assert_allclose(np.abs(s_image.GetOrigin()), np.abs(image.affine[:3, 3]))


@pytest.mark.parametrize("anisotropic", [False, True])
def test_labels(anisotropic, iso_dir, aniso_dir):
    out_dir = aniso_dir if anisotropic else iso_dir
    n_cases = json.loads((out_dir / "dataset.json").read_text())["numTraining"]
    for case in case_ids(n_cases):
        _, label = _arrays(out_dir, case)
        assert set(np.unique(label).tolist()) == {0, 1, 2}, case
        organ = int((label == LABELS["organ"]).sum())
        lesion = int((label == LABELS["lesion"]).sum())
        assert organ >= 30 and lesion >= 30, (case, organ, lesion)
        assert lesion < 0.5 * organ, (case, organ, lesion)
        # Objects are fully inside the volume: no foreground on any face.
        for axis in range(3):
            assert not label.take([0, -1], axis=axis).any(), (case, axis)


def test_intensity_contrast(iso_dir):
    threshold_errors = []
    for case in case_ids(DEFAULT_N_CASES):
        image, label = _arrays(iso_dir, case)
        assert image.dtype == np.float32 and np.isfinite(image).all()
        background = image[label == 0]
        organ = image[label == LABELS["organ"]]
        lesion = image[label == LABELS["lesion"]]
        sd = background.std()
        # Clear class contrast in every case (nominally 2.5-3.5 noise SDs per step)...
        assert organ.mean() - background.mean() > 1.0 * sd, case
        assert lesion.mean() - background.mean() > 2.0 * sd, case
        # ...but not separable by a global threshold: count errors at the midpoint threshold.
        cut = 0.5 * (np.median(organ) + np.median(background))
        threshold_errors.append(0.5 * ((organ < cut).mean() + (background > cut).mean()))
    assert np.mean(threshold_errors) > 0.05


def test_anisotropic_shows_same_anatomy(iso_dir, aniso_dir):
    iso_spacing = np.array(demo_geometry(False)[1])
    aniso_spacing = np.array(demo_geometry(True)[1])
    for case in case_ids(5):
        _, iso = _arrays(iso_dir, case)
        _, aniso = _arrays(aniso_dir, case)
        for value in (LABELS["organ"], LABELS["lesion"]):
            # Centroids in mm from the field-of-view corner.
            c_iso = (np.argwhere(iso == value) + 0.5).mean(axis=0) * iso_spacing
            c_aniso = (np.argwhere(aniso == value) + 0.5).mean(axis=0) * aniso_spacing
            assert np.linalg.norm(c_iso - c_aniso) < 1.5, (case, value, c_iso, c_aniso)
        volume_iso = (iso == LABELS["organ"]).sum() * iso_spacing.prod()
        volume_aniso = (aniso == LABELS["organ"]).sum() * aniso_spacing.prod()
        assert volume_aniso == pytest.approx(volume_iso, rel=0.1)


def test_deterministic_bytes(tmp_path, iso_dir):
    again = tmp_path / "elsewhere" / "Dataset990_Demo"
    make_demo_dataset(again)
    first, second = _all_bytes(iso_dir), _all_bytes(again)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], name
        if name.endswith(".gz"):
            # Two quick runs could share a timestamp, so check the gzip header's mtime directly.
            assert first[name][4:8] == b"\0\0\0\0", name

    other_seed = tmp_path / "Dataset993_Seed1"
    make_demo_dataset(other_seed, n_cases=5, seed=1)
    for case in case_ids(5):
        name = f"imagesTr/{case}_0000.nii.gz"
        assert (other_seed / name).read_bytes() != first[name], name


def test_case_independent_of_n_cases(tmp_path):
    six, eight = tmp_path / "six" / "Dataset994_Demo", tmp_path / "eight" / "Dataset994_Demo"
    make_demo_dataset(six, n_cases=6, seed=3)
    make_demo_dataset(eight, n_cases=8, seed=3)
    for case in case_ids(6):
        for name in (f"imagesTr/{case}_0000.nii.gz", f"labelsTr/{case}.nii.gz"):
            assert (six / name).read_bytes() == (eight / name).read_bytes(), name
    assert not (six / "imagesTr" / "demo_006_0000.nii.gz").exists()
    assert (eight / "imagesTr" / "demo_007_0000.nii.gz").exists()
    # the held-out test cases do not depend on n_cases either, and are none of the training cases
    for case in demo_data.held_out_case_ids(DEFAULT_N_TEST):
        for name in (f"imagesTs/{case}_0000.nii.gz", f"labelsTs/{case}.nii.gz"):
            assert (six / name).read_bytes() == (eight / name).read_bytes(), name
    train = {(six / f"imagesTr/{c}_0000.nii.gz").read_bytes() for c in case_ids(6)}
    assert not train & {(six / f"imagesTs/{c}_0000.nii.gz").read_bytes() for c in demo_data.held_out_case_ids(4)}


def test_no_test_cases_writes_no_test_folders(tmp_path):
    out = tmp_path / "Dataset995_Demo"
    make_demo_dataset(out, n_cases=5, n_test=0)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "imagesTr", "labelsTr"]


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        ({"n_cases": 4}, 4),
        ({"n_cases": 0}, 0),
        ({"n_cases": -3}, -3),
        ({"n_cases": 6.0}, 6.0),
        ({"n_cases": "12"}, "12"),
        ({"n_cases": True}, True),
        ({"seed": -1}, -1),
        ({"seed": 1.5}, 1.5),
        ({"seed": "0"}, "0"),
        ({"anisotropic": "yes"}, "yes"),
        ({"channel_name": ""}, ""),
    ],
)
def test_invalid_arguments(tmp_path, kwargs, bad):
    out = tmp_path / "Dataset995_Bad"
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        make_demo_dataset(out, **kwargs)
    assert repr(bad) in str(info.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("bad", [4, -1, 2.0, "5"])
def test_case_ids_invalid(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        case_ids(bad)


def test_failure_leaves_nothing_behind(tmp_path, monkeypatch):
    real_write = demo_data._write_case
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_write(*args, **kwargs)

    monkeypatch.setattr(demo_data, "_write_case", failing_write)
    parent = tmp_path / "raw"
    with pytest.raises(OSError, match="simulated"):
        make_demo_dataset(parent / "Dataset996_Demo", n_cases=5)
    assert calls == case_ids(5)[:3]
    assert list(parent.iterdir()) == []


def test_replaces_existing_dataset(tmp_path, iso_dir):
    out = tmp_path / "Dataset997_Demo"
    make_demo_dataset(out, n_cases=8, seed=5)
    (out / "stale.txt").write_text("left over from an older run")
    make_demo_dataset(out)
    assert _all_bytes(out) == _all_bytes(iso_dir)
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("anisotropic", [False, True])
def test_nnunet_accepts_dataset(anisotropic, iso_dir, aniso_dir, capfd):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out_dir = aniso_dir if anisotropic else iso_dir
    verify_dataset_integrity(str(out_dir), num_processes=1)
    # Mismatches between image and label are only printed (by worker processes), so check the output.
    output = "".join(capfd.readouterr())
    assert "verify_dataset_integrity Done" in output
    assert "Error" not in output and "Warning" not in output and "WARNING" not in output, output
