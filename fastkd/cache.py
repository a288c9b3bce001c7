"""The soft-label cache on disk: layout, writer, reader, verification and inspection.

One Zarr v3 store holds the teacher ensemble's soft labels for every training case of one
(dataset, configuration, teacher set, temperature, mirroring, step, dtype, top-k); its path encodes
all of them (:meth:`fastkd.paths.Paths.softlabel_cache`). Layout::

    <name>.zarr/                 Zarr v3 group; its zarr.json is written LAST (by `fastkd cache
        zarr.json                finalize`, once every case is in), so the store opens only when complete
        <case>/                  one array per case, (C, x, y, z) uint8 or float16 (top-k: (2, k, x, y, z)
            zarr.json            uint8, see below), on nnU-Net's preprocessed grid: x, y, z equal the
            c/0/<i>/<j>/<k>      spatial shape of <case>.b2nd; chunks, every one written (also those
                                 equal to the fill value), so a missing chunk file is a damaged case
    <name>.zarr.partial/         cases being written, one folder per writer:
        <case>.w<pid>@<host>.<hex8>   a case appears under <name>.zarr/ only by a rename

Arrays. ``C`` is nnU-Net's number of segmentation heads in its own order: one channel per label
(background first) for softmax datasets, one per region for region-based (sigmoid) datasets.

- ``uint8``: value q means probability q / 255 (``scale`` = 1/255 in the attributes). Softmax channels
  are quantised by largest remainder, so every voxel's C values sum to exactly 255 (probabilities to 1)
  and each is within 1/255 of the teacher's; sigmoid channels are rounded (error <= 0.5/255).
- ``float16``: the probability itself (``scale`` = 1).
- Top-k (``softlabels.top_k`` = k, softmax datasets with many classes; ``top_k`` in the provenance):
  ``(2, k, x, y, z)`` uint8 (uint16 above 256 classes). ``[0, i]`` is the i-th largest probability x 255
  (descending; the k quantised by largest remainder to ``rint(255 x their sum)``), ``[1, i]`` its class
  index. The voxel's remaining mass ``1 - sum / 255`` is spread evenly over the other C - k classes
  when read (:func:`decode`), as FKD / ReLabel store ImageNet soft labels; each case records its mean
  and max (``top_k_dropped``), which ``fastkd cache info`` reports and ``verify`` checks.

Chunks hold every class of a block of voxels (the KD loss needs all of them) and at most
:data:`CHUNK_BYTES` (4 MiB) uncompressed, whatever C and the patch size: spatially the chunk is the
plans' patch (for 2d configurations ``1 x`` the patch), shrunk by one factor on every axis until it fits,
and cut to the volume. With few classes it is the patch itself (Hippocampus: 3 x 40 x 56 x 40 =
270 kB): a random training read of nnU-Net's initial patch (about 1.2-1.6 x the patch per axis)
touches at most 3 chunks per axis. With many it is smaller (118 classes, patch 128^3: 118 x 32^3 =
3.9 MB) so a read decompresses little beyond the crop; a 128^3-voxel chunk would be 247 MB. Codecs
(all in the Zarr v3 spec, so zarr-python and tensorstore read them):
bytes -> blosc (zstd, level 5; no shuffle for uint8, byte shuffle for float16) -> crc32c, so a
corrupted chunk raises a checksum error instead of decoding to wrong numbers. The training loader's
crop reads decode these chunk files directly (same codecs, checksum checked; :meth:`SoftLabelCache._chunk_parts`),
keeping only the classes present in each chunk; any other layout is read through zarr.

Integrity. A case is accepted (renamed into the store, finalized, opened by the reader, verified) only
with all its chunk files present (:func:`missing_chunks`); zarr would read a missing chunk as zeros.
Writers remove only their own ``.partial`` folders and those of dead writers of their host
(:func:`write_case`). ``finalize`` and the soft-label fill never remove the root before their checks
pass, so a failing run leaves a complete store complete. Each case records the sha256 of the
preprocessed case it came from (``preprocessed_sha256``, :func:`fingerprint`).

Attributes live under the key ``fastkd_softlabels``. On each case array::

    {"complete": true,              # rewritten last, just before the array is renamed into place
     "case", "shape": [C, x, y, z], "tiles": int, "teacher_forwards": int, "seconds": float,
     "teacher_folds": [[fold, ...], ...],   # the folds that made this case, per teacher folder of
                                            # provenance["teachers"] (all of them, or out-of-fold)
     "preprocessed_sha256": str,            # of the preprocessed <case>.b2nd it was computed from
     "top_k_dropped": {"mean", "max"},      # top-k only: 1 - stored mass per voxel
     "created": ISO time, "versions": {...}, "provenance": {...}}

On the root group::

    {"complete": true, "cases": {"<case>": [C, x, y, z], ...}, "teacher_forwards": int,
     "preprocessed_folder": path of the <case>.b2nd files, "created", "versions", "provenance": {...}}

``provenance`` is identical for every case of a store: ``format_version``, ``temperature``,
``activation`` (softmax | sigmoid), ``ensemble`` (how folds were combined), ``folds_per_case``
(``all``: every fold for every case; ``out_of_fold``: per case the folds that held it out, see
:mod:`fastkd.softlabels`), ``splits_sha256`` (sha256 of nnU-Net's splits_final.json that chose them
for ``out_of_fold``, else null), ``channels`` (names),
``labels`` and ``regions`` (dataset.json), ``teachers`` (per folder: ``name``, ``model_folder``,
``trainer``, ``plans_name``, ``configuration``, ``folds``, ``checkpoint``, ``sha256`` per fold,
``weight``), ``dataset_name``, ``plans_name``, ``configuration``, ``data_identifier``, ``spacing``,
``transpose_forward``, ``patch_size``, ``dtype``, ``scale``, ``step_size``, ``mirroring``,
``mirror_axes``, ``gaussian``, and ``top_k`` in top-k stores only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from glob import escape as glob_escape
from pathlib import Path

import numpy as np

from fastkd.errors import FastkdError

ATTR = "fastkd_softlabels"
FORMAT_VERSION = 1
DTYPES = {"uint8": 1.0 / 255.0, "float16": 1.0}  # dtype -> scale (stored value * scale = probability)


class CacheError(FastkdError):
    """The cache is missing, incomplete, corrupt, or does not match what its user expects."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    import fastkd
    from fastkd.io import package_version

    return {"fastkd": fastkd.__version__, **{p: package_version(p) for p in ("nnunetv2", "torch", "zarr")}}


def partial_dir(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".partial")


# -- encoding ------------------------------------------------------------------------------------
#: uncompressed bytes of one chunk at most (all C classes of a block of voxels; see chunk_shape)
CHUNK_BYTES = 4 * 2**20
#: values encoded (and verified) per step; encoding costs ~29 bytes per value (float32 temporaries and
#: int64 ranks), so a step holds ~230 MB whatever the case's size and number of classes
BLOCK_VALUES = 2**23


def encode(probs: np.ndarray, dtype: str, softmax: bool = True) -> np.ndarray:
    """Probabilities (C, ...) float32 -> stored values (see the module docstring).

    Works on the whole array at once (temporaries of ~29 bytes per value): callers with large cases
    encode block by block (:func:`write_case` does). The softmax rounding runs on the job's threads
    (:func:`_threads`), each on a slab of the voxels.
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
    descending order, [1] their class indices (module docstring, "Top-k").

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


def chunk_shape(shape: tuple[int, ...], patch_size: list[int], itemsize: int = 1,
                max_bytes: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunks for a (C, x, y, z) case read in patches of ``patch_size`` (see the module docstring).

    All C classes of a voxel share a chunk (the KD loss reads all of them); spatially the chunk is the
    patch (for 2d configurations ``1 x`` the patch), shrunk by one factor on every axis until the
    chunk holds at most ``max_bytes``, and cut to the volume.
    """
    lead, spatial = shape[:-3], shape[-3:]  # (C,) or, top-k, (2, k)
    patch = list(patch_size) if len(patch_size) == len(spatial) else [1, *patch_size]
    block = [max(1, min(s, p)) for s, p in zip(spatial, patch)]
    budget = max(1, max_bytes // (int(np.prod(lead)) * itemsize))  # voxels per chunk
    while int(np.prod(block)) > budget:
        axes = [i for i in range(len(block)) if block[i] > 1]
        largest = max(axes, key=lambda i: block[i] / patch[i])  # keep the patch's proportions
        block[largest] = max(1, int(block[largest] * 0.9))
    return (*lead, *block)


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


def _compressors(dtype: str) -> list:
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "noshuffle" if dtype == "uint8" else "shuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


def missing_chunks(array) -> list[str]:
    """The chunk keys of a zarr array (on a local store) that have no file.

    zarr reads a missing chunk as the fill value, i.e. probability 0 for every class: made-up values.
    Every chunk is written (``write_empty_chunks``), so a missing one means a damaged case.
    """
    root = Path(str(array.store_path.store.root)) / array.store_path.path
    return [key for key in (array.metadata.encode_chunk_key(c) for c in np.ndindex(*array.cdata_shape))
            if not (root / key).is_file()]


def _direct_layout(array):
    """(folder, little-endian dtype, chunk shape) when a case array has exactly the layout the writer makes
    (local store, regular chunks, default chunk keys, codecs bytes -> blosc -> crc32c), so its chunk files
    can be decoded without zarr (:meth:`SoftLabelCache._chunk_parts`); else None."""
    from zarr.codecs import BloscCodec, BytesCodec, Crc32cCodec
    from zarr.core.chunk_grids import RegularChunkGrid
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding

    meta = array.metadata
    codecs = getattr(meta, "codecs", ())
    if (getattr(meta, "zarr_format", None) != 3 or not isinstance(meta.chunk_grid, RegularChunkGrid)
            or not isinstance(meta.chunk_key_encoding, DefaultChunkKeyEncoding)
            or [type(c) for c in codecs] != [BytesCodec, BloscCodec, Crc32cCodec]
            or codecs[0].endian not in (None, "little") or sys.byteorder != "little"):
        return None
    root = getattr(array.store_path.store, "root", None)
    if root is None:
        return None
    return Path(str(root)) / array.store_path.path, np.dtype(array.dtype).newbyteorder("<"), meta.chunk_grid.chunk_shape


def _decode_chunk(root: Path, key: str, dtype: np.dtype, chunks: tuple[int, ...]) -> np.ndarray:
    """Chunk ``key`` of the array in ``root``, written with the writer's codecs (blosc frame + crc32c
    of it, little-endian), decoded."""
    import google_crc32c
    from numcodecs import blosc

    data = (root / key).read_bytes()
    if len(data) < 4 or google_crc32c.value(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise ValueError(f"chunk {key}: stored and computed checksum do not match")
    chunk = np.frombuffer(blosc.decompress(data[:-4]), dtype)
    if chunk.size != int(np.prod(chunks)):
        raise ValueError(f"chunk {key}: {chunk.size} values decoded, a chunk holds {int(np.prod(chunks))}")
    return chunk.reshape(chunks)


def _open_whole(store: Path, case: str):
    """(the case's zarr array, None) when it opens with every chunk, else (None, the problem line)."""
    import zarr

    try:
        array = zarr.open_array(str(store / case), mode="r")
        _check_chunks(array, case)
        return array, None
    except CacheError as e:
        return None, str(e)
    except Exception as e:
        return None, f"{case}: unreadable ({type(e).__name__}: {e})"


def _check_chunks(array, what: str) -> None:
    missing = missing_chunks(array)
    if missing:
        raise CacheError(f"{what}: {len(missing)} of {int(np.prod(array.cdata_shape))} chunks missing "
                         f"(e.g. {', '.join(missing[:3])}); rerun its soft-label job")


# -- writing -------------------------------------------------------------------------------------
def _node_attrs(node: Path) -> dict | None:
    try:
        return json.loads((node / "zarr.json").read_text())["attributes"][ATTR]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def case_attrs(store: str | Path, case: str) -> dict | None:
    """The ``fastkd_softlabels`` attributes of a case in the store, or None if it is not there."""
    return _node_attrs(Path(store) / case)


def root_attrs(store: str | Path) -> dict | None:
    """The store's root attributes, or None before finalize wrote them."""
    return _node_attrs(Path(store))


def is_current(store: str | Path, case: str, provenance: dict, shape: tuple[int, ...],
               preprocessed_sha256: str | None = None) -> bool:
    """A complete case with this provenance and shape, made from the preprocessed case with this
    fingerprint (:func:`fingerprint`, when given) and with all its chunks, is already in the store
    (a rerun skips it)."""
    import zarr

    attrs = case_attrs(store, case)
    if not (attrs and attrs.get("complete") and attrs.get("provenance") == provenance
            and tuple(attrs.get("shape", ())) == tuple(shape)):
        return False
    if preprocessed_sha256 is not None and attrs.get("preprocessed_sha256") != preprocessed_sha256:
        return False
    try:
        return not missing_chunks(zarr.open_array(str(Path(store) / case), mode="r"))
    except Exception:
        return False


def invalidate(store: str | Path) -> None:
    """Remove the root zarr.json: while cases are (re)written the store must not open as complete.

    Called just before the first case is written, never before checks that may fail, so a failing
    run leaves a complete store complete.
    """
    (Path(store) / "zarr.json").unlink(missing_ok=True)


def _writer_tag() -> str:
    """``w<pid>@<host>``: who owns a folder under ``.partial`` (dots in the host name become ``_``)."""
    return f"w{os.getpid()}@{socket.gethostname().replace('.', '_')}"


_PARTIAL = re.compile(r"\.w(\d+)@([^.]+)\.[0-9a-f]{8}$")


def _writer_is_gone(name: str) -> bool:
    """Whether the writer that made the ``.partial`` entry ``name`` is dead (a process of this host that
    no longer exists). A writer on another host, or a name in no known form, counts as alive: its folder
    is left alone (one of two duplicate cluster jobs must not delete the other's data)."""
    match = _PARTIAL.search(name)
    if not match or match.group(2) != socket.gethostname().replace(".", "_"):
        return False
    try:
        os.kill(int(match.group(1)), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _entries(tmp_root: Path, case: str) -> list[Path]:
    """The ``.partial`` entries of ``case`` (``<case>.w<pid>@<host>.<hex8>``)."""
    return [p for p in tmp_root.glob(f"{glob_escape(case)}.w*") if _PARTIAL.fullmatch(p.name[len(case):])]


def _remove_dead_partials(tmp_root: Path, case: str | None = None) -> list[str]:
    """Remove the ``.partial`` entries (of ``case``, or all) whose writer is dead; return those kept."""
    kept = []
    for entry in (_entries(tmp_root, case) if case is not None else sorted(tmp_root.iterdir())):
        if _writer_is_gone(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        else:
            kept.append(entry.name)
    return kept


def write_case(store: str | Path, case: str, probs: np.ndarray, provenance: dict, extra: dict | None = None) -> Path:
    """Write one case atomically: to ``<store>.partial/``, check, mark complete, rename into the store.

    ``probs``: float32 probabilities (C, x, y, z); they are encoded block by block (:func:`blocks`), so
    the extra memory is bounded whatever the case's size; zarr compresses and writes one block in a
    thread while the next one is encoded (one more encoded block in memory). Every chunk is written,
    also those equal to the fill value, and the rename happens only when every chunk file is there.

    The folder being written is ``<store>.partial/<case>.w<pid>@<host>.<hex8>``. A writer removes only
    its own folders and those of dead writers of its host (a killed job), never those of a live one (a
    duplicate cluster job writing the same case: both finish, the last rename wins, and every
    version is complete). A job killed at any point leaves at most a folder under ``.partial``
    (never read) and, if it replaced an older version, no case at all.
    """
    import zarr

    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    tmp_root = partial_dir(store)
    tmp_root.mkdir(exist_ok=True)
    _remove_dead_partials(tmp_root, case)
    dtype, k = stored_dtype(provenance), provenance.get("top_k")
    softmax = provenance["activation"] == "softmax"
    if k and not softmax:
        raise CacheError("softlabels.top_k needs a softmax (label-based) dataset; region-based soft labels are "
                         "independent per region and are stored whole (set softlabels.top_k: null)")
    attrs = {"case": case, "shape": list(probs.shape), **(extra or {}), "created": now(), "versions": versions(),
             "provenance": provenance}
    tmp = tmp_root / f"{case}.{_writer_tag()}.{uuid.uuid4().hex[:8]}"
    shape = stored_shape(probs.shape, provenance)
    chunks = chunk_shape(shape, provenance["patch_size"], np.dtype(dtype).itemsize)
    array = zarr.create_array(str(tmp), shape=shape, chunks=chunks, dtype=dtype,
                              compressors=_compressors(dtype), fill_value=0, config={"write_empty_chunks": True},
                              attributes={ATTR: {"complete": False, **attrs}})
    dropped_sum, dropped_max = 0.0, 0.0
    # one block is compressed and written (zarr, in a thread) while the next one is encoded
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastkd-write") as writer:
        pending = None
        for box in blocks(shape, chunks):
            dense = probs[(slice(None), *box[-3:])]
            if k:
                stored = encode_top_k(dense, k)
                dropped = 1 - stored[0].sum(axis=0, dtype=np.float64) / 255
                dropped_sum, dropped_max = dropped_sum + float(dropped.sum()), max(dropped_max, float(dropped.max()))
            else:
                stored = encode(dense, dtype, softmax)
            if pending is not None:
                pending.result()  # raises the write's error, if any
            pending = writer.submit(array.__setitem__, box, stored)
        if pending is not None:
            pending.result()
    if k:  # the probability mass not stored per voxel (spread evenly over the other classes when read)
        attrs["top_k_dropped"] = {"mean": dropped_sum / int(np.prod(shape[2:])), "max": dropped_max}
    _check_chunks(array, f"{case} (just written to {tmp})")
    array.attrs[ATTR] = {"complete": True, **attrs}
    final, trash = store / case, []
    while True:  # rename over the old version; a concurrent writer may move it at the same time
        try:
            os.rename(tmp, final)
            break
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        old = tmp_root / f"{case}.{_writer_tag()}.{uuid.uuid4().hex[:8]}"
        try:
            os.rename(final, old)  # an outdated version: aside first (a directory cannot replace a full one)
            trash.append(old)
        except FileNotFoundError:  # the other writer moved it first
            pass
    for old in trash:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_root(store: Path, attributes: dict) -> None:
    """Write the store's root ``zarr.json`` in one rename (zarr writes it in a scratch folder first),
    so the root is at every moment absent, the old one or the new one."""
    import zarr

    partial_dir(store).mkdir(exist_ok=True)
    scratch = partial_dir(store) / f".root.{_writer_tag()}.{uuid.uuid4().hex[:8]}"
    try:
        zarr.create_group(str(scratch), attributes=attributes)
        os.replace(scratch / "zarr.json", store / "zarr.json")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def finalize(store: str | Path, expected: dict[str, list[int]], preprocessed_folder: str | Path | None = None) -> dict:
    """Check every expected case is in the store, complete and consistent; then write the root.

    ``expected``: case -> spatial shape ``[x, y, z]`` (or the full ``[C, x, y, z]`` of the
    preprocessed image, whose C is ignored). Every case must have all its chunks. Raises
    :class:`CacheError` naming every bad case; the store is left as it was then (a complete store
    stays complete). Returns the root attributes.
    """
    store = Path(store)
    problems, cases, provenance, forwards = [], {}, None, 0
    for case in sorted(expected):
        attrs = case_attrs(store, case)
        if attrs is None:
            problems.append(f"{case}: missing")
            continue
        if not attrs.get("complete"):
            problems.append(f"{case}: not marked complete")
            continue
        if list(attrs["shape"][1:]) != list(expected[case][-3:]):
            problems.append(f"{case}: shape {attrs['shape']} does not match the preprocessed case {expected[case]}")
            continue
        if provenance is None:
            provenance, first = attrs["provenance"], case
        elif attrs["provenance"] != provenance:
            diff = sorted(k for k in set(provenance) | set(attrs["provenance"])
                          if provenance.get(k) != attrs["provenance"].get(k))
            problems.append(f"{case}: written with other settings than {first} ({', '.join(diff)} differ)")
            continue
        problem = _open_whole(store, case)[1]
        if problem:
            problems.append(problem)
            continue
        cases[case] = attrs["shape"]
        forwards += attrs.get("teacher_forwards", 0)
    if problems:
        raise CacheError(f"soft-label cache {store} is not complete ({len(problems)} of {len(expected)} cases):\n  - "
                         + "\n  - ".join(problems) + "\nrerun the soft-label jobs (snakemake ... softlabels)")
    root = {"complete": True, "cases": cases, "teacher_forwards": forwards,
            "preprocessed_folder": str(Path(preprocessed_folder).resolve()) if preprocessed_folder else None,
            "created": now(), "versions": versions(), "provenance": provenance}
    _write_root(store, {ATTR: root})  # the last write
    if partial_dir(store).is_dir() and not _remove_dead_partials(partial_dir(store)):
        shutil.rmtree(partial_dir(store), ignore_errors=True)
    return root


# -- reading -------------------------------------------------------------------------------------
class SoftLabelCache:
    """Read access to a complete soft-label cache, for the student's data loader.

    Open it once; arrays are opened on first use and kept, and a crop decompresses only the chunks
    it touches. ``read_crop`` returns float32 probabilities plus a last "valid" channel (1 inside the
    volume, 0 in the zero padding of boxes that reach outside it), the form nnU-Net's augmentation
    carries as ``regression_target``.
    """

    def __init__(self, path: str | Path):
        import zarr

        self.path = Path(path)
        if not (self.path / "zarr.json").is_file():
            present = sorted(p.name for p in self.path.iterdir() if p.is_dir()) if self.path.is_dir() else []
            raise CacheError(
                f"{self.path} is not a complete soft-label cache: it has no root zarr.json "
                + (f"({len(present)} case arrays present; its soft-label jobs or `fastkd cache finalize` have "
                   "not finished)" if self.path.is_dir() else "(the folder does not exist)"))
        try:
            group = zarr.open_group(str(self.path), mode="r")
            attrs = group.attrs[ATTR]
        except Exception as e:
            raise CacheError(f"{self.path} is not a fastkd soft-label cache ({e})") from e
        if not attrs.get("complete"):
            raise CacheError(f"{self.path} is not marked complete; rerun its soft-label jobs")
        self.attrs = attrs
        self.provenance: dict = attrs["provenance"]
        self.cases: dict[str, list[int]] = attrs["cases"]
        self.scale = np.float32(self.provenance["scale"])
        self.num_channels = len(self.provenance["channels"])
        self._arrays: dict = {}

    @property
    def temperature(self) -> float:
        return self.provenance["temperature"]

    def check(self, *, temperature: float | None = None, labels: dict | None = None,
              data_identifier: str | None = None, configuration: str | None = None,
              shapes: dict[str, list[int]] | None = None) -> None:
        """Raise :class:`CacheError` listing every way the cache differs from what the caller expects.

        ``shapes``: case -> spatial (or full C, x, y, z) shape of the preprocessed case; every case
        must be in the cache with that spatial shape.
        """
        p, problems = self.provenance, []
        if temperature is not None and not np.isclose(p["temperature"], temperature):
            problems.append(f"temperature: the cache was made with T = {p['temperature']}, expected T = {temperature} "
                            "(use the cache for that T, or set distillation.temperature to the cache's)")
        if labels is not None and p["labels"] != labels:
            problems.append(f"labels: the cache has {p['labels']}, expected {labels}")
        if data_identifier is not None and p["data_identifier"] != data_identifier:
            problems.append(f"grid: the cache is on {p['data_identifier']!r}, expected {data_identifier!r}")
        if configuration is not None and p["configuration"] != configuration:
            problems.append(f"configuration: the cache is {p['configuration']!r}, expected {configuration!r}")
        for case, shape in (shapes or {}).items():
            if case not in self.cases:
                problems.append(f"case {case}: not in the cache")
            elif list(self.cases[case][1:]) != list(shape[-3:]):
                problems.append(f"case {case}: cache shape {self.cases[case][1:]} != preprocessed {list(shape[-3:])}")
        if problems:
            raise CacheError(f"soft-label cache {self.path} does not match:\n  - " + "\n  - ".join(problems))

    def array(self, case: str):
        """The case's zarr array (opened once), after checking it is complete and consistent."""
        array = self._arrays.get(case)
        if array is not None:
            return array
        import zarr

        if case not in self.cases:
            raise CacheError(f"case {case!r} is not in the soft-label cache {self.path} "
                             f"({len(self.cases)} cases, e.g. {', '.join(list(self.cases)[:3])})")
        try:
            array = zarr.open_array(str(self.path / case), mode="r")
            attrs = array.attrs[ATTR]
        except Exception as e:
            raise CacheError(f"soft-label cache {self.path}: case {case} cannot be opened ({e})") from e
        if not attrs.get("complete") or attrs.get("provenance") != self.provenance:
            raise CacheError(f"soft-label cache {self.path}: case {case} is incomplete or was written with "
                             "other settings than the cache; rerun its soft-label job")
        if list(array.shape) != list(stored_shape(self.cases[case], self.provenance)):
            raise CacheError(f"soft-label cache {self.path}: case {case} has shape {list(array.shape)}, "
                             f"the cache lists {self.cases[case]}"
                             + (f" (top-{self.top_k}: {list(stored_shape(self.cases[case], self.provenance))})"
                                if self.top_k else ""))
        _check_chunks(array, f"soft-label cache {self.path}: case {case}")  # else zarr reads zeros
        self._arrays[case] = array
        return array

    def _read(self, case: str, selection: tuple) -> np.ndarray:
        try:
            return self.array(case)[selection]
        except CacheError:
            raise
        except Exception as e:  # checksum mismatch, truncated or missing chunk, ...
            raise CacheError(f"soft-label cache {self.path}: case {case} is corrupt ({type(e).__name__}: {e}); "
                             "run `fastkd cache verify` and rerun its soft-label job") from e

    @property
    def top_k(self) -> int | None:
        """k of a top-k cache (None: every class stored)."""
        return self.provenance.get("top_k")

    def read(self, case: str) -> np.ndarray:
        """The whole case as float32 probabilities (C, x, y, z) (top-k caches: densified)."""
        return decode(self._read(case, (slice(None),) * len(self.array(case).shape)), self.provenance)

    def _crop(self, case: str, bbox) -> tuple[list[int], np.ndarray | None, tuple]:
        """(box sizes, the stored values of the box's part inside the volume or None, where that part
        sits in the box) for a half-open voxel box that may reach outside the volume."""
        sizes, lo, hi, dst = self._clip(case, bbox)
        if lo is None:
            return sizes, None, dst
        array = self.array(case)
        out = np.empty((*array.shape[:-3], *(h - l for l, h in zip(lo, hi))), array.dtype)
        for part, where in self._chunk_parts(case, lo, hi):
            out[(Ellipsis, *where)] = part
        return sizes, out, dst

    def _clip(self, case: str, bbox):
        """(box sizes, lo, hi of its part inside the volume (None, None if empty), where that part sits
        in the box) for a half-open voxel box ``[[lo, hi], ...]`` that may reach outside the volume."""
        shape = self.array(case).shape[-3:]
        sizes = [int(hi) - int(lo) for lo, hi in bbox]
        lo = [max(int(b[0]), 0) for b in bbox]
        hi = [min(int(b[1]), s) for b, s in zip(bbox, shape)]
        dst = tuple(slice(l - int(b[0]), h - int(b[0])) for l, h, b in zip(lo, hi, bbox))
        if not all(h > l for l, h in zip(lo, hi)):
            return sizes, None, None, dst
        return sizes, lo, hi, dst

    def _chunk_parts(self, case: str, lo, hi):
        """Yield ``(part, where)`` for every chunk the spatial box ``[lo, hi)`` (inside the volume) touches:
        ``part`` the chunk's stored values inside the box (every leading axis: classes, or top-k's (2, k)),
        ``where`` its slices in the box.

        The training loader's hot path: the chunk files are read and decoded here, one at a time, with
        the codecs the writer uses (bytes -> blosc -> crc32c, :func:`_compressors`, checksum checked),
        instead of through zarr's asynchronous pipeline (on a 119-class crop of 96 x 116 x 116 zarr's
        read alone took ~0.7 s, about three times the blosc decoding it does), and a caller can keep
        only the classes present in each chunk. An array with any other layout is read through zarr."""
        array = self.array(case)
        layout = _direct_layout(array)
        if layout is None:
            box = (*(slice(None),) * (array.ndim - 3), *(slice(l, h) for l, h in zip(lo, hi)))
            yield self._read(case, box), tuple(slice(0, h - l) for l, h in zip(lo, hi))
            return
        root, dtype, chunks = layout
        spatial = chunks[-3:]
        ranges = [range(l // c, -(-h // c)) for l, h, c in zip(lo, hi, spatial)]
        for index in np.ndindex(*(len(r) for r in ranges)):
            coords = [r[i] for r, i in zip(ranges, index)]
            key = array.metadata.encode_chunk_key((*(0,) * (array.ndim - 3), *coords))
            try:
                chunk = _decode_chunk(root, key, dtype, chunks)
            except Exception as e:  # missing, truncated or corrupt chunk
                raise CacheError(f"soft-label cache {self.path}: case {case} is corrupt ({type(e).__name__}: {e}); "
                                 "run `fastkd cache verify` and rerun its soft-label job") from e
            start = [c * n for c, n in zip(coords, spatial)]
            inner = tuple(slice(max(l, s) - s, min(h, s + n) - s) for l, h, s, n in zip(lo, hi, start, spatial))
            where = tuple(slice(max(l, s) - l, min(h, s + n) - l) for l, h, s, n in zip(lo, hi, start, spatial))
            yield chunk[(Ellipsis, *inner)], where

    def read_crop(self, case: str, bbox) -> np.ndarray:
        """Soft labels of a half-open voxel box ``[[lo, hi], ...]`` (per spatial axis) as float32.

        Returns ``(C + 1, *sizes)``: the C probabilities, zero outside the volume, then a "valid"
        channel (1 inside the volume, 0 outside). Boxes may reach outside the volume, as nnU-Net's
        ``get_bbox`` produces them.
        """
        sizes, src, dst = self._crop(case, bbox)
        out = np.zeros((self.num_channels + 1, *sizes), dtype=np.float32)
        if src is not None:
            if self.top_k:
                out[(slice(0, self.num_channels), *dst)] = decode(src, self.provenance)
            else:
                np.multiply(src, self.scale, out=out[(slice(0, self.num_channels), *dst)], casting="unsafe")
            out[(self.num_channels, *dst)] = 1.0
        return out


    def read_crop_classes(self, case: str, bbox) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The crop of :meth:`read_crop` with only the classes present in it: ``(values, classes, rest)``.

        ``classes``: int64 indices of the classes with a value above zero somewhere in the stored crop
        (plus class 0 of softmax caches, which receives the padding later, and at least one class);
        ``values``: float32 ``(K, *sizes)`` of those classes, zero outside the volume. Every other
        class is zero in the crop (dense caches; ``rest`` is None) or, in top-k caches, equals
        ``rest`` (float32 ``(*sizes)``: the spread mass, zero outside the volume). So the full
        :meth:`read_crop` is ``values`` at ``classes`` and ``rest`` (or 0) elsewhere, and a linear
        resampling (nnU-Net's spatial augmentation) of the K (+ 1) channels gives the same as of all C.
        """
        always = [0] if self.provenance["activation"] == "softmax" else []
        if not self.top_k:
            return self._present_dense(case, bbox, always)
        sizes, src, dst = self._crop(case, bbox)
        inside = src is not None
        n, k = self.num_channels, self.top_k
        classes = np.union1d(always, np.unique(src[1]) if inside else []).astype(np.int64)
        classes = classes if classes.size else np.zeros(1, np.int64)
        values = np.zeros((len(classes), *sizes), np.float32)
        rest = np.zeros(sizes, np.float32)
        if inside:
            stored = src[0].astype(np.float32) * self.scale
            spread = (1 - stored.sum(axis=0)) / np.float32(n - k)
            rest[dst] = spread
            inner = values[(slice(None), *dst)]  # a view: the part of the box inside the volume
            inner[...] = spread  # a class not among a voxel's k gets the spread rest ...
            position = np.zeros(n, np.intp)
            position[classes] = np.arange(len(classes))
            np.put_along_axis(inner, position[src[1]], stored, axis=0)  # ... one among them its value
        return values, classes, rest

    def _present_dense(self, case: str, bbox, always: list[int]):
        """:meth:`read_crop_classes` of a dense cache, chunk by chunk: each chunk's part of the box keeps
        only its rows above zero, so absent classes are never copied or converted."""
        sizes, lo, hi, dst = self._clip(case, bbox)
        parts, found = [], set(always)
        for part, where in (self._chunk_parts(case, lo, hi) if lo is not None else ()):
            rows = np.flatnonzero(part.max(axis=(1, 2, 3)) > 0)
            found.update(rows.tolist())
            parts.append((rows, part[rows], where))
        classes = np.array(sorted(found) or [0], np.int64)  # one channel at least
        stored = np.zeros((len(classes), *sizes), self.array(case).dtype if parts else np.uint8)
        if parts:
            position = np.zeros(self.num_channels, np.intp)
            position[classes] = np.arange(len(classes))
            inner = stored[(slice(None), *dst)]  # a view: the part of the box inside the volume
            for rows, planes, where in parts:
                for row, plane in zip(position[rows], planes):
                    inner[(row, *where)] = plane  # stored dtype, a slice: a plain copy
        # one contiguous pass: uint8 -> float32 probabilities (float16 caches: scale 1)
        values = np.multiply(stored, self.scale, dtype=np.float32)
        return values, classes, None


# -- inspection ----------------------------------------------------------------------------------
def _case_dirs(store: Path) -> list[str]:
    return sorted(p.name for p in store.iterdir() if (p / "zarr.json").is_file()) if store.is_dir() else []


def _bytes_on_disk(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def info(store: str | Path) -> dict:
    """What ``fastkd cache info`` prints: cases, shapes, dtype, bytes, compression, provenance, completeness."""
    store = Path(store)
    if not store.is_dir():
        raise CacheError(f"{store} does not exist (give the path of a soft-label cache *.zarr)")
    root = root_attrs(store)
    cases, provenance = {}, (root or {}).get("provenance")
    for case in _case_dirs(store):
        attrs = case_attrs(store, case) or {}
        shape, prov = attrs.get("shape"), attrs.get("provenance") or {"dtype": "uint8"}
        values = int(np.prod(shape)) if shape else 0  # dense: C x voxels
        stored = int(np.prod(stored_shape(shape, prov))) if shape else 0
        cases[case] = {"shape": shape, "complete": bool(attrs.get("complete")), "bytes": _bytes_on_disk(store / case),
                       "logical_bytes": stored * np.dtype(stored_dtype(prov)).itemsize, "values": values,
                       "voxels": values // shape[0] if shape else 0, "teacher_folds": attrs.get("teacher_folds"),
                       "top_k_dropped": attrs.get("top_k_dropped")}
        provenance = provenance or attrs.get("provenance")
    total = sum(c["bytes"] for c in cases.values())
    logical = sum(c["logical_bytes"] for c in cases.values())
    dropped = [c for c in cases.values() if c["top_k_dropped"]]
    return {
        "top_k_dropped": {"mean": sum(c["top_k_dropped"]["mean"] * c["voxels"] for c in dropped)
                          / max(1, sum(c["voxels"] for c in dropped)),
                          "max": max(c["top_k_dropped"]["max"] for c in dropped)} if dropped else None,
        "path": str(store), "complete": bool(root and root.get("complete")),
        "n_cases": len(cases), "expected_cases": len(root["cases"]) if root else None,
        "bytes": total, "logical_bytes": logical, "float32_bytes": 4 * sum(c["values"] for c in cases.values()),
        "compression_ratio": logical / total if total else None,
        "teacher_forwards": (root or {}).get("teacher_forwards"),
        "partial": sorted(p.name for p in partial_dir(store).iterdir()) if partial_dir(store).is_dir() else [],
        "provenance": provenance, "cases": cases,
    }


def format_info(report: dict, list_cases: bool = False) -> str:
    def mb(n):
        return f"{n / 1e6:.2f} MB"

    p = report["provenance"] or {}
    lines = [f"soft-label cache {report['path']}",
             f"  complete:      {'yes' if report['complete'] else 'NO (root not written: jobs unfinished or failed)'}",
             f"  cases:         {report['n_cases']}" + (f" of {report['expected_cases']}" if report["expected_cases"] else "")]
    if p:
        lines += [f"  dtype:         {p['dtype']} (probability = value x {p['scale']:.6g})",
                  f"  channels:      {', '.join(p['channels'])} ({p['activation']})",
                  f"  temperature:   {p['temperature']}",
                  f"  grid:          {p['dataset_name']} {p['plans_name']} {p['configuration']} "
                  f"({p['data_identifier']}), spacing {p['spacing']}, patch {p['patch_size']}",
                  f"  prediction:    sliding window step {p['step_size']}, gaussian, "
                  + (f"mirroring over axes {p['mirror_axes']}" if p["mirroring"] else "no mirroring"),
                  f"  ensemble:      {p['ensemble']}",
                  "  stored:        " + (f"top-{p['top_k']} (per voxel the {p['top_k']} largest probabilities "
                                          "and their classes; the rest spread evenly over the other classes)"
                                          if p.get("top_k") else "every class"),
                  f"  folds/case:    {p.get('folds_per_case', 'all')}"  # stores before the key: all
                  + (f" (split sha256 {p['splits_sha256'][:16]}...)" if p.get("splits_sha256") else "")]
        for t in p["teachers"]:
            lines.append(f"  teacher:       {t['model_folder']} folds {t['folds']} ({t['checkpoint']}), "
                         f"weight {t['weight']}")
            lines += [f"                   fold {f}: sha256 {h[:16]}..." for f, h in t["sha256"].items()]
    ratio = report["compression_ratio"]
    lines += [f"  on disk:       {mb(report['bytes'])} (uncompressed {mb(report['logical_bytes'])}, "
              f"as float32 {mb(report['float32_bytes'])}; compression {ratio:.1f}x)" if ratio else
              f"  on disk:       {mb(report['bytes'])}"]
    if report.get("top_k_dropped"):
        d = report["top_k_dropped"]
        lines.append(f"  top-k dropped: mean {d['mean']:.4g}, max {d['max']:.4g} of each voxel's probability mass "
                     "(1 - sum of the stored top-k)")
    if report["teacher_forwards"]:
        lines.append(f"  teacher forwards spent: {report['teacher_forwards']}")
    if report["partial"]:
        lines.append(f"  unfinished writes in .partial: {', '.join(report['partial'])}")
    incomplete = [c for c, v in report["cases"].items() if not v["complete"]]
    if incomplete:
        lines.append(f"  incomplete cases: {', '.join(incomplete)}")
    if list_cases:
        lines.append("  case                      shape                 bytes   ratio  teacher folds")
        for case, v in report["cases"].items():
            r = v["logical_bytes"] / v["bytes"] if v["bytes"] else 0
            lines.append(f"  {case:<25} {str(v['shape']):<20} {v['bytes']:>8} {r:>6.1f}x  {v['teacher_folds'] or ''}")
    return "\n".join(lines)


def fingerprint(preprocessed_folder: str | Path, case: str) -> str:
    """sha256 of the preprocessed ``<case>.b2nd`` the soft labels were computed from (recorded per case
    as ``preprocessed_sha256``; a re-preprocessed case no longer matches, so its soft labels are redone)."""
    from fastkd.io import sha256

    return sha256(Path(preprocessed_folder) / f"{case}.b2nd")


def verify(store: str | Path, preprocessed_folder: str | Path | None = None, tolerance: float | None = None) -> list[str]:
    """Read every chunk of every case; return one problem line per bad case (empty: all good).

    Checks: the store is finalized and lists every case present; every chunk file is there (zarr
    would read a missing one as zeros); checksums (crc32c, on every chunk read); values finite and in
    [0, 1]; softmax voxels sum to one (uint8: exactly 255; float16: within ``tolerance``, default
    1e-2); shape and fingerprint (sha256) equal the preprocessed ``<case>.b2nd`` in
    ``preprocessed_folder`` (default: the folder recorded in the root attributes). Cases are read
    block by block (:func:`blocks`), so memory stays bounded.
    """
    import blosc2

    store = Path(store)
    if not store.is_dir():
        raise CacheError(f"{store} does not exist (give the path of a soft-label cache *.zarr)")
    problems = []
    root = root_attrs(store)
    if not root or not root.get("complete"):
        problems.append("(store): not finalized (no complete root zarr.json); its soft-label jobs have not finished")
    present = _case_dirs(store)
    listed = list((root or {}).get("cases", {}))
    problems += [f"{c}: listed in the root but missing" for c in listed if c not in present]
    folder = preprocessed_folder or (root or {}).get("preprocessed_folder")
    if folder is None or not Path(folder).is_dir():
        problems.append(f"(store): preprocessed folder {folder} not found, cannot compare shapes "
                        "(pass --preprocessed nnUNet_preprocessed/<ds>/<data_identifier>)")
        folder = None
    for case in present:
        attrs = case_attrs(store, case)
        if not attrs or not attrs.get("complete"):
            problems.append(f"{case}: not marked complete")
            continue
        p = attrs["provenance"]
        if root and root.get("provenance") and p != root["provenance"]:
            problems.append(f"{case}: written with other settings than the store's root")
        array, problem = _open_whole(store, case)
        if problem:
            problems.append(problem)
            continue
        case_problems = _verify_values(case, array, p, tolerance)
        problems += case_problems
        if folder is not None and not case_problems:
            b2nd = Path(folder) / f"{case}.b2nd"
            if not b2nd.is_file():
                problems.append(f"{case}: no preprocessed {b2nd}")
            elif tuple(blosc2.open(str(b2nd), mode="r").shape[1:]) != tuple(array.shape[1:]):
                problems.append(f"{case}: shape {list(array.shape[1:])} != preprocessed "
                                f"{list(blosc2.open(str(b2nd), mode='r').shape[1:])}")
            elif attrs.get("preprocessed_sha256") and fingerprint(folder, case) != attrs["preprocessed_sha256"]:
                problems.append(f"{case}: the preprocessed case changed since its soft labels were made (sha256 "
                                f"of {b2nd.name} differs); rerun its soft-label job")
    return problems


def _verify_values(case: str, array, provenance: dict, tolerance: float | None) -> list[str]:
    """Value checks of one case, block by block; at most one line per kind of problem."""
    if provenance.get("top_k"):
        return _verify_top_k(case, array, provenance)
    scale, nonfinite, low, high, unsummed = np.float32(provenance["scale"]), 0, np.inf, -np.inf, 0
    try:
        for box in blocks(array.shape, array.chunks):
            data = array[box]
            values = data.astype(np.float32) * scale
            finite = np.isfinite(values)
            nonfinite += int((~finite).sum())
            if finite.any():
                low, high = min(low, float(values[finite].min())), max(high, float(values[finite].max()))
            if provenance["activation"] == "softmax":
                if provenance["dtype"] == "uint8":
                    unsummed += int((data.sum(axis=0, dtype=np.int32) != 255).sum())
                else:
                    unsummed += int((np.abs(values.sum(axis=0) - 1) > (tolerance or 1e-2)).sum())
    except Exception as e:
        return [f"{case}: unreadable ({type(e).__name__}: {e})"]
    if nonfinite:
        return [f"{case}: {nonfinite} non-finite values"]
    problems = []
    if low < 0 or high > 1 + 1e-3:
        problems.append(f"{case}: values outside [0, 1] (min {low:.4g}, max {high:.4g})")
    if unsummed:
        problems.append(f"{case}: {unsummed} voxels whose probabilities do not sum to 1")
    return problems


def _verify_top_k(case: str, array, provenance: dict) -> list[str]:
    """Top-k checks: values in descending order summing to at most 255, class indices valid and distinct
    per voxel, and the recorded dropped mass (``top_k_dropped``) equal to the data's."""
    n, k = len(provenance["channels"]), provenance["top_k"]
    bad_sum = bad_index = bad_order = duplicate = 0
    dropped_sum, dropped_max = 0.0, 0.0
    try:
        for box in blocks(array.shape, array.chunks):
            data = array[box]
            values, index = data[0].astype(np.int32), data[1].astype(np.int32)
            total = values.sum(axis=0)
            bad_sum += int((total > 255).sum())
            bad_index += int((index >= n).any(axis=0).sum())
            bad_order += int((np.diff(values, axis=0) > 0).any(axis=0).sum())
            duplicate += int(sum(((index[i] == index[j]).sum() for i in range(k) for j in range(i + 1, k)), 0))
            dropped = 1 - total / 255
            dropped_sum, dropped_max = dropped_sum + float(dropped.sum()), max(dropped_max, float(dropped.max()))
    except Exception as e:
        return [f"{case}: unreadable ({type(e).__name__}: {e})"]
    problems = [f"{case}: {count} voxels {what}" for count, what in (
        (bad_sum, "whose top-k probabilities sum to more than 1"), (bad_index, f"with a class index >= {n}"),
        (bad_order, "whose top-k values are not in descending order"), (duplicate, "with a class stored twice"))
        if count]
    recorded = (case_attrs(Path(str(array.store_path.store.root)), array.store_path.path) or {}).get("top_k_dropped")
    mean = dropped_sum / int(np.prod(array.shape[2:]))
    if not recorded or abs(recorded["mean"] - mean) > 1e-6 or abs(recorded["max"] - dropped_max) > 1e-6:
        problems.append(f"{case}: recorded top-k dropped mass {recorded} != the data's (mean {mean:.6g}, "
                        f"max {dropped_max:.6g})")
    return problems


def show(store: str | Path, case: str, out: str | Path, preprocessed_folder: str | Path | None = None,
         axis: int = 2, index: int | None = None) -> Path:
    """A PNG of one slice: image, reference label, and every channel's soft labels.

    The slice is perpendicular to spatial ``axis`` (0-2); by default the one with the most
    foreground probability. Image and label come from the preprocessed case when it is found.
    """
    import blosc2
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import zarr

    store = Path(store)
    attrs = case_attrs(store, case)
    if attrs is None:
        raise CacheError(f"case {case!r} is not in {store} (cases: {', '.join(_case_dirs(store)[:5]) or 'none'})")
    p = attrs["provenance"]
    try:
        probs = decode(zarr.open_array(str(store / case), mode="r")[...], p)
    except Exception as e:
        raise CacheError(f"{store}: case {case} is corrupt ({e})") from e
    foreground = probs[1:].sum(axis=0) if p["activation"] == "softmax" else probs.max(axis=0)
    if index is None:
        other = tuple(a for a in range(3) if a != axis)
        index = int(np.argmax(foreground.sum(axis=other)))
    if not 0 <= index < probs.shape[1 + axis]:
        raise CacheError(f"slice index {index} is outside axis {axis} of size {probs.shape[1 + axis]}")

    def take(volume):  # (x, y, z) -> 2-D slice, shown with the first remaining axis vertical
        return np.take(volume, index, axis=axis)

    root = root_attrs(store) or {}
    folder = Path(preprocessed_folder or root.get("preprocessed_folder") or "")
    panels = []
    if (folder / f"{case}.b2nd").is_file():
        panels.append(("image (channel 0)", take(blosc2.open(str(folder / f"{case}.b2nd"), mode="r")[0]), "gray", None))
        seg = blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[0]
        panels.append(("reference label", take(np.maximum(seg, 0)), "viridis", (0, max(int(seg.max()), 1))))
    for c, name in enumerate(p["channels"]):
        panels.append((f"p({name})", take(probs[c]), "magma", (0, 1)))
    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 3.0), squeeze=False)
    for ax, (title, image, cmap, limits) in zip(axes[0], panels):
        shown = ax.imshow(image, cmap=cmap, vmin=limits[0] if limits else None, vmax=limits[1] if limits else None)
        ax.set_title(title, fontsize=9)
        ax.axis("off")
        if limits == (0, 1):
            fig.colorbar(shown, ax=ax, fraction=0.046)
    fig.suptitle(f"{case}: slice {index} along axis {axis}, T = {p['temperature']}, {p['dtype']}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
    return out
