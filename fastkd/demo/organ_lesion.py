"""The default demo's anatomy, organ + lesion (``n_structures`` 2): drawn per voxel on its two original
geometries (:func:`_synthesize_case`), box by box on any other (:func:`_synthesize_pair`).

Content of a case (drawn from its own RNG, ``np.random.default_rng([seed, index])``, so case ``i``
is the same whatever ``n_cases`` is; test case ``i`` uses index ``TEST_INDEX + i``). All anatomy is
defined in millimetres and all random draws except the per-voxel white noise are independent of the
voxel grid, so the anisotropic variant shows the same anatomy sampled with thicker slices:

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
these values it reached lesion Dice 0.71 after 24 iterations and 0.93 after 120 (organ 0.89).

In another geometry (``shape``, ``spacing``: :mod:`fastkd.demo.options`): the default's draws in a
field of view scaled by ``min(fov / (32, 40, 32) mm)`` (so the organ grows with it), with the organ's
wobble drawn per structure, not from a noise field. A lesion voxel is always lesion.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fastkd.demo.options import DEFAULT_SHAPE, FOV_MM, MARGIN_MM
from fastkd.demo.render import (
    BACKGROUND_MEAN,
    NOISE_SD,
    _STREAM_TEXTURE,
    _channels,
    _paint_ellipsoid,
    _paint_tube,
    _random_rotation,
    _render_channel,
    _unit_vector,
    _wobble,
)

LABELS = {"background": 0, "organ": 1, "lesion": 2}

ORGAN_RADII_MM = (7.0, 10.0)
ORGAN_WOBBLE = 0.08  # relative radial amplitude of the surface wobble
LESION_RADIUS_MM = (3.0, 3.8)
LESION_LENGTH_MM = (12.0, 16.0)
CONTRAST_SD = (2.5, 3.5)  # class contrast in units of NOISE_SD
_OUTSIDE_ATTEMPTS = 200
_CENTERLINE_POINTS = 32
_LESION_PRIORITY = 10.0  # the lesion lies on top of the organ (see _claim)


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
