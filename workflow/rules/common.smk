# Config validation, artifact paths and target lists. No domain logic: fastkd computes everything.
import re
import shlex

from fastkd.config import validate_config
from fastkd.paths import Paths

# Fills defaults and rejects bad values (naming key, value and what is valid) before any job runs.
validate_config(config)
P = Paths(config)
# nnU-Net reads its folders from the environment: set them once here, for every job. Cluster jobs
# re-parse this file, so they see the same values.
P.export_nnunet_env()

CASES = P.case_ids  # from dataset.json (or the demo's config) at parse time, never from a checkpoint
TEACHER_CFG = config["teachers"]["configuration"]
TRAIN_TEACHERS = config["teachers"]["model_folder"] is None
TEACHER_SETS = {s["name"]: s for s in P.teacher_sets}  # the teachers, then teachers.extra
N_SHARDS = config["softlabels"]["shards"]
STUDENT = config["student"]
STUDENT_GPUS = STUDENT["num_gpus"] if STUDENT["device"] == "cuda" else 0


def q(value):
    return shlex.quote(str(value))


def rule_resources(name):
    return config["resources"][name]


def teacher_checkpoints(name):
    s = TEACHER_SETS[name]
    return [s["folder"] / f"fold_{f}" / s["checkpoint"] for f in s["folds"]]


def shard_inputs(shard):
    """Preprocessed images of soft-label shard ``shard`` (1-based, as in the shard's file name)."""
    from fastkd.softlabels import shard_cases

    return [P.preprocessed_case(TEACHER_CFG, c) for c in shard_cases(CASES, N_SHARDS, int(shard) - 1)]


def student_args(r, kd):
    """`fastkd train-student` arguments of the r-student (kd) or its no-KD baseline, all from the config."""
    schedule = STUDENT["schedule"]
    args = [
        f"-d {P.dataset_id} -p {P.student_plans_name(r)} -c {TEACHER_CFG}",
        f"-T {config['distillation']['temperature']} -a {config['distillation']['alpha'] if kd else 0}",
        f"--cache {q(P.softlabel_cache)}" if kd else "",
        f"--soft-dice {STUDENT['soft_dice']} --cauchy-schwarz {STUDENT['cauchy_schwarz']}" if kd else "",
        f"--epochs {schedule['epochs']} --iterations {schedule['iterations_per_epoch']}",
        f"--val-iterations {schedule['val_iterations_per_epoch']} --save-every {schedule['save_every']}",
        f"--rotate-every {schedule['rotate_every']}",
        f"--batch-size {schedule['batch_size']}" if schedule["batch_size"] else "",
        "--da5" if STUDENT["augmentation"] == "da5" else "",
        f"--device {STUDENT['device']} --num-gpus {STUDENT['num_gpus']}",
    ]
    return " ".join(a for a in args if a)


def student_report_models(r):
    """LABEL=FOLD_FOLDER of the r-students, their baselines and the teachers of the same folds (trained here)."""
    models = []
    for fold in STUDENT["folds"]:
        if TRAIN_TEACHERS and fold in config["teachers"]["folds"]:
            models.append(f"teacher fold {fold}={P.teacher_checkpoint(fold).parent}")
        for kd in P.student_kinds:
            models.append(f"{'KD' if kd else 'no-KD'} r{r} fold {fold}={P.student_checkpoint(r, fold, kd).parent}")
    return models


def preprocess_targets():
    return [P.preprocess_manifest(c) for c in config["plans"]["configurations"]]


def teacher_targets():
    return [P.teacher_manifest_of(name) for name in TEACHER_SETS]


def softlabel_targets():
    return [P.softlabel_cache_root, P.softlabel_preview]


def student_targets():
    return P.student_targets()


def all_targets():
    return preprocess_targets() + teacher_targets() + softlabel_targets() + student_targets()
