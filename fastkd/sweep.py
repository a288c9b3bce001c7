"""Sweep expansion: the students a config asks for (:class:`Student`), the tag of settings that tells the
students of a sweep apart, and :func:`one`, the single value of a setting that may be a list.

Free of torch imports and of stage modules: the Snakefile expands a sweep at parse time, and
:class:`fastkd.paths.Paths` names a student's model folder from it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from fastkd.config import default
from fastkd.errors import FastkdError


def trainer_name(kd: bool, da5: bool = False, tag: str = "") -> str:
    """Name of the student trainer, and so of its nnU-Net model folder ``<name>__<plans>__<cfg>``.

    ``kd=False`` is the no-KD baseline (alpha = 0). ``tag``: :func:`student_tag`, which tells the students of
    a sweep apart (the trainer class is the same; :func:`fastkd.student.trainers.trainer_class` names a
    subclass after the tag).
    """
    return "nnUNetTrainerFastKD" + ("" if kd else "NoKD") + ("_DA5" if da5 else "") + tag


def student_kinds(config: dict) -> list[bool]:
    """Which kinds of student a validated config asks for: True = distilled (some alpha > 0), False = the
    no-KD baseline (``student.baseline``, or alpha = 0 in the list)."""
    alphas = as_list(config["distillation"]["alpha"])
    kd, baseline = any(a > 0 for a in alphas), config["student"]["baseline"] or 0 in alphas
    return [True] * kd + [False] * baseline


# -- sweeps -----------------------------------------------------------------------------------------
#: the settings that may be lists (a sweep): every combination is its own student
SWEPT = ("distillation.temperature", "distillation.alpha", "distillation.loss", "distillation.scales",
         "distillation.class_balanced", "softlabels.folds_per_case", "student.unlabelled_share", "student.seeds")


#: a student's settings that tell the students of a sweep apart, in tag order: (name in the student's
#: settings and :class:`Student`, config key); all but the seed are distillation's only
TAGGED = (("temperature", "distillation.temperature"), ("alpha", "distillation.alpha"),
          ("loss", "distillation.loss"), ("scales", "distillation.scales"),
          ("class_balanced", "distillation.class_balanced"), ("folds_per_case", "softlabels.folds_per_case"),
          ("unlabelled_share", "student.unlabelled_share"), ("seed", "student.seeds"))


#: the KD settings that only KD students have (the baseline's are None)
KD_TAGGED = tuple(name for name, _ in TAGGED if name != "seed")


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
                          "(fastkd.sweep.students() expands a sweep into one config per student)")
    return values[0]


@dataclass(frozen=True)
class Student:
    """One student a config asks for. ``kd=False``: the no-KD baseline (no temperature, alpha 0, no
    loss form, no soft labels: those are None); its model folder is shared by every KD setting."""
    r: int
    kd: bool
    temperature: float | None
    alpha: float
    folds_per_case: str | None
    seed: int
    loss: str | None = None
    scales: str | None = None
    class_balanced: bool | None = None
    unlabelled_share: float | None = None

    def config(self, config: dict) -> dict:
        """``config`` with this student's single values (the baseline keeps the first of the swept KD values,
        which it does not use)."""
        c = copy.deepcopy(config)
        c["distillation"]["reduction_factors"] = [self.r]
        c["student"]["seeds"] = [self.seed]
        for name, key in TAGGED:
            if name == "seed":
                continue
            block, field = key.split(".")
            c[block][field] = getattr(self, name) if self.kd or name == "alpha" else as_list(c[block][field])[0]
        return c

    @property
    def settings(self) -> dict:
        """This student's values of :data:`TAGGED`."""
        return {name: getattr(self, name) for name, _ in TAGGED}

    @property
    def tag(self) -> str:
        """:func:`student_tag` of this student's settings."""
        return settings_tag(self.kd, self.settings)

    @property
    def label(self) -> str:
        """Short name for tables and plots: ``KD r2``, ``no-KD r2``, with the tag of a sweep: ``KD r2 T1 a0.7 oof s1``."""
        return " ".join([f"{'KD' if self.kd else 'no-KD'} r{self.r}", *filter(None, self.tag.split("_"))])


def students(config: dict) -> list[Student]:
    """Every student of a validated config: each reduction factor x temperature x alpha (> 0) x loss form x
    KD scales x class balancing x soft-label fold selection x unlabelled share x seed (KD), and each reduction factor x seed
    (the baseline), in that order."""
    import itertools

    d, seeds = config["distillation"], as_list(config["student"]["seeds"])
    kinds = student_kinds(config)
    out = []
    for r in d["reduction_factors"]:
        if True in kinds:
            for t, a, loss, scales, cb, f, u, s in itertools.product(
                    as_list(d["temperature"]), [a for a in as_list(d["alpha"]) if a > 0], as_list(d["loss"]),
                    as_list(d["scales"]), as_list(d["class_balanced"]), as_list(config["softlabels"]["folds_per_case"]),
                    as_list(config["student"]["unlabelled_share"]), seeds):
                out.append(Student(r, True, float(t), float(a), f, s, loss, scales, bool(cb), float(u)))
        if False in kinds:
            out += [Student(r, False, None, 0.0, None, s) for s in seeds]
    return out


def soft_label_settings(config: dict) -> list[tuple[float, str]]:
    """(temperature, folds_per_case) of every soft-label cache the KD students of a config read."""
    return list(dict.fromkeys((s.temperature, s.folds_per_case) for s in students(config) if s.kd))


def student_tag(config: dict, kd: bool) -> str:
    """What tells the students of a sweep apart in their model folder name (``<trainer><tag>__<plans>__<cfg>``):
    each setting that differs from its default (KD: ``_T<t>``, ``_a<alpha>``, ``_additive`` / ``_convex``,
    ``_dsall`` / ``_dsfull``, ``_cb`` / ``_nocb``, ``_oof``, ``_u<share>``; all: ``_s<seed>``), so a config of default values
    keeps the plain names, and a student's name depends on its own settings only."""
    values = {name: one(config, key) if kd or name == "seed" else None for name, key in TAGGED}
    return settings_tag(kd, values)


def _tag_part(name: str, value) -> str:
    if name == "temperature":
        return f"T{value:g}"
    if name == "alpha":
        return f"a{value:g}"
    if name == "scales":
        return f"ds{value}"
    if name == "class_balanced":
        return "cb" if value else "nocb"
    if name == "folds_per_case":
        return "oof" if value == "out_of_fold" else str(value)
    if name == "unlabelled_share":
        return f"u{value:g}"
    if name == "seed":
        return f"s{value}"
    return str(value)


def settings_tag(kd: bool, values: dict) -> str:
    """:func:`student_tag` from the values themselves (a student's settings file, a table row): ``values``
    maps names of :data:`TAGGED` to values; a name absent or None (not known: a model folder without
    fastkd's settings file, or a setting only KD has) adds nothing."""
    parts = []
    for name, key in TAGGED:
        value = values.get(name)
        if value is None or (name != "seed" and not kd):
            continue
        fallback = default(key)
        if value != (fallback[0] if name == "seed" else fallback):
            parts.append(_tag_part(name, value))
    return "".join(f"_{p}" for p in parts)
