"""Every artifact path of the workflow, computed from the validated config in one place.

The Snakefile, the rules and the CLI all ask :class:`Paths`; nothing else builds a path.
Relative config paths stay relative (Snakemake resolves them against its working directory);
:meth:`Paths.nnunet_env` gives the absolute ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` that every job sees, since nnU-Net reads them from the environment at import.

Layout (defaults; ``<ds>`` = ``DatasetXXX_Name``)::

    nnUNet_raw/<ds>/                     raw dataset (demo written here; a real one is linked here)
    nnUNet_preprocessed/<ds>/            nnU-Net plans, fingerprint, splits_final.json,
                                         <data_identifier>/<case>.b2nd, <case>_seg.b2nd, <case>.pkl
    nnUNet_results/<ds>/<tr>__<plans>__<cfg>/fold_<f>/checkpoint_final.pth   teachers trained here
    fastkd_work/<ds>/preprocess/<plans>__<cfg>.json   preprocessing manifest (cases, shapes, spacing)
    fastkd_work/<ds>/teachers/<folder name>.json          teacher manifest per teacher folder (folds, sha256)
    fastkd_work/<ds>/softlabels/<cfg>__T<T>__<mirror|nomirror>__step<s>__<dtype>__teachers-<id>.zarr
                                         the soft-label cache (layout: fastkd.cache); <id> hashes the
                                         teacher set (folders, folds, checkpoint names, weights)
        ... .shards/shard-<i>-of-<n>.json   what each soft-label job wrote; ... .preview.png
    fastkd_work/logs/<rule>/<wildcards>.log, fastkd_work/benchmarks/<rule>/<wildcards>.tsv
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from pathlib import Path

from fastkd.dataset import dataset_name, parse_dataset_name

#: config name -> (nnU-Net experiment planner class, plans name it writes)
PLANNERS = {
    "default": ("ExperimentPlanner", "nnUNetPlans"),
    "ResEncM": ("nnUNetPlannerResEncM", "nnUNetResEncUNetMPlans"),
    "ResEncL": ("nnUNetPlannerResEncL", "nnUNetResEncUNetLPlans"),
    "ResEncXL": ("nnUNetPlannerResEncXL", "nnUNetResEncUNetXLPlans"),
}


def plans_data_identifier(plans: dict, configuration: str) -> str:
    """A plans file's data_identifier for a configuration, following ``inherits_from`` like nnU-Net."""
    configurations = plans["configurations"]
    cfg = configurations[configuration]
    while "data_identifier" not in cfg and "inherits_from" in cfg:
        cfg = configurations[cfg["inherits_from"]]
    return cfg["data_identifier"]


class Paths:
    """Artifact paths for one validated config (see :func:`fastkd.config.validate_config`)."""

    def __init__(self, config: dict):
        self.config = config
        p = config["paths"]
        self.nnunet_raw = Path(p["nnunet_raw"])
        self.nnunet_preprocessed = Path(p["nnunet_preprocessed"])
        self.nnunet_results = Path(p["nnunet_results"])
        self.work = Path(p["work"])

    # -- dataset ---------------------------------------------------------------------------------
    @property
    def is_demo(self) -> bool:
        return self.config["dataset"]["raw"] == "demo"

    @cached_property
    def dataset_name(self) -> str:
        if self.is_demo:
            demo = self.config["dataset"]["demo"]
            return dataset_name(demo["id"], demo["name"])
        return Path(self.config["dataset"]["raw"]).name

    @property
    def dataset_id(self) -> int:
        return parse_dataset_name(self.dataset_name)[0]

    @property
    def raw_source(self) -> Path:
        """Where the raw dataset really lives (the demo is written straight into nnUNet_raw)."""
        return self.raw_dataset if self.is_demo else Path(self.config["dataset"]["raw"])

    @property
    def raw_dataset(self) -> Path:
        """The dataset as nnU-Net sees it: ``nnUNet_raw/<ds>`` (a link to ``raw_source`` if external)."""
        return self.nnunet_raw / self.dataset_name

    @property
    def raw_dataset_json(self) -> Path:
        return self.raw_source / "dataset.json"

    @cached_property
    def case_ids(self) -> list[str]:
        """Training cases, at parse time: the demo's from its config, a real dataset's from dataset.json."""
        if self.is_demo:
            from fastkd.demo_data import case_ids

            return case_ids(self.config["dataset"]["demo"]["n_cases"])
        from fastkd.dataset import raw_case_ids

        return raw_case_ids(self.raw_source)

    # -- plans and preprocessing -----------------------------------------------------------------
    @property
    def external_teachers(self) -> Path | None:
        folder = self.config["teachers"]["model_folder"]
        return None if folder is None else Path(folder)

    @cached_property
    def external_plans(self) -> dict | None:
        if self.external_teachers is None:
            return None
        with open(self.external_teachers / "plans.json") as f:
            return json.load(f)

    @property
    def planner_class(self) -> str | None:
        """nnU-Net planner to run, or None when the plans come from an external teacher folder."""
        return None if self.external_plans else PLANNERS[self.config["plans"]["planner"]][0]

    @property
    def plans_name(self) -> str:
        if self.external_plans:
            return self.external_plans["plans_name"]
        return PLANNERS[self.config["plans"]["planner"]][1]

    @property
    def preprocessed_dataset(self) -> Path:
        return self.nnunet_preprocessed / self.dataset_name

    @property
    def plans_file(self) -> Path:
        return self.preprocessed_dataset / f"{self.plans_name}.json"

    @property
    def splits_file(self) -> Path:
        return self.preprocessed_dataset / "splits_final.json"

    def data_identifier(self, configuration: str) -> str:
        """nnU-Net's preprocessed-data folder name for a configuration, known before planning.

        Mirrors the planners' ``generate_data_identifier``: the default and ResEnc planners share
        ``nnUNetPlans_<cfg>`` for 2d and 3d_fullres; 3d_lowres is ``<plans_name>_3d_lowres``.
        """
        if self.external_plans:
            return plans_data_identifier(self.external_plans, configuration)
        if configuration in ("2d", "3d_fullres"):
            return f"nnUNetPlans_{configuration}"
        return f"{self.plans_name}_{configuration}"

    def preprocessed_case(self, configuration: str, case: str, seg: bool = False) -> Path:
        """nnU-Net 2.8's blosc2 array of a preprocessed case (image, or ``_seg`` for the labels)."""
        suffix = "_seg.b2nd" if seg else ".b2nd"
        return self.preprocessed_dataset / self.data_identifier(configuration) / f"{case}{suffix}"

    def preprocess_manifest(self, configuration: str) -> Path:
        return self.work / self.dataset_name / "preprocess" / f"{self.plans_name}__{configuration}.json"

    # -- teachers --------------------------------------------------------------------------------
    @property
    def teacher_folder_name(self) -> str:
        t = self.config["teachers"]
        if self.external_teachers is not None:
            return self.external_teachers.name
        return f"{t['trainer']}__{self.plans_name}__{t['configuration']}"

    @property
    def teacher_folder(self) -> Path:
        if self.external_teachers is not None:
            return self.external_teachers
        return self.nnunet_results / self.dataset_name / self.teacher_folder_name

    def teacher_checkpoint(self, fold: int | str) -> Path:
        return self.teacher_folder / f"fold_{fold}" / self.config["teachers"]["checkpoint"]

    def teacher_validation_summary(self, fold: int | str) -> Path:
        return self.teacher_folder / f"fold_{fold}" / "validation" / "summary.json"

    @property
    def teacher_manifest(self) -> Path:
        return self.teacher_manifest_of(self.teacher_folder_name)

    def teacher_manifest_of(self, name: str) -> Path:
        return self.work / self.dataset_name / "teachers" / f"{name}.json"

    @cached_property
    def teacher_sets(self) -> list[dict]:
        """Every teacher folder of the soft-label ensemble: the teachers, then ``teachers.extra``.

        Each: ``name`` (folder name, also its manifest's), ``folder``, ``configuration``, ``folds``,
        ``checkpoint``, ``weight``.
        """
        t = self.config["teachers"]
        sets = [{"name": self.teacher_folder_name, "folder": self.teacher_folder, "configuration": t["configuration"],
                 "folds": t["folds"], "checkpoint": t["checkpoint"], "weight": t["weight"]}]
        for extra in t["extra"]:
            folder = Path(extra["model_folder"])
            sets.append({"name": folder.name, "folder": folder,
                         "configuration": extra["configuration"] or t["configuration"], "folds": extra["folds"],
                         "checkpoint": extra["checkpoint"], "weight": extra["weight"]})
        return sets

    @property
    def teacher_set_id(self) -> str:
        """Eight hex digits naming the teacher set (folders, configurations, folds, checkpoints, weights).

        A retrained checkpoint keeps the id: its new sha256 reaches the cache through the teacher
        manifest (a newer input reruns the soft-label jobs, which recompute every case whose recorded
        checkpoint hashes differ).
        """
        key = [[str(s["folder"]), s["configuration"], sorted(s["folds"]), s["checkpoint"], float(s["weight"])]
               for s in self.teacher_sets]
        return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]

    # -- soft-label cache ------------------------------------------------------------------------
    @property
    def softlabel_name(self) -> str:
        s = self.config["softlabels"]
        mirror = "mirror" if s["mirroring"] else "nomirror"
        return (f"{self.config['teachers']['configuration']}__T{self.config['distillation']['temperature']:g}"
                f"__{mirror}__step{s['step_size']:g}__{s['dtype']}__teachers-{self.teacher_set_id}")

    @property
    def softlabel_cache(self) -> Path:
        return self.work / self.dataset_name / "softlabels" / f"{self.softlabel_name}.zarr"

    @property
    def softlabel_cache_root(self) -> Path:
        """The store's root ``zarr.json``: written last, by the finalize job, once every case is in."""
        return self.softlabel_cache / "zarr.json"

    def softlabel_shard(self, shard: int | str) -> Path:
        n = self.config["softlabels"]["shards"]
        return self.work / self.dataset_name / "softlabels" / f"{self.softlabel_name}.shards" / f"shard-{shard}-of-{n}.json"

    @property
    def softlabel_preview(self) -> Path:
        return self.work / self.dataset_name / "softlabels" / f"{self.softlabel_name}.preview.png"

    # -- students --------------------------------------------------------------------------------
    @property
    def teachers_are_resenc(self) -> bool:
        if self.external_plans:
            from fastkd.student.plans import is_resenc

            return is_resenc(self.external_plans, self.config["teachers"]["configuration"])
        return self.config["plans"]["planner"].startswith("ResEnc")

    @property
    def student_block_strategy(self) -> str | None:
        """The ResEnc block strategy, or None for plain teachers (where it does not apply)."""
        return self.config["student"]["block_strategy"] if self.teachers_are_resenc else None

    def student_plans_name(self, r: int | str) -> str:
        """``r`` may be the Snakemake wildcard ``"{r}"``: the name then carries it as a pattern."""
        from fastkd.student.plans import student_plans_name

        if str(r) == "{r}":
            return student_plans_name(self.plans_name, 1, self.student_block_strategy).replace("_fastkdR1", "_fastkdR{r}")
        return student_plans_name(self.plans_name, int(r), self.student_block_strategy)

    def student_plans_file(self, r: int | str) -> Path:
        """Student plans beside the teachers' (nnU-Net looks there); never used to preprocess."""
        return self.preprocessed_dataset / f"{self.student_plans_name(r)}.json"

    def student_folder(self, r: int | str, kd: bool = True) -> Path:
        """nnU-Net model folder of the r-student (``kd=False``: the no-KD baseline)."""
        from fastkd.student import trainer_name

        trainer = trainer_name(kd, self.config["student"]["augmentation"] == "da5")
        return (self.nnunet_results / self.dataset_name
                / f"{trainer}__{self.student_plans_name(r)}__{self.config['teachers']['configuration']}")

    def student_checkpoint(self, r: int | str, fold: int | str, kd: bool = True) -> Path:
        return self.student_folder(r, kd) / f"fold_{fold}" / "checkpoint_final.pth"

    def student_validation_summary(self, r: int | str, fold: int | str, kd: bool = True) -> Path:
        return self.student_folder(r, kd) / f"fold_{fold}" / "validation" / "summary.json"

    @property
    def student_kinds(self) -> list[bool]:
        """Which students the config asks for: True = distilled (alpha > 0), False = no-KD baseline."""
        alpha, baseline = self.config["distillation"]["alpha"], self.config["student"]["baseline"]
        return [True, False] if alpha > 0 and baseline else [alpha > 0]

    def student_report(self, r: int | str, suffix: str = "png") -> Path:
        """Training curves and Dice table of teachers, students and baselines of one r (png or tsv)."""
        return self.work / self.dataset_name / "student" / f"{self.student_plans_name(r)}.report.{suffix}"

    def student_targets(self) -> list[Path]:
        """Checkpoint and validation summary of every student: each r, fold and kind."""
        rs = self.config["distillation"]["reduction_factors"]
        return [path for r in rs for fold in self.config["student"]["folds"] for kd in self.student_kinds
                for path in (self.student_checkpoint(r, fold, kd), self.student_validation_summary(r, fold, kd))] \
            + [self.student_report(r) for r in rs]

    # -- bookkeeping -----------------------------------------------------------------------------
    def log(self, rule: str, name: str = "all") -> Path:
        return self.work / "logs" / rule / f"{self.dataset_name}__{name}.log"

    def benchmark(self, rule: str, name: str = "all") -> Path:
        return self.work / "benchmarks" / rule / f"{self.dataset_name}__{name}.tsv"

    def nnunet_env(self) -> dict[str, str]:
        """nnU-Net's folder variables, absolute, for ``os.environ`` of every job."""
        return {
            "nnUNet_raw": str(self.nnunet_raw.resolve()),
            "nnUNet_preprocessed": str(self.nnunet_preprocessed.resolve()),
            "nnUNet_results": str(self.nnunet_results.resolve()),
        }

    def export_nnunet_env(self) -> None:
        os.environ.update(self.nnunet_env())
