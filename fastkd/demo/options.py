"""The demo's settings: their defaults and limits, their checks (the ValueErrors of
:func:`~fastkd.demo.writer.make_demo_dataset`), and the pure functions that config validation and
Snakemake call at parse time (case ids, the checks, the ``fastkd demo write`` flags, the job's resources).

Geometry: voxel order (x, y, z). Isotropic variant: 32 x 40 x 32 voxels at 1 mm. Anisotropic
variant: the same physical field of view with 3 mm slices along z (32 x 40 x 11 voxels at
(1, 1, 3) mm).

CT scale (the keyword options of make_demo_dataset; the defaults give the default demo, byte for
byte, and its two geometries keep being drawn by the same code, :mod:`fastkd.demo.organ_lesion`):

* ``spacing`` (mm per axis, e.g. (0.8, 0.8, 2.5)) and ``shape`` (voxels, e.g. (256, 256, 200) or
  (512, 512, 300)): the field of view is ``shape * spacing`` mm, centred on the world origin; without
  ``shape`` it is the default 32 x 40 x 32 mm at the spacing. ``anisotropic`` is spacing (1, 1, 3);
  give one of the two. Anatomy is defined in mm and scales with the field of view. Everything outside
  the two original geometries is drawn box by box in float32 (no per-voxel coordinate arrays): one
  256 x 256 x 200 case with 40 structures takes about 5 s on one core (half of it gzip) and 350 MB;
  512 x 512 x 300 about 30 s and 1.7 GB. Files over 2^20 voxels are gzipped at level 1, not 6.
  Textures are drawn on the voxel grid, so grids of one field of view differ in texture.

The other options are described where they are drawn: ``n_structures`` (2 in
:mod:`fastkd.demo.organ_lesion`, others in :mod:`fastkd.demo.atlas`), ``n_channels`` and
``channel_name`` (:mod:`fastkd.demo.render`), ``regions`` (:mod:`fastkd.demo.writer`) and
``label_noise`` (:mod:`fastkd.demo.label_noise`). ``n_unlabelled`` (:mod:`fastkd.demo.writer`) adds
images without labels in ``imagesUnlabelled/``, drawn like the training cases; the training and test files
stay the same.
"""

from __future__ import annotations

import numbers

import numpy as np

DEFAULT_SHAPE = (32, 40, 32)  # small: a 2-core CPU trains 5 teacher folds on it in minutes
DEFAULT_N_CASES = 12
MIN_N_CASES = 5  # nnU-Net's default split is 5-fold cross-validation
DEFAULT_N_TEST = 4
ANISOTROPIC_SPACING = (1.0, 1.0, 3.0)
# Physical field of view shared by both variants; objects keep this clearance from its faces so
# they are fully covered by the anisotropic grid too (its 11 slices of 3 mm cover 33 mm).
FOV_MM = np.array(DEFAULT_SHAPE, dtype=float)
MARGIN_MM = 3.0

# -- options beyond the default demo (CT scale, many structures, several channels, regions) ---------
DEFAULT_N_STRUCTURES = 2  # organ + lesion
DEFAULT_N_CHANNELS = 1
MIN_SHAPE, MAX_SHAPE = 8, 2048  # voxels per axis
MAX_SPACING = 20.0  # mm per axis
MAX_STRUCTURES = 250  # label values must fit the uint8 label map
MAX_CHANNELS = 16
# Unlabelled images (dataset.demo.n_unlabelled): drawn like the training cases, written without labels.
DEFAULT_N_UNLABELLED = 0
UNLABELLED_FOLDER = "imagesUnlabelled"


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


def _check_n_unlabelled(n_unlabelled) -> int:
    if not _is_int(n_unlabelled) or n_unlabelled < 0:
        raise ValueError(f"n_unlabelled must be an integer >= 0 (unlabelled images in {UNLABELLED_FOLDER}/; "
                         f"0: none), got {n_unlabelled!r}")
    return int(n_unlabelled)


def unlabelled_case_ids(n_unlabelled: int) -> list[str]:
    """Unlabelled case identifiers ``['demo_unl_000', ...]`` (images in ``imagesUnlabelled/``, no labels);
    pure, used at Snakemake parse time. Raises ValueError for the same ``n_unlabelled`` that
    :func:`make_demo_dataset` rejects."""
    return [f"demo_unl_{i:03d}" for i in range(_check_n_unlabelled(n_unlabelled))]


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


def _check_label_noise(label_noise) -> float:
    if (not isinstance(label_noise, numbers.Real) or isinstance(label_noise, (bool, np.bool_))
            or not 0 <= label_noise <= 1):  # NaN fails the range check too
        raise ValueError(f"label_noise must be a number from 0 to 1 (0: clean training labels, 1: the strongest "
                         f"annotation noise), got {label_noise!r}")
    return float(label_noise)


def check_options(demo: dict) -> None:
    """Check the options of config ``dataset.demo`` that depend on each other (anisotropic and spacing,
    regions and n_structures, the grid of the default field of view), label_noise and n_unlabelled; pure,
    used at config validation. Raises ValueError as :func:`make_demo_dataset` would."""
    _check_structures(demo.get("n_structures", DEFAULT_N_STRUCTURES), demo.get("n_channels", DEFAULT_N_CHANNELS),
                      demo.get("regions", False), "synthetic")
    _check_geometry(demo.get("shape"), demo.get("spacing"), demo.get("anisotropic", False))
    _check_label_noise(demo.get("label_noise", 0))
    _check_n_unlabelled(demo.get("n_unlabelled", DEFAULT_N_UNLABELLED))


def image_options(demo: dict) -> str:
    """The flags of config ``dataset.demo``'s options that shape the images (shape, spacing, n_structures,
    n_channels; '' for the defaults): ``fastkd demo unlabelled`` takes these."""
    flags = []
    for key in ("shape", "spacing"):
        if demo.get(key) is not None:
            flags += [f"--{key}", *map(str, demo[key])]
    if demo.get("n_structures", DEFAULT_N_STRUCTURES) != DEFAULT_N_STRUCTURES:
        flags += ["--n-structures", str(demo["n_structures"])]
    if demo.get("n_channels", DEFAULT_N_CHANNELS) != DEFAULT_N_CHANNELS:
        flags += ["--n-channels", str(demo["n_channels"])]
    return " ".join(flags)


def cli_options(demo: dict) -> str:
    """The ``fastkd demo write`` flags of config ``dataset.demo``'s CT-scale options and label_noise ('' for
    the defaults). ``n_unlabelled`` is not among them: the workflow writes the unlabelled images in a job of
    their own (``fastkd demo unlabelled``), so adding some reruns none of the labelled data's jobs."""
    flags = [image_options(demo)] if image_options(demo) else []
    if demo.get("regions"):
        flags.append("--regions")
    if demo.get("label_noise", 0):
        flags += ["--label-noise", repr(float(demo["label_noise"]))]
    return " ".join(flags)


def resources(demo: dict) -> dict:
    """Snakemake resources of the job that writes the demo of config ``dataset.demo``: ``mem_mb`` (a few
    float32 volumes per case and channel, measured 350 MB for 256 x 256 x 200 voxels, 1.7 GB for
    512 x 512 x 300) and ``runtime`` in minutes (measured 6 s and 31 s a case; an unlabelled case counts as
    a case: its images are drawn the same way, only its label is not written); the default demo's 2000 MB
    and 10 minutes at least."""
    shape = _check_geometry(demo.get("shape"), demo.get("spacing"), demo.get("anisotropic", False))[0]
    voxels, channels = float(np.prod(shape)), int(demo.get("n_channels", DEFAULT_N_CHANNELS))
    cases = (int(demo.get("n_cases", DEFAULT_N_CASES)) + int(demo.get("n_test", DEFAULT_N_TEST))
             + _check_n_unlabelled(demo.get("n_unlabelled", DEFAULT_N_UNLABELLED)))
    mem_mb = max(2000, int(1000 + voxels * (24 + 4 * channels) / 1e6))
    runtime = max(10, int(np.ceil(2 * cases * voxels * (0.2 + 0.3 * channels) * 1e-6 / 60)))
    return {"mem_mb": mem_mb, "runtime": runtime}
