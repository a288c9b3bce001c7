# Config validation, artifact paths and target lists. No domain logic: fastkd computes everything.
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


def q(value):
    return shlex.quote(str(value))


def rule_resources(name):
    return config["resources"][name]


def preprocess_targets():
    return [P.preprocess_manifest(c) for c in config["plans"]["configurations"]]


def teacher_targets():
    return [P.teacher_manifest]


def all_targets():
    return preprocess_targets() + teacher_targets()
