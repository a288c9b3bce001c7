"""The whole check of a workflow configuration: the schema (:mod:`fastkd.config`), then what a JSON schema
cannot express and needs the stages' knowledge (the dataset folder exists, the teacher configuration is
preprocessed, an external teacher folder holds the folds, a test set holds no training case).

:func:`validate_config` is called by the Snakefile at parse time and by ``fastkd config``; it reports *all*
problems at once, each naming the key, the offending value and what would be valid.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastkd.config import complete, read_config_files
from fastkd.errors import FastkdError


def validate_config(config: dict, base_dir: str | Path | None = None, check_files: bool = True) -> dict:
    """Fill defaults into ``config`` (in place) and validate it: the schema, then the checks here; return it.

    ``base_dir`` resolves relative paths (default: the current directory, Snakemake's workdir).
    ``check_files`` also checks the dataset folder and an external teacher folder on disk.
    Raises :class:`fastkd.config.ConfigError` listing every problem.
    """
    base_dir = Path(base_dir or ".")
    return complete(config, lambda c: _holdout_problems(c, base_dir, check_files)
                    or _semantic_problems(c, base_dir, check_files))


def _semantic_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    from fastkd.nnunet import DATASET_NAME_PATTERN

    problems = []
    plans, teachers = config["plans"], config["teachers"]
    if teachers["configuration"] not in plans["configurations"]:
        problems.append(
            f"teachers.configuration = {teachers['configuration']!r}: must be one of "
            f"plans.configurations {plans['configurations']} (only those are preprocessed)")
    raw = config["dataset"]["raw"]
    if raw != "demo":
        folder = Path(raw) if Path(raw).is_absolute() else base_dir / raw
        if not DATASET_NAME_PATTERN.match(folder.name):
            problems.append(f"dataset.raw = {raw!r}: the folder must be named DatasetXXX_Name "
                            f"(three digits, e.g. Dataset004_Hippocampus), or use 'demo'")
        elif check_files and not (folder / "dataset.json").is_file():
            found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else None
            problems.append(
                f"dataset.raw = {raw!r}: no dataset.json in {folder} "
                + (f"(found: {', '.join(found) or 'nothing'})" if found is not None else "(the folder does not exist)")
                + "; give an nnU-Net raw dataset folder or 'demo'")
    else:
        from fastkd.demo import check_options

        try:
            check_options(config["dataset"]["demo"])
        except ValueError as e:  # options that exclude each other, e.g. anisotropic and spacing
            problems.append(f"dataset.demo: {e}")
    if check_files and teachers["model_folder"] is not None and not problems:
        from fastkd.teachers import TeacherFolderError, validate_model_folder

        folder = Path(teachers["model_folder"])
        folder = folder if folder.is_absolute() else base_dir / folder
        try:
            validate_model_folder(folder, teachers["configuration"], teachers["folds"], teachers["checkpoint"])
        except TeacherFolderError as e:
            problems.append(f"teachers.model_folder: {e}")
    problems += _distillation_problems(config)
    problems += _unlabelled_problems(config, base_dir, check_files)
    if not problems:
        problems += _softlabel_problems(config, base_dir, check_files)
    if not problems and check_files and not plans["preprocess"]:
        problems += _preprocessed_problems(config, base_dir)
    if not problems:
        problems += _evaluation_problems(config, base_dir, check_files)
    return problems


def _unlabelled_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    """``dataset.unlabelled``: a real dataset's folder of images in nnU-Net's naming (the demo has
    ``dataset.demo.n_unlabelled``); its files are checked again, with their contents, when preprocessed."""
    folder, dataset = config["dataset"]["unlabelled"], config["dataset"]
    if folder is None:
        return []
    if dataset["raw"] == "demo":
        return [f"dataset.unlabelled = {folder!r} with dataset.raw 'demo': the demo draws its own unlabelled "
                "images (dataset.demo.n_unlabelled); set dataset.unlabelled: null"]
    if not check_files:
        return []
    from fastkd import nnunet
    from fastkd.unlabelled import folder_cases

    path = Path(folder) if Path(folder).is_absolute() else base_dir / folder
    raw = Path(dataset["raw"]) if Path(dataset["raw"]).is_absolute() else base_dir / dataset["raw"]
    try:
        folder_cases(path, nnunet.read_dataset_json(raw))
    except FastkdError as e:
        return [str(e)]
    return []


def _distillation_problems(config: dict) -> list[str]:
    """The convex loss form (1 - alpha) * nnU-Net's loss + alpha * KD needs alpha <= 1 (the schema allows any
    alpha >= 0: the additive form's weight of the KD term)."""
    d = config["distillation"]
    forms = d["loss"] if isinstance(d["loss"], list) else [d["loss"]]
    alphas = d["alpha"] if isinstance(d["alpha"], list) else [d["alpha"]]
    above = [a for a in alphas if a > 1]
    if "convex" in forms and above:
        return [f"distillation.alpha = {above[0]} with distillation.loss 'convex': (1 - alpha) * nnU-Net's loss + "
                "alpha * KD needs 0 <= alpha <= 1; use loss 'additive' (nnU-Net's loss + alpha * KD) for a larger weight"]
    return []


def _holdout_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    """``dataset.holdout``: a real dataset's, the only test set, fastkd preprocesses (so nnU-Net never sees
    the held-out cases), and at least 5 cases are left to train on."""
    n_test, dataset = config["dataset"]["holdout"]["n_test"], config["dataset"]
    if n_test == 0:
        return []
    key = f"dataset.holdout.n_test = {n_test}"
    if dataset["raw"] == "demo":
        return [f"{key}: dataset.raw = 'demo' holds its test cases apart already (dataset.demo.n_test = "
                f"{dataset['demo']['n_test']}); set dataset.holdout.n_test: 0, or dataset.demo.n_test for more"]
    evaluation = config["evaluation"]
    if evaluation["test_images"] or evaluation["test_labels"]:
        return [f"{key} and evaluation.test_images = {evaluation['test_images']!r}: one test set only; hold cases "
                "back (dataset.holdout) or name a test set (evaluation.test_images / test_labels), not both"]
    if not config["plans"]["preprocess"]:
        return [f"{key} needs plans.preprocess: true: fastkd preprocesses the training cases only, so nnU-Net "
                "never sees the held-out cases (a dataset preprocessed elsewhere holds them all)"]
    if not check_files:
        return []
    from fastkd.nnunet import raw_case_ids

    raw = base_dir / dataset["raw"]
    if (raw / "imagesTs").is_dir() and (raw / "labelsTs").is_dir():
        return [f"{key}: {dataset['raw']} has its own labelled test set (imagesTs, labelsTs); one test set only: "
                "evaluate on it (dataset.holdout.n_test: 0)"]
    try:
        n_cases = len(raw_case_ids(raw))
    except (FastkdError, ValueError, OSError):
        return []  # the dataset's own problems are reported by the soft-label checks
    if n_cases - n_test < 5:
        valid = f"0-{n_cases - 5}" if n_cases > 5 else "0"
        return [f"{key}: {dataset['raw']} has {n_cases} labelled cases, which leaves {n_cases - n_test} to train on; "
                f"nnU-Net's 5-fold split needs at least 5: use {valid}"]
    return []


def _evaluation_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    """A test set is complete (images and labels) and holds no training case; without one, every student
    fold has validation cases to be evaluated on."""
    evaluation, demo = config["evaluation"], config["dataset"]["raw"] == "demo"
    if not evaluation["enabled"] or config["dataset"]["holdout"]["n_test"]:
        return []  # held-out cases are a test set, never training cases: they are picked out of them
    images, labels = evaluation["test_images"], evaluation["test_labels"]
    if (images is None) != (labels is None):
        return [f"evaluation.test_images = {images!r}, evaluation.test_labels = {labels!r}: give both folders of "
                "the test set, or neither (then the dataset's own labelled imagesTs/labelsTs, else each student fold's "
                "validation cases)"]
    from fastkd.cases import held_out_problems, test_set

    found = test_set({**config, "dataset": {**config["dataset"], "raw": str(base_dir / config["dataset"]["raw"])}}
                     if not demo else config)
    if found is None:
        if "all" in config["student"]["folds"]:
            return ["student.folds includes 'all' (trained on every case), which leaves no validation cases to "
                    "evaluate it on: set evaluation.test_images and test_labels (a labelled test set), or "
                    "evaluation.enabled: false"]
        return []
    if demo:
        n_test = config["dataset"]["demo"]["n_test"]
        if n_test == 0 and images and not Path(images).is_absolute():
            return [f"evaluation.test_images = {images!r}: the demo writes no test cases (dataset.demo.n_test = 0); "
                    "set dataset.demo.n_test >= 1, or evaluation.test_images / test_labels: null"]
        return []
    if not check_files:
        return []
    from fastkd.nnunet import raw_case_ids, read_dataset_json

    raw = base_dir / config["dataset"]["raw"]
    try:
        dataset_json, training = read_dataset_json(raw), raw_case_ids(raw)
    except (FastkdError, ValueError, OSError):
        return []  # the dataset's own problems are reported by the soft-label checks
    return held_out_problems(raw / found[0], raw / found[1], dataset_json, training)


def _preprocessed_problems(config: dict, base_dir: Path) -> list[str]:
    """``plans.preprocess: false``: nnU-Net must have preprocessed the dataset with the teachers' plans."""
    from fastkd.nnunet import PLANNERS
    from fastkd.paths import Paths

    paths = Paths(config)
    for configuration in config["plans"]["configurations"]:
        data = base_dir / paths.preprocessed_dataset / paths.data_identifier(configuration)
        missing = next((f for f in (base_dir / paths.plans_file, data) if not f.exists()), None)
        if missing is not None:
            planner = {plans: cls for cls, plans in PLANNERS.values()}.get(paths.plans_name, "<the teachers' planner>")
            pl = "" if paths.plans_name == "nnUNetPlans" else f" -pl {planner}"
            return [f"plans.preprocess = false: {missing} does not exist: {paths.dataset_name} is not preprocessed with "
                    f"the teacher plans {paths.plans_name} ({configuration}); run `nnUNetv2_plan_and_preprocess -d "
                    f"{paths.dataset_id} -c {configuration}{pl}` first, or let fastkd preprocess (plans.preprocess: "
                    "true, the workflow's `snakemake preprocessed`)"]
    return []


def _softlabel_problems(config: dict, base_dir: Path, check_files: bool) -> list[str]:
    """Extra teacher folders exist and share the teachers' preprocessed grid; no more shards than cases;
    student base plans exist beside the teachers' with the same grid."""
    from fastkd.nnunet import data_identifier, raw_case_ids, read_plans
    from fastkd.paths import Paths
    from fastkd.teachers import TeacherFolderError, teacher_sets, validate_model_folder

    def resolve(path) -> Path:
        return base_dir / path  # an absolute path stays itself

    problems = []
    teachers = config["teachers"]
    names = [s["name"] for s in teacher_sets(config, Paths(config).teacher_folder)]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        problems.append(f"teachers.extra: teacher folders need distinct names (their manifests are named after "
                        f"them); repeated: {', '.join(repeated)}")
    if not check_files:
        return problems
    main = {**teachers, "model_folder": str(resolve(teachers["model_folder"]))} if teachers["model_folder"] else teachers
    paths = Paths({**config, "teachers": main})
    grid = paths.data_identifier(teachers["configuration"])
    for i, extra in enumerate(teachers["extra"]):
        configuration = extra["configuration"] or teachers["configuration"]
        try:
            plans = validate_model_folder(resolve(extra["model_folder"]), configuration, extra["folds"],
                                          extra["checkpoint"])
        except TeacherFolderError as e:
            problems.append(f"teachers.extra[{i}].model_folder: {e}")
            continue
        theirs = data_identifier(plans, configuration)
        if theirs != grid:
            problems.append(f"teachers.extra[{i}].model_folder: preprocessed as {theirs!r}, the teachers as {grid!r}; "
                            "the teachers of one soft-label cache must share the preprocessed grid")
    base = config["student"]["plans"]
    if base is not None:
        file = resolve(paths.student_base_plans_file)
        there = sorted(p.stem for p in file.parent.glob("*.json") if p.stem not in ("dataset", "dataset_fingerprint",
                                                                                     "splits_final"))
        if not file.is_file():
            problems.append(f"student.plans = {base!r}: no plans {file} (plans there: {', '.join(there) or 'none'}); "
                            f"name plans preprocessed beside the teachers', or null for the teachers' {paths.plans_name}")
        else:
            try:
                theirs = data_identifier(read_plans(file), teachers["configuration"])
            except FastkdError as e:
                theirs = None
                problems.append(f"student.plans = {base!r}: {e}")
            if theirs is not None and theirs != grid:
                problems.append(f"student.plans = {base!r}: its {teachers['configuration']} data is {theirs!r}, the "
                                f"teachers' is {grid!r}; the student trains on the teachers' preprocessed data, where "
                                f"the soft labels are, so its plans must share that data_identifier (e.g. "
                                f"{paths.plans_name})")
    raw = config["dataset"]["raw"]
    try:
        n_cases = config["dataset"]["demo"]["n_cases"] if raw == "demo" else len(raw_case_ids(resolve(raw)))
    except (KeyError, ValueError, OSError) as e:
        return problems + [f"dataset.raw = {raw!r}: cannot list its training cases ({type(e).__name__}: {e}); "
                           "dataset.json needs file_ending, channel_names and labels, imagesTr/ the images"]
    if config["softlabels"]["shards"] > n_cases:
        problems.append(f"softlabels.shards = {config['softlabels']['shards']}: more soft-label jobs than training "
                        f"cases ({n_cases}); use 1-{n_cases}")
    return problems + _top_k_problems(config, resolve(raw) if raw != "demo" else None)


def _top_k_problems(config: dict, raw: Path | None) -> list[str]:
    """softlabels.top_k: uint8 values, a softmax dataset, and k below its number of classes (checked here
    for raw datasets; the soft-label job checks it again against the teachers' heads)."""
    k = config["softlabels"]["top_k"]
    if k is None:
        return []
    if config["softlabels"]["dtype"] != "uint8":
        return [f"softlabels.top_k = {k} stores uint8 values: set softlabels.dtype: uint8 "
                f"(is {config['softlabels']['dtype']}) or softlabels.top_k: null"]
    if raw is None or not (raw / "dataset.json").is_file():
        return []
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    dataset_json = json.loads((raw / "dataset.json").read_text())
    labels = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    if labels.has_regions:
        return [f"softlabels.top_k = {k}: {raw.name} is region-based; its regions' probabilities are independent "
                "and stored whole (set softlabels.top_k: null)"]
    if k >= labels.num_segmentation_heads:
        return [f"softlabels.top_k = {k}: must be below the number of classes of {raw.name} "
                f"({labels.num_segmentation_heads}), or null"]
    return []


def load_config(files: list[str | Path], base_dir: str | Path | None = None) -> dict:
    """Read YAML config files (later ones override earlier ones, key by key) and validate."""
    return validate_config(read_config_files(files), base_dir=base_dir)
