"""One prepared validation of fastkd's torch path on real data: the whole DAG on Hippocampus, on a GPU
(``--device cuda --schedule gpu``, within ``--budget`` seconds) or on the CPU (``--schedule tiny``, CI: 7
cases, 1-epoch schedules, one seed, no test-time mirroring).

Every step is a ``fastkd <stage> <action>`` command, run as the workflow's rule runs it (workflow/rules/*.smk;
the artifact paths come from :class:`fastkd.paths.Paths` of one validated config), in the DAG's order,
without Snakemake (not on the GPU machine). Commands of one step that the DAG runs side by side run here as
concurrent processes on the one device: the five teacher folds, the soft-label shards, the students.

Steps: link the cases (``--cases``) into a raw dataset folder; plan + preprocess (holding back
the schedule's test cases); with the gpu schedule, a calibration (the five folds side by side for 2 short
epochs in a scratch results folder: seconds per iteration from nnU-Net's "Epoch time", which sets the
teacher and student epochs that fit ``--budget``; the tiny schedule's epochs are fixed); the five teacher
folds; the teacher manifest; the soft-label cache (shards, finalize); student plans r = 2 and 4; KD and
no-KD students (every r x seed); the held-out cases; predictions of the teacher ensemble (5 folds,
mirroring) and of every student; nnU-Net's Dice table; ``fastkd predict`` of the r = 2 KD student at
``--tile-batch`` 1 and 8 with ``--resample device``, and at 8 with ``--resample cpu`` (seconds per case of
the whole run and of the network alone, start-up: the runs' records); the checkpoints packed. Every prediction runs eager PyTorch
(``--no-jit``: the CUDA default; on the CPU TorchScript's tracing costs more than a few cases win back).

Results folder (``--out``; at most 8 files of at most 16 MiB, checked at the end)::

    results.json    schedule, config, device, calibration, every step's command and seconds, the
                    trainings' epoch times, predict timings, packed models, the PASS/FAIL lines
    dice.tsv        `fastkd evaluate table`'s table of the held-out cases (teachers and every student)
    timing.tsv      kind, name, seconds, detail: each step, each training's mean epoch time and s/it,
                    each predict timing (s/case whole and network)
    dice.png        `fastkd evaluate table`'s figure
    models.tar.NN   one tar split into parts of 16 MiB: each packed fold's checkpoint (network weights
                    only, fp16; optimizer state dropped), its plans.json and dataset.json, as an nnU-Net
                    model folder; the first seed's students, teacher fold 0, the other students, the other
                    folds, each while the 8-file budget allows (results.json lists what was left out)

It prints ``PASS``/``FAIL`` lines and exits non-zero naming the failed step (its log's tail printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from fastkd.cases import holdout_cases  # noqa: E402
from fastkd.checks import validate_config  # noqa: E402
from fastkd.config import overrides, read_config_files  # noqa: E402
from fastkd.errors import FastkdError  # noqa: E402
from fastkd.paths import Paths, fold_folder, students_by_folder  # noqa: E402
from fastkd.student.run import KD_KEYS  # noqa: E402
from fastkd.teachers import teacher_sets  # noqa: E402

MiB = 1 << 20
MAX_FILES, MAX_FILE_BYTES = 8, 16 * MiB
CFG = "3d_fullres"
FOLDS = [0, 1, 2, 3, 4]
DEFAULT_RAW = REPO.parent / "shared" / "datasets" / "Dataset004_Hippocampus"
# tiny: CI on a CPU, fixed epochs. gpu: epochs from the calibration, so that the run ends within --budget
# (reserve_s: the steps other than the two trainings; split: the teachers' share of the training time).
SCHEDULES = {
    "tiny": {"cases": 7, "test": 2, "seeds": [0], "iterations": 1, "val_iterations": 1, "batch_size": 2,
             "teacher_epochs": 1, "student_epochs": 1, "mirroring": False, "shards": 1, "min_dice": 0.0},
    "gpu": {"cases": None, "test": 20, "seeds": [0, 1], "iterations": 50, "val_iterations": 5, "batch_size": None,
            "teacher_epochs": None, "student_epochs": None, "mirroring": True, "shards": 4,
            "calibration_iterations": 20, "min_dice": 0.6, "reserve_s": 170, "split": 0.6},
}


class StepFailed(Exception):
    pass


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--raw", type=Path, default=DEFAULT_RAW, help="nnU-Net raw dataset DatasetXXX_Name")
    p.add_argument("--work", type=Path, required=True, help="working folder (nnU-Net folders, logs)")
    p.add_argument("--out", type=Path, required=True, help="results folder (<= 8 files of <= 16 MiB)")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="tiny")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--budget", type=float, default=540, help="seconds for the whole run (gpu schedule)")
    p.add_argument("--cases", type=int, help="use the first N cases (sorted) of the dataset (default: schedule's)")
    p.add_argument("--epochs", type=int, nargs=2, metavar=("TEACHER", "STUDENT"), help="fixed epochs")
    p.add_argument("--iterations", type=int, help="training iterations per epoch (default: schedule's)")
    p.add_argument("--config", type=Path, action="append", default=[], help="extra config YAML over config.yaml")
    p.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPU cores shared by the concurrent jobs")
    return p.parse_args(argv)


# -- running commands -----------------------------------------------------------------------------
class Runner:
    """Runs the steps' commands (concurrently within a step), logs each, records seconds, fails loudly."""

    def __init__(self, args, paths: Paths, logs: Path):
        self.args, self.paths, self.logs, self.steps, self.t0 = args, paths, logs, [], time.perf_counter()
        site = os.environ.get("FASTKD_GPU_SITE")  # the wheels installed on the GPU machine (README)
        path = [str(REPO)] + ([site] if site else []) + [os.environ.get("PYTHONPATH", "")]
        self.env = {**os.environ, **paths.nnunet_env(), "PYTHONPATH": os.pathsep.join(filter(None, path)),
                    # a short run does not win back torch.compile's minutes of compiling per process
                    "nnUNet_compile": os.environ.get("nnUNet_compile", "f")}
        logs.mkdir(parents=True, exist_ok=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def threads(self, n_commands: int) -> int:
        """CPU threads of each of ``n_commands`` side by side (torch and nnU-Net's worker pools)."""
        return max(1, self.args.cpus // n_commands)

    def step(self, name: str, commands: list[list], env: dict | None = None) -> float:
        """Run ``commands`` (each the arguments of ``fastkd``) side by side; raise StepFailed naming the step."""
        start, procs = time.perf_counter(), []
        print(f"[{self.elapsed():6.1f} s] {name}: {len(commands)} command(s)", flush=True)
        for i, cmd in enumerate(commands):
            full = [sys.executable, "-m", "fastkd.cli", *map(str, cmd)]
            log = self.logs / f"{name}.{i}.log"
            log.write_text(" ".join(full) + "\n")
            with open(log, "a") as f:
                procs.append((full, log, subprocess.Popen(full, stdout=f, stderr=subprocess.STDOUT, env=env or self.env,
                                                          cwd=self.args.work)))
        failed = [(full, log, p.wait()) for full, log, p in procs]
        failed = [(full, log, rc) for full, log, rc in failed if rc != 0]
        seconds = time.perf_counter() - start
        self.steps.append({"step": name, "seconds": seconds, "commands": [" ".join(c) for c, _, _ in procs],
                           "ok": not failed})
        if failed:
            full, log, rc = failed[0]
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
            raise StepFailed(f"step {name!r}: {' '.join(full)} exited {rc} ({len(failed)} of {len(procs)} failed); "
                             f"log {log}:\n{tail}")
        return seconds


# -- the config and the data ----------------------------------------------------------------------
def link_cases(raw: Path, dest: Path, n: int | None) -> Path:
    """A raw dataset folder of ``raw``'s first ``n`` cases (sorted), as links, its dataset.json counting them."""
    if not (raw / "dataset.json").is_file():
        raise StepFailed(f"--raw {raw}: no dataset.json there (expected an nnU-Net raw dataset folder, e.g. "
                         f"{DEFAULT_RAW})")
    dataset_json = json.loads((raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    cases = sorted(p.name[: -len(ending)] for p in (raw / "labelsTr").glob(f"*{ending}"))
    if n is not None and not 5 <= n <= len(cases):
        raise StepFailed(f"--cases {n}: {raw} has {len(cases)} labelled cases; 5 (nnU-Net's folds) up to that is valid")
    cases = cases[:n]
    folder = dest / raw.name
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case in cases:
        for ch in range(len(dataset_json["channel_names"])):
            name = f"{case}_{ch:04d}{ending}"
            (folder / "imagesTr" / name).symlink_to((raw / "imagesTr" / name).resolve())
        (folder / "labelsTr" / f"{case}{ending}").symlink_to((raw / "labelsTr" / f"{case}{ending}").resolve())
    (folder / "dataset.json").write_text(json.dumps({**dataset_json, "numTraining": len(cases)}, indent=2))
    return folder


def make_config(args, s: dict, raw: Path) -> dict:
    """config.yaml (and ``--config`` files) with this run's dataset, folders, devices and schedule, validated."""
    work = args.work.resolve()
    schedule = {"iterations_per_epoch": s["iterations"], "val_iterations_per_epoch": s["val_iterations"],
                "batch_size": s["batch_size"], "save_every": 50}
    config = read_config_files([REPO / "config.yaml", *args.config])
    over = {
        "dataset": {"raw": str(raw), "holdout": {"n_test": s["test"], "seed": 0}},
        "paths": {k: str(work / v) for k, v in (("nnunet_raw", "nnUNet_raw"), ("nnunet_preprocessed",
                  "nnUNet_preprocessed"), ("nnunet_results", "nnUNet_results"), ("work", "fastkd_work"))},
        "plans": {"num_processes": max(1, min(args.cpus, 16))},
        "teachers": {"device": args.device, "folds": FOLDS, "validation_mirroring": s["mirroring"],
                     "schedule": {**schedule, "epochs": s["teacher_epochs"]}},
        "distillation": {"reduction_factors": [2, 4]},
        "student": {"device": args.device, "folds": [0], "baseline": True, "seeds": s["seeds"],
                    "schedule": {**schedule, "epochs": s["student_epochs"], "save_every": 50}},
        # 4 shards side by side keep the device busy; mirroring only in the evaluation (8x the forwards)
        "softlabels": {"device": args.device, "shards": s["shards"], "mirroring": False},
        "evaluation": {"device": args.device, "mirroring": s["mirroring"]},
    }
    for block, values in over.items():
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(config.get(block, {}).get(key), dict):
                config[block][key].update(value)
            else:
                config.setdefault(block, {})[key] = value
    return validate_config(config, base_dir=work)


def student_set_args(config: dict, name: str) -> list[str]:
    """``--set`` pairs of a student, as the workflow's ``student_settings_args`` (workflow/rules/common.smk)."""
    s, sp = students_by_folder(config)[name]
    keep = {k: v for k, v in sp.config["student"].items() if k not in ("folds", "baseline") and (s.kd or k not in KD_KEYS)}
    subset = {"student": keep}
    if s.kd:
        subset["distillation"] = {k: sp.config["distillation"][k] for k in ("temperature", "alpha", "loss", "scales",
                                                                             "class_balanced")}
        subset["softlabels"] = {"folds_per_case": s.folds_per_case}
    return overrides(subset)


# -- training logs ---------------------------------------------------------------------------------
def epoch_times(fold_folder: Path) -> list[float]:
    """nnU-Net's "Epoch time: X s" lines of a fold's training logs."""
    times = []
    for log in sorted(fold_folder.glob("training_log_*.txt")):
        times += [float(m) for m in re.findall(r"Epoch time: ([0-9.]+) s", log.read_text(errors="replace"))]
    return times


def seconds_per_iteration(fold_folder: Path, iterations: int) -> float:
    """Seconds per training iteration of a fold from its last epoch (the first one also warms up)."""
    times = epoch_times(fold_folder)
    if not times:
        raise StepFailed(f"no 'Epoch time' in the training logs of {fold_folder}")
    return times[-1] / iterations


def budget_epochs(s: dict, calibration: dict, left: float) -> tuple[int, int]:
    """Teacher and student epochs (at least 2 each) that fill ``left`` seconds, minus the steps other than the
    two trainings (``reserve_s``) and the two trainings' start-up and validation (the calibration's overhead)."""
    left = left - s["reserve_s"] - 2 * calibration["overhead_s"]
    if left < 60:
        raise StepFailed(f"calibration: {left:.0f} s left for training within the budget "
                         f"(overhead per training step {calibration['overhead_s']:.0f} s): raise --budget")
    per_epoch = (s["iterations"] + s["val_iterations"]) * calibration["teacher_s_per_it"]
    # 8 students share the CPU's augmentation workers that 5 teachers shared: slower per process
    student_per_epoch = per_epoch * calibration["student_slowdown"]
    return max(2, int(left * s["split"] / per_epoch)), max(2, int(left * (1 - s["split"]) / student_per_epoch))


# -- results ---------------------------------------------------------------------------------------
def pack_models(out: Path, models: list[tuple[str, Path]], budget: int) -> dict:
    """Fold checkpoints (weights only, fp16) with their plans and dataset.json in one tar under ``budget``
    bytes, split into ``models.tar.NN`` parts of 16 MiB; those over the budget are listed as left out."""
    import torch

    packed, left_out, staging = [], [], out.parent / (out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    for label, checkpoint in models:
        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        slim = {k: v for k, v in ckpt.items() if k not in ("optimizer_state", "grad_scaler_state", "logging")}
        slim["network_weights"] = {k: v.half() if v.is_floating_point() else v for k, v in ckpt["network_weights"].items()}
        folder = staging / checkpoint.parents[1].name / checkpoint.parent.name
        folder.mkdir(parents=True)
        torch.save(slim, folder / checkpoint.name)
        for name in ("plans.json", "dataset.json"):
            shutil.copy(checkpoint.parents[1] / name, folder.parent / name)
        total = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
        if total > budget:  # the tar adds 1 KiB per file: far below the 16 MiB parts' slack
            shutil.rmtree(folder)
            if not any(folder.parent.glob("fold_*")):
                shutil.rmtree(folder.parent)
            left_out.append(label)
            continue
        packed.append({"label": label, "path": str(folder.relative_to(staging)),
                       "bytes": (folder / checkpoint.name).stat().st_size})
    tar = out / "models.tar"
    with tarfile.open(tar, "w") as t:
        t.add(staging, arcname="models")
    shutil.rmtree(staging)
    data, parts = tar.read_bytes(), []
    tar.unlink()
    for i in range(0, len(data), MAX_FILE_BYTES):
        part = out / f"models.tar.{i // MAX_FILE_BYTES:02d}"
        part.write_bytes(data[i: i + MAX_FILE_BYTES])
        parts.append(part.name)
    return {"packed": packed, "left_out": left_out, "parts": parts, "tar_bytes": len(data),
            "unpack": "cat models.tar.* | tar -x"}


def check_results(out: Path) -> list[str]:
    files = sorted(p for p in out.rglob("*") if p.is_file())
    problems = [f"{p.name}: {p.stat().st_size} bytes > 16 MiB" for p in files if p.stat().st_size > MAX_FILE_BYTES]
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files > {MAX_FILES}: {[p.name for p in files]}")
    return problems


def write_tsv(path: Path, rows: list[dict]) -> None:
    columns = list(rows[0])
    path.write_text("\t".join(columns) + "\n" + "".join(
        "\t".join(f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in columns) + "\n" for r in rows))


# -- the DAG ---------------------------------------------------------------------------------------
def calibrate(args, s: dict, runner: Runner, config: dict, P: Paths) -> dict:
    """The five teacher folds side by side for 2 epochs of ``calibration_iterations`` in a scratch results
    folder: seconds per iteration (the second epoch's time) and the overhead of a training step."""
    n = s["calibration_iterations"]
    scratch = args.work / "calibration_results"
    env = {**runner.env, "nnUNet_results": str(scratch.resolve())}
    wall = runner.step("calibrate", [teacher_command(config, P, f, 2, n, runner.threads(len(FOLDS))) for f in FOLDS],
                       env=env)
    folders = [scratch / P.dataset_name / P.teacher_folder_name / f"fold_{f}" for f in FOLDS]
    per_it = max(seconds_per_iteration(f, n + s["val_iterations"]) for f in folders)
    overhead = wall - max(sum(epoch_times(f)) for f in folders)
    return {"teacher_s_per_it": per_it, "overhead_s": overhead, "calibration_s": wall, "iterations": n,
            "processes": len(FOLDS), "student_slowdown": max(1.0, len(students_by_folder(config)) / len(FOLDS))}


def teacher_command(config: dict, P: Paths, fold: int, epochs: int, iterations: int, threads: int) -> list:
    t = config["teachers"]
    sched = t["schedule"]
    return (["teachers", "train", "-d", P.dataset_id, "-c", CFG, "-f", fold, "-p", P.plans_name, "-tr", t["trainer"],
             "--device", t["device"], "--epochs", epochs, "--iterations", iterations,
             "--val-iterations", sched["val_iterations_per_epoch"], "--save-every", sched["save_every"],
             "--threads", threads] + ([] if t["validation_mirroring"] else ["--disable-validation-mirroring"])
            + (["--batch-size", sched["batch_size"]] if sched["batch_size"] else []))


def run_dag(args, s: dict, results: dict, lines: list) -> None:
    def passed(line: str) -> None:
        lines.append(f"PASS {line}")
        print(lines[-1], flush=True)

    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise StepFailed("device: --device cuda but torch.cuda.is_available() is False")
        results["gpu"] = torch.cuda.get_device_name(0)
        passed(f"device: cuda ({results['gpu']}, torch {torch.__version__})")
    raw = link_cases(args.raw, args.work / "raw", s["cases"])
    config = make_config(args, {**s, "teacher_epochs": 1, "student_epochs": 1}, raw)
    P = Paths(config)
    runner = Runner(args, P, args.work / "logs")
    results["steps"] = runner.steps
    d = config["dataset"]["holdout"]
    runner.step("preprocess", [["preprocess", "run", "-d", P.dataset_id, "--raw-source", raw, "-c", CFG,
                                "--manifests", P.preprocess_manifest(CFG), "--planner", P.planner_class,
                                "-np", config["plans"]["num_processes"], "--holdout", d["n_test"],
                                "--holdout-seed", d["seed"]]])
    if args.epochs or s["teacher_epochs"]:  # fixed epochs (the tiny schedule): nothing to calibrate
        teacher_epochs, student_epochs = args.epochs or (s["teacher_epochs"], s["student_epochs"])
        results["calibration"] = {"fixed": True, "teacher_epochs": teacher_epochs, "student_epochs": student_epochs}
    else:
        calibration = calibrate(args, s, runner, config, P)
        teacher_epochs, student_epochs = budget_epochs(s, calibration, args.budget - runner.elapsed())
        results["calibration"] = {**calibration, "teacher_epochs": teacher_epochs, "student_epochs": student_epochs}
        print(f"calibration: {calibration['teacher_s_per_it']:.3f} s per iteration with {len(FOLDS)} teacher folds "
              f"side by side, {calibration['overhead_s']:.0f} s start-up + validation per training step -> teachers "
              f"{teacher_epochs} x {s['iterations']}, students {student_epochs} x {s['iterations']} iterations", flush=True)
    config = make_config(args, {**s, "teacher_epochs": teacher_epochs, "student_epochs": student_epochs}, raw)
    results["config"] = config

    t = runner.threads(len(FOLDS))
    runner.step("train_teacher", [teacher_command(config, P, f, teacher_epochs, s["iterations"], t) for f in FOLDS])
    teachers = teacher_sets(config, P.teacher_folder)[0]
    runner.step("teacher_manifest", [["teachers", "manifest", P.teacher_folder, "-c", CFG, "-f", *FOLDS,
                                      "-chk", teachers["checkpoint"], "-o", P.teacher_manifest_of(teachers["name"])]])

    students = students_by_folder(config)
    cache = next(sp for st, sp in students.values() if st.kd).softlabel_name
    sl, n_shards = config["softlabels"], config["softlabels"]["shards"]
    store = P.softlabel_cache(cache)
    runner.step("softlabels_shard", [
        ["softlabels", "fill", "-o", store, "-t", P.teacher_manifest_of(teachers["name"]), "-w", teachers["weight"],
         "-m", P.preprocess_manifest(CFG), "-T", config["distillation"]["temperature"], "--folds-per-case", "all",
         "--step-size", sl["step_size"], *([] if sl["mirroring"] else ["--disable-mirroring"]), "--dtype", sl["dtype"],
         "--shard", f"{i}/{n_shards}", "--device", sl["device"], "--threads", runner.threads(n_shards),
         "--marker", P.softlabel_shard(i, cache)] for i in range(1, n_shards + 1)])
    runner.step("softlabels_finalize", [["softlabels", "finalize", store, "-m", P.preprocess_manifest(CFG)]])

    rs = config["distillation"]["reduction_factors"]
    runner.step("student_plans", [["student", "plans", P.student_base_plans_file, "-r", r, "-o", P.student_plans_file(r)]
                                  for r in rs])
    t = runner.threads(len(students))
    runner.step("train_student", [
        ["student", "train", "-d", P.dataset_id, "-p", sp.student_plans_name(st.r), "-c", CFG, "-f", 0,
         *(["--cache", store] if st.kd else ["--baseline"]), "--threads", t, "--set", *student_set_args(config, name)]
        for name, (st, sp) in students.items()])
    names = ", ".join(f"{st.label} s{st.seed}" for st, _ in students.values())
    passed(f"trained {len(FOLDS)} teacher folds and {len(students)} students ({names})")

    images, labels = P.evaluation_images("test"), P.evaluation_labels("test")
    runner.step("evaluation_cases", [["evaluate", "cases", "--cases", *holdout_cases(config), "--raw", raw,
                                      "--images", images, "--labels", labels]])
    ev = config["evaluation"]
    predictions = {"teachers": ["-m", P.teacher_folder, "-f", *FOLDS, "-chk", teachers["checkpoint"]]}
    predictions.update({f"{name}__fold_0": ["-m", P.model_folder(name), "-f", 0] for name in students})
    t = runner.threads(len(predictions))
    runner.step("predict", [["predict", "-i", images, "-o", P.predictions("test", label), *model,
                             # the teachers mirror as nnU-Net predicts by default (in the tiny CPU run none does)
                             *([] if ev["mirroring"] else ["--disable-mirroring"]),
                             "--step-size", ev["step_size"], "--device", ev["device"], "--threads", t, "--no-jit"]
                            for label, model in predictions.items()])
    runner.step("evaluate", [["evaluate", "table", *(P.predictions("test", label) for label in predictions),
                              "-l", labels, "--dataset-json", P.raw_dataset_json, "-o", P.evaluation("test"),
                              "--case-set", "test"]])
    for label in predictions:
        record = json.loads((P.predictions("test", label) / "fastkd_predict.json").read_text())
        if record["device"].split(":")[0] != args.device:
            raise StepFailed(f"predict: {label} ran on {record['device']}, not {args.device}")
    check_dice(P.evaluation("test") / "dice.json", s["min_dice"], passed)

    kd2 = next(name for name, (st, _) in students.items() if st.kd and st.r == 2 and st.seed == s["seeds"][0])
    results["predict_timing"] = time_predict(args, runner, P, kd2, images, ev["mirroring"], passed)
    results["training"] = training_rows(P, students, FOLDS)


def check_dice(path: Path, min_dice: float, passed) -> None:
    rows = json.loads(path.read_text())["rows"]
    teachers = next(r for r in rows if r["label"] == "teachers")
    bad = [r["label"] for r in rows if not 0.0 <= r["mean_dice"] <= 1.0]
    if bad:
        raise StepFailed(f"evaluate: mean Dice outside [0, 1] for {bad}")
    if teachers["mean_dice"] < min_dice:
        raise StepFailed(f"evaluate: the teacher ensemble's mean Dice {teachers['mean_dice']:.3f} < {min_dice} "
                         "on the held-out cases: the teachers did not learn")
    best = max((r for r in rows if r["label"] != "teachers"), key=lambda r: r["mean_dice"])
    passed(f"evaluate: teacher ensemble mean Dice {teachers['mean_dice']:.3f} >= {min_dice}; best student "
           f"{best['label']} {best['mean_dice']:.3f} ({len(rows)} models, held-out cases)")


#: the timed ``fastkd predict`` runs: (tile batch, where each case is resampled and segmented)
PREDICT_TIMINGS = ((1, "device"), (8, "device"), (8, "cpu"))


def time_predict(args, runner: Runner, P: Paths, model: str, images: Path, mirroring: bool, passed) -> list[dict]:
    """``fastkd predict`` of one student, one run after the other (:data:`PREDICT_TIMINGS`): tiles one per
    forward and 8 per forward, resampled on the device, and 8 per forward with nnU-Net's CPU resampling.
    Seconds per case of the whole run and of the network alone, and the run's start-up, from each record."""
    rows, runs, folder = [], {}, P.model_folder(model)
    for tb, where in PREDICT_TIMINGS:
        name = f"tile_batch_{tb}_resample_{where}"
        out = args.work / "timing" / name
        runner.step(f"predict_{name}", [["predict", "-i", images, "-o", out, "-m", folder, "-f", 0,
                                         "--tile-batch", tb, "--resample", where, "--device", args.device,
                                         *([] if mirroring else ["--disable-mirroring"]), "--no-jit",
                                         "--threads", runner.threads(1)]])
        record = json.loads((out / "fastkd_predict.json").read_text())
        if (record["tile_batch"], record["resample"]) != (tb, where):
            raise StepFailed(f"predict_{name}: ran at tile batch {record['tile_batch']}, resample "
                             f"{record['resample']} (asked: {tb}, {where})")
        runs[tb, where] = record
        detail = (f"{record['cases']} cases, mirroring {record['mirroring']}, jit {record['jit']}, "
                  f"device {record['device']}")
        rows += [{"kind": "predict", "name": f"{model} fold 0 tile batch {tb} resample {where}: {what}",
                  "seconds": record[key], "detail": detail}
                 for key, what in (("seconds_per_case", "s/case whole run"), ("seconds_network_per_case",
                                   "s/case network"), ("seconds_startup", "s start-up (once per run)"))]
    net1, net8 = (runs[tb, "device"]["seconds_network_per_case"] for tb in (1, 8))
    on_device, on_cpu = (runs[8, where]["seconds_per_case"] for where in ("device", "cpu"))
    passed(f"predict timing: network {net1:.3f} s/case at tile batch 1, {net8:.3f} at 8 ({net1 / net8:.2f}x); whole "
           f"case at tile batch 8 {on_device:.2f} s resampled on the device, {on_cpu:.2f} s on the CPU "
           f"({on_cpu / on_device:.2f}x)")
    return rows


def training_rows(P: Paths, students: dict, folds: list) -> list[dict]:
    """Mean epoch time and seconds per iteration of every training (nnU-Net's training logs)."""
    runs = [(f"teacher fold {f}", P.teacher_folder / f"fold_{f}", P.config["teachers"]["schedule"]) for f in folds]
    runs += [(f"{st.label} s{st.seed} fold 0", fold_folder(sp.model_folder(n), 0), sp.config["student"]["schedule"])
             for n, (st, sp) in students.items()]
    rows = []
    for name, folder, sched in runs:
        times = epoch_times(folder)
        mean = sum(times) / len(times)
        its = sched["iterations_per_epoch"] + sched["val_iterations_per_epoch"]
        rows.append({"kind": "train", "name": name, "seconds": mean,
                     "detail": f"mean epoch time of {len(times)} epochs; {mean / its:.4f} s/it"})
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    s = dict(SCHEDULES[args.schedule])
    s.update({k: v for k, v in (("cases", args.cases), ("iterations", args.iterations)) if v})
    args.work, args.out = args.work.resolve(), args.out.resolve()
    for folder, name in ((args.work, "--work"), (args.out, "--out")):
        if folder.exists() and any(folder.iterdir()):
            print(f"FAIL setup: {name} {folder} is not empty (a fresh folder is needed)", file=sys.stderr)
            return 2
        folder.mkdir(parents=True, exist_ok=True)
    results, lines, start = {"schedule": args.schedule, "settings": s, "device": args.device}, [], time.perf_counter()
    failed = None
    try:
        run_dag(args, s, results, lines)
        P = Paths(results["config"])
        shutil.copy(P.evaluation("test") / "dice.tsv", args.out / "dice.tsv")
        shutil.copy(P.evaluation("test") / "dice.png", args.out / "dice.png")
        steps = [{"kind": "step", "name": st["step"], "seconds": st["seconds"], "detail": f"{len(st['commands'])} command(s)"}
                 for st in results["steps"]]
        write_tsv(args.out / "timing.tsv", steps + results["training"] + results["predict_timing"])
        students = students_by_folder(results["config"])
        # first seed's students, teacher fold 0, the other students, the other folds: as many as fit
        students_ = [(st.seed != s["seeds"][0], f"{st.label} s{st.seed} fold 0",
                      fold_folder(sp.model_folder(n), 0) / "checkpoint_final.pth") for n, (st, sp) in students.items()]
        teachers = [(f != 0, f"teacher fold {f}", P.teacher_checkpoint(f)) for f in FOLDS]
        order = [m for m in students_ if not m[0]] + [t for t in teachers if not t[0]] + \
                [m for m in students_ if m[0]] + [t for t in teachers if t[0]]
        tables = len(list(args.out.iterdir())) + 1  # and results.json
        results["models"] = pack_models(args.out, [(label, c) for _, label, c in order],
                                        (MAX_FILES - tables) * MAX_FILE_BYTES)
        lines.append(f"PASS packed {len(results['models']['packed'])} checkpoints (fp16, weights only) in "
                     f"{len(results['models']['parts'])} part(s); left out: {results['models']['left_out'] or 'none'}")
        print(lines[-1])
    except (StepFailed, FastkdError) as e:  # a failed step; a config or input fastkd refuses
        failed = str(e)
    except Exception as e:  # noqa: BLE001  (anything else is a failed step too: named, never swallowed)
        failed = f"driver: {type(e).__name__}: {e}"
    results["seconds_total"] = time.perf_counter() - start
    if failed:
        lines.append(f"FAIL {failed}")
        print(lines[-1], file=sys.stderr, flush=True)
    results["lines"] = lines
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    problems = check_results(args.out)
    for problem in problems:
        print(f"FAIL results folder: {problem}", file=sys.stderr)
    if not failed and not problems:
        print(f"PASS results folder: {len(list(args.out.iterdir()))} files, each <= 16 MiB ({args.out})")
    print(f"{'FAIL' if failed or problems else 'PASS'} gpu run: {results['seconds_total']:.0f} s in all")
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
