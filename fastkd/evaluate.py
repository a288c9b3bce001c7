"""``fastkd evaluate``: how good and how fast each model is, on labelled cases none of them trained on.

Models, each predicted by ``fastkd predict`` (so every model goes through nnU-Net's preprocessing, sliding
window and resampling, and is timed the same way):

- ``teachers``: the teacher ensemble as nnU-Net predicts by default, every teacher fold with test-time
  mirroring (``nnUNetv2_predict``'s defaults);
- ``<student model folder>__fold_<f>``: each student fold (KD) and its no-KD baseline
  (``evaluation.mirroring`` for both, so they are compared like with like).

Case sets (``evaluation_sets``):

- ``test``: ``evaluation.test_images`` / ``test_labels`` (the demo writes ``imagesTs``/``labelsTs``),
  checked to share no case with the training cases; or the cases ``dataset.holdout`` holds back from a
  real dataset's labelled cases (nnU-Net never sees them: :mod:`fastkd.preprocess`);
- ``fold_<f>_validation``, without a test set: the validation cases of student fold ``f`` (nnU-Net's
  ``splits_final.json``). The table is marked **optimistic**: 4 of the 5 teacher folds trained on these
  cases, and the students learnt from those teachers' soft labels.

Dice per class is nnU-Net's own evaluation (``compute_metrics_on_folder``; labels, or regions for region
datasets); seconds per case is the wall time of the whole ``fastkd predict`` run (loading, preprocessing,
network, resampling, writing, and its start-up: importing torch and nnU-Net, loading the model) over the
number of cases, from its ``fastkd_predict.json``; beside it, network seconds per case: the network's
forwards alone (``seconds_network_per_case`` of the record; '-' for a record written before fastkd
recorded it). On a few cases the start-up dominates the whole run, so the two can differ by far: compare
models by network seconds for the network's speed, by whole-run seconds for what a user waits.

Layout (``fastkd_work/<ds>/evaluation/<set>/``)::

    cases/images/<case>_<ch><fe>, cases/labels/<case><fe>   links to the raw cases of a validation set, or
                                                 of the held-out test set (dataset.holdout)
    predictions/<label>/<case><fe>               segmentations (nnU-Net naming and geometry)
    predictions/<label>/fastkd_predict.json      written last by ``fastkd predict``: the prediction is complete
    summaries/<label>.json                       nnU-Net's summary.json of that model (per case and mean)
    dice.tsv      one row per model: label, kind, r, temperature, alpha, loss, scales, class_balanced,
                  folds_per_case, seed (students' settings; '-' for the teachers), folds, mirroring,
                  Dice per class, mean, seconds_per_case (whole run), network_seconds_per_case, cases,
                  optimistic
    dice.json     the same rows plus the case set, the case list, the label and prediction folders,
                  "groups": per setting, the mean and sample standard deviation over its seeds, and
                  "notes": a sentence per class on which the teacher ensemble is below a no-KD baseline
    dice.md       the table as Markdown (README command 1 prints it), the notes in bold, and a mean ± sd
                  table when a setting has several seeds (student.seeds)
    dice.png      Dice per class and model; mean Dice against seconds per case (whole run: filled marker;
                  network only: hollow marker of the same colour)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from fastkd import nnunet
from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text, read_json
from fastkd.cases import case_files
from fastkd.sweep import TAGGED

PREDICT_RECORD = "fastkd_predict.json"  # written last by `fastkd predict`
KINDS = ("teacher ensemble", "student (KD)", "no-KD baseline")
#: the speed columns of the Markdown tables: whole-run and network seconds per case, so neither is mistaken for the other
SPEED_HEADS = ("s / case (whole run)", "network s / case")


# -- cases of a linked case set -------------------------------------------------------------------
def write_validation_cases(splits_file: str | Path, fold: int, raw_dataset: str | Path, images: str | Path,
                           labels: str | Path) -> list[str]:
    """Link the raw images and labels of fold ``fold``'s validation cases into ``images`` / ``labels``."""
    splits = read_json(splits_file, "nnU-Net split", "nnU-Net writes splits_final.json when it plans the dataset")
    if not isinstance(splits, list) or not 0 <= int(fold) < len(splits):
        raise FastkdError(f"{splits_file}: no fold {fold} (it lists {len(splits) if isinstance(splits, list) else 0})")
    return link_cases(splits[int(fold)]["val"], raw_dataset, images, labels)


def link_cases(cases: list[str], raw_dataset: str | Path, images: str | Path, labels: str | Path) -> list[str]:
    """Link the images and labels of ``cases`` (from the raw dataset's ``imagesTr``/``labelsTr``) into
    ``images`` / ``labels``, replacing what they held; nothing is linked unless every file is there.
    Returns the cases, sorted."""
    raw_dataset = Path(raw_dataset)
    dataset_json = nnunet.read_dataset_json(raw_dataset)
    cases = sorted(cases)
    if not cases:
        raise FastkdError(f"no cases to link from {raw_dataset}")
    links = {}
    for case in cases:
        names, label = case_files(dataset_json, case)
        links.update({Path(images) / name: raw_dataset / "imagesTr" / name for name in names})
        links[Path(labels) / label] = raw_dataset / "labelsTr" / label
    missing = [str(source) for source in links.values() if not source.is_file()]
    if missing:
        raise FastkdError(f"{len(missing)} file(s) of the cases to link are missing from {raw_dataset}: "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    for folder in (images, labels):
        shutil.rmtree(folder, ignore_errors=True)
        Path(folder).mkdir(parents=True)
    for link, source in links.items():
        os.symlink(source.resolve(), link)
    return cases


# -- the table --------------------------------------------------------------------------------------
#: a student's training settings shown in the table (from its fold's fastkd_student.json; None: teachers)
SETTING_KEYS = tuple(name for name, _ in TAGGED)  # temperature, alpha, ..., unlabelled_share, seed


def _model_row(label: str, record: dict) -> dict:
    """What kind of model a prediction came from: its model folder's trainer and plans say it, and a
    student's settings file its KD settings (SETTING_KEYS) and seed."""
    from fastkd.student import SETTINGS_FILE

    folder = Path(record["model"])
    trainer = folder.name.split("__")[0]
    plans = nnunet.read_plans(folder / "plans.json") if (folder / "plans.json").is_file() else {}
    r = (plans.get("fastkd") or {}).get("reduction_factor")
    kind = (KINDS[2] if trainer.startswith("nnUNetTrainerFastKDNoKD") else
            KINDS[1] if trainer.startswith("nnUNetTrainerFastKD") else KINDS[0])
    folds = record["folds"]
    settings = dict.fromkeys(SETTING_KEYS)
    if kind != KINDS[0]:
        found = folder / f"fold_{folds[0]}" / SETTINGS_FILE
        written = json.loads(found.read_text()) if found.is_file() else {}
        settings.update({k: written.get(k) for k in SETTING_KEYS})
    row = {"label": label, "kind": kind, "r": r, **settings, "model": str(folder), "folds": record["folds"],
           "mirroring": record["mirroring"], "seconds_per_case": record["seconds_per_case"],
           "network_seconds_per_case": record.get("seconds_network_per_case")}
    return {**row, "short": _short(row)}


def _short(row: dict, seed: bool = True) -> str:
    """A row's model in words: ``teacher ensemble (5 folds)``, ``KD r4 T1 oof s1 fold 0`` (``seed=False``:
    the name of its setting over the seeds)."""
    from fastkd.sweep import settings_tag

    folds = row["folds"]
    if row["kind"] == KINDS[0]:
        return f"teacher ensemble ({len(folds)} fold{'s' if len(folds) > 1 else ''})"
    kd = row["kind"] == KINDS[1]
    tag = settings_tag(kd, {**{k: row.get(k) for k in SETTING_KEYS}, "seed": row.get("seed") if seed else None})
    return " ".join([f"{'KD' if kd else 'no-KD'} r{row['r']}", *filter(None, tag.split("_"))]) + \
        f" fold {','.join(map(str, folds))}"


def seed_groups(rows: list[dict], names: list[str]) -> list[dict]:
    """The rows of one setting (kind, r, T, alpha, soft-label folds, student folds) over their seeds: the mean
    and sample standard deviation (0 for one seed) of each class's Dice, the mean Dice and seconds per case
    (whole run, and network where every seed's record has it)."""
    import statistics

    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        key = (row["kind"], row["r"], *(row.get(k) for k in SETTING_KEYS if k != "seed"), tuple(row["folds"]))
        groups.setdefault(key, []).append(row)

    def stats(values):
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    out = []
    for (kind, r, *values, folds), members in groups.items():
        settings = dict(zip([k for k in SETTING_KEYS if k != "seed"], values))
        out.append({"label": _short(members[0], seed=False), "kind": kind, "r": r, **settings,
                    "folds": list(folds), "seeds": [m.get("seed") for m in members], "n": len(members),
                    "dice": {n: stats([m["dice"][n] for m in members]) for n in names},
                    "mean_dice": stats([m["mean_dice"] for m in members]),
                    "seconds_per_case": stats([m["seconds_per_case"] for m in members]),
                    "network_seconds_per_case": stats([m["network_seconds_per_case"] for m in members])
                    if all(m.get("network_seconds_per_case") is not None for m in members) else None})
    return out


def evaluate(labels: str | Path, predictions: list[str | Path], out: str | Path, *, dataset_json: dict,
             optimistic: bool, case_set: str = "", num_processes: int = 2) -> list[dict]:
    """Score every prediction folder against ``labels`` with nnU-Net's evaluation; write the table.

    ``predictions``: folders written by ``fastkd predict`` (the folder name is the row's label). A folder
    without its ``fastkd_predict.json`` (a killed prediction) or with other cases than ``labels`` is an
    error, never a row. ``out``: the evaluation folder (``dice.*`` and ``summaries/`` are written there).
    """
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels, out = Path(labels), Path(out)
    ending = dataset_json["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in labels.glob(f"*{ending}"))
    if not cases:
        raise FastkdError(f"{labels}: no label maps ending in {ending}")
    label_manager = LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    classes = label_manager.foreground_regions if label_manager.has_regions else label_manager.foreground_labels
    names = _class_names(dataset_json, classes)
    reader = determine_reader_writer_from_dataset_json(dataset_json, str(labels / f"{cases[0]}{ending}"))()
    rows = []
    (out / "summaries").mkdir(parents=True, exist_ok=True)
    for folder in map(Path, predictions):
        record_file = folder / PREDICT_RECORD
        if not record_file.is_file():
            raise FastkdError(f"{folder}: no {PREDICT_RECORD}, so its prediction did not finish; run it again")
        record = read_json(record_file, "prediction record", "`fastkd predict` writes it last")
        predicted = sorted(p.name[: -len(ending)] for p in folder.glob(f"*{ending}"))
        if predicted != cases:
            extra, lacking = sorted(set(predicted) - set(cases)), sorted(set(cases) - set(predicted))
            raise FastkdError(f"{folder}: predicted cases differ from the labels in {labels}: "
                              f"missing {lacking[:5] or 'none'}, not labelled {extra[:5] or 'none'}")
        summary = out / "summaries" / f"{folder.name}.json"
        result = compute_metrics_on_folder(str(labels), str(folder), str(summary), reader, ending, classes,
                                           label_manager.ignore_label, num_processes=num_processes, chill=False)
        row = _model_row(folder.name, record)
        row["dice"] = {name: float(result["mean"][c]["Dice"]) for name, c in zip(names, classes)}
        row["mean_dice"] = float(result["foreground_mean"]["Dice"])
        row["cases"] = len(cases)
        row["optimistic"] = optimistic
        rows.append(row)
    rows.sort(key=lambda row: (KINDS.index(row["kind"]), row["r"] or 0, row["label"]))
    groups = seed_groups(rows, names)
    _write_tables(rows, names, out, {"case_set": case_set, "optimistic": optimistic, "cases": cases,
                                     "labels": str(labels), "classes": names, "groups": groups,
                                     "notes": weak_teacher_lines(rows, groups, names)})
    return rows


def _class_names(dataset_json: dict, classes: list) -> list[str]:
    by_value = {}
    for name, value in dataset_json["labels"].items():
        by_value.setdefault(tuple(value) if isinstance(value, (list, tuple)) else value, name)
    return [by_value.get(tuple(c) if isinstance(c, (list, tuple)) else c, str(c)) for c in classes]


def format_cell(value, digits: int = 4) -> str:
    """One table cell: '-' for None, lower-case booleans, floats to ``digits``, lists comma-joined."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return "nan" if value != value else f"{value:.{digits}f}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def table_lines(rows: list[dict], names: list[str], sep: str = "\t") -> list[str]:
    head = ["model", "kind", "r", *SETTING_KEYS, "folds", "mirroring", *(f"dice_{n}" for n in names), "mean_dice",
            "seconds_per_case", "network_seconds_per_case", "cases", "optimistic"]
    lines = [sep.join(head)]
    for row in rows:
        lines.append(sep.join([row["label"], row["kind"], format_cell(row["r"]),
                               *(format_cell(row.get(k)) for k in SETTING_KEYS),
                               format_cell(row["folds"]), format_cell(row["mirroring"]),
                               *(format_cell(row["dice"][n]) for n in names), format_cell(row["mean_dice"]),
                               format_cell(row["seconds_per_case"], 3), format_cell(row.get("network_seconds_per_case"), 3),
                               str(row["cases"]), format_cell(row["optimistic"])]))
    return lines


def markdown(rows: list[dict], names: list[str], meta: dict) -> str:
    cols = ["model", "kind", "r", *(f"Dice {n}" for n in names), "mean Dice", *SPEED_HEADS]
    lines = [f"Evaluation on {meta['case_set'] or 'the test set'} ({len(meta['cases'])} cases)"
             + (" - OPTIMISTIC: the teachers (and through them the students) saw these cases in training"
                if meta["optimistic"] else ", none of them seen in training by any model"),
             "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        lines.append("| " + " | ".join([row["label"], row["kind"], format_cell(row["r"]),
                                        *(format_cell(row["dice"][n], 3) for n in names), format_cell(row["mean_dice"], 3),
                                        format_cell(row["seconds_per_case"], 2),
                                        format_cell(row.get("network_seconds_per_case"), 3)]) + " |")
    groups = meta.get("groups") or []
    notes = meta.get("notes") or []
    if notes:
        lines += [""] + [f"**{note.split(': ', 1)[0]}**: {note.split(': ', 1)[1]}" for note in notes]
    if any(g["n"] > 1 for g in groups):  # repeats (student.seeds): mean and spread, to tell a difference from noise
        cols = ["setting", "seeds", *(f"Dice {n}" for n in names), "mean Dice", *SPEED_HEADS]
        lines += ["", "Mean ± sample standard deviation over the seeds of each setting", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for g in groups:
            cells = [g["dice"][n] for n in names] + [g["mean_dice"]]
            lines.append("| " + " | ".join([g["label"], str(g["n"]), *(f"{c['mean']:.3f} ± {c['sd']:.3f}" for c in cells),
                                            f"{g['seconds_per_case']['mean']:.2f}",
                                            "-" if g.get("network_seconds_per_case") is None else
                                            f"{g['network_seconds_per_case']['mean']:.3f}"]) + " |")
    return "\n".join(lines) + "\n"


def weak_teacher_lines(rows: list[dict], groups: list[dict], names: list[str]) -> list[str]:
    """A sentence per class on which the teacher ensemble is below a no-KD baseline (its mean over seeds):
    :func:`fastkd.student.report.weak_teacher_notes`."""
    from fastkd.student.report import weak_teacher_notes

    teachers = [r for r in rows if r["kind"] == KINDS[0]]
    baselines = [g for g in groups if g["kind"] == KINDS[2]]
    notes = []
    for teacher in teachers:
        for g in baselines:
            seeds = f" (mean of {g['n']} seeds)" if g["n"] > 1 else ""
            notes += weak_teacher_notes({n: teacher["dice"][n] for n in names},
                                        {n: g["dice"][n]["mean"] for n in names}, "the " + teacher["short"],
                                        f"the {g['label']}{seeds}")
    return notes


def _write_tables(rows: list[dict], names: list[str], out: Path, meta: dict) -> None:
    atomic_write_text(out / "dice.json", json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    atomic_write_text(out / "dice.md", markdown(rows, names, meta))
    _figure(rows, names, out / "dice.png", meta)
    atomic_write_text(out / "dice.tsv", "\n".join(table_lines(rows, names)) + "\n")  # last: the rule's output


def _figure(rows: list[dict], names: list[str], png: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (bars, speed) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(len(rows), 1)
    x = np.arange(len(names))
    for i, row in enumerate(rows):
        bars.bar(x + (i - (len(rows) - 1) / 2) * width, [row["dice"][n] for n in names], width, label=row["short"])
        dot = speed.scatter(row["seconds_per_case"], row["mean_dice"], s=60, label=row["short"])
        if row.get("network_seconds_per_case"):
            speed.scatter(row["network_seconds_per_case"], row["mean_dice"], s=60, facecolors="none",
                          edgecolors=dot.get_facecolor())
    bars.set_xticks(x, names)
    bars.set_ylim(0, 1.25)  # room for the legend above the bars
    bars.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    bars.set_ylabel("Dice (mean over cases)")
    title = f"{meta['case_set']}: {len(meta['cases'])} cases" + (" (optimistic)" if meta["optimistic"] else "")
    bars.set_title(title)
    bars.legend(fontsize=8, loc="upper right")
    speed.set_xscale("log")
    speed.set_xlabel("seconds per case: filled = whole fastkd predict run, hollow = network only")
    speed.set_ylabel("mean foreground Dice")
    speed.set_ylim(0, 1)
    speed.set_title("quality against speed")
    speed.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, png)
