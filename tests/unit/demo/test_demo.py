"""Tests for fastkd.demo: the synthetic nnU-Net v2 demo dataset."""

import json
import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from fastkd.demo import (
    DEFAULT_N_CASES,
    DEFAULT_N_TEST,
    DEFAULT_SHAPE,
    LABELS,
    case_ids,
    check_options,
    cli_options,
    dataset_labels,
    demo_geometry,
    held_out_case_ids,
    label_names,
    make_demo_dataset,
    resources,
)
from fastkd.demo import label_noise, organ_lesion, writer


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
    for case in held_out_case_ids(DEFAULT_N_TEST):
        for name in (f"imagesTs/{case}_0000.nii.gz", f"labelsTs/{case}.nii.gz"):
            assert (six / name).read_bytes() == (eight / name).read_bytes(), name
    train = {(six / f"imagesTr/{c}_0000.nii.gz").read_bytes() for c in case_ids(6)}
    assert not train & {(six / f"imagesTs/{c}_0000.nii.gz").read_bytes() for c in held_out_case_ids(4)}


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
    real_write = writer._write_case
    calls = []

    def failing_write(*args, **kwargs):
        calls.append(args[1])
        if len(calls) == 3:
            raise OSError("disk full (simulated)")
        real_write(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_case", failing_write)
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


# -- CT scale: shape, spacing, many structures, channels, regions ----------------------------------
MANY = {"n_cases": 5, "n_test": 1, "shape": (64, 64, 40), "spacing": (1.5, 1.5, 2.5), "n_structures": 40,
        "n_channels": 2, "regions": True, "channel_name": ["FLAIR", "T1c"]}
# organ + lesion in the default field of view, four BraTS-like channels and regions
PAIR = {"n_cases": 5, "n_test": 0, "n_channels": 4, "regions": True, "channel_name": ["T1", "T1c", "T2", "FLAIR"]}


@pytest.fixture(scope="module")
def many_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("many") / "Dataset985_Many"
    make_demo_dataset(out, **MANY)
    return out


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pair") / "Dataset986_Pair"
    make_demo_dataset(out, **PAIR)
    return out


def _label_manager(out_dir):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    meta = json.loads((out_dir / "dataset.json").read_text())
    return LabelManager(meta["labels"], meta.get("regions_class_order"))


def test_many_layout_and_dataset_json(many_dir):
    meta = json.loads((many_dir / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "FLAIR", "1": "T1c"}
    assert meta["fastkd_demo"] == {"n_cases": 5, "n_test": 1, "anisotropic": False, "seed": 0, "shape": [64, 64, 40],
                                   "spacing": [1.5, 1.5, 2.5], "n_structures": 40, "n_channels": 2, "regions": True}
    assert meta["regions_class_order"] == list(range(1, 41))
    assert meta["labels"]["background"] == 0 and meta["labels"]["organ_040"] == 40
    assert meta["labels"]["labels_001_to_040"] == list(range(1, 41))
    assert meta["labels"]["labels_039_to_040"] == [39, 40]
    assert len(meta["labels"]) == 41
    ids = case_ids(5)
    assert sorted(p.name for p in (many_dir / "imagesTr").iterdir()) == [f"{c}_{i:04d}.nii.gz" for c in ids for i in (0, 1)]
    assert sorted(p.name for p in (many_dir / "imagesTs").iterdir()) == ["demo_test_000_0000.nii.gz",
                                                                         "demo_test_000_0001.nii.gz"]
    for case in ids:
        label = nib.load(many_dir / "labelsTr" / f"{case}.nii.gz")
        assert label.shape == (64, 64, 40) and label.header.get_data_dtype() == np.uint8
        np.testing.assert_allclose(label.header.get_zooms(), (1.5, 1.5, 2.5))
        for i in (0, 1):
            image = nib.load(many_dir / "imagesTr" / f"{case}_{i:04d}.nii.gz")
            assert image.header.get_data_dtype() == np.float32
            np.testing.assert_array_equal(image.affine, label.affine)
        # the field of view (96 x 96 x 100 mm) is centred on the world origin; the affine maps voxel centres
        np.testing.assert_allclose(label.affine[:3, 3] - 0.5 * np.array([1.5, 1.5, 2.5]), [-48.0, -48.0, -50.0])


def test_many_structures_present_and_varied(many_dir):
    volumes = []
    for case in case_ids(5) + ["demo_test_000"]:
        folder = "labelsTs" if case.startswith("demo_test") else "labelsTr"
        label = np.asanyarray(nib.load(many_dir / folder / f"{case}.nii.gz").dataobj)
        counts = np.bincount(label.ravel(), minlength=41)
        assert len(counts) == 41, case  # no value above 40
        assert (counts[1:] > 0).all(), (case, np.flatnonzero(counts[1:] == 0) + 1)  # every structure, every case
        assert 0.1 < counts[1:].sum() / label.size < 0.35, case
        for axis in range(3):
            assert not label.take([0, -1], axis=axis).any(), (case, axis)  # inside the field of view
        volumes.append(counts[1:])
    volumes = np.array(volumes)
    # a few large, many small: a wide range, label 1 the largest on average, the last ones small
    assert volumes.max() > 1000 and volumes.min() >= 5
    assert np.median(volumes.max(axis=1) / volumes.min(axis=1)) > 20
    mean = volumes.mean(axis=0)
    assert mean[:5].mean() > 5 * mean[-5:].mean()
    assert (mean > 2 * np.median(mean)).sum() >= 2


def test_many_intensities_per_structure_and_channel(many_dir):
    deltas = []
    for case in case_ids(5):
        label = np.asanyarray(nib.load(many_dir / "labelsTr" / f"{case}.nii.gz").dataobj)
        per_channel = []
        for i in (0, 1):
            image = np.asanyarray(nib.load(many_dir / "imagesTr" / f"{case}_{i:04d}.nii.gz").dataobj)
            assert np.isfinite(image).all()
            background = image[label == 0]
            sums = np.bincount(label.ravel(), weights=image.ravel(), minlength=41)
            means = sums[1:] / np.bincount(label.ravel(), minlength=41)[1:]
            per_channel.append((means - background.mean()) / background.std())
        deltas.append(per_channel)
    deltas = np.array(deltas)  # (case, channel, structure), in background SDs
    # contrast of the order of the noise: learnable, not trivial
    assert 0.8 < np.median(np.abs(deltas)) < 4.0
    # the same structure keeps its intensity from case to case (like an organ's CT number) ...
    assert np.corrcoef(deltas[0, 0], deltas[1, 0])[0, 1] > 0.8
    # ... while the two channels show it with different contrasts
    assert np.corrcoef(deltas[0, 0], deltas[0, 1])[0, 1] < 0.8


def test_region_labels_round_trip(many_dir, pair_dir):
    for out_dir, n in ((many_dir, 40), (pair_dir, 2)):
        manager = _label_manager(out_dir)
        assert manager.has_regions and manager.num_segmentation_heads == n
        label = np.asanyarray(nib.load(out_dir / "labelsTr" / "demo_000.nii.gz").dataobj)
        regions = np.stack([np.isin(label, r) for r in manager.foreground_regions]).astype(np.float32)
        import torch

        back = np.asarray(manager.convert_probabilities_to_segmentation(torch.from_numpy(regions)))
        np.testing.assert_array_equal(back, label)  # regions_class_order gives the label map back exactly
    assert json.loads((pair_dir / "dataset.json").read_text())["labels"] == {
        "background": 0, "labels_001_to_002": [1, 2], "lesion": 2}


def test_pair_channels_keep_the_default_image(pair_dir, iso_dir):
    meta = json.loads((pair_dir / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "T1", "1": "T1c", "2": "T2", "3": "FLAIR"}
    assert meta["fastkd_demo"]["shape"] == list(DEFAULT_SHAPE)
    for case in case_ids(5):
        # channel 0 and the label map are the default demo's, byte for byte
        assert (pair_dir / f"imagesTr/{case}_0000.nii.gz").read_bytes() == (iso_dir / f"imagesTr/{case}_0000.nii.gz").read_bytes()
        assert (pair_dir / f"labelsTr/{case}.nii.gz").read_bytes() == (iso_dir / f"labelsTr/{case}.nii.gz").read_bytes()
        label = np.asanyarray(nib.load(pair_dir / "labelsTr" / f"{case}.nii.gz").dataobj)
        images = [np.asanyarray(nib.load(pair_dir / "imagesTr" / f"{case}_{i:04d}.nii.gz").dataobj) for i in range(4)]
        assert len({im.tobytes() for im in images}) == 4
        for image in images[1:]:
            background = image[label == 0]
            for value in (1, 2):
                # nominally 1.5-4 SDs, less after partial-volume blurring of the small structures
                assert abs(image[label == value].mean() - background.mean()) > 0.5 * background.std(), (case, value)


def test_explicit_defaults_give_the_default_demo(tmp_path, iso_dir, aniso_dir):
    same = tmp_path / "same" / "Dataset990_Demo"
    make_demo_dataset(same, shape=DEFAULT_SHAPE, spacing=(1, 1, 1), n_structures=2, n_channels=1, regions=False,
                      channel_name=["synthetic"])
    assert _all_bytes(same) == _all_bytes(iso_dir)
    aniso = tmp_path / "aniso" / "Dataset991_DemoAniso"
    make_demo_dataset(aniso, n_cases=5, spacing=(1.0, 1.0, 3.0))  # = anisotropic=True, but for the record
    got, expected = _all_bytes(aniso), _all_bytes(aniso_dir)
    meta, expected_meta = (json.loads(files.pop("dataset.json")) for files in (got, expected))
    assert got == expected
    assert meta["fastkd_demo"] == {**expected_meta["fastkd_demo"], "anisotropic": False}


def test_new_options_deterministic(tmp_path, many_dir):
    again = tmp_path / "again" / "Dataset985_Many"
    make_demo_dataset(again, **MANY)
    assert _all_bytes(again) == _all_bytes(many_dir)
    # another seed: other anatomy; training cases do not depend on n_cases or n_test
    other = tmp_path / "other" / "Dataset985_Many"
    make_demo_dataset(other, **{**MANY, "seed": 1, "n_cases": 6, "n_test": 0})
    assert (other / "labelsTr/demo_000.nii.gz").read_bytes() != (many_dir / "labelsTr/demo_000.nii.gz").read_bytes()
    more = tmp_path / "more" / "Dataset985_Many"
    make_demo_dataset(more, **{**MANY, "n_cases": 6, "n_test": 0})
    for case in case_ids(5):
        for name in (f"imagesTr/{case}_0000.nii.gz", f"imagesTr/{case}_0001.nii.gz", f"labelsTr/{case}.nii.gz"):
            assert (more / name).read_bytes() == (many_dir / name).read_bytes(), name


def test_pair_at_any_shape_and_spacing(tmp_path):
    out = tmp_path / "Dataset987_Big"
    make_demo_dataset(out, n_cases=5, n_test=0, shape=(80, 96, 24), spacing=(0.8, 0.8, 2.5), channel_name="CT")
    again = tmp_path / "again" / "Dataset987_Big"
    make_demo_dataset(again, n_cases=5, n_test=0, shape=(80, 96, 24), spacing=(0.8, 0.8, 2.5), channel_name="CT")
    assert _all_bytes(out) == _all_bytes(again)
    meta = json.loads((out / "dataset.json").read_text())
    assert meta["labels"] == LABELS and meta["channel_names"] == {"0": "CT"}
    assert meta["fastkd_demo"]["shape"] == [80, 96, 24] and meta["fastkd_demo"]["spacing"] == [0.8, 0.8, 2.5]
    assert "n_structures" not in meta["fastkd_demo"]  # the new options at their defaults are not recorded
    scale = min(np.array([64, 76.8, 60]) / np.array(DEFAULT_SHAPE, float))  # field of view / the default's
    for case in case_ids(5):
        image, label = _arrays(out, case)
        assert image.shape == label.shape == (80, 96, 24)
        organ, lesion = ((label == v).sum() * 0.8 * 0.8 * 2.5 for v in (1, 2))
        # the default's anatomy (organ radii 7-10 mm, lesion about a third of the organ at most), scaled
        assert 0.6 * 4 / 3 * np.pi * 7**3 * scale**3 < organ + lesion < 1.3 * 4 / 3 * np.pi * 10**3 * scale**3, case
        assert 0 < lesion < organ, case
        for axis in range(3):
            assert not label.take([0, -1], axis=axis).any(), (case, axis)


@pytest.mark.parametrize(
    "kwargs, name, bad",
    [
        ({"shape": (4, 40, 32)}, "shape", (4, 40, 32)),
        ({"shape": (32, 40)}, "shape", (32, 40)),
        ({"shape": (32.0, 40, 32)}, "shape", (32.0, 40, 32)),
        ({"shape": "64"}, "shape", "64"),
        ({"shape": (32, 40, 4096)}, "shape", (32, 40, 4096)),
        ({"spacing": (0, 1, 1)}, "spacing", (0, 1, 1)),
        ({"spacing": (1, 1)}, "spacing", (1, 1)),
        ({"spacing": (1, 1, float("nan"))}, "spacing", (1, 1, float("nan"))),
        ({"spacing": (1, 1, 5)}, "spacing", (1.0, 1.0, 5.0)),  # the default field of view: 6 slices
        ({"spacing": (1, 1, 3), "anisotropic": True}, "anisotropic", (1, 1, 3)),
        ({"n_structures": 0}, "n_structures", 0),
        ({"n_structures": 251}, "n_structures", 251),
        ({"n_structures": 2.0}, "n_structures", 2.0),
        ({"n_structures": True}, "n_structures", True),
        ({"n_channels": 0}, "n_channels", 0),
        ({"n_channels": 17}, "n_channels", 17),
        ({"n_channels": "2"}, "n_channels", "2"),
        ({"regions": "yes"}, "regions", "yes"),
        ({"regions": True, "n_structures": 1}, "regions", 1),
        ({"channel_name": ["a"], "n_channels": 2}, "channel_name", ["a"]),
        ({"channel_name": ["a", "a"], "n_channels": 2}, "channel_name", ["a", "a"]),
        ({"n_structures": 120, "shape": (8, 8, 8)}, "n_structures", 120),  # no room
    ],
)
def test_invalid_new_arguments(tmp_path, kwargs, name, bad):
    with pytest.raises(ValueError, match=re.escape(name)) as info:
        make_demo_dataset(tmp_path / "Dataset995_Bad", n_cases=5, **kwargs)
    assert repr(bad) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_dataset_labels():
    assert dataset_labels() == (LABELS, None)
    labels, order = dataset_labels(3, regions=True)  # BraTS: whole tumour, tumour core, enhancing
    assert labels == {"background": 0, "labels_001_to_003": [1, 2, 3], "labels_002_to_003": [2, 3], "organ_003": 3}
    assert order == [1, 2, 3]
    assert label_names(3) == ["organ_001", "organ_002", "organ_003"]


def test_config_options_reach_the_command(tmp_path):
    from fastkd.checks import validate_config
    from fastkd.config import ConfigError

    demo = validate_config({}, base_dir=tmp_path)["dataset"]["demo"]
    assert cli_options(demo) == ""  # the default demo's command is unchanged
    assert resources(demo) == {"mem_mb": 2000, "runtime": 10}
    demo = validate_config({"dataset": {"demo": {"shape": [256, 256, 160], "spacing": [0.8, 0.8, 2.5], "n_structures": 40,
                                                 "n_channels": 2, "regions": True}}}, base_dir=tmp_path)["dataset"]["demo"]
    flags = cli_options(demo)
    assert flags == "--shape 256 256 160 --spacing 0.8 0.8 2.5 --n-structures 40 --n-channels 2 --regions"
    from fastkd.cli import build_parser

    args = build_parser().parse_args(["demo", "write", "out", *flags.split()])
    assert (args.shape, args.spacing, args.n_structures, args.n_channels, args.regions) == (
        [256, 256, 160], [0.8, 0.8, 2.5], 40, 2, True)
    with pytest.raises(ConfigError, match="give spacing or anisotropic"):
        validate_config({"dataset": {"demo": {"spacing": [1, 1, 3], "anisotropic": True}}}, base_dir=tmp_path)


def test_cli_writes_the_options(tmp_path, capsys):
    from fastkd.cli import main

    out = tmp_path / "Dataset988_Cli"
    assert main(["demo", "write", str(out), "--n-cases", "5", "--n-test", "0", "--shape", "32", "32", "16",
                 "--spacing", "1.5", "1.5", "3", "--n-structures", "6", "--n-channels", "2", "--regions"]) == 0
    meta = json.loads((out / "dataset.json").read_text())["fastkd_demo"]
    assert (meta["shape"], meta["spacing"], meta["n_structures"], meta["n_channels"], meta["regions"]) == (
        [32, 32, 16], [1.5, 1.5, 3.0], 6, 2, True)
    assert main(["demo", "write", str(tmp_path / "Dataset989_Bad"), "--spacing", "1", "1", "3", "--anisotropic"]) == 1
    assert "give spacing or anisotropic" in capsys.readouterr().err


@pytest.mark.parametrize("variant", ["many", "pair"])
def test_nnunet_accepts_region_dataset(variant, many_dir, pair_dir, capfd):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    out_dir = many_dir if variant == "many" else pair_dir
    verify_dataset_integrity(str(out_dir), num_processes=1)
    output = "".join(capfd.readouterr())
    assert "verify_dataset_integrity Done" in output
    assert "Error" not in output and "Warning" not in output and "WARNING" not in output, output


# -- label noise: noisy training labels, clean images and test labels --------------------------------
def _dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def _documented_dice():
    """{label_noise: (organ, lesion)} of the isotropic demo, from the module docstring's table."""
    rows = re.findall(r"^(\d\.\d+) +(\d\.\d+) / \d\.\d+ +(\d\.\d+) / \d\.\d+ ", label_noise.__doc__, re.M)
    return {float(s): (float(organ), float(lesion)) for s, organ, lesion in rows}


@pytest.fixture(scope="module")
def noisy_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("noisy") / "Dataset984_Noisy"
    make_demo_dataset(out, label_noise=0.5)
    return out


def test_label_noise_zero_is_the_default_demo(tmp_path, iso_dir):
    for value in (0, 0.0):
        same = tmp_path / f"zero{value}" / "Dataset990_Demo"
        make_demo_dataset(same, label_noise=value)
        assert _all_bytes(same) == _all_bytes(iso_dir)


def test_label_noise_only_in_training_labels(noisy_dir, iso_dir):
    noisy, clean = _all_bytes(noisy_dir), _all_bytes(iso_dir)
    assert noisy.keys() == clean.keys()
    for name in noisy:
        if name.startswith(("imagesTr/", "imagesTs/", "labelsTs/")):
            assert noisy[name] == clean[name], name  # the images show the clean anatomy; the test set is clean
        elif name.startswith("labelsTr/"):
            assert noisy[name] != clean[name], name
    meta, clean_meta = json.loads(noisy["dataset.json"]), json.loads(clean["dataset.json"])
    assert meta["fastkd_demo"] == {**clean_meta["fastkd_demo"], "label_noise": 0.5}
    assert "labelsTs" in meta["description"] and meta["labels"] == clean_meta["labels"] == LABELS


def test_label_noise_dice_against_clean_labels(noisy_dir, iso_dir):
    organ, lesion = [], []
    for case in case_ids(DEFAULT_N_CASES):
        _, noisy = _arrays(noisy_dir, case)
        _, clean = _arrays(iso_dir, case)
        assert set(np.unique(noisy).tolist()) <= {0, 1, 2} and noisy.dtype == np.uint8
        # contours move by two voxels at most (a shift, then the local move): every changed voxel is within a
        # voxel of the clean contour, or was lesion (a missed lesion)
        contour = np.zeros(clean.shape, dtype=bool)
        for value in (0, 1, 2):
            contour |= (clean == value) & ndimage.binary_dilation(clean != value)
        assert not ((noisy != clean) & ~ndimage.binary_dilation(contour) & (clean != 2)).any(), case
        organ.append(_dice(noisy == 1, clean == 1))
        lesion.append(_dice(noisy == 2, clean == 2) if (noisy == 2).any() else 0.0)
    assert 0.8 < np.mean(organ) < 0.9, organ
    assert np.mean(lesion) < np.mean(organ) - 0.1, lesion
    assert 0 < sum(d == 0 for d in lesion) < DEFAULT_N_CASES  # some lesions missed, not all


def test_label_noise_dice_as_documented():
    shape, spacing = demo_geometry(False)
    clean = [organ_lesion._synthesize_case(0, i, shape, spacing)[1] for i in range(40)]
    documented = _documented_dice()
    assert sorted(documented) == [0.25, 0.5, 1.0]
    organs = []
    for strength, (organ_doc, lesion_doc) in sorted(documented.items()):
        noisy = [label_noise._noisy_label(c, 0, i, 2, strength, spacing) for i, c in enumerate(clean)]
        organ = np.mean([_dice(n == 1, c == 1) for n, c in zip(noisy, clean)])
        lesion = np.mean([_dice(n == 2, c == 2) for n, c in zip(noisy, clean)])
        # the docstring's means are over 100 cases; these 40 are their first 40
        assert organ == pytest.approx(organ_doc, abs=0.03), strength
        assert lesion == pytest.approx(lesion_doc, abs=0.1), strength
        organs.append(organ)
    assert organs == sorted(organs, reverse=True)  # stronger noise, lower Dice


def test_label_noise_deterministic(tmp_path, noisy_dir):
    again = tmp_path / "again" / "Dataset984_Noisy"
    make_demo_dataset(again, label_noise=0.5)
    assert _all_bytes(again) == _all_bytes(noisy_dir)
    other = tmp_path / "other" / "Dataset984_Noisy"
    make_demo_dataset(other, n_cases=5, n_test=0, label_noise=0.3)
    for case in case_ids(5):
        name = f"labelsTr/{case}.nii.gz"
        assert (other / name).read_bytes() != (noisy_dir / name).read_bytes(), name


def test_label_noise_many_structures_by_cli(tmp_path, capsys):
    from fastkd.cli import main

    common = ["--n-cases", "5", "--n-test", "1", "--shape", "32", "32", "16", "--spacing", "1.5", "1.5", "3",
              "--n-structures", "8", "--regions"]
    clean, noisy = tmp_path / "clean" / "Dataset983_Many", tmp_path / "noisy" / "Dataset983_Many"
    assert main(["demo", "write", str(clean), *common]) == 0
    assert main(["demo", "write", str(noisy), *common, "--label-noise", "1"]) == 0
    assert json.loads((noisy / "dataset.json").read_text())["fastkd_demo"]["label_noise"] == 1.0
    clean_files, noisy_files = _all_bytes(clean), _all_bytes(noisy)
    missed = 0
    for name in clean_files:
        if name.startswith("labelsTr/"):
            a = np.asanyarray(nib.load(clean / name).dataobj)
            b = np.asanyarray(nib.load(noisy / name).dataobj)
            assert (a != b).any() and set(np.unique(b).tolist()) <= set(range(9)), name
            present = set(np.unique(b).tolist())
            missed += 8 - len(present - {0})
            # only the smallest quarter (two of eight) may be missed; the others keep some voxels
            counts = np.bincount(a.ravel(), minlength=9)[1:]
            assert {int(v) + 1 for v in np.argsort(-counts, kind="stable")[:6]} <= present, name
        elif name != "dataset.json":
            assert noisy_files[name] == clean_files[name], name
    assert missed > 0  # at label_noise 1 each small structure is missed with probability 0.5


@pytest.mark.parametrize("bad", [1.5, -0.1, "0.5", True, None, float("nan")])
def test_label_noise_invalid(tmp_path, bad):
    with pytest.raises(ValueError, match=r"label_noise must be a number from 0 to 1") as info:
        make_demo_dataset(tmp_path / "Dataset995_Bad", n_cases=5, label_noise=bad)
    assert repr(bad) in str(info.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        check_options({"label_noise": bad})


@pytest.mark.parametrize("bad", ["1.5", "-1", "abc"])
def test_label_noise_invalid_by_cli(tmp_path, capsys, bad):
    from fastkd.cli import main

    with pytest.raises(SystemExit) as info:
        main(["demo", "write", str(tmp_path / "Dataset995_Bad"), "--label-noise", bad])
    assert info.value.code != 0
    err = capsys.readouterr().err
    assert "--label-noise" in err and "dataset.demo.label_noise" in err and bad in err, err
    assert list(tmp_path.iterdir()) == []


def test_label_noise_config_reaches_the_command(tmp_path):
    from fastkd.cli import build_parser
    from fastkd.checks import validate_config
    from fastkd.config import ConfigError

    demo = validate_config({"dataset": {"demo": {"label_noise": 0.5}}}, base_dir=tmp_path)["dataset"]["demo"]
    flags = cli_options(demo)
    assert flags == "--label-noise 0.5"
    assert build_parser().parse_args(["demo", "write", "out", *flags.split()]).label_noise == 0.5
    assert build_parser().parse_args(["demo", "write", "out"]).label_noise == 0
    for bad in (2, -0.5, "high"):
        with pytest.raises(ConfigError, match="label_noise"):
            validate_config({"dataset": {"demo": {"label_noise": bad}}}, base_dir=tmp_path)
