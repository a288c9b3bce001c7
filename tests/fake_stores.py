"""Small soft-label stores with random probabilities, for the cache, report and loader tests."""

from pathlib import Path

import numpy as np

from fastkd import cache


def softmax(logits, axis=0):
    e = np.exp(logits - logits.max(axis=axis, keepdims=True))
    return (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)


def provenance(dtype="uint8", activation="softmax", channels=("background", "a", "b"), temperature=3.0,
               patch=(8, 8, 8)):
    return {"format_version": 1, "temperature": temperature, "activation": activation, "ensemble": "test",
            "channels": list(channels), "labels": {"background": 0, "a": 1, "b": 2}, "regions": activation == "sigmoid",
            "teachers": [], "dataset_name": "Dataset999_T", "plans_name": "nnUNetPlans", "configuration": "3d_fullres",
            "data_identifier": "nnUNetPlans_3d_fullres", "spacing": [1, 1, 1], "transpose_forward": [0, 1, 2],
            "patch_size": list(patch), "dtype": dtype, "scale": cache.DTYPES[dtype], "step_size": 0.5,
            "mirroring": True, "mirror_axes": [0, 1, 2], "gaussian": True}


def make_store(tmp_path, shapes=None, dtype="uint8", seed=0, name="c.zarr"):
    """A finalized store with random soft labels; returns (store, {case: float32 probabilities})."""
    rng = np.random.default_rng(seed)
    shapes = shapes or {"case_a": (10, 12, 9), "case_b": (7, 5, 11)}
    store, probs = tmp_path / name, {}
    for case, shape in shapes.items():
        probs[case] = softmax(rng.normal(scale=3, size=(3, *shape)))
        cache.write_case(store, case, probs[case], provenance(dtype), {"teacher_forwards": 8})
    cache.finalize(store, {c: [1, *s] for c, s in shapes.items()})
    return store, probs


def flip_a_byte(store: Path, case: str) -> Path:
    chunk = sorted(p for p in (store / case / "c").rglob("*") if p.is_file())[0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return chunk
