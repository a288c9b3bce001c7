"""The reference system's training commands, on fastkd's soft-label cache.

``nnUNetv2_distillation_train`` and ``nnUNetv2_resenc_distillation_train`` take FastnnUNet's flags
(same names, same defaults) and run fastkd's pipeline with library calls, no Snakemake:

1. teacher manifest of the teacher model folder (folds, checkpoint sha256);
2. manifest of the dataset's existing preprocessed data (``nnUNetv2_plan_and_preprocess`` must have
   run with the teacher plans, as the reference requires);
3. the soft-label cache: reused when a complete store with the same provenance exists (built by an
   earlier run of this command or by the Snakemake workflow), else every teacher fold runs once per
   training case into it;
4. student plans (the teacher plans, features per stage / r; ResEnc block strategy);
5. the student trained on patches plus cached soft labels, then nnU-Net's final validation, into a
   stock nnU-Net model folder that ``nnUNetv2_predict`` loads.

The flags map onto a fastkd config (:func:`resolve`, a pure function: it reads the folders but
writes and runs nothing), validated by :func:`fastkd.config.validate_config` like a Snakemake config;
every artifact path comes from :class:`fastkd.paths.Paths`, so the CLI and the workflow share
manifests, cache and student folders. Paths inside the current directory are written relative to it,
as the workflow's config spells them, because the cache name hashes the teacher folder as spelled.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from fastkd.cli import fold_arg, set_threads
from fastkd.errors import FastkdError

PROG = "nnUNetv2_distillation_train"
RESENC_PROG = "nnUNetv2_resenc_distillation_train"
NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
#: the reference's defaults that differ between its two commands
DEFAULTS = {False: {"teacher_plans": "nnUNetPlans", "rotate_freq": 400},
            True: {"teacher_plans": "nnUNetResEncUNetLPlans", "rotate_freq": 5}}
STUDENT_DATA_PLANS = "nnUNetPlans"  # the reference's -spl default
TEACHER_TRAINER = "nnUNetTrainer"
#: fastkd config key -> the flag that sets it (config errors name the flag)
FLAG_OF_KEY = {
    "distillation.alpha": "-a/--alpha", "distillation.temperature": "-temp/--temperature",
    "distillation.reduction_factors": "-r/--reduction_factor",
    "teachers.model_folder": "-t/--teacher_model_folder", "teachers.folds": "-tf/--teacher_folds",
    "teachers.checkpoint": "-tcp", "student.schedule.epochs": "-e/--epochs",
    "student.schedule.iterations_per_epoch": "--iterations",
    "student.schedule.val_iterations_per_epoch": "--val-iterations",
    "student.schedule.batch_size": "--batch-size", "student.schedule.save_every": "--save-every",
    "student.num_gpus": "-num_gpus", "student.soft_dice": "--soft-dice", "student.cauchy_schwarz": "--cauchy-schwarz",
    "softlabels.step_size": "--step-size", "dataset.raw": "-d (raw dataset)",
}


@dataclass
class Plan:
    """Everything a run does, resolved from the flags and the environment."""

    prog: str
    config: dict                  # validated fastkd config (the same keys as a workflow config file)
    dataset_name: str
    teacher_folder: Path
    student_plans_name: str
    student_plans_file: Path
    block_strategy: str
    cache: Path | None            # None: alpha = 0, the no-KD baseline needs no soft labels
    settings: dict                # fastkd_student.json (fastkd.student.train.make_settings)
    model_folder: Path            # the student's fold folder
    trainer: str
    device: str                   # cpu | cuda | mps, as torch and nnU-Net take it
    requested_device: str         # -d_device as given (or chosen)
    environ: dict[str, str]       # set before torch initialises CUDA (CUDA_VISIBLE_DEVICES for cuda:N)
    num_gpus: int
    resume: bool

    @cached_property
    def paths(self):
        from fastkd.paths import Paths

        return Paths(self.config)

    @property
    def configuration(self) -> str:
        return self.config["teachers"]["configuration"]

    @property
    def fold(self):
        return self.config["student"]["folds"][0]

    @property
    def r(self) -> int:
        return self.config["distillation"]["reduction_factors"][0]


# -- flags ---------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def build_parser(resenc: bool = False) -> argparse.ArgumentParser:
    from fastkd.student.plans import BLOCK_STRATEGIES

    d = DEFAULTS[resenc]
    kind = "ResEnc " if resenc else ""
    parser = argparse.ArgumentParser(
        prog=RESENC_PROG if resenc else PROG, allow_abbrev=False,
        description=f"FastnnUNet's {kind}knowledge distillation training, run by fastkd: the teacher folds run once "
                    "per training case into a soft-label cache (reused across runs and with the fastkd workflow), "
                    "then a student with the teachers' topology and features per stage / r trains on patches plus "
                    "cached soft labels into a stock nnU-Net model folder. Needs nnUNet_raw, nnUNet_preprocessed and "
                    "nnUNet_results, the dataset preprocessed with the teacher plans (nnUNetv2_plan_and_preprocess) "
                    "and trained teachers.",
        epilog=f"Example: {RESENC_PROG if resenc else PROG} -d 4 -f 0 -a 0.3 -temp 3.0 -r 2 --dry-run")
    parser.set_defaults(resenc=resenc)
    ref = parser.add_argument_group("FastnnUNet flags")
    ref.add_argument("-d", "--dataset_id", required=True, help="Dataset ID (e.g. 4) or name (Dataset004_Hippocampus)")
    ref.add_argument("-c", dest="configuration", default="3d_fullres", choices=CONFIGURATIONS,
                     help="nnU-Net configuration of teachers and student (default 3d_fullres)")
    ref.add_argument("-f", "--fold", type=fold_arg, default=0,
                     help="Fold number used to train the student model: 0-4 (nnU-Net's 5-fold split), or 'all' to "
                          "train on every case (default 0)")
    ref.add_argument("-t", "--teacher_model_folder", default=None,
                     help="Teacher model folder path (auto-constructed if not provided: "
                          f"$nnUNet_results/DatasetXXX_Name/{TEACHER_TRAINER}__<teacher plans>__<configuration>)")
    ref.add_argument("-tf", "--teacher_folds", type=int, nargs="+", choices=range(5), default=None, metavar="FOLD",
                     help="List of teacher model fold numbers, automatically detected if not specified (every "
                          "fold_X of the teacher folder that holds the -tcp checkpoint)")
    ref.add_argument("-tcp", dest="teacher_checkpoint", default="checkpoint_final.pth",
                     help="Teacher checkpoint file name in each fold_X (default checkpoint_final.pth)")
    ref.add_argument("-tpl", "--teacher_plans", default=None,
                     help=f"Teacher model plans identifier (default {d['teacher_plans']}; with -t, the folder's "
                          "plans, which must then match)")
    if resenc:
        ref.add_argument("-spl", "--student_plans", default=STUDENT_DATA_PLANS,
                         help=f"Student model plans identifier (default {STUDENT_DATA_PLANS}). In fastkd: the plans "
                              "whose preprocessed data the student reads. The student trains on the teachers' "
                              "preprocessed data (where the soft labels live), so these plans must have the teacher "
                              "plans' data_identifier for -c (nnUNetPlans and the ResEnc M/L/XL plans share "
                              "nnUNetPlans_3d_fullres and nnUNetPlans_2d); the student's network is derived from the "
                              "teacher plans with -r and -bs, saved as <teacher plans>_fastkdR<r><block strategy>")
        ref.add_argument("-bs", "--block_strategy", choices=BLOCK_STRATEGIES, default="keep",
                         help="Block reduction strategy for ResEnc: residual blocks per encoder stage n -> reduce "
                              "max(n//2, 1), keep n, increase min(n+1, 8), adaptive min(n + r//4, 8) (default keep)")
    ref.add_argument("-a", "--alpha", type=float, default=0.3,
                     help="Distillation loss weight in [0, 1], controls the ratio of soft label and hard label "
                          "losses: (1-a) * nnU-Net loss + a * T^2 * KL (default 0.3; 0 trains the no-KD baseline "
                          "and needs no soft labels)")
    ref.add_argument("-temp", "--temperature", type=float, default=3.0,
                     help="Distillation temperature > 0, controls the smoothness of soft labels (default 3.0); "
                          "each temperature has its own soft-label cache")
    ref.add_argument("-r", "--reduction_factor", type=int, default=2,
                     help="Feature reduction factor >= 1, higher values produce smaller student models: features per "
                          "stage = max(f // r, 8) (default 2)")
    ref.add_argument("-d_device", dest="device", default=None,
                     help="Device to use: cpu, cuda, cuda:N (GPU N only: CUDA_VISIBLE_DEVICES is set to it before "
                          "CUDA starts) or mps (default cuda if available, else cpu); used by the teachers (soft "
                          "labels) and the student")
    ref.add_argument("-c_continue", "--continue_training", action="store_true",
                     help="Continue previous training (from the student's checkpoint of the same settings); without "
                          "it the student starts over")
    ref.add_argument("-disable_mirroring", action="store_true",
                     help="Disable mirror augmentation during validation. In fastkd: no test-time mirroring when the "
                          "teachers compute the soft labels (a separate '__nomirror__' cache) nor in the student's "
                          "final validation")
    ref.add_argument("-rotate_folds", action="store_true",
                     help="Enable rotating training folds periodically: fold f trains on split "
                          "(f + epoch // rotate_freq) %% 5")
    ref.add_argument("-rotate_freq", type=_positive_int, default=None,
                     help=f"How often to rotate folds (in epochs, default {d['rotate_freq']}: the reference's 5 for "
                          "ResEnc, 400 for standard); needs -rotate_folds")
    ref.add_argument("-e", "--epochs", type=int, default=1000, help="Maximum number of training epochs (default 1000)")
    ref.add_argument("--use_da5", action="store_true",
                     help="Use DA5 strong data augmentation (nnU-Net's nnUNetTrainerDA5 pipeline; the model folder is "
                          "nnUNetTrainerFastKD_DA5__...)")

    ext = parser.add_argument_group("fastkd extras (not in FastnnUNet)")
    ext.add_argument("--iterations", type=int, default=250, help="training iterations per epoch (default 250)")
    ext.add_argument("--val-iterations", type=int, default=50, help="validation iterations per epoch (default 50)")
    ext.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size")
    ext.add_argument("--save-every", type=int, default=5,
                     help="write checkpoint_latest.pth every N epochs (default 5; nnU-Net: 50)")
    ext.add_argument("--step-size", type=float, default=0.5,
                     help="sliding-window step of the teachers' soft-label pass, fraction of the patch (default 0.5)")
    ext.add_argument("--cache-dtype", choices=("uint8", "float16"), default="uint8",
                     help="soft-label storage: uint8 (k/255, sums exactly 1; default) or float16")
    ext.add_argument("-num_gpus", type=int, default=1,
                     help="GPUs for nnU-Net's multi-GPU (DDP) training of the student (default 1; with -d_device cuda)")
    ext.add_argument("--soft-dice", type=float, default=0.0, help="weight of a soft Dice term against the soft labels")
    ext.add_argument("--cauchy-schwarz", type=float, default=0.0, help="weight of a Cauchy-Schwarz divergence term")
    ext.add_argument("--threads", type=_positive_int, default=None,
                     help="CPU threads: torch, and nnU-Net's pools unless nnUNet_n_proc_DA / nnUNet_def_n_proc are set "
                          "(default: nnU-Net's own defaults, as nnUNetv2_train)")
    ext.add_argument("--work", default=None,
                     help="fastkd's folder for manifests and the soft-label cache (default: fastkd_work beside "
                          "$nnUNet_results, where the fastkd workflow keeps them)")
    ext.add_argument("--dry-run", action="store_true",
                     help="print what would be done (config, cache to reuse or build, student plans, settings, model "
                          "folder) and exit without writing anything")
    return parser


# -- flags -> plan -------------------------------------------------------------------------------
def _spell(path: str | Path, cwd: Path) -> str:
    """An absolute path, or relative to ``cwd`` if inside it (as a workflow config spells it)."""
    path = Path(os.path.normpath(cwd / Path(path).expanduser()))
    try:
        return str(path.relative_to(cwd)) or "."
    except ValueError:
        return str(path)


def _dataset_name(value: str, roots: list[Path]) -> str:
    from fastkd.dataset import DATASET_NAME_PATTERN

    if DATASET_NAME_PATTERN.match(value):
        return value
    if not value.isdigit():
        raise FastkdError(f"-d {value!r}: expected a dataset id (e.g. 4) or name (e.g. Dataset004_Hippocampus)")
    prefix = f"Dataset{int(value):03d}_"
    found = sorted({p.name for root in roots if root.is_dir() for p in root.iterdir()
                    if p.name.startswith(prefix) and DATASET_NAME_PATTERN.match(p.name)})
    if len(found) != 1:
        where = ", ".join(str(r) for r in roots)
        raise FastkdError(f"-d {value}: " + (f"several datasets have id {int(value)}: {', '.join(found)}; give its name"
                                             if found else f"no {prefix}* folder in {where}"))
    return found[0]


def _fold_listing(folder: Path) -> str:
    listing = [f"{d.name}: {', '.join(sorted(p.name for p in d.glob('*.pth'))) or 'no checkpoint'}"
               for d in sorted(folder.glob("fold_*")) if d.is_dir()]
    return "; ".join(listing) or "no fold_X folders"


def _teacher_folder(args, results: Path, plans_name: str) -> Path:
    from fastkd.teachers import validate_model_folder

    folder = Path(args.teacher_model_folder or results / f"{TEACHER_TRAINER}__{plans_name}__{args.configuration}")
    if not folder.is_dir():
        others = sorted(p.name for p in results.iterdir() if p.is_dir()) if results.is_dir() else []
        raise FastkdError(f"teacher model folder {folder} does not exist; model folders in {results}: "
                          f"{', '.join(others) or 'none'} "
                          "(give the teachers' folder with -t, or their plans with -tpl)")
    plans = validate_model_folder(folder, args.configuration, [], args.teacher_checkpoint)
    if args.teacher_model_folder and args.teacher_plans and plans["plans_name"] != args.teacher_plans:
        raise FastkdError(f"-tpl {args.teacher_plans}: the teachers in {folder} were trained with the plans "
                          f"{plans['plans_name']} (leave -tpl out with -t)")
    return folder


def _device(requested: str | None, environ) -> tuple[str, str, dict[str, str]]:
    """(device for torch, -d_device as shown, environment to set) for -d_device."""
    if requested is None:
        import torch

        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested in ("cpu", "cuda", "mps"):
        return requested, requested, {}
    m = re.fullmatch(r"cuda:(\d+)", requested)
    if m is None:
        raise FastkdError(f"-d_device {requested!r}: must be cpu, cuda, cuda:N (e.g. cuda:1) or mps")
    n = int(m.group(1))
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "cuda", requested, {"CUDA_VISIBLE_DEVICES": str(n)}
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if n >= len(ids):
        raise FastkdError(f"-d_device {requested}: CUDA_VISIBLE_DEVICES={visible} makes only "
                          f"{', '.join(f'cuda:{i}' for i in range(len(ids))) or 'no GPU'} visible")
    return "cuda", requested, {"CUDA_VISIBLE_DEVICES": ids[n]}


def _with_flags(message: str) -> str:
    """Config errors name the flag that set the key: ``-a/--alpha (distillation.alpha) = 1.5 ...``."""
    def name(m):
        key = m.group(2)
        flag = FLAG_OF_KEY.get(key) or FLAG_OF_KEY.get(re.sub(r"\[\d+\]$", "", key))
        return f"{m.group(1)}{flag} ({key})" if flag else m.group(0)

    return re.sub(r"(?m)^(\s*- )([\w.]+(?:\[\d+\])?)", name, message)


def _check_preprocessed(paths, dataset: str, configuration: str) -> None:
    from fastkd.paths import PLANNERS

    data = paths.preprocessed_dataset / paths.data_identifier(configuration)
    missing = paths.plans_file if not paths.plans_file.is_file() else (data if not data.is_dir() else None)
    if missing is not None:
        planner = {plans: cls for cls, plans in PLANNERS.values()}.get(paths.plans_name, "<the teachers' planner>")
        pl = "" if paths.plans_name == "nnUNetPlans" else f" -pl {planner}"
        raise FastkdError(f"{missing} does not exist: {dataset} is not preprocessed with the teacher plans "
                          f"{paths.plans_name} ({configuration}); run `nnUNetv2_plan_and_preprocess -d "
                          f"{paths.dataset_id} -c {configuration}{pl}` first (as for the reference), or the fastkd "
                          "workflow's `snakemake preprocessed`")


def _check_student_data_plans(paths, spl: str, configuration: str) -> None:
    from fastkd.paths import plans_data_identifier
    from fastkd.student.plans import load_plans

    file = paths.preprocessed_dataset / f"{spl}.json"
    if not file.is_file():
        there = sorted(p.stem for p in paths.preprocessed_dataset.glob("*.json")
                       if p.stem not in ("dataset", "dataset_fingerprint", "splits_final"))
        raise FastkdError(f"-spl {spl}: no plans {file} (plans there: {', '.join(there) or 'none'}); -spl names the "
                          f"plans whose preprocessed data the student reads, e.g. -spl {paths.plans_name}")
    plans = load_plans(file)
    if configuration not in plans["configurations"]:
        raise FastkdError(f"-spl {spl}: {file} has no configuration {configuration!r}")
    theirs, ours = plans_data_identifier(plans, configuration), paths.data_identifier(configuration)
    if theirs != ours:
        raise FastkdError(f"-spl {spl}: its {configuration} data is {theirs!r}, the teachers' is {ours!r}; the student "
                          "trains on the teachers' preprocessed data, where the soft labels are, so -spl must name "
                          f"plans with that data_identifier (e.g. -spl {paths.plans_name})")


def resolve(args: argparse.Namespace, environ) -> Plan:
    """The run the flags ask for; reads folders but writes and runs nothing. Raises FastkdError.

    ``environ``: the nnU-Net folder variables and CUDA_VISIBLE_DEVICES are read from it; relative
    paths are relative to the current directory.
    """
    from fastkd.config import ConfigError, validate_config
    from fastkd.paths import Paths
    from fastkd.student import trainer_name
    from fastkd.student.train import make_settings

    cwd = Path.cwd()
    missing = [v for v in NNUNET_VARS if not environ.get(v)]
    if missing:
        raise FastkdError(f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: export nnU-Net's "
                          "folders (nnUNet_raw, nnUNet_preprocessed, nnUNet_results) as for nnUNetv2_train")
    roots = {v: cwd / Path(environ[v]).expanduser() for v in NNUNET_VARS}
    dataset = _dataset_name(str(args.dataset_id), [roots["nnUNet_preprocessed"], roots["nnUNet_raw"],
                                                   roots["nnUNet_results"]])
    defaults = DEFAULTS[args.resenc]
    folder = _teacher_folder(args, roots["nnUNet_results"] / dataset, args.teacher_plans or defaults["teacher_plans"])
    folds = args.teacher_folds or [f for f in range(5) if (folder / f"fold_{f}" / args.teacher_checkpoint).is_file()]
    if not folds:
        raise FastkdError(f"no teacher fold in {folder} holds {args.teacher_checkpoint} "
                          f"(found: {_fold_listing(folder)}); "
                          "give the checkpoint name with -tcp")
    if args.rotate_freq is not None and not args.rotate_folds:
        raise FastkdError(f"-rotate_freq {args.rotate_freq} only applies with -rotate_folds")
    if args.rotate_folds and args.fold == "all":
        raise FastkdError("-rotate_folds rotates the 5 training splits; with -f all every case trains already")
    device, requested, env = _device(args.device, environ)
    if args.num_gpus > 1 and env:
        raise FastkdError(f"-num_gpus {args.num_gpus} with -d_device {requested}: pick the GPUs with "
                          "CUDA_VISIBLE_DEVICES and use -d_device cuda")
    mirroring = not args.disable_mirroring
    rotate_every = (args.rotate_freq or defaults["rotate_freq"]) if args.rotate_folds else 0
    block_strategy = getattr(args, "block_strategy", "keep")
    config = {
        "dataset": {"raw": _spell(roots["nnUNet_raw"] / dataset, cwd)},
        "paths": {"nnunet_raw": _spell(roots["nnUNet_raw"], cwd),
                  "nnunet_preprocessed": _spell(roots["nnUNet_preprocessed"], cwd),
                  "nnunet_results": _spell(roots["nnUNet_results"], cwd),
                  "work": _spell(args.work or roots["nnUNet_results"].parent / "fastkd_work", cwd)},
        "plans": {"configurations": [args.configuration]},
        "teachers": {"model_folder": _spell(folder, cwd), "configuration": args.configuration, "folds": folds,
                     "checkpoint": args.teacher_checkpoint, "device": device},
        "distillation": {"temperature": args.temperature, "alpha": args.alpha,
                         "reduction_factors": [args.reduction_factor]},
        "softlabels": {"step_size": args.step_size, "mirroring": mirroring, "dtype": args.cache_dtype, "shards": 1,
                       "device": device},
        "student": {"folds": [args.fold], "block_strategy": block_strategy,
                    "augmentation": "da5" if args.use_da5 else "default", "baseline": False,
                    "soft_dice": args.soft_dice, "cauchy_schwarz": args.cauchy_schwarz, "device": device,
                    "num_gpus": args.num_gpus,
                    "schedule": {"epochs": args.epochs, "iterations_per_epoch": args.iterations,
                                 "val_iterations_per_epoch": args.val_iterations, "batch_size": args.batch_size,
                                 "save_every": args.save_every,
                                 "rotate_every": rotate_every}},
    }
    try:
        validate_config(config)
    except ConfigError as e:
        raise FastkdError(_with_flags(str(e))) from None
    paths = Paths(config)
    _check_preprocessed(paths, dataset, args.configuration)
    if args.resenc:
        _check_student_data_plans(paths, args.student_plans, args.configuration)
    if block_strategy != "keep" and not paths.teachers_are_resenc:
        raise FastkdError(f"-bs {block_strategy}: block strategies apply to ResEnc teachers; the teacher plans "
                          f"{paths.plans_name} are a plain U-Net (use -bs keep)")
    kd = args.alpha > 0
    schedule = config["student"]["schedule"]
    settings = make_settings(
        cache=paths.softlabel_cache if kd else None, temperature=args.temperature, alpha=args.alpha,
        epochs=schedule["epochs"], iterations_per_epoch=schedule["iterations_per_epoch"],
        val_iterations_per_epoch=schedule["val_iterations_per_epoch"], batch_size=schedule["batch_size"],
        save_every=schedule["save_every"], rotate_every=schedule["rotate_every"], soft_dice=args.soft_dice,
        cauchy_schwarz=args.cauchy_schwarz, validation_mirroring=mirroring)
    return Plan(prog=RESENC_PROG if args.resenc else PROG, config=config, dataset_name=dataset, teacher_folder=folder,
                student_plans_name=paths.student_plans_name(args.reduction_factor),
                student_plans_file=paths.student_plans_file(args.reduction_factor),
                block_strategy=paths.student_block_strategy or "keep",
                cache=paths.softlabel_cache if kd else None, settings=settings,
                model_folder=paths.student_folder(args.reduction_factor, kd) / f"fold_{args.fold}",
                trainer=trainer_name(kd, args.use_da5), device=device, requested_device=requested, environ=env,
                num_gpus=args.num_gpus, resume=args.continue_training)


# -- running -------------------------------------------------------------------------------------
def find_cache(plan: Plan, sha256s: dict[str, str]) -> Path | None:
    """A complete soft-label store of these teachers (checkpoint hashes) and settings, or None.

    The planned path first, then every store beside it: a workflow config that spells the teacher
    folder differently (absolute vs relative) made the same soft labels under another name, and the
    provenance, not the name, says what a store holds.
    """
    from fastkd.cache import FORMAT_VERSION, CacheError, SoftLabelCache

    if plan.cache is None:
        return None
    t, s, c = plan.config["teachers"], plan.config["softlabels"], plan.configuration
    want = {"format_version": FORMAT_VERSION, "temperature": float(plan.config["distillation"]["temperature"]),
            "configuration": c, "data_identifier": plan.paths.data_identifier(c), "step_size": float(s["step_size"]),
            "mirroring": s["mirroring"], "dtype": s["dtype"],
            "teachers": [{"model_folder": str(plan.teacher_folder.resolve()), "configuration": c,
                          "folds": sorted(t["folds"]), "checkpoint": t["checkpoint"], "sha256": sha256s,
                          "weight": float(t["weight"])}]}
    for store in [plan.cache, *sorted(set(plan.cache.parent.glob("*.zarr")) - {plan.cache})]:
        try:
            prov = SoftLabelCache(store).provenance
        except CacheError:
            continue
        have = {k: prov.get(k) for k in want if k != "teachers"}
        have["teachers"] = [{**{k: teacher.get(k) for k in want["teachers"][0]}, "folds": sorted(teacher["folds"])}
                            for teacher in prov.get("teachers", [])]
        if have == want:
            return store
    return None


def _settings(plan: Plan, reuse: Path | None) -> dict:
    """The student's settings, naming the store it reads (a reused one may live under another name)."""
    return {**plan.settings, "cache": str(Path(reuse).resolve())} if reuse is not None else plan.settings


def _student_start(plan: Plan, settings: dict) -> str:
    """How train_student will treat the fold folder (see fastkd.student.train)."""
    from fastkd.student.train import CHECKPOINTS
    from fastkd.student.trainer import SETTINGS_FILE

    present = [c for c in CHECKPOINTS if (plan.model_folder / c).is_file()]
    if not present:
        return "new"
    if not plan.resume:
        return f"start over: without -c_continue, {', '.join(present)} will be deleted"
    old = plan.model_folder / SETTINGS_FILE
    if old.is_file() and json.loads(old.read_text()) == settings:
        return f"continue from {present[0]}"
    return "start over: its checkpoints were trained with other settings; they move to previous_settings/"


def describe(plan: Plan, reuse: Path | None, dry_run: bool = False) -> str:
    """What the run does, one line per stage (with ``dry_run``: also the settings and the config)."""
    import yaml

    cfg, t, s = plan.config, plan.config["teachers"], plan.config["softlabels"]
    if plan.cache is None:
        cache = "none: alpha = 0 trains the no-KD baseline"
    elif reuse is not None:
        cache = f"reuse {reuse}"
    else:
        cache = (f"build {plan.cache} ({len(plan.paths.case_ids)} cases x {len(t['folds'])} teacher fold(s), "
                 f"mirroring {'on' if s['mirroring'] else 'off'}, step {s['step_size']:g}, {s['dtype']})")
    settings = _settings(plan, reuse)
    device = plan.requested_device + "".join(f" ({k}={v})" for k, v in plan.environ.items())
    rows = [
        ("dataset", f"{plan.dataset_name} ({plan.configuration})"),
        ("teachers", f"{t['model_folder']} folds {' '.join(map(str, t['folds']))} ({t['checkpoint']})"),
        ("teacher manifest", plan.paths.teacher_manifest),
        ("preprocess manifest", plan.paths.preprocess_manifest(plan.configuration)),
        ("soft-label cache", cache),
        ("student plans", f"{plan.student_plans_name} -> {plan.student_plans_file} (r = {plan.r}"
                          + (f", block strategy {plan.block_strategy})" if plan.paths.teachers_are_resenc else ")")),
        ("model folder", f"{plan.model_folder} ({_student_start(plan, settings)})"),
        ("training", f"{plan.trainer}, alpha = {settings['alpha']:g}, T = {settings['temperature']:g}, "
                     f"{settings['epochs']} epochs x {settings['iterations_per_epoch']} iterations"
                     + (f", folds rotate every {settings['rotate_every']} epochs" if settings["rotate_every"] else "")),
        ("device", device + (f", {plan.num_gpus} GPUs (DDP)" if plan.num_gpus > 1 else "")),
    ]
    width = max(len(k) for k, _ in rows)
    text = "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)
    head = f"{plan.prog}{' (dry run: nothing is written or run)' if dry_run else ''}:"
    if not dry_run:
        return f"{head}\n{text}"
    return (f"{head}\n{text}\n\nstudent settings (fastkd_student.json):\n{json.dumps(settings, indent=2)}\n\n"
            f"fastkd config (a workflow config file for the same run):\n{yaml.safe_dump(cfg, sort_keys=False)}")


def _use_device(plan: Plan) -> None:
    os.environ.update(plan.environ)
    if plan.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            seen = "".join(f" with {k}={v}" for k, v in plan.environ.items())
            raise FastkdError(f"-d_device {plan.requested_device}: torch sees no CUDA GPU{seen} "
                              "(`nvidia-smi -L` lists the GPUs); use another device")


def _write_unless_same(out: Path, write) -> dict:
    """``write(tmp)`` a JSON artifact; keep an identical existing ``out`` untouched.

    The workflow reruns whatever depends on a file that got newer, so the CLI rewrites a manifest
    or plans file only when its content changed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        content = write(tmp)
        if not (out.is_file() and json.loads(out.read_text()) == json.loads(tmp.read_text())):
            os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return content


def run(plan: Plan) -> Path:
    """Manifests, soft-label cache (reused or built), student plans, student training. Returns the fold folder."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from fastkd.preprocess import write_manifest as write_preprocess_manifest
    from fastkd.softlabels import fill_cache, finalize_cache
    from fastkd.student.plans import write_student_plans
    from fastkd.student.train import train_student
    from fastkd.teachers import write_manifest as write_teacher_manifest

    _use_device(plan)
    p, c, t = plan.paths, plan.configuration, plan.config["teachers"]
    teachers = _write_unless_same(p.teacher_manifest, lambda out: write_teacher_manifest(
        plan.teacher_folder, c, t["folds"], t["checkpoint"], out))
    manifest = p.preprocess_manifest(c)
    _write_unless_same(manifest, lambda out: write_preprocess_manifest(
        p.preprocessed_dataset, PlansManager(str(p.plans_file)), c, p.case_ids, out))
    store = find_cache(plan, {f: e["sha256"] for f, e in teachers["folds"].items()})
    print(describe(plan, store), flush=True)
    settings = _settings(plan, store)
    if plan.cache is not None and store is None:
        s = plan.config["softlabels"]
        fill_cache(plan.cache, [p.teacher_manifest], manifest, plan.config["distillation"]["temperature"],
                   step_size=s["step_size"], mirroring=s["mirroring"], dtype=s["dtype"], device=plan.device)
        finalize_cache(plan.cache, manifest)
        print(f"{plan.prog}: soft-label cache complete: {plan.cache}", flush=True)
    _write_unless_same(plan.student_plans_file, lambda out: write_student_plans(
        p.plans_file, out, plan.r, plan.block_strategy))
    folder = train_student(plan.dataset_name, plan.student_plans_name, c, plan.fold, settings,
                           da5=plan.config["student"]["augmentation"] == "da5", device=plan.device,
                           num_gpus=plan.num_gpus, resume=plan.resume)
    tta = "" if plan.settings["validation_mirroring"] else " --disable_tta"
    print(f"{plan.prog}: student trained: {folder} (checkpoint_final.pth, validation/summary.json)\n"
          f"predict with stock nnU-Net:\n  nnUNetv2_predict -i INPUT_FOLDER -o OUTPUT_FOLDER -d {p.dataset_id} -c {c} "
          f"-f {plan.fold} -tr {plan.trainer} -p {plan.student_plans_name}{tta}")
    return folder


def _dry_run(plan: Plan) -> None:
    from fastkd.teachers import sha256

    t = plan.config["teachers"]
    hashes = {str(f): sha256(plan.teacher_folder / f"fold_{f}" / t["checkpoint"]) for f in t["folds"]} \
        if plan.cache is not None else {}
    print(describe(plan, find_cache(plan, hashes), dry_run=True), end="")


def _main(argv: list[str] | None, resenc: bool) -> int:
    parser = build_parser(resenc)
    args = parser.parse_args(argv)
    if args.threads:
        set_threads(args.threads)  # before nnU-Net's modules read their pool sizes at import
    try:
        plan = resolve(args, os.environ)
        if args.dry_run:
            _dry_run(plan)
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
