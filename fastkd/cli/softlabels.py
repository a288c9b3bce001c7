"""``fastkd softlabels``: fill one shard of the soft-label cache, then finalize the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from fastkd.cli.common import _stage, config_flag, positive_int, set_threads
from fastkd.config import arg_type, default


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` (1-based shard I of N) -> (I - 1, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= I <= N")
    return i - 1, n


def add_parser(sub) -> None:
    stage = _stage(sub, "softlabels", "compute the soft-label cache")
    p = stage.add_parser("fill", help="run the teacher folds once per case into the soft-label cache (one shard)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the cache store (*.zarr)")
    p.add_argument("-t", "--teachers", type=Path, nargs="+", required=True,
                   help="teacher manifest(s) written by `fastkd teachers manifest` (one per teacher folder)")
    p.add_argument("-w", "--weights", type=arg_type("teachers.weight"), nargs="+", default=None,
                   help="ensemble weight per teacher manifest (default: equal)")
    p.add_argument("-m", "--preprocess-manifest", type=Path, required=True,
                   help="manifest of the preprocessed configuration (`fastkd preprocess run|adopt`): cases and shapes; "
                        "or of unlabelled images (`fastkd preprocess unlabelled`)")
    config_flag(p, ["-T", "--temperature"], "distillation.temperature", "softmax temperature")
    config_flag(p, ["--step-size"], "softlabels.step_size", "sliding-window step, fraction of the patch")
    p.add_argument("--disable-mirroring", action="store_true", help="no test-time mirroring (1 pass per tile)")
    config_flag(p, ["--dtype"], "softlabels.dtype", "stored dtype")
    config_flag(p, ["--top-k"], "softlabels.top_k", "store per voxel only the k largest probabilities and their "
                "classes (softmax datasets with many classes)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N", help="compute shard I of N (default 1/1)")
    # one value per job (the config's list is a sweep over jobs): checked by fill_cache, naming the valid ones
    p.add_argument("--folds-per-case", default=default("softlabels.folds_per_case"), metavar="{all,out_of_fold}",
                   help="all: every teacher fold on every case; out_of_fold: per case only the folds that held it "
                        "out in nnU-Net's split (config softlabels.folds_per_case; "
                        f"default {default('softlabels.folds_per_case')})")
    p.add_argument("--splits", type=Path, default=None,
                   help="nnU-Net's splits_final.json the teachers were trained with, for out_of_fold "
                        "(default: $nnUNet_preprocessed/<dataset>/splits_final.json)")
    config_flag(p, ["--device"], "softlabels.device", "device")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads for torch")
    p.add_argument("--marker", type=Path, default=None, help="write the shard's summary JSON here when done")
    p.set_defaults(func=_softlabels_fill)
    p = stage.add_parser("finalize", help="check every case is in the store, then write its root (complete)")
    p.add_argument("store", type=Path)
    p.add_argument("-m", "--preprocess-manifest", type=Path, nargs="+", required=True,
                   help="the training cases' preprocess manifest, and the unlabelled images' (`fastkd preprocess "
                        "unlabelled`) if there are any")
    p.set_defaults(func=_softlabels_finalize)


def _softlabels_fill(args) -> None:
    from fastkd.softlabels import fill_cache

    set_threads(args.threads)
    shard, n_shards = args.shard
    summary = fill_cache(args.output, args.teachers, args.preprocess_manifest, args.temperature, weights=args.weights,
                         step_size=args.step_size, mirroring=not args.disable_mirroring, dtype=args.dtype,
                         n_shards=n_shards, shard=shard, device=args.device, marker=args.marker,
                         folds_per_case=args.folds_per_case, splits=args.splits, top_k=args.top_k)
    print(f"shard {shard + 1}/{n_shards} ({args.folds_per_case}): computed {len(summary['computed'])} cases, "
          f"kept {len(summary['skipped'])} already cached, {summary['teacher_forwards']} teacher forwards in "
          f"{summary['seconds']:.1f} s -> {args.output}")


def _softlabels_finalize(args) -> None:
    from fastkd.softlabels import finalize_cache

    root = finalize_cache(args.store, args.preprocess_manifest)
    print(f"{args.store}: complete, {len(root['cases'])} cases ({len(root['unlabelled'])} unlabelled)")
