"""What the ONNX export and the TensorRT build share to verify a model: real preprocessed patches to run
it on, and the agreement of two models' segmentations."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def real_patches(preprocessed: Path | None, patch: list[int], n: int = 2) -> list[np.ndarray]:
    """Up to ``n`` patches of preprocessed cases (the centre of each, zero-padded to the patch size)."""
    if preprocessed is None or not Path(preprocessed).is_dir():
        return []
    import blosc2

    patches = []
    for b2nd in sorted(p for p in Path(preprocessed).glob("*.b2nd") if not p.name.endswith("_seg.b2nd"))[:n]:
        data = blosc2.open(str(b2nd), mode="r")
        box = [slice(max((s - p) // 2, 0), max((s - p) // 2, 0) + p) for s, p in zip(data.shape[1:], patch)]
        crop = np.asarray(data[(slice(None), *box)], dtype=np.float32)
        out = np.zeros((crop.shape[0], *patch), np.float32)
        out[(slice(None), *[slice(0, c) for c in crop.shape[1:]])] = crop
        patches.append(out[None])
    return patches


def segmentation_agreement(a: np.ndarray, b: np.ndarray, regions: bool) -> float:
    """The fraction of voxels whose argmax (softmax) or thresholded logit (regions) agrees between two outputs."""
    if regions:
        return float(((a > 0) == (b > 0)).mean())
    return float((a.argmax(1) == b.argmax(1)).mean())
