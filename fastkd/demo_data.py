"""Deterministic synthetic 3D segmentation dataset in nnU-Net v2 raw layout (the built-in demo).

The demo lets ``snakemake --cores all`` run the whole pipeline for real on a laptop CPU, so the cases
are small (32 x 40 x 32 voxels) and a 2-core machine preprocesses them and trains small nnU-Nets on
them in minutes.

On-disk layout (``out_dir`` is the ``DatasetXXX_Name`` folder itself)::

    out_dir/
        dataset.json                  nnU-Net v2 keys (channel_names, labels, numTraining,
                                      file_ending, name, description, licence) plus "fastkd_demo":
                                      {n_cases, n_test, anisotropic, seed, shape, spacing}
        imagesTr/demo_000_0000.nii.gz float32 image, one channel
        labelsTr/demo_000.nii.gz      uint8 label map, values {0, 1, 2}
        ...
        imagesTs/demo_test_000_0000.nii.gz   held-out test cases (``n_test``), drawn like the
        labelsTs/demo_test_000.nii.gz        training cases but never trained on: the evaluation's
        ...                                  test set

Geometry: voxel order (x, y, z). Isotropic variant: 32 x 40 x 32 voxels at 1 mm. Anisotropic
variant: the same physical field of view with 3 mm slices along z (32 x 40 x 11 voxels at
(1, 1, 3) mm). Image and label of a case share one affine, ``diag(spacing)`` plus a non-zero
origin, with qform and sform codes set so SimpleITK (nnU-Net's reader) sees the same spacing.

Content of a case (drawn from its own RNG, ``np.random.default_rng([seed, index])``, so case ``i``
is the same whatever ``n_cases`` is; test case ``i`` uses index ``TEST_INDEX + i``). All anatomy is defined in millimetres and all random draws
except the per-voxel white noise are independent of the voxel grid, so the anisotropic variant
shows the same anatomy sampled with thicker slices:

* background: a textured, noisy intensity (Gaussian-smoothed noise at two scales, a smooth
  multiplicative bias field and white noise), mean about 100, additive noise SD about 10;
* label 1 ("organ"): a large smooth blob, a randomly oriented ellipsoid (radii 7-10 mm) with a
  gently wobbling surface, placed fully inside the volume, 2.5-3.5 noise SDs brighter than
  background;
* label 2 ("lesion"): a short curved tube with rounded ends (radius 3.0-3.8 mm, length 12-16 mm),
  placed inside the organ, touching its surface or away from it (one third each, roughly), 2.5-3.5
  noise SDs brighter than the organ's level. It is always much smaller than the organ (a third of
  its volume at most).

The class contrasts are of the order of the noise and of the bias field, so the task is learnable
but not solved by a global threshold. The sizes and contrasts are chosen so that the demo's short
schedule teaches the teachers both structures: with radius 2.0-2.6 mm, length 8-12 mm and contrasts
of 1.8-2.5 SD, one teacher fold still had lesion Dice 0 after 120 iterations (organ 0.80), while with
these values it reached lesion Dice 0.71 after 24 iterations and 0.93 after 120 (organ 0.89). The same arguments produce byte-identical files (gzip mtime
is fixed, dataset.json has sorted keys), and the dataset appears at ``out_dir`` atomically.
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
from scipy import ndimage
from tqdm import tqdm

DEFAULT_SHAPE = (32, 40, 32)  # small: a 2-core CPU trains 5 teacher folds on it in minutes
DEFAULT_N_CASES = 12
LABELS = {"background": 0, "organ": 1, "lesion": 2}

MIN_N_CASES = 5  # nnU-Net's default split is 5-fold cross-validation
DEFAULT_N_TEST = 4
TEST_INDEX = 100_000  # RNG index of test case 0: far from the training cases, whatever n_cases is
ANISOTROPIC_SPACING = (1.0, 1.0, 3.0)
# Corner of the field of view in world mm; non-zero so consumers cannot silently ignore the origin.
ORIGIN_MM = (-16.0, -20.0, -16.0)
# Physical field of view shared by both variants; objects keep this clearance from its faces so
# they are fully covered by the anisotropic grid too (its 11 slices of 3 mm cover 33 mm).
FOV_MM = np.array(DEFAULT_SHAPE, dtype=float)
MARGIN_MM = 3.0

BACKGROUND_MEAN = 100.0
NOISE_SD = 10.0
ORGAN_RADII_MM = (7.0, 10.0)
ORGAN_WOBBLE = 0.08  # relative radial amplitude of the surface wobble
LESION_RADIUS_MM = (3.0, 3.8)
LESION_LENGTH_MM = (12.0, 16.0)
CONTRAST_SD = (2.5, 3.5)  # class contrast in units of NOISE_SD
_OUTSIDE_ATTEMPTS = 200
_CENTERLINE_POINTS = 32


def _check_n_cases(n_cases) -> int:
    if isinstance(n_cases, bool) or not isinstance(n_cases, numbers.Integral) or n_cases < MIN_N_CASES:
        raise ValueError(
            f"n_cases must be an integer >= {MIN_N_CASES} (nnU-Net's default split is 5-fold), "
            f"got {n_cases!r}"
        )
    return int(n_cases)


def case_ids(n_cases: int) -> list[str]:
    """Case identifiers ``['demo_000', 'demo_001', ...]``; pure, used at Snakemake parse time.

    Raises ValueError for the same ``n_cases`` that :func:`make_demo_dataset` rejects.
    """
    return [f"demo_{i:03d}" for i in range(_check_n_cases(n_cases))]


def held_out_case_ids(n_test: int) -> list[str]:
    """Held-out test case identifiers ``['demo_test_000', ...]``; pure, used at Snakemake parse time."""
    if isinstance(n_test, bool) or not isinstance(n_test, numbers.Integral) or n_test < 0:
        raise ValueError(f"n_test must be an integer >= 0, got {n_test!r}")
    return [f"demo_test_{i:03d}" for i in range(int(n_test))]


def demo_geometry(anisotropic: bool) -> tuple[tuple[int, int, int], tuple[float, float, float]]:
    """(shape, spacing) in (x, y, z) voxel order / mm.

    Isotropic: DEFAULT_SHAPE at 1 mm. Anisotropic: the same physical extent with 3 mm slices along
    z, i.e. (32, 40, 11) voxels at (1.0, 1.0, 3.0) mm.
    """
    if not anisotropic:
        return DEFAULT_SHAPE, (1.0, 1.0, 1.0)
    shape = tuple(int(round(n / s)) for n, s in zip(DEFAULT_SHAPE, ANISOTROPIC_SPACING))
    return shape, ANISOTROPIC_SPACING


def _affine(spacing) -> np.ndarray:
    affine = np.diag([*spacing, 1.0])
    # ORIGIN_MM is the corner of the field of view; the affine maps voxel *centres*.
    affine[:3, 3] = np.asarray(ORIGIN_MM) + 0.5 * np.asarray(spacing)
    return affine


def _unit_vector(rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal(3)
    return v / np.linalg.norm(v)


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    # Uniform rotation from a normalised Gaussian quaternion; closed form rather than a LAPACK QR
    # so the result does not depend on the BLAS build.
    q = rng.standard_normal(4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def _smooth_field(rng: np.random.Generator, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD smoothed noise on the 1 mm reference grid (the isotropic grid).

    Drawn on a fixed grid whatever the output spacing, so both variants get the same field.
    """
    field = ndimage.gaussian_filter(rng.standard_normal(DEFAULT_SHAPE), sigma_mm)
    return (field - field.mean()) / field.std()


def _voxel_centres(shape, spacing) -> np.ndarray:
    """Voxel centres in mm from the field-of-view corner, shape (*shape, 3)."""
    axes = [(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _sample(field: np.ndarray, points: np.ndarray) -> np.ndarray:
    # Reference voxel i has its centre at i + 0.5 mm.
    return ndimage.map_coordinates(field, np.moveaxis(points - 0.5, -1, 0), order=1, mode="nearest")


def _ellipsoid_q(points, centre, rotation, radii) -> np.ndarray:
    """Ellipsoidal radius: < 1 inside the ellipsoid, 1 on its surface."""
    local = (points - centre) @ rotation  # rotation maps local axes to world, so this is R^T (p - c)
    return np.sqrt(((local / radii) ** 2).sum(axis=-1))


def _centerline(rng: np.random.Generator, middle: np.ndarray, length: float, radius: float) -> np.ndarray:
    """Points along a bent tube axis (quadratic Bezier), shifted so the tube lies inside the margin."""
    direction = _unit_vector(rng)
    bend = _unit_vector(rng)
    bend -= bend.dot(direction) * direction
    bend /= np.linalg.norm(bend)
    start = middle - 0.5 * length * direction
    end = middle + 0.5 * length * direction
    control = middle + rng.uniform(0.2, 0.5) * length * bend
    t = np.linspace(0.0, 1.0, _CENTERLINE_POINTS)[:, None]
    line = (1 - t) ** 2 * start + 2 * t * (1 - t) * control + t**2 * end
    low = line.min(axis=0) - radius
    high = line.max(axis=0) + radius
    return line + np.maximum(MARGIN_MM - low, 0.0) - np.maximum(high - (FOV_MM - MARGIN_MM), 0.0)


def _draw_lesion(rng: np.random.Generator, centre, rotation, radii) -> tuple[np.ndarray, float]:
    """Tube axis and radius: inside the organ, on its surface or clear of it (one third each)."""
    radius = rng.uniform(*LESION_RADIUS_MM)
    length = rng.uniform(*LESION_LENGTH_MM)
    placement = rng.integers(3)
    if placement == 2:
        # Clear of the organ's largest possible surface by at least 1 mm: points at ellipsoidal
        # radius q are at least (q - 1 - wobble) * min(radii) mm outside it.
        clear_q = 1.0 + ORGAN_WOBBLE + (radius + 1.0) / radii.min()
        for _ in range(_OUTSIDE_ATTEMPTS):
            line = _centerline(rng, rng.uniform(MARGIN_MM, FOV_MM - MARGIN_MM), length, radius)
            if _ellipsoid_q(line, centre, rotation, radii).min() > clear_q:
                return line, radius
        # A large organ can leave no room; then the lesion touches it instead.
        placement = 1
    offset = _unit_vector(rng)
    if placement == 0:
        offset *= 0.5 * rng.uniform() ** (1 / 3)
    return _centerline(rng, centre + rotation @ (radii * offset), length, radius), radius


def _distance_to_line(points: np.ndarray, line: np.ndarray) -> np.ndarray:
    # The axis samples are < 0.5 mm apart, well below the tube radius, so point distances suffice.
    best = np.full(points.shape[:-1], np.inf)
    for p in line:
        np.minimum(best, ((points - p) ** 2).sum(axis=-1), out=best)
    return np.sqrt(best)


def _synthesize_case(seed: int, index: int, shape, spacing) -> tuple[np.ndarray, np.ndarray]:
    """(float32 image, uint8 label) of case ``index``, both of ``shape``."""
    rng = np.random.default_rng([seed, index])
    # Everything up to the white noise is drawn in mm or on the reference grid, in a fixed order,
    # so the isotropic and anisotropic variants of a case show the same anatomy.
    rotation = _random_rotation(rng)
    radii = rng.uniform(*ORGAN_RADII_MM, size=3)
    half_extent = (1.0 + ORGAN_WOBBLE) * np.sqrt(((rotation * radii) ** 2).sum(axis=1))
    centre = rng.uniform(MARGIN_MM + half_extent, FOV_MM - MARGIN_MM - half_extent)
    line, radius = _draw_lesion(rng, centre, rotation, radii)
    wobble, coarse, fine, bias = (_smooth_field(rng, s) for s in (5.0, 3.0, 1.2, 10.0))
    contrast = rng.uniform(*CONTRAST_SD, size=2)
    white = rng.standard_normal(shape)

    points = _voxel_centres(shape, spacing)
    label = np.zeros(shape, dtype=np.uint8)
    surface = 1.0 + ORGAN_WOBBLE * np.tanh(_sample(wobble, points))
    label[_ellipsoid_q(points, centre, rotation, radii) <= surface] = LABELS["organ"]
    label[_distance_to_line(points, line) <= radius] = LABELS["lesion"]

    # Class means in noise SDs; the lesion sits on top of the organ's level wherever it is.
    mean = np.select(
        [label == LABELS["organ"], label == LABELS["lesion"]], [contrast[0], contrast.sum()], 0.0
    )
    # Soft edges, like partial volume in a real scan.
    mean = ndimage.gaussian_filter(mean, 0.6 / np.asarray(spacing))
    # Texture and white noise add up to unit SD: 0.5^2 + 0.5^2 + 0.5 = 1.
    texture = 0.5 * _sample(coarse, points) + 0.5 * _sample(fine, points)
    gain = np.exp(0.04 * _sample(bias, points))
    image = gain * (BACKGROUND_MEAN + NOISE_SD * (mean + texture)) + NOISE_SD * np.sqrt(0.5) * white
    return image.astype(np.float32), label


def _nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(array, affine)
    # Scanner-space qform and sform agree, so SimpleITK and nibabel read the same geometry.
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    # mtime=0: gzip would otherwise embed the current time and break byte-identical reruns.
    return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def _write_case(root: Path, case_id: str, image: np.ndarray, label: np.ndarray, affine: np.ndarray,
                split: str = "Tr") -> None:
    (root / f"images{split}" / f"{case_id}_0000.nii.gz").write_bytes(_nifti_gz_bytes(image, affine))
    (root / f"labels{split}" / f"{case_id}.nii.gz").write_bytes(_nifti_gz_bytes(label, affine))


def _dataset_json(n_cases: int, n_test: int, anisotropic: bool, seed: int, channel_name: str, shape, spacing) -> str:
    content = {
        "channel_names": {"0": channel_name},
        "labels": dict(LABELS),
        "numTraining": n_cases,
        "file_ending": ".nii.gz",
        "name": "FastKDDemo",
        "description": (
            "Synthetic fastkd demo: textured noisy background, a large smooth ellipsoidal organ "
            "and a small curved tube-shaped lesion inside, touching or away from it."
        ),
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


def make_demo_dataset(
    out_dir,
    n_cases: int = DEFAULT_N_CASES,
    n_test: int = DEFAULT_N_TEST,
    anisotropic: bool = False,
    seed: int = 0,
    channel_name: str = "synthetic",
) -> list[str]:
    """Write the dataset into ``out_dir`` (the DatasetXXX_Name folder itself) and return the case ids.

    The dataset is built in a hidden sibling temporary folder and renamed to ``out_dir`` at the
    end, replacing any existing ``out_dir``; on failure the temporary folder is removed.
    """
    ids, test_ids = case_ids(n_cases), held_out_case_ids(n_test)
    n_cases, n_test = len(ids), len(test_ids)
    if not isinstance(anisotropic, (bool, np.bool_)):
        raise ValueError(f"anisotropic must be True or False, got {anisotropic!r}")
    anisotropic = bool(anisotropic)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    seed = int(seed)
    if not isinstance(channel_name, str) or not channel_name.strip():
        raise ValueError(f"channel_name must be a non-empty string, got {channel_name!r}")

    out_dir = Path(out_dir).absolute()
    shape, spacing = demo_geometry(anisotropic)
    affine = _affine(spacing)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    _remove(tmp)  # left by an earlier, killed process that had the same pid
    try:
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()
        if test_ids:
            (tmp / "imagesTs").mkdir()
            (tmp / "labelsTs").mkdir()
        jobs = [(i, c, "Tr") for i, c in enumerate(ids)] + [(TEST_INDEX + i, c, "Ts") for i, c in enumerate(test_ids)]
        for index, case_id, split in tqdm(jobs, desc=f"demo {out_dir.name}", unit="case", file=sys.stderr):
            image, label = _synthesize_case(seed, index, shape, spacing)
            _write_case(tmp, case_id, image, label, affine, split)
        (tmp / "dataset.json").write_text(
            _dataset_json(n_cases, n_test, anisotropic, seed, channel_name, shape, spacing), encoding="utf-8"
        )
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ids
