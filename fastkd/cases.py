"""Case sets: which cases are the test set (a labelled test set on disk, or the cases ``dataset.holdout``
holds back from training), which are the evaluation sets without one, and nnU-Net's file names of a case.

Known at parse time (the Snakefile lists every test case), free of torch imports.
"""

from __future__ import annotations

import random
from pathlib import Path

from fastkd import nnunet
from fastkd.errors import FastkdError


TEST_SET = "test"


def test_set(config: dict) -> tuple[str, str] | None:
    """(images, labels) folders of a test set on disk, relative to the raw dataset unless absolute, or None.

    ``evaluation.test_images`` / ``test_labels`` when set; else the dataset's own labelled test set: the
    demo's ``imagesTs``/``labelsTs`` (``dataset.demo.n_test`` > 0), a real dataset's ``imagesTs`` when it
    has ``labelsTs`` beside it (the Medical Segmentation Decathlon's test images have no labels: none).
    ``dataset.holdout`` makes the test set of training cases instead (:func:`holds_out`); the config
    check allows one test set only.
    """
    evaluation = config["evaluation"]
    if evaluation["test_images"]:
        return evaluation["test_images"], evaluation["test_labels"]
    raw = config["dataset"]["raw"]
    if raw == "demo":
        has_own = config["dataset"]["demo"]["n_test"] > 0
    else:
        has_own = (Path(raw) / "imagesTs").is_dir() and (Path(raw) / "labelsTs").is_dir()
    return ("imagesTs", "labelsTs") if has_own else None


def holds_out(config: dict) -> bool:
    """Whether the test set is the labelled cases ``dataset.holdout`` holds back (linked, like validation cases)."""
    return config["dataset"]["raw"] != "demo" and config["dataset"]["holdout"]["n_test"] > 0


def evaluation_sets(config: dict) -> list[str]:
    """``["test"]`` with a test set (on disk, or held out), else one optimistic validation set per student fold."""
    if holds_out(config) or test_set(config):
        return [TEST_SET]
    return [f"fold_{fold}_validation" for fold in config["student"]["folds"]]


def set_fold(case_set: str) -> str | None:
    """The student fold a validation set belongs to (``None`` for the test set)."""
    return None if case_set == TEST_SET else case_set.removeprefix("fold_").removesuffix("_validation")


def is_optimistic(case_set: str) -> bool:
    return case_set != TEST_SET


def held_out_cases(images: str | Path, dataset_json: dict) -> list[str]:
    """Cases of a test image folder, found the way nnU-Net finds images (``<case>_0000<file_ending>``)."""
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    if not Path(images).is_dir():
        raise FastkdError(f"evaluation.test_images: {images} is not a folder")
    groups = create_lists_from_splitted_dataset_folder(str(images), dataset_json["file_ending"])
    return sorted(Path(g[0]).name[: -len(dataset_json["file_ending"]) - 5] for g in groups)


def held_out_problems(images: Path, labels: Path, dataset_json: dict, training: list[str]) -> list[str]:
    """What is wrong with a test set: no images, a case without its label, a case the models trained on."""
    try:
        cases = held_out_cases(images, dataset_json)
    except FastkdError as e:
        return [str(e)]
    ending = dataset_json["file_ending"]
    problems = []
    if not cases:
        problems.append(f"evaluation.test_images: {images} holds no images named <case>_0000{ending}")
    missing = [c for c in cases if not (labels / f"{c}{ending}").is_file()]
    if missing:
        problems.append(f"evaluation.test_labels: {labels} lacks the label maps of {len(missing)} test cases "
                        f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})")
    trained = sorted(set(cases) & set(training))
    if trained:
        problems.append(f"evaluation.test_images: {len(trained)} test cases are training cases ("
                        f"{', '.join(trained[:5])}{' ...' if len(trained) > 5 else ''}); a test set must hold cases "
                        "none of the models trained on")
    return problems


def test_set_files(config: dict, paths) -> tuple[list[Path], list[Path]]:
    """(images, labels) of the test set, known at parse time: the demo's from its config (its demo_data
    job writes them), the held-out cases' links from ``dataset.holdout``, a real test set's from its folder."""
    images, labels = paths.evaluation_images(TEST_SET), paths.evaluation_labels(TEST_SET)
    if config["dataset"]["raw"] == "demo":
        from fastkd.demo import held_out_case_ids

        cases = held_out_case_ids(config["dataset"]["demo"]["n_test"])
        dataset_json = {"file_ending": ".nii.gz", "channel_names": {"0": "image"}}
    else:
        dataset_json = nnunet.read_dataset_json(config["dataset"]["raw"])
        cases = holdout_cases(config) if holds_out(config) else held_out_cases(images, dataset_json)
    files = [case_files(dataset_json, c) for c in cases]
    return [images / name for names, _ in files for name in names], [labels / label for _, label in files]


def holdout_split(cases: list[str], n_test: int, seed: int) -> list[str]:
    """The ``n_test`` cases held back as the test set: a seeded pick of the sorted ids, sorted (the same
    cases, count and seed give the same pick on every machine)."""
    return sorted(random.Random(seed).sample(sorted(cases), n_test))


def holdout_cases(config: dict) -> list[str]:
    """The test cases ``dataset.holdout`` holds back from a real dataset's labelled cases (none by default)."""
    holdout = config["dataset"]["holdout"]
    if config["dataset"]["raw"] == "demo" or not holdout["n_test"]:
        return []
    return holdout_split(nnunet.raw_case_ids(config["dataset"]["raw"]), holdout["n_test"], holdout["seed"])


def case_files(dataset_json: dict, case: str) -> tuple[list[str], str]:
    """nnU-Net's file names of a case: its images ``<case>_<ch:04d><fe>`` and its label map ``<case><fe>``."""
    ending = dataset_json["file_ending"]
    return [f"{case}_{ch:04d}{ending}" for ch in range(len(dataset_json["channel_names"]))], f"{case}{ending}"
