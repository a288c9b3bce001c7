"""``fastkd evaluate``: link the cases to evaluate on, score predictions into a Dice table."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage, positive_int, set_threads
from fastkd.errors import FastkdError


def add_parser(sub) -> None:
    stage = _stage(sub, "evaluate", "Dice and speed of the teacher ensemble, students and baselines on held-out cases")
    p = stage.add_parser("cases", help="link one fold's validation cases, or the given cases (images and labels) "
                                       "for evaluation")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--splits", type=Path, help="nnU-Net's splits_final.json (with -f: that fold's validation cases)")
    which.add_argument("--cases", nargs="+", metavar="CASE", help="these cases, e.g. dataset.holdout's test cases")
    p.add_argument("-f", "--fold", type=int, choices=range(5), help="the student fold (with --splits)")
    p.add_argument("--raw", type=Path, required=True, help="the raw dataset folder (imagesTr/, labelsTr/)")
    p.add_argument("--images", type=Path, required=True, help="folder to link the images into")
    p.add_argument("--labels", type=Path, required=True, help="folder to link the label maps into")
    p.set_defaults(func=_evaluate_cases)
    p = stage.add_parser("table", help="score predictions with nnU-Net's evaluation: Dice table (TSV, JSON, "
                                       "Markdown) and figure")
    p.add_argument("predictions", type=Path, nargs="+",
                   help="folders written by `fastkd predict` (the folder name labels the row)")
    p.add_argument("-l", "--labels", type=Path, required=True, help="folder of the reference label maps")
    p.add_argument("--dataset-json", type=Path, required=True, help="the dataset's dataset.json (labels, file ending)")
    p.add_argument("-o", "--output", type=Path, required=True, help="folder for dice.tsv/.json/.md/.png")
    p.add_argument("--case-set", default="", help="name of the case set (in the table's title)")
    p.add_argument("--optimistic", action="store_true",
                   help="mark the table optimistic: the cases are validation cases some models trained on")
    p.add_argument("--threads", type=positive_int, default=1, help="worker processes of nnU-Net's evaluation")
    p.set_defaults(func=_evaluate_table)


def _evaluate_cases(args) -> None:
    from fastkd.evaluate import link_cases, write_validation_cases

    if args.cases:
        cases = link_cases(args.cases, args.raw, args.images, args.labels)
        print(f"linked {len(cases)} cases into {args.images} and {args.labels}")
        return
    if args.fold is None:
        raise FastkdError("--splits needs -f FOLD: the fold whose validation cases to link")
    cases = write_validation_cases(args.splits, args.fold, args.raw, args.images, args.labels)
    print(f"linked fold {args.fold}'s {len(cases)} validation cases into {args.images} and {args.labels}")


def _evaluate_table(args) -> None:
    from fastkd.evaluate import evaluate, markdown
    from fastkd.io import read_json

    set_threads(args.threads)
    rows = evaluate(args.labels, args.predictions, args.output, dataset_json=read_json(args.dataset_json, "dataset.json", "the raw dataset's"),
                    optimistic=args.optimistic, case_set=args.case_set, num_processes=args.threads)
    table = read_json(args.output / "dice.json", "evaluation table", "written by the evaluation")
    print(markdown(rows, table["classes"], table), end="")
    print(f"wrote {args.output}/dice.tsv, dice.json, dice.md, dice.png")
