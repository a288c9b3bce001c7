"""The soft-label cache on disk: layout, writer, reader, verification and inspection.

One Zarr v3 store holds the teacher ensemble's soft labels for every training case of one
(dataset, configuration, teacher set, temperature, mirroring, step, dtype); its path encodes all of
them (:meth:`fastkd.paths.Paths.softlabel_cache`). Layout::

    <name>.zarr/                 Zarr v3 group; its zarr.json is written LAST (by `fastkd cache
        zarr.json                finalize`, once every case is in), so the store opens only when complete
        <case>/                  one array per case, (C, x, y, z) uint8 or float16, on nnU-Net's
            zarr.json            preprocessed grid: x, y, z equal the spatial shape of <case>.b2nd
            c/0/<i>/<j>/<k>      chunks
    <name>.zarr.partial/         cases being written; a case appears under <name>.zarr/ only by a rename

Arrays. ``C`` is nnU-Net's number of segmentation heads in its own order: one channel per label
(background first) for softmax datasets, one per region for region-based (sigmoid) datasets.

- ``uint8``: value q means probability q / 255 (``scale`` = 1/255 in the attributes). Softmax channels
  are quantised by largest remainder, so every voxel's C values sum to exactly 255 (probabilities to 1)
  and each is within 1/255 of the teacher's; sigmoid channels are rounded (error <= 0.5/255).
- ``float16``: the probability itself (``scale`` = 1).

Chunks are ``(C, min(x, px), min(y, py), min(z, pz))`` with ``p`` the plans' patch size (for 2d
configurations ``(C, 1, min(y, py), min(z, pz))``): all classes of a voxel sit in one chunk because the
KD loss needs all of them, and a patch-sized chunk means a random training read of nnU-Net's initial
patch (about 1.2-1.6 x the patch per axis) touches at most 3 chunks per axis and decompresses a few
patches' worth of voxels, while the chunk count per case stays small (per-chunk overhead dominates
tiny chunks). Codecs (all in the Zarr v3 spec, so zarr-python and tensorstore read them):
bytes -> blosc (zstd, level 5; no shuffle for uint8, byte shuffle for float16) -> crc32c, so a
corrupted chunk raises a checksum error instead of decoding to wrong numbers.

Attributes live under the key ``fastkd_softlabels``. On each case array::

    {"complete": true,              # rewritten last, just before the array is renamed into place
     "case", "shape": [C, x, y, z], "tiles": int, "teacher_forwards": int, "seconds": float,
     "teacher_folds": [[fold, ...], ...],   # the folds that made this case, per teacher folder of
                                            # provenance["teachers"] (all of them, or out-of-fold)
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
``mirror_axes``, ``gaussian``.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from datetime import datetime, timezone
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
def encode(probs: np.ndarray, dtype: str, softmax: bool = True) -> np.ndarray:
    """Probabilities (C, ...) float32 -> stored values (see the module docstring)."""
    if dtype == "float16":
        return probs.astype(np.float16)
    if dtype != "uint8":
        raise CacheError(f"dtype = {dtype!r}: must be one of {', '.join(DTYPES)}")
    scaled = np.clip(probs, 0.0, 1.0, dtype=np.float32) * np.float32(255.0)
    if not softmax:
        return np.rint(scaled).astype(np.uint8)
    q = np.floor(scaled)
    remainder = scaled - q
    # largest remainder: give the units missing to 255 to the classes with the largest remainders
    deficit = np.clip(np.rint(255.0 - q.sum(axis=0)), 0, probs.shape[0])
    order = np.argsort(-remainder, axis=0, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(probs.shape[0]).reshape((-1,) + (1,) * (probs.ndim - 1)), axis=0)
    q += rank < deficit
    return q.astype(np.uint8)


def chunk_shape(shape: tuple[int, ...], patch_size: list[int]) -> tuple[int, ...]:
    """Chunks for a (C, x, y, z) case read in patches of ``patch_size`` (see the module docstring)."""
    spatial = shape[1:]
    patch = list(patch_size) if len(patch_size) == len(spatial) else [1, *patch_size]
    return (shape[0], *(max(1, min(s, p)) for s, p in zip(spatial, patch)))


def _compressors(dtype: str) -> list:
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "noshuffle" if dtype == "uint8" else "shuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]


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


def is_current(store: str | Path, case: str, provenance: dict, shape: tuple[int, ...]) -> bool:
    """A complete case with this provenance and shape is already in the store (a rerun skips it)."""
    attrs = case_attrs(store, case)
    return bool(attrs and attrs.get("complete") and attrs.get("provenance") == provenance
                and tuple(attrs.get("shape", ())) == tuple(shape))


def invalidate(store: str | Path) -> None:
    """Remove the root zarr.json: while cases are (re)written the store must not open as complete."""
    (Path(store) / "zarr.json").unlink(missing_ok=True)


def write_case(store: str | Path, case: str, probs: np.ndarray, provenance: dict, extra: dict | None = None) -> Path:
    """Write one case atomically: to ``<store>.partial/``, mark complete, rename into the store.

    A job killed at any point leaves at most a directory under ``.partial`` (never read, removed by
    the next writer of that case or by finalize) and, if it replaced an older version, no case at all.
    """
    import zarr

    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    tmp_root = partial_dir(store)
    tmp_root.mkdir(exist_ok=True)
    for stale in tmp_root.glob(f"{case}.*"):  # left by a killed writer of this case (one writer per case)
        shutil.rmtree(stale, ignore_errors=True)
    dtype = provenance["dtype"]
    data = encode(probs, dtype, softmax=provenance["activation"] == "softmax")
    attrs = {"case": case, "shape": list(data.shape), **(extra or {}), "created": now(), "versions": versions(),
             "provenance": provenance}
    tmp = tmp_root / f"{case}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    array = zarr.create_array(str(tmp), shape=data.shape, chunks=chunk_shape(data.shape, provenance["patch_size"]),
                              dtype=dtype, compressors=_compressors(dtype), fill_value=0,
                              attributes={ATTR: {"complete": False, **attrs}})
    array[...] = data
    array.attrs[ATTR] = {"complete": True, **attrs}
    final = store / case
    if final.exists():  # an outdated version: move it aside first (a directory cannot be renamed over)
        old = tmp_root / f"{case}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def finalize(store: str | Path, expected: dict[str, list[int]], preprocessed_folder: str | Path | None = None) -> dict:
    """Check every expected case is in the store, complete and consistent; then write the root.

    ``expected``: case -> spatial shape ``[x, y, z]`` (or the full ``[C, x, y, z]`` of the
    preprocessed image, whose C is ignored). Raises :class:`CacheError` naming every bad case;
    writes nothing then. Returns the root attributes.
    """
    import zarr

    store = Path(store)
    invalidate(store)
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
        cases[case] = attrs["shape"]
        forwards += attrs.get("teacher_forwards", 0)
    if problems:
        raise CacheError(f"soft-label cache {store} is not complete ({len(problems)} of {len(expected)} cases):\n  - "
                         + "\n  - ".join(problems) + "\nrerun the soft-label jobs (snakemake ... softlabels)")
    root = {"complete": True, "cases": cases, "teacher_forwards": forwards,
            "preprocessed_folder": str(Path(preprocessed_folder).resolve()) if preprocessed_folder else None,
            "created": now(), "versions": versions(), "provenance": provenance}
    zarr.create_group(str(store), attributes={ATTR: root})  # the root zarr.json: the last write
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
        if list(array.shape) != list(self.cases[case]):
            raise CacheError(f"soft-label cache {self.path}: case {case} has shape {list(array.shape)}, "
                             f"the cache lists {self.cases[case]}")
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

    def read(self, case: str) -> np.ndarray:
        """The whole case as float32 probabilities (C, x, y, z)."""
        return self._read(case, (slice(None),) * 4).astype(np.float32) * self.scale

    def read_crop(self, case: str, bbox) -> np.ndarray:
        """Soft labels of a half-open voxel box ``[[lo, hi], ...]`` (per spatial axis) as float32.

        Returns ``(C + 1, *sizes)``: the C probabilities, zero outside the volume, then a "valid"
        channel (1 inside the volume, 0 outside). Boxes may reach outside the volume, as nnU-Net's
        ``get_bbox`` produces them.
        """
        shape = self.array(case).shape[1:]
        sizes = [int(hi) - int(lo) for lo, hi in bbox]
        out = np.zeros((self.num_channels + 1, *sizes), dtype=np.float32)
        lo = [max(int(b[0]), 0) for b in bbox]
        hi = [min(int(b[1]), s) for b, s in zip(bbox, shape)]
        if all(h > l for l, h in zip(lo, hi)):
            src = self._read(case, (slice(None), *(slice(l, h) for l, h in zip(lo, hi))))
            dst = tuple(slice(l - int(b[0]), h - int(b[0])) for l, h, b in zip(lo, hi, bbox))
            np.multiply(src, self.scale, out=out[(slice(0, self.num_channels), *dst)], casting="unsafe")
            out[(self.num_channels, *dst)] = 1.0
        return out


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
        shape = attrs.get("shape")
        dtype = (attrs.get("provenance") or {}).get("dtype", "uint8")
        values = int(np.prod(shape)) if shape else 0
        cases[case] = {"shape": shape, "complete": bool(attrs.get("complete")), "bytes": _bytes_on_disk(store / case),
                       "logical_bytes": values * np.dtype(dtype).itemsize, "values": values,
                       "teacher_folds": attrs.get("teacher_folds")}
        provenance = provenance or attrs.get("provenance")
    total = sum(c["bytes"] for c in cases.values())
    logical = sum(c["logical_bytes"] for c in cases.values())
    return {
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


def verify(store: str | Path, preprocessed_folder: str | Path | None = None, tolerance: float | None = None) -> list[str]:
    """Read every chunk of every case; return one problem line per bad case (empty: all good).

    Checks: the store is finalized and lists every case present; checksums (crc32c, on every chunk
    read); values finite and in [0, 1]; softmax voxels sum to one (uint8: exactly 255; float16: within
    ``tolerance``, default 1e-2); shape equals the preprocessed ``<case>.b2nd`` in ``preprocessed_folder``
    (default: the folder recorded in the root attributes).
    """
    import blosc2
    import zarr

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
        try:
            data = zarr.open_array(str(store / case), mode="r")[...]
        except Exception as e:
            problems.append(f"{case}: unreadable ({type(e).__name__}: {e})")
            continue
        values = data.astype(np.float32) * np.float32(p["scale"])
        if not np.isfinite(values).all():
            problems.append(f"{case}: {int((~np.isfinite(values)).sum())} non-finite values")
            continue
        if values.min() < 0 or values.max() > 1 + 1e-3:
            problems.append(f"{case}: values outside [0, 1] (min {values.min():.4g}, max {values.max():.4g})")
        if p["activation"] == "softmax":
            if p["dtype"] == "uint8":
                bad = int((data.sum(axis=0, dtype=np.int32) != 255).sum())
            else:
                bad = int((np.abs(values.sum(axis=0) - 1) > (tolerance or 1e-2)).sum())
            if bad:
                problems.append(f"{case}: {bad} voxels whose probabilities do not sum to 1")
        if folder is not None:
            b2nd = Path(folder) / f"{case}.b2nd"
            if not b2nd.is_file():
                problems.append(f"{case}: no preprocessed {b2nd}")
            elif tuple(blosc2.open(str(b2nd), mode="r").shape[1:]) != tuple(data.shape[1:]):
                problems.append(f"{case}: shape {list(data.shape[1:])} != preprocessed "
                                f"{list(blosc2.open(str(b2nd), mode='r').shape[1:])}")
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
        probs = zarr.open_array(str(store / case), mode="r")[...].astype(np.float32) * np.float32(p["scale"])
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
