"""The KD protocol (issue 26): every KD arm against the no-KD baseline, 3 seeds, a short and a 5x longer
student schedule, on held-out test cases, with what the soft labels had to say.

    python benchmarks/kd_protocol.py --configfile configs/kd-protocol.yaml
    python benchmarks/kd_protocol.py --configfile configs/kd-protocol.yaml configs/kd-protocol-noisy.yaml

Run from a directory holding the workflow (the repository root, or a folder with links to its Snakefile,
config.yaml, workflow/, envs/ and configs/). For each schedule (``short``: the config's student schedule;
``long``: its epochs times 5) and each arm below, one ``snakemake`` run trains the arm's students (and, the
first time, the teachers, the soft-label caches and the no-KD baseline, which later runs reuse) and
evaluates them on the test set; each run's ``dice.json`` is copied to ``<out>/<schedule>/<arm>.json``.
Then the table: Dice per structure, mean ± sample sd over the seeds, per arm and schedule, the teacher
ensemble beside them, and the decision rule's verdict, written to ``<out>/protocol.md`` and printed.

The decision rule, fixed before the runs (issue 26): the new default must be >= the no-KD baseline on every
structure in the seed mean at both schedules on both demos, and ahead by more than one seed sd (the larger of
the two arms' sds) on at least one structure of the noisy demo. This script prints, per demo, which arms
never lose (the first half); the second half needs the noisy demo's table.

Beside the table: the soft labels of each cache on the training cases, their mean top probability and how
often their argmax agrees with the (possibly noisy) training labels, over all voxels and over the labels'
foreground, so a reader sees what there was to distil.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

#: the arms: name -> (distillation settings, softlabels settings); each is one snakemake run (a run with
#: lists trains every combination). The no-KD baseline is trained by the first run and reused.
ARMS = {
    "convex T3 a0.3 all scales (the old default)":
        ({"temperature": 3.0, "alpha": 0.3, "loss": "convex", "scales": "all", "class_balanced": False}, {}),
    "additive T1 full, a0.5 and a1":
        ({"temperature": 1.0, "alpha": [0.5, 1.0], "loss": "additive", "scales": "full", "class_balanced": False}, {}),
    "additive T3 a0.1 full":
        ({"temperature": 3.0, "alpha": 0.1, "loss": "additive", "scales": "full", "class_balanced": False}, {}),
    "additive T1 a1 full class-balanced":
        ({"temperature": 1.0, "alpha": 1.0, "loss": "additive", "scales": "full", "class_balanced": True}, {}),
}
#: arms run on demos with label noise only: out-of-fold soft labels (the teachers' honest uncertainty)
NOISY_ARMS = {
    "additive T1 a1 full out-of-fold":
        ({"temperature": 1.0, "alpha": 1.0, "loss": "additive", "scales": "full", "class_balanced": False},
         {"folds_per_case": "out_of_fold"}),
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configfile", nargs="+", required=True, type=Path, help="on top of config.yaml, in order")
    ap.add_argument("--schedules", nargs="+", default=["short", "long"], choices=["short", "long"])
    ap.add_argument("--arms", nargs="*", help="names of the arms to run (default: all of this demo's)")
    ap.add_argument("--long-best", type=int, metavar="N",
                    help="at the long schedule, run only the N arms of the highest mean Dice at the short one")
    ap.add_argument("--cores", default="2")
    ap.add_argument("--out", type=Path, help="where the tables go (default: fastkd_work/<dataset>/kd_protocol)")
    ap.add_argument("--table-only", action="store_true", help="only make the table from the runs already copied")
    args = ap.parse_args(argv)

    from fastkd.checks import load_config
    from fastkd.paths import Paths

    config = load_config([Path("config.yaml"), *args.configfile])
    paths = Paths(config)
    out = args.out or Path(config["paths"]["work"]) / paths.dataset_name / "kd_protocol"
    noisy = config["dataset"]["raw"] == "demo" and config["dataset"]["demo"].get("label_noise", 0) > 0
    arms = {**ARMS, **(NOISY_ARMS if noisy else {})}
    unknown = sorted(set(args.arms or []) - set(arms))
    if unknown:
        ap.error(f"unknown arms {unknown}: choose from {sorted(arms)}")
    chosen = {name: arms[name] for name in (args.arms or arms)}
    epochs = config["student"]["schedule"]["epochs"]
    schedules = {"short": epochs, "long": 5 * epochs}
    if not args.table_only:
        for schedule in args.schedules:
            arms_now = chosen
            if schedule == "long" and args.long_best:
                ranked = _ranked_arms(out / "short")
                arms_now = {name: chosen[name] for name in ranked if name in chosen}
                arms_now = dict(list(arms_now.items())[:args.long_best])
                print(f"[kd_protocol] long schedule: the {args.long_best} best arms at the short one: "
                      f"{', '.join(arms_now)}", flush=True)
            for name, (distillation, softlabels) in arms_now.items():
                _run(args, paths, out, schedule, schedules[schedule], name, distillation, softlabels)
    text = table(out, config, schedules)
    curves = teacher_curves(paths, config, out / "teachers.png")
    if curves:
        text += f"\nThe teachers' validation curves (pseudo-Dice per epoch, each fold): {curves}\n"
    (out / "protocol.md").write_text(text)
    print(text)
    return 0


def _run(args, paths, out: Path, schedule: str, epochs: int, name: str, distillation: dict, softlabels: dict) -> None:
    target = out / schedule / f"{_slug(name)}.json"
    if target.is_file():
        print(f"[kd_protocol] {schedule} / {name}: done before ({target})", flush=True)
        return
    # the arm as one more config file (Snakemake merges config files key by key; --config would not)
    arm_config = out / schedule / f"{_slug(name)}.yaml"
    arm_config.parent.mkdir(parents=True, exist_ok=True)
    arm_config.write_text(yaml.safe_dump({"distillation": distillation, "student": {"schedule": {"epochs": epochs}},
                                          **({"softlabels": softlabels} if softlabels else {})}))
    table_path = paths.evaluation_table("test", "json")
    cmd = ["snakemake", "--cores", args.cores, "--rerun-incomplete", "--configfile", *map(str, args.configfile), str(arm_config),
           "--", str(paths.evaluation_table("test"))]
    print(f"[kd_protocol] {schedule} / {name}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    log = out / schedule / f"{_slug(name)}.log"
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        sys.exit(f"[kd_protocol] snakemake failed ({rc}); its log: {log}")
    tmp = target.with_suffix(".partial")
    shutil.copy(table_path, tmp)
    data = json.loads(tmp.read_text())
    data["protocol"] = {"arm": name, "schedule": schedule, "epochs": epochs, "command": " ".join(cmd),
                        "seconds": round(time.monotonic() - start, 1)}
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(target)
    print(f"[kd_protocol] {schedule} / {name}: {time.monotonic() - start:.0f} s", flush=True)


def _ranked_arms(folder: Path) -> list[str]:
    """The arms run in ``folder``, best first by the mean over structures of their KD students' seed-mean Dice."""
    score = {}
    for run in folder.glob("*.json"):
        data = json.loads(run.read_text())
        kd = [r for r in data["rows"] if r["kind"] != "teacher ensemble" and r["temperature"] is not None]
        if kd:
            score[data["protocol"]["arm"]] = statistics.fmean(r["mean_dice"] for r in kd)
    return sorted(score, key=score.get, reverse=True)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in name)


def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def table(out: Path, config: dict, schedules: dict) -> str:
    """The protocol's table from the copied dice.json files: one block per schedule."""
    lines = [f"# KD protocol: {config['dataset']['demo']['name'] if config['dataset']['raw'] == 'demo' else config['dataset']['raw']}", ""]
    verdicts = {}
    for schedule, epochs in schedules.items():
        runs = sorted((out / schedule).glob("*.json"))
        if not runs:
            continue
        rows, names, teacher, n_cases = {}, None, None, None
        for run in runs:
            data = json.loads(run.read_text())
            names, n_cases = data["classes"], len(data["cases"])
            for row in data["rows"]:
                if row["kind"] == "teacher ensemble":
                    teacher = row
                    continue
                rows[row["model"]] = row  # a model evaluated by several runs (the baseline) counts once
        groups: dict[str, list[dict]] = {}
        for row in rows.values():
            label = _arm_label(row) if row["temperature"] is not None else "no-KD baseline"
            groups.setdefault(label, []).append(row)
        it = config["student"]["schedule"]["iterations_per_epoch"]
        lines += [f"## {schedule} schedule: {epochs} x {it} = {epochs * it} iterations, {n_cases} test cases", "",
                  "| arm | seeds | " + " | ".join(f"Dice {n}" for n in names) + " | mean Dice |",
                  "|---|---|" + "---|" * (len(names) + 1)]
        if teacher:
            lines.append("| teacher ensemble (5 folds, mirroring) | - | "
                         + " | ".join(f"{teacher['dice'][n]:.3f}" for n in names) + f" | {teacher['mean_dice']:.3f} |")
        summary = {}
        for label in sorted(groups, key=lambda g: (g != "no-KD baseline", g)):
            members = groups[label]
            cells = {n: _stats([m["dice"][n] for m in members]) for n in names}
            cells["mean"] = _stats([m["mean_dice"] for m in members])
            summary[label] = cells
            lines.append(f"| {label} | {len(members)} | " + " | ".join(f"{cells[n][0]:.3f} ± {cells[n][1]:.3f}" for n in names)
                         + f" | {cells['mean'][0]:.3f} ± {cells['mean'][1]:.3f} |")
        base = summary.get("no-KD baseline")
        if base:
            never_loses = [g for g, c in summary.items() if g != "no-KD baseline" and all(c[n][0] >= base[n][0] for n in names)]
            ahead = [g for g, c in summary.items() if g != "no-KD baseline"
                     and any(c[n][0] - base[n][0] > max(c[n][1], base[n][1]) for n in names)]
            verdicts[schedule] = (never_loses, ahead)
            lines += ["", f"- >= the baseline on every structure (seed means): {', '.join(never_loses) or 'none'}",
                      f"- ahead of the baseline by more than one seed sd on some structure: {', '.join(ahead) or 'none'}"]
        seconds = sum(json.loads(r.read_text()).get("protocol", {}).get("seconds", 0) for r in runs)
        lines += ["", f"({len(runs)} snakemake runs, {seconds / 60:.0f} min in all; commands in each "
                  f"{out.name}/{schedule}/<arm>.json's \"protocol\" entry)", ""]
    if len(verdicts) == 2:
        both = set(verdicts["short"][0]) & set(verdicts["long"][0])
        lines += [f"**Never below the baseline at both schedules:** {', '.join(sorted(both)) or 'none'}", ""]
    lines += softlabel_lines(config)
    return "\n".join(lines) + "\n"


def _arm_label(row: dict) -> str:
    return (f"{row['loss']} T{row['temperature']:g} a{row['alpha']:g} {row['scales']}"
            + (" class-balanced" if row.get("class_balanced") else "")
            + (" out-of-fold" if row.get("folds_per_case") == "out_of_fold" else ""))


def teacher_curves(paths, config: dict, png: Path) -> Path | None:
    """One figure of every teacher fold's validation pseudo-Dice (foreground mean) and loss per epoch, from the
    logger nnU-Net keeps in checkpoint_final.pth: has each fold reached its plateau?"""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fastkd.student.report import load_model

    folds = [f for f in config["teachers"]["folds"] if paths.teacher_checkpoint(f).is_file()]
    if not folds:
        return None
    fig, (dice, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for fold in folds:
        row = load_model(f"fold {fold}", paths.teacher_checkpoint(fold).parent)
        dice.plot(row["pseudo_dice"], marker="o", ms=3, label=f"fold {fold} (final validation {row['mean']:.3f})")
        loss.plot(row["val_loss"], marker="o", ms=3, label=f"fold {fold}")
    dice.set(title="teachers: validation pseudo-Dice (foreground mean)", xlabel="epoch", ylim=(0, 1))
    loss.set(title="teachers: validation loss", xlabel="epoch")
    dice.legend(fontsize=8)
    loss.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return png


def softlabel_lines(config: dict) -> list[str]:
    """Mean top probability and argmax agreement with the training labels of every complete cache."""
    import blosc2
    import numpy as np

    from fastkd.cache import SoftLabelCache, root_attrs
    from fastkd.paths import Paths

    paths = Paths(config)
    folder = paths.softlabel_cache().parent
    caches = sorted(p for p in folder.glob("*.zarr") if (root_attrs(p) or {}).get("complete")) if folder.is_dir() else []
    if not caches:
        return []
    lines = ["## What there was to distil: the soft labels on the training cases", "",
             "| cache | cases | mean top probability (all / foreground) | argmax = training label (all / foreground) |",
             "|---|---|---|---|"]
    cfg = config["teachers"]["configuration"]
    for store in caches:
        cache = SoftLabelCache(store)
        top, agree, top_fg, agree_fg, n = [], [], [], [], 0
        for case in sorted(p.name for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
            seg_file = paths.preprocessed_case(cfg, case, seg=True)
            if not seg_file.is_file():
                continue
            probs = np.asarray(cache.read(case), dtype=np.float32)
            seg = np.asarray(blosc2.open(str(seg_file), mode="r")[:])[0]
            inside = seg >= 0
            fg = seg > 0
            best, arg = probs.max(0), probs.argmax(0)
            top.append(best[inside].mean())
            agree.append((arg == seg)[inside].mean())
            top_fg.append(best[fg].mean())
            agree_fg.append((arg == seg)[fg].mean())
            n += 1
        lines.append(f"| {store.name[:60]} | {n} | {np.mean(top):.3f} / {np.mean(top_fg):.3f} | "
                     f"{np.mean(agree):.3f} / {np.mean(agree_fg):.3f} |")
    return lines + [""]


if __name__ == "__main__":
    sys.exit(main())
