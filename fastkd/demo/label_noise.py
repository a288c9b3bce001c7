"""Training labels drawn like a human annotator's (``label_noise``): noise a teacher ensemble averages out.

Label noise (``label_noise``, 0-1; 0, the default, writes the clean labels, byte for byte): the
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

import numpy as np
from scipy import ndimage

from fastkd.demo.render import _STREAM_LABEL_NOISE, _smooth_noise

# Label noise (label_noise > 0; training labels only): per structure, a one-voxel dilation or erosion of
# the whole contour with probability SHIFT_PROBABILITY * label_noise, then the contour moved one voxel out
# and one voxel in on about a fraction CONTOUR_FRACTION * label_noise of it each, where a random field
# smoothed at CONTOUR_SIGMA_MM is above / below a threshold; per case, each of the smallest structures
# missed with probability MISS_PROBABILITY * label_noise.
SHIFT_PROBABILITY = 1.0
CONTOUR_FRACTION = 0.5
CONTOUR_SIGMA_MM = 3.0
MISS_PROBABILITY = 0.5


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
