"""The fastkd command: ``fastkd <stage> <action>``, one action per workflow rule, each usable without Snakemake.

Stages follow the workflow: ``demo``, ``config``, ``preprocess``, ``teachers``, ``softlabels``,
``cache`` (inspect a store), ``student``, ``evaluate``, ``export``, ``report``; and ``fastkd predict``. Flags that set a config
value take their default from the config schema and are checked by it, so a value is valid (or not) the same way in ``config.yaml``,
on the command line and in the reference commands. ``fastkd student train`` takes its settings as
config keys (``--set student.schedule.epochs=10``), so a new student option needs no new flag.

nnU-Net reads its folders from the environment (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``) as nnU-Net's own commands do; the Snakefile sets them from the config for every
job. Heavy imports (torch, nnU-Net) happen inside the actions, so ``fastkd --help`` is instant.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from fastkd.config import arg_type, default
from fastkd.errors import FastkdError


def set_threads(threads: int, training: bool = False) -> None:
    """Bound every pool nnU-Net starts by the job's threads (unless the user set them explicitly).

    ``training``: at least one augmentation worker (even over an explicit 0), so augmentation runs beside the network, not in
    turn with it, even in a one-thread job (nnU-Net's planner also needs >= 1: it sizes torch's pool by it).
    """
    da_workers = int(os.environ.setdefault("nnUNet_n_proc_DA", str(max(threads - 1, 0))))
    os.environ["nnUNet_n_proc_DA"] = str(max(da_workers, 1 if training else 0))
    os.environ.setdefault("nnUNet_def_n_proc", str(threads))
    import torch

    torch.set_num_threads(threads)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


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


def _shard(text: str) -> tuple[int, int]:
    """``I/N`` (1-based shard I of N) -> (I - 1, N)."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 1/4") from None
    if not 1 <= i <= n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= I <= N")
    return i - 1, n


def config_flag(parser, flags: list[str], key: str, help: str, **kwargs) -> None:
    """A flag that sets config key ``key``: its default and its check come from the schema."""
    parser.add_argument(*flags, type=arg_type(key), default=default(key),
                        help=f"{help} (config {key}; default {default(key)})", **kwargs)


# -- actions ----------------------------------------------------------------------------------------
def _demo_write(args) -> None:
    from fastkd.demo import make_demo_dataset

    try:
        cases = make_demo_dataset(args.output, n_cases=args.n_cases, n_test=args.n_test, anisotropic=args.anisotropic, seed=args.seed,
                                  shape=args.shape, spacing=args.spacing, n_structures=args.n_structures,
                                  n_channels=args.n_channels, regions=args.regions, label_noise=args.label_noise)
    except ValueError as e:  # argument checks of the generator
        raise FastkdError(str(e)) from e
    print(f"wrote {len(cases)} demo training cases and {args.n_test} test cases to {args.output}")


def _config_show(args) -> None:
    import yaml

    from fastkd.config import load_config
    from fastkd.paths import Paths
    from fastkd.student import students
    from fastkd.teachers import teacher_sets

    config = load_config(args.configfiles)
    print(yaml.safe_dump(config, sort_keys=False), end="")
    if args.paths:
        p = Paths(config)
        n_test = config["dataset"]["holdout"]["n_test"]
        held_out = {f"held-out test cases ({n_test}, linked)": p.evaluation("test") / "cases"} if n_test else {}
        rows = {"raw dataset": p.raw_dataset, **held_out, "plans": p.plans_file, "splits": p.splits_file,
                **{f"preprocess manifest ({c})": p.preprocess_manifest(c) for c in config["plans"]["configurations"]},
                "teacher folder": p.teacher_folder,
                **{f"teacher fold {f}": p.teacher_checkpoint(f) for f in config["teachers"]["folds"]},
                **{f"teacher manifest ({s['name']})": p.teacher_manifest_of(s["name"])
                   for s in teacher_sets(config, p.teacher_folder)},
                **{f"student plans (r = {r})": p.student_plans_file(r)
                   for r in config["distillation"]["reduction_factors"]}}
        for s in students(config):  # one per combination of the swept settings
            sp = Paths(s.config(config))
            if s.kd:
                rows[f"soft-label cache (T = {s.temperature:g}, {s.folds_per_case})"] = sp.softlabel_cache()
            rows[f"student ({s.label})"] = sp.student_folder(s.r, s.kd)
        rows = {**rows,
                "report pages": p.report_folder}
        print("# artifact paths")
        for key, value in rows.items():
            print(f"# {key}: {value}")


def _preprocess_run(args) -> None:
    from fastkd.preprocess import plan_preprocess

    set_threads(args.num_processes, training=True)  # the planner sizes torch's pool by nnUNet_n_proc_DA
    plans = plan_preprocess(args.dataset_id, args.raw_source, args.configurations, args.manifests,
                            planner_class=args.planner, teacher_folder=args.plans_from,
                            num_processes=args.num_processes, gpu_memory_target_gb=args.gpu_memory_target,
                            holdout_n_test=args.holdout, holdout_seed=args.holdout_seed)
    print(f"plans {plans}: preprocessed {', '.join(args.configurations)}")


def _preprocess_adopt(args) -> None:
    from fastkd.preprocess import adopt_preprocessed

    cases = adopt_preprocessed(args.dataset, args.plans, args.configurations, args.manifests)
    print(f"{args.dataset} ({args.plans}): {len(cases)} preprocessed cases of {', '.join(args.configurations)}")


def _teachers_train(args) -> None:
    from fastkd.teachers import train_teacher

    set_threads(args.threads, training=True)
    schedule = {"epochs": args.epochs, "iterations_per_epoch": args.iterations,
                "val_iterations_per_epoch": args.val_iterations, "batch_size": args.batch_size,
                "save_every": args.save_every}
    folder = train_teacher(args.dataset, args.configuration, args.fold, args.plans, args.trainer, schedule=schedule,
                           device=args.device, resume=not args.no_resume,
                           validation_mirroring=not args.disable_validation_mirroring)
    print(f"teacher fold {args.fold} done: {folder}")


def _teachers_check(args) -> None:
    from fastkd.teachers import validate_model_folder

    validate_model_folder(args.folder, args.configuration, args.folds, args.checkpoint)
    print(f"{args.folder}: folds {args.folds} with {args.checkpoint} present")


def _teachers_manifest(args) -> None:
    from fastkd.teachers import write_manifest

    manifest = write_manifest(args.folder, args.configuration, args.folds, args.checkpoint, args.output)
    print(f"wrote {args.output} ({len(manifest['folds'])} folds)")


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
    print(f"{args.store}: complete, {len(root['cases'])} cases")


def _cache_info(args) -> None:
    from fastkd.cache import format_info, info

    report = info(args.store)
    print(json.dumps(report, indent=2) if args.json else format_info(report, list_cases=args.cases))


def _cache_verify(args) -> None:
    from fastkd.cache import verify

    problems = verify(args.store, args.preprocessed)
    if problems:
        raise FastkdError(f"{args.store}: {len(problems)} problem(s):\n  - " + "\n  - ".join(problems))
    print(f"{args.store}: every chunk of every case read back: checksums, values, sums and shapes OK")


def _cache_show(args) -> None:
    from fastkd.cache import show

    out = args.output or Path(f"{args.case}_softlabels.png")
    show(args.store, args.case, out, args.preprocessed, axis=args.axis, index=args.slice)
    print(f"wrote {out}")


def _student_plans(args) -> None:
    from fastkd.nnunet import read_plans
    from fastkd.student.plans import derive_student_plans, write_student_plans

    out = args.output
    if out is None:  # beside the base plans, named after the plans: where nnU-Net looks for them
        name = derive_student_plans(read_plans(args.teacher_plans), args.r, args.block_strategy)["plans_name"]
        out = args.teacher_plans.parent / f"{name}.json"
    plans = write_student_plans(args.teacher_plans, out, args.r, args.block_strategy)
    print(f"student plans {plans['plans_name']}: {out}")


def _student_info(args) -> None:
    from fastkd.io import atomic_write_text, read_json
    from fastkd.nnunet import read_plans
    from fastkd.student.plans import derive_student_plans, format_info

    teacher = read_plans(args.teacher_plans)
    if args.student is not None:
        if args.block_strategy != "keep":
            raise FastkdError(f"-bs {args.block_strategy} derives a student; --student {args.student} is one already")
        student = read_plans(args.student)
    else:
        student = derive_student_plans(teacher, 2 if args.r is None else args.r, args.block_strategy)
    dataset_json = read_json(args.dataset_json or args.teacher_plans.parent / "dataset.json", "dataset.json",
                             "needed for the input and output channels; give one with --dataset-json")
    text = format_info(teacher, student, dataset_json, args.configurations)
    if args.output is not None:
        atomic_write_text(args.output, text + "\n")
    print(text)


def _student_train(args) -> None:
    from fastkd.config import parse_overrides, validate_config
    from fastkd.student import student_tag
    from fastkd.student.run import student_settings, train_student

    set_threads(args.threads, training=True)
    config = validate_config(parse_overrides(args.set), check_files=False)
    settings = student_settings(config, args.cache, kd=not args.baseline)
    s = config["student"]
    folder = train_student(args.dataset, args.plans, args.configuration, args.fold, settings,
                           da5=s["augmentation"] == "da5", device=s["device"], num_gpus=s["num_gpus"],
                           resume=s["resume"], tag=student_tag(config, kd=not args.baseline))
    print(f"student fold {args.fold} done: {folder}")


def _export_onnx(args) -> None:
    from fastkd.export.onnx import export_onnx

    record = export_onnx(args.model_folder, args.fold, args.output, checkpoint=args.checkpoint,
                         input_shape=args.input_shape, batch=args.batch, dynamic=args.dynamic, simplify=args.simplify,
                         tensorrt=args.tensorrt, preprocessed=args.preprocessed, atol=args.atol,
                         min_agreement=args.min_agreement)
    worst = max(c["max_abs_diff"] for c in record["checks"])
    print(f"wrote {args.output} ({record['bytes'] / 1e6:.1f} MB): onnxruntime vs PyTorch on {len(record['checks'])} "
          f"inputs ({record['real_patches']} real), max |logit difference| {worst:.2g}, agreement "
          f"{min(c['agreement'] for c in record['checks']):.6f}; verification in {args.output}.json")


def _export_trt(args) -> None:
    from fastkd.export.tensorrt import build_engine

    profile = {"min": args.min_shape, "opt": args.opt_shape, "max": args.max_shape}
    record = build_engine(args.onnx, args.output, precision=args.precision, profile=profile, max_batch=args.max_batch,
                          calibration=args.calibration, timing_cache=args.timing_cache, workspace_gb=args.workspace_gb,
                          min_agreement=args.min_agreement, force=args.force)
    platform = f"TensorRT {record['tensorrt_version']}, {record['gpu']['name']}"
    if not record["built"]:
        print(f"{args.output}: up to date ({record['precision']}, {platform}, profile {record['profile']}); "
              "--force rebuilds it")
        return
    checks = record["parity"]["checks"]
    print(f"wrote {args.output} ({record['precision']}, {platform}, profile {record['profile']}, "
          f"{len(record['fp32_layers'])} layers held in FP32) in {record['seconds']:.0f} s: agreement with onnxruntime "
          f"{min(c['agreement'] for c in checks):.6f} on {len(checks)} inputs ({record['parity']['real_patches']} real); "
          f"metadata in {args.output}.json")


def _predict(args) -> None:
    set_threads(args.threads)  # before nnU-Net is imported: it reads its pool sizes once
    from fastkd.predict import RECORD, predict

    record = predict(args.input, args.output, args.model, backend=args.backend, folds=args.folds,
                     checkpoint=args.checkpoint, device=args.device, mirroring=not args.disable_mirroring,
                     step_size=args.step_size, save_probabilities=args.save_probabilities, num_processes=args.threads,
                     tile_batch=args.tile_batch, jit=args.jit)
    print(f"{record['cases']} segmentations in {args.output} ({record['backend']}, folds {record['folds']}, "
          f"{record['seconds_per_case']:.2f} s per case, {record['tile_batch']} network inputs per forward); "
          f"record in {args.output / RECORD}")


def _student_report(args) -> None:
    from fastkd.student.report import report_notes, write_report

    rows = write_report(args.models, args.output, args.tsv, args.title)
    print(f"wrote {args.output} and {args.tsv} ({len(rows)} models)")
    for note in report_notes(rows):
        print(note)


def _evaluate_cases(args) -> None:
    from fastkd.evaluate import link_cases, write_validation_cases

    if args.cases:
        cases = link_cases(args.cases, args.raw, args.images, args.labels)
        print(f"linked {len(cases)} cases into {args.images} and {args.labels}")
        return
    if args.fold is None:
        raise FastkdError("--splits needs -f FOLD: the fold whose validation cases to link")
    cases = write_validation_cases(args.splits, args.fold, args.raw, args.images, args.labels)
    print(f"linked fold {args.fold}'s {len(cases)} validation cases into {args.images} and {args.labels}")


def _evaluate_table(args) -> None:
    from fastkd.evaluate import evaluate, markdown
    from fastkd.io import read_json

    set_threads(args.threads)
    rows = evaluate(args.labels, args.predictions, args.output, dataset_json=read_json(args.dataset_json, "dataset.json", "the raw dataset's"),
                    optimistic=args.optimistic, case_set=args.case_set, num_processes=args.threads)
    table = read_json(args.output / "dice.json", "evaluation table", "written by the evaluation")
    print(markdown(rows, table["classes"], table), end="")
    print(f"wrote {args.output}/dice.tsv, dice.json, dice.md, dice.png")


def _report_summary(args) -> None:
    from fastkd.report import parse_pairs, write_summary

    result = write_summary(args.output, parse_pairs(args.models, "CHECKPOINT"), parse_pairs(args.onnx, "ONNX"),
                           args.evaluation, args.cache, args.preprocessed, args.title)
    for fold in result["no_curves"]:
        print(f"{fold}: no progress.png (a fold trained elsewhere), no training curves")
    caches = result["caches"]
    print(f"wrote {args.output}: {len(result['models'])} models, {len(result['speed'])} predictions of "
          f"{len(result['evaluations'])} case sets, {len(result['curves'])} training curves"
          + "".join(f"; soft-label cache {Path(c['store']).name}: verify {c['verify']}" for c in caches))


# -- the parser -------------------------------------------------------------------------------------
def _stage(sub, name: str, help: str):
    parser = sub.add_parser(name, help=help)
    return parser.add_subparsers(dest="action", required=True, metavar="ACTION")


def build_parser() -> argparse.ArgumentParser:
    from fastkd import __version__
    from fastkd.student.plans import BLOCK_STRATEGIES

    parser = argparse.ArgumentParser(prog="fastkd", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"fastkd {__version__}")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")

    stage = _stage(sub, "demo", "the built-in synthetic dataset")
    p = stage.add_parser("write", help="write the demo dataset in nnU-Net raw layout")
    p.add_argument("output", type=Path, help="dataset folder to write, e.g. nnUNet_raw/Dataset900_FastkdDemo")
    config_flag(p, ["--n-cases"], "dataset.demo.n_cases", "number of cases")
    config_flag(p, ["--n-test"], "dataset.demo.n_test", "held-out test cases (imagesTs/labelsTs)")
    p.add_argument("--anisotropic", action="store_true", help="1 x 1 x 3 mm voxels instead of 1 mm isotropic")
    config_flag(p, ["--seed"], "dataset.demo.seed", "random seed; same seed -> same files")
    config_flag(p, ["--shape"], "dataset.demo.shape", "voxels along x, y, z, e.g. --shape 256 256 200",
                nargs=3, metavar=("X", "Y", "Z"))
    config_flag(p, ["--spacing"], "dataset.demo.spacing", "mm per axis, e.g. --spacing 0.8 0.8 2.5 (not with "
                "--anisotropic)", nargs=3, metavar=("X", "Y", "Z"))
    config_flag(p, ["--n-structures"], "dataset.demo.n_structures", "foreground labels (2: organ + lesion)")
    config_flag(p, ["--n-channels"], "dataset.demo.n_channels", "image channels per case")
    p.add_argument("--regions", action="store_true",
                   help="region-based dataset.json (nested regions, regions_class_order; config dataset.demo.regions)")
    config_flag(p, ["--label-noise"], "dataset.demo.label_noise", "annotation noise in the training labels only, "
                "0 (clean) to 1", metavar="X")
    p.set_defaults(func=_demo_write)

    stage = _stage(sub, "config", "the workflow configuration")
    p = stage.add_parser("show", help="validate config file(s), print the complete config with defaults")
    p.add_argument("configfiles", nargs="*", type=Path, default=[Path("config.yaml")],
                   help="YAML files, later ones override earlier ones (default: config.yaml)")
    p.add_argument("--paths", action="store_true", help="also print the artifact paths")
    p.set_defaults(func=_config_show)

    stage = _stage(sub, "preprocess", "nnU-Net planning and preprocessing")
    p = stage.add_parser("run", help="nnU-Net fingerprint, planning and preprocessing, nnU-Net's split, manifests")
    p.add_argument("-d", "--dataset-id", type=int, required=True, help="nnU-Net dataset id")
    p.add_argument("--raw-source", type=Path, required=True, help="raw dataset folder DatasetXXX_Name")
    p.add_argument("-c", "--configurations", nargs="+", required=True, choices=["2d", "3d_fullres", "3d_lowres"])
    p.add_argument("--manifests", nargs="+", type=Path, required=True, help="one manifest path per configuration")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--planner", default="ExperimentPlanner",
                       help="nnU-Net experiment planner class (default ExperimentPlanner; nnUNetPlannerResEncM/L/XL)")
    group.add_argument("--plans-from", type=Path, default=None,
                       help="use the plans.json of this existing teacher model folder instead of planning")
    config_flag(p, ["-np", "--num-processes"], "plans.num_processes", "worker processes")
    config_flag(p, ["--gpu-memory-target"], "plans.gpu_memory_target_gb", "planner GPU memory target in GB")
    config_flag(p, ["--holdout"], "dataset.holdout.n_test", "labelled cases to hold back as the test set, never "
                "shown to nnU-Net", metavar="N")
    config_flag(p, ["--holdout-seed"], "dataset.holdout.seed", "which cases to hold back", metavar="S")
    p.set_defaults(func=_preprocess_run)
    p = stage.add_parser("adopt", help="a dataset preprocessed already (nnUNetv2_plan_and_preprocess): check every "
                                       "case, write nnU-Net's split if missing, and the manifests")
    p.add_argument("-d", "--dataset", required=True, help="dataset name DatasetXXX_Name")
    p.add_argument("-p", "--plans", required=True, help="plans name the dataset was preprocessed with")
    p.add_argument("-c", "--configurations", nargs="+", required=True, choices=["2d", "3d_fullres", "3d_lowres"])
    p.add_argument("--manifests", nargs="+", type=Path, required=True, help="one manifest path per configuration")
    p.set_defaults(func=_preprocess_adopt)

    stage = _stage(sub, "teachers", "the nnU-Net teacher ensemble")
    p = stage.add_parser("train", help="train one nnU-Net teacher fold (+ its final validation)")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    config_flag(p, ["-c", "--configuration"], "teachers.configuration", "nnU-Net configuration")
    p.add_argument("-f", "--fold", type=int, required=True, choices=range(5))
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans name (default nnUNetPlans)")
    config_flag(p, ["-tr", "--trainer"], "teachers.trainer", "nnU-Net trainer class")
    config_flag(p, ["--epochs"], "teachers.schedule.epochs", "epochs")
    config_flag(p, ["--iterations"], "teachers.schedule.iterations_per_epoch", "training iterations per epoch")
    config_flag(p, ["--val-iterations"], "teachers.schedule.val_iterations_per_epoch", "validation iterations per epoch")
    config_flag(p, ["--batch-size"], "teachers.schedule.batch_size", "override the plans' batch size")
    config_flag(p, ["--save-every"], "teachers.schedule.save_every", "write checkpoint_latest.pth every N epochs")
    config_flag(p, ["--device"], "teachers.device", "device")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (torch and nnU-Net worker pools)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint_latest.pth left by a killed run")
    p.add_argument("--disable-validation-mirroring", action="store_true",
                   help="final validation without test-time mirroring (teachers.validation_mirroring: false)")
    p.set_defaults(func=_teachers_train)
    for action, help in (("check", "check an nnU-Net teacher model folder holds every fold's checkpoint"),
                         ("manifest", "check a teacher model folder and write its manifest (folds, sha256)")):
        p = stage.add_parser(action, help=help)
        p.add_argument("folder", type=Path, help="model folder Trainer__Plans__configuration")
        config_flag(p, ["-c", "--configuration"], "teachers.configuration", "configuration")
        config_flag(p, ["-f", "--folds"], "teachers.folds", "folds", nargs="+")
        config_flag(p, ["-chk", "--checkpoint"], "teachers.checkpoint", "checkpoint file name")
        if action == "manifest":
            p.add_argument("-o", "--output", type=Path, required=True, help="the teacher manifest JSON to write")
        p.set_defaults(func=_teachers_check if action == "check" else _teachers_manifest)

    stage = _stage(sub, "softlabels", "compute the soft-label cache")
    p = stage.add_parser("fill", help="run the teacher folds once per case into the soft-label cache (one shard)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the cache store (*.zarr)")
    p.add_argument("-t", "--teachers", type=Path, nargs="+", required=True,
                   help="teacher manifest(s) written by `fastkd teachers manifest` (one per teacher folder)")
    p.add_argument("-w", "--weights", type=arg_type("teachers.weight"), nargs="+", default=None,
                   help="ensemble weight per teacher manifest (default: equal)")
    p.add_argument("-m", "--preprocess-manifest", type=Path, required=True,
                   help="manifest of the preprocessed configuration (`fastkd preprocess run|adopt`): cases and shapes")
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
    p.add_argument("-m", "--preprocess-manifest", type=Path, required=True)
    p.set_defaults(func=_softlabels_finalize)

    stage = _stage(sub, "cache", "inspect, verify or view a soft-label cache")
    p = stage.add_parser("info", help="cases, shapes, dtype, bytes on disk, compression, provenance, completeness")
    p.add_argument("store", type=Path)
    p.add_argument("--cases", action="store_true", help="also list every case")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cache_info)
    p = stage.add_parser("verify", help="read every chunk: checksums, finite, sums to one, shapes; exit 1 naming bad cases")
    p.add_argument("store", type=Path)
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="folder of the preprocessed <case>.b2nd (default: the one recorded in the cache)")
    p.set_defaults(func=_cache_verify)
    p = stage.add_parser("show", help="PNG of one slice: image, label, soft labels per class")
    p.add_argument("store", type=Path)
    p.add_argument("case")
    p.add_argument("-o", "--output", type=Path, default=None, help="PNG to write (default <case>_softlabels.png)")
    p.add_argument("--axis", type=int, choices=[0, 1, 2], default=2, help="slice perpendicular to this axis (2)")
    p.add_argument("--slice", type=int, default=None, help="slice index (default: most foreground)")
    p.add_argument("--preprocessed", type=Path, default=None, help="folder of the preprocessed <case>.b2nd")
    p.set_defaults(func=_cache_show)

    stage = _stage(sub, "student", "student plans, their size and cost, training, reports")
    p = stage.add_parser("plans", help="write the student plans of a teacher plans file")
    p.add_argument("teacher_plans", type=Path, help="base plans JSON, e.g. nnUNet_preprocessed/<ds>/nnUNetPlans.json")
    p.add_argument("-r", "--reduction-factor", dest="r", type=int, required=True,
                   help="divide features_per_stage by r (floor 8)")
    config_flag(p, ["-bs", "--block-strategy"], "student.block_strategy", "ResEnc blocks per stage")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="student plans JSON to write (default: <student plans name>.json beside the base plans)")
    p.set_defaults(func=_student_plans)
    p = stage.add_parser("info", help="teacher vs student parameters and GFLOPs per patch")
    p.add_argument("teacher_plans", type=Path, help="teacher plans JSON")
    group = p.add_mutually_exclusive_group()
    group.add_argument("-r", "--reduction-factor", dest="r", type=int, default=None,
                       help="derive the student with this r (default 2)")
    group.add_argument("--student", type=Path, default=None, help="compare this existing student plans JSON instead")
    p.add_argument("-bs", "--block-strategy", choices=BLOCK_STRATEGIES, default="keep",
                   help="ResEnc blocks per stage when deriving (default keep)")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="dataset.json for input/output channels (default: the one beside the teacher plans)")
    p.add_argument("-c", "--configurations", nargs="+", default=None, help="configurations (default: all)")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the table to this text file")
    p.set_defaults(func=_student_info)
    p = stage.add_parser("train", help="train one student fold on patches + cached soft labels (+ final validation)")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    p.add_argument("-p", "--plans", required=True, help="student plans name (written by `fastkd student plans`)")
    config_flag(p, ["-c", "--configuration"], "teachers.configuration", "configuration")
    p.add_argument("-f", "--fold", type=fold_arg, default=0, help="0-4, or 'all' to train on every case (default 0)")
    p.add_argument("--cache", type=Path, default=None, help="the soft-label cache (a complete Zarr store)")
    p.add_argument("--baseline", action="store_true", help="the no-KD baseline: alpha = 0, no cache")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config settings of the run, e.g. distillation.temperature=2 student.schedule.epochs=10 "
                        "student.device=cuda student.resume=false (every other key keeps its config default; see "
                        "config.yaml)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (torch and nnU-Net worker pools)")
    p.set_defaults(func=_student_train)
    p = stage.add_parser("report", help="PNG of training curves + Dice table (and a TSV) of trained folds")
    p.add_argument("models", nargs="+", help="LABEL=FOLD_FOLDER, e.g. KD=nnUNet_results/<ds>/<model>/fold_0")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    p.add_argument("--tsv", type=Path, required=True, help="Dice table (TSV) to write")
    p.add_argument("--title", default="")
    p.set_defaults(func=_student_report)

    stage = _stage(sub, "evaluate", "Dice and speed of the teacher ensemble, students and baselines on held-out cases")
    p = stage.add_parser("cases", help="link one fold's validation cases, or the given cases (images and labels) "
                                       "for evaluation")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--splits", type=Path, help="nnU-Net's splits_final.json (with -f: that fold's validation cases)")
    which.add_argument("--cases", nargs="+", metavar="CASE", help="these cases, e.g. dataset.holdout's test cases")
    p.add_argument("-f", "--fold", type=int, choices=range(5), help="the student fold (with --splits)")
    p.add_argument("--raw", type=Path, required=True, help="the raw dataset folder (imagesTr/, labelsTr/)")
    p.add_argument("--images", type=Path, required=True, help="folder to link the images into")
    p.add_argument("--labels", type=Path, required=True, help="folder to link the label maps into")
    p.set_defaults(func=_evaluate_cases)
    p = stage.add_parser("table", help="score predictions with nnU-Net's evaluation: Dice table (TSV, JSON, "
                                       "Markdown) and figure")
    p.add_argument("predictions", type=Path, nargs="+",
                   help="folders written by `fastkd predict` (the folder name labels the row)")
    p.add_argument("-l", "--labels", type=Path, required=True, help="folder of the reference label maps")
    p.add_argument("--dataset-json", type=Path, required=True, help="the dataset's dataset.json (labels, file ending)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for dice.tsv/.json/.md/.png")
    p.add_argument("--case-set", default="", help="name of the case set (in the table's title)")
    p.add_argument("--optimistic", action="store_true",
                   help="mark the table optimistic: the cases are validation cases some models trained on")
    p.add_argument("--threads", type=positive_int, default=1, help="worker processes of nnU-Net's evaluation")
    p.set_defaults(func=_evaluate_table)

    stage = _stage(sub, "report", "tables and figures of the Snakemake report")
    p = stage.add_parser("summary", help="size and FLOPs of every model, inference speed, Dice tables, soft-label cache "
                                         "status (TSV and HTML), a size figure and nnU-Net's training curves")
    p.add_argument("models", nargs="+", metavar="LABEL=CHECKPOINT",
                   help="every fold's checkpoint, e.g. teachers=nnUNet_results/<ds>/<model>/fold_0/checkpoint_final.pth; "
                        "folds with the same label are one model; the first model is the reference of the ratios")
    p.add_argument("--onnx", nargs="+", default=[], metavar="LABEL=ONNX", help="ONNX exports of the models, by label")
    p.add_argument("--evaluation", type=Path, nargs="+", default=[], metavar="DICE_JSON",
                   help="dice.json of each evaluated case set (written by `fastkd evaluate table`)")
    p.add_argument("--cache", type=Path, nargs="*", default=[],
                   help="the soft-label caches (*.zarr; one per temperature and fold selection): size and verify status")
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="folder of the preprocessed <case>.b2nd for the cache check (default: recorded in the cache)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write (layout: fastkd/report.py)")
    p.add_argument("--title", default="", help="prefix of the page titles, e.g. the dataset")
    p.set_defaults(func=_report_summary)

    stage = _stage(sub, "export", "export a trained student for deployment")
    p = stage.add_parser("onnx", help="export one fold to ONNX (metadata inside), verified against PyTorch")
    p.add_argument("model_folder", type=Path, help="nnU-Net model folder Trainer__Plans__configuration")
    p.add_argument("-f", "--fold", type=fold_arg, default=0, help="0-4 or 'all' (default 0)")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .onnx to write (and <output>.json)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint in fold_X (default final)")
    p.add_argument("--input-shape", type=positive_int, nargs="+", default=None, metavar="N",
                   help="b c x y z (default: batch, the input channels and nnU-Net's patch)")
    p.add_argument("--batch", type=int, default=1, help="batch size, 0 = dynamic (default 1)")
    p.add_argument("--dynamic", action="store_true", help="dynamic batch and spatial dims (multiples of the stride)")
    p.add_argument("--simplify", action="store_true", help="simplify the graph with onnxslim")
    p.add_argument("--tensorrt", action="store_true",
                   help="TensorRT-friendly: constant folding and a simplified graph (onnxslim)")
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="preprocessed <case>.b2nd for the parity check (default: nnU-Net's, in $nnUNet_preprocessed)")
    p.add_argument("--atol", type=float, default=1e-3, help="largest |logit difference| accepted (default 1e-3)")
    p.add_argument("--min-agreement", type=float, default=0.999,
                   help="smallest fraction of voxels whose segmentation agrees (default 0.999)")
    p.set_defaults(func=_export_onnx)
    p = stage.add_parser("trt", help="build a TensorRT engine of an ONNX export (metadata beside it), checked against "
                                     "onnxruntime; needs TensorRT and an NVIDIA GPU")
    p.add_argument("onnx", type=Path, help="an .onnx written by `fastkd export onnx`")
    p.add_argument("-o", "--output", type=Path, required=True, help="the .engine (or .plan) to write (and <output>.json)")
    config_flag(p, ["--precision"], "export.tensorrt.precision",
                "fp32, fp16 or int8 (calibrated; needs --calibration); normalization layers stay FP32")
    for bound in ("min", "opt", "max"):
        p.add_argument(f"--{bound}-shape", type=positive_int, nargs="+", default=None, metavar="N",
                       help=f"b c x y z, the optimization profile's {bound} (default: the ONNX's static shape, or "
                            "nnU-Net's patch at batch 1, max at --max-batch)")
    config_flag(p, ["--max-batch"], "export.tensorrt.max_batch", "largest batch of the default profile")
    p.add_argument("--calibration", type=Path, default=None,
                   help="folder of preprocessed <case>.b2nd: int8 calibration data and real patches for the parity "
                        "check (default for the check: nnU-Net's, in $nnUNet_preprocessed)")
    p.add_argument("--timing-cache", type=Path, default=None,
                   help="TensorRT timing cache file, reused between builds (default: tensorrt_timing.cache beside the engine)")
    config_flag(p, ["--workspace-gb"], "export.tensorrt.workspace_gb", "builder workspace, GB of GPU memory")
    p.add_argument("--min-agreement", type=float, default=0.999,
                   help="smallest fraction of voxels whose segmentation agrees with onnxruntime (default 0.999)")
    p.add_argument("--force", action="store_true", help="rebuild even when the engine is up to date")
    p.set_defaults(func=_export_trt)

    p = sub.add_parser("predict", help="segment images through nnU-Net's predictor: a model folder (torch; one fold "
                                       "or an ensemble), an .onnx (onnx) or a TensorRT engine (trt)")
    p.add_argument("-i", "--input", type=Path, required=True, help="folder of images, nnU-Net naming (<case>_0000.nii.gz)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="folder for the segmentations (and fastkd_predict.json, written last)")
    p.add_argument("-m", "--model", type=Path, required=True,
                   help="a model folder (Trainer__Plans__configuration), an .onnx from `fastkd export onnx`, "
                        "or a TensorRT .engine/.plan")
    p.add_argument("--backend", choices=("torch", "onnx", "trt"), default=None,
                   help="torch (model folder), onnx (.onnx) or trt (.engine/.plan); default: from --model")
    p.add_argument("-f", "--folds", type=fold_arg, nargs="+", default=[0],
                   help="folds of the model folder (torch; default 0); several = nnU-Net's ensemble, "
                        "e.g. -f 0 1 2 3 4 as nnUNetv2_predict by default")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth", help="checkpoint in fold_X (torch)")
    config_flag(p, ["--device"], "student.device", "device")
    p.add_argument("--disable-mirroring", action="store_true", help="no test-time mirroring (1 pass per tile)")
    config_flag(p, ["--step-size"], "softlabels.step_size", "sliding-window step, fraction of the patch")
    p.add_argument("--tile-batch", type=positive_int, default=None,
                   help="network inputs per forward, tiles and their mirrored copies (default: 1 on CPU, "
                        "8 on CUDA; capped by a fixed-batch ONNX or engine)")
    p.add_argument("--jit", action=argparse.BooleanOptionalAction, default=None,
                   help="run the torch network traced and frozen by TorchScript (default: on for torch on the "
                        "CPU, where it is several times faster at a student's width; --no-jit: eager PyTorch)")
    p.add_argument("--save-probabilities", action="store_true", help="also write the probabilities (.npz)")
    p.add_argument("--threads", type=positive_int, default=2,
                   help="CPU threads, and the workers of each pool: loading/preprocessing, resampling/writing (2)")
    p.set_defaults(func=_predict, action="")
    return parser


def huge_pages() -> None:
    """Let torch's CPU allocator put its large tensors on transparent huge pages.

    Sets ``THP_MEM_ALLOC_ENABLE=1`` (a value already in the environment wins) while torch is not yet
    loaded: torch reads it once, at its first allocation. On kernels whose THP mode is ``madvise``
    (Debian's and Ubuntu's default) torch otherwise maps and page-faults every large tensor anew
    4 kB at a time; on the 2-core CPU a 119-class teacher's forwards ran 1.2x faster with it (30x fewer
    page faults; benchmarks/README.md). Where THP is ``never``, nothing changes. Child processes
    (nnU-Net's commands, workers) inherit it.
    """
    if "torch" not in sys.modules:
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def main(argv: list[str] | None = None) -> int:
    huge_pages()
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FastkdError as e:
        print(f"fastkd {' '.join(filter(None, [args.stage, args.action]))}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
