"""One picture per reduction factor: training curves and the Dice table of teachers, students, baselines.

Inputs are nnU-Net fold folders (``fold_<f>`` of any model folder): the curves come from the logger
nnU-Net stores in ``checkpoint_final.pth`` (train/validation loss and pseudo-Dice per epoch) and, for
distilled students, fastkd's ``kd_losses.json`` (hard and KD part of the training loss); the table
comes from nnU-Net's final validation, ``validation/summary.json`` (Dice per class on the fold's
validation cases). The table is also written as TSV (one row per model, one column per class, the
foreground mean, then ``optimistic``: ``true`` where the student trainer noted in ``summary.json``
that the validation scored cases the model trained on, i.e. fold ``all`` or fold rotation across
splits; see :func:`fastkd.student.trainers.validation_note`). The picture's table marks those rows
``<label> (optimistic)``.

Weak teachers are named (:func:`weak_teacher_notes`): where a teacher fold scores below the no-KD baseline
of the same fold on a class, the picture says so in words under its title, and the command prints it,
because distillation cannot add what the teachers do not know. The evaluation table does the same for the
teacher ensemble against the baseline's mean over seeds (:mod:`fastkd.evaluate`).
"""

from __future__ import annotations

import json
from pathlib import Path

from fastkd.errors import FastkdError
from fastkd.paths import VALIDATION_SUMMARY
from fastkd.student import KD_LOSSES_FILE


def _label(text: str) -> tuple[str, Path]:
    if "=" not in text:
        raise FastkdError(f"{text!r}: expected LABEL=FOLD_FOLDER (e.g. student=nnUNet_results/.../fold_0)")
    label, folder = text.split("=", 1)
    return label, Path(folder)


def load_model(label: str, fold_folder: Path) -> dict:
    """Curves and Dice of one trained fold (the checkpoint loaded safely); errors name the missing file."""
    from fastkd.nnunet import load_checkpoint

    summary = fold_folder / VALIDATION_SUMMARY
    if not summary.is_file():
        raise FastkdError(f"{label}: {summary} is missing (the fold's final validation has not run)")
    s = json.loads(summary.read_text())
    row = {"label": label, "kind": _kind(fold_folder), "dice": {k: v["Dice"] for k, v in s["mean"].items()},
           "mean": s["foreground_mean"]["Dice"], "optimistic": s.get("fastkd", {}).get("optimistic", False)}
    checkpoint = fold_folder / "checkpoint_final.pth"
    if checkpoint.is_file():
        log = load_checkpoint(checkpoint)["logging"]
        row["train_loss"] = [float(v) for v in log["train_losses"]]
        row["val_loss"] = [float(v) for v in log["val_losses"]]
        row["pseudo_dice"] = [float(v) for v in log["mean_fg_dice"]]
    parts = fold_folder / KD_LOSSES_FILE
    if parts.is_file():
        row["kd_loss"] = [r["kd_loss"] for r in json.loads(parts.read_text())]
    return row


def weak_teacher_notes(teacher: dict[str, float], baseline: dict[str, float], teacher_name: str,
                       baseline_name: str) -> list[str]:
    """One sentence per class on which ``teacher`` (Dice per class) is below ``baseline`` (the no-KD
    student's Dice per class, or its mean over seeds); none when the teachers are ahead everywhere."""
    below = [c for c in teacher if c in baseline and teacher[c] < baseline[c]]
    return [f"Weak teachers: {teacher_name} has Dice {teacher[c]:.3f} on {c}, below {baseline_name}'s {baseline[c]:.3f}; "
            "distillation cannot add what the teachers do not know (train the teachers longer, or keep the "
            "no-KD student for this class)" for c in below]


def _kind(fold_folder: Path) -> str:
    """``teacher``, ``kd`` or ``baseline``, from the model folder's trainer name."""
    trainer = Path(fold_folder).resolve().parent.name.split("__")[0]
    if trainer.startswith("nnUNetTrainerFastKDNoKD"):
        return "baseline"
    return "kd" if trainer.startswith("nnUNetTrainerFastKD") else "teacher"


def report_notes(rows: list[dict]) -> list[str]:
    """:func:`weak_teacher_notes` of every teacher fold against every no-KD baseline of this report (their final
    validations score the same cases when they are the same fold)."""
    notes = []
    for teacher in (r for r in rows if r["kind"] == "teacher"):
        for baseline in (r for r in rows if r["kind"] == "baseline"):
            notes += weak_teacher_notes(teacher["dice"], baseline["dice"], teacher["label"], baseline["label"])
    return notes


def table_cells(rows: list[dict]) -> list[list[str]]:
    """Header and one row per model: label, Dice per class, foreground mean, optimistic."""
    classes = sorted({c for r in rows for c in r["dice"]}, key=lambda c: (len(c), c))
    return [["model", *[f"Dice {c}" for c in classes], "mean", "optimistic"]] + [
        [r["label"], *[f"{r['dice'].get(c, float('nan')):.4f}" for c in classes], f"{r['mean']:.4f}",
         "true" if r["optimistic"] else "false"] for r in rows]


def dice_table(rows: list[dict]) -> str:
    """The TSV."""
    return "".join("\t".join(line) + "\n" for line in table_cells(rows))


def figure_cells(rows: list[dict]) -> list[list[str]]:
    """The picture's table: the TSV's, with optimistic rows marked in the label instead of a column."""
    (*header, _), *body = table_cells(rows)
    return [header] + [[label + (" (optimistic)" if optimistic == "true" else ""), *values]
                       for label, *values, optimistic in body]


def write_report(models: list[str], out_png: str | Path, out_tsv: str | Path, title: str = "") -> list[dict]:
    """``models``: ``LABEL=FOLD_FOLDER`` each. Writes the PNG and the TSV; returns the rows (and names weak
    teachers in the picture: :func:`report_notes`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastkd.io import atomic_write_text

    if not models:
        raise FastkdError("no models given (LABEL=FOLD_FOLDER ...)")
    rows = [load_model(*_label(m)) for m in models]
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), gridspec_kw={"width_ratios": [1, 1, 1.3]})
    for r in rows:
        if "train_loss" in r:
            line, = axes[0].plot(r["train_loss"], marker="o", ms=3, label=f"{r['label']} train")
            axes[0].plot(r["val_loss"], ls=":", color=line.get_color(), label=f"{r['label']} val")
            if "kd_loss" in r:
                axes[0].plot(r["kd_loss"], ls="--", color=line.get_color(), label=f"{r['label']} KD part")
            axes[1].plot(r["pseudo_dice"], marker="o", ms=3, color=line.get_color(), label=r["label"])
    axes[0].set(title="loss per epoch", xlabel="epoch")
    axes[1].set(title="validation pseudo-Dice (foreground mean)", xlabel="epoch", ylim=(0, 1))
    for ax in axes[:2]:
        if ax.get_legend_handles_labels()[0]:  # models without a checkpoint have no curves
            ax.legend(fontsize=7)
    cells = figure_cells(rows)
    axes[2].axis("off")
    axes[2].set_title("final validation Dice (nnU-Net summary.json)")
    t = axes[2].table(cellText=cells[1:], colLabels=cells[0], loc="center")
    t.auto_set_font_size(False)
    t.set_fontsize(8)
    t.scale(1, 1.4)
    notes = report_notes(rows)
    fig.suptitle("\n".join([title, *notes]) if notes else title, fontsize=9 if notes else None,
                 color="firebrick" if notes else None)
    fig.tight_layout()
    out_png, out_tsv = Path(out_png), Path(out_tsv)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(out_png)
    atomic_write_text(out_tsv, dice_table(rows))
    return rows
