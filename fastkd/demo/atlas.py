"""Many structures (``n_structures`` other than 2, 1-250): an abdomen-like atlas fixed per dataset,
each case a jittered copy of it.

Labels ``organ_001`` (largest) ... ``organ_<n>``, an abdomen-like atlas fixed per dataset
(``default_rng([seed, 11, n])``): nominal volumes log-uniform over a factor 300, together 20 % of the
field of view, none above 8 % (a few large organs, many small ones); a quarter of them curved tubes
(radius : length 1 : 5-12, vessels), the others randomly oriented ellipsoids (log radii SD 0.25) with a
wobbly surface (10 %); each with its own intensity per channel, 1.5-4 noise SDs from the background,
darker than it for 30 % of them (fixed per dataset, like an organ's CT number). Placed inside the field
of view (margin max(3 mm, one voxel)), preferably with no overlap at all (the first 100 of 300 tries per
size), else at least with no other structure within a voxel of its anchor (centre, or middle of a tube's
axis); a structure with no room shrinks by 0.85 and tries again (12 times, then ValueError: use a larger
shape or fewer structures). Each case moves every structure by up to 10 % of its bounding radius, scales
its radii by up to 10 %, redraws its wobble and varies its intensity by 0.2 SD
(``default_rng([seed, index, 12, label])``). A voxel inside two structures goes to the one it is deeper
inside (smaller normalised radius). Every structure is present in every case, by construction: its
radii are at least a voxel diagonal (after the jitter), so the voxel nearest its anchor is inside it,
and by the placement rule no other structure reaches that voxel. The size floor and the one-voxel
clearance are the only places the grid enters the atlas, so two grids of one field of view show the
same anatomy except for the structures these change (in a 96 x 96 x 90 mm test with 16 structures,
1 vs 1 x 1 x 3 mm: 3 moved).
"""

from __future__ import annotations

import numpy as np

from fastkd.demo.options import MARGIN_MM
from fastkd.demo.render import (
    _STREAM_ATLAS,
    _STREAM_POSE,
    _channels,
    _paint_ellipsoid,
    _paint_tube,
    _random_rotation,
    _unit_vector,
    _wobble,
)

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
_PLACE_ATTEMPTS = 300  # per size; the first _STRICT_ATTEMPTS ask for no overlap at all
_STRICT_ATTEMPTS = 100
_SHRINK, _MAX_SHRINKS = 0.85, 12  # linear size factor per round of failed attempts


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
