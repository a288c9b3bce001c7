"""Teacher ensemble: train nnU-Net folds here, or validate a folder of teachers trained elsewhere.

Teachers are plain nnU-Net models. :func:`train_teacher` drives nnU-Net's own trainer class (stock
``nnUNetTrainer`` by default, any trainer nnU-Net can find by name) with a schedule from the config,
so the model folder is exactly what ``nnUNetv2_train`` writes and stock ``nnUNetv2_predict`` loads it.

The teacher manifest (``fastkd_work/<ds>/teachers/<folder>.json``, written by
:func:`write_manifest`) is what later stages depend on::

    {"model_folder": abs path, "trainer": str, "plans_name": str, "configuration": str,
     "data_identifier": str, "checkpoint": str, "labels": {...},
     "folds": {"0": {"checkpoint": abs path, "sha256": hex, "bytes": int}, ...},
     "fastkd_version": str, "nnunetv2_version": str}

A changed checkpoint changes its sha256 and so the manifest's content.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from fastkd import nnunet
from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text, package_version, sha256


class TeacherFolderError(FastkdError):
    """An nnU-Net model folder lacks what the config asks of it; the message lists what was found."""


def teacher_sets(config: dict, folder: Path) -> list[dict]:
    """Every teacher folder of the soft-label ensemble: the teachers (in ``folder``), then ``teachers.extra``.

    Each: ``name`` (folder name, also its manifest's), ``folder``, ``configuration``, ``folds``,
    ``checkpoint``, ``weight``.
    """
    t = config["teachers"]
    sets = [{"name": Path(folder).name, "folder": Path(folder), "configuration": t["configuration"],
             "folds": t["folds"], "checkpoint": t["checkpoint"], "weight": t["weight"]}]
    for extra in t["extra"]:
        sets.append({"name": Path(extra["model_folder"]).name, "folder": Path(extra["model_folder"]),
                     "configuration": extra["configuration"] or t["configuration"], "folds": extra["folds"],
                     "checkpoint": extra["checkpoint"], "weight": extra["weight"]})
    return sets


def teacher_set_id(sets: list[dict]) -> str:
    """Eight hex digits naming a teacher set (folders as spelled, configurations, folds, checkpoints, weights).

    A retrained checkpoint keeps the id: its new sha256 reaches the cache through the teacher
    manifest (a newer input reruns the soft-label jobs, which recompute every case whose recorded
    checkpoint hashes differ).
    """
    key = [[str(s["folder"]), s["configuration"], sorted(s["folds"]), s["checkpoint"], float(s["weight"])]
           for s in sets]
    return hashlib.sha1(json.dumps(key).encode()).hexdigest()[:8]


def validate_model_folder(folder: str | Path, configuration: str, folds: list[int], checkpoint: str) -> dict:
    """Check an nnU-Net model folder holds plans, dataset.json and every fold's checkpoint.

    Returns the folder's plans. Raises :class:`TeacherFolderError` naming what is missing and
    listing what was found.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise TeacherFolderError(f"{folder} is not a directory (expected an nnU-Net model folder "
                                 "Trainer__Plans__configuration with plans.json, dataset.json and fold_X/)")
    missing_files = [n for n in ("plans.json", "dataset.json") if not (folder / n).is_file()]
    if missing_files:
        present = sorted(p.name for p in folder.iterdir())
        raise TeacherFolderError(f"{folder} lacks {', '.join(missing_files)} (found: {', '.join(present) or 'nothing'})")
    plans = nnunet.read_plans(folder / "plans.json")
    if configuration not in plans["configurations"]:
        raise TeacherFolderError(
            f"{folder}/plans.json has no configuration {configuration!r} "
            f"(it has: {', '.join(plans['configurations']) or 'none'}); set teachers.configuration")
    found = nnunet.found_folds(folder)
    problems = [f"fold_{f}/{checkpoint}" for f in folds if checkpoint not in found.get(f"fold_{f}", [])]
    if problems:
        raise TeacherFolderError(f"{folder} is missing {', '.join(problems)} (found: {nnunet.describe_folds(folder)})")
    return plans


def folds_with(folder: str | Path, checkpoint: str) -> list[int]:
    """The folds of a model folder that hold ``checkpoint``."""
    found = nnunet.found_folds(folder)
    return [f for f in range(5) if checkpoint in found.get(f"fold_{f}", [])]


def write_manifest(folder: str | Path, configuration: str, folds: list[int], checkpoint: str, out: str | Path) -> dict:
    """Validate the teacher folder and write its manifest (atomically) to ``out``."""
    import fastkd

    folder = Path(folder).resolve()
    plans = validate_model_folder(folder, configuration, folds, checkpoint)
    manifest = {
        "model_folder": str(folder),
        "trainer": nnunet.model_folder_trainer(folder),
        "plans_name": plans["plans_name"],
        "configuration": configuration,
        "data_identifier": nnunet.data_identifier(plans, configuration),
        "checkpoint": checkpoint,
        "labels": nnunet.read_dataset_json(folder)["labels"],
        "folds": {},
        "fastkd_version": fastkd.__version__,
        "nnunetv2_version": package_version("nnunetv2"),
    }
    for fold in folds:
        ckpt = folder / f"fold_{fold}" / checkpoint
        manifest["folds"][str(fold)] = {"checkpoint": str(ckpt), "sha256": sha256(ckpt), "bytes": ckpt.stat().st_size}
    atomic_write_text(out, json.dumps(manifest, indent=2) + "\n")
    return manifest


def train_teacher(dataset: str | int, configuration: str, fold: int, plans_name: str, trainer_name: str, *,
                  schedule: dict, device: str, resume: bool = True, validation_mirroring: bool = True) -> Path:
    """Train one teacher fold with nnU-Net's trainer and run its final validation.

    ``schedule``: the config's ``teachers.schedule`` block (epochs, iterations_per_epoch,
    val_iterations_per_epoch, batch_size or None, save_every). ``resume``: continue from ``checkpoint_latest.pth`` if a killed run left one (written every
    ``save_every`` epochs), so a kill loses at most that many epochs. ``validation_mirroring=False``: the
    final validation without test-time mirroring (the checkpoint, written before it, keeps nnU-Net's
    mirroring axes, so every later prediction mirrors as usual). Returns the fold folder.
    Needs the nnU-Net folder variables in ``os.environ`` (see :meth:`fastkd.paths.Paths.nnunet_env`).
    """
    from nnunetv2.run.run_training import get_trainer_from_args

    from fastkd.device import torch_device

    on = torch_device(device, "teachers.device")

    def make_trainer():
        trainer = get_trainer_from_args(str(dataset), configuration, fold, trainer_name, plans_name,
                                        device=on)
        trainer.num_epochs = schedule["epochs"]
        trainer.num_iterations_per_epoch = schedule["iterations_per_epoch"]
        trainer.num_val_iterations_per_epoch = schedule["val_iterations_per_epoch"]
        trainer.save_every = schedule["save_every"]
        if schedule["batch_size"] is not None:
            # the trainer's private copy of the configuration: plans.json keeps the planned batch size
            trainer.configuration_manager.configuration["batch_size"] = schedule["batch_size"]
        return trainer

    trainer = make_trainer()
    latest = Path(trainer.output_folder) / "checkpoint_latest.pth"
    if resume and latest.is_file():
        try:
            trainer.load_checkpoint(str(latest))
            print(f"fastkd: resuming fold {fold} from {latest} at epoch {trainer.current_epoch}", file=sys.stderr)
        except Exception as e:  # a kill during torch.save leaves a truncated file: start over
            print(f"fastkd: cannot resume from {latest} ({e}); training fold {fold} from scratch", file=sys.stderr)
            latest.unlink()
            trainer = make_trainer()
    trainer.run_training()
    axes = trainer.inference_allowed_mirroring_axes
    if not validation_mirroring:
        trainer.inference_allowed_mirroring_axes = None
    try:
        trainer.perform_actual_validation(save_probabilities=False)
    finally:
        trainer.inference_allowed_mirroring_axes = axes
    return Path(trainer.output_folder)
