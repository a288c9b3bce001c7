"""Reading the store: its attributes (:func:`case_attrs`, :func:`root_attrs`), the check that every chunk
file is there (:func:`missing_chunks`), and :class:`SoftLabelCache`, the student's reader (format:
:mod:`fastkd.cache.layout`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from fastkd.cache.codec import decode, stored_shape
from fastkd.cache.layout import ATTR, CacheError, decode_class_locations


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
        #: the cases without a label (dataset.unlabelled): KD only, and their class locations
        self.unlabelled: frozenset[str] = frozenset(attrs.get("unlabelled", ()))
        self.scale = np.float32(self.provenance["scale"])
        self.num_channels = len(self.provenance["channels"])
        self._arrays: dict = {}

    def class_locations(self, case: str) -> dict:
        """An unlabelled case's foreground voxels from the teachers' segmentation, in nnU-Net's
        ``class_locations`` form (layout: :mod:`fastkd.cache.layout`, "Unlabelled cases")."""
        attrs = case_attrs(self.path, case) if case in self.unlabelled else None
        if not attrs or "class_locations" not in attrs:
            raise CacheError(f"{self.path}: case {case!r} has no class locations (only unlabelled cases have them: "
                             f"{len(self.unlabelled)} in this cache)")
        return decode_class_locations(attrs["class_locations"])

    @property
    def temperature(self) -> float:
        return self.provenance["temperature"]

    def check(self, *, temperature: float | None = None, labels: dict | None = None,
              data_identifier: str | None = None, configuration: str | None = None,
              shapes: dict[str, list[int]] | None = None) -> None:
        """Raise :class:`fastkd.cache.CacheError` listing every way the cache differs from what the caller
        expects.

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
        the codecs the writer uses (bytes -> blosc -> crc32c, :func:`fastkd.cache.layout._compressors`,
        checksum checked), instead of through zarr's asynchronous pipeline (on a 119-class crop of
        96 x 116 x 116 zarr's read alone took ~0.7 s, about three times the blosc decoding it does), and a
        caller can keep only the classes present in each chunk. An array with any other layout is read
        through zarr."""
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
