"""Deterministic synthetic 3D segmentation dataset in nnU-Net v2 raw layout (the built-in demo).

The demo lets ``snakemake --cores all`` run the whole pipeline for real on a laptop CPU, so the cases
are small (32 x 40 x 32 voxels) and a 2-core machine preprocesses them and trains small nnU-Nets on
them in minutes.

On-disk layout (``out_dir`` is the ``DatasetXXX_Name`` folder itself)::

    out_dir/
        dataset.json                  nnU-Net v2 keys (channel_names, labels, numTraining,
                                      file_ending, name, description, licence; regions_class_order
                                      with ``regions``) plus "fastkd_demo": {n_cases, n_test,
                                      anisotropic, seed, shape, spacing}, and n_structures,
                                      n_channels, regions unless all three are the defaults,
                                      label_noise unless 0
        imagesTr/demo_000_0000.nii.gz float32 image, channel 0
        imagesTr/demo_000_0001.nii.gz channel 1 (``n_channels`` > 1), ... up to _000{n_channels - 1}
        labelsTr/demo_000.nii.gz      uint8 label map, values {0, 1, ..., n_structures}
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

CT scale (the keyword options of :func:`make_demo_dataset`; the defaults give the demo above, byte for
byte, and the two geometries above keep being drawn by the same code):

* ``spacing`` (mm per axis, e.g. (0.8, 0.8, 2.5)) and ``shape`` (voxels, e.g. (256, 256, 200) or
  (512, 512, 300)): the field of view is ``shape * spacing`` mm, centred on the world origin; without
  ``shape`` it is the default 32 x 40 x 32 mm at the spacing. ``anisotropic`` is spacing (1, 1, 3);
  give one of the two. Anatomy is defined in mm and scales with the field of view. Everything outside
  the two original geometries is drawn box by box in float32 (no per-voxel coordinate arrays): one
  256 x 256 x 200 case with 40 structures takes about 5 s on one core (half of it gzip) and 350 MB;
  512 x 512 x 300 about 30 s and 1.7 GB. Files over 2^20 voxels are gzipped at level 1, not 6.
  Textures are drawn on the voxel grid, so grids of one field of view differ in texture.
* ``n_structures`` 2 (default): organ + lesion as above; in another geometry the default's draws in a
  field of view scaled by ``min(fov / (32, 40, 32) mm)`` (so the organ grows with it), with the organ's
  wobble drawn per structure, not from a noise field. A lesion voxel is always lesion.
* other ``n_structures`` (1-250): labels ``organ_001`` (largest) ... ``organ_<n>``, an abdomen-like
  atlas fixed per dataset (``default_rng([seed, 11, n])``): nominal volumes log-uniform over a factor
  300, together 20 % of the field of view, none above 8 % (a few large organs, many small ones); a
  quarter of them curved tubes (radius : length 1 : 5-12, vessels), the others randomly oriented
  ellipsoids (log radii SD 0.25) with a wobbly surface (10 %); each with its own intensity per channel,
  1.5-4 noise SDs from the background, darker than it for 30 % of them (fixed per dataset, like an
  organ's CT number). Placed inside the field of view (margin max(3 mm, one voxel)), preferably with
  no overlap at all (the first 100 of 300 tries per size), else at least with no other structure
  within a voxel of its anchor (centre, or middle of a tube's axis); a structure with no room shrinks
  by 0.85 and tries again (12 times, then ValueError: use a larger shape or fewer structures). Each
  case moves every structure by up to 10 % of its bounding radius, scales its radii by up to 10 %,
  redraws its wobble and varies its intensity by 0.2 SD (``default_rng([seed, index, 12, label])``).
  A voxel inside two structures goes to the one it is deeper inside (smaller normalised radius).
  Every structure is present in every case, by construction: its radii are at least a voxel diagonal
  (after the jitter), so the voxel nearest its anchor is inside it, and by the placement rule no other
  structure reaches that voxel. The size floor and the one-voxel clearance are the only places the
  grid enters the atlas, so two grids of one field of view show the same anatomy except for the
  structures these change (in a 96 x 96 x 90 mm test with 16 structures, 1 vs 1 x 1 x 3 mm: 3 moved).
* ``n_channels`` (1-16): images ``_0000`` ... showing the same label map with other contrasts: a
  contrast per structure and channel, fixed per dataset, plus per-case jitter, with the same kind of
  background (own noise per channel). Channel 0 of the default demo stays the image above.
  ``channel_name``: one name (suffixed ``_0``, ``_1``... for several channels) or a list of names.
* ``regions`` (nnU-Net region-based training, BraTS-like; ``n_structures`` >= 2): dataset.json's
  ``labels`` are nested regions, ``labels_00k_to_00n`` = [k, ..., n] for k < n and label n by its
  name, with ``regions_class_order`` [1, ..., n], which maps the regions back to the label map
  exactly (the label files are the same as without regions).

Label noise (``label_noise``, 0-1; 0, the default, writes the clean labels above, byte for byte): the
training labels (labelsTr) are drawn as a human annotator might have drawn them, so that the average of
a teacher ensemble (which averages such noise out) has something to teach a student that the labels do
not. The images show the clean anatomy, and the test labels (labelsTs) stay clean, so the evaluation
measures against the truth. The noise comes from its own random streams
(``default_rng([seed, index, 15])`` for the misses, ``[seed, index, 15, label]`` per structure), so the
clean draws are unchanged and the same options give the same bytes. With ``s = label_noise``:

* a missed small structure: each of the smallest quarter of the structures (by voxels in the case;
  at least one, never the largest; the lesion in the organ + lesion demo) is left out of a case with
  probability ``MISS_PROBABILITY * s`` (0.5 s); its voxels take the label of the nearest voxel of
  another structure or background, so a lesion inside the organ becomes organ and one away from it
  background;
* then each structure's contour, largest structure first: with probability ``SHIFT_PROBABILITY * s``
  (s) the whole contour moves one voxel out or in (equally likely, like an annotator who draws it
  bigger or smaller), then one voxel out where a smooth random field (Gaussian-smoothed noise, scale
  ``CONTOUR_SIGMA_MM`` = 3 mm, unit SD over the structure's box) is above a threshold and one voxel in
  where it is below minus that threshold, the threshold set so that each covers about a fraction
  ``CONTOUR_FRACTION * s`` (s / 2) of the contour (at s = 1 all of it moves, half out, half in). A
  contour moves only against what lies beneath the structure (background and larger structures: the
  lesion against the organ and background, the organ against background only), a structure never
  vanishes by these moves, and on anisotropic grids contours move within slices only (along axes up to
  1.5 x the finest spacing), as annotators draw slice by slice.

The moves are a voxel each whatever the spacing, so large structures at CT scale keep a high Dice. In
the default demo (organ + lesion), Dice of the noisy training labels against the clean ones, mean over
training cases 0-99 (seed 0; a missed lesion counts 0 for the lesion, and as organ voxels where it
became organ), isotropic / anisotropic:

=========== ============= ============= =========================
label_noise organ         lesion        lesion missed (expected)
=========== ============= ============= =========================
0.25        0.908 / 0.920 0.769 / 0.781 13 % (12.5 %)
0.5         0.854 / 0.872 0.545 / 0.566 32 % (25 %)
1.0         0.804 / 0.824 0.324 / 0.343 56 % (50 %)
=========== ============= ============= =========================

Where the lesion is not missed its median Dice is 0.92, 0.83 and 0.75 (isotropic).
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

# -- options beyond the default demo (CT scale, many structures, several channels, regions) ---------
DEFAULT_N_STRUCTURES = 2  # organ + lesion
DEFAULT_N_CHANNELS = 1
MIN_SHAPE, MAX_SHAPE = 8, 2048  # voxels per axis
MAX_SPACING = 20.0  # mm per axis
MAX_STRUCTURES = 250  # label values must fit the uint8 label map
MAX_CHANNELS = 16
# Many structures (n_structures != 2): nominal volumes log-uniform over a factor SIZE_RANGE, together
# FILL_FRACTION of the field of view, none above MAX_VOLUME_FRACTION of it (a few large organs, many
# small ones); TUBE_FRACTION of them are curved tubes (vessels), the others wobbly ellipsoids.
FILL_FRACTION = 0.2
SIZE_RANGE = 300.0
MAX_VOLUME_FRACTION = 0.08
TUBE_FRACTION = 0.25
TUBE_ASPECT = (5.0, 12.0)  # length / radius
TUBE_BEND = (0.1, 0.4)  # control point offset of the quadratic Bezier axis, in lengths
ELLIPSOID_ASPECT_SD = 0.25  # SD of the log radii around their geometric mean
STRUCTURE_WOBBLE = 0.1  # relative radial amplitude of an ellipsoid's surface wobble
# Per case each structure moves by up to SHIFT_JITTER of its bounding radius and its radii scale by a
# factor within [1 / (1 + SIZE_JITTER), 1 + SIZE_JITTER]; its intensity varies by CONTRAST_JITTER SD.
SHIFT_JITTER = 0.1
SIZE_JITTER = 0.1
CONTRAST_JITTER = 0.2
STRUCTURE_CONTRAST_SD = (1.5, 4.0)  # |contrast| to background, in units of NOISE_SD
NEGATIVE_CONTRAST_FRACTION = 0.3  # structures darker than the background
_WOBBLE_TERMS = 3
_PLACE_ATTEMPTS = 300  # per size; the first _STRICT_ATTEMPTS ask for no overlap at all
_STRICT_ATTEMPTS = 100
_SHRINK, _MAX_SHRINKS = 0.85, 12  # linear size factor per round of failed attempts
_LESION_PRIORITY = 10.0  # the lesion lies on top of the organ (see _claim)
# Random streams (np.random.default_rng([seed, ...])); every tag is non-zero, since trailing zeros do
# not change a SeedSequence. The default demo's case stream is [seed, index].
_STREAM_ATLAS, _STREAM_POSE, _STREAM_TEXTURE, _STREAM_CONTRAST, _STREAM_LABEL_NOISE = 11, 12, 13, 14, 15
# Label noise (label_noise > 0; training labels only): per structure, a one-voxel dilation or erosion of
# the whole contour with probability SHIFT_PROBABILITY * label_noise, then the contour moved one voxel out
# and one voxel in on about a fraction CONTOUR_FRACTION * label_noise of it each, where a random field
# smoothed at CONTOUR_SIGMA_MM is above / below a threshold; per case, each of the smallest structures
# missed with probability MISS_PROBABILITY * label_noise.
SHIFT_PROBABILITY = 1.0
CONTOUR_FRACTION = 0.5
CONTOUR_SIGMA_MM = 3.0
MISS_PROBABILITY = 0.5
# Files larger than this many voxels are gzipped at level 1 (3x faster than 6 on noisy float32, and
# as small); the default demo's are far smaller, so its files keep level 6 and their bytes.
_FAST_GZIP_VOXELS = 1 << 20


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


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _triple(value):
    """``value`` as a 3-tuple if it is a list, tuple or 1-d array of 3 items, else None."""
    if isinstance(value, np.ndarray):
        value = value.tolist() if value.ndim == 1 else None
    return tuple(value) if isinstance(value, (list, tuple)) and len(value) == 3 else None


def _check_geometry(shape, spacing, anisotropic):
    """(shape, spacing, field of view in mm, original geometry?) from the options; raises ValueError.

    ``spacing`` None: 1 mm, or ANISOTROPIC_SPACING with ``anisotropic``. ``shape`` None: the default
    32 x 40 x 32 mm field of view at that spacing. Otherwise the field of view is shape * spacing.
    The original geometry is one of :func:`demo_geometry`'s two.
    """
    if spacing is not None:
        values = _triple(spacing)
        if (values is None or not all(isinstance(s, numbers.Real) and not isinstance(s, (bool, np.bool_))
                                      and np.isfinite(s) and 0 < s <= MAX_SPACING for s in values)):
            raise ValueError(f"spacing must be 3 numbers (mm per axis x, y, z), each > 0 and <= {MAX_SPACING:g}, "
                             f"or None, got {spacing!r}")
        if anisotropic:
            raise ValueError(f"give spacing or anisotropic, not both: anisotropic=True means spacing "
                             f"{ANISOTROPIC_SPACING}, got spacing={spacing!r}")
        spacing = tuple(float(s) for s in values)
    else:
        spacing = demo_geometry(anisotropic)[1]
    default_shape = tuple(int(round(n / s)) for n, s in zip(DEFAULT_SHAPE, spacing))
    if shape is None:
        if min(default_shape) < MIN_SHAPE:
            raise ValueError(f"spacing {spacing!r} samples the default {' x '.join(map(str, DEFAULT_SHAPE))} mm "
                             f"field of view with {default_shape} voxels, fewer than {MIN_SHAPE} on an axis; give "
                             f"a finer spacing or a shape")
        shape = default_shape
    else:
        values = _triple(shape)
        if values is None or not all(_is_int(n) and MIN_SHAPE <= n <= MAX_SHAPE for n in values):
            raise ValueError(f"shape must be 3 integers (voxels along x, y, z), each from {MIN_SHAPE} to "
                             f"{MAX_SHAPE}, or None, got {shape!r}")
        shape = tuple(int(n) for n in values)
    original = (shape, spacing) in (demo_geometry(False), demo_geometry(True))
    fov = FOV_MM.copy() if shape == default_shape else np.asarray(shape, float) * np.asarray(spacing)
    return shape, spacing, fov, original


def _check_structures(n_structures, n_channels, regions, channel_name) -> tuple[int, int, bool, list[str]]:
    """Checked (n_structures, n_channels, regions, channel names); raises ValueError."""
    if not _is_int(n_structures) or not 1 <= n_structures <= MAX_STRUCTURES:
        raise ValueError(f"n_structures must be an integer from 1 to {MAX_STRUCTURES} (foreground labels of a "
                         f"uint8 label map), got {n_structures!r}")
    if not _is_int(n_channels) or not 1 <= n_channels <= MAX_CHANNELS:
        raise ValueError(f"n_channels must be an integer from 1 to {MAX_CHANNELS}, got {n_channels!r}")
    if not isinstance(regions, (bool, np.bool_)):
        raise ValueError(f"regions must be True or False, got {regions!r}")
    if regions and n_structures < 2:
        raise ValueError(f"regions=True needs n_structures >= 2 (a region of several labels), "
                         f"got n_structures={n_structures!r}")
    if isinstance(channel_name, str):
        if not channel_name.strip():
            raise ValueError(f"channel_name must be a non-empty string, got {channel_name!r}")
        names = [channel_name] if n_channels == 1 else [f"{channel_name}_{c}" for c in range(n_channels)]
    else:
        names = list(channel_name) if isinstance(channel_name, (list, tuple)) else None
        if (names is None or len(names) != n_channels or len(set(names)) != len(names)
                or not all(isinstance(n, str) and n.strip() for n in names)):
            raise ValueError(f"channel_name must be a non-empty string, or a list of n_channels={n_channels} "
                             f"distinct non-empty strings, got {channel_name!r}")
    return int(n_structures), int(n_channels), bool(regions), names


def check_options(demo: dict) -> None:
    """Check the options of config ``dataset.demo`` that depend on each other (anisotropic and spacing,
    regions and n_structures, the grid of the default field of view) and label_noise; pure, used at config
    validation. Raises ValueError as :func:`make_demo_dataset` would."""
    _check_structures(demo.get("n_structures", DEFAULT_N_STRUCTURES), demo.get("n_channels", DEFAULT_N_CHANNELS),
                      demo.get("regions", False), "synthetic")
    _check_geometry(demo.get("shape"), demo.get("spacing"), demo.get("anisotropic", False))
    _check_label_noise(demo.get("label_noise", 0))


def cli_options(demo: dict) -> str:
    """The ``fastkd demo write`` flags of config ``dataset.demo``'s CT-scale options and label_noise ('' for
    the defaults)."""
    flags = []
    for key in ("shape", "spacing"):
        if demo.get(key) is not None:
            flags += [f"--{key}", *map(str, demo[key])]
    if demo.get("n_structures", DEFAULT_N_STRUCTURES) != DEFAULT_N_STRUCTURES:
        flags += ["--n-structures", str(demo["n_structures"])]
    if demo.get("n_channels", DEFAULT_N_CHANNELS) != DEFAULT_N_CHANNELS:
        flags += ["--n-channels", str(demo["n_channels"])]
    if demo.get("regions"):
        flags.append("--regions")
    if demo.get("label_noise", 0):
        flags += ["--label-noise", repr(float(demo["label_noise"]))]
    return " ".join(flags)


def resources(demo: dict) -> dict:
    """Snakemake resources of the job that writes the demo of config ``dataset.demo``: ``mem_mb`` (a few
    float32 volumes per case and channel, measured 350 MB for 256 x 256 x 200 voxels, 1.7 GB for
    512 x 512 x 300) and ``runtime`` in minutes (measured 6 s and 31 s a case); the default demo's
    2000 MB and 10 minutes at least."""
    shape = _check_geometry(demo.get("shape"), demo.get("spacing"), demo.get("anisotropic", False))[0]
    voxels, channels = float(np.prod(shape)), int(demo.get("n_channels", DEFAULT_N_CHANNELS))
    cases = int(demo.get("n_cases", DEFAULT_N_CASES)) + int(demo.get("n_test", DEFAULT_N_TEST))
    mem_mb = max(2000, int(1000 + voxels * (24 + 4 * channels) / 1e6))
    runtime = max(10, int(np.ceil(2 * cases * voxels * (0.2 + 0.3 * channels) * 1e-6 / 60)))
    return {"mem_mb": mem_mb, "runtime": runtime}


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


def _centerline(rng: np.random.Generator, middle: np.ndarray, length: float, radius: float,
                fov=FOV_MM, margin=MARGIN_MM) -> np.ndarray:
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
    return line + np.maximum(margin - low, 0.0) - np.maximum(high - (fov - margin), 0.0)


def _draw_lesion(rng: np.random.Generator, centre, rotation, radii, fov=FOV_MM,
                 margin=MARGIN_MM) -> tuple[np.ndarray, float]:
    """Tube axis and radius: inside the organ, on its surface or clear of it (one third each)."""
    radius = rng.uniform(*LESION_RADIUS_MM)
    length = rng.uniform(*LESION_LENGTH_MM)
    placement = rng.integers(3)
    if placement == 2:
        # Clear of the organ's largest possible surface by at least 1 mm: points at ellipsoidal
        # radius q are at least (q - 1 - wobble) * min(radii) mm outside it.
        clear_q = 1.0 + ORGAN_WOBBLE + (radius + 1.0) / radii.min()
        for _ in range(_OUTSIDE_ATTEMPTS):
            line = _centerline(rng, rng.uniform(margin, fov - margin), length, radius, fov, margin)
            if _ellipsoid_q(line, centre, rotation, radii).min() > clear_q:
                return line, radius
        # A large organ can leave no room; then the lesion touches it instead.
        placement = 1
    offset = _unit_vector(rng)
    if placement == 0:
        offset *= 0.5 * rng.uniform() ** (1 / 3)
    return _centerline(rng, centre + rotation @ (radii * offset), length, radius, fov, margin), radius


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


# -- any shape, many structures, several channels ---------------------------------------------------
# The two original geometries with organ + lesion are drawn by the code above, exactly as before. All
# else is drawn by the code below, which works box by box in float32 and keeps no per-voxel coordinate
# arrays, so a case costs a few times its own size in memory.
def _box(lo, hi, shape, spacing):
    """Slices of the voxels whose centres lie in [lo, hi] (mm per axis) and those centres, or (None, None)."""
    slices, centres = [], []
    for low, high, n, s in zip(lo, hi, shape, spacing):
        i0 = max(0, int(np.ceil(low / s - 0.5)))
        i1 = min(n, int(np.floor(high / s - 0.5)) + 1)
        if i1 <= i0:
            return None, None
        slices.append(slice(i0, i1))
        centres.append((np.arange(i0, i1) + 0.5) * s)
    return tuple(slices), centres


def _offsets(centres, point) -> list[np.ndarray]:
    """The box's voxel centres minus ``point`` as three broadcastable float32 arrays (x, y, z)."""
    return [(c - p).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            for axis, (c, p) in enumerate(zip(centres, point))]


def _claim(label, best, value, slices, q, surface, priority=0.0) -> None:
    """Label the box's voxels inside the structure (``q <= surface``) ``value`` where it is the deepest:
    a voxel inside several structures goes to the smallest ``q - priority`` (``q``: normalised radius,
    0 on the axis or at the centre, 1 on the surface)."""
    key = q - np.float32(priority)
    box_best = best[slices]
    win = (q <= surface) & (key < box_best)
    label[slices][win] = value
    box_best[win] = key[win]


def _wobble(rng: np.random.Generator, amplitude: float):
    """A smooth random radial modulation of an ellipsoid's surface: (amplitude, directions, frequencies, phases)."""
    directions = rng.standard_normal((_WOBBLE_TERMS, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    return amplitude, directions, rng.uniform(2.0, 5.0, _WOBBLE_TERMS), rng.uniform(0.0, 2 * np.pi, _WOBBLE_TERMS)


def _paint_ellipsoid(label, best, value, spacing, centre, rotation, radii, wobble, priority=0.0) -> None:
    amplitude, directions, frequencies, phases = wobble
    extent = (1.0 + amplitude) * np.sqrt(((rotation * radii) ** 2).sum(axis=1))
    slices, centres = _box(centre - extent, centre + extent, label.shape, spacing)
    if slices is None:
        return
    d = _offsets(centres, centre)
    r = rotation.astype(np.float32)
    # Local coordinates in radii: the rotation maps local axes to world axes, so local = R^T d.
    n = [(d[0] * r[0, j] + d[1] * r[1, j] + d[2] * r[2, j]) / np.float32(radii[j]) for j in range(3)]
    q = np.sqrt(n[0] ** 2 + n[1] ** 2 + n[2] ** 2)
    inverse = 1.0 / np.maximum(q, np.float32(1e-6))
    g = sum(np.cos((n[0] * np.float32(u[0]) + n[1] * np.float32(u[1]) + n[2] * np.float32(u[2])) * inverse
                   * np.float32(f) + np.float32(phase)) for u, f, phase in zip(directions, frequencies, phases))
    surface = 1.0 + np.float32(amplitude) * np.tanh(g * np.float32(np.sqrt(2.0 / _WOBBLE_TERMS)))
    _claim(label, best, value, slices, q, surface, priority)


def _paint_tube(label, best, value, spacing, line, radius, priority=0.0) -> None:
    slices, centres = _box(line.min(axis=0) - radius, line.max(axis=0) + radius, label.shape, spacing)
    if slices is None:
        return
    d2 = np.full(tuple(s.stop - s.start for s in slices), np.inf, dtype=np.float32)
    for a, b in zip(line[:-1], line[1:]):  # distance to each segment, in the segment's own box
        sub, sub_centres = _box(np.minimum(a, b) - radius, np.maximum(a, b) + radius, label.shape, spacing)
        if sub is None:
            continue
        inner = tuple(slice(s.start - o.start, s.stop - o.start) for s, o in zip(sub, slices))
        d = _offsets(sub_centres, a)
        ab = (b - a).astype(np.float32)
        t = np.clip((d[0] * ab[0] + d[1] * ab[1] + d[2] * ab[2]) / np.float32(max(float(ab @ ab), 1e-12)), 0, 1)
        segment = (d[0] - t * ab[0]) ** 2 + (d[1] - t * ab[1]) ** 2 + (d[2] - t * ab[2]) ** 2
        np.minimum(d2[inner], segment, out=d2[inner])
    _claim(label, best, value, slices, np.sqrt(d2) / np.float32(radius), 1.0, priority)


def _smooth_noise(rng: np.random.Generator, shape, spacing, sigma_mm: float) -> np.ndarray:
    """Zero-mean, unit-SD Gaussian-smoothed noise of scale ``sigma_mm`` on the voxel grid (float32).

    Drawn on a grid up to sigma / 1.5 mm coarse and interpolated linearly, so a smooth field costs
    little more than the volume itself.
    """
    spacing = np.asarray(spacing, dtype=float)
    factor = np.maximum(1, (sigma_mm / (1.5 * spacing)).astype(int))
    coarse = [int(np.ceil(n / f)) + 2 if f > 1 else n for n, f in zip(shape, factor)]
    field = ndimage.gaussian_filter(rng.standard_normal(coarse, dtype=np.float32), sigma_mm / (spacing * factor),
                                    mode="wrap")
    for axis, (n, f) in enumerate(zip(shape, factor)):
        if f > 1:
            t = (np.arange(n) + 0.5) / f + 0.5  # coarse point j + 1 sits at the centre of voxel block j
            i0 = np.floor(t).astype(np.intp)
            w = (t - i0).astype(np.float32).reshape([-1 if a == axis else 1 for a in range(3)])
            low = np.take(field, i0, axis=axis)
            high = np.take(field, i0 + 1, axis=axis)
            high -= low
            high *= w
            low += high
            field = low
    field -= np.float32(field.mean(dtype=np.float64))
    field /= np.float32(max(field.std(dtype=np.float64), 1e-12))
    return field


def _render_channel(rng: np.random.Generator, label: np.ndarray, contrasts, spacing, fov) -> np.ndarray:
    """One float32 image of ``label``: class means ``contrasts[label]`` (noise SDs) on the default demo's
    background (texture at 3 and 1.2 mm, a smooth multiplicative bias, white noise; unit SD in all)."""
    spacing = np.asarray(spacing, dtype=float)
    image = ndimage.gaussian_filter(np.asarray(contrasts, dtype=np.float32)[label], 0.6 / spacing)  # partial volume
    for sigma in (3.0, 1.2):
        texture = _smooth_noise(rng, label.shape, spacing, sigma)
        texture *= np.float32(0.5)
        image += texture
        del texture
    # The bias field's scale grows with the field of view, from the default demo's 10 mm.
    gain = _smooth_noise(rng, label.shape, spacing, 10.0 * max(1.0, float(np.min(fov / FOV_MM))))
    gain *= np.float32(0.04)
    np.exp(gain, out=gain)
    image *= np.float32(NOISE_SD)
    image += np.float32(BACKGROUND_MEAN)
    image *= gain
    del gain
    white = rng.standard_normal(label.shape, dtype=np.float32)
    white *= np.float32(NOISE_SD * np.sqrt(0.5))
    image += white
    return image


def _channel_contrasts(seed: int, n_structures: int, channel: int) -> np.ndarray:
    """Contrast of each structure to the background in ``channel`` (noise SDs); fixed per dataset, like an
    organ's CT number, so that structures keep their intensity from case to case."""
    rng = np.random.default_rng([seed, _STREAM_CONTRAST, n_structures, channel + 1])
    size = rng.uniform(*STRUCTURE_CONTRAST_SD, n_structures)
    return np.where(rng.uniform(size=n_structures) < NEGATIVE_CONTRAST_FRACTION, -size, size)


def _channels(seed: int, index: int, label: np.ndarray, n_structures: int, channels, spacing, fov) -> list[np.ndarray]:
    images = []
    for c in channels:
        rng = np.random.default_rng([seed, index, _STREAM_TEXTURE, c + 1])
        jitter = rng.normal(0.0, CONTRAST_JITTER, n_structures)
        contrasts = np.concatenate([[0.0], _channel_contrasts(seed, n_structures, c) + jitter])
        images.append(_render_channel(rng, label, contrasts, spacing, fov))
    return images


def _synthesize_pair(seed: int, index: int, shape, spacing, fov, n_channels: int):
    """Organ and lesion (``n_structures`` 2) in any other geometry: the default demo's draws in a field
    of view scaled by ``min(fov / FOV_MM)``, so the anatomy grows with the field of view."""
    spacing = np.asarray(spacing, dtype=float)
    scale = float(np.min(fov / FOV_MM))
    fov_unit = fov / scale  # >= FOV_MM on every axis
    margin = max(MARGIN_MM, float(spacing.max()) / scale)
    half_voxel = 0.5 * float(np.linalg.norm(spacing))
    rng = np.random.default_rng([seed, index])
    rotation = _random_rotation(rng)
    radii = rng.uniform(*ORGAN_RADII_MM, size=3)
    half_extent = (1.0 + ORGAN_WOBBLE) * np.sqrt(((rotation * radii) ** 2).sum(axis=1))
    centre = rng.uniform(margin + half_extent, fov_unit - margin - half_extent)
    line, radius = _draw_lesion(rng, centre, rotation, radii, fov_unit, margin)
    contrast = rng.uniform(*CONTRAST_SD, size=2)
    label = np.zeros(shape, dtype=np.uint8)
    best = np.full(shape, np.inf, dtype=np.float32)
    # Size floors (a no-op unless the grid is coarse for the field of view) keep both visible.
    _paint_ellipsoid(label, best, 1, spacing, centre * scale, rotation, np.maximum(radii * scale, 2 * half_voxel),
                     _wobble(rng, ORGAN_WOBBLE))
    _paint_tube(label, best, 2, spacing, line * scale, max(radius * scale, half_voxel), _LESION_PRIORITY)
    del best
    # Channel 0: the default demo's contrasts, the lesion on top of the organ's level.
    image = _render_channel(np.random.default_rng([seed, index, _STREAM_TEXTURE, 1]), label,
                            [0.0, contrast[0], contrast.sum()], spacing, fov)
    return [image, *_channels(seed, index, label, 2, range(1, n_channels), spacing, fov)], label


def _polyline_distance(points, line) -> np.ndarray:
    """Distance (mm) from each of ``points`` (..., 3) to the polyline ``line`` (P, 3)."""
    p = np.asarray(points, dtype=float)[..., None, :] - line[:-1]
    ab = line[1:] - line[:-1]
    t = np.clip((p * ab).sum(axis=-1) / np.maximum((ab * ab).sum(axis=-1), 1e-12), 0.0, 1.0)
    return np.sqrt(((p - t[..., None] * ab) ** 2).sum(axis=-1)).min(axis=-1)


def _clearance(point, s) -> float:
    """Lower bound of the distance (mm) from ``point`` to structure ``s`` in any case (any jitter)."""
    if s["kind"] == "tube":
        distance = float(_polyline_distance(point, s["line"]))
        return distance - (1 + SIZE_JITTER) * s["radius"] - s["shift"]
    return float(np.linalg.norm(point - s["anchor"])) - (1 + SIZE_JITTER) * s["bound"] - s["shift"]


def _clear(a, b, strict: bool, half_voxel: float) -> bool:
    """Whether structures ``a`` and ``b`` may lie where they are in the atlas.

    strict: they never overlap, whatever the jitter. Otherwise: neither comes within a voxel of the
    other's anchor (its centre, or the middle of its axis), so the voxel nearest each anchor stays its own.
    """
    if not strict:
        return (_clearance(a["anchor"], b) > a["shift"] + half_voxel
                and _clearance(b["anchor"], a) > b["shift"] + half_voxel)
    if a["kind"] == "tube" and b["kind"] == "tube":
        steps = np.linalg.norm(np.diff(a["line"], axis=0), axis=1).max()
        distance = _polyline_distance(a["line"], b["line"]).min() - 0.5 * steps
        thickness = a["radius"] + b["radius"]
    elif a["kind"] == "tube" or b["kind"] == "tube":
        tube, blob = (a, b) if a["kind"] == "tube" else (b, a)
        distance = float(_polyline_distance(blob["anchor"], tube["line"]))
        thickness = tube["radius"] + blob["bound"]
    else:
        distance = float(np.linalg.norm(a["anchor"] - b["anchor"]))
        thickness = a["bound"] + b["bound"]
    return distance - (1 + SIZE_JITTER) * thickness - a["shift"] - b["shift"] > 0


def _place(rng: np.random.Generator, tube: bool, volume: float, placed: list, fov, margin: float, floor: float,
           half_voxel: float):
    """One structure of the atlas: its shape from ``rng``, then a place clear of ``placed`` (None if none)."""
    rotation = _random_rotation(rng)
    if tube:
        aspect, bend = rng.uniform(*TUBE_ASPECT), rng.uniform(*TUBE_BEND)
    else:
        logs = rng.normal(0.0, ELLIPSOID_ASPECT_SD, 3)
    tries = rng.uniform(size=(_PLACE_ATTEMPTS, 3))  # a fixed number of draws, whatever is accepted
    for shrink in range(_MAX_SHRINKS + 1):
        size = _SHRINK**shrink
        if tube:
            radius = (volume / (np.pi * aspect)) ** (1 / 3) * size
            length = aspect * radius
            radius = max(radius, floor)
            points = int(np.clip(2 * np.ceil(length / (2 * radius)) + 1, 9, 65))  # odd: the middle is a point
            t = np.linspace(0.0, 1.0, points)[:, None]
            # Quadratic Bezier along the local x axis, bent towards local y; anchored at its middle point.
            line = (2 * t * (1 - t) * bend * length) * rotation[:, 1] + (t - 0.5) * length * rotation[:, 0]
            line -= line[points // 2]
            shape = {"kind": "tube", "line": line, "radius": radius,
                     "bound": float(np.linalg.norm(line, axis=1).max()) + radius}
            below = -line.min(axis=0) + (1 + SIZE_JITTER) * radius
            above = line.max(axis=0) + (1 + SIZE_JITTER) * radius
        else:
            radii = np.maximum((3 * volume / (4 * np.pi)) ** (1 / 3) * size * np.exp(logs - logs.mean()), floor)
            shape = {"kind": "ellipsoid", "rotation": rotation, "radii": radii,
                     "bound": (1 + STRUCTURE_WOBBLE) * float(radii.max())}
            below = above = (1 + SIZE_JITTER) * (1 + STRUCTURE_WOBBLE) * np.sqrt(((rotation * radii) ** 2).sum(axis=1))
        shape["shift"] = SHIFT_JITTER * shape["bound"]
        low = margin + shape["shift"] + below
        high = fov - margin - shape["shift"] - above
        if np.any(low > high):
            continue
        for attempt, u in enumerate(tries):
            anchor = low + u * (high - low)
            new = {**shape, "anchor": anchor}
            if shape["kind"] == "tube":
                new["line"] = shape["line"] + anchor
            if all(_clear(new, old, attempt < _STRICT_ATTEMPTS, half_voxel) for old in placed):
                return new
    return None


def _atlas(seed: int, n_structures: int, fov, spacing) -> list[dict]:
    """The dataset's structures, largest first (label 1): kind, size, orientation and place, fixed per
    dataset like an abdomen's organs; each case jitters them (:func:`_synthesize_many`)."""
    spacing = np.asarray(spacing, dtype=float)
    half_voxel = 0.5 * float(np.linalg.norm(spacing))
    # Radii of at least a voxel diagonal, also after the jitter shrinks them: each anchor's voxel is inside.
    floor = 2 * half_voxel * (1 + SIZE_JITTER)
    margin = max(MARGIN_MM, float(spacing.max()))
    rng = np.random.default_rng([seed, _STREAM_ATLAS, n_structures])
    weights = SIZE_RANGE ** rng.uniform(size=n_structures)
    tubes = rng.uniform(size=n_structures) < TUBE_FRACTION
    volume = float(np.prod(fov))
    volumes = np.minimum(FILL_FRACTION * volume * weights / weights.sum(), MAX_VOLUME_FRACTION * volume)
    order = np.argsort(-volumes, kind="stable")
    volumes, tubes = volumes[order], tubes[order]
    tubes[0] = False  # the largest is an organ
    placed = []
    for k in range(n_structures):
        structure = _place(np.random.default_rng([seed, _STREAM_ATLAS, n_structures, k + 1]), bool(tubes[k]),
                           float(volumes[k]), placed, fov, margin, floor, half_voxel)
        if structure is None:
            raise ValueError(
                f"n_structures={n_structures}: that many structures do not fit the field of view of "
                f"{' x '.join(f'{v:g}' for v in fov)} mm at a spacing of {' x '.join(f'{v:g}' for v in spacing)} mm "
                f"(no room for structure {k + 1}); use a larger shape or fewer structures")
        placed.append(structure)
    return placed


def _synthesize_many(seed: int, index: int, atlas: list[dict], shape, spacing, fov, n_channels: int):
    """(images, label) of case ``index``: the atlas's structures, each moved, resized and re-wobbled."""
    label = np.zeros(shape, dtype=np.uint8)
    best = np.full(shape, np.inf, dtype=np.float32)
    for value, s in enumerate(atlas, 1):
        rng = np.random.default_rng([seed, index, _STREAM_POSE, value])
        direction = _unit_vector(rng)
        shift = s["shift"] * rng.uniform() ** (1 / 3) * direction  # uniform in the ball
        if s["kind"] == "tube":
            radius = s["radius"] * (1 + SIZE_JITTER) ** rng.uniform(-1, 1)
            _paint_tube(label, best, value, spacing, s["line"] + shift, radius)
        else:
            radii = s["radii"] * (1 + SIZE_JITTER) ** rng.uniform(-1, 1, 3)
            _paint_ellipsoid(label, best, value, spacing, s["anchor"] + shift, s["rotation"], radii,
                             _wobble(rng, STRUCTURE_WOBBLE))
    del best
    return _channels(seed, index, label, len(atlas), range(n_channels), spacing, fov), label



# -- label noise: training labels drawn like a human annotator's -----------------------------------
def _check_label_noise(label_noise) -> float:
    if (not isinstance(label_noise, numbers.Real) or isinstance(label_noise, (bool, np.bool_))
            or not 0 <= label_noise <= 1):  # NaN fails the range check too
        raise ValueError(f"label_noise must be a number from 0 to 1 (0: clean training labels, 1: the strongest "
                         f"annotation noise), got {label_noise!r}")
    return float(label_noise)


def _move_contour(box: np.ndarray, value: int, rank: np.ndarray, axes, outward, inward) -> None:
    """Move the contour of structure ``value`` in ``box`` (a view of the label map) by one voxel, in place:
    out where ``outward`` (bool array or bool), in where ``inward``, only against what lies beneath it
    (background and larger structures: ``rank`` below its own), never into a smaller structure.

    Outward: a voxel beneath it with a face neighbour (along ``axes``) of it joins it. Inward: a voxel of it
    with a face neighbour beneath it takes that neighbour's label (the one of highest rank: the closest
    enclosing structure before the background). A structure never vanishes: if the move would remove
    all of it, it does not move inward.
    """
    own = rank[value]
    padded = np.pad(box, 1, constant_values=255)  # rank[255] is above every rank: never beneath, never it
    touches = np.zeros(box.shape, dtype=bool)
    below_rank = np.full(box.shape, -1, dtype=np.int16)
    below_label = np.zeros(box.shape, dtype=np.uint8)
    for axis in axes:
        for step in (-1, 1):
            neighbour = padded[tuple(slice(1 + step, padded.shape[a] - 1 + step) if a == axis else slice(1, -1)
                                     for a in range(3))]
            touches |= neighbour == value
            neighbour_rank = rank[neighbour]
            better = (neighbour_rank < own) & (neighbour_rank > below_rank)
            below_rank[better] = neighbour_rank[better]
            below_label[better] = neighbour[better]
    mine = box == value
    grow = touches & (rank[box] < own) & outward
    shrink = mine & (below_rank >= 0) & inward
    if np.array_equal(shrink, mine):
        shrink[...] = False
    box[grow] = value
    box[shrink] = below_label[shrink]


def _noisy_label(label: np.ndarray, seed: int, index: int, n_structures: int, strength: float,
                 spacing) -> np.ndarray:
    """Training label map of case ``index`` as an annotator might have drawn it (module docstring, label
    noise): misses first, then each remaining structure's contour, largest structure first. Its own
    random streams (``default_rng([seed, index, _STREAM_LABEL_NOISE(, label)])``), so the clean draws are
    unaffected; ``strength`` 0 returns ``label`` itself."""
    if strength == 0:
        return label
    from statistics import NormalDist

    label = label.copy()
    spacing = np.asarray(spacing, dtype=float)
    counts = np.bincount(label.ravel(), minlength=n_structures + 1)
    order = sorted((int(v) for v in np.flatnonzero(counts[1:]) + 1), key=lambda v: (-counts[v], v))  # largest first
    rank = np.full(256, np.iinfo(np.int16).max, dtype=np.int16)
    rank[0] = 0
    rank[order] = np.arange(1, len(order) + 1)
    # Misses: each of the smallest quarter of the structures (at least one, never the largest), in the
    # order of their labels' values, one draw each; a missed one's voxels take the nearest other label.
    n_small = min(n_structures - 1, max(1, n_structures // 4))
    small = sorted(sorted(range(1, n_structures + 1), key=lambda v: (-counts[v], v))[n_structures - n_small:])
    draws = np.random.default_rng([seed, index, _STREAM_LABEL_NOISE]).uniform(size=len(small))
    missed = sorted(v for v, u in zip(small, draws) if u < MISS_PROBABILITY * strength and counts[v])
    boxes = ndimage.find_objects(label)
    for v in missed:
        slices = tuple(slice(max(0, s.start - 1), s.stop + 1) for s in boxes[v - 1])
        box = label[slices]
        inside = np.isin(box, missed)
        if inside.all():
            box[...] = 0
            continue
        nearest = ndimage.distance_transform_edt(inside, sampling=spacing, return_distances=False,
                                                 return_indices=True)
        box[inside] = box[tuple(i[inside] for i in nearest)]
    # Contours: on anisotropic grids only within slices (axes up to 1.5 x the finest spacing), as
    # annotators draw slice by slice. A structure's moves only trade voxels with what lies beneath it
    # (processed before it), so its box grows only by its own two moves of one voxel each.
    axes = [a for a in range(3) if spacing[a] <= 1.5 * spacing.min()]
    threshold = NormalDist().inv_cdf(1 - CONTOUR_FRACTION * strength)
    boxes = ndimage.find_objects(label)
    for v in order:
        if v in missed:
            continue
        rng = np.random.default_rng([seed, index, _STREAM_LABEL_NOISE, v])
        shift, direction = rng.uniform(size=2)
        slices = tuple(slice(max(0, s.start - 2), s.stop + 2) for s in boxes[v - 1])
        box = label[slices]
        if shift < SHIFT_PROBABILITY * strength:  # the whole contour, one voxel out or in
            _move_contour(box, v, rank, axes, direction < 0.5, direction >= 0.5)
        field = _smooth_noise(rng, box.shape, spacing, CONTOUR_SIGMA_MM)
        _move_contour(box, v, rank, axes, field > threshold, field < -threshold)
    return label


def _nifti_gz_bytes(array: np.ndarray, affine: np.ndarray) -> bytes:
    img = nib.Nifti1Image(array, affine)
    # Scanner-space qform and sform agree, so SimpleITK and nibabel read the same geometry.
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    # mtime=0: gzip would otherwise embed the current time and break byte-identical reruns.
    level = 6 if array.size <= _FAST_GZIP_VOXELS else 1
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def _write_case(root: Path, case_id: str, image, label: np.ndarray, affine: np.ndarray,
                split: str = "Tr") -> None:
    """``image``: one array (channel 0) or a list of them, one per channel (``<case>_000c.nii.gz``)."""
    for c, channel in enumerate([image] if isinstance(image, np.ndarray) else image):
        (root / f"images{split}" / f"{case_id}_{c:04d}.nii.gz").write_bytes(_nifti_gz_bytes(channel, affine))
    (root / f"labels{split}" / f"{case_id}.nii.gz").write_bytes(_nifti_gz_bytes(label, affine))


def _dataset_json(n_cases: int, n_test: int, anisotropic: bool, seed: int, channel_name, shape, spacing,
                  options: dict | None = None) -> str:
    """``channel_name``: one name or a list, one per channel. ``options``: n_structures, n_channels and
    regions, recorded in "fastkd_demo" unless all are the defaults (the default demo's file is unchanged),
    and label_noise, recorded (and mentioned in the description) unless 0."""
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
    channel_name: str | list[str] = "synthetic",
    *,
    shape=None,
    spacing=None,
    n_structures: int = DEFAULT_N_STRUCTURES,
    n_channels: int = DEFAULT_N_CHANNELS,
    regions: bool = False,
    label_noise: float = 0.0,
) -> list[str]:
    """Write the dataset into ``out_dir`` (the DatasetXXX_Name folder itself) and return the case ids.

    ``shape`` (voxels x, y, z; None: the default 32 x 40 x 32 mm field of view at the spacing),
    ``spacing`` (mm per axis; None: 1 mm, or 1 x 1 x 3 mm with ``anisotropic``), ``n_structures``
    (foreground labels; 2 = organ + lesion), ``n_channels`` (images per case; ``channel_name`` is one
    name, suffixed ``_0``, ``_1``... for several channels, or a list of one name per channel) and
    ``regions`` (region-based dataset.json) and ``label_noise`` (0-1: annotation noise in the training
    labels only) are described in the module docstring; the defaults give the default demo, byte for byte.

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
    n_structures, n_channels, regions, channel_names = _check_structures(n_structures, n_channels, regions,
                                                                         channel_name)
    shape, spacing, fov, original = _check_geometry(shape, spacing, anisotropic)
    label_noise = _check_label_noise(label_noise)
    options = {"n_structures": n_structures, "n_channels": n_channels, "regions": regions, "label_noise": label_noise}
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
        jobs = [(i, c, "Tr") for i, c in enumerate(ids)] + [(TEST_INDEX + i, c, "Ts") for i, c in enumerate(test_ids)]
        for index, case_id, split in tqdm(jobs, desc=f"demo {out_dir.name}", unit="case", file=sys.stderr):
            image, label = synthesize(index)
            if split == "Tr":  # the images show the clean anatomy; only the training labels are noisy
                label = _noisy_label(label, seed, index, n_structures, label_noise, spacing)
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
