"""``fastkd report summary``: the pages of the Snakemake report that no single stage writes.

What each model costs and how fast it runs, beside the Dice tables and the state of the soft-label cache,
gathered from what the stages wrote:

- **models**: parameters and FLOPs of one forward pass on one patch of every model (the teachers, each
  student and no-KD baseline), counted on the network nnU-Net builds from the model folder's
  ``plans.json`` (:func:`fastkd.student.plans.count_parameters_and_flops`: 2 x multiply-adds of every
  conv and transposed conv, deep supervision off), its checkpoint size and its ONNX export's size;
- **speed**: seconds per case of every prediction of the evaluation (``fastkd_predict.json``, the whole
  ``fastkd predict`` run over its cases), and the speed-up over the teacher ensemble of the same case set;
- **dice**: the Dice table of every case set (``evaluation/<set>/dice.json``), as HTML;
- **cache**: the soft-label cache's size on disk (``fastkd cache info``) and ``fastkd cache verify``'s
  verdict (every chunk read back: checksums, values, sums, shapes);
- **curves**: nnU-Net's ``progress.png`` (loss, pseudo-Dice, learning rate, epoch time per epoch) of every
  fold given, where the fold has one (folds trained elsewhere may not).

Snakemake's report shows images and HTML pages (a TSV is only a download there), so every table is
written twice: TSV for tools, HTML (self-contained, inline style) for the report.

Layout (``fastkd_work/<ds>/report/``)::

    models.tsv    one row per model: model, model_folder, network, r, folds, patch_size, features_per_stage,
                  parameters, gflops_per_patch, teacher_params_ratio, teacher_flops_ratio (the first
                  model's parameters and FLOPs over this one's), checkpoint_mb, onnx_mb (each the mean over
                  the model's folds; onnx_mb '-' without exports)
    models.html   the same table (the model folders listed below it)
    models.png    parameters, GFLOPs per patch and MB on disk (checkpoint, ONNX) per model
    speed.tsv     one row per case set and prediction: case_set, model, kind, backend, device, folds,
                  mirroring, tile_batch, cases, seconds_total, seconds_per_case, speedup (the teacher
                  ensemble's seconds per case over this one's, '-' where the set has no teacher row)
    speed.html    the same table
    dice.html     the Dice table of every case set: model, kind, r, Dice per class, mean Dice, s / case (whole
                  run) and network s / case
    cache.tsv     one row per soft-label cache: store, complete, cases, expected_cases, dtype, temperature, bytes, logical_bytes,
                  float32_bytes, compression, verify ('ok' or the number of problems), problems ('; '-joined)
    cache.html    the same, with every problem on its own line
    curves/<model folder>__fold_<f>.png   each fold's progress.png, scaled to 900 pixels wide

Inputs are named on the command line (``LABEL=PATH``); a missing or unreadable one is an error naming
the file, and nothing is written.
"""

from __future__ import annotations

import html
import os
import re
import shutil
from pathlib import Path

from fastkd import nnunet
from fastkd.errors import FastkdError
from fastkd.evaluate import KINDS, PREDICT_RECORD, SPEED_HEADS, format_cell as _fmt
from fastkd.io import atomic_write_text, read_json

TEACHER_ENSEMBLE = KINDS[0]
CURVE_WIDTH = 900  # pixels of the training-curve copies
MODEL_COLUMNS = ("model", "model_folder", "network", "r", "folds", "patch_size", "features_per_stage", "parameters",
                 "gflops_per_patch", "teacher_params_ratio", "teacher_flops_ratio", "checkpoint_mb", "onnx_mb")
SPEED_COLUMNS = ("case_set", "model", "kind", "backend", "device", "folds", "mirroring", "tile_batch", "cases",
                 "seconds_total", "seconds_per_case", "speedup")
CACHE_COLUMNS = ("store", "complete", "cases", "expected_cases", "dtype", "temperature", "bytes", "logical_bytes",
                 "float32_bytes", "compression", "verify", "problems")


def parse_pairs(values: list[str], what: str) -> list[tuple[str, Path]]:
    """``LABEL=PATH`` strings -> (label, path) pairs, in order."""
    pairs = []
    for text in values:
        label, sep, path = text.partition("=")
        if not sep or not label or not path:
            raise FastkdError(f"{text!r}: expected LABEL={what}, e.g. 'KD r2=nnUNet_results/<ds>/<model>/fold_0/"
                              "checkpoint_final.pth'")
        pairs.append((label, Path(path)))
    return pairs


def _grouped(pairs: list[tuple[str, Path]]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for label, path in pairs:
        groups.setdefault(label, []).append(path)
    return groups


def _file_size(path: Path, what: str) -> int:
    if not path.is_file():
        raise FastkdError(f"{what} {path} does not exist")
    return path.stat().st_size


# -- models: size and cost --------------------------------------------------------------------------
def model_rows(checkpoints: list[tuple[str, Path]], onnx: list[tuple[str, Path]] = ()) -> list[dict]:
    """One row per label of ``checkpoints`` (``(label, fold_<f>/<checkpoint>)``; several folds of one model
    folder share a label): the network nnU-Net builds from the folder's plans and dataset.json, counted,
    and the mean size of its folds' checkpoints and (``onnx``: ``(label, file)``) ONNX exports.
    The first model is the reference of the ratio columns (the teachers, as the workflow passes them)."""
    from fastkd.student.plans import count_parameters_and_flops

    models, exports = _grouped(checkpoints), _grouped(onnx)
    if not models:
        raise FastkdError("no models given (LABEL=CHECKPOINT ...)")
    unknown = sorted(set(exports) - set(models))
    if unknown:
        raise FastkdError(f"ONNX exports of {unknown}, which are no model given (models: {', '.join(models)})")
    rows = []
    for label, files in models.items():
        folders = sorted({str(f.parent.parent) for f in files})
        if len(folders) > 1:
            raise FastkdError(f"{label}: checkpoints of several model folders ({', '.join(folders)}); give each "
                              "model folder its own label")
        folder = Path(folders[0])
        parts = folder.name.split("__")
        if len(parts) != 3:
            raise FastkdError(f"{label}: {folder} is no nnU-Net model folder (named <trainer>__<plans>__<configuration>)")
        plans = nnunet.read_plans(folder / "plans.json")
        counted = count_parameters_and_flops(plans, nnunet.read_dataset_json(folder), parts[2])
        checkpoint_bytes = [_file_size(f, f"{label}: checkpoint") for f in files]
        onnx_bytes = [_file_size(f, f"{label}: ONNX export") for f in exports.get(label, [])]
        rows.append({
            "model": label, "model_folder": str(folder), "network": nnunet.network_name(plans, parts[2]),
            "r": (plans.get("fastkd") or {}).get("reduction_factor"),
            "folds": [f.parent.name.removeprefix("fold_") for f in files],
            "patch_size": counted["patch_size"], "features_per_stage": counted["features_per_stage"],
            "parameters": counted["parameters"], "flops": counted["flops"],
            "checkpoint_bytes": sum(checkpoint_bytes) / len(checkpoint_bytes),
            "onnx_bytes": sum(onnx_bytes) / len(onnx_bytes) if onnx_bytes else None,
        })
    for row in rows:
        row["teacher_params_ratio"] = rows[0]["parameters"] / row["parameters"]
        row["teacher_flops_ratio"] = rows[0]["flops"] / row["flops"]
    return rows


def _model_cells(row: dict) -> list[str]:
    return [row["model"], row["model_folder"], row["network"], _fmt(row["r"]), _fmt(row["folds"]),
            "x".join(map(str, row["patch_size"])), _fmt(row["features_per_stage"]), str(row["parameters"]),
            _fmt(row["flops"] / 1e9, 3), _fmt(row["teacher_params_ratio"], 2), _fmt(row["teacher_flops_ratio"], 2),
            _fmt(row["checkpoint_bytes"] / 1e6, 2),
            "-" if row["onnx_bytes"] is None else _fmt(row["onnx_bytes"] / 1e6, 2)]


# -- evaluation: Dice and speed ---------------------------------------------------------------------
TABLE_KEYS = {"case_set", "classes", "rows", "cases", "optimistic"}
ROW_KEYS = {"label", "short", "kind", "r", "dice", "mean_dice", "seconds_per_case"}


def read_evaluation(dice_json: str | Path) -> dict:
    """One case set's evaluation table (``dice.json``), each row with the record of its prediction
    (``predictions/<label>/fastkd_predict.json`` beside it, the layout of :mod:`fastkd.evaluate`)."""
    dice_json = Path(dice_json)
    table = read_json(dice_json, "evaluation table", "`fastkd evaluate table` writes it (the evaluate rule)")
    if not isinstance(table, dict) or not TABLE_KEYS <= set(table) or not all(
            isinstance(row, dict) and ROW_KEYS <= set(row) for row in table["rows"]):
        raise FastkdError(f"{dice_json} is not an evaluation table (it needs {', '.join(sorted(TABLE_KEYS))}, and rows "
                          f"with {', '.join(sorted(ROW_KEYS))})")
    for row in table["rows"]:
        record = dice_json.parent / "predictions" / row["label"] / PREDICT_RECORD
        row["record"] = read_json(record, "prediction record", "`fastkd predict` writes it last; run the prediction "
                                  "again")
        if "seconds_per_case" not in row["record"]:
            raise FastkdError(f"{record} has no seconds_per_case (not written by `fastkd predict`)")
    return table


def speed_rows(tables: list[dict]) -> list[dict]:
    """Seconds per case of every prediction, and the speed-up over its case set's teacher ensemble."""
    rows = []
    for table in tables:
        teacher = next((r["record"]["seconds_per_case"] for r in table["rows"] if r["kind"] == TEACHER_ENSEMBLE), None)
        for row in table["rows"]:
            rec = row["record"]
            rows.append({"case_set": table["case_set"], "model": row["short"], "kind": row["kind"],
                         "backend": rec.get("backend"), "device": rec.get("device"), "folds": rec.get("folds"),
                         "mirroring": rec.get("mirroring"), "tile_batch": rec.get("tile_batch"),
                         "cases": rec.get("cases"), "seconds_total": rec.get("seconds_total"),
                         "seconds_per_case": rec["seconds_per_case"],
                         "speedup": teacher / rec["seconds_per_case"] if teacher and rec["seconds_per_case"] else None})
    return rows


def _speed_cells(row: dict) -> list[str]:
    return [row["case_set"], row["model"], row["kind"], _fmt(row["backend"]), _fmt(row["device"]), _fmt(row["folds"]),
            _fmt(row["mirroring"]), _fmt(row["tile_batch"]), _fmt(row["cases"]), _fmt(row["seconds_total"], 2),
            _fmt(row["seconds_per_case"], 3), "-" if row["speedup"] is None else _fmt(row["speedup"], 2)]


def _dice_cells(table: dict) -> list[list[str]]:
    names = table["classes"]
    head = ["model", "kind", "r", *(f"Dice {n}" for n in names), "mean Dice", *SPEED_HEADS]
    return [head] + [[row["short"], row["kind"], _fmt(row["r"]), *(_fmt(row["dice"][n], 4) for n in names),
                      _fmt(row["mean_dice"], 4), _fmt(row["seconds_per_case"], 2),
                      _fmt(row.get("network_seconds_per_case"), 3)] for row in table["rows"]]


def _group_cells(table: dict) -> list[list[str]] | None:
    """Mean ± sample standard deviation over the seeds of each setting (None without repeats)."""
    groups, names = table.get("groups") or [], table["classes"]
    if not any(g["n"] > 1 for g in groups):
        return None
    head = ["setting", "seeds", *(f"Dice {n}" for n in names), "mean Dice", *SPEED_HEADS]
    return [head] + [[g["label"], str(g["n"]), *(f"{c['mean']:.4f} ± {c['sd']:.4f}" for c in
                                                 [*(g["dice"][n] for n in names), g["mean_dice"]]),
                      _fmt(g["seconds_per_case"]["mean"], 2),
                      _fmt((g.get("network_seconds_per_case") or {}).get("mean"), 3)] for g in groups]


def _dice_section(table: dict) -> str:
    section = f"<h2>{html.escape(_dice_title(table))}</h2>\n{html_table(_dice_cells(table))}"
    for note in table.get("notes") or []:  # weak teachers, in words (fastkd.evaluate.weak_teacher_lines)
        section += f"\n<p><b>{html.escape(note)}</b></p>"
    groups = _group_cells(table)
    if groups:
        section += "\n<p>Mean ± sample standard deviation over the seeds of each setting:</p>\n" + html_table(groups)
    return section


def _dice_title(table: dict) -> str:
    return (f"{table['case_set']}: {len(table['cases'])} cases, "
            + ("OPTIMISTIC: the teachers (and through them the students) saw these cases in training"
               if table["optimistic"] else "none of them seen in training by any model"))


# -- the soft-label cache ---------------------------------------------------------------------------
def cache_status(store: str | Path, preprocessed: str | Path | None = None) -> dict:
    """``fastkd cache info`` (cases, bytes on disk) and ``fastkd cache verify`` (problems; empty: all good)."""
    from fastkd.cache import info, verify

    report = info(store)
    problems = verify(store, preprocessed)
    provenance = report["provenance"] or {}
    return {"store": str(store), "complete": report["complete"], "cases": report["n_cases"],
            "expected_cases": report["expected_cases"], "dtype": provenance.get("dtype"),
            "temperature": provenance.get("temperature"), "bytes": report["bytes"],
            "logical_bytes": report["logical_bytes"], "float32_bytes": report["float32_bytes"],
            "compression": report["compression_ratio"], "verify": _problems(problems),
            "problems": problems, "unlabelled": report["n_unlabelled"]}


def _problems(problems: list[str]) -> str:
    return "ok" if not problems else f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"


def _cache_cells(status: dict) -> list[str]:
    return [status["store"], _fmt(status["complete"]), str(status["cases"]), _fmt(status["expected_cases"]),
            _fmt(status["dtype"]), _fmt(status["temperature"], 2), str(status["bytes"]), str(status["logical_bytes"]),
            str(status["float32_bytes"]), _fmt(status["compression"], 2), status["verify"], "; ".join(status["problems"])]


def _cache_html_cells(status: dict) -> list[list[str]]:
    def mb(n):
        return f"{n / 1e6:.2f} MB ({n:,} bytes)"

    expected = status["expected_cases"]
    return [["soft-label cache", status["store"]],
            ["complete (root written)", _fmt(status["complete"])],
            ["cases", f"{status['cases']}" + (f" of {expected}" if expected is not None else "")
             + f" ({status['cases'] - status['unlabelled']} labelled, {status['unlabelled']} unlabelled images)"],
            ["dtype", _fmt(status["dtype"])], ["temperature", _fmt(status["temperature"], 2)],
            ["on disk", mb(status["bytes"])], ["uncompressed", mb(status["logical_bytes"])],
            ["as float32", mb(status["float32_bytes"])],
            ["compression", "-" if status["compression"] is None else f"{status['compression']:.2f}x"],
            ["fastkd cache verify", status["verify"]]]


# -- training curves --------------------------------------------------------------------------------
def copy_curves(checkpoints: list[tuple[str, Path]], out: str | Path) -> tuple[list[Path], list[Path]]:
    """Copy each fold's ``progress.png`` to ``out/<model folder>__<fold folder>.png``, scaled to
    ``CURVE_WIDTH`` pixels wide (nnU-Net draws it 3000 x 5400; the report shows images at their own size).
    The folder is filled beside ``out`` and renamed into place. Returns (copies, folds without one)."""
    from PIL import Image

    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    copies, missing = [], []
    try:
        for _, checkpoint in checkpoints:
            fold = checkpoint.parent
            progress = fold / "progress.png"
            if not progress.is_file():
                missing.append(fold)
                continue
            name = f"{fold.parent.name}__{fold.name}.png"
            try:
                with Image.open(progress) as image:
                    if image.width > CURVE_WIDTH:
                        image = image.resize((CURVE_WIDTH, round(image.height * CURVE_WIDTH / image.width)),
                                             Image.Resampling.LANCZOS)
                    image.save(tmp / name, format="PNG")
            except OSError as e:
                raise FastkdError(f"{progress} is not a readable PNG ({e}); nnU-Net's trainer writes it every epoch") \
                    from None
            copies.append(out / name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return copies, missing


# -- writing ----------------------------------------------------------------------------------------
def _tsv(header, rows: list[list[str]]) -> str:
    return "".join("\t".join(cells) + "\n" for cells in [list(header), *rows])


STYLE = ("body{font-family:sans-serif;font-size:14px;margin:16px;color:#1e293b}"
         "table{border-collapse:collapse;margin:8px 0 20px}"
         "th,td{border:1px solid #cbd5e1;padding:4px 8px;text-align:left;white-space:nowrap}"
         "th{background:#e2e8f0;white-space:normal;vertical-align:bottom}td.n{text-align:right}"
         "h1{font-size:18px}h2{font-size:15px;margin-top:18px}.bad{color:#b91c1c;font-weight:bold}"
         ".ok{color:#15803d;font-weight:bold}")


NUMBER = re.compile(r"^[-+]?[\d,]*\.?\d+(e[-+]?\d+)?$|^-$|^nan$")


def html_table(cells: list[list[str]]) -> str:
    """``cells``: header, then rows; every cell is escaped, numbers are right-aligned."""
    head, *body = cells
    lines = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
    lines += ["<tr>" + "".join(('<td class="n">' if NUMBER.match(c) else "<td>") + f"{html.escape(c)}</td>" for c in row)
              + "</tr>" for row in body]
    return "\n".join(lines + ["</table>"])


def html_page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def _models_figure(rows: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [row["model"] for row in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    axes[0].bar(x, [row["parameters"] / 1e6 for row in rows], color="tab:blue")
    axes[0].set(title="parameters", ylabel="million")
    axes[1].bar(x, [row["flops"] / 1e9 for row in rows], color="tab:orange")
    axes[1].set(title="GFLOPs per patch (one forward, one network)", ylabel="GFLOPs")
    axes[2].bar(x - 0.2, [row["checkpoint_bytes"] / 1e6 for row in rows], 0.4, label="checkpoint (.pth)")
    axes[2].bar(x + 0.2, [(row["onnx_bytes"] or 0) / 1e6 for row in rows], 0.4, label="ONNX export")
    axes[2].set(title="size on disk (mean over folds)", ylabel="MB")
    axes[2].legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, labels, rotation=20, ha="right")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.{os.getpid()}.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


def write_summary(out: str | Path, checkpoints: list[tuple[str, Path]], onnx: list[tuple[str, Path]] = (),
                  evaluations: list[str | Path] = (), caches: list[str | Path] = (),
                  preprocessed: str | Path | None = None, title: str = "") -> dict:
    """Read every input first (a bad one is an error before anything but the curves' temporary folder is
    written), then write the layout of this module into ``out``. ``caches``: every soft-label cache the
    students read (one per temperature and fold selection of a sweep), one row each.

    Returns ``{"models", "speed", "evaluations", "caches", "curves", "no_curves"}``."""
    out = Path(out)
    models = model_rows(checkpoints, onnx)
    tables = [read_evaluation(f) for f in evaluations]
    speed = speed_rows(tables)
    statuses = [cache_status(c, preprocessed) for c in caches]
    copies, missing = copy_curves(checkpoints, out / "curves")
    prefix = f"{title}: " if title else ""

    model_cells = [_model_cells(row) for row in models]
    atomic_write_text(out / "models.tsv", _tsv(MODEL_COLUMNS, model_cells))
    head = ["model", "network", "r", "folds", "patch", "features per stage", "parameters", "GFLOPs / patch",
            "teacher / this: params", "teacher / this: FLOPs", "checkpoint MB", "ONNX MB"]
    shown = [[cells[0], *cells[2:7], f"{row['parameters']:,}", *cells[8:]] for row, cells in zip(models, model_cells)]
    folders = "<p>Model folders:</p>\n<ul>" + "".join(
        f"<li>{html.escape(row['model'])}: {html.escape(row['model_folder'])}</li>" for row in models) + "</ul>"
    atomic_write_text(out / "models.html", html_page(f"{prefix}model size and cost",
                                                     html_table([head, *shown]) + "\n" + folders))
    _models_figure(models, out / "models.png", f"{prefix}model size and cost")

    speed_cells = [_speed_cells(row) for row in speed]
    atomic_write_text(out / "speed.tsv", _tsv(SPEED_COLUMNS, speed_cells))
    head = ["case set", "model", "kind", "backend", "device", "folds", "mirroring", "tile batch", "cases",
            "s total", "s / case", "speed-up vs teachers"]
    none = "<p>No evaluation tables given.</p>"
    atomic_write_text(out / "speed.html", html_page(f"{prefix}inference speed",
                                                    html_table([head, *speed_cells]) if speed else none))
    dice = "\n".join(_dice_section(t) for t in tables)
    atomic_write_text(out / "dice.html", html_page(f"{prefix}Dice per class", dice or none))

    atomic_write_text(out / "cache.tsv", _tsv(CACHE_COLUMNS, [_cache_cells(status) for status in statuses]))
    bodies = []
    for status in statuses:
        verdict = ('<p class="ok">fastkd cache verify: OK, every chunk of every case read back (checksums, values, '
                   'sums to one, shapes)</p>' if not status["problems"] else
                   f'<p class="bad">fastkd cache verify: {status["verify"]}</p>\n<ul>'
                   + "".join(f"<li>{html.escape(p)}</li>" for p in status["problems"]) + "</ul>")
        bodies.append(f"<h2>{html.escape(Path(status['store']).name)}</h2>\n{verdict}\n"
                      + html_table(_cache_html_cells(status)))
    atomic_write_text(out / "cache.html", html_page(f"{prefix}soft-label cache{'s' * (len(statuses) > 1)}",
                                                    "\n".join(bodies) or "<p>No soft-label cache given.</p>"))
    return {"models": models, "speed": speed, "evaluations": tables, "caches": statuses, "curves": copies,
            "no_curves": missing}
