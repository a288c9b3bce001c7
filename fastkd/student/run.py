"""Train one student fold: write its settings, resume what a killed run left, train, validate.

The model folder is nnU-Net's: ``$nnUNet_results/<dataset>/<trainer>__<student plans>__<cfg>/fold_<f>``
with ``plans.json``, ``dataset.json``, ``checkpoint_final.pth`` and ``validation/summary.json``
(per-class Dice, plus fastkd's note whether that validation is optimistic), plus fastkd's
``fold_<f>/fastkd_student.json`` (the settings below) and ``fold_<f>/kd_losses.json`` (hard and KD
loss per epoch). ``<trainer>`` is ``nnUNetTrainerFastKD`` (``_DA5`` with DA5), or
``nnUNetTrainerFastKDNoKD`` for the alpha = 0 baseline, so the baseline and the distilled student of
one plans file live side by side (the classes: :mod:`fastkd.student.trainers`). The students of a sweep
add a tag of the settings that differ from their defaults (:func:`fastkd.sweep.student_tag`), e.g.
``nnUNetTrainerFastKD_T1_a0.7_oof_s1`` (T = 1, alpha = 0.7, out-of-fold soft labels, seed 1).

Settings (``fastkd_student.json``), made by :func:`student_settings` from the validated workflow
config (``workflow/schemas/config.schema.yaml`` documents and checks every value)::

    {"cache": "/abs/path/of/the/soft-label/store.zarr",   # null for the baseline
     "alpha": distillation.alpha,                          # 0.0 for the baseline
     "loss": distillation.loss,                            # KD students only: additive | convex
     "scales": distillation.scales,                        # KD students only: full | all
     "class_balanced": distillation.class_balanced,        # KD students only
     "seed": student.seeds (this student's one seed),
     "temperature": distillation.temperature,              # KD students only
     "folds_per_case": softlabels.folds_per_case,          # KD students only: the soft labels' teacher folds
     "teachers": {"<teacher folder>": {"<fold>": sha256}}, # KD students: the checkpoints the cache's
                                                           # soft labels came from (once it is complete)
     "soft_dice": w, "cauchy_schwarz": w,                  # KD students only (KD_KEYS)
     "unlabelled_share": s,                                # KD students only: share of unlabelled samples
     "unlabelled_cases": {"n", "sha256"},                  # KD students with s > 0: the cache's unlabelled
                                                           # cases (their count, sha256 of the sorted names)
     "validation_mirroring": bool,                         # test-time mirroring in the final validation
     "schedule": {"epochs": n, "iterations_per_epoch": n, "val_iterations_per_epoch": n,
                  "batch_size": n or null (= the plans'), "save_every": n,
                  "rotate_every": n (0 = no fold rotation)},
     ...}                                                  # any other key of the config's student block

that is, the config's ``student`` block without the keys that choose which student trains, where, and
whether it resumes (:data:`RUN_KEYS`: they name the model folder or steer the job, not the training),
plus the distillation settings. The baseline's settings hold nothing that only distillation uses, so a
temperature or KD-weight sweep leaves the baseline's settings, and so its checkpoints, alone.

The teacher checkpoints are part of the settings because a retrained teacher keeps the cache's path
(its soft labels are rewritten in place): a student trained on the old soft labels must start over,
not continue from its ``checkpoint_final.pth``.

Resuming: when the fold folder holds a checkpoint written with the same settings, training continues
from it (final, else latest, else best: nnU-Net's ``--c`` order) with its epoch, learning rate
(nnU-Net's poly schedule is a function of the epoch), optimizer and grad-scaler state and logs. A
checkpoint written with other settings is moved aside (``fold_<f>/previous_settings/``), never
continued. Without resuming (``resume=False``) the old checkpoints stay where they are until the new
run has started training; then they move to ``fold_<f>/previous_run/``. Nothing is deleted: a
folder of that name from an earlier move makes the next one ``previous_run.1``, and so on.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from fastkd.cache import root_attrs
from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text
from fastkd.student import CHECKPOINTS, N_SPLITS, RUN_FILES, SETTINGS_FILE, move_aside
from fastkd.sweep import one, trainer_name

#: keys of the config's student block that choose which student trains, where, and what the job does with
#: an earlier run (``resume``: an argument of :func:`train_student`), not how the student learns
RUN_KEYS = ("folds", "baseline", "plans", "block_strategy", "augmentation", "device", "num_gpus", "resume", "seeds")
#: keys of the student block that only distillation uses (meaningless for the no-KD baseline)
KD_KEYS = ("soft_dice", "cauchy_schwarz", "unlabelled_share")


def student_settings(config: dict, cache: str | Path | None, kd: bool) -> dict:
    """The settings of the KD student (``kd``) or of the no-KD baseline from a validated fastkd config.

    ``cache``: the soft-label store the KD student reads (ignored for the baseline). The schema has
    checked every value; what is left are the checks across values.
    """
    alpha = one(config, "distillation.alpha")
    if kd and alpha == 0:
        raise FastkdError("distillation.alpha = 0: a KD student needs alpha > 0 (alpha = 0 is the no-KD baseline)")
    if kd and cache is None:
        raise FastkdError(f"distillation.alpha = {alpha} needs a soft-label cache (cache = None is only valid for "
                          "the no-KD baseline)")
    distillation = {"cache": str(Path(cache).resolve()), "alpha": alpha,
                    "temperature": one(config, "distillation.temperature"),
                    "loss": one(config, "distillation.loss"), "scales": one(config, "distillation.scales"),
                    "class_balanced": one(config, "distillation.class_balanced"),
                    "folds_per_case": one(config, "softlabels.folds_per_case")} if kd else {"cache": None, "alpha": 0.0}
    distillation["seed"] = one(config, "student.seeds")
    root = root_attrs(cache) if kd else None
    if root and root.get("complete"):
        distillation["teachers"] = {t["name"]: t["sha256"] for t in root["provenance"]["teachers"]}
        if one(config, "student.unlabelled_share") > 0:  # another set of unlabelled images: train again
            import hashlib

            names = sorted(root.get("unlabelled", []))
            distillation["unlabelled_cases"] = {"n": len(names),
                                                "sha256": hashlib.sha256("\n".join(names).encode()).hexdigest()}
    return {**distillation, **{k: copy.deepcopy(v) for k, v in config["student"].items()
                               if k not in RUN_KEYS and (kd or k not in KD_KEYS)}}


def student_fold_folder(results: str | Path, dataset_name: str, plans_name: str, configuration: str, fold,
                        kd: bool, da5: bool = False, tag: str = "") -> Path:
    from fastkd.nnunet import model_folder_name

    folder = model_folder_name(trainer_name(kd, da5, tag), plans_name, configuration)
    return Path(results) / dataset_name / folder / f"fold_{fold}"


def same_settings(old: dict | None, new: dict) -> bool:
    """Whether a run of the settings ``old`` continues as one of ``new``: equal but for the folder the
    soft-label store lies in (the store's name holds its settings, ``teachers`` its teachers' checkpoints),
    so that a work folder copied or moved elsewhere keeps its students."""
    def where_free(settings):
        cache = settings.get("cache")
        return {**settings, "cache": Path(cache).name if cache else cache}

    return old is not None and where_free(old) == where_free(new)


def prepare_fold_folder(fold_folder: Path, settings: dict) -> bool:
    """Write the settings; move a run of other settings aside. Returns whether there is a run to resume."""
    fold_folder.mkdir(parents=True, exist_ok=True)
    path = fold_folder / SETTINGS_FILE
    old = json.loads(path.read_text()) if path.is_file() else None
    present = [c for c in CHECKPOINTS if (fold_folder / c).is_file()]
    if present and not same_settings(old, settings):
        aside = move_aside(fold_folder, [*RUN_FILES, SETTINGS_FILE], "previous_settings")
        print(f"fastkd: {fold_folder} held checkpoints trained with other settings; moved them to {aside} "
              "and training from scratch", file=sys.stderr)
        present = []
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    return bool(present)


def fold_state(fold_folder: Path, settings: dict, resume: bool) -> str:
    """What :func:`train_student` will do with the fold folder, in words (nothing is changed)."""
    present = [c for c in CHECKPOINTS if (Path(fold_folder) / c).is_file()]
    if not present:
        return "new"
    old = Path(fold_folder) / SETTINGS_FILE
    if not (old.is_file() and same_settings(json.loads(old.read_text()), settings)):
        return "start over: its checkpoints were trained with other settings; they move to previous_settings/"
    if not resume:
        return f"start over: without resuming, {', '.join(present)} move to previous_run/ once training starts"
    return f"continue from {present[0]}"


def _build_trainer(dataset_name: str, plans_name: str, configuration: str, fold, kd: bool, da5: bool, device,
                   resume: bool, tag: str = ""):
    from nnunetv2.paths import nnUNet_preprocessed

    from fastkd.nnunet import configuration as check_configuration, read_dataset_json, read_plans
    from fastkd.student.trainers import trainer_class

    base = Path(nnUNet_preprocessed) / dataset_name
    plans_file = base / f"{plans_name}.json"
    if not plans_file.is_file():
        raise FastkdError(f"student plans {plans_file} do not exist (write them with `fastkd student plans`); "
                          f"plans there: {', '.join(sorted(p.stem for p in base.glob('*.json'))) or 'none'}")
    plans = read_plans(plans_file)
    check_configuration(plans, configuration)  # FastkdError naming the configurations the plans have
    plans["continue_training"] = resume
    return trainer_class(kd, da5, tag)(plans=plans, configuration=configuration, fold=fold,
                                  dataset_json=read_dataset_json(base), device=device)


def _train(trainer, resume: bool) -> Path:
    from nnunetv2.run.run_training import maybe_load_checkpoint

    from fastkd.nnunet import safe_unpickling

    with safe_unpickling():  # the checkpoint nnU-Net resumes must be plain data
        maybe_load_checkpoint(trainer, resume, False)
    if resume:
        print(f"fastkd: resuming {trainer.output_folder} at epoch {trainer.current_epoch}", file=sys.stderr)
    trainer.run_training()
    trainer.perform_actual_validation(save_probabilities=False)
    return Path(trainer.output_folder)


def _ddp_worker(rank: int, world_size: int, port: int, args: tuple) -> None:
    import os

    import torch
    import torch.distributed as dist

    from fastkd.device import torch_device

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "localhost", str(port)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(torch.device("cuda", rank))
    try:
        dataset_name, plans_name, configuration, fold, kd, da5, resume, tag, seed = args
        device = torch_device("cuda", "student.device")  # a spawned process: set up CUDA here too
        seed_everything(seed + rank)
        trainer = _build_trainer(dataset_name, plans_name, configuration, fold, kd, da5, device, resume, tag)
        _train(trainer, resume)
    finally:
        dist.destroy_process_group()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators: the weight initialisation, and nnU-Net's patch sampling
    and augmentation (numpy, in this process or in the loader processes nnU-Net forks afterwards)."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_student(dataset: str | int, plans_name: str, configuration: str, fold, settings: dict, *,
                  da5: bool = False, device: str = "cpu", num_gpus: int = 1, resume: bool = True,
                  tag: str = "") -> Path:
    """Train one student fold into its nnU-Net model folder and run nnU-Net's final validation.

    ``fold``: 0-4 or ``"all"`` (every case trains; validation then runs on training cases).
    ``settings``: :func:`student_settings`. ``resume``: continue a run with the same settings (see the
    module docstring); False starts over and moves the old run to ``previous_run/`` once training starts.
    ``num_gpus > 1``: nnU-Net's DDP mode, one process per GPU (CUDA only). Needs the nnU-Net folder
    variables in ``os.environ``. Returns the fold folder.
    """
    import torch
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    from fastkd.device import torch_device

    on = torch_device(device, "student.device")
    if num_gpus > 1 and (device != "cuda" or torch.cuda.device_count() < num_gpus):
        raise FastkdError(f"num_gpus = {num_gpus} needs device = 'cuda' and {num_gpus} visible GPUs "
                          f"(device = {device!r}, torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    if fold != "all" and int(fold) not in range(N_SPLITS):
        raise FastkdError(f"fold = {fold!r}: must be 0-{N_SPLITS - 1} or 'all'")
    fold = fold if fold == "all" else int(fold)
    dataset_name = maybe_convert_to_dataset_name(dataset)
    kd = settings["alpha"] > 0
    folder = student_fold_folder(nnUNet_results, dataset_name, plans_name, configuration, fold, kd, da5, tag)
    resume = prepare_fold_folder(folder, settings) and resume
    if num_gpus > 1:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_worker, args=(num_gpus, port, (dataset_name, plans_name, configuration, fold, kd, da5, resume, tag,
                                                      settings["seed"])),
                 nprocs=num_gpus, join=True)
        return folder
    seed_everything(settings["seed"])
    trainer = _build_trainer(dataset_name, plans_name, configuration, fold, kd, da5, on, resume, tag)
    return _train(trainer, resume)
