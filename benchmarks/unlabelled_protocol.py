"""Does distilling on unlabelled images help? The protocol of issue 30, and its decision.

Arms, each over the same seeds and the same student schedule, all scored on held-out labelled test cases
that no teacher or student trained on (the evaluation's dice.json):

- **A**: KD student on the labelled cases and the unlabelled images (``student.unlabelled_share`` > 0);
- **B**: KD student on the labelled cases only (``student.unlabelled_share: 0``), same teachers and cache;
- **C**: the no-KD baseline on the labelled cases.

The teachers are trained on the labelled cases only; they label the unlabelled images once into the cache.

**Decision rule** (fixed before the runs). The metric is each seed's mean foreground Dice over the test
cases. With ``d`` the difference of two arms' means over the seeds and ``s`` the larger of their two
sample standard deviations: ``d > s`` is a **gain**, ``d < -s`` a **loss**, anything between **no
measurable difference**. A against B says what the unlabelled images add to distillation; A against C
whether distillation with them at least never loses to the baseline.

Commands::

    # Hippocampus: 40 labelled training cases, 120 unlabelled images, 40 test cases (of the 200 in ../shared)
    python benchmarks/unlabelled_protocol.py prepare ../shared/datasets/Dataset004_Hippocampus hippo-unlabelled
    snakemake -s <repo>/Snakefile --cores all --configfile config.yaml <repo>/configs/unlabelled-hippocampus.yaml
    python benchmarks/unlabelled_protocol.py decide fastkd_work/Dataset104_HippocampusL40/evaluation/test/dice.json

The demo: ``configs/unlabelled-demo.yaml`` (it writes its own unlabelled images), then ``decide``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

ARMS = {"A": "KD, labelled + unlabelled", "B": "KD, labelled only", "C": "no-KD baseline, labelled only"}


def prepare(source: Path, out: Path, *, n_labelled: int, n_unlabelled: int, n_test: int, seed: int,
            dataset_id: int = 104) -> dict:
    """Split a labelled raw dataset into a smaller labelled one (imagesTr/labelsTr, and imagesTs/labelsTs for
    the test cases) and a folder of unlabelled images (their labels left out), all as symlinks."""
    dataset_json = json.loads((source / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    cases = sorted(p.name[: -len(ending)] for p in (source / "labelsTr").glob(f"*{ending}"))
    if n_labelled + n_unlabelled + n_test > len(cases):
        sys.exit(f"{n_labelled} labelled + {n_unlabelled} unlabelled + {n_test} test > the {len(cases)} cases of {source}")
    shuffled = random.Random(seed).sample(cases, len(cases))
    split = {"labelled": sorted(shuffled[:n_labelled]), "test": sorted(shuffled[n_labelled:n_labelled + n_test]),
             "unlabelled": sorted(shuffled[n_labelled + n_test:n_labelled + n_test + n_unlabelled])}
    name = f"Dataset{dataset_id:03d}_{dataset_json.get('name', 'Data').replace(' ', '')}L{n_labelled}"
    raw, unlabelled = out / name, out / "unlabelled"
    for folder in (raw / "imagesTr", raw / "labelsTr", raw / "imagesTs", raw / "labelsTs", unlabelled):
        folder.mkdir(parents=True, exist_ok=True)

    def link(target: Path, where: Path) -> None:
        if where.is_symlink() or where.exists():
            where.unlink()
        os.symlink(target.resolve(), where)

    for part, images, labels in (("labelled", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        for case in split[part]:
            for c in range(n_channels):
                link(source / "imagesTr" / f"{case}_{c:04d}{ending}", raw / images / f"{case}_{c:04d}{ending}")
            link(source / "labelsTr" / f"{case}{ending}", raw / labels / f"{case}{ending}")
    for case in split["unlabelled"]:
        for c in range(n_channels):
            link(source / "imagesTr" / f"{case}_{c:04d}{ending}", unlabelled / f"{case}_{c:04d}{ending}")
    kept = {k: v for k, v in dataset_json.items() if k != "dataset"}
    (raw / "dataset.json").write_text(json.dumps({**kept, "numTraining": n_labelled, "name": name.split("_", 1)[1]},
                                                 indent=2) + "\n")
    record = {"source": str(source.resolve()), "seed": seed, **split}
    (out / "split.json").write_text(json.dumps(record, indent=2) + "\n")
    return {"raw": str(raw), "unlabelled_folder": str(unlabelled), **{f"n_{k}": len(v) for k, v in split.items()}}


def arms(groups: list[dict]) -> dict[str, dict]:
    """The groups of dice.json that are the arms A, B and C (module docstring)."""
    found = {}
    for g in groups:
        if g["kind"] == "no-KD baseline":
            key = "C"
        elif g["kind"] == "student (KD)":
            key = "A" if (g.get("unlabelled_share") or 0) > 0 else "B"
        else:
            continue
        if key in found:
            sys.exit(f"two groups for arm {key} ({ARMS[key]}): {found[key]['label']!r} and {g['label']!r}")
        found[key] = g
    missing = [k for k in ARMS if k not in found]
    if missing:
        sys.exit(f"dice.json has no group for arm(s) {', '.join(missing)} ({', '.join(ARMS[k] for k in missing)})")
    return found


def verdict(a: dict, b: dict) -> tuple[float, float, str]:
    """(d, s, word) of arm ``a`` against arm ``b`` by the decision rule."""
    d = a["mean_dice"]["mean"] - b["mean_dice"]["mean"]
    s = max(a["mean_dice"]["sd"], b["mean_dice"]["sd"])
    return d, s, "gain" if d > s else "loss" if d < -s else "no measurable difference"


def decide(dice_json: Path) -> str:
    table = json.loads(dice_json.read_text())
    found = arms(table["groups"])
    names = table["classes"] if isinstance(table.get("classes"), list) else list(found["A"]["dice"])
    lines = [f"{len(table['cases'])} test cases, none trained on by any model ({dice_json})", "",
             "| arm | model | seeds | " + " | ".join(f"Dice {n}" for n in names) + " | mean Dice |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for key in ARMS:
        g = found[key]
        cells = [f"{g['dice'][n]['mean']:.3f} ± {g['dice'][n]['sd']:.3f}" for n in names]
        lines.append(f"| {key}: {ARMS[key]} | {g['label']} | {g['n']} | " + " | ".join(cells)
                     + f" | {g['mean_dice']['mean']:.3f} ± {g['mean_dice']['sd']:.3f} |")
    lines.append("")
    for x, y in (("A", "B"), ("A", "C"), ("B", "C")):
        d, s, word = verdict(found[x], found[y])
        lines.append(f"{x} vs {y}: d = {d:+.3f}, s = {s:.3f} -> {word}")
    few = [k for k in ARMS if found[k]["n"] < 3]
    if few:
        lines.append(f"warning: arm(s) {', '.join(few)} have fewer than 3 seeds; the rule needs >= 3")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="split a labelled raw dataset into labelled, unlabelled and test cases")
    p.add_argument("source", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--labelled", type=int, default=40)
    p.add_argument("--unlabelled", type=int, default=120)
    p.add_argument("--test", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("decide", help="the arms' table and the decision, from an evaluation's dice.json")
    p.add_argument("dice_json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        print(json.dumps(prepare(args.source, args.out, n_labelled=args.labelled, n_unlabelled=args.unlabelled,
                                 n_test=args.test, seed=args.seed), indent=2))
    else:
        print(decide(args.dice_json))


if __name__ == "__main__":
    main()
