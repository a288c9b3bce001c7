"""Writing the demo dataset: :func:`make_demo_dataset` checks the options (:mod:`fastkd.demo.options`),
draws each case (:mod:`fastkd.demo.organ_lesion`, :mod:`fastkd.demo.atlas`, :mod:`fastkd.demo.label_noise`)
and writes the images, labels and dataset.json of an nnU-Net v2 raw dataset, and optionally
unlabelled images (``n_unlabelled``).

On-disk layout (``out_dir`` is the ``DatasetXXX_Name`` folder itself)::

    out_dir/
        dataset.json                  nnU-Net v2 keys (channel_names, labels, numTraining,
                                      file_ending, name, description, licence; regions_class_order
                                      with ``regions``) plus "fastkd_demo": {n_cases, n_test,
                                      anisotropic, seed, shape, spacing}, and n_structures,
                                      n_channels, regions unless all three are the defaults,
                                      label_noise unless 0, n_unlabelled unless 0
        imagesTr/demo_000_0000.nii.gz float32 image, channel 0
        imagesTr/demo_000_0001.nii.gz channel 1 (``n_channels`` > 1), ... up to _000{n_channels - 1}
        labelsTr/demo_000.nii.gz      uint8 label map, values {0, 1, ..., n_structures}
        ...
        imagesTs/demo_test_000_0000.nii.gz   held-out test cases (``n_test``), drawn like the
        labelsTs/demo_test_000.nii.gz        training cases but never trained on: the evaluation's
        ...                                  test set
        imagesUnlabelled/demo_unl_000_0000.nii.gz  unlabelled cases (``n_unlabelled``; folder only
        imagesUnlabelled/demo_unl_000_0001.nii.gz  if > 0): every channel, like imagesTr, drawn like
        ...                                        the training cases (clean anatomy); no labels anywhere

Image and label of a case share one affine, ``diag(spacing)`` plus a non-zero origin, with qform and
sform codes set so SimpleITK (nnU-Net's reader) sees the same spacing. The same arguments produce
byte-identical files (gzip mtime is fixed, dataset.json has sorted keys), and the dataset appears at
``out_dir`` atomically, unlabelled folder included. The training and test files are the same bytes with or
without unlabelled cases (each case is drawn from its own RNG index: training i, test TEST_INDEX + i,
unlabelled UNLABELLED_INDEX + i), and so is dataset.json but for "fastkd_demo"'s n_unlabelled.

``regions`` (nnU-Net region-based training, BraTS-like; ``n_structures`` >= 2): dataset.json's
``labels`` are nested regions, ``labels_00k_to_00n`` = [k, ..., n] for k < n and label n by its
name, with ``regions_class_order`` [1, ..., n], which maps the regions back to the label map
exactly (the label files are the same as without regions).
"""

from __future__ import annotations

import gzip
import json
import numbers
import os
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from fastkd.demo.atlas import _atlas, _synthesize_many
from fastkd.demo.label_noise import _noisy_label
from fastkd.demo.options import (
    DEFAULT_N_CASES,
    DEFAULT_N_CHANNELS,
    DEFAULT_N_STRUCTURES,
    DEFAULT_N_TEST,
    DEFAULT_N_UNLABELLED,
    UNLABELLED_FOLDER,
    _check_geometry,
    _check_label_noise,
    _check_structures,
    case_ids,
    held_out_case_ids,
    unlabelled_case_ids,
)
from fastkd.demo.organ_lesion import LABELS, _synthesize_case, _synthesize_pair
from fastkd.demo.render import _channels

TEST_INDEX = 100_000  # RNG index of test case 0: far from the training cases, whatever n_cases is
UNLABELLED_INDEX = 200_000  # RNG index of unlabelled case 0: far from the training and test cases
# Corner of the field of view in world mm; non-zero so consumers cannot silently ignore the origin.
ORIGIN_MM = (-16.0, -20.0, -16.0)
# Files larger than this many voxels are gzipped at level 1 (3x faster than 6 on noisy float32, and
# as small); the default demo's are far smaller, so its files keep level 6 and their bytes.
_FAST_GZIP_VOXELS = 1 << 20


def label_names(n_structures: int = DEFAULT_N_STRUCTURES) -> list[str]:
    """Names of labels 1..n: ``organ``, ``lesion`` for 2 (the default demo), else ``organ_001``..."""
    if n_structures == DEFAULT_N_STRUCTURES:
        return [name for name in LABELS if name != "background"]
    return [f"organ_{k:03d}" for k in range(1, n_structures + 1)]


def dataset_labels(n_structures: int = DEFAULT_N_STRUCTURES, regions: bool = False) -> tuple[dict, list[int] | None]:
    """dataset.json's ``labels`` and ``regions_class_order`` (None without regions).

    Regions (nnU-Net's region-based training): region k holds labels k..n, k = 1..n, named
    ``labels_00k_to_00n`` (the last one is label n alone, under its own name), nested like BraTS's whole
    tumour, tumour core and enhancing tumour; ``regions_class_order`` [1, ..., n] turns the predicted
    regions back into the label map exactly.
    """
    names = label_names(n_structures)
    if not regions:
        return {"background": 0, **{name: k for k, name in enumerate(names, 1)}}, None
    labels = {"background": 0, names[-1]: n_structures}
    for k in range(1, n_structures):
        labels[f"labels_{k:03d}_to_{n_structures:03d}"] = list(range(k, n_structures + 1))
    # nnU-Net pairs the regions with regions_class_order in the order of the file, whose keys are sorted.
    order = [min(v) if isinstance(v, list) else v for key, v in sorted(labels.items()) if key != "background"]
    return labels, order


def _affine(spacing, origin=ORIGIN_MM) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    # ORIGIN_MM is the corner of the field of view; the affine maps voxel *centres*.
    affine[:3, 3] = np.asarray(origin) + 0.5 * np.asarray(spacing)
    return affine


def _nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(array, affine)
    # Scanner-space qform and sform agree, so SimpleITK and nibabel read the same geometry.
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    # mtime=0: gzip would otherwise embed the current time and break byte-identical reruns.
    level = 6 if array.size <= _FAST_GZIP_VOXELS else 1
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def _write_case(root: Path, case_id: str, image, label: np.ndarray | None, affine: np.ndarray,
                split: str = "Tr") -> None:
    """``image``: one array (channel 0) or a list of them, one per channel (``<case>_000c.nii.gz``).
    ``split`` "Tr", "Ts" (``images<split>``, ``labels<split>``) or "Unlabelled" (UNLABELLED_FOLDER, whose
    ``label`` must be None: nothing but the images is written)."""
    if (split == "Unlabelled") != (label is None):
        raise ValueError(f"{case_id}: split {split!r} got label {'None' if label is None else 'an array'}; "
                         f"split 'Unlabelled' takes label None, 'Tr' and 'Ts' a label array")
    images = root / (UNLABELLED_FOLDER if split == "Unlabelled" else f"images{split}")
    for c, channel in enumerate([image] if isinstance(image, np.ndarray) else image):
        (images / f"{case_id}_{c:04d}.nii.gz").write_bytes(_nifti_gz_bytes(channel, affine))
    if label is not None:
        (root / f"labels{split}" / f"{case_id}.nii.gz").write_bytes(_nifti_gz_bytes(label, affine))


def _dataset_json(n_cases: int, n_test: int, anisotropic: bool, seed: int, channel_name, shape, spacing,
                  options: dict | None = None) -> str:
    """``channel_name``: one name or a list, one per channel. ``options``: n_structures, n_channels and
    regions, recorded in "fastkd_demo" unless all are the defaults (the default demo's file is unchanged),
    label_noise, recorded (and mentioned in the description) unless 0, and n_unlabelled, recorded in
    "fastkd_demo" only (the rest of the file is the same with or without unlabelled cases) unless 0."""
    names = [channel_name] if isinstance(channel_name, str) else list(channel_name)
    n_structures = (options or {}).get("n_structures", DEFAULT_N_STRUCTURES)
    regions = bool((options or {}).get("regions", False))
    labels, regions_class_order = dataset_labels(n_structures, regions)
    if n_structures == DEFAULT_N_STRUCTURES:
        description = ("Synthetic fastkd demo: textured noisy background, a large smooth ellipsoidal organ "
                       "and a small curved tube-shaped lesion inside, touching or away from it.")
    else:
        description = (f"Synthetic fastkd demo: textured noisy background and {n_structures} structures of "
                       "log-uniform volumes (wobbly ellipsoids and curved tubes), each with its own intensity.")
    if regions:
        description += (f" Region-based labels: region k holds labels k..{n_structures}; "
                        "regions_class_order turns them back into the label map.")
    content = {
        "channel_names": {str(c): name for c, name in enumerate(names)},
        "labels": labels,
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "FastKDDemo",
        "description": description,
        "licence": "CC0-1.0",
        "fastkd_demo": {
            "n_cases": n_cases,
            "n_test": n_test,
            "anisotropic": anisotropic,
            "seed": seed,
            "shape": list(shape),
            "spacing": list(spacing),
        },
    }
    if regions_class_order is not None:
        content["regions_class_order"] = regions_class_order
    defaults = {"n_structures": DEFAULT_N_STRUCTURES, "n_channels": DEFAULT_N_CHANNELS, "regions": False}
    if options and {k: options[k] for k in defaults} != defaults:
        content["fastkd_demo"].update({k: options[k] for k in defaults})
    label_noise = (options or {}).get("label_noise", 0.0)
    if label_noise:
        content["fastkd_demo"]["label_noise"] = label_noise
        content["description"] += (f" Training labels (labelsTr) carry synthetic annotation noise (label_noise "
                                   f"{label_noise:g}); test labels (labelsTs) are clean.")
    n_unlabelled = (options or {}).get("n_unlabelled", DEFAULT_N_UNLABELLED)
    if n_unlabelled:
        content["fastkd_demo"]["n_unlabelled"] = n_unlabelled
    return json.dumps(content, indent=2, sort_keys=True) + "\n"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing whatever is there.

    The old content is renamed aside first, so out_dir is at every moment either absent, the old
    dataset or the complete new one, never half deleted.
    """
    if os.path.lexists(out_dir):
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        _remove(old)
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        _remove(old)
    else:
        os.replace(tmp, out_dir)


def _synthesizer(seed: int, shape, spacing, fov, original: bool, n_structures: int, n_channels: int):
    """``synthesize(index) -> (image or [channels], label)``: case ``index`` of the demo with these options."""
    if n_structures != DEFAULT_N_STRUCTURES:
        atlas = _atlas(seed, n_structures, fov, spacing)  # before any file: it may find no room

    def synthesize(index):
        if n_structures != DEFAULT_N_STRUCTURES:
            return _synthesize_many(seed, index, atlas, shape, spacing, fov, n_channels)
        if not original:
            return _synthesize_pair(seed, index, shape, spacing, fov, n_channels)
        image, label = _synthesize_case(seed, index, shape, spacing)
        if n_channels == 1:
            return image, label
        return [image, *_channels(seed, index, label, 2, range(1, n_channels), spacing, fov)], label

    return synthesize


def write_unlabelled_images(dataset_dir, n_unlabelled: int, anisotropic: bool = False, seed: int = 0, *,
                            shape=None, spacing=None, n_structures: int = DEFAULT_N_STRUCTURES,
                            n_channels: int = DEFAULT_N_CHANNELS) -> list[str]:
    """Write (or replace) only ``dataset_dir/imagesUnlabelled/``: the same files :func:`make_demo_dataset`
    writes there with these options, byte for byte, without touching the rest of the dataset. The folder
    appears complete or not at all (built beside it, then renamed); ``n_unlabelled`` 0 removes it.
    Returns the unlabelled case ids."""
    ids = unlabelled_case_ids(n_unlabelled)
    if not isinstance(anisotropic, (bool, np.bool_)):
        raise ValueError(f"anisotropic must be True or False, got {anisotropic!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    n_structures, n_channels, _, _ = _check_structures(n_structures, n_channels, False, "synthetic")
    shape, spacing, fov, original = _check_geometry(shape, spacing, bool(anisotropic))
    synthesize = _synthesizer(int(seed), shape, spacing, fov, original, n_structures, n_channels)
    out_dir = Path(dataset_dir).absolute() / UNLABELLED_FOLDER
    if not ids:
        _remove(out_dir)
        return ids
    affine = _affine(spacing, ORIGIN_MM if original else -0.5 * fov)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    _remove(tmp)
    try:
        (tmp / UNLABELLED_FOLDER).mkdir(parents=True)
        for i, case_id in enumerate(tqdm(ids, desc=f"demo {out_dir}", unit="case", file=sys.stderr)):
            image, _ = synthesize(UNLABELLED_INDEX + i)
            _write_case(tmp, case_id, image, None, affine, "Unlabelled")
        _publish(tmp / UNLABELLED_FOLDER, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ids


def make_demo_dataset(
    out_dir,
    n_cases: int = DEFAULT_N_CASES,
    n_test: int = DEFAULT_N_TEST,
    anisotropic: bool = False,
    seed: int = 0,
    channel_name: str | list[str] = "synthetic",
    *,
    shape=None,
    spacing=None,
    n_structures: int = DEFAULT_N_STRUCTURES,
    n_channels: int = DEFAULT_N_CHANNELS,
    regions: bool = False,
    label_noise: float = 0.0,
    n_unlabelled: int = DEFAULT_N_UNLABELLED,
) -> list[str]:
    """Write the dataset into ``out_dir`` (the DatasetXXX_Name folder itself) and return the case ids.

    ``shape`` (voxels x, y, z; None: the default 32 x 40 x 32 mm field of view at the spacing),
    ``spacing`` (mm per axis; None: 1 mm, or 1 x 1 x 3 mm with ``anisotropic``), ``n_structures``
    (foreground labels; 2 = organ + lesion), ``n_channels`` (images per case; ``channel_name`` is one
    name, suffixed ``_0``, ``_1``... for several channels, or a list of one name per channel) and
    ``regions`` (region-based dataset.json) and ``label_noise`` (0-1: annotation noise in the training
    labels only) are described in :mod:`fastkd.demo.options`, which points to the module of each; the
    defaults give the default demo, byte for byte. ``n_unlabelled`` (integer >= 0) adds that many cases
    ``demo_unl_000``... to ``imagesUnlabelled/`` (every channel, no labels), drawn like the training cases
    from RNG indices UNLABELLED_INDEX + i; the other files are the same bytes as without them, and
    dataset.json records n_unlabelled in "fastkd_demo" only. The returned ids are the training cases'.

    The dataset is built in a hidden sibling temporary folder and renamed to ``out_dir`` at the
    end, replacing any existing ``out_dir``; on failure the temporary folder is removed.
    """
    ids, test_ids, unlabelled_ids = case_ids(n_cases), held_out_case_ids(n_test), unlabelled_case_ids(n_unlabelled)
    n_cases, n_test = len(ids), len(test_ids)
    if not isinstance(anisotropic, (bool, np.bool_)):
        raise ValueError(f"anisotropic must be True or False, got {anisotropic!r}")
    anisotropic = bool(anisotropic)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    n_structures, n_channels, regions, channel_names = _check_structures(n_structures, n_channels, regions,
                                                                         channel_name)
    shape, spacing, fov, original = _check_geometry(shape, spacing, anisotropic)
    label_noise = _check_label_noise(label_noise)
    options = {"n_structures": n_structures, "n_channels": n_channels, "regions": regions, "label_noise": label_noise,
               "n_unlabelled": len(unlabelled_ids)}
    synthesize = _synthesizer(seed, shape, spacing, fov, original, n_structures, n_channels)
    out_dir = Path(out_dir).absolute()
    # The field of view is centred on the world origin (the default demo's ORIGIN_MM).
    affine = _affine(spacing, ORIGIN_MM if original else -0.5 * fov)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    _remove(tmp)  # left by an earlier, killed process that had the same pid
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        if test_ids:
            (tmp / "imagesTs").mkdir()
            (tmp / "labelsTs").mkdir()
        if unlabelled_ids:
            (tmp / UNLABELLED_FOLDER).mkdir()
        jobs = ([(i, c, "Tr") for i, c in enumerate(ids)] + [(TEST_INDEX + i, c, "Ts") for i, c in enumerate(test_ids)]
                + [(UNLABELLED_INDEX + i, c, "Unlabelled") for i, c in enumerate(unlabelled_ids)])
        for index, case_id, split in tqdm(jobs, desc=f"demo {out_dir.name}", unit="case", file=sys.stderr):
            image, label = synthesize(index)
            if split == "Tr":  # the images show the clean anatomy; only the training labels are noisy
                label = _noisy_label(label, seed, index, n_structures, label_noise, spacing)
            elif split == "Unlabelled":
                label = None  # drawn like a training case, but only its images are written
            _write_case(tmp, case_id, image, label, affine, split)
            del image, label
        (tmp / "dataset.json").write_text(
            _dataset_json(n_cases, n_test, anisotropic, seed, channel_names, shape, spacing, options),
            encoding="utf-8"
        )
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ids
