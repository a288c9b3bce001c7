"""The reference system's training commands: FastnnUNet's flags mapped onto fastkd's workflow.

``nnUNetv2_distillation_train`` and ``nnUNetv2_resenc_distillation_train`` take FastnnUNet's flags
(same names and defaults, except the KD loss: ``-a`` and ``-temp`` default to fastkd's 1 and 1 with
the additive, full-resolution, class-balanced form, which beat FastnnUNet's 0.3 and 3 with its convex
form in benchmarks/kd_protocol.py; ``--loss convex --class-balanced false -a 0.3 -temp 3`` is
FastnnUNet's form, up to its KL's division by the number of classes). :func:`resolve` maps them onto
a fastkd config (it reads folders but writes and runs nothing; the config is validated by the
workflow's schema, and errors name the flag and the key); :func:`fastkd.workflow.run_workflow` then
runs the workflow with that student fold as its target. So the stage sequence exists once, and a
soft-label cache of the same teachers and settings is reused whether the workflow or an earlier command
built it.

Where things are, as nnU-Net users expect: nnU-Net's folders from ``nnUNet_raw``,
``nnUNet_preprocessed``, ``nnUNet_results``; fastkd's work folder is ``--work`` (default
``$nnUNet_results/../fastkd_work``, the workflow's default place) and Snakemake runs in the folder
above it, as if you had typed ``snakemake`` there, with paths inside it spelled relative to it (as a
workflow config spells them, so both name the same cache). The dataset is preprocessed already
(``plans.preprocess: false``) and the teachers are trained. The run's config goes to
``<work>/<ds>/reference/`` (:meth:`fastkd.paths.Paths.reference_config`). The training job always
runs: with ``-c_continue`` the student continues a checkpoint of the same settings, without it the
student starts over and old checkpoints move aside once training starts (never deleted).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from fastkd.cli.common import fold_arg, huge_pages, positive_int
from fastkd.config import arg_type, default
from fastkd.errors import FastkdError
from fastkd.nnunet import model_folder_trainer
from fastkd.paths import Paths
from fastkd.sweep import one
from fastkd.workflow import inside, spell

PROG = "nnUNetv2_distillation_train"
RESENC_PROG = "nnUNetv2_resenc_distillation_train"
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: the reference's defaults that differ between its two commands (the others are the config schema's)
DEFAULTS = {False: {"teacher_plans": "nnUNetPlans", "rotate_freq": 400},
            True: {"teacher_plans": "nnUNetResEncUNetLPlans", "rotate_freq": 5}}
STUDENT_PLANS = "nnUNetPlans"  # the reference's -spl default
TEACHER_TRAINER = "nnUNetTrainer"
#: flags that set one config key each (default and check: the schema's); FastnnUNet's, then fastkd's extras
REFERENCE_KEYS = [
    (["-tcp"], "teachers.checkpoint", "Teacher checkpoint file name in each fold_X"),
    (["-a", "--alpha"], "distillation.alpha", "Distillation loss weight >= 0: nnU-Net loss + a * T^2 * KL with "
     "fastkd's default --loss additive, (1-a) * nnU-Net loss + a * T^2 * KL (a <= 1) with --loss convex, "
     "FastnnUNet's form (0 trains the no-KD baseline, no soft labels)"),
    (["-temp", "--temperature"], "distillation.temperature", "Distillation temperature > 0, controls the "
     "smoothness of soft labels; each temperature has its own soft-label cache"),
    (["-e", "--epochs"], "student.schedule.epochs", "Maximum number of training epochs"),
]
EXTRA_KEYS = [
    (["--iterations"], "student.schedule.iterations_per_epoch", "training iterations per epoch"),
    (["--val-iterations"], "student.schedule.val_iterations_per_epoch", "validation iterations per epoch"),
    (["--batch-size"], "student.schedule.batch_size", "override the plans' batch size"),
    (["--save-every"], "student.schedule.save_every", "write checkpoint_latest.pth every N epochs (nnU-Net: 50)"),
    (["--step-size"], "softlabels.step_size", "sliding-window step of the teachers' soft-label pass (patch fraction)"),
    (["--cache-dtype"], "softlabels.dtype", "soft-label storage: uint8 (k/255, sums exactly 1) or float16"),
    (["-num_gpus"], "student.num_gpus", "GPUs for nnU-Net's multi-GPU (DDP) training (with -d_device cuda)"),
    (["--loss"], "distillation.loss", "how KD joins nnU-Net's loss: additive (fastkd's default) or convex "
     "(FastnnUNet's)"),
    (["--kd-scales"], "distillation.scales", "KD on the full-resolution output only (full, the default, as "
     "FastnnUNet) or on every deep-supervision output (all)"),
    (["--class-balanced"], "distillation.class_balanced", "true (the default): each class the teachers predict "
     "weighs as much in the KL as the background; false: every voxel the same (FastnnUNet's)"),
    (["--soft-dice"], "student.soft_dice", "weight of a soft Dice term against the soft labels"),
    (["--cauchy-schwarz"], "student.cauchy_schwarz", "weight of a Cauchy-Schwarz divergence term"),
]
#: config key -> the flag that sets it (config errors name the flag)
FLAG_OF_KEY = {key: "/".join(flags) for flags, key, _ in REFERENCE_KEYS + EXTRA_KEYS} | {
    "distillation.reduction_factors": "-r/--reduction_factor", "teachers.folds": "-tf/--teacher_folds",
    "teachers.model_folder": "-t/--teacher_model_folder", "student.plans": "-spl/--student_plans"}


@dataclass
class Plan:
    """One run of the workflow for one student fold, resolved from the flags and the environment."""

    prog: str
    config: dict                  # validated fastkd config (the same keys as a workflow config file)
    paths: Paths                  # its artifact paths, relative to the workdir
    workdir: Path                 # where Snakemake runs
    requested_device: str         # -d_device as given (or chosen)
    environ: dict[str, str]       # set before torch initialises CUDA (CUDA_VISIBLE_DEVICES for cuda:N)

    configuration = property(lambda self: self.config["teachers"]["configuration"])
    fold = property(lambda self: self.config["student"]["folds"][0])
    r = property(lambda self: self.config["distillation"]["reduction_factors"][0])
    kd = property(lambda self: one(self.config, "distillation.alpha") > 0)
    resume = property(lambda self: self.config["student"]["resume"])
    device = property(lambda self: self.config["student"]["device"])
    num_gpus = property(lambda self: self.config["student"]["num_gpus"])
    teacher_folder = property(lambda self: self.paths.teacher_folder)
    block_strategy = property(lambda self: self.paths.student_block_strategy or "keep")
    student_plans_name = property(lambda self: self.paths.student_plans_name(self.r))
    student_plans_file = property(lambda self: self.paths.student_plans_file(self.r))
    #: the soft-label store the student reads (None: alpha = 0, the no-KD baseline needs none)
    cache = property(lambda self: self.paths.softlabel_cache() if self.kd else None)
    model_folder = property(lambda self: self.paths.student_folder(self.r, self.kd) / f"fold_{self.fold}")
    trainer = property(lambda self: model_folder_trainer(self.model_folder.parent))
    target = property(lambda self: self.paths.student_validation_summary(self.r, self.fold, self.kd))
    rule = property(lambda self: "train_student" if self.kd else "train_baseline")

    @property
    def settings(self) -> dict:
        """What the student's ``fastkd_student.json`` will hold (the cache as the job sees it, absolute)."""
        from fastkd.student.run import student_settings

        return student_settings(self.config, None if self.cache is None else self.workdir / self.cache, self.kd)


# -- flags ---------------------------------------------------------------------------------------
def reference_parser(prog: str, resenc: bool, example: str, description: str):
    """A parser of one of the reference's commands with the flags all of them share; returns it and the
    group its own flags join."""
    parser = argparse.ArgumentParser(prog=prog, allow_abbrev=False, description=description,
                                     epilog=f"Example: {prog} {example}")
    parser.set_defaults(resenc=resenc)
    ref = parser.add_argument_group("FastnnUNet flags")
    ref.add_argument("-d", "--dataset_id", required=True, help="Dataset ID (e.g. 4) or name (Dataset004_Hippocampus)")
    ref.add_argument("-c", dest="configuration", default=default("teachers.configuration"),
                     choices=("2d", "3d_fullres", "3d_lowres"), help="nnU-Net configuration (default 3d_fullres)")
    return parser, ref


def build_parser(resenc: bool = False) -> argparse.ArgumentParser:
    from fastkd.student.plans import BLOCK_STRATEGIES

    d = DEFAULTS[resenc]
    prog = RESENC_PROG if resenc else PROG
    parser, ref = reference_parser(
        prog, resenc, "-d 4 -f 0 -a 1 -temp 1 -r 2 --dry-run",
        f"FastnnUNet's {'ResEnc ' if resenc else ''}knowledge distillation training, run as fastkd's workflow: the "
        "teacher folds run once per training case into a soft-label cache (reused across runs and with the "
        "workflow), then a student with the teachers' topology and features per stage / r trains on patches plus "
        "cached soft labels into a stock nnU-Net model folder. Needs nnUNet_raw, nnUNet_preprocessed and "
        "nnUNet_results, the dataset preprocessed with the teacher plans (nnUNetv2_plan_and_preprocess) and "
        "trained teachers.")
    ref.add_argument("-f", "--fold", type=fold_arg, default=0, help="Fold number used to train the student model: "
                     "0-4 (nnU-Net's 5-fold split), or 'all' to train on every case (default 0)")
    ref.add_argument("-t", "--teacher_model_folder", default=None, help="Teacher model folder path (default: "
                     f"$nnUNet_results/DatasetXXX_Name/{TEACHER_TRAINER}__<teacher plans>__<configuration>)")
    ref.add_argument("-tf", "--teacher_folds", type=arg_type("teachers.folds"), nargs="+", default=None,
                     metavar="FOLD", help="List of teacher model fold numbers (default: every fold_X of the teacher "
                     "folder that holds the -tcp checkpoint)")
    ref.add_argument("-tpl", "--teacher_plans", default=None, help=f"Teacher model plans identifier (default "
                     f"{d['teacher_plans']}; with -t, the folder's plans, which must then match)")
    if resenc:
        ref.add_argument("-spl", "--student_plans", default=None, help="Student model plans identifier: the plans the "
                         f"student network is derived from (features / r, -bs) (default {STUDENT_PLANS}, or the "
                         f"teacher plans where the dataset has no {STUDENT_PLANS}), e.g. nnUNetResEncUNetMPlans for a "
                         "ResEnc M student of ResEnc L teachers; they must share the teachers' data_identifier (the "
                         "student trains on the teachers' preprocessed data, where the soft labels are)")
        ref.add_argument("-bs", "--block_strategy", choices=BLOCK_STRATEGIES, default=default("student.block_strategy"),
                         help="Block reduction strategy for ResEnc: residual blocks per encoder stage n -> reduce "
                              "max(n//2, 1), keep n, increase min(n+1, 8), adaptive min(n + r//4, 8) (default keep)")
    ref.add_argument("-r", "--reduction_factor", type=arg_type("distillation.reduction_factors"),
                     default=default("distillation.reduction_factors")[0], help="Feature reduction factor >= 1: "
                     "features per stage = max(f // r, 8) (default 2)")
    ref.add_argument("-d_device", dest="device", default=None, help="Device to use: cpu, cuda, cuda:N (CUDA_VISIBLE_"
                     "DEVICES is set to GPU N) or mps (default cuda if available, else cpu), for teachers and student")
    ref.add_argument("-c_continue", "--continue_training", action="store_true", help="Continue previous training (a "
                     "checkpoint of the same settings); without it the student starts over and its old checkpoints "
                     "move to previous_run/ once training starts")
    ref.add_argument("-disable_mirroring", action="store_true", help="Disable mirror augmentation during validation; "
                     "in fastkd also in the teachers' soft-label pass (a separate '__nomirror__' cache)")
    ref.add_argument("-rotate_folds", action="store_true", help="Enable rotating training folds periodically: fold f "
                     "trains on split (f + epoch // rotate_freq) %% 5 (its validation is then marked optimistic)")
    ref.add_argument("-rotate_freq", type=positive_int, default=None, help=f"How often to rotate folds, in epochs "
                     f"(default {d['rotate_freq']}: the reference's 5 for ResEnc, 400 for standard)")
    ref.add_argument("--use_da5", action="store_true", help="Use DA5 strong data augmentation (nnU-Net's "
                     "nnUNetTrainerDA5; the model folder is nnUNetTrainerFastKD_DA5__...)")
    ext = parser.add_argument_group("fastkd extras (not in FastnnUNet)")
    for group, table in ((ref, REFERENCE_KEYS), (ext, EXTRA_KEYS)):
        for flags, key, help in table:
            group.add_argument(*flags, dest=key, metavar=key.rsplit(".", 1)[-1].upper(), type=arg_type(key),
                               default=default(key), help=f"{help} (default {default(key)})")
    ext.add_argument("--threads", type=positive_int, default=None, help="CPU threads of every job and of the "
                     "workflow (default: every core; nnUNet_n_proc_DA / nnUNet_def_n_proc win for nnU-Net's pools)")
    ext.add_argument("--work", default=None, help="fastkd's folder for manifests, the soft-label cache, logs and "
                     "benchmarks (default: fastkd_work beside $nnUNet_results); the workflow runs in the folder above")
    ext.add_argument("--dry-run", action="store_true", help="print what would be done (cache to reuse or build, "
                     "student plans, settings, model folder, config) and exit without writing anything")
    return parser


# -- flags -> plan -------------------------------------------------------------------------------
def _teacher_folder(args, results: Path, checkpoint: str, plans_name: str) -> tuple[Path, dict]:
    from fastkd.nnunet import model_folder_name
    from fastkd.teachers import validate_model_folder

    folder = Path(args.teacher_model_folder or results / model_folder_name(TEACHER_TRAINER, plans_name,
                                                                           args.configuration))
    if not folder.is_dir():
        others = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
        raise FastkdError(f"teacher model folder {folder} does not exist; model folders in {results}: "
                          f"{', '.join(others) or 'none'} "
                          "(give the teachers' folder with -t, or their plans with -tpl)")
    plans = validate_model_folder(folder, args.configuration, [], checkpoint)
    if args.teacher_model_folder and args.teacher_plans and plans["plans_name"] != args.teacher_plans:
        raise FastkdError(f"-tpl {args.teacher_plans}: the teachers in {folder} were trained with the plans "
                          f"{plans['plans_name']} (leave -tpl out with -t)")
    return folder, plans


def _with_flags(message: str) -> str:
    """Config errors name the flag that set the key: ``-spl/--student_plans (student.plans) = ...``."""
    def name(m):
        key = m.group(2)
        flag = FLAG_OF_KEY.get(key) or FLAG_OF_KEY.get(re.sub(r"\[\d+\]$", "", key))
        return f"{m.group(1)}{flag} ({key})" if flag else m.group(0)

    return re.sub(r"(?m)^(\s*- )([\w.]+(?:\[\d+\])?)", name, message)


def _student_plans(args, preprocessed: Path, teacher_plans: str) -> str | None:
    """``student.plans`` for -spl: None (the teachers' plans) unless the student derives from other plans."""
    if not args.resenc:
        return None
    spl = args.student_plans
    if spl is None:  # the reference's default, where the dataset has it
        spl = STUDENT_PLANS if (preprocessed / f"{STUDENT_PLANS}.json").is_file() else teacher_plans
    return None if spl == teacher_plans else spl


def _set(config: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        config = config.setdefault(part, {})
    config[leaf] = value


def resolve(args: argparse.Namespace, environ) -> Plan:
    """The run the flags ask for; reads folders but writes and runs nothing. Raises FastkdError.

    ``environ``: the nnU-Net folder variables and CUDA_VISIBLE_DEVICES are read from it; relative
    paths are relative to the current directory.
    """
    from fastkd.checks import validate_config
    from fastkd.config import ConfigError
    from fastkd.device import device_flag
    from fastkd.nnunet import describe_folds, find_dataset
    from fastkd.teachers import folds_with

    cwd, values = Path.cwd(), vars(args)
    missing = [v for v in NNUNET_VARS if not environ.get(v)]
    if missing:
        raise FastkdError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: export nnU-Net's "
                          "folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) as for nnUNetv2_train")
    roots = {v: cwd / Path(environ[v]).expanduser() for v in NNUNET_VARS}
    dataset = find_dataset(str(args.dataset_id), [roots["nnUNet_preprocessed"], roots["nnUNet_raw"],
                                                  roots["nnUNet_results"]])
    checkpoint = values["teachers.checkpoint"]
    folder, plans = _teacher_folder(args, roots["nnUNet_results"] / dataset, checkpoint,
                                    args.teacher_plans or DEFAULTS[args.resenc]["teacher_plans"])
    folds = args.teacher_folds or folds_with(folder, checkpoint)
    if not folds:
        raise FastkdError(f"no teacher fold in {folder} holds {checkpoint} (found: {describe_folds(folder)}); "
                          "give the checkpoint name with -tcp")
    if args.rotate_freq is not None and not args.rotate_folds:
        raise FastkdError(f"-rotate_freq {args.rotate_freq} only applies with -rotate_folds")
    if args.rotate_folds and args.fold == "all":
        raise FastkdError("-rotate_folds rotates the 5 training splits; with -f all every case trains already")
    device, requested, env = device_flag(args.device, environ)
    if values["student.num_gpus"] > 1 and env:
        raise FastkdError(f"-num_gpus {values['student.num_gpus']} with -d_device {requested}: pick the GPUs with "
                          "CUDA_VISIBLE_DEVICES and use -d_device cuda")
    work = Path(os.path.normpath(cwd / (args.work or roots["nnUNet_results"].parent / "fastkd_work")))
    workdir, mirroring, threads = work.parent, not args.disable_mirroring, args.threads or os.cpu_count() or 1
    config = {
        "dataset": {"raw": spell(roots["nnUNet_raw"] / dataset, workdir)},
        "paths": {"nnunet_raw": spell(roots["nnUNet_raw"], workdir), "work": spell(work, workdir),
                  "nnunet_preprocessed": spell(roots["nnUNet_preprocessed"], workdir),
                  "nnunet_results": spell(roots["nnUNet_results"], workdir)},
        "plans": {"configurations": [args.configuration], "preprocess": False},
        "teachers": {"model_folder": spell(folder, workdir), "configuration": args.configuration, "folds": folds,
                     "device": device},
        "distillation": {"reduction_factors": [args.reduction_factor]},
        "softlabels": {"mirroring": mirroring, "device": device},
        "student": {"folds": [args.fold], "block_strategy": getattr(args, "block_strategy", "keep"),
                    "plans": _student_plans(args, roots["nnUNet_preprocessed"] / dataset, plans["plans_name"]),
                    "augmentation": "da5" if args.use_da5 else "default", "baseline": False, "device": device,
                    "validation_mirroring": mirroring, "resume": args.continue_training,
                    "schedule": {"rotate_every": (args.rotate_freq or DEFAULTS[args.resenc]["rotate_freq"])
                                 if args.rotate_folds else 0}},
        "resources": {rule: {"threads": threads} for rule in ("plan_preprocess", "train_teacher", "softlabels",
                                                              "student_plans", "train_student")},
        # the reference command trains one student fold; `snakemake evaluation` with this config (and a test
        # set) evaluates it afterwards
        "evaluation": {"enabled": False},
    }
    for _, key, _ in REFERENCE_KEYS + EXTRA_KEYS:
        _set(config, key, values[key])
    with inside(workdir):  # the config's relative paths are relative to the workdir, as in Snakemake
        try:
            validate_config(config)
        except ConfigError as e:
            raise FastkdError(_with_flags(str(e))) from None
        paths = Paths(config)
        strategy = config["student"]["block_strategy"]
        if strategy != "keep" and paths.student_block_strategy is None:
            raise FastkdError(f"-bs {strategy}: block strategies apply to ResEnc teachers; the student's plans "
                              f"{paths.student_base_plans_name} are a plain U-Net (use -bs keep)")
    return Plan(prog=RESENC_PROG if args.resenc else PROG, config=config, paths=paths, workdir=workdir,
                requested_device=requested, environ=env)


# -- what a run does -----------------------------------------------------------------------------
def cache_state(plan: Plan) -> str:
    """``reuse <store>`` (complete; its name carries the teachers and settings), ``build <store> (...)`` or none."""
    from fastkd.cache import CacheError, SoftLabelCache
    from fastkd.preprocess import training_cases

    if plan.cache is None:
        return "none: alpha = 0 trains the no-KD baseline"
    try:
        SoftLabelCache(plan.cache)
        return f"reuse {plan.cache} (complete; its jobs rerun only if a teacher checkpoint is newer)"
    except CacheError:
        t, s = plan.config["teachers"], plan.config["softlabels"]
        return (f"build {plan.cache} ({len(training_cases(plan.config))} cases x {len(t['folds'])} teacher fold(s), "
                f"mirroring {'on' if s['mirroring'] else 'off'}, step {s['step_size']:g}, {s['dtype']})")


def describe(plan: Plan, dry_run: bool = False) -> str:
    """What the run does, one line per stage (with ``dry_run``: also the settings and the config).
    Call it in the workdir (the plan's paths are relative to it)."""
    import json

    import yaml

    from fastkd.student.run import fold_state

    t, s = plan.config["teachers"], plan.settings
    device = plan.requested_device + "".join(f" ({k}={v})" for k, v in plan.environ.items())
    schedule = s["schedule"]
    rows = [
        ("dataset", f"{plan.paths.dataset_name} ({plan.configuration})"),
        ("teachers", f"{t['model_folder']} folds {' '.join(map(str, t['folds']))} ({t['checkpoint']})"),
        ("teacher manifest", plan.paths.teacher_manifest),
        ("preprocess manifest", plan.paths.preprocess_manifest(plan.configuration)),
        ("soft-label cache", cache_state(plan)),
        ("student plans", f"{plan.student_plans_name} -> {plan.student_plans_file} (r = {plan.r}"
                          + (f", block strategy {plan.block_strategy})" if plan.paths.student_block_strategy else ")")),
        ("model folder", f"{plan.model_folder} ({fold_state(plan.model_folder, s, plan.resume)})"),
        ("training", f"{plan.trainer}, alpha = {s['alpha']:g}"
                     + (f", T = {s['temperature']:g}" if plan.kd else "")
                     + f", {schedule['epochs']} epochs x {schedule['iterations_per_epoch']} iterations"
                     + (f", folds rotate every {schedule['rotate_every']} epochs" if schedule["rotate_every"] else "")),
        ("device", device + (f", {plan.num_gpus} GPUs (DDP)" if plan.num_gpus > 1 else "")),
        ("workflow", f"snakemake in {plan.workdir}, target {plan.target}"),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
    head = f"{plan.prog}{' (dry run: nothing is written or run)' if dry_run else ''}:"
    if not dry_run:
        return f"{head}\n{text}"
    return (f"{head}\n{text}\n\nstudent settings (fastkd_student.json):\n{json.dumps(s, indent=2)}\n\n"
            f"fastkd config (a workflow config file for the same run):\n{yaml.safe_dump(plan.config, sort_keys=False)}")


def run(plan: Plan) -> Path:
    """Run the workflow up to the student fold (its training job always runs); return the fold folder.
    Call it in the workdir (the plan's paths are relative to it)."""
    from fastkd.workflow import run_workflow

    os.environ.update(plan.environ)
    if plan.device == "cuda":
        from fastkd.device import torch_device

        torch_device("cuda", f"-d_device {plan.requested_device}{''.join(f' ({k}={v})' for k, v in plan.environ.items())}")
    print(describe(plan), flush=True)
    run_workflow(plan.config, plan.workdir, plan.paths.reference_config(plan.rule, plan.r, plan.fold), [plan.target],
                 forcerun=(plan.rule,), cores=plan.config["resources"]["train_student"]["threads"])
    tta = "" if plan.config["student"]["validation_mirroring"] else " --disable_tta"
    print(f"{plan.prog}: student trained: {plan.workdir / plan.model_folder} (checkpoint_final.pth, "
          f"validation/summary.json)\npredict with stock nnU-Net:\n  nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER "
          f"-d {plan.paths.dataset_id} -c {plan.configuration} -f {plan.fold} -tr {plan.trainer} "
          f"-p {plan.student_plans_name}{tta}")
    return plan.workdir / plan.model_folder


def _main(argv: list[str] | None, resenc: bool) -> int:
    huge_pages()
    parser = build_parser(resenc)
    args = parser.parse_args(argv)
    try:
        plan = resolve(args, os.environ)
        with inside(plan.workdir):
            if args.dry_run:
                print(describe(plan, dry_run=True), end="")
            else:
                run(plan)
    except FastkdError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 1
    return 0


def distillation_train(argv: list[str] | None = None) -> int:
    """``nnUNetv2_distillation_train``: plain (and any) nnU-Net teachers, default plans nnUNetPlans."""
    return _main(argv, resenc=False)


def resenc_distillation_train(argv: list[str] | None = None) -> int:
    """``nnUNetv2_resenc_distillation_train``: ResEnc teachers (default nnUNetResEncUNetLPlans), -spl, -bs."""
    return _main(argv, resenc=True)
