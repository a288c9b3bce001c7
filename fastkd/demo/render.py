"""What the demo's generators share: random orientations, the painting of ellipsoids and tubes into a
label map box by box, smooth noise, and the rendering of a label map as image channels on the default
demo's background; the random stream tags of all of them.

The two original geometries with organ + lesion are drawn per voxel
(:func:`fastkd.demo.organ_lesion._synthesize_case`). All else is drawn with the code here, which works
box by box in float32 and keeps no per-voxel coordinate arrays, so a case costs a few times its own size
in memory.

``n_channels`` (1-16): images ``_0000`` ... showing the same label map with other contrasts: a
contrast per structure and channel, fixed per dataset, plus per-case jitter, with the same kind of
background (own noise per channel). Channel 0 of the default demo stays its image
(:mod:`fastkd.demo.organ_lesion`). ``channel_name``: one name (suffixed ``_0``, ``_1``... for several
channels) or a list of names.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from fastkd.demo.options import FOV_MM

BACKGROUND_MEAN = 100.0
NOISE_SD = 10.0
# Per case each structure's intensity varies by CONTRAST_JITTER SD.
CONTRAST_JITTER = 0.2
STRUCTURE_CONTRAST_SD = (1.5, 4.0)  # |contrast| to background, in units of NOISE_SD
NEGATIVE_CONTRAST_FRACTION = 0.3  # structures darker than the background
_WOBBLE_TERMS = 3
# Random streams (np.random.default_rng([seed, ...])); every tag is non-zero, since trailing zeros do
# not change a SeedSequence. The default demo's case stream is [seed, index].
_STREAM_ATLAS, _STREAM_POSE, _STREAM_TEXTURE, _STREAM_CONTRAST, _STREAM_LABEL_NOISE = 11, 12, 13, 14, 15


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
