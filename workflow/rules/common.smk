# Config validation, artifact paths, input functions and target lists. No domain logic: fastkd
# computes everything (paths: fastkd.paths; what the config means: the stage modules).
import os
import re
import shlex
from pathlib import Path

from fastkd.cases import TEST_SET, evaluation_sets, holdout_cases, holds_out, is_optimistic, set_fold, test_set_files
from fastkd.checks import validate_config
from fastkd.config import overrides
from fastkd.demo import (cli_options as demo_cli_options, held_out_case_ids, image_options as demo_image_options,
                         resources as demo_resources)
from fastkd.paths import Paths, fold_folder, student_folds, students_by_folder, validation_summary
from fastkd.preprocess import training_cases
from fastkd.sweep import one
from fastkd.student.run import KD_KEYS
from fastkd.teachers import teacher_sets
from fastkd.unlabelled import check_case_ids, unlabelled_images

# Fills defaults and rejects bad values (naming key, value and what is valid) before any job runs.
validate_config(config)
P = Paths(config)
# nnU-Net reads its folders from the environment: set them once here, for every job. Cluster jobs
# re-parse this file, so they see the same values.
P.export_nnunet_env()
# The conda envs (envs/*.yaml, --use-conda) install fastkd from this workflow's own source folder.
os.environ.setdefault("FASTKD_SOURCE", workflow.basedir)

CASES = training_cases(config)  # at parse time, never from a checkpoint: Snakemake tracks every case
HELD_OUT_CASES = holdout_cases(config)  # dataset.holdout's test cases: nnU-Net never sees them
DEMO_TEST_CASES = held_out_case_ids(config["dataset"]["demo"]["n_test"]) if P.is_demo else []
# the demo's raw files, (images, labels): of the training cases, of the test cases
DEMO_FILES = P.raw_case_files(CASES, config["dataset"]["demo"]["n_channels"]) if P.is_demo else ([], [])
DEMO_TEST_FILES = (P.raw_case_files(DEMO_TEST_CASES, config["dataset"]["demo"]["n_channels"], test=True)
                   if P.is_demo else ([], []))
# dataset.unlabelled (or the demo's): case -> image files; their ids must be neither training nor test cases
UNLABELLED = unlabelled_images(config, P.raw_dataset)
check_case_ids(UNLABELLED, CASES + HELD_OUT_CASES, DEMO_TEST_CASES)
UNLABELLED_FILES = [f for files in UNLABELLED.values() for f in files]
TEACHER_CFG = config["teachers"]["configuration"]
TRAIN_TEACHERS = config["teachers"]["model_folder"] is None
TEACHER_SETS = {s["name"]: s for s in teacher_sets(config, P.teacher_folder)}  # the teachers, then teachers.extra
N_SHARDS = config["softlabels"]["shards"]
# soft-label jobs: the training cases' shards 1..N_SHARDS, then the unlabelled images' own unlabelled-1.. (so
# adding an image reruns none of the training cases' jobs)
SHARDS = [str(i) for i in range(1, N_SHARDS + 1)] + [
    f"unlabelled-{i}" for i in range(1, min(N_SHARDS, len(UNLABELLED)) + 1)]
STUDENT = config["student"]
REDUCTION_FACTORS = config["distillation"]["reduction_factors"]
# Every student of the config, by model folder name: (fastkd.sweep.Student, Paths of its single-valued
# config); the Snakemake wildcard {student} is one of these names. Every fold of each: (student, Paths, fold).
STUDENTS = students_by_folder(config)
STUDENT_FOLDS = student_folds(config)
# Every soft-label cache the KD students read, by name (one per temperature and fold selection): the Paths
# of a config with those values. The Snakemake wildcard {cache} is one of these names.
CACHES = {sp.softlabel_name: sp for s, sp in STUDENTS.values() if s.kd}
MAIN_TEACHERS = next(iter(TEACHER_SETS))  # the teachers' own folder: nnU-Net's default prediction is its folds
EVALUATION = config["evaluation"]
EVALUATION_SETS = evaluation_sets(config) if EVALUATION["enabled"] else []
# a test set on disk, file by file (held-out cases are linked into folders, as validation cases are)
TEST_FILES = test_set_files(config, P) if TEST_SET in EVALUATION_SETS and not holds_out(config) else ([], [])
# What training jobs wait for: the preprocess manifest, and nnU-Net's split where this workflow writes it
# (an adopted dataset's split is written by the manifest job only if missing, so it is no output).
TRAINING_DATA = [P.preprocess_manifest(TEACHER_CFG)] + ([P.splits_file] if config["plans"]["preprocess"] else [])
# conda environments of the rule families (created with --use-conda; see envs/)
NNUNET_ENV = "../../envs/nnunet.yaml"
SOFTLABELS_ENV = "../../envs/softlabels.yaml"
REPORT_ENV = "../../envs/report.yaml"
EXPORT_ENV = "../../envs/export.yaml"
TENSORRT_ENV = "../../envs/tensorrt.yaml"


def q(value):
    return shlex.quote(str(value))


def rule_resources(name):
    return config["resources"][name]


def softlabels_mem_mb(wildcards, input):
    """resources.softlabels.mem_mb if set, else the peak memory of the largest case (+20 %): Snakemake
    evaluates this when the preprocess manifest exists (before that, e.g. in a dry run, 8000)."""
    from fastkd.softlabels import mem_mb

    if rule_resources("softlabels").get("mem_mb"):
        return rule_resources("softlabels")["mem_mb"]
    if not os.path.exists(input.manifest):
        return 8000
    return mem_mb(input.manifest, P.preprocessed_dataset_json, config["softlabels"]["device"])


def device_gpus(device, n=1):
    """Snakemake's gpu resource of a job on ``device``."""
    return n if device == "cuda" else 0


def teacher_checkpoints(name):
    s = TEACHER_SETS[name]
    return [fold_folder(s["folder"], f) / s["checkpoint"] for f in s["folds"]]


def file_stamps(paths):
    """``size:mtime_ns`` of each file (``-`` while it does not exist): a rule parameter that reruns the
    job when a file is replaced by a copy that kept an older modification time (``cp -p``, ``rsync -a``),
    which Snakemake's mtime trigger misses. Evaluated again when the job runs, so a file an upstream job
    writes in the same run is recorded as written."""
    return " ".join(f"{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" if os.path.exists(p) else "-" for p in paths)


def shard_of(wildcards):
    """(cases, 0-based shard, shard count) of soft-label shard ``shard`` (``<i>`` or ``unlabelled-<i>``, 1-based)."""
    if wildcards.shard.startswith("unlabelled-"):
        n = sum(s.startswith("unlabelled-") for s in SHARDS)
        return sorted(UNLABELLED), int(wildcards.shard.removeprefix("unlabelled-")) - 1, n
    return CASES, int(wildcards.shard) - 1, N_SHARDS


def shard_manifest(wildcards):
    """The preprocess manifest of a soft-label shard: the training cases', or the unlabelled images'."""
    unlabelled = wildcards.shard.startswith("unlabelled-")
    return P.unlabelled_manifest(TEACHER_CFG) if unlabelled else P.preprocess_manifest(TEACHER_CFG)


def shard_inputs(wildcards):
    """Preprocessed images of a training cases' soft-label shard (an unlabelled shard's come with its manifest)."""
    from fastkd.softlabels import shard_cases

    if wildcards.shard.startswith("unlabelled-"):
        return []
    cases, shard, n = shard_of(wildcards)
    return [P.preprocessed_case(TEACHER_CFG, c) for c in shard_cases(cases, n, shard)]


def student_settings_args(name):
    """`fastkd student train --set` pairs of the student ``name`` (a key of STUDENTS): every student key but
    the ones choosing which students exist, its seed, plus for KD its T, alpha and soft-label fold selection.
    A new student option in the schema reaches the trainer through here without a new flag."""
    s, sp = STUDENTS[name]
    keep = {k: v for k, v in sp.config["student"].items() if k not in ("folds", "baseline") and (s.kd or k not in KD_KEYS)}
    subset = {"student": keep}
    if s.kd:
        subset["distillation"] = {k: sp.config["distillation"][k] for k in ("temperature", "alpha", "loss", "scales",
                                                                             "class_balanced")}
        subset["softlabels"] = {"folds_per_case": s.folds_per_case}
    return " ".join(q(pair) for pair in overrides(subset))


def students_of(r=None, kd=None):
    """Names of the students (of reduction factor ``r``, of kind ``kd``), in STUDENTS' order."""
    return [n for n, (s, _) in STUDENTS.items() if (r is None or s.r == int(r)) and (kd is None or s.kd == kd)]


def student_cache(name):
    """The soft-label cache (its name) a KD student reads."""
    return STUDENTS[name][1].softlabel_name


def student_report_models(wildcards):
    """LABEL=FOLD_FOLDER of the r-students, their baselines and the teachers of the same folds (trained here)."""
    models = []
    for fold in STUDENT["folds"]:
        if TRAIN_TEACHERS and fold in config["teachers"]["folds"]:
            models.append(f"teacher fold {fold}={P.teacher_checkpoint(fold).parent}")
        for name in students_of(wildcards.r):
            s, sp = STUDENTS[name]
            models.append(f"{s.label} fold {fold}={sp.student_checkpoint(s.r, fold, s.kd).parent}")
    return " ".join(q(m) for m in models)


def student_report_inputs(wildcards):
    students = [STUDENTS[n][1].student_validation_summary(int(wildcards.r), f, STUDENTS[n][0].kd)
                for f in STUDENT["folds"] for n in students_of(wildcards.r)]
    teachers = [P.teacher_validation_summary(f) for f in STUDENT["folds"]
                if TRAIN_TEACHERS and f in config["teachers"]["folds"]]
    return students + teachers


def evaluation_models(case_set):
    """Prediction labels of a case set: the teacher ensemble, then every student fold (KD and baseline)
    evaluated there (all of them on the test set; fold f's on fold f's validation cases)."""
    fold = set_fold(case_set)
    folds = [f for f in STUDENT["folds"] if fold is None or str(f) == fold]
    return ["teachers"] + [f"{name}__fold_{f}" for name in STUDENTS for f in folds]


def evaluation_inputs(case_set):
    """(images, labels) a case set's jobs wait for: the test set's files, or the folders of linked cases
    (validation cases; dataset.holdout's test cases)."""
    if case_set == TEST_SET and not holds_out(config):
        return TEST_FILES
    return P.evaluation_images(case_set), P.evaluation_labels(case_set)


def preprocess_targets():
    return [P.preprocess_manifest(c) for c in config["plans"]["configurations"]]


def teacher_targets():
    return [P.teacher_manifest_of(name) for name in TEACHER_SETS]


def softlabel_targets():
    return [path for name in CACHES for path in (P.softlabel_cache_root(name), P.softlabel_preview(name))]


def student_targets():
    """Every student (each r, fold and kind: its final validation, written after checkpoint_final.pth),
    their size and reports."""
    return [sp.student_validation_summary(s.r, fold, s.kd) for s, sp, fold in STUDENT_FOLDS] + [
        path for r in REDUCTION_FACTORS for path in (P.student_info(r), P.student_report(r))]


def export_targets():
    """The verified ONNX export of every student fold (export.onnx), and its TensorRT engine
    (export.tensorrt.enabled; the engine's job asks for the ONNX export either way)."""
    onnx = [sp.student_onnx(s.r, fold, s.kd) for s, sp, fold in STUDENT_FOLDS] if config["export"]["onnx"] else []
    engines = ([sp.student_engine(s.r, fold, s.kd) for s, sp, fold in STUDENT_FOLDS]
               if config["export"]["tensorrt"]["enabled"] else [])
    return onnx + engines


def evaluation_targets():
    """The Dice table of every case set (evaluation.enabled)."""
    return [P.evaluation_table(s) for s in EVALUATION_SETS]


def all_targets():
    return (preprocess_targets() + teacher_targets() + softlabel_targets() + student_targets() + export_targets()
            + evaluation_targets())
