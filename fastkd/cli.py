"""The fastkd command: one subcommand per workflow step, each usable without Snakemake.

nnU-Net reads its folders from the environment (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``) as nnU-Net's own commands do; the Snakefile sets them from the config for every
job. Heavy imports (torch, nnU-Net) happen inside the subcommands, so ``fastkd --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fastkd.errors import FastkdError


def _cmd_demo_data(args) -> None:
    from fastkd.demo_data import make_demo_dataset

    try:
        cases = make_demo_dataset(args.output, n_cases=args.n_cases, anisotropic=args.anisotropic, seed=args.seed)
    except ValueError as e:  # argument checks of the generator
        raise FastkdError(str(e)) from e
    print(f"wrote {len(cases)} demo cases to {args.output}")


def _cmd_config(args) -> None:
    import yaml

    from fastkd.config import load_config
    from fastkd.paths import Paths

    config = load_config(args.configfiles)
    print(yaml.safe_dump(config, sort_keys=False), end="")
    if args.paths:
        p = Paths(config)
        print("# artifact paths")
        rows = {"raw dataset": p.raw_dataset, "plans": p.plans_file, "splits": p.splits_file,
                **{f"preprocess manifest ({c})": p.preprocess_manifest(c) for c in config["plans"]["configurations"]},
                "teacher folder": p.teacher_folder,
                **{f"teacher fold {f}": p.teacher_checkpoint(f) for f in config["teachers"]["folds"]},
                **{f"teacher manifest ({s['name']})": p.teacher_manifest_of(s["name"]) for s in p.teacher_sets},
                "soft-label cache": p.softlabel_cache,
                "soft-label preview": p.softlabel_preview}
        for key, value in rows.items():
            print(f"# {key}: {value}")


def set_threads(threads: int, min_da_workers: int = 0) -> None:
    """Bound every pool nnU-Net starts by the job's threads (unless the user set them explicitly)."""
    da_workers = int(os.environ.setdefault("nnUNet_n_proc_DA", str(max(threads - 1, 0))))
    os.environ["nnUNet_n_proc_DA"] = str(max(da_workers, min_da_workers))
    os.environ.setdefault("nnUNet_def_n_proc", str(threads))
    import torch

    torch.set_num_threads(threads)


def _cmd_plan_preprocess(args) -> None:
    from fastkd.preprocess import plan_preprocess

    # nnU-Net's planner sizes torch's thread pool by nnUNet_n_proc_DA and fails on 0
    set_threads(args.num_processes, min_da_workers=1)
    plans = plan_preprocess(args.dataset_id, args.raw_source, args.configurations, args.manifests,
                            planner_class=args.planner, teacher_folder=args.plans_from,
                            num_processes=args.num_processes, gpu_memory_target_gb=args.gpu_memory_target)
    print(f"plans {plans}: preprocessed {', '.join(args.configurations)}")


def _cmd_train_teacher(args) -> None:
    from fastkd.teachers import train_teacher

    set_threads(args.threads)
    folder = train_teacher(args.dataset, args.configuration, args.fold, args.plans, args.trainer,
                           epochs=args.epochs, iterations_per_epoch=args.iterations,
                           val_iterations_per_epoch=args.val_iterations, batch_size=args.batch_size,
                           save_every=args.save_every, device=args.device, resume=not args.no_resume)
    print(f"teacher fold {args.fold} done: {folder}")


def fold_arg(text: str):
    if text == "all":
        return "all"
    try:
        fold = int(text)
    except ValueError:
        fold = -1
    if fold not in range(5):
        raise argparse.ArgumentTypeError(f"{text!r}: a fold is 0-4 or 'all'")
    return fold


def _cmd_train_student(args) -> None:
    from fastkd.student.train import make_settings, train_student

    set_threads(args.threads)
    settings = make_settings(cache=args.cache, temperature=args.temperature, alpha=args.alpha, epochs=args.epochs,
                             iterations_per_epoch=args.iterations, val_iterations_per_epoch=args.val_iterations,
                             batch_size=args.batch_size, save_every=args.save_every, rotate_every=args.rotate_every,
                             soft_dice=args.soft_dice, cauchy_schwarz=args.cauchy_schwarz,
                             validation_mirroring=not args.no_validation_mirroring)
    folder = train_student(args.dataset, args.plans, args.configuration, args.fold, settings, da5=args.da5,
                           device=args.device, num_gpus=args.num_gpus, resume=not args.no_resume)
    print(f"student fold {args.fold} done: {folder}")


def _cmd_teachers(args) -> None:
    from fastkd.teachers import validate_model_folder, write_manifest

    if args.output is None:
        validate_model_folder(args.folder, args.configuration, args.folds, args.checkpoint)
        print(f"{args.folder}: folds {args.folds} with {args.checkpoint} present")
    else:
        manifest = write_manifest(args.folder, args.configuration, args.folds, args.checkpoint, args.output)
        print(f"wrote {args.output} ({len(manifest['folds'])} folds)")


def _cmd_softlabels(args) -> None:
    from fastkd.softlabels import fill_cache

    set_threads(args.threads)
    shard, n_shards = args.shard
    summary = fill_cache(args.output, args.teachers, args.preprocess_manifest, args.temperature, weights=args.weights,
                         step_size=args.step_size, mirroring=not args.disable_mirroring, dtype=args.dtype,
                         n_shards=n_shards, shard=shard, device=args.device, marker=args.marker)
    print(f"shard {shard + 1}/{n_shards}: computed {len(summary['computed'])} cases, kept {len(summary['skipped'])} "
          f"already cached, {summary['teacher_forwards']} teacher forwards in {summary['seconds']:.1f} s -> {args.output}")


def _cmd_cache_finalize(args) -> None:
    from fastkd.softlabels import finalize_cache

    root = finalize_cache(args.store, args.preprocess_manifest)
    print(f"{args.store}: complete, {len(root['cases'])} cases")


def _cmd_cache_info(args) -> None:
    from fastkd.cache import format_info, info

    report = info(args.store)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(format_info(report, list_cases=args.cases))


def _cmd_cache_verify(args) -> None:
    from fastkd.cache import verify

    problems = verify(args.store, args.preprocessed)
    if problems:
        raise FastkdError(f"{args.store}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    print(f"{args.store}: every chunk of every case read back: checksums, values, sums and shapes OK")


def _cmd_cache_show(args) -> None:
    from fastkd.cache import show

    out = args.output or Path(f"{args.case}_softlabels.png")
    show(args.store, args.case, out, args.preprocessed, axis=args.axis, index=args.slice)
    print(f"wrote {out}")


def _cmd_student_plans(args) -> None:
    from fastkd.student.plans import derive_student_plans, load_plans, write_student_plans

    out = args.output
    if out is None:  # beside the teacher plans, named after the plans: where nnU-Net looks for them
        name = derive_student_plans(load_plans(args.teacher_plans), args.r, args.block_strategy)["plans_name"]
        out = args.teacher_plans.parent / f"{name}.json"
    plans = write_student_plans(args.teacher_plans, out, args.r, args.block_strategy)
    print(f"student plans {plans['plans_name']}: {out}")


def _cmd_student_info(args) -> None:
    from fastkd.student.plans import derive_student_plans, format_info, load_plans

    teacher = load_plans(args.teacher_plans)
    if args.student is not None:
        if args.block_strategy != "keep":
            raise FastkdError(f"-bs {args.block_strategy} derives a student; --student {args.student} is one already")
        student = load_plans(args.student)
    else:
        student = derive_student_plans(teacher, 2 if args.r is None else args.r, args.block_strategy)
    dataset_json = args.dataset_json or args.teacher_plans.parent / "dataset.json"
    if not dataset_json.is_file():
        raise FastkdError(f"no dataset.json at {dataset_json} (needed for the input and output channels); "
                          "give one with --dataset-json")
    with open(dataset_json) as f:
        print(format_info(teacher, student, json.load(f), args.configurations))


def _cmd_student_report(args) -> None:
    from fastkd.student.report import write_report

    rows = write_report(args.models, args.output, args.tsv, args.title)
    print(f"wrote {args.output} and {args.tsv} ({len(rows)} models)")


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` (1-based shard I of N) -> (I - 1, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= I <= N")
    return i - 1, n


def build_parser() -> argparse.ArgumentParser:
    from fastkd import __version__
    from fastkd.student.plans import BLOCK_STRATEGIES

    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("demo-data", help="write the built-in synthetic dataset (nnU-Net raw layout)")
    p.add_argument("output", type=Path, help="dataset folder to write, e.g. nnUNet_raw/Dataset900_FastkdDemo")
    p.add_argument("--n-cases", type=int, default=12, help="number of cases (>= 5; default 12)")
    p.add_argument("--anisotropic", action="store_true", help="1 x 1 x 3 mm voxels instead of 1 mm isotropic")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0); same seed -> same files")
    p.set_defaults(func=_cmd_demo_data)

    p = sub.add_parser("config", help="validate config file(s), print the complete config with defaults")
    p.add_argument("configfiles", nargs="*", type=Path, default=[Path("config.yaml")],
                   help="YAML files, later ones override earlier ones (default: config.yaml)")
    p.add_argument("--paths", action="store_true", help="also print the artifact paths")
    p.set_defaults(func=_cmd_config)

    p = sub.add_parser("plan-preprocess", help="nnU-Net fingerprint, planning and preprocessing")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id")
    p.add_argument("--raw-source", type=Path, required=True, help="raw dataset folder DatasetXXX_Name")
    p.add_argument("-c", "--configurations", nargs="+", required=True, choices=["2d", "3d_fullres", "3d_lowres"])
    p.add_argument("--manifests", nargs="+", type=Path, required=True, help="one manifest path per configuration")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--planner", default="ExperimentPlanner",
                       help="nnU-Net experiment planner class (default ExperimentPlanner; nnUNetPlannerResEncM/L/XL)")
    group.add_argument("--plans-from", type=Path, default=None,
                       help="use the plans.json of this existing teacher model folder instead of planning")
    p.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--gpu-memory-target", type=float, default=None, help="planner GPU memory target in GB")
    p.set_defaults(func=_cmd_plan_preprocess)

    p = sub.add_parser("train-teacher", help="train one nnU-Net teacher fold (+ its final validation)")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    p.add_argument("-c", "--configuration", required=True)
    p.add_argument("-f", "--fold", type=int, required=True, choices=range(5))
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans name (default nnUNetPlans)")
    p.add_argument("-tr", "--trainer", default="nnUNetTrainer", help="nnU-Net trainer class (default nnUNetTrainer)")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--iterations", type=int, default=250, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=50, help="validation iterations per epoch")
    p.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size")
    p.add_argument("--save-every", type=int, default=10, help="write checkpoint_latest.pth every N epochs")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch and nnU-Net worker pools)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint_latest.pth left by a killed run")
    p.set_defaults(func=_cmd_train_teacher)

    p = sub.add_parser("train-student", help="train one student fold on patches + cached soft labels (+ final validation)")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    p.add_argument("-p", "--plans", required=True, help="student plans name (written by `fastkd student plans`)")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--fold", type=fold_arg, default=0, help="0-4, or 'all' to train on every case (default 0)")
    p.add_argument("--cache", default=None, help="soft-label cache (a complete Zarr store); not needed with -a 0")
    p.add_argument("-T", "--temperature", type=float, default=3.0, help="KD temperature; must equal the cache's")
    p.add_argument("-a", "--alpha", type=float, default=0.3, help="KD weight in [0, 1]; 0 = no-KD baseline")
    p.add_argument("--soft-dice", type=float, default=0.0, help="weight of a soft Dice term against the soft labels")
    p.add_argument("--cauchy-schwarz", type=float, default=0.0, help="weight of a Cauchy-Schwarz divergence term")
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--iterations", type=int, default=250, help="training iterations per epoch")
    p.add_argument("--val-iterations", type=int, default=50, help="validation iterations per epoch")
    p.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size")
    p.add_argument("--save-every", type=int, default=5, help="write checkpoint_latest.pth every N epochs")
    p.add_argument("--rotate-every", type=int, default=0,
                   help="rotate the training split every N epochs: fold f trains on split (f + epoch // N) %% 5 (0 = off)")
    p.add_argument("--da5", action="store_true", help="nnU-Net's DA5 augmentation")
    p.add_argument("--no-validation-mirroring", action="store_true", help="final validation without test-time mirroring")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--num-gpus", type=int, default=1, help="nnU-Net's multi-GPU (DDP) mode, CUDA only")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch and nnU-Net worker pools)")
    p.add_argument("--no-resume", action="store_true", help="start over instead of continuing a checkpoint of the same settings")
    p.set_defaults(func=_cmd_train_student)

    p = sub.add_parser("teachers", help="validate an nnU-Net teacher model folder; with -o write its manifest")
    p.add_argument("folder", type=Path, help="model folder Trainer__Plans__configuration")
    p.add_argument("-c", "--configuration", default="3d_fullres")
    p.add_argument("-f", "--folds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("-o", "--output", type=Path, default=None, help="write the teacher manifest JSON here")
    p.set_defaults(func=_cmd_teachers)

    p = sub.add_parser("softlabels", help="run the teacher folds once per case into the soft-label cache (one shard)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the cache store (*.zarr)")
    p.add_argument("-t", "--teachers", type=Path, nargs="+", required=True,
                   help="teacher manifest(s) written by `fastkd teachers -o` (one per teacher folder)")
    p.add_argument("-w", "--weights", type=float, nargs="+", default=None,
                   help="ensemble weight per teacher manifest (default: equal)")
    p.add_argument("-m", "--preprocess-manifest", type=Path, required=True,
                   help="manifest of the preprocessed configuration (`fastkd plan-preprocess`): cases and shapes")
    p.add_argument("-T", "--temperature", type=float, default=3.0, help="softmax temperature (default 3.0)")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step, fraction of the patch (0.5)")
    p.add_argument("--disable-mirroring", action="store_true", help="no test-time mirroring (1 pass per tile)")
    p.add_argument("--dtype", choices=["uint8", "float16"], default="uint8", help="stored dtype (default uint8)")
    p.add_argument("--shard", type=_shard, default=(0, 1), metavar="I/N", help="compute shard I of N (default 1/1)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "mps"])
    p.add_argument("--threads", type=int, default=1, help="CPU threads for torch")
    p.add_argument("--marker", type=Path, default=None, help="write the shard's summary JSON here when done")
    p.set_defaults(func=_cmd_softlabels)

    p = sub.add_parser("cache", help="inspect, verify, view or finalize a soft-label cache")
    cache_sub = p.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    c = cache_sub.add_parser("info", help="cases, shapes, dtype, bytes on disk, compression, provenance, completeness")
    c.add_argument("store", type=Path)
    c.add_argument("--cases", action="store_true", help="also list every case")
    c.add_argument("--json", action="store_true", help="print the report as JSON")
    c.set_defaults(func=_cmd_cache_info)
    c = cache_sub.add_parser("verify", help="read every chunk: checksums, finite, sums to one, shapes; exit 1 naming bad cases")
    c.add_argument("store", type=Path)
    c.add_argument("--preprocessed", type=Path, default=None,
                   help="folder of the preprocessed <case>.b2nd (default: the one recorded in the cache)")
    c.set_defaults(func=_cmd_cache_verify)
    c = cache_sub.add_parser("show", help="PNG of one slice: image, label, soft labels per class")
    c.add_argument("store", type=Path)
    c.add_argument("case")
    c.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default <case>_softlabels.png)")
    c.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="slice perpendicular to this axis (2)")
    c.add_argument("--slice", type=int, default=None, help="slice index (default: most foreground)")
    c.add_argument("--preprocessed", type=Path, default=None, help="folder of the preprocessed <case>.b2nd")
    c.set_defaults(func=_cmd_cache_show)
    c = cache_sub.add_parser("finalize", help="check every case is in the store, then write its root (complete)")
    c.add_argument("store", type=Path)
    c.add_argument("-m", "--preprocess-manifest", type=Path, required=True)
    c.set_defaults(func=_cmd_cache_finalize)

    p = sub.add_parser("student", help="student plans (narrower teacher plans), their size and cost, reports")
    student_sub = p.add_subparsers(dest="student_command", required=True, metavar="ACTION")
    c = student_sub.add_parser("plans", help="write the student plans of a teacher plans file")
    c.add_argument("teacher_plans", type=Path, help="teacher plans JSON, e.g. nnUNet_preprocessed/<ds>/nnUNetPlans.json")
    c.add_argument("-r", "--reduction-factor", dest="r", type=int, required=True,
                   help="divide features_per_stage by r (floor 8)")
    c.add_argument("-bs", "--block-strategy", choices=BLOCK_STRATEGIES, default="keep",
                   help="ResEnc blocks per stage: reduce | keep | increase | adaptive (default keep)")
    c.add_argument("-o", "--output", type=Path, default=None,
                   help="student plans JSON to write (default: <student plans name>.json beside the teacher plans)")
    c.set_defaults(func=_cmd_student_plans)
    c = student_sub.add_parser("info", help="teacher vs student parameters and GFLOPs per patch")
    c.add_argument("teacher_plans", type=Path, help="teacher plans JSON")
    group = c.add_mutually_exclusive_group()
    group.add_argument("-r", "--reduction-factor", dest="r", type=int, default=None,
                       help="derive the student with this r (default 2)")
    group.add_argument("--student", type=Path, default=None, help="compare this existing student plans JSON instead")
    c.add_argument("-bs", "--block-strategy", choices=BLOCK_STRATEGIES, default="keep",
                   help="ResEnc blocks per stage when deriving (default keep)")
    c.add_argument("--dataset-json", type=Path, default=None,
                   help="dataset.json for input/output channels (default: the one beside the teacher plans)")
    c.add_argument("-c", "--configurations", nargs="+", default=None, help="configurations (default: all)")
    c.set_defaults(func=_cmd_student_info)
    c = student_sub.add_parser("report", help="PNG of training curves + Dice table (and a TSV) of trained folds")
    c.add_argument("models", nargs="+", help="LABEL=FOLD_FOLDER, e.g. KD=nnUNet_results/<ds>/<model>/fold_0")
    c.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    c.add_argument("--tsv", type=Path, required=True, help="Dice table (TSV) to write")
    c.add_argument("--title", default="")
    c.set_defaults(func=_cmd_student_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("n_cases", "seed", "epochs", "iterations", "val_iterations", "batch_size", "save_every",
                 "threads", "num_processes", "num_gpus"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "seed" else 1):
            print(f"fastkd {args.command}: error: --{name.replace('_', '-')} = {value}: must be "
                  f">= {0 if name == 'seed' else 1}", file=sys.stderr)
            return 2
    try:
        args.func(args)
    except FastkdError as e:
        command = " ".join(filter(None, [args.command, getattr(args, "cache_command", None),
                                         getattr(args, "student_command", None)]))
        print(f"fastkd {command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
