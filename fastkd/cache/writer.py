"""Writing the store: each case atomically (:func:`write_case`), the root last (:func:`finalize`), and
what a rerun may skip (:func:`is_current`). Format: :mod:`fastkd.cache.layout`.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from glob import escape as glob_escape
from pathlib import Path

import numpy as np

from fastkd.cache.codec import blocks, encode, encode_top_k, stored_dtype, stored_shape
from fastkd.cache.layout import ATTR, CacheError, _compressors, chunk_shape, partial_dir
from fastkd.cache.reader import _check_chunks, _open_whole, case_attrs, missing_chunks


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def versions() -> dict:
    import fastkd
    from fastkd.io import package_version

    return {"fastkd": fastkd.__version__, **{p: package_version(p) for p in ("nnunetv2", "torch", "zarr")}}


def is_current(store: str | Path, case: str, provenance: dict, shape: tuple[int, ...],
               preprocessed_sha256: str | None = None) -> bool:
    """A complete case with this provenance and shape, made from the preprocessed case with this
    fingerprint (:func:`fastkd.cache.inspection.fingerprint`, when given) and with all its chunks, is
    already in the store (a rerun skips it)."""
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

    ``probs``: float32 probabilities (C, x, y, z); they are encoded block by block
    (:func:`fastkd.cache.codec.blocks`), so the extra memory is bounded whatever the case's size; zarr
    compresses and writes one block in a thread while the next one is encoded (one more encoded block in
    memory). Every chunk is written, also those equal to the fill value, and the rename happens only when
    every chunk file is there.

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


def finalize(store: str | Path, expected: dict[str, list[int]], preprocessed_folder: str | Path | None = None,
             unlabelled: dict[str, list[int]] | None = None, unlabelled_folder: str | Path | None = None) -> dict:
    """Check every expected case is in the store, complete and consistent; then write the root.

    ``expected``: case -> spatial shape ``[x, y, z]`` (or the full ``[C, x, y, z]`` of the
    preprocessed image, whose C is ignored); ``unlabelled``: the same for the unlabelled cases, which
    must be marked unlabelled and carry their class locations (the labelled ones must not be marked).
    Every case must have all its chunks. Raises :class:`fastkd.cache.CacheError` naming every bad case;
    the store is left as it was then (a complete store stays complete). Returns the root attributes.
    """
    store = Path(store)
    unlabelled = dict(unlabelled or {})
    both = sorted(set(expected) & set(unlabelled))
    if both:
        raise CacheError(f"cases both labelled and unlabelled: {', '.join(both[:5])}; an unlabelled image must not "
                         "be a training case")
    problems, cases, provenance, forwards = [], {}, None, 0
    for case in sorted({**expected, **unlabelled}):
        attrs = case_attrs(store, case)
        if attrs is None:
            problems.append(f"{case}: missing")
            continue
        if not attrs.get("complete"):
            problems.append(f"{case}: not marked complete")
            continue
        if bool(attrs.get("unlabelled")) != (case in unlabelled):
            problems.append(f"{case}: marked {'un' if attrs.get('unlabelled') else ''}labelled in the store, but the "
                            f"manifests list it as {'un' if case in unlabelled else ''}labelled")
            continue
        if case in unlabelled and "class_locations" not in attrs:
            problems.append(f"{case}: unlabelled but without class_locations")
            continue
        want = unlabelled[case] if case in unlabelled else expected[case]
        if list(attrs["shape"][1:]) != list(want[-3:]):
            problems.append(f"{case}: shape {attrs['shape']} does not match the preprocessed case {want}")
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
        raise CacheError(f"soft-label cache {store} is not complete ({len(problems)} of "
                         f"{len(expected) + len(unlabelled)} cases):\n  - "
                         + "\n  - ".join(problems) + "\nrerun the soft-label jobs (snakemake ... softlabels)")
    root = {"complete": True, "cases": cases, "teacher_forwards": forwards, "unlabelled": sorted(unlabelled),
            "preprocessed_folder": str(Path(preprocessed_folder).resolve()) if preprocessed_folder else None,
            "unlabelled_folder": str(Path(unlabelled_folder).resolve()) if unlabelled_folder else None,
            "created": now(), "versions": versions(), "provenance": provenance}
    _write_root(store, {ATTR: root})  # the last write
    if partial_dir(store).is_dir() and not _remove_dead_partials(partial_dir(store)):
        shutil.rmtree(partial_dir(store), ignore_errors=True)
    return root
