"""nnU-Net planning and preprocessing, through nnU-Net's own API (fingerprint, planner, preprocessor),
or a dataset preprocessed already (``plans.preprocess: false``: ``nnUNetv2_plan_and_preprocess`` ran).

What it writes besides nnU-Net's own files (plans, fingerprint, ``<data_identifier>/`` arrays):

- ``nnUNet_raw/<ds>``: the raw dataset as nnU-Net sees it. A symlink to ``dataset.raw``; with
  ``dataset.holdout.n_test`` > 0 a folder fastkd builds, so that nnU-Net plans, preprocesses and splits
  the training cases only and never sees the held-out test cases (:func:`fastkd.cases.holdout_split`)::

    dataset.json         the source's, with numTraining = the number of training cases
    imagesTr/<case>_<ch:04d><fe>, labelsTr/<case><fe>   symlinks to the source's files, training cases only
    fastkd_holdout.json  {"source", "n_test", "seed", "test_cases"}, written last

  It is built beside its place and renamed into it (complete or absent); a folder built for another
  holdout, or a symlink, is replaced; any other folder in the way is an error.
- ``nnUNet_preprocessed/<ds>/splits_final.json``: nnU-Net's seeded 5-fold split, made here once
  (exactly as the trainer would make it) so that teacher folds training in parallel do not race to
  write it. An existing file (a custom split) is kept if it splits the dataset's cases; one of other
  cases (left from another ``dataset.holdout``) is made again.
- one manifest per configuration (path from :meth:`fastkd.paths.Paths.preprocess_manifest`)::

    {"dataset_name", "plans_name", "configuration", "data_identifier", "spacing": [x, y, z],
     "patch_size": [...], "cases": {"<case>": {"shape": [C, x, y, z]}, ...}, "nnunetv2_version"}

  written last and atomically: it exists only if every case was preprocessed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fastkd import nnunet
from fastkd.cases import case_files, holdout_cases, holdout_split
from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text, package_version, read_json


HOLDOUT_RECORD = "fastkd_holdout.json"


def training_cases(config: dict) -> list[str]:
    """The cases the workflow preprocesses, known at parse time: the demo's from its config, a real
    dataset's from its dataset.json (never from a checkpoint rule, so Snakemake tracks every case), less
    the cases ``dataset.holdout`` holds back."""
    if config["dataset"]["raw"] == "demo":
        from fastkd.demo import case_ids

        return case_ids(config["dataset"]["demo"]["n_cases"])
    held_out = set(holdout_cases(config))
    return [c for c in nnunet.raw_case_ids(config["dataset"]["raw"]) if c not in held_out]


def link_raw_dataset(source: Path, raw_dataset: Path, *, n_test: int = 0, seed: int = 0) -> None:
    """Make ``nnUNet_raw/<ds>`` show the raw dataset at ``source``: a symlink (unless it is that folder), or
    with ``n_test`` > 0 a folder of its training cases only (layout: the module docstring)."""
    source, raw_dataset = Path(source), Path(raw_dataset)
    if not (source / "dataset.json").is_file():
        raise FastkdError(f"raw dataset {source} has no dataset.json (give an nnU-Net raw dataset folder)")
    built = not raw_dataset.is_symlink() and (raw_dataset / HOLDOUT_RECORD).is_file()
    if raw_dataset.exists() and not raw_dataset.is_symlink() and not built:
        if raw_dataset.resolve() != source.resolve():
            raise FastkdError(f"{raw_dataset} already exists and is not {source}; remove it or use another "
                              "paths.nnunet_raw")
        if n_test:
            raise FastkdError(f"dataset.holdout.n_test = {n_test}: the raw dataset {source} is {raw_dataset} itself, "
                              "where fastkd builds the folder of its training cases; keep the dataset outside "
                              "paths.nnunet_raw")
        return
    if n_test:
        _build_holdout_dataset(source, raw_dataset, n_test, seed)
    elif not (raw_dataset.is_symlink() and raw_dataset.resolve() == source.resolve()):
        _remove(raw_dataset)  # a link elsewhere (the config changed), or a folder built for a holdout
        raw_dataset.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), raw_dataset, target_is_directory=True)


def _build_holdout_dataset(source: Path, raw_dataset: Path, n_test: int, seed: int) -> None:
    cases = nnunet.raw_case_ids(source)
    test = holdout_split(cases, n_test, seed)
    record = {"source": str(source.resolve()), "n_test": n_test, "seed": seed, "test_cases": test}
    if not raw_dataset.is_symlink() and (raw_dataset / HOLDOUT_RECORD).is_file():
        if read_json(raw_dataset / HOLDOUT_RECORD, "holdout record", "fastkd writes it") == record:
            return
    dataset_json = nnunet.read_dataset_json(source)
    training = [c for c in cases if c not in set(test)]
    links = {}
    for case in training:
        images, label = case_files(dataset_json, case)
        links.update({Path("imagesTr") / name: source / "imagesTr" / name for name in images})
        links[Path("labelsTr") / label] = source / "labelsTr" / label
    missing = [str(f) for f in links.values() if not f.is_file()]
    if missing:
        raise FastkdError(f"{source} lacks {len(missing)} file(s) of its training cases: {', '.join(missing[:5])}"
                          f"{' ...' if len(missing) > 5 else ''} (nnU-Net names them imagesTr/<case>_<channel:04d>"
                          "<file_ending> and labelsTr/<case><file_ending>)")
    # dataset.json's optional "dataset" list would name every case; the folder lists them by nnU-Net's naming
    dataset_json = {k: v for k, v in dataset_json.items() if k != "dataset"} | {"numTraining": len(training)}
    tmp = raw_dataset.with_name(f".{raw_dataset.name}.building-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for folder in ("imagesTr", "labelsTr"):
            (tmp / folder).mkdir(parents=True)
        for link, target in links.items():
            os.symlink(target.resolve(), tmp / link)
        (tmp / "dataset.json").write_text(json.dumps(dataset_json, indent=4) + "\n")
        (tmp / HOLDOUT_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if raw_dataset.is_symlink() or raw_dataset.exists():
            old = raw_dataset.with_name(f".{raw_dataset.name}.old-{os.getpid()}")
            os.rename(raw_dataset, old)
            os.rename(tmp, raw_dataset)
            _remove(old)
        else:
            os.rename(tmp, raw_dataset)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    """A symlink, or a folder fastkd built (its links are removed, never what they point to)."""
    if path.is_symlink():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def _check_teacher_plans(teacher_folder: Path, raw_dataset: Path) -> dict:
    plans = nnunet.read_plans(teacher_folder / "plans.json")
    teacher_ds, raw_ds = nnunet.read_dataset_json(teacher_folder), nnunet.read_dataset_json(raw_dataset)
    for key in ("labels", "channel_names"):
        if teacher_ds.get(key) != raw_ds.get(key):
            raise FastkdError(f"the teachers in {teacher_folder} were trained with {key} = {teacher_ds.get(key)}, "
                              f"but the raw dataset {raw_dataset} has {key} = {raw_ds.get(key)}")
    return plans


def plan_preprocess(dataset_id: int, raw_source: Path, configurations: list[str], manifests: list[Path], *,
                    planner_class: str | None, teacher_folder: Path | None, num_processes: int,
                    gpu_memory_target_gb: float | None, holdout_n_test: int = 0, holdout_seed: int = 0) -> str:
    """Fingerprint, plan (or adopt an external teacher folder's plans), preprocess, split, write manifests.

    ``holdout_n_test`` / ``holdout_seed``: ``dataset.holdout``, the test cases nnU-Net never sees.
    Needs the nnU-Net folder variables in ``os.environ``. Returns the plans name.
    """
    if len(manifests) != len(configurations):
        raise FastkdError(f"{len(configurations)} configuration(s) {configurations} but {len(manifests)} manifest path(s)")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import extract_fingerprints, plan_experiments, preprocess
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw
    from nnunetv2.utilities.dataset_name_id_conversion import convert_id_to_dataset_name

    raw_source = Path(raw_source)
    _, name = nnunet.parse_dataset_name(raw_source.name)
    ds_name = nnunet.dataset_name(dataset_id, name)
    link_raw_dataset(raw_source, Path(nnUNet_raw) / ds_name, n_test=holdout_n_test, seed=holdout_seed)
    if convert_id_to_dataset_name(dataset_id) != ds_name:
        raise FastkdError(f"dataset id {dataset_id} resolves to {convert_id_to_dataset_name(dataset_id)}, not {ds_name}")
    preprocessed = Path(nnUNet_preprocessed) / ds_name

    extract_fingerprints([dataset_id], num_processes=num_processes, check_dataset_integrity=True,
                         clean=True, verbose=False)
    if teacher_folder is not None:
        plans = _check_teacher_plans(Path(teacher_folder), Path(nnUNet_raw) / ds_name)
        plans["dataset_name"] = ds_name
        plans_name = plans["plans_name"]
        atomic_write_text(preprocessed / f"{plans_name}.json", json.dumps(plans, indent=4) + "\n")
        # what nnU-Net's planner would have copied for the preprocessor
        shutil.copyfile(Path(nnUNet_raw) / ds_name / "dataset.json", preprocessed / "dataset.json")
    else:
        plans_name = plan_experiments([dataset_id], planner_class, gpu_memory_target_gb)
    plans = nnunet.read_plans(preprocessed / f"{plans_name}.json")
    missing = [c for c in configurations if c not in plans["configurations"]]
    if missing:
        raise FastkdError(
            f"plans.configurations {missing} not in the plans {plans_name} of {ds_name} "
            f"(nnU-Net planned: {', '.join(plans['configurations'])}; 3d_lowres only exists "
            "when the 3d_fullres patch cannot cover the median case)")
    preprocess([dataset_id], plans_name, configurations, [num_processes], verbose=False)
    # the raw dataset's cases, listed by nnU-Net (gt_segmentations/ keeps files of removed cases)
    cases = nnunet.raw_case_ids(Path(nnUNet_raw) / ds_name)
    splits_file = preprocessed / "splits_final.json"
    if splits_file.is_file() and _split_cases(splits_file) != set(cases):
        splits_file.unlink()  # made for other cases (the holdout changed): nnU-Net would train on those
    _write_splits(preprocessed, cases)
    for configuration, manifest in zip(configurations, manifests):
        write_manifest(preprocessed, plans, configuration, cases, Path(manifest))
    return plans_name


def adopt_preprocessed(dataset: str, plans_name: str, configurations: list[str], manifests: list[Path]) -> list[str]:
    """A dataset nnU-Net preprocessed already: check every raw training case is there, write nnU-Net's
    split if none exists, and the manifests. Nothing of nnU-Net's is rewritten. Returns the cases."""
    from nnunetv2.paths import nnUNet_preprocessed, nnUNet_raw

    if len(manifests) != len(configurations):
        raise FastkdError(f"{len(configurations)} configuration(s) {configurations} but {len(manifests)} manifest path(s)")
    preprocessed = Path(nnUNet_preprocessed) / dataset
    plans_file = preprocessed / f"{plans_name}.json"
    if not plans_file.is_file():
        there = sorted(p.stem for p in preprocessed.glob("*Plans*.json")) if preprocessed.is_dir() else []
        raise FastkdError(f"{plans_file} does not exist: {dataset} is not preprocessed with the plans {plans_name} "
                          f"(plans there: {', '.join(there) or 'none'}); run nnUNetv2_plan_and_preprocess first, or "
                          "let fastkd preprocess (plans.preprocess: true)")
    plans = nnunet.read_plans(plans_file)
    cases = nnunet.raw_case_ids(Path(nnUNet_raw) / dataset)
    _write_splits(preprocessed, cases)
    for configuration, manifest in zip(configurations, manifests):
        write_manifest(preprocessed, plans, configuration, cases, Path(manifest))
    return cases


def _write_splits(preprocessed: Path, cases: list[str]) -> None:
    """nnU-Net's default split, made the way ``nnUNetTrainer.do_split`` makes it, if none exists."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits_file = preprocessed / "splits_final.json"
    if not splits_file.is_file():
        splits = generate_crossval_split(sorted(cases), seed=12345, n_splits=5)
        atomic_write_text(splits_file, json.dumps(splits, indent=4) + "\n")


def _split_cases(splits_file: Path) -> set[str]:
    splits = read_json(splits_file, "nnU-Net split", "nnU-Net writes splits_final.json when it plans the dataset")
    return {case for split in splits for part in ("train", "val") for case in split.get(part, [])}


def write_manifest(preprocessed: Path, plans: dict, configuration: str, cases: list[str], out: Path) -> dict:
    """Check every case's preprocessed arrays exist and record their shapes (read from blosc2 metadata)."""
    import blosc2

    cfg = nnunet.configuration(plans, configuration)  # FastkdError naming the configurations
    folder = preprocessed / cfg["data_identifier"]
    shapes, missing = {}, []
    for case in cases:
        image, seg = folder / f"{case}.b2nd", folder / f"{case}_seg.b2nd"
        if not (image.is_file() and seg.is_file()):
            missing.append(case)
            continue
        shapes[case] = {"shape": list(blosc2.open(str(image), mode="r").shape)}
    if missing:
        raise FastkdError(f"no preprocessed arrays of {configuration} for {len(missing)} case(s) in {folder}: "
                          f"{', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''} (preprocess them with "
                          "nnUNetv2_plan_and_preprocess, or let fastkd preprocess)")
    manifest = {
        "dataset_name": plans["dataset_name"],
        "plans_name": plans["plans_name"],
        "configuration": configuration,
        "data_identifier": cfg["data_identifier"],
        "spacing": list(cfg["spacing"]),
        "patch_size": list(cfg["patch_size"]),
        "cases": shapes,
        "nnunetv2_version": package_version("nnunetv2"),
    }
    atomic_write_text(out, json.dumps(manifest, indent=2) + "\n")
    return manifest

