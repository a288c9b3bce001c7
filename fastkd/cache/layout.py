"""The soft-label cache's format on disk: layout, arrays, chunks, codecs, integrity, attributes, provenance.

This is the one description of the format; the code that writes it (``fastkd.cache.writer``), encodes
and decodes its values (``fastkd.cache.codec``), reads it (``fastkd.cache.reader``) and inspects it
(``fastkd.cache.inspection``) follows it, and the constants of ``fastkd.cache.layout`` (``ATTR``,
``FORMAT_VERSION``, ``DTYPES``, ``CHUNK_BYTES``) and its ``chunk_shape`` define it.

**Layout.** One Zarr v3 store holds the teacher ensemble's soft labels for every training case of one
(dataset, configuration, teacher set, temperature, mirroring, step, dtype, top-k); its path encodes
all of them (``fastkd.paths.Paths.softlabel_cache``):

    <name>.zarr/                 Zarr v3 group; its zarr.json is written LAST (by `fastkd cache
        zarr.json                finalize`, once every case is in), so the store opens only when complete
        <case>/                  one array per case, (C, x, y, z) uint8 or float16 (top-k: (2, k, x, y, z)
            zarr.json            uint8, see below), on nnU-Net's preprocessed grid: x, y, z equal the
            c/0/<i>/<j>/<k>      spatial shape of <case>.b2nd; chunks, every one written (also those
                                 equal to the fill value), so a missing chunk file is a damaged case
    <name>.zarr.partial/         cases being written, one folder per writer:
        <case>.w<pid>@<host>.<hex8>   a case appears under <name>.zarr/ only by a rename

**Arrays.** ``C`` is nnU-Net's number of segmentation heads in its own order: one channel per label
(background first) for softmax datasets, one per region for region-based (sigmoid) datasets. The
stored dtype is ``softlabels.dtype`` (``DTYPES``: dtype -> ``scale``, stored value x scale = probability):

- ``uint8``: value q means probability q / 255 (``scale`` = 1/255 in the attributes). Softmax channels
  are quantised by largest remainder, so every voxel's C values sum to exactly 255 (probabilities to 1)
  and each is within 1/255 of the teacher's; sigmoid channels are rounded (error <= 0.5/255).
- ``float16``: the probability itself (``scale`` = 1).
- Top-k (``softlabels.top_k`` = k, softmax datasets with many classes; ``top_k`` in the provenance):
  ``(2, k, x, y, z)`` uint8 (uint16 above 256 classes). ``[0, i]`` is the i-th largest probability x 255
  (descending; the k quantised by largest remainder to ``rint(255 x their sum)``), ``[1, i]`` its class
  index. The voxel's remaining mass ``1 - sum / 255`` is spread evenly over the other C - k classes
  when read (``fastkd.cache.codec.decode``), as FKD / ReLabel store ImageNet soft labels; each case
  records its mean and max (``top_k_dropped``), which ``fastkd cache info`` reports and ``verify`` checks.

**Chunks** hold every class of a block of voxels (the KD loss needs all of them) and at most
``CHUNK_BYTES`` (4 MiB) uncompressed, whatever C and the patch size: spatially the chunk is the
plans' patch (for 2d configurations ``1 x`` the patch), shrunk by one factor on every axis until it fits,
and cut to the volume. With few classes it is the patch itself (Hippocampus:
3 x 40 x 56 x 40 = 270 kB): a random training read of nnU-Net's initial patch (about 1.2-1.6 x the
patch per axis) touches at most 3 chunks per axis. With many it is smaller (118 classes, patch 128^3:
118 x 32^3 = 3.9 MB) so a read decompresses little beyond the crop; a 128^3-voxel chunk would be 247 MB.

**Codecs** (all in the Zarr v3 spec, so zarr-python and tensorstore read them): bytes -> blosc (zstd,
level 5; no shuffle for uint8, byte shuffle for float16) -> crc32c, so a corrupted chunk raises a
checksum error instead of decoding to wrong numbers. The training loader's crop reads decode these
chunk files directly (same codecs, checksum checked; ``fastkd.cache.reader.SoftLabelCache._chunk_parts``),
keeping only the classes present in each chunk; any other layout is read through zarr.

**Integrity.** A case is accepted (renamed into the store, finalized, opened by the reader, verified)
only with all its chunk files present (``fastkd.cache.reader.missing_chunks``); zarr would read a
missing chunk as zeros. Writers remove only their own ``.partial`` folders and those of dead writers
of their host (``fastkd.cache.writer.write_case``). ``finalize`` and the soft-label fill never remove
the root before their checks pass, so a failing run leaves a complete store complete. Each case
records the sha256 of the preprocessed case it came from (``preprocessed_sha256``,
``fastkd.cache.inspection.fingerprint``).

**Attributes** live under the key ``fastkd_softlabels`` (``ATTR``) of each node's ``zarr.json``. On
each case array:

    {"complete": true,              # rewritten last, just before the array is renamed into place
     "case", "shape": [C, x, y, z], "tiles": int, "teacher_forwards": int, "seconds": float,
     "teacher_folds": [[fold, ...], ...],   # the folds that made this case, per teacher folder of
                                            # provenance["teachers"] (all of them, or out-of-fold)
     "preprocessed_sha256": str,            # of the preprocessed <case>.b2nd it was computed from
     "top_k_dropped": {"mean", "max"},      # top-k only: 1 - stored mass per voxel
     "unlabelled": bool,                    # an image without a label (dataset.unlabelled); absent in
                                            # stores before it: labelled
     "class_locations": {"<key>": [x0, y0, z0, x1, ...], ...},   # unlabelled cases only, see below
     "created": ISO time, "versions": {...}, "provenance": {...}}

On the root group:

    {"complete": true, "cases": {"<case>": [C, x, y, z], ...}, "teacher_forwards": int,
     "unlabelled": ["<case>", ...],         # the cases of "cases" that have no label (may be empty)
     "preprocessed_folder": path of the labelled cases' <case>.b2nd files,
     "unlabelled_folder": path of the unlabelled cases' <case>.b2nd files (null without any),
     "created", "versions", "provenance": {...}}

**Unlabelled cases** (``dataset.unlabelled``; :mod:`fastkd.unlabelled`) sit in the same store with the
same provenance: none of the teacher folds trained on them, so each gets every fold whatever
``folds_per_case`` says (``teacher_folds`` records it). Their ``class_locations`` stand in for the
label's in nnU-Net's foreground oversampling: per foreground label (regions: per region, key ``"1,2,3"``,
a one-label region ``"3,"``; with an ignore label also nnU-Net's key of every annotated voxel,
``"-1,0,1,..."``) a seeded uniform pick of up to ``CLASS_LOCATIONS_PER_CLASS`` voxels of the teachers'
segmentation (nnU-Net's argmax, or its region thresholds and order), as a flat list ``[x0, y0, z0, x1,
...]`` on the preprocessed grid, computed when the soft labels are written
(:func:`fastkd.unlabelled.teacher_class_locations`).

**Provenance** is identical for every case of a store: ``format_version`` (``FORMAT_VERSION``),
``temperature``, ``activation`` (softmax or sigmoid), ``ensemble`` (how folds were combined),
``folds_per_case`` (``all``: every fold for every case; ``out_of_fold``: per case the folds that held
it out, see ``fastkd.softlabels``), ``splits_sha256`` (sha256 of nnU-Net's splits_final.json that
chose them for ``out_of_fold``, else null), ``channels`` (names), ``labels`` and ``regions``
(dataset.json), ``teachers`` (per folder: ``name``, ``model_folder``, ``trainer``, ``plans_name``,
``configuration``, ``folds``, ``checkpoint``, ``sha256`` per fold, ``weight``), ``dataset_name``,
``plans_name``, ``configuration``, ``data_identifier``, ``spacing``, ``transpose_forward``,
``patch_size``, ``dtype``, ``scale``, ``step_size``, ``mirroring``, ``mirror_axes``, ``gaussian``, and
``top_k`` in top-k stores only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fastkd.errors import FastkdError

#: the key of fastkd's attributes in every node's zarr.json
ATTR = "fastkd_softlabels"
#: ``format_version`` in the provenance
FORMAT_VERSION = 1
DTYPES = {"uint8": 1.0 / 255.0, "float16": 1.0}  # dtype -> scale (stored value * scale = probability)
#: voxels kept per class in an unlabelled case's ``class_locations`` (nnU-Net's oversampling picks one at random)
CLASS_LOCATIONS_PER_CLASS = 1000


def encode_class_locations(locations: dict, seed: int = 0) -> dict:
    """nnU-Net's ``class_locations`` (key: label or tuple of labels -> (n, 4) array ``[0, x, y, z]``) -> the
    case attribute: ``{"<label>" or "<l1>,<l2>": [x0, y0, z0, x1, y1, z1, ...]}`` (flat: a third of the JSON
    parsing time of nested triples), at most CLASS_LOCATIONS_PER_CLASS voxels per key (a seeded pick)."""
    rng = np.random.default_rng(seed)
    out = {}
    for key, voxels in locations.items():
        voxels = np.asarray(voxels).reshape(-1, 4)[:, 1:]
        if len(voxels) > CLASS_LOCATIONS_PER_CLASS:
            voxels = voxels[np.sort(rng.choice(len(voxels), CLASS_LOCATIONS_PER_CLASS, replace=False))]
        if isinstance(key, (tuple, list)):  # a region; one of one label keeps its comma: "3,"
            name = ",".join(str(int(k)) for k in key) + ("," if len(key) == 1 else "")
        else:
            name = str(int(key))
        out[name] = voxels.astype(np.int64).ravel().tolist()
    return out


def decode_class_locations(stored: dict) -> dict:
    """The case attribute -> nnU-Net's ``class_locations`` (int key, or tuple for a region; (n, 4) int64
    arrays ``[0, x, y, z]``, the leading 0 being nnU-Net's channel axis)."""
    out = {}
    for name, voxels in stored.items():
        key = tuple(int(k) for k in name.split(",") if k) if "," in name else int(name)
        array = np.zeros((len(voxels) // 3, 4), np.int64)
        array[:, 1:] = np.asarray(voxels, np.int64).reshape(-1, 3)
        out[key] = array
    return out


class CacheError(FastkdError):
    """The cache is missing, incomplete, corrupt, or does not match what its user expects."""


def partial_dir(store: str | Path) -> Path:
    store = Path(store)
    return store.with_name(store.name + ".partial")


#: uncompressed bytes of one chunk at most (all C classes of a block of voxels; see chunk_shape)
CHUNK_BYTES = 4 * 2**20


def chunk_shape(shape: tuple[int, ...], patch_size: list[int], itemsize: int = 1,
                max_bytes: int = CHUNK_BYTES) -> tuple[int, ...]:
    """Chunks for a (C, x, y, z) case read in patches of ``patch_size`` (the module docstring, "Chunks").

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


def _compressors(dtype: str) -> list:
    from zarr.codecs import BloscCodec, Crc32cCodec

    shuffle = "noshuffle" if dtype == "uint8" else "shuffle"
    return [BloscCodec(cname="zstd", clevel=5, shuffle=shuffle), Crc32cCodec()]
