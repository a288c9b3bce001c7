"""The student: plans derived from the teachers' (:mod:`.plans`), the KD loss (:mod:`.loss`), the
loader that reads cached soft labels at nnU-Net's patch boxes (:mod:`.loader`), the nnU-Net trainer
classes that put them together (:mod:`.trainers`) and the driver of one fold (:mod:`.run`).

Here, free of torch imports (the CLI checks fold folders before it imports nnU-Net): the names of the
files in a student's fold folder, and how a displaced run is kept. The trainers' names and the students
of a sweep: :mod:`fastkd.sweep`.
"""

from __future__ import annotations

from pathlib import Path

#: the student's settings, beside its checkpoints (written by :func:`fastkd.student.run.student_settings`)
SETTINGS_FILE = "fastkd_student.json"
#: hard and KD part of the training loss per epoch (KD students only)
KD_LOSSES_FILE = "kd_losses.json"
#: nnU-Net's checkpoints, in the order its ``--c`` resumes from them
CHECKPOINTS = ("checkpoint_final.pth", "checkpoint_latest.pth", "checkpoint_best.pth")
#: what a training run leaves in its fold folder; moved aside together when a new run displaces it
RUN_FILES = (*CHECKPOINTS, KD_LOSSES_FILE, "validation")
#: nnU-Net's cross-validation: folds 0-4 of ``splits_final.json``
N_SPLITS = 5


def move_aside(fold_folder: Path, names, aside: str) -> Path | None:
    """Move the files and folders ``names`` that ``fold_folder`` holds into a new folder ``fold_folder/<aside>``.

    Nothing is ever deleted: when ``<aside>`` exists from an earlier move, ``<aside>.1``, ``<aside>.2``,
    ... is used. Returns the folder, or None when none of the files was there.
    """
    present = [name for name in names if (fold_folder / name).exists()]
    if not present:
        return None
    target, n = fold_folder / aside, 0
    while target.exists():
        n += 1
        target = fold_folder / f"{aside}.{n}"
    target.mkdir()
    for name in present:
        (fold_folder / name).rename(target / name)
    return target
