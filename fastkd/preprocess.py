"""nnU-Net planning and preprocessing, through nnU-Net's own API (fingerprint, planner, preprocessor),
or a dataset preprocessed already (``plans.preprocess: false``: ``nnUNetv2_plan_and_preprocess`` ran).

What it writes besides nnU-Net's own files (plans, fingerprint, ``<data_identifier>/`` arrays):

- ``nnUNet_preprocessed/<ds>/splits_final.json``: nnU-Net's seeded 5-fold split, made here once
  (exactly as the trainer would make it) so that teacher folds training in parallel do not race to
  write it. An existing file (a custom split) is kept.
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
from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text, package_version


def training_cases(config: dict) -> list[str]:
    """The cases the workflow preprocesses, known at parse time: the demo's from its config, a real
    dataset's from its dataset.json (never from a checkpoint rule, so Snakemake tracks every case)."""
    if config["dataset"]["raw"] == "demo":
        from fastkd.demo_data import case_ids

        return case_ids(config["dataset"]["demo"]["n_cases"])
    return nnunet.raw_case_ids(config["dataset"]["raw"])


def link_raw_dataset(source: Path, raw_dataset: Path) -> None:
    """Make ``nnUNet_raw/<ds>`` show the raw dataset at ``source`` (a symlink unless it is the same folder)."""
    source, raw_dataset = Path(source), Path(raw_dataset)
    if not (source / "dataset.json").is_file():
        raise FastkdError(f"raw dataset {source} has no dataset.json (give an nnU-Net raw dataset folder)")
    if raw_dataset.is_symlink():
        if raw_dataset.resolve() == source.resolve():
            return
        raw_dataset.unlink()  # the config now points elsewhere
    elif raw_dataset.exists():
        if raw_dataset.resolve() == source.resolve():
            return
        raise FastkdError(f"{raw_dataset} already exists and is not {source}; remove it or use another paths.nnunet_raw")
    raw_dataset.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(source.resolve(), raw_dataset, target_is_directory=True)


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
                    gpu_memory_target_gb: float | None) -> str:
    """Fingerprint, plan (or adopt an external teacher folder's plans), preprocess, split, write manifests.

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
    link_raw_dataset(raw_source, Path(nnUNet_raw) / ds_name)
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

