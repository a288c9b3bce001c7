"""The student: plans derived from the teachers' (:mod:`.plans`), the KD loss (:mod:`.loss`), the
loader that reads cached soft labels at nnU-Net's patch boxes (:mod:`.loader`), the nnU-Net trainer
classes that put them together (:mod:`.trainers`) and the driver of one fold (:mod:`.run`).

Here, free of torch imports (the Snakefile computes every student path at parse time, the CLI checks
fold folders before it imports nnU-Net): the names of the trainers and of the files in a student's
fold folder, and how a displaced run is kept.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from fastkd.errors import FastkdError

#: the student's settings, beside its checkpoints (written by :func:`fastkd.student.run.student_settings`)
SETTINGS_FILE = "fastkd_student.json"
#: hard and KD part of the training loss per epoch (KD students only)
KD_LOSSES_FILE = "kd_losses.json"
#: nnU-Net's checkpoints, in the order its ``--c`` resumes from them
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: what a training run leaves in its fold folder; moved aside together when a new run displaces it
RUN_FILES = (*CHECKPOINTS, KD_LOSSES_FILE, "validation")
#: nnU-Net's cross-validation: folds 0-4 of ``splits_final.json``
N_SPLITS = 5


def trainer_name(kd: bool, da5: bool = False, tag: str = "") -> str:
    """Name of the student trainer, and so of its nnU-Net model folder ``<name>__<plans>__<cfg>``.

    ``kd=False`` is the no-KD baseline (alpha = 0). ``tag``: :func:`student_tag`, which tells the students of
    a sweep apart (the trainer class is the same; :func:`fastkd.student.trainers.trainer_class` names a
    subclass after the tag).
    """
    return "nnUNetTrainerFastKD" + ("" if kd else "NoKD") + ("_DA5" if da5 else "") + tag


def move_aside(fold_folder: Path, names, aside: str) -> Path | None:
    """Move the files and folders ``names`` that ``fold_folder`` holds into a new folder ``fold_folder/<aside>``.

    Nothing is ever deleted: when ``<aside>`` exists from an earlier move, ``<aside>.1``, ``<aside>.2``,
    ... is used. Returns the folder, or None when none of the files was there.
    """
    present = [name for name in names if (fold_folder / name).exists()]
    if not present:
        return None
    target, n = fold_folder / aside, 0
    while target.exists():
        n += 1
        target = fold_folder / f"{aside}.{n}"
    target.mkdir()
    for name in present:
        (fold_folder / name).rename(target / name)
    return target


def student_kinds(config: dict) -> list[bool]:
    """Which kinds of student a validated config asks for: True = distilled (some alpha > 0), False = the
    no-KD baseline (``student.baseline``, or alpha = 0 in the list)."""
    alphas = as_list(config["distillation"]["alpha"])
    kd, baseline = any(a > 0 for a in alphas), config["student"]["baseline"] or 0 in alphas
    return [True] * kd + [False] * baseline


# -- sweeps -----------------------------------------------------------------------------------------
#: the settings that may be lists (a sweep): every combination is its own student
SWEPT = ("distillation.temperature", "distillation.alpha", "softlabels.folds_per_case", "student.seeds")


def as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _get(config: dict, key: str):
    block, name = key.split(".")
    return config[block][name]


def one(config: dict, key: str):
    """The single value of a setting that may be a sweep (a list); a list of several values is an error."""
    values = as_list(_get(config, key))
    if len(values) != 1:
        raise FastkdError(f"{key} = {values}: one value is needed here, this config sweeps over {len(values)} "
                          "(fastkd.student.students() expands a sweep into one config per student)")
    return values[0]


@dataclass(frozen=True)
class Student:
    """One student a config asks for. ``kd=False``: the no-KD baseline (no temperature, alpha 0, no
    soft labels); its model folder is shared by every temperature, alpha and soft-label setting."""
    r: int
    kd: bool
    temperature: float | None
    alpha: float
    folds_per_case: str | None
    seed: int

    def config(self, config: dict) -> dict:
        """``config`` with this student's single values (the baseline keeps the first of the swept KD values,
        which it does not use)."""
        c = copy.deepcopy(config)
        c["distillation"]["reduction_factors"] = [self.r]
        c["distillation"]["alpha"] = self.alpha
        c["student"]["seeds"] = [self.seed]
        if self.kd:
            c["distillation"]["temperature"] = self.temperature
            c["softlabels"]["folds_per_case"] = self.folds_per_case
        else:
            for key in ("distillation.temperature", "softlabels.folds_per_case"):
                block, name = key.split(".")
                c[block][name] = as_list(c[block][name])[0]
        return c

    @property
    def tag(self) -> str:
        """:func:`student_tag` of this student's settings."""
        return settings_tag(self.kd, self.temperature, self.alpha, self.folds_per_case, self.seed)

    @property
    def label(self) -> str:
        """Short name for tables and plots: ``KD r2``, ``no-KD r2``, with the tag of a sweep: ``KD r2 T1 a0.7 oof s1``."""
        return " ".join([f"{'KD' if self.kd else 'no-KD'} r{self.r}", *filter(None, self.tag.split("_"))])


def students(config: dict) -> list[Student]:
    """Every student of a validated config: each reduction factor x temperature x alpha (> 0) x soft-label
    fold selection x seed (KD), and each reduction factor x seed (the baseline), in that order."""
    d, seeds = config["distillation"], as_list(config["student"]["seeds"])
    kinds = student_kinds(config)
    out = []
    for r in d["reduction_factors"]:
        if True in kinds:
            out += [Student(r, True, float(t), float(a), f, s) for t in as_list(d["temperature"])
                    for a in as_list(d["alpha"]) if a > 0 for f in as_list(config["softlabels"]["folds_per_case"])
                    for s in seeds]
        if False in kinds:
            out += [Student(r, False, None, 0.0, None, s) for s in seeds]
    return out


def soft_label_settings(config: dict) -> list[tuple[float, str]]:
    """(temperature, folds_per_case) of every soft-label cache the KD students of a config read."""
    return list(dict.fromkeys((s.temperature, s.folds_per_case) for s in students(config) if s.kd))


def student_tag(config: dict, kd: bool) -> str:
    """What tells the students of a sweep apart in their model folder name (``<trainer><tag>__<plans>__<cfg>``):
    each setting that differs from its default (KD: ``_T<t>``, ``_a<alpha>``, ``_oof``; all: ``_s<seed>``), so a
    config of default values keeps the plain names, and a student's name depends on its own settings only."""
    if not kd:
        return settings_tag(False, None, 0.0, None, one(config, "student.seeds"))
    return settings_tag(True, one(config, "distillation.temperature"), one(config, "distillation.alpha"),
                one(config, "softlabels.folds_per_case"), one(config, "student.seeds"))


def settings_tag(kd: bool, temperature, alpha, folds_per_case, seed) -> str:
    """:func:`student_tag` from the values themselves (a student's settings file, a table row)."""
    from fastkd.config import default

    parts = []  # a value not known (None: a model folder without fastkd's settings file) adds nothing
    if kd and temperature not in (None, default("distillation.temperature")):
        parts.append(f"T{temperature:g}")
    if kd and alpha not in (None, default("distillation.alpha")):
        parts.append(f"a{alpha:g}")
    if kd and folds_per_case == "out_of_fold":
        parts.append("oof")
    if seed not in (None, default("student.seeds")[0]):
        parts.append(f"s{seed}")
    return "".join(f"_{p}" for p in parts)
