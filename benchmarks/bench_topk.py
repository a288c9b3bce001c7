"""Benchmark of top-k soft labels against the dense uint8 cache, on a many-class case.

For k in ``--ks`` (default 2, 4, 8) and the dense uint8 cache, one case is written with
:func:`fastkd.cache.write_case` (the real writer: chunking, blosc/zstd, crc32c) and read back with
:class:`fastkd.cache.SoftLabelCache`; printed per variant:

- bytes on disk and bytes per voxel, and their ratio to the dense uint8 store (same case, same run);
- mean KL(p || q) in nats over voxels, p the float32 soft labels, q what the reader returns (densified
  for top-k), and the same for dense uint8 (its quantisation floor);
- mean and max dropped mass (1 - sum of the stored top-k), as ``fastkd cache info`` reports it;
- write and full-read seconds, and their ratio to dense.

The soft labels. ``--source synthetic`` (default): the label map of a synthetic case from
``fastkd demo write`` (``--structures`` organs of varied size, ``--shape``), turned into what a
teacher ensemble's tempered output looks like: each class's one-hot map blurred with a Gaussian of
``--sigma`` voxels (the ensemble's uncertainty across boundaries) plus ``--floor`` of uniform mass gives
probabilities p1; logits are ``log p1`` plus, per class, a smooth random field of SD ``--tail-noise``
(smoothing 8 voxels), so the many small probabilities differ per class and place as a teacher's do
(a uniform tail would be exactly what top-k assumes and flatter it); the soft labels are
``softmax(logits / T)``. They are NOT a trained teacher's soft labels; they show the cost of storage
and the error of top-k on a tail of the size tempering gives 100+ classes. ``--source STORE.zarr --case NAME``: a real soft-label cache's case (its dense uint8
values, which then are p).

Run: ``python benchmarks/bench_topk.py`` (defaults: 118 structures, 160 x 160 x 120 voxels, T = 3);
results also in ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fastkd import cache  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="synthetic", help="'synthetic' or a soft-label cache *.zarr")
    p.add_argument("--case", default=None, help="case of --source STORE (default: its first)")
    p.add_argument("--structures", type=int, default=118, help="synthetic: foreground structures (classes - 1)")
    p.add_argument("--shape", type=int, nargs=3, default=[160, 160, 120], help="synthetic: voxels")
    p.add_argument("--sigma", type=float, default=1.5, help="synthetic: boundary blur (voxels)")
    p.add_argument("--floor", type=float, default=1e-3, help="synthetic: uniform mass added before tempering")
    p.add_argument("--tail-noise", type=float, default=2.0, help="synthetic: SD of the per-class logit fields")
    p.add_argument("--temperature", "-T", type=float, default=3.0)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128], help="patch size (chunk shape)")
    p.add_argument("--out", type=Path, default=Path("/tmp/fastkd_bench_topk.json"))
    return p.parse_args(argv)


def synthetic(args) -> tuple[np.ndarray, str]:
    from scipy import ndimage

    from fastkd.demo import make_demo_dataset
    import nibabel as nib

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "Dataset990_TopK"
        make_demo_dataset(folder, n_cases=5, n_test=0, shape=tuple(args.shape), n_structures=args.structures)
        label = np.asarray(nib.load(str(folder / "labelsTr" / "demo_000.nii.gz")).dataobj).astype(np.int32)
    n = args.structures + 1
    present = len(np.unique(label))
    probs = np.empty((n, *label.shape), np.float32)
    for c in range(n):  # one class at a time: bounded temporaries
        probs[c] = ndimage.gaussian_filter((label == c).astype(np.float32), args.sigma)
    probs += np.float32(args.floor / n)
    probs /= probs.sum(axis=0, keepdims=True)
    rng = np.random.default_rng(0)
    for c in range(n):  # logits / T, in place
        field = ndimage.gaussian_filter(rng.standard_normal(label.shape).astype(np.float32), 8.0)
        field *= np.float32(args.tail_noise / max(float(field.std()), 1e-6))
        probs[c] = (np.log(probs[c]) + field) / np.float32(args.temperature)
    probs -= probs.max(axis=0, keepdims=True)
    np.exp(probs, out=probs)
    probs /= probs.sum(axis=0, keepdims=True)
    return probs, (f"synthetic: {args.structures} structures ({present - 1} present), {list(label.shape)} voxels, "
                   f"blur sigma {args.sigma}, floor {args.floor}, tail noise {args.tail_noise}, T {args.temperature}")


def from_store(args) -> tuple[np.ndarray, str]:
    reader = cache.SoftLabelCache(args.source)
    case = args.case or next(iter(reader.cases))
    return reader.read(case), f"{args.source} case {case} (T {reader.temperature})"


def mean_kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over voxels of sum_c p log(p / q), slab by slab along x."""
    total = 0.0
    for i in range(p.shape[1]):
        a, b = p[:, i].astype(np.float64), np.maximum(q[:, i].astype(np.float64), 1e-12)
        total += float(np.sum(np.where(a > 0, a * np.log(np.maximum(a, 1e-300) / b), 0.0)))
    return total / int(np.prod(p.shape[1:]))


def provenance(n: int, patch, top_k=None) -> dict:
    prov = {"format_version": cache.FORMAT_VERSION, "activation": "softmax", "channels": [str(i) for i in range(n)],
            "dtype": "uint8", "scale": cache.DTYPES["uint8"], "patch_size": list(patch), "temperature": 3.0}
    return {**prov, "top_k": top_k} if top_k else prov


def measure(p: np.ndarray, work: Path, patch, k=None, dense_q: np.ndarray | None = None) -> dict:
    store = work / (f"top{k}.zarr" if k else "dense.zarr")
    t0 = time.perf_counter()
    cache.write_case(store, "case", p, provenance(p.shape[0], patch, k))
    write = time.perf_counter() - t0
    cache.finalize(store, {"case": [1, *p.shape[1:]]})
    t0 = time.perf_counter()
    q = cache.SoftLabelCache(store).read("case")
    read = time.perf_counter() - t0
    report = cache.info(store)
    voxels = int(np.prod(p.shape[1:]))
    return {"variant": f"top-{k}" if k else "dense uint8", "bytes": report["bytes"],
            "bytes_per_voxel": report["bytes"] / voxels, "logical_bytes": report["logical_bytes"],
            "kl": mean_kl(p, q), "kl_vs_dense_uint8": mean_kl(dense_q, q) if dense_q is not None else 0.0,
            "dropped": report["top_k_dropped"], "write_s": write, "read_s": read, "q": q}


def main(argv=None) -> int:
    args = parse_args(argv)
    p, what = synthetic(args) if args.source == "synthetic" else from_store(args)
    print(f"soft labels: {what}; C = {p.shape[0]}, {p.nbytes / 1e6:.0f} MB as float32")
    work = Path(tempfile.mkdtemp(prefix="fastkd_topk_"))
    try:
        rows = [measure(p, work, args.patch)]
        rows += [measure(p, work, args.patch, k, rows[0]["q"]) for k in args.ks]
        for r in rows:
            del r["q"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    dense = rows[0]
    print("KL(p || q): p the float32 soft labels, q what the reader returns; KL(dense || q): p = dense uint8's")
    print(f"{'variant':<12} {'MB on disk':>10} {'B/voxel':>8} {'/ dense':>8} {'KL(p || q)':>11} {'KL(dense || q)':>14} "
          f"{'dropped mean':>12} {'max':>6} {'write / dense':>13} {'read / dense':>12}")
    for r in rows:
        d = r["dropped"] or {"mean": 0.0, "max": 0.0}
        print(f"{r['variant']:<12} {r['bytes'] / 1e6:>10.2f} {r['bytes_per_voxel']:>8.3f} "
              f"{r['bytes'] / dense['bytes']:>8.3f} {r['kl']:>11.3e} {r['kl_vs_dense_uint8']:>14.3e} "
              f"{d['mean']:>12.4f} {d['max']:>6.3f} "
              f"{r['write_s'] / dense['write_s']:>13.2f} {r['read_s'] / dense['read_s']:>12.2f}")
    args.out.write_text(json.dumps({"source": what, "classes": p.shape[0], "shape": list(p.shape[1:]),
                                    "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
