"""Train one student fold: write its settings, resume what a killed run left, train, validate.

The model folder is nnU-Net's: ``$nnUNet_results/<dataset>/<trainer>__<student plans>__<cfg>/fold_<f>``
with ``plans.json``, ``dataset.json``, ``checkpoint_final.pth`` and ``validation/summary.json``
(per-class Dice), plus fastkd's ``fold_<f>/fastkd_student.json`` (the settings below) and
``fold_<f>/kd_losses.json`` (hard and KD loss per epoch). ``<trainer>`` is ``nnUNetTrainerFastKD``
(``_DA5`` with DA5), or ``nnUNetTrainerFastKDNoKD`` for the alpha = 0 baseline, so the baseline and
the distilled student of one plans file live side by side.

Settings (``fastkd_student.json``)::

    {"cache": soft-label store or null (alpha = 0), "temperature": T, "alpha": a,
     "soft_dice": w, "cauchy_schwarz": w, "epochs": n, "iterations_per_epoch": n,
     "val_iterations_per_epoch": n, "batch_size": n or null (= plans), "save_every": n,
     "rotate_every": n (0 = no fold rotation), "validation_mirroring": bool (test-time mirroring in
     the final validation), "n_splits": 5}

Resuming: when the fold folder holds a checkpoint written with the same settings, training continues
from it (final, else latest, else best: nnU-Net's ``--c`` order) with its epoch, learning rate
(nnU-Net's poly schedule is a function of the epoch), optimizer and grad-scaler state and logs. A
checkpoint written with other settings is moved aside (``fold_<f>/previous_settings/``), never
continued.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text

CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")


def make_settings(*, cache: str | Path | None, temperature: float, alpha: float, epochs: int = 1000,
                  iterations_per_epoch: int = 250, val_iterations_per_epoch: int = 50, batch_size: int | None = None,
                  save_every: int = 5, rotate_every: int = 0, soft_dice: float = 0.0, cauchy_schwarz: float = 0.0,
                  validation_mirroring: bool = True, n_splits: int = 5) -> dict:
    """Validated student settings; every error names the value and what is valid."""
    problems = []
    if not 0 <= alpha <= 1:
        problems.append(f"alpha = {alpha}: must be in [0, 1] (0 = no-KD baseline)")
    if temperature <= 0:
        problems.append(f"temperature = {temperature}: must be > 0")
    for name, value in (("epochs", epochs), ("iterations_per_epoch", iterations_per_epoch),
                        ("val_iterations_per_epoch", val_iterations_per_epoch), ("save_every", save_every)):
        if int(value) != value or value < 1:
            problems.append(f"{name} = {value}: must be an integer >= 1")
    if rotate_every < 0:
        problems.append(f"rotate_every = {rotate_every}: must be >= 0 (0 = no fold rotation)")
    if batch_size is not None and batch_size < 1:
        problems.append(f"batch_size = {batch_size}: must be >= 1 or null (the plans' batch size)")
    if soft_dice < 0 or cauchy_schwarz < 0:
        problems.append(f"soft_dice = {soft_dice}, cauchy_schwarz = {cauchy_schwarz}: weights must be >= 0")
    if alpha > 0 and cache is None:
        problems.append(f"alpha = {alpha} needs a soft-label cache (cache = null is only valid with alpha = 0)")
    if problems:
        raise FastkdError("invalid student settings:\n  - " + "\n  - ".join(problems))
    return {"cache": str(Path(cache).resolve()) if (cache is not None and alpha > 0) else None,
            "temperature": float(temperature), "alpha": float(alpha), "soft_dice": float(soft_dice),
            "cauchy_schwarz": float(cauchy_schwarz), "epochs": int(epochs),
            "iterations_per_epoch": int(iterations_per_epoch), "val_iterations_per_epoch": int(val_iterations_per_epoch),
            "batch_size": batch_size, "save_every": int(save_every), "rotate_every": int(rotate_every),
            "validation_mirroring": bool(validation_mirroring), "n_splits": int(n_splits)}


def student_fold_folder(results: str | Path, dataset_name: str, plans_name: str, configuration: str, fold,
                        kd: bool, da5: bool = False) -> Path:
    from fastkd.student import trainer_name

    return Path(results) / dataset_name / f"{trainer_name(kd, da5)}__{plans_name}__{configuration}" / f"fold_{fold}"


def prepare_fold_folder(fold_folder: Path, settings: dict) -> bool:
    """Write the settings; move checkpoints of other settings aside. Returns whether to resume."""
    from fastkd.student.trainer import SETTINGS_FILE

    fold_folder.mkdir(parents=True, exist_ok=True)
    path = fold_folder / SETTINGS_FILE
    old = json.loads(path.read_text()) if path.is_file() else None
    present = [c for c in CHECKPOINTS if (fold_folder / c).is_file()]
    if present and old != settings:
        aside = fold_folder / "previous_settings"
        shutil.rmtree(aside, ignore_errors=True)
        aside.mkdir()
        for name in [*present, SETTINGS_FILE, "kd_losses.json"]:
            if (fold_folder / name).is_file():
                (fold_folder / name).rename(aside / name)
        print(f"fastkd: {fold_folder} held checkpoints trained with other settings; moved them to {aside} "
              "and training from scratch", file=sys.stderr)
        present = []
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")
    return bool(present)


def _build_trainer(dataset_name: str, plans_name: str, configuration: str, fold, kd: bool, da5: bool, device,
                   resume: bool):
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.paths import nnUNet_preprocessed

    from fastkd.student.trainer import trainer_class

    base = Path(nnUNet_preprocessed) / dataset_name
    plans_file = base / f"{plans_name}.json"
    if not plans_file.is_file():
        raise FastkdError(f"student plans {plans_file} do not exist (write them with `fastkd student plans`); "
                          f"plans there: {', '.join(sorted(p.stem for p in base.glob('*.json'))) or 'none'}")
    plans = load_json(str(plans_file))
    if configuration not in plans["configurations"]:
        raise FastkdError(f"{plans_file} has no configuration {configuration!r} "
                          f"(it has: {', '.join(plans['configurations'])})")
    plans["continue_training"] = resume
    return trainer_class(kd, da5)(plans=plans, configuration=configuration, fold=fold,
                                  dataset_json=load_json(str(base / "dataset.json")), device=device)


def _train(trainer, resume: bool) -> Path:
    from nnunetv2.run.run_training import maybe_load_checkpoint

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

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "localhost", str(port)
    dist.init_process_group("nccl", rank=rank, world_size=world_size)
    torch.cuda.set_device(torch.device("cuda", rank))
    try:
        dataset_name, plans_name, configuration, fold, kd, da5, resume = args
        trainer = _build_trainer(dataset_name, plans_name, configuration, fold, kd, da5, torch.device("cuda"), resume)
        _train(trainer, resume)
    finally:
        dist.destroy_process_group()


def train_student(dataset: str | int, plans_name: str, configuration: str, fold, settings: dict, *,
                  da5: bool = False, device: str = "cpu", num_gpus: int = 1, resume: bool = True) -> Path:
    """Train one student fold into its nnU-Net model folder and run nnU-Net's final validation.

    ``fold``: 0-4 or ``"all"`` (every case trains; validation then runs on training cases).
    ``resume``: continue a run with the same settings (see the module docstring); False starts over.
    ``num_gpus > 1``: nnU-Net's DDP mode, one process per GPU (CUDA only). Needs the nnU-Net folder
    variables in ``os.environ``. Returns the fold folder.
    """
    import torch
    from nnunetv2.paths import nnUNet_results
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    if device == "cuda" and not torch.cuda.is_available():
        raise FastkdError("device = 'cuda' but torch sees no CUDA GPU; use 'cpu' or run on a GPU node")
    if num_gpus > 1 and (device != "cuda" or torch.cuda.device_count() < num_gpus):
        raise FastkdError(f"num_gpus = {num_gpus} needs device = 'cuda' and {num_gpus} visible GPUs "
                          f"(device = {device!r}, torch sees {torch.cuda.device_count() if torch.cuda.is_available() else 0})")
    if fold != "all" and int(fold) not in range(settings.get("n_splits", 5)):
        raise FastkdError(f"fold = {fold!r}: must be 0-{settings.get('n_splits', 5) - 1} or 'all'")
    fold = fold if fold == "all" else int(fold)
    dataset_name = maybe_convert_to_dataset_name(dataset)
    kd = settings["alpha"] > 0
    folder = student_fold_folder(nnUNet_results, dataset_name, plans_name, configuration, fold, kd, da5)
    if not resume:
        for name in CHECKPOINTS:
            (folder / name).unlink(missing_ok=True)
    resume = prepare_fold_folder(folder, settings)
    if num_gpus > 1:
        import socket

        import torch.multiprocessing as mp

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        mp.spawn(_ddp_worker, args=(num_gpus, port, (dataset_name, plans_name, configuration, fold, kd, da5, resume)),
                 nprocs=num_gpus, join=True)
        return folder
    trainer = _build_trainer(dataset_name, plans_name, configuration, fold, kd, da5, torch.device(device), resume)
    return _train(trainer, resume)
