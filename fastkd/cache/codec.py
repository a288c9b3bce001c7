"""Probabilities to stored values and back: the dtypes, top-k, the largest-remainder rounding.

What the stored values mean is described in :mod:`fastkd.cache.layout` ("Arrays"). Encoding goes block
by block (:func:`blocks`, :data:`BLOCK_VALUES`), so its memory is bounded whatever the case's size.
"""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from fastkd.cache.layout import DTYPES, CacheError

#: values encoded (and verified) per step; encoding costs ~29 bytes per value (float32 temporaries and
#: int64 ranks), so a step holds ~230 MB whatever the case's size and number of classes
BLOCK_VALUES = 2**23


def encode(probs: np.ndarray, dtype: str, softmax: bool = True) -> np.ndarray:
    """Probabilities (C, ...) float32 -> stored values (see :mod:`fastkd.cache.layout`).

    Works on the whole array at once (temporaries of ~29 bytes per value): callers with large cases
    encode block by block (:func:`fastkd.cache.writer.write_case` does). The softmax rounding runs on
    the job's threads (:func:`_threads`), each on a slab of the voxels.
    """
    if dtype == "float16":
        return probs.astype(np.float16)
    if dtype != "uint8":
        raise CacheError(f"dtype = {dtype!r}: must be one of {', '.join(DTYPES)}")
    scaled = np.clip(probs, 0.0, 1.0, dtype=np.float32) * np.float32(255.0)
    if not softmax:
        return np.rint(scaled).astype(np.uint8)
    return _in_threads(_largest_remainder, scaled, np.float32(255.0)).astype(np.uint8)


def _threads() -> int:
    """Threads for encoding: torch's (the soft-label job sets them from ``--threads``), 1 without torch."""
    torch = sys.modules.get("torch")
    return max(1, int(torch.get_num_threads())) if torch is not None else 1


def _in_threads(fn, scaled: np.ndarray, total):
    """``fn(scaled, total)`` for a per-voxel ``fn``, on :func:`_threads` slabs of the first voxel axis at
    once (numpy releases the GIL in the arrays' loops and sorts; no OpenMP, so forking stays safe).
    ``total``: a number or an array of the voxels' shape."""
    threads = min(_threads(), scaled.shape[1]) if scaled.ndim > 1 else 1
    if threads == 1:
        return fn(scaled, total)
    out = np.empty_like(scaled)
    bounds = np.linspace(0, scaled.shape[1], threads + 1).astype(int)
    parts = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]

    def work(part):
        out[:, part] = fn(scaled[:, part], total[part] if np.ndim(total) else total)

    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fastkd-encode") as pool:
        list(pool.map(work, parts))
    return out


def _largest_remainder(scaled: np.ndarray, total) -> np.ndarray:
    """Integers (as float32) ``q <= scaled + 1`` along axis 0 summing to ``rint(total)`` per voxel: floor
    everything, then give the missing units to the entries with the largest remainders (the lower index
    first among equal ones).

    With many entries (classes) a per-voxel sort is the cost (57 of the 197 s of a 119-class,
    4.7 M-voxel case on a 2-core CPU), so above :data:`_SORT_UP_TO` entries a threshold per voxel is
    bisected first (:data:`_BISECT_ROUNDS` vectorised counts, each a comparison and a sum along the
    classes in the narrowest integer that holds the count, which numpy adds row by row in SIMD):
    every remainder above it gets its unit, and only the voxels still short (remainders within
    2 / 2**rounds of the threshold: near-ties) are sorted. The result is the same, to the bit, as
    sorting every voxel.
    """
    q = np.floor(scaled)
    remainder = scaled - q
    deficit = np.clip(np.rint(total - q.sum(axis=0)), 0, scaled.shape[0])
    if scaled.shape[0] <= _SORT_UP_TO:
        q += _ranks(remainder) < deficit
        return q
    n = scaled.shape[0]
    count = np.uint8 if n < 2**8 else np.uint16 if n < 2**16 else np.int64  # holds 0..n
    q2, r2 = q.reshape(n, -1), remainder.reshape(n, -1)  # views
    need = np.broadcast_to(deficit, scaled.shape[1:]).reshape(-1).astype(count)
    lo = np.full(need.shape, -1.0, np.float32)
    hi = np.full(need.shape, 1.0, np.float32)  # invariant: at most `need` remainders above hi
    above = np.empty(r2.shape, bool)
    for _ in range(_BISECT_ROUNDS):
        mid = (lo + hi) * np.float32(0.5)
        np.greater(r2, mid, out=above)
        few = above.view(np.uint8).sum(axis=0, dtype=count) <= need
        hi = np.where(few, mid, hi)
        lo = np.where(few, lo, mid)
    np.greater(r2, hi, out=above)
    q2 += above
    need = need.astype(np.int64) - above.view(np.uint8).sum(axis=0, dtype=count)
    short = np.flatnonzero(need > 0)
    if short.size:  # the rest among the remainders <= hi, by rank; those given a unit already rank last
        rest = np.where(above[:, short], -np.inf, r2[:, short])
        q2[:, short] += _ranks(rest) < need[short]
    return q


#: up to this many classes the largest-remainder rounding sorts every voxel (cheaper than bisecting)
_SORT_UP_TO = 16
#: bisection rounds of the threshold in _largest_remainder above _SORT_UP_TO classes: 16 leave a few
#: hundred voxels in 131 k to sort on 119-class soft labels (8 rounds left a third; ad-hoc timing of
#: the whole rounding at 8 / 12 / 16 / 20 rounds: 0.66-0.76 / 0.28-0.32 / 0.27-0.30 / 0.35-0.36 s)
_BISECT_ROUNDS = 16


def _ranks(remainder: np.ndarray) -> np.ndarray:
    """Rank of each entry along axis 0 by decreasing value (stable: the lower index first among ties)."""
    order = np.argsort(-remainder, axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(remainder.shape[0]).reshape((-1,) + (1,) * (remainder.ndim - 1)),
                      axis=0)
    return rank


def top_k_dtype(n_classes: int) -> str:
    """Stored dtype of a top-k case: uint8 (values and class indices) up to 256 classes, else uint16."""
    return "uint8" if n_classes <= 256 else "uint16"


def encode_top_k(probs: np.ndarray, k: int) -> np.ndarray:
    """Softmax probabilities (C, ...) -> ``(2, k, ...)``: [0] the k largest as multiples of 1/255 in
    descending order, [1] their class indices (:mod:`fastkd.cache.layout`, "Top-k").

    The k values are quantised by largest remainder to ``rint(255 x their sum)`` (each within 1/255 of
    the teacher's); the rest of the voxel's mass is not stored, :func:`decode` spreads it evenly over
    the other C - k classes.
    """
    n = probs.shape[0]
    if not 1 <= k < n:
        raise CacheError(f"softlabels.top_k = {k}: must be between 1 and the number of classes - 1 ({n - 1})")
    index = np.argpartition(-probs, k - 1, axis=0)[:k]
    top = np.take_along_axis(probs, index, axis=0)
    order = np.argsort(-top, axis=0, kind="stable")
    index, top = np.take_along_axis(index, order, axis=0), np.take_along_axis(top, order, axis=0)
    scaled = np.clip(top, 0.0, 1.0, dtype=np.float32) * np.float32(255.0)
    q = _in_threads(_largest_remainder, scaled, np.minimum(scaled.sum(axis=0), np.float32(255.0)))
    dtype = top_k_dtype(n)
    return np.stack([q.astype(dtype), index.astype(dtype)])


def decode(stored: np.ndarray, provenance: dict) -> np.ndarray:
    """Stored values (dense ``(C, ...)`` or top-k ``(2, k, ...)``) -> float32 probabilities ``(C, ...)``."""
    scale = np.float32(provenance["scale"])
    k = provenance.get("top_k")
    if not k:
        return stored.astype(np.float32) * scale
    n = len(provenance["channels"])
    values = stored[0].astype(np.float32) * scale
    rest = (1 - values.sum(axis=0)) / np.float32(n - k)
    dense = np.empty((n, *stored.shape[2:]), np.float32)
    dense[...] = rest
    np.put_along_axis(dense, stored[1].astype(np.intp), values, axis=0)
    return dense


def stored_shape(shape, provenance: dict) -> tuple[int, ...]:
    """On-disk array shape of a case of dense shape ``(C, x, y, z)``: the same, or ``(2, k, x, y, z)``."""
    k = provenance.get("top_k")
    return tuple(shape) if not k else (2, k, *shape[1:])


def stored_dtype(provenance: dict) -> str:
    k = provenance.get("top_k")
    return provenance["dtype"] if not k else top_k_dtype(len(provenance["channels"]))


def blocks(shape: tuple[int, ...], chunks: tuple[int, ...], max_values: int | None = None):
    """Chunk-aligned boxes (tuples of slices) that tile an array, each of at most ``max_values`` values
    (default :data:`BLOCK_VALUES`) where one chunk allows (a box is never smaller than a chunk): the
    unit of bounded-memory work."""
    max_values = max_values or BLOCK_VALUES
    per_chunk = int(np.prod(chunks))
    grid = [-(-s // c) for s, c in zip(shape, chunks)]
    group = [1] * len(shape)  # chunks per box along each axis, grown from the last axis outwards
    for axis in reversed(range(len(shape))):
        fit = max(1, max_values // (per_chunk * int(np.prod(group))))
        group[axis] = min(grid[axis], fit)
        if group[axis] < grid[axis]:
            break
    steps = [g * c for g, c in zip(group, chunks)]
    for corner in np.ndindex(*[-(-s // st) for s, st in zip(shape, steps)]):
        yield tuple(slice(i * st, min((i + 1) * st, s)) for i, st, s in zip(corner, steps, shape))
