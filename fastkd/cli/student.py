"""``fastkd student``: student plans, their size and cost, training one student fold, reports of trained folds."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage, config_flag, fold_arg, positive_int, set_threads
from fastkd.errors import FastkdError


def add_parser(sub) -> None:
    from fastkd.student.plans import BLOCK_STRATEGIES

    stage = _stage(sub, "student", "student plans, their size and cost, training, reports")
    p = stage.add_parser("plans", help="write the student plans of a teacher plans file")
    p.add_argument("teacher_plans", type=Path, help="base plans JSON, e.g. nnUNet_preprocessed/<ds>/nnUNetPlans.json")
    p.add_argument("-r", "--reduction-factor", dest="r", type=int, required=True,
                   help="divide features_per_stage by r (floor 8)")
    config_flag(p, ["-bs", "--block-strategy"], "student.block_strategy", "ResEnc blocks per stage")
    p.add_argument("-o", "--output", type=Path, default=None,
                   help="student plans JSON to write (default: <student plans name>.json beside the base plans)")
    p.set_defaults(func=_student_plans)
    p = stage.add_parser("info", help="teacher vs student parameters and GFLOPs per patch")
    p.add_argument("teacher_plans", type=Path, help="teacher plans JSON")
    group = p.add_mutually_exclusive_group()
    group.add_argument("-r", "--reduction-factor", dest="r", type=int, default=None,
                       help="derive the student with this r (default 2)")
    group.add_argument("--student", type=Path, default=None, help="compare this existing student plans JSON instead")
    p.add_argument("-bs", "--block-strategy", choices=BLOCK_STRATEGIES, default="keep",
                   help="ResEnc blocks per stage when deriving (default keep)")
    p.add_argument("--dataset-json", type=Path, default=None,
                   help="dataset.json for input/output channels (default: the one beside the teacher plans)")
    p.add_argument("-c", "--configurations", nargs="+", default=None, help="configurations (default: all)")
    p.add_argument("-o", "--output", type=Path, default=None, help="also write the table to this text file")
    p.set_defaults(func=_student_info)
    p = stage.add_parser("train", help="train one student fold on patches + cached soft labels (+ final validation)")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    p.add_argument("-p", "--plans", required=True, help="student plans name (written by `fastkd student plans`)")
    config_flag(p, ["-c", "--configuration"], "teachers.configuration", "configuration")
    p.add_argument("-f", "--fold", type=fold_arg, default=0, help="0-4, or 'all' to train on every case (default 0)")
    p.add_argument("--cache", type=Path, default=None, help="the soft-label cache (a complete Zarr store)")
    p.add_argument("--baseline", action="store_true", help="the no-KD baseline: alpha = 0, no cache")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="config settings of the run, e.g. distillation.temperature=2 student.schedule.epochs=10 "
                        "student.device=cuda student.resume=false (every other key keeps its config default; see "
                        "config.yaml)")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (torch and nnU-Net worker pools)")
    p.set_defaults(func=_student_train)
    p = stage.add_parser("report", help="PNG of training curves + Dice table (and a TSV) of trained folds")
    p.add_argument("models", nargs="+", help="LABEL=FOLD_FOLDER, e.g. KD=nnUNet_results/<ds>/<model>/fold_0")
    p.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    p.add_argument("--tsv", type=Path, required=True, help="Dice table (TSV) to write")
    p.add_argument("--title", default="")
    p.set_defaults(func=_student_report)


def _student_plans(args) -> None:
    from fastkd.nnunet import read_plans
    from fastkd.student.plans import derive_student_plans, write_student_plans

    out = args.output
    if out is None:  # beside the base plans, named after the plans: where nnU-Net looks for them
        name = derive_student_plans(read_plans(args.teacher_plans), args.r, args.block_strategy)["plans_name"]
        out = args.teacher_plans.parent / f"{name}.json"
    plans = write_student_plans(args.teacher_plans, out, args.r, args.block_strategy)
    print(f"student plans {plans['plans_name']}: {out}")


def _student_info(args) -> None:
    from fastkd.io import atomic_write_text, read_json
    from fastkd.nnunet import read_plans
    from fastkd.student.plans import derive_student_plans, format_info

    teacher = read_plans(args.teacher_plans)
    if args.student is not None:
        if args.block_strategy != "keep":
            raise FastkdError(f"-bs {args.block_strategy} derives a student; --student {args.student} is one already")
        student = read_plans(args.student)
    else:
        student = derive_student_plans(teacher, 2 if args.r is None else args.r, args.block_strategy)
    dataset_json = read_json(args.dataset_json or args.teacher_plans.parent / "dataset.json", "dataset.json",
                             "needed for the input and output channels; give one with --dataset-json")
    text = format_info(teacher, student, dataset_json, args.configurations)
    if args.output is not None:
        atomic_write_text(args.output, text + "\n")
    print(text)


def _student_train(args) -> None:
    from fastkd.config import parse_overrides
    from fastkd.checks import validate_config
    from fastkd.sweep import student_tag
    from fastkd.student.run import student_settings, train_student

    set_threads(args.threads, training=True)
    config = validate_config(parse_overrides(args.set), check_files=False)
    settings = student_settings(config, args.cache, kd=not args.baseline)
    s = config["student"]
    folder = train_student(args.dataset, args.plans, args.configuration, args.fold, settings,
                           da5=s["augmentation"] == "da5", device=s["device"], num_gpus=s["num_gpus"],
                           resume=s["resume"], tag=student_tag(config, kd=not args.baseline))
    print(f"student fold {args.fold} done: {folder}")


def _student_report(args) -> None:
    from fastkd.student.report import report_notes, write_report

    rows = write_report(args.models, args.output, args.tsv, args.title)
    print(f"wrote {args.output} and {args.tsv} ({len(rows)} models)")
    for note in report_notes(rows):
        print(note)
