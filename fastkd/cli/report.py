"""``fastkd report``: the tables and figures of the Snakemake report."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage


def add_parser(sub) -> None:
    stage = _stage(sub, "report", "tables and figures of the Snakemake report")
    p = stage.add_parser("summary", help="size and FLOPs of every model, inference speed, Dice tables, soft-label cache "
                                         "status (TSV and HTML), a size figure and nnU-Net's training curves")
    p.add_argument("models", nargs="+", metavar="LABEL=CHECKPOINT",
                   help="every fold's checkpoint, e.g. teachers=nnUNet_results/<ds>/<model>/fold_0/checkpoint_final.pth; "
                        "folds with the same label are one model; the first model is the reference of the ratios")
    p.add_argument("--onnx", nargs="+", default=[], metavar="LABEL=ONNX", help="ONNX exports of the models, by label")
    p.add_argument("--evaluation", type=Path, nargs="+", default=[], metavar="DICE_JSON",
                   help="dice.json of each evaluated case set (written by `fastkd evaluate table`)")
    p.add_argument("--cache", type=Path, nargs="*", default=[],
                   help="the soft-label caches (*.zarr; one per temperature and fold selection): size and verify status")
    p.add_argument("--preprocessed", type=Path, default=None,
                   help="folder of the preprocessed <case>.b2nd for the cache check (default: recorded in the cache)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder to write (layout: fastkd/report.py)")
    p.add_argument("--title", default="", help="prefix of the page titles, e.g. the dataset")
    p.set_defaults(func=_report_summary)


def _report_summary(args) -> None:
    from fastkd.report import parse_pairs, write_summary

    result = write_summary(args.output, parse_pairs(args.models, "CHECKPOINT"), parse_pairs(args.onnx, "ONNX"),
                           args.evaluation, args.cache, args.preprocessed, args.title)
    for fold in result["no_curves"]:
        print(f"{fold}: no progress.png (a fold trained elsewhere), no training curves")
    caches = result["caches"]
    print(f"wrote {args.output}: {len(result['models'])} models, {len(result['speed'])} predictions of "
          f"{len(result['evaluations'])} case sets, {len(result['curves'])} training curves"
          + "".join(f"; soft-label cache {Path(c['store']).name}: verify {c['verify']}" for c in caches))
