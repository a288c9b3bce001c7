"""Benchmark of the student's training speed: two side-by-side ratios from one run on real data.

Machines are noisy, so every figure is a RATIO of training speeds measured in the same run on the
same machine, in interleaved blocks, never an absolute timing goal.

1. KD student iterations/s / stock nnU-Net iterations/s (goal >= 0.95). ``nnUNetTrainerFastKD``
   (soft labels read from the cache by :class:`fastkd.student.loader.KDDataLoader` in nnU-Net's
   augmentation workers, KD loss) against stock ``nnUNetTrainer`` on the SAME student plans, batch,
   patch, device, torch threads and number of augmentation workers (``nnUNet_n_proc_DA``).
2. KD student iterations/s / online-distillation iterations/s (goal >= 4 on a GPU; on CPU reported
   for information). Online distillation is the reference's (FastnnUNet's) way, implemented here as
   :class:`nnUNetTrainerFastKDOnline`, a subclass of ``nnUNetTrainerFastKD`` that keeps nnU-Net's
   stock training loader (no cache) and, in ``train_step``, runs EVERY teacher fold (5 networks, eval
   mode, no grad, fp32, all resident on the device) on the augmented batch, averages the folds' logits
   and takes ``softmax(mean / T)`` (``sigmoid`` for region datasets) as the soft labels; the student
   step after that is ``nnUNetTrainerFastKD.train_step`` unchanged. The only difference to the KD run
   is thus teacher forwards instead of cache reads. Also printed: teacher forwards per student step
   (one batched forward per fold).

What is timed, per block (one trainer): the trainer is constructed, ``on_train_start()`` starts
nnU-Net's own loaders (``get_dataloaders``: ``NonDetMultiThreadedAugmenter`` with ``--da-workers``
processes, or nnU-Net's ``SingleThreadedAugmenter`` with 0) and ``on_train_epoch_start()`` sets train
mode, as ``run_training`` does; none of that is timed. Then warm-up iterations, untimed:
``--warmup``, plus for KD and stock the batches the augmenter buffers (2 x ``num_cached`` + one per
worker), so their timed iterations never consume batches prefetched during start-up (which would
hide a loader slower than the step). Online skips that drain: it consumes the same stock loader
more slowly than stock does, so its buffers stay full in steady state and start-up prefetching
does not change what is timed (were it otherwise, it could only make online look faster, which
keeps figure 2 conservative), while draining would cost minutes of teacher forwards on a CPU. Then ``--iterations`` calls of
``trainer.train_step(next(trainer.dataloader_train))`` are timed as one wall-clock interval (CUDA
synchronised at its end): data loading, augmentation (in the workers, which compete for the same
CPU), transfer, forward, loss, backward and optimizer step, plus the teacher forwards for online. The
loaders are shut down after each block (``_finish()``); nothing is checkpointed and no validation
runs. Blocks run KD, stock, online in each of ``--repeats`` rounds (order reversed in odd rounds);
each figure is the median of the per-round ratios, printed with the raw iterations/s. The students
run as in production: settings from :func:`fastkd.student.run.student_settings` on the config
schema's defaults (with ``--temperature``, ``--alpha``, ``--batch-size``), and nnU-Net's
``torch.compile`` of the student networks, which nnU-Net does on CUDA only, unless ``--no-compile``;
compilation happens in a block's first step, so ``--warmup`` must be >= 1 then.

Training cases: the first ``--cases`` sorted cases (default 20, the cases of ``bench_cache.py``).
Every trainer trains with nnU-Net's ``fold = "all"`` on a benchmark-local ``nnUNet_preprocessed``
(``<work>/bench_student/``) whose data folder holds symlinks to exactly those cases' preprocessed
files, so all three runs sample the same cases with unmodified trainer code. The student plans are
written there by :func:`fastkd.student.plans.write_student_plans` (``-r``, block strategy ``keep``).
The soft-label cache (``<work>/bench_student/softlabels.zarr``, uint8) is reused when complete and
made by the same teachers at the same T; else copied from a matching complete store of
``bench_cache.py`` (``<work>/runs/softlabels_*.zarr``, then verified), else computed with
:func:`fastkd.softlabels.fill_cache` + :func:`fastkd.softlabels.finalize_cache`.

Setup (idempotent, shared with ``bench_cache.py`` through ``--work``, by importing its functions):
``fastkd preprocess run`` (skipped when its manifest exists) and the teachers (``--teachers
FOLDER``, or 5 short folds trained by ``fastkd teachers train``) with their manifest.
Results: a table on stdout and ``<work>/bench_student.json``; trainer chatter in ``<work>/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cache  # noqa: E402  (its setup functions: the same work dir serves both benchmarks)

CONFIGURATION = bench_cache.CONFIGURATION
KINDS = ("kd", "stock", "online")
GOAL_STOCK, GOAL_ONLINE = 0.95, 4.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bench_cache.add_setup_arguments(p)
    p.add_argument("--reduction-factor", type=int, default=2, help="student features_per_stage = max(f // r, 8)")
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per block")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed iterations per block, on top of the batches the augmenter prefetches")
    p.add_argument("--repeats", type=int, default=2, help="rounds of (KD, stock, online) blocks")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every run (default: the plans')")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of every network")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the training process")
    p.add_argument("--da-workers", type=int, default=1,
                   help="nnUNet_n_proc_DA of every run (augmentation processes; 0 = in the training process)")
    p.add_argument("--temperature", type=float, default=3.0, help="distillation temperature")
    p.add_argument("--alpha", type=float, default=0.3, help="KD weight (the reference's default)")
    p.add_argument("--no-compile", action="store_true",
                   help="no torch.compile of the students (nnUNet_compile=0); by default nnU-Net compiles them "
                        "where it does in training, i.e. on CUDA")
    args = p.parse_args(argv)
    bench_cache.check_setup_arguments(p, args)
    for name in ("reduction_factor", "iterations", "repeats", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    for name in ("warmup", "da_workers"):
        if getattr(args, name) < 0:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 0")
    if args.device == "cuda" and not args.no_compile and args.warmup < 1:
        p.error("--warmup 0 on CUDA would time torch.compile's compilation (first step): use --warmup >= 1 "
                "or --no-compile")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size = {args.batch_size}: must be >= 1")
    if not args.temperature > 0 or not 0 < args.alpha <= 1:
        p.error(f"--temperature {args.temperature} must be > 0 and --alpha {args.alpha} in (0, 1]")
    return args


# -- setup ----------------------------------------------------------------------------------------
def bench_preprocessed(root: Path, source: Path, plans_name: str, data_identifier: str, cases: list[str]) -> Path:
    """``<root>/<dataset>/``: nnU-Net's files of ``source`` (dataset.json, fingerprint, the plans the data
    was preprocessed with) and a data folder of symlinks to the files of ``cases`` only.

    nnU-Net's ``fold = "all"`` trains on every case of the data folder, so every trainer samples
    exactly these cases. Rebuilt on every run (only links are removed, never the data).
    """
    folder = root / source.name
    data = folder / data_identifier
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    for name in ("dataset.json", "dataset_fingerprint.json", f"{plans_name}.json"):
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to((source / name).resolve())
    for case in cases:
        files = [f for f in (source / data_identifier).glob(f"{case}*")
                 if f.name.split(".")[0] in (case, f"{case}_seg")]
        if not any(f.name == f"{case}.pkl" for f in files):
            sys.exit(f"bench_student: {source / data_identifier} lacks the preprocessed case {case}")
        for f in files:
            (data / f.name).symlink_to(f.resolve())
    return folder


def usable_cache(path: Path, teacher: dict, cases: list[str], temperature: float) -> bool:
    """A complete uint8 cache of these teachers (same checkpoints) at this T holding every case."""
    import numpy as np

    from fastkd.cache import CacheError, SoftLabelCache

    try:
        cache = SoftLabelCache(path)
    except (CacheError, OSError):
        return False
    p = cache.provenance
    shas = {f: e["sha256"] for f, e in teacher["folds"].items()}
    return (np.isclose(p["temperature"], temperature) and p["dtype"] == "uint8" and len(p["teachers"]) == 1
            and p["teachers"][0]["sha256"] == shas and set(cases) <= set(cache.cases))


def setup_cache(args, store: Path, teacher_manifest: Path, case_manifest: Path, cases: list[str],
                preprocessed: Path) -> str:
    """A complete soft-label cache of ``cases`` at ``store``; returns how it was obtained.

    ``preprocessed``: nnU-Net's folder of every case's ``<case>.b2nd`` (a copied store is verified
    against it)."""
    from fastkd.cache import verify
    from fastkd.config import default
    from fastkd.softlabels import fill_cache, finalize_cache

    teacher = json.loads(teacher_manifest.read_text())
    if usable_cache(store, teacher, cases, args.temperature):
        return "reused"
    shutil.rmtree(store, ignore_errors=True)
    tmp = store.with_name(store.name + ".copy")
    for candidate in sorted((args.work / "runs").glob("softlabels_*.zarr")):
        if not usable_cache(candidate, teacher, cases, args.temperature):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        try:  # bench_cache.py deletes its stores when it runs again: copy, then check the copy
            shutil.copytree(candidate, tmp)
        except OSError:
            continue
        if usable_cache(tmp, teacher, cases, args.temperature) and not verify(tmp, preprocessed):
            tmp.rename(store)
            return f"copied from {candidate}"
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"setup: computing the soft labels of {len(cases)} cases (fastkd.softlabels.fill_cache) ...", flush=True)
    start = time.perf_counter()
    fill_cache(store, [teacher_manifest], case_manifest, args.temperature, step_size=default("softlabels.step_size"),
               mirroring=default("softlabels.mirroring"), dtype="uint8", device=args.device, progress=False)
    finalize_cache(store, case_manifest)
    return f"computed in {time.perf_counter() - start:.0f} s"


# -- the trainers ---------------------------------------------------------------------------------
def online_trainer_class():
    """``nnUNetTrainerFastKDOnline`` (defined lazily: nnU-Net must not be imported before its env is set)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from fastkd.student.trainers import nnUNetTrainerFastKD

    class nnUNetTrainerFastKDOnline(nnUNetTrainerFastKD):
        """Online distillation as the reference does it: every teacher fold on every augmented batch.

        Set ``teachers`` (fold networks in eval mode on the device) before the first step. Stock
        nnU-Net loaders (no cache); soft labels = ``softmax(mean over folds of fp32 logits / T)``.
        """

        teachers: list = []

        def check_cache(self) -> None:  # reads no cache
            pass

        def get_dataloaders(self):
            return nnUNetTrainer.get_dataloaders(self)

        def train_step(self, batch: dict) -> dict:
            data = batch["data"].to(self.device, non_blocking=True)
            with torch.no_grad():
                logits = None
                for network in self.teachers:
                    out = network(data)
                    out = (out[0] if isinstance(out, (list, tuple)) else out).float()
                    logits = out if logits is None else logits.add_(out)
                logits /= len(self.teachers) * self.settings["temperature"]
                soft = torch.sigmoid(logits) if self.label_manager.has_regions else torch.softmax(logits, 1)
            batch["data"], batch["softlabels"] = data, soft
            return super().train_step(batch)

    return nnUNetTrainerFastKDOnline


class Trainers:
    """Builds a fresh trainer of each kind on the student plans (fold 'all' of the benchmark dataset)."""

    def __init__(self, dataset_name: str, plans_name: str, settings: dict, batch_size: int | None, device: str,
                 teachers: list):
        import torch
        from nnunetv2.paths import nnUNet_preprocessed, nnUNet_results

        from fastkd.student.run import prepare_fold_folder, student_fold_folder

        self.dataset_name, self.plans_name, self.batch_size = dataset_name, plans_name, batch_size
        self.device, self.teachers = torch.device(device), teachers
        base = Path(nnUNet_preprocessed) / dataset_name
        self.plans = json.loads((base / f"{plans_name}.json").read_text())
        self.dataset_json = json.loads((base / "dataset.json").read_text())
        self.online_class = online_trainer_class()
        prepare_fold_folder(student_fold_folder(nnUNet_results, dataset_name, plans_name, CONFIGURATION, "all",
                                                kd=True), settings)
        online = (Path(nnUNet_results) / dataset_name
                  / f"{self.online_class.__name__}__{plans_name}__{CONFIGURATION}" / "fold_all")
        prepare_fold_folder(online, settings)

    def make(self, kind: str):
        import copy

        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        from fastkd.student.run import _build_trainer

        if kind == "kd":  # exactly as `fastkd student train` builds it
            return _build_trainer(self.dataset_name, self.plans_name, CONFIGURATION, "all", True, False,
                                  self.device, False)
        plans = dict(copy.deepcopy(self.plans), continue_training=False)
        if kind == "stock":
            if self.batch_size:  # the KD trainers take it from their settings
                plans["configurations"][CONFIGURATION]["batch_size"] = self.batch_size
            return nnUNetTrainer(plans, CONFIGURATION, "all", self.dataset_json, self.device)
        trainer = self.online_class(plans, CONFIGURATION, "all", self.dataset_json, self.device)
        trainer.teachers = self.teachers
        return trainer


def prefetched(loader) -> int:
    """Batches nnU-Net's augmenter can hold before the first ``next`` of a step (0 single-threaded)."""
    if not hasattr(loader, "num_cached"):
        return 0
    # multiprocessing queue + results-loop queue (num_cached each) + one item held per worker
    return 2 * loader.num_cached + loader.num_processes


def shutdown(trainer) -> None:
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        for loader in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()


def time_block(trainers: Trainers, kind: str, iterations: int, warmup: int, log: Path) -> dict:
    """One block: fresh trainer and loaders (untimed), warm-up (untimed), ``iterations`` timed steps."""
    import torch

    cuda = trainers.device.type == "cuda"
    with open(log, "a") as f, contextlib.redirect_stdout(f):
        trainer = trainers.make(kind)
        trainer.on_train_start()
        trainer.on_train_epoch_start()
    try:
        loader = trainer.dataloader_train
        # online is the slower consumer of the same stock loader: its buffers stay full, so batches
        # prefetched during start-up cannot speed it up, and draining them would cost minutes of teacher forwards
        n_warmup = warmup + (prefetched(loader) if kind != "online" else 0)
        for _ in range(n_warmup):
            trainer.train_step(next(loader))
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iterations):
            out = trainer.train_step(next(loader))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if ("kd_loss" in out) != (kind != "stock"):  # the KD runs really distil, the stock one does not
            sys.exit(f"bench_student: the {kind} trainer's step returned {sorted(out)}: "
                     f"{'no' if kind != 'stock' else 'a'} KD loss")
        info = {"batch_size": trainer.batch_size, "patch_size": list(trainer.configuration_manager.patch_size),
                "features_per_stage": list(trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"]),
                "augmenter": type(loader).__name__}
        dl = getattr(loader, "generator", None) or getattr(loader, "data_loader", None)
        info["training_cases"] = len(dl._data.identifiers) if dl is not None else None
    finally:
        shutdown(trainer)
        del trainer
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"kind": kind, "iterations": iterations, "warmup": n_warmup, "seconds": seconds,
            "its_per_second": iterations / seconds, **info}


# -- report ---------------------------------------------------------------------------------------
def row(figure: str, value: float, goal: float | None = None, judged: bool = True) -> dict:
    """``>=`` goals; a goal that is not judged on this device shows as info."""
    if goal is None:
        result = ""
    else:
        result = ("PASS" if value >= goal else "MISS") if judged else "info"
    return {"figure": figure, "value": value, "goal": goal, "result": result}


def table(rows: list[dict]) -> str:
    lines = [f"{'figure':<62} {'value':>9}  {'goal':>6}  result", "-" * 88]
    for r in rows:
        goal = "" if r["goal"] is None else f">= {r['goal']:g}"
        lines.append(f"{r['figure']:<62} {r['value']:>9.4g}  {goal:>6}  {r['result']}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset_id = args.dataset_id
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    wall_start = time.perf_counter()

    # shared setup, in bench_cache.py's nnU-Net folders (its subprocesses get that environment)
    env = bench_cache.nnunet_env(args.work, args.threads)
    pm = json.loads(bench_cache.setup_preprocessed(args, env, dataset_id).read_text())
    teacher_folder, teacher_manifest, short = bench_cache.setup_teachers(args, env, dataset_id, pm)
    cases = sorted(pm["cases"])[:args.cases]
    if len(cases) < args.cases:
        sys.exit(f"bench_student: --cases {args.cases}: the dataset has only {len(cases)} cases")

    # this process: nnU-Net on the benchmark dataset of `cases`, before nnU-Net is imported
    root = args.work / "bench_student"
    (root / "nnUNet_results").mkdir(parents=True, exist_ok=True)
    os.environ.update({"nnUNet_preprocessed": str(root / "nnUNet_preprocessed"),
                       "nnUNet_results": str(root / "nnUNet_results"),
                       "nnUNet_n_proc_DA": str(args.da_workers),
                       # nnU-Net's default: compile, which it then does on CUDA only
                       "nnUNet_compile": "0" if args.no_compile else "1"})
    source = Path(env["nnUNet_preprocessed"]) / pm["dataset_name"]
    dataset_folder = bench_preprocessed(root / "nnUNet_preprocessed", source, pm["plans_name"], pm["data_identifier"],
                                        cases)
    case_manifest = bench_cache.subset_manifest(pm, cases, root / f"manifest_{len(cases)}cases.json")

    import torch

    from fastkd.softlabels import TeacherEnsemble
    from fastkd.student.plans import student_plans_name, write_student_plans
    from fastkd.config import fill_defaults, load_schema
    from fastkd.student.run import student_settings

    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_student: --device cuda but torch sees no CUDA GPU")
    torch.set_num_threads(args.threads)
    teacher_plans = json.loads((teacher_folder / "plans.json").read_text())
    plans_name = student_plans_name(teacher_plans["plans_name"], args.reduction_factor)
    write_student_plans(teacher_folder / "plans.json", dataset_folder / f"{plans_name}.json", args.reduction_factor)

    store = root / "softlabels.zarr"
    how = setup_cache(args, store, teacher_manifest, case_manifest, cases, source / pm["data_identifier"])
    print(f"setup: soft-label cache {store} ({how})")

    teacher = json.loads(teacher_manifest.read_text())
    log = args.work / "logs" / "bench_student_trainers.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        ensemble = TeacherEnsemble([teacher], [1.0], step_size=0.5, mirroring=False, device=args.device)
    networks = ensemble.members[0][1]  # one network per fold, eval mode, on the device
    # production's settings: the config's defaults, with this run's T, alpha and batch size
    config = fill_defaults({"distillation": {"temperature": args.temperature, "alpha": args.alpha},
                            "student": {"schedule": {"batch_size": args.batch_size}}}, load_schema())
    settings = student_settings(config, store, kd=True)
    trainers = Trainers(pm["dataset_name"], plans_name, settings, args.batch_size, args.device, networks)

    print(f"teachers: {teacher_folder} ({len(networks)} folds{', short-trained' if short else ''})")
    print(f"benchmark: student {plans_name} (r = {args.reduction_factor}), {len(cases)} training cases "
          f"({cases[0]} .. {cases[-1]}), T = {args.temperature}, alpha = {args.alpha}, {args.device}, "
          f"{args.threads} threads, {args.da_workers} augmentation workers; {args.repeats} rounds of "
          f"{args.iterations} timed iterations per trainer", flush=True)

    blocks = []
    for r in range(args.repeats):
        for kind in (KINDS if r % 2 == 0 else KINDS[::-1]):
            block = time_block(trainers, kind, args.iterations, args.warmup, log)
            blocks.append(dict(block, round=r))
            print(f"  round {r + 1}/{args.repeats} {kind:>6}: {block['its_per_second']:.3f} it/s "
                  f"({block['iterations']} iterations in {block['seconds']:.1f} s after {block['warmup']} warm-up)",
                  flush=True)

    first = blocks[0]
    same = ("batch_size", "patch_size", "features_per_stage", "augmenter", "training_cases")
    mismatched = sorted({b["kind"] for b in blocks if any(b[k] != first[k] for k in same)})
    if mismatched or first["training_cases"] not in (None, len(cases)):
        sys.exit(f"bench_student: the runs differ in {', '.join(same)} ({', '.join(mismatched)} vs "
                 f"{first['kind']}; {first['training_cases']} training cases, expected {len(cases)}): not comparable")

    its = {k: [b["its_per_second"] for b in blocks if b["kind"] == k] for k in KINDS}
    stock_ratios = [a / b for a, b in zip(its["kd"], its["stock"])]
    online_ratios = [a / b for a, b in zip(its["kd"], its["online"])]
    figures = {"kd_over_stock": statistics.median(stock_ratios), "kd_over_stock_rounds": stock_ratios,
               "kd_over_online": statistics.median(online_ratios), "kd_over_online_rounds": online_ratios,
               "its_per_second": its, "median_its_per_second": {k: statistics.median(v) for k, v in its.items()},
               "teacher_forwards_per_step": len(networks)}
    cuda = args.device == "cuda"
    rows = [
        row(f"1. KD student it/s / stock nnUNetTrainer it/s (median of {args.repeats})",
            figures["kd_over_stock"], GOAL_STOCK),
        row(f"2. KD student it/s / online distillation it/s (median of {args.repeats})",
            figures["kd_over_online"], GOAL_ONLINE, judged=cuda),
        row("   teacher forwards per online step (batched, one per fold)", len(networks)),
    ]
    elapsed = time.perf_counter() - wall_start
    med = figures["median_its_per_second"]
    print()
    print(f"raw figures (batch {first['batch_size']}, patch {first['patch_size']}, student features "
          f"{first['features_per_stage']}, {first['augmenter']}):")
    for k, name in (("kd", "KD student (cache)"), ("stock", "stock nnUNetTrainer"),
                    ("online", f"online ({len(networks)} teacher folds)")):
        print(f"  {name:<26} it/s: {', '.join(f'{v:.3f}' for v in its[k])} (median {med[k]:.3f}; "
              f"{med[k] * first['batch_size']:.2f} samples/s)")
    print(f"  per-round ratios: KD/stock {', '.join(f'{v:.3f}' for v in stock_ratios)}; "
          f"KD/online {', '.join(f'{v:.3f}' for v in online_ratios)}")
    if not cuda:
        print(f"  figure 2's goal (>= {GOAL_ONLINE:g}) is for a GPU; on CPU it is reported for information")
    print()
    print(table(rows))
    print(f"\nbench_student: done in {elapsed:.0f} s")

    out = args.work / "bench_student.json"
    out.write_text(json.dumps({
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cases": cases, "teacher_folder": str(teacher_folder), "short_trained_teachers": short,
        "student_plans": plans_name, "cache": str(store), "cache_origin": how, "student_settings": settings,
        "blocks": blocks, "figures": figures, "table": rows, "seconds": elapsed}, indent=2) + "\n")
    print(f"bench_student: figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
