"""``fastkd teachers``: train one nnU-Net teacher fold, check a teacher model folder, write its manifest."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage, config_flag, positive_int, set_threads


def add_parser(sub) -> None:
    stage = _stage(sub, "teachers", "the nnU-Net teacher ensemble")
    p = stage.add_parser("train", help="train one nnU-Net teacher fold (+ its final validation)")
    p.add_argument("-d", "--dataset", required=True, help="nnU-Net dataset id or name")
    config_flag(p, ["-c", "--configuration"], "teachers.configuration", "nnU-Net configuration")
    p.add_argument("-f", "--fold", type=int, required=True, choices=range(5))
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans name (default nnUNetPlans)")
    config_flag(p, ["-tr", "--trainer"], "teachers.trainer", "nnU-Net trainer class")
    config_flag(p, ["--epochs"], "teachers.schedule.epochs", "epochs")
    config_flag(p, ["--iterations"], "teachers.schedule.iterations_per_epoch", "training iterations per epoch")
    config_flag(p, ["--val-iterations"], "teachers.schedule.val_iterations_per_epoch", "validation iterations per epoch")
    config_flag(p, ["--batch-size"], "teachers.schedule.batch_size", "override the plans' batch size")
    config_flag(p, ["--save-every"], "teachers.schedule.save_every", "write checkpoint_latest.pth every N epochs")
    config_flag(p, ["--device"], "teachers.device", "device")
    p.add_argument("--threads", type=positive_int, default=1, help="CPU threads (torch and nnU-Net worker pools)")
    p.add_argument("--no-resume", action="store_true", help="ignore a checkpoint_latest.pth left by a killed run")
    p.add_argument("--disable-validation-mirroring", action="store_true",
                   help="final validation without test-time mirroring (teachers.validation_mirroring: false)")
    p.set_defaults(func=_teachers_train)
    for action, help in (("check", "check an nnU-Net teacher model folder holds every fold's checkpoint"),
                         ("manifest", "check a teacher model folder and write its manifest (folds, sha256)")):
        p = stage.add_parser(action, help=help)
        p.add_argument("folder", type=Path, help="model folder Trainer__Plans__configuration")
        config_flag(p, ["-c", "--configuration"], "teachers.configuration", "configuration")
        config_flag(p, ["-f", "--folds"], "teachers.folds", "folds", nargs="+")
        config_flag(p, ["-chk", "--checkpoint"], "teachers.checkpoint", "checkpoint file name")
        if action == "manifest":
            p.add_argument("-o", "--output", type=Path, required=True, help="the teacher manifest JSON to write")
        p.set_defaults(func=_teachers_check if action == "check" else _teachers_manifest)


def _teachers_train(args) -> None:
    from fastkd.teachers import train_teacher

    set_threads(args.threads, training=True)
    schedule = {"epochs": args.epochs, "iterations_per_epoch": args.iterations,
                "val_iterations_per_epoch": args.val_iterations, "batch_size": args.batch_size,
                "save_every": args.save_every}
    folder = train_teacher(args.dataset, args.configuration, args.fold, args.plans, args.trainer, schedule=schedule,
                           device=args.device, resume=not args.no_resume,
                           validation_mirroring=not args.disable_validation_mirroring)
    print(f"teacher fold {args.fold} done: {folder}")


def _teachers_check(args) -> None:
    from fastkd.teachers import validate_model_folder

    validate_model_folder(args.folder, args.configuration, args.folds, args.checkpoint)
    print(f"{args.folder}: folds {args.folds} with {args.checkpoint} present")


def _teachers_manifest(args) -> None:
    from fastkd.teachers import write_manifest

    manifest = write_manifest(args.folder, args.configuration, args.folds, args.checkpoint, args.output)
    print(f"wrote {args.output} ({len(manifest['folds'])} folds)")
