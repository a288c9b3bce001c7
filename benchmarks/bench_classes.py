"""Benchmark of the KD student's training speed as the number of classes grows (3, 16, 119 by default).

One figure per class count, a RATIO measured side by side in one run (these machines are noisy):
KD student iterations/s / stock nnU-Net iterations/s (goal >= 0.9), on the same student plans,
batch, patch, device, threads and augmentation workers, timed in alternating blocks exactly as
``bench_student.py`` times them (its ``Trainers`` and ``time_block``: fresh trainer and nnU-Net's own
loaders per block, untimed warm-up plus the augmenter's prefetched batches, then ``--iterations``
timed ``train_step`` calls; median of ``--repeats`` per-round ratios).

Data, per class count C (no teachers needed, so 100+ classes fit a CPU):

- ``fastkd demo write`` data with C - 1 structures (``--shape``, ``--cases``, 1 mm), planned and
  preprocessed by ``nnUNetv2_plan_and_preprocess -c 3d_fullres``;
- a soft-label cache made from each preprocessed segmentation: per class the one-hot map blurred with
  a Gaussian (sigma ``--sigma`` voxels, truncated at 2 sigma, so a class is zero away from where it
  is, as a teacher's confident soft labels are), renormalised, written with the cache's own writer
  (uint8, or ``--top-k``). What the loader reads and carries depends on how many classes each crop
  holds, which this reproduces; the values are not a teacher's.

Also printed per C: the channels the KD trainer's training loader ships per batch (mean of 10
batches from nnU-Net's augmenter), against C.

Run: ``python benchmarks/bench_classes.py`` (defaults: 3 16 119 classes, 5 cases of 96 x 96 x 64,
r = 2, 2 rounds of 4 timed iterations, CPU). Work dir ``--work`` (default /tmp/fastkd_bench_classes)
is reused: data, preprocessing and caches are made once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# fastkd's commands run torch on transparent huge pages (fastkd.cli.common.huge_pages); every process timed
# here, stock nnU-Net included, runs with the same setting (before torch loads), so ratios compare like
# with like; THP_MEM_ALLOC_ENABLE=0 in the environment turns it off for all of them
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
REPO = Path(__file__).resolve().parents[1]
GOAL = 0.9
KINDS = ("kd", "stock")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--classes", type=int, nargs="+", default=[3, 16, 119], help="class counts (with background)")
    p.add_argument("--shape", type=int, nargs=3, default=[96, 96, 64], help="voxels per case")
    p.add_argument("--cases", type=int, default=5)
    p.add_argument("--gpu-memory-target", type=float, default=None,
                   help="nnU-Net planner's GPU memory target in GB (smaller: smaller patch; default: nnU-Net's 8)")
    p.add_argument("--sigma", type=float, default=1.5, help="blur of the one-hot soft labels (voxels)")
    p.add_argument("--top-k", type=int, default=None, help="write top-k caches instead of dense uint8")
    p.add_argument("--reduction-factor", "-r", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--iterations", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--da-workers", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--work", type=Path, default=Path("/tmp/fastkd_bench_classes"))
    return p.parse_args(argv)


def dataset_name(n_classes: int) -> tuple[int, str]:
    return 960 + n_classes % 40, f"Dataset{960 + n_classes % 40:03d}_Classes{n_classes}"


def setup_dataset(args, n_classes: int, env: dict) -> Path:
    """Raw demo data and nnU-Net's preprocessing (made once); returns the preprocessed dataset folder."""
    from fastkd.demo import make_demo_dataset

    ds_id, name = dataset_name(n_classes)
    raw = Path(env["nnUNet_raw"]) / name
    if not (raw / "dataset.json").is_file():
        make_demo_dataset(raw, n_cases=args.cases, n_test=0, shape=tuple(args.shape), spacing=(1.0, 1.0, 1.0),
                          n_structures=n_classes - 1)
    pre = Path(env["nnUNet_preprocessed"]) / name
    if not (pre / "nnUNetPlans_3d_fullres").is_dir() or len(list((pre / "nnUNetPlans_3d_fullres").glob("*_seg.b2nd"))) < args.cases:
        log = args.work / "logs" / f"preprocess_{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            subprocess.run([str(Path(sys.executable).parent / "nnUNetv2_plan_and_preprocess"), "-d", str(ds_id),
                            "-c", "3d_fullres", "-np", str(args.threads), "--verify_dataset_integrity",
                            *(["-gpu_memory_target", str(args.gpu_memory_target)] if args.gpu_memory_target else [])],
                           env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return pre


def soft_labels(seg, n: int, sigma: float):
    import numpy as np
    from scipy import ndimage

    label = np.maximum(seg[0], 0)
    probs = np.empty((n, *label.shape), np.float32)
    for c in range(n):
        probs[c] = ndimage.gaussian_filter((label == c).astype(np.float32), sigma, truncate=2.0)
    probs /= np.maximum(probs.sum(0, keepdims=True), 1e-12)
    probs[0] += (probs.sum(0) == 0)  # nothing near: background
    return probs


def setup_cache(args, pre: Path, n_classes: int) -> Path:
    import blosc2

    from fastkd import cache

    store = args.work / "caches" / f"{pre.name}_sigma{args.sigma:g}_top{args.top_k or 0}.zarr"
    if (store / "zarr.json").is_file():
        return store
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    names = sorted(dataset_json["labels"], key=lambda k: dataset_json["labels"][k])
    prov = {"format_version": cache.FORMAT_VERSION, "temperature": 3.0, "activation": "softmax",
            "ensemble": f"synthetic: blurred one-hot (sigma {args.sigma})", "channels": names,
            "labels": dataset_json["labels"], "regions": False, "teachers": [], "dataset_name": pre.name,
            "plans_name": "nnUNetPlans", "configuration": "3d_fullres",
            "data_identifier": plans["configurations"]["3d_fullres"]["data_identifier"],
            "spacing": plans["configurations"]["3d_fullres"]["spacing"],
            "transpose_forward": plans["transpose_forward"],
            "patch_size": plans["configurations"]["3d_fullres"]["patch_size"], "dtype": "uint8",
            "scale": cache.DTYPES["uint8"], "step_size": 0.5, "mirroring": False, "mirror_axes": [], "gaussian": True,
            **({"top_k": args.top_k} if args.top_k else {})}
    folder = pre / "nnUNetPlans_3d_fullres"
    shapes = {}
    for seg_file in sorted(folder.glob("*_seg.b2nd")):
        case = seg_file.name[:-len("_seg.b2nd")]
        probs = soft_labels(blosc2.open(str(seg_file), mode="r")[:], n_classes, args.sigma)
        cache.write_case(store, case, probs, prov)
        shapes[case] = list(probs.shape)
    cache.finalize(store, shapes, folder)
    return store


def channels_shipped(trainers, n_batches=10) -> float:
    """Mean channels per batch the KD trainer's own training loader ships (nnU-Net's augmenter)."""
    import bench_student

    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        trainer = trainers.make("kd")
        trainer.on_train_start()
    try:
        return statistics.mean(next(trainer.dataloader_train)["softlabels"].shape[1] for _ in range(n_batches))
    finally:
        bench_student.shutdown(trainer)


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work = args.work.resolve()
    start = time.perf_counter()
    env = {**os.environ, "nnUNet_raw": str(args.work / "nnUNet_raw"),
           "nnUNet_preprocessed": str(args.work / "nnUNet_preprocessed"),
           "nnUNet_results": str(args.work / "nnUNet_results"), "nnUNet_n_proc_DA": str(args.da_workers),
           "nnUNet_def_n_proc": str(args.threads), "nnUNet_compile": "0"}
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        Path(env[key]).mkdir(parents=True, exist_ok=True)
    os.environ.update(env)  # before nnU-Net is imported
    prepared = {}
    for n in args.classes:
        pre = setup_dataset(args, n, env)
        prepared[n] = (pre, setup_cache(args, pre, n))
        print(f"setup: {n} classes: {pre} and cache {prepared[n][1].name}", flush=True)

    import torch

    import bench_student
    from fastkd.config import fill_defaults, load_schema
    from fastkd.student.plans import student_plans_name, write_student_plans
    from fastkd.student.run import student_settings

    torch.set_num_threads(args.threads)
    log = args.work / "logs" / "trainers.log"
    results = []
    for n in args.classes:
        pre, store = prepared[n]
        plans_name = student_plans_name("nnUNetPlans", args.reduction_factor)
        write_student_plans(pre / "nnUNetPlans.json", pre / f"{plans_name}.json", args.reduction_factor)
        config = fill_defaults({"student": {"schedule": {"batch_size": args.batch_size}}}, load_schema())
        settings = student_settings(config, store, kd=True)
        trainers = bench_student.Trainers(pre.name, plans_name, settings, args.batch_size, args.device, [])
        blocks = []
        for r in range(args.repeats):
            for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
                block = bench_student.time_block(trainers, kind, args.iterations, args.warmup, log)
                blocks.append(dict(block, round=r))
                print(f"  {n:>4} classes, round {r + 1}/{args.repeats} {kind:>5}: {block['its_per_second']:.3f} it/s",
                      flush=True)
        its = {k: [b["its_per_second"] for b in blocks if b["kind"] == k] for k in KINDS}
        ratios = [a / b for a, b in zip(its["kd"], its["stock"])]
        shipped = channels_shipped(trainers)
        results.append({"classes": n, "ratio": statistics.median(ratios), "ratios": ratios, "its": its,
                        "channels_shipped": shipped, "patch_size": blocks[0]["patch_size"],
                        "batch_size": blocks[0]["batch_size"]})
    print()
    print(f"KD student it/s / stock nnUNetTrainer it/s (goal >= {GOAL}); r = {args.reduction_factor}, "
          f"{args.device}, {args.threads} threads, {args.da_workers} augmentation workers, "
          f"cache {'top-' + str(args.top_k) if args.top_k else 'dense uint8'}")
    print(f"{'classes':>7} {'patch':>16} {'KD it/s':>8} {'stock it/s':>10} {'ratio':>6} {'result':>6} "
          f"{'channels shipped / C':>21}")
    for r in results:
        print(f"{r['classes']:>7} {str(r['patch_size']):>16} {statistics.median(r['its']['kd']):>8.3f} "
              f"{statistics.median(r['its']['stock']):>10.3f} {r['ratio']:>6.3f} "
              f"{'PASS' if r['ratio'] >= GOAL else 'MISS':>6} {r['channels_shipped']:>10.1f} / {r['classes']}")
    out = args.work / "bench_classes.json"
    out.write_text(json.dumps({"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                               "results": results, "seconds": time.perf_counter() - start}, indent=2) + "\n")
    print(f"bench_classes: done in {time.perf_counter() - start:.0f} s; {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
