"""Every artifact path of the workflow, computed from the validated config in one place.

The Snakefile, the rules and the CLI all ask :class:`Paths`; nothing else builds a path. Paths only
lays artifacts out: what the config means (cases, teacher folders, which students) is asked of the
stage modules, and nnU-Net's naming rules of :mod:`fastkd.nnunet`.
Relative config paths stay relative (Snakemake resolves them against its working directory);
:meth:`Paths.nnunet_env` gives the absolute ``nnUNet_raw`` / ``nnUNet_preprocessed`` /
``nnUNet_results`` that every job sees, since nnU-Net reads them from the environment at import.

Layout (defaults; ``<ds>`` = ``DatasetXXX_Name``)::

    nnUNet_raw/<ds>/                     raw dataset (demo written here; a real one is linked here, or
                                         with dataset.holdout its training cases: fastkd.preprocess)
    nnUNet_preprocessed/<ds>/            nnU-Net plans, fingerprint, splits_final.json,
                                         <data_identifier>/<case>.b2nd, <case>_seg.b2nd, <case>.pkl
    nnUNet_results/<ds>/<tr>__<plans>__<cfg>/fold_<f>/checkpoint_final.pth   teachers trained here
    fastkd_work/<ds>/preprocess/<plans>__<cfg>.json   preprocessing manifest (cases, shapes, spacing)
    fastkd_work/<ds>/teachers/<folder name>.json   teacher manifest per teacher folder (folds, sha256)
    fastkd_work/<ds>/softlabels/<cfg>__T<T>__<mirror|nomirror>__step<s>__<dtype>__teachers-<id>.zarr
                                         the soft-label cache (layout: fastkd.cache.layout); <id> hashes the
                                         teacher set (folders, folds, checkpoint names, weights)
        ... .shards/shard-<i>-of-<n>.json   what each soft-label job wrote; ... .preview.png
    nnUNet_preprocessed/<ds>/<plans>_fastkdR<r>[strategy].json   student plans (never preprocess with them)
    nnUNet_results/<ds>/nnUNetTrainerFastKD[NoKD][_DA5]__<student plans>__<cfg>/fold_<f>/   students
    fastkd_work/<ds>/student/<student plans>.info.txt / .report.png / .report.tsv   size, curves, Dice
    fastkd_work/<ds>/export/<student model folder>/fold_<f>.onnx (+ .onnx.json)   verified ONNX export
    fastkd_work/<ds>/export/<student model folder>/fold_<f>.engine (+ .engine.json)   TensorRT engine of it
    fastkd_work/<ds>/evaluation/<test | fold_<f>_validation>/   predictions, Dice table (layout: fastkd.evaluate)
    fastkd_work/<ds>/report/             model size and FLOPs, speed, Dice and cache tables, training curves
                                         (pages of the Snakemake report; layout: fastkd.report)
    fastkd_work/logs/<rule>/<wildcards>.log, fastkd_work/benchmarks/<rule>/<wildcards>.tsv
"""

from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

from fastkd import nnunet
from fastkd.cases import case_files, holds_out, test_set
from fastkd.sweep import Student, one, student_tag, students, trainer_name


#: nnU-Net's final validation of a fold, inside its fold folder (the last file its training writes)
VALIDATION_SUMMARY = Path("validation") / "summary.json"


def _beside(path: Path, suffix: str) -> Path:
    """``<path><suffix>``: a file named after another, beside it (``fold_0.onnx`` -> ``fold_0.onnx.json``)."""
    return path.with_name(path.name + suffix)


def fold_folder(model_folder: str | Path, fold: int | str) -> Path:
    """``<model folder>/fold_<fold>``: nnU-Net's folder of one trained fold."""
    return Path(model_folder) / f"fold_{fold}"


def validation_summary(model_folder: str | Path, fold: int | str) -> Path:
    """nnU-Net's ``validation/summary.json`` of fold ``fold`` of a model folder."""
    return fold_folder(model_folder, fold) / VALIDATION_SUMMARY


class Paths:
    """Artifact paths for one validated config (see :func:`fastkd.checks.validate_config`)."""

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
            return nnunet.dataset_name(demo["id"], demo["name"])
        return Path(self.config["dataset"]["raw"]).name

    @property
    def dataset_id(self) -> int:
        return nnunet.parse_dataset_name(self.dataset_name)[0]

    @property
    def raw_source(self) -> Path:
        """Where the raw dataset really lives (the demo is written straight into nnUNet_raw)."""
        return self.raw_dataset if self.is_demo else Path(self.config["dataset"]["raw"])

    @property
    def raw_dataset(self) -> Path:
        """The dataset as nnU-Net sees it: ``nnUNet_raw/<ds>`` (a link to ``raw_source`` if external; with
        ``dataset.holdout`` a folder of its training cases only, layout: fastkd.preprocess)."""
        return self.nnunet_raw / self.dataset_name

    def raw_case_files(self, cases: list[str], n_channels: int, test: bool = False,
                       file_ending: str = ".nii.gz") -> tuple[list[Path], list[Path]]:
        """(images, labels) of raw cases in nnU-Net's naming: ``imagesTr/<case>_<ch:04d><fe>``,
        ``labelsTr/<case><fe>`` (``test``: ``imagesTs``, ``labelsTs``), images case by case."""
        images, labels = ("imagesTs", "labelsTs") if test else ("imagesTr", "labelsTr")
        layout = {"file_ending": file_ending, "channel_names": range(n_channels)}  # all case_files reads
        files = [case_files(layout, c) for c in cases]
        return ([self.raw_dataset / images / name for names, _ in files for name in names],
                [self.raw_dataset / labels / label for _, label in files])

    @property
    def raw_dataset_json(self) -> Path:
        return self.raw_source / "dataset.json"

    # -- plans and preprocessing -----------------------------------------------------------------
    @property
    def external_teachers(self) -> Path | None:
        folder = self.config["teachers"]["model_folder"]
        return None if folder is None else Path(folder)

    @cached_property
    def external_plans(self) -> dict | None:
        """The plans of a teacher folder trained elsewhere (they name the plans and the grid)."""
        return None if self.external_teachers is None else nnunet.read_plans(self.external_teachers / "plans.json")

    @property
    def planner_class(self) -> str | None:
        """nnU-Net planner to run, or None when the plans come from an external teacher folder."""
        return None if self.external_plans else nnunet.PLANNERS[self.config["plans"]["planner"]][0]

    @property
    def plans_name(self) -> str:
        """The teachers' plans: they define the preprocessed grid every stage reads."""
        if self.external_plans:
            return self.external_plans["plans_name"]
        return nnunet.PLANNERS[self.config["plans"]["planner"]][1]

    @property
    def preprocessed_dataset(self) -> Path:
        return self.nnunet_preprocessed / self.dataset_name

    @property
    def preprocessed_dataset_json(self) -> Path:
        return self.preprocessed_dataset / "dataset.json"

    def plans_file_of(self, plans_name: str) -> Path:
        """Where nnU-Net keeps (and looks for) the plans named ``plans_name``."""
        return self.preprocessed_dataset / f"{plans_name}.json"

    @property
    def plans_file(self) -> Path:
        return self.plans_file_of(self.plans_name)

    @property
    def splits_file(self) -> Path:
        return self.preprocessed_dataset / "splits_final.json"

    def data_identifier(self, configuration: str) -> str:
        """nnU-Net's preprocessed-data folder name for a configuration, known before planning.

        Mirrors the planners' ``generate_data_identifier``: the default and ResEnc planners share
        ``nnUNetPlans_<cfg>`` for 2d and 3d_fullres; 3d_lowres is ``<plans_name>_3d_lowres``.
        """
        if self.external_plans:
            return nnunet.data_identifier(self.external_plans, configuration)
        if configuration in ("2d", "3d_fullres"):
            return f"nnUNetPlans_{configuration}"
        return f"{self.plans_name}_{configuration}"

    def preprocessed_case(self, configuration: str, case: str, seg: bool = False) -> Path:
        """nnU-Net 2.8's blosc2 array of a preprocessed case (image, or ``_seg`` for the labels)."""
        suffix = "_seg.b2nd" if seg else ".b2nd"
        return self.preprocessed_dataset / self.data_identifier(configuration) / f"{case}{suffix}"

    def preprocess_manifest(self, configuration: str) -> Path:
        return self.work / self.dataset_name / "preprocess" / f"{self.plans_name}__{configuration}.json"

    # -- unlabelled images (fastkd.unlabelled) ---------------------------------------------------
    @cached_property
    def unlabelled_source(self) -> Path | None:
        """The folder of unlabelled images (``dataset.unlabelled``, or the demo's), None without any."""
        from fastkd.unlabelled import unlabelled_source

        return unlabelled_source(self.config, self.raw_dataset)

    def preprocessed_unlabelled_case(self, configuration: str, case: str) -> Path:
        from fastkd.unlabelled import PREPROCESSED_FOLDER

        return self.preprocessed_dataset / PREPROCESSED_FOLDER / self.data_identifier(configuration) / f"{case}.b2nd"

    def unlabelled_manifest(self, configuration: str) -> Path:
        return self.work / self.dataset_name / "preprocess" / f"{self.plans_name}__{configuration}__unlabelled.json"

    # -- teachers --------------------------------------------------------------------------------
    @property
    def teacher_folder_name(self) -> str:
        t = self.config["teachers"]
        if self.external_teachers is not None:
            return self.external_teachers.name
        return nnunet.model_folder_name(t["trainer"], self.plans_name, t["configuration"])

    @property
    def teacher_folder(self) -> Path:
        if self.external_teachers is not None:
            return self.external_teachers
        return self.nnunet_results / self.dataset_name / self.teacher_folder_name

    @property
    def teacher_plans(self) -> Path:
        return self.teacher_folder / "plans.json"

    def teacher_checkpoint(self, fold: int | str) -> Path:
        return fold_folder(self.teacher_folder, fold) / self.config["teachers"]["checkpoint"]

    def teacher_validation_summary(self, fold: int | str) -> Path:
        return validation_summary(self.teacher_folder, fold)

    @property
    def teacher_manifest(self) -> Path:
        return self.teacher_manifest_of(self.teacher_folder_name)

    def teacher_manifest_of(self, name: str) -> Path:
        return self.work / self.dataset_name / "teachers" / f"{name}.json"

    # -- soft-label cache ------------------------------------------------------------------------
    @property
    def softlabel_name(self) -> str:
        from fastkd.teachers import teacher_set_id, teacher_sets

        s = self.config["softlabels"]
        mirror = "mirror" if s["mirroring"] else "nomirror"
        teachers = teacher_set_id(teacher_sets(self.config, self.teacher_folder))
        oof = "__oof" if one(self.config, "softlabels.folds_per_case") == "out_of_fold" else ""
        top = f"-top{s['top_k']}" if s.get("top_k") else ""
        return (f"{self.config['teachers']['configuration']}__T{one(self.config, 'distillation.temperature'):g}"
                f"__{mirror}__step{s['step_size']:g}__{s['dtype']}{top}{oof}__teachers-{teachers}")

    # Each method takes the cache's name (``softlabel_name`` of a config with that temperature and fold
    # selection; a sweep has several, the Snakemake wildcard ``{cache}`` stands for one); default: this config's.
    def softlabel_cache(self, name: str | None = None) -> Path:
        return self.work / self.dataset_name / "softlabels" / f"{name or self.softlabel_name}.zarr"

    def softlabel_cache_root(self, name: str | None = None) -> Path:
        """The store's root ``zarr.json``: written last, by the finalize job, once every case is in."""
        return self.softlabel_cache(name) / "zarr.json"

    def softlabel_shard(self, shard: int | str, name: str | None = None) -> Path:
        """A soft-label job's marker; ``shard``: ``<i>`` (training cases) or ``unlabelled-<i>`` (unlabelled
        images have shards of their own, so adding one reruns none of the training cases' jobs)."""
        n = self.config["softlabels"]["shards"]
        return (self.work / self.dataset_name / "softlabels" / f"{name or self.softlabel_name}.shards"
                / f"shard-{shard}-of-{n}.json")

    def softlabel_preview(self, name: str | None = None) -> Path:
        return self.work / self.dataset_name / "softlabels" / f"{name or self.softlabel_name}.preview.png"

    # -- students --------------------------------------------------------------------------------
    @property
    def student_base_plans_name(self) -> str:
        """The plans the students are derived from: ``student.plans``, by default the teachers'."""
        return self.config["student"]["plans"] or self.plans_name

    @property
    def student_base_plans_file(self) -> Path:
        return self.plans_file_of(self.student_base_plans_name)

    @cached_property
    def student_block_strategy(self) -> str | None:
        """The ResEnc block strategy, or None where the base plans are a plain U-Net (it does not apply)."""
        configuration = self.config["teachers"]["configuration"]
        if self.config["student"]["plans"]:
            resenc = nnunet.is_resenc(nnunet.read_plans(self.student_base_plans_file), configuration)
        elif self.external_plans:
            resenc = nnunet.is_resenc(self.external_plans, configuration)
        else:
            resenc = self.config["plans"]["planner"].startswith("ResEnc")
        return self.config["student"]["block_strategy"] if resenc else None

    def student_plans_name(self, r: int | str) -> str:
        """``r`` may also be a Snakemake wildcard (``"{r}"``): the name is a plain format."""
        return nnunet.STUDENT_PLANS_NAME.format(plans=self.student_base_plans_name, r=r,
                                                strategy=self.student_block_strategy or "")

    def student_plans_file(self, r: int | str) -> Path:
        """Student plans beside the teachers' (nnU-Net looks there); never used to preprocess."""
        return self.plans_file_of(self.student_plans_name(r))

    def model_folder(self, name: str) -> Path:
        """An nnU-Net model folder of this dataset, by name (``<trainer>__<plans>__<configuration>``)."""
        return self.nnunet_results / self.dataset_name / name

    def student_folder(self, r: int | str, kd: bool = True) -> Path:
        """nnU-Net model folder of the r-student (``kd=False``: the no-KD baseline)."""
        trainer = trainer_name(kd, self.config["student"]["augmentation"] == "da5", student_tag(self.config, kd))
        return self.model_folder(nnunet.model_folder_name(trainer, self.student_plans_name(r),
                                                          self.config["teachers"]["configuration"]))

    def student_checkpoint(self, r: int | str, fold: int | str, kd: bool = True) -> Path:
        return fold_folder(self.student_folder(r, kd), fold) / "checkpoint_final.pth"

    def student_validation_summary(self, r: int | str, fold: int | str, kd: bool = True) -> Path:
        return validation_summary(self.student_folder(r, kd), fold)

    def student_info(self, r: int | str) -> Path:
        """Parameters and FLOPs per patch, teacher vs student (text)."""
        return self.work / self.dataset_name / "student" / f"{self.student_plans_name(r)}.info.txt"

    def student_report(self, r: int | str, suffix: str = "png") -> Path:
        """Training curves and Dice table of teachers, students and baselines of one r (png or tsv)."""
        return self.work / self.dataset_name / "student" / f"{self.student_plans_name(r)}.report.{suffix}"

    # -- exports ---------------------------------------------------------------------------------
    def onnx_export(self, model: str, fold: int | str) -> Path:
        """The verified ONNX export of fold ``fold`` of the model folder named ``model`` (a name, or the
        Snakemake wildcard ``{model}``); ``<this>.json`` beside it holds the verification."""
        return self.work / self.dataset_name / "export" / model / f"fold_{fold}.onnx"

    def onnx_verification(self, model: str, fold: int | str) -> Path:
        """``<onnx>.json``: the verification of :meth:`onnx_export` (written with it)."""
        return _beside(self.onnx_export(model, fold), ".json")

    def student_onnx(self, r: int | str, fold: int | str, kd: bool = True) -> Path:
        return self.onnx_export(self.student_folder(r, kd).name, fold)

    def trt_engine(self, model: str, fold: int | str) -> Path:
        """The TensorRT engine built from :meth:`onnx_export`, beside it; ``<this>.json`` holds its
        metadata (TensorRT version, GPU, precision, profile, ONNX sha256, parity)."""
        return self.onnx_export(model, fold).with_suffix(".engine")

    def trt_metadata(self, model: str, fold: int | str) -> Path:
        """``<engine>.json``: the metadata of :meth:`trt_engine` (written with it)."""
        return _beside(self.trt_engine(model, fold), ".json")

    def student_engine(self, r: int | str, fold: int | str, kd: bool = True) -> Path:
        return self.trt_engine(self.student_folder(r, kd).name, fold)

    # -- evaluation ------------------------------------------------------------------------------
    def evaluation(self, case_set: str) -> Path:
        """One case set's evaluation (``test`` or ``fold_<f>_validation``; layout: fastkd.evaluate)."""
        return self.work / self.dataset_name / "evaluation" / case_set

    def evaluation_images(self, case_set: str) -> Path:
        """The images a case set predicts: a test set's folder (relative: inside the raw dataset where it
        really lives, so they exist before a job links it into nnUNet_raw), or links to the cases of a
        validation set or of the test set ``dataset.holdout`` holds back."""
        if case_set == "test" and not holds_out(self.config):
            return self.raw_source / test_set(self.config)[0]
        return self.evaluation(case_set) / "cases" / "images"

    def evaluation_labels(self, case_set: str) -> Path:
        if case_set == "test" and not holds_out(self.config):
            return self.raw_source / test_set(self.config)[1]
        return self.evaluation(case_set) / "cases" / "labels"

    def predictions(self, case_set: str, label: str) -> Path:
        """Segmentations of one model (``teachers`` or ``<model folder>__fold_<f>``) on a case set."""
        return self.evaluation(case_set) / "predictions" / label

    def evaluation_table(self, case_set: str, suffix: str = "tsv") -> Path:
        return self.evaluation(case_set) / f"dice.{suffix}"

    # -- report ----------------------------------------------------------------------------------
    @property
    def report_folder(self) -> Path:
        """The report's own pages, written by ``fastkd report summary`` (layout: fastkd.report)."""
        return self.work / self.dataset_name / "report"

    def report_table(self, name: str, suffix: str = "html") -> Path:
        """One page of it: ``models`` (html, tsv, png), ``speed`` (html, tsv), ``dice`` (html), ``cache`` (html, tsv)."""
        return self.report_folder / f"{name}.{suffix}"

    @property
    def report_curves(self) -> Path:
        """nnU-Net's progress.png of every trained fold, one copy each (``<model folder>__fold_<f>.png``)."""
        return self.report_folder / "curves"

    # -- bookkeeping -----------------------------------------------------------------------------
    def reference_config(self, rule: str, r: int | str, fold: int | str) -> Path:
        """The config a reference command (``nnUNetv2_distillation_train``) ran the workflow with."""
        return self.work / self.dataset_name / "reference" / f"{rule}__{self.student_plans_name(r)}__fold_{fold}.yaml"

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


# -- every student ---------------------------------------------------------------------------------
def students_by_folder(config: dict) -> dict[str, tuple[Student, Paths]]:
    """Every student of a validated config by its model folder's name, with the :class:`Paths` of its
    single-valued config (:meth:`fastkd.sweep.Student.config`): one per combination of the swept settings,
    the no-KD baselines per r and seed. The workflow's wildcard ``{student}`` is one of these names."""
    by_folder = {}
    for student in students(config):
        paths = Paths(student.config(config))
        by_folder[paths.student_folder(student.r, student.kd).name] = (student, paths)
    return by_folder


def student_folds(config: dict) -> list[tuple[Student, Paths, int | str]]:
    """Every fold a config trains of every student: (student, its Paths, fold), in the order of
    :func:`students_by_folder`, then of ``student.folds``."""
    return [(student, paths, fold) for student, paths in students_by_folder(config).values()
            for fold in config["student"]["folds"]]
