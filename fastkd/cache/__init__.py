"""The soft-label cache on disk: one Zarr v3 store of the teacher ensemble's soft labels.

The format (layout, chunks, codecs, attributes, provenance) is described once, in :mod:`.layout`;
:mod:`.codec` turns probabilities into stored values and back, :mod:`.writer` writes cases atomically
and the root last, :mod:`.reader` reads them (:class:`SoftLabelCache`, the student's reader), and
:mod:`.inspection` is ``fastkd cache info`` / ``verify`` / ``show``. The public names are imported here.
"""

from __future__ import annotations

from fastkd.cache.codec import BLOCK_VALUES, blocks, decode, encode, encode_top_k, stored_dtype, stored_shape
from fastkd.cache.inspection import fingerprint, format_info, info, show, verify
from fastkd.cache.layout import ATTR, CHUNK_BYTES, DTYPES, FORMAT_VERSION, CacheError, chunk_shape, partial_dir
from fastkd.cache.reader import SoftLabelCache, case_attrs, missing_chunks, root_attrs
from fastkd.cache.writer import finalize, invalidate, is_current, write_case

__all__ = [
    "ATTR", "BLOCK_VALUES", "CHUNK_BYTES", "DTYPES", "FORMAT_VERSION", "CacheError", "SoftLabelCache", "blocks",
    "case_attrs", "chunk_shape", "decode", "encode", "encode_top_k", "finalize", "fingerprint", "format_info",
    "info", "invalidate", "is_current", "missing_chunks", "partial_dir", "root_attrs", "show", "stored_dtype",
    "stored_shape", "verify", "write_case",
]
