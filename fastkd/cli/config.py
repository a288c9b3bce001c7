"""``fastkd config``: validate config files and print the complete config (and the artifact paths)."""

from __future__ import annotations

from pathlib import Path

from fastkd.cli.common import _stage


def add_parser(sub) -> None:
    stage = _stage(sub, "config", "the workflow configuration")
    p = stage.add_parser("show", help="validate config file(s), print the complete config with defaults")
    p.add_argument("configfiles", nargs="*", type=Path, default=[Path("config.yaml")],
                   help="YAML files, later ones override earlier ones (default: config.yaml)")
    p.add_argument("--paths", action="store_true", help="also print the artifact paths")
    p.set_defaults(func=_config_show)


def _config_show(args) -> None:
    import yaml

    from fastkd.checks import load_config
    from fastkd.paths import Paths
    from fastkd.sweep import students
    from fastkd.teachers import teacher_sets

    config = load_config(args.configfiles)
    print(yaml.safe_dump(config, sort_keys=False), end="")
    if args.paths:
        p = Paths(config)
        n_test = config["dataset"]["holdout"]["n_test"]
        held_out = {f"held-out test cases ({n_test}, linked)": p.evaluation("test") / "cases"} if n_test else {}
        rows = {"raw dataset": p.raw_dataset, **held_out, "plans": p.plans_file, "splits": p.splits_file,
                **{f"preprocess manifest ({c})": p.preprocess_manifest(c) for c in config["plans"]["configurations"]},
                "teacher folder": p.teacher_folder,
                **{f"teacher fold {f}": p.teacher_checkpoint(f) for f in config["teachers"]["folds"]},
                **{f"teacher manifest ({s['name']})": p.teacher_manifest_of(s["name"])
                   for s in teacher_sets(config, p.teacher_folder)},
                **{f"student plans (r = {r})": p.student_plans_file(r)
                   for r in config["distillation"]["reduction_factors"]}}
        for s in students(config):  # one per combination of the swept settings
            sp = Paths(s.config(config))
            if s.kd:
                rows[f"soft-label cache (T = {s.temperature:g}, {s.folds_per_case})"] = sp.softlabel_cache()
            rows[f"student ({s.label})"] = sp.student_folder(s.r, s.kd)
        rows = {**rows,
                "report pages": p.report_folder}
        print("# artifact paths")
        for key, value in rows.items():
            print(f"# {key}: {value}")
