"""Benchmark of the soft-label cache: four side-by-side ratios from one run on real data.

Machines are noisy, so every figure is a RATIO of two things measured in the same run on the same
machine (the two timed commands of figure 1 interleaved), never an absolute timing goal.

1. Soft-label pass / stock prediction, wall time (goal <= 1.1). ``fastkd softlabels`` (one shard,
   fresh store every run) over a preprocess manifest restricted to the benchmark cases, against
   ``nnUNetv2_predict`` with the same folds, cases, step size, mirroring, device and threads (its
   input folder holds symlinks to those cases' raw images). Both run as subprocesses, in alternating
   order (A B, B A, ...; ``--repeats`` pairs); reported: the median of the per-pair ratios and the raw
   seconds, and what each includes. Stock prediction also preprocesses and exports; the soft-label pass
   reads nnU-Net's preprocessed arrays and writes the cache: each does what its user needs from it.
   1b. The pass against its floor (goal <= 1.2): the teacher network forwards alone, every fold
   network called on random patch-sized tiles on the same device and threads as many times as the
   pass called them (the store's ``teacher_forwards``, counted by a hook at the network call, so it
   can disagree with the formula of figure 4, which then stops the benchmark); set against the pass's
   case loop (the marker's seconds: load, predict, encode, write; no start-up). Also printed: the
   pass's peak RSS (a wrapper process's ``RUSAGE_CHILDREN``).
2. Cache bytes on disk / nnU-Net's preprocessed bytes of the same cases (``<case>.b2nd`` +
   ``<case>_seg.b2nd``) (goal <= 0.5), and cache bytes / the soft labels as raw float32
   (C x voxels x 4 bytes), bytes per voxel and compression, for information.
3. Random training-patch reads per second / student training iterations per second (goal >= 10).
   Boxes come from nnU-Net's own sampler: an ``nnUNetDataLoader`` on the preprocessed benchmark cases
   with the student's initial patch size (as ``nnUNetTrainer`` computes it), ``get_bbox`` called per
   sample as ``generate_train_batch`` calls it (foreground oversampling of the last samples of each
   batch included); the boxes are drawn first, then only ``SoftLabelCache.read_crop`` is timed, under
   the one-thread limit nnU-Net's loader workers run with, on a cache opened once (case arrays opened
   before timing). The student is the teacher plans with ``features_per_stage = max(f // r, 8)``;
   ``nnUNetTrainer.train_step`` is timed on synthetic batches of the plans' batch and patch size with
   deep-supervision targets shaped as nnU-Net makes them. Reads and iterations are timed in
   alternating blocks. Also printed: whole batches of reads per second / iterations per second
   (>= 1 means one loader process keeps up with the student), and the read amplification of those
   boxes: voxels decompressed (every chunk a box touches, whole) per voxel read.
4. Teacher forwards spent on the cache / teacher forwards of online distillation at the default
   schedule, 1000 epochs x 250 steps x folds (goal <= 1/100). Cache forwards (tiles x mirror passes x
   folds per case) are the finished store's ``teacher_forwards`` for the benchmark cases, and are
   extrapolated to every case of the dataset from the manifest shapes with the same formula.

Setup (idempotent, reused from ``--work``): nnU-Net folders inside the work dir, ``fastkd
preprocess run`` (skipped when its manifest exists), teachers (``--teachers FOLDER``, or 5 short folds
trained by ``fastkd teachers train``, skipping finished folds; ``--folds`` picks others) and their manifest
(``fastkd teachers manifest``). BraTS-sized data on a CPU: ``--teachers`` from ``configs/brats.yaml``'s
run (tiny-patch plans, folds 0 1) with ``--folds 0 1 --disable-mirroring`` (benchmarks/README.md).
Results: a table on stdout and ``<work>/bench_cache.json``; subprocess logs under ``<work>/logs/``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# fastkd's commands run torch on transparent huge pages (fastkd.cli.common.huge_pages); every process timed
# here, stock nnU-Net included, runs with the same setting (before torch loads), so ratios compare like
# with like; THP_MEM_ALLOC_ENABLE=0 in the environment turns it off for all of them
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

REPO = Path(__file__).resolve().parents[1]
DEFAULT_RAW = REPO / ".." / "shared" / "datasets" / "Dataset004_Hippocampus"
CONFIGURATION = "3d_fullres"
FOLDS = [0, 1, 2, 3, 4]  # the default of --folds
ONLINE_EPOCHS, ONLINE_STEPS = 1000, 250  # nnU-Net's default schedule, what online distillation runs
SEED = 0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_setup_arguments(p)
    p.add_argument("--repeats", type=int, default=2, help="interleaved (soft-label pass, stock predict) pairs")
    p.add_argument("--temperature", type=float, default=3.0, help="soft-label temperature")
    p.add_argument("--step-size", type=float, default=0.5, help="sliding-window step, fraction of the patch")
    p.add_argument("--disable-mirroring", action="store_true", help="no test-time mirroring, in both passes")
    p.add_argument("--dtype", choices=["uint8", "float16"], default="uint8", help="cache dtype")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of every network")
    p.add_argument("--threads", type=int, default=2, help="CPU threads of every timed process")
    p.add_argument("--reads", type=int, default=300, help="random training-patch reads to time")
    p.add_argument("--reduction-factor", type=int, default=2, help="student features_per_stage = max(f // r, 8)")
    p.add_argument("--train-iterations", type=int, default=5,
                   help="timed student iterations (after 2 warm-up), alternating with blocks of the reads")
    args = p.parse_args(argv)
    check_setup_arguments(p, args)
    for name in ("repeats", "threads", "reads", "reduction_factor", "train_iterations"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    return args


def add_setup_arguments(p: argparse.ArgumentParser) -> None:
    """The setup options every benchmark shares (data, work dir, teachers, cases)."""
    p.add_argument("--raw", type=Path, default=DEFAULT_RAW,
                   help="nnU-Net raw dataset folder DatasetXXX_Name")
    p.add_argument("--work", type=Path, default=Path("/tmp/fastkd_bench_cache"),
                   help="work dir shared by the benchmarks (nnU-Net folders, teachers, caches, logs, JSON)")
    p.add_argument("--teachers", type=Path, default=None,
                   help="existing nnU-Net model folder Trainer__Plans__3d_fullres with the --folds "
                        "(default: train short folds in the work dir)")
    p.add_argument("--folds", type=int, nargs="+", default=FOLDS, help="teacher folds used by every pass")
    p.add_argument("--teacher-epochs", type=int, default=2, help="epochs per fold of the short-trained teachers")
    p.add_argument("--teacher-iterations", type=int, default=10, help="iterations per epoch of those teachers")
    p.add_argument("--cases", type=int, default=20, help="benchmark cases: the first N of the sorted cases")
    p.add_argument("--gpu-memory-target", type=float, default=None,
                   help="planner GPU memory target in GB when the benchmark plans (no --teachers): a smaller "
                        "patch for CT-sized synthetic data on a CPU (default: nnU-Net's)")


def check_setup_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("teacher_epochs", "teacher_iterations", "cases"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    if len(set(args.folds)) != len(args.folds) or not set(args.folds) <= set(FOLDS):
        p.error(f"--folds {args.folds}: distinct folds among {FOLDS}")
    if args.gpu_memory_target is not None and args.teachers is not None:
        p.error("--gpu-memory-target plans a new grid; --teachers brings its own plans (give one of the two)")
    if not (args.raw / "dataset.json").is_file():
        p.error(f"raw dataset {args.raw} not found (no dataset.json there); the default is "
                "../shared/datasets/Dataset004_Hippocampus relative to the repository root; pass --raw DatasetXXX_Name")
    if args.teachers is not None and len(args.teachers.resolve().name.split("__")) != 3:
        p.error(f"--teachers {args.teachers}: expected an nnU-Net model folder named Trainer__Plans__configuration "
                "(stock nnUNetv2_predict finds models by those names)")
    from fastkd.nnunet import parse_dataset_name

    try:
        args.dataset_id, _ = parse_dataset_name(args.raw.resolve().name)
    except ValueError as e:
        p.error(f"--raw: {e}")


# -- subprocesses and environment -----------------------------------------------------------------
def nnunet_env(work: Path, threads: int) -> dict:
    """nnU-Net folders inside the work dir and bounded pools; set in this process too (nnU-Net reads lazily)."""
    env = {
        "nnUNet_raw": str(work / "nnUNet_raw"),
        "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "nnUNet_n_proc_DA": "1",
        # stock prediction caps torch's threads by this one: same threads as `fastkd softlabels --threads`
        "nnUNet_def_n_proc": str(threads),
        "OMP_NUM_THREADS": str(threads),
    }
    os.environ.update(env)
    return dict(os.environ)


#: runs a command and prints its peak RSS (the maximum over its process tree's waited-for children)
PEAK_RSS = ("import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
            "print(f'peak_rss_kb={resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}'); sys.exit(rc)")


def run(cmd: list[str], env: dict, log: Path, peak_rss: bool = False) -> float | tuple[float, int]:
    """Run ``cmd`` with its output in ``log``; return its wall time in seconds (and, with ``peak_rss``, its
    peak resident memory in bytes, measured by a wrapper process), exit naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        start = time.perf_counter()
        rc = subprocess.run([sys.executable, "-c", PEAK_RSS, *cmd] if peak_rss else cmd, env=env, stdout=f,
                            stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
    if rc != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        sys.exit(f"bench_cache: `{' '.join(cmd)}` failed (exit {rc}); log {log}:\n{tail}")
    if not peak_rss:
        return seconds
    kb = [int(line.split("=")[1]) for line in log.read_text().splitlines() if line.startswith("peak_rss_kb=")]
    return seconds, kb[-1] * 1024


def fastkd_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "fastkd", *map(str, args)]


def nnunet_script(name: str) -> str:
    """A console script of nnU-Net, from this interpreter's environment first."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.is_file() else shutil.which(name)
    if found is None:
        sys.exit(f"bench_cache: {name} not found next to {sys.executable} or on PATH (install nnunetv2)")
    return found


# -- setup ----------------------------------------------------------------------------------------
def setup_preprocessed(args, env: dict, dataset_id: int) -> Path:
    """Plan + preprocess the dataset once; return its preprocess manifest."""
    manifest = args.work / "manifest.json"
    if manifest.is_file():
        print(f"setup: reusing the preprocessed dataset ({manifest})")
        return manifest
    print("setup: planning and preprocessing (fastkd preprocess run) ...", flush=True)
    cmd = fastkd_cmd("preprocess", "run", "-d", dataset_id, "--raw-source", args.raw.resolve(), "-c", CONFIGURATION,
                     "--manifests", manifest, "-np", 2)
    if args.teachers is not None:  # the grid the given teachers were trained on
        cmd += ["--plans-from", str(args.teachers.resolve())]
    elif args.gpu_memory_target is not None:
        cmd += ["--gpu-memory-target", str(args.gpu_memory_target)]
    seconds = run(cmd, env, args.work / "logs" / "plan_preprocess.log")
    print(f"setup: preprocessed in {seconds:.0f} s")
    return manifest


def setup_teachers(args, env: dict, dataset_id: int, pm: dict) -> tuple[Path, Path, bool]:
    """(teacher model folder, its fastkd manifest, short-trained here?)."""
    results = Path(env["nnUNet_results"]) / pm["dataset_name"]
    if args.teachers is not None:
        folder = args.teachers.resolve()
        # stock nnUNetv2_predict finds models only under nnUNet_results/<dataset>/
        link = results / folder.name
        if link.resolve() != folder:
            results.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                link.unlink()
            link.symlink_to(folder, target_is_directory=True)
        short = False
    else:
        folder = results / f"nnUNetTrainer__{pm['plans_name']}__{CONFIGURATION}"
        for fold in args.folds:
            if (folder / f"fold_{fold}" / "checkpoint_final.pth").is_file():
                continue
            print(f"setup: training short teacher fold {fold} ({args.teacher_epochs} epochs x "
                  f"{args.teacher_iterations} iterations) ...", flush=True)
            seconds = run(fastkd_cmd("teachers", "train", "-d", dataset_id, "-c", CONFIGURATION, "-f", fold,
                                     "-p", pm["plans_name"], "--epochs", args.teacher_epochs,
                                     "--iterations", args.teacher_iterations, "--val-iterations", 1,
                                     "--batch-size", 2, "--save-every", 1, "--threads", args.threads,
                                     # their validation Dice is no figure here: one pass per tile suffices
                                     "--disable-validation-mirroring"),
                          env, args.work / "logs" / f"train_teacher_fold{fold}.log")
            print(f"setup: fold {fold} trained in {seconds:.0f} s")
        short = True
    manifest = args.work / "teachers.json"
    run(fastkd_cmd("teachers", "manifest", folder, "-c", CONFIGURATION, "-f", *args.folds, "-o", manifest), env,
        args.work / "logs" / "teachers.log")
    return folder, manifest, short


def subset_manifest(pm: dict, cases: list[str], out: Path) -> Path:
    """A copy of the preprocess manifest holding only the benchmark cases."""
    sub = dict(pm, cases={c: pm["cases"][c] for c in cases})
    out.write_text(json.dumps(sub, indent=2) + "\n")
    return out


def stock_input(raw: Path, cases: list[str], folder: Path) -> Path:
    """A folder of symlinks to the benchmark cases' raw images (the input of nnUNetv2_predict)."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    dataset_json = json.loads((raw / "dataset.json").read_text())
    files = get_filenames_of_train_images_and_targets(str(raw.resolve()), dataset_json)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for case in cases:
        for image in files[case]["images"]:
            (folder / Path(image).name).symlink_to(Path(image).resolve())
    return folder


# -- 1. wall time ---------------------------------------------------------------------------------
def bench_wall_time(args, env: dict, dataset_id: int, teacher_folder: Path, teacher_manifest: Path,
                    case_manifest: Path, cases: list[str]) -> dict:
    """Interleaved soft-label passes and stock predictions; the last store is kept for the other figures."""
    runs = args.work / "runs"
    inputs = stock_input(args.raw, cases, args.work / "stock_input")
    trainer, plans_name, _ = teacher_folder.name.split("__")
    softlabel_s, stock_s, store, compute_s, peak = [], [], None, [], []
    for i in range(args.repeats):
        def softlabels():
            nonlocal store
            store = runs / f"softlabels_{i}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(store.with_name(store.name + ".partial"), ignore_errors=True)
            marker = runs / f"softlabels_{i}.json"
            cmd = fastkd_cmd("softlabels", "fill", "-o", store, "-t", teacher_manifest, "-m", case_manifest,
                             "-T", args.temperature, "--step-size", args.step_size, "--dtype", args.dtype,
                             "--shard", "1/1", "--device", args.device, "--threads", args.threads, "--marker", marker)
            if args.disable_mirroring:
                cmd.append("--disable-mirroring")
            seconds, rss = run(cmd, env, args.work / "logs" / f"softlabels_{i}.log", peak_rss=True)
            softlabel_s.append(seconds)
            peak.append(rss)
            compute_s.append(json.loads(marker.read_text())["seconds"])  # the case loop alone

        def stock():
            out = runs / f"stock_{i}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [nnunet_script("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(dataset_id),
                   "-tr", trainer, "-p", plans_name, "-c", CONFIGURATION, "-f", *map(str, args.folds),
                   "-step_size", str(args.step_size), "-device", args.device, "-npp", "1", "-nps", "1",
                   "--disable_progress_bar"]
            if args.disable_mirroring:
                cmd.append("--disable_tta")
            stock_s.append(run(cmd, env, args.work / "logs" / f"stock_predict_{i}.log"))

        for job in ((softlabels, stock) if i % 2 == 0 else (stock, softlabels)):  # alternating order
            job()
        print(f"  pair {i + 1}/{args.repeats} ({'soft labels first' if i % 2 == 0 else 'stock first'}): soft labels "
              f"{softlabel_s[-1]:.1f} s (case loop {compute_s[-1]:.1f} s, peak RSS {peak[-1] / 1e9:.2f} GB), "
              f"stock {stock_s[-1]:.1f} s", flush=True)
    ratios = [a / b for a, b in zip(softlabel_s, stock_s)]
    return {"softlabel_seconds": softlabel_s, "stock_seconds": stock_s, "pair_ratios": ratios,
            "ratio": statistics.median(ratios), "store": str(store), "case_loop_seconds": compute_s,
            "softlabel_peak_rss_bytes": peak}


# -- 1b. the floor: the teacher network forwards alone ---------------------------------------------
def bench_floor(store: Path, teacher_manifest: Path, device: str, threads: int) -> dict:
    """Seconds of the teacher forwards alone: every fold network, on the device, called on random tiles of
    the patch size as many times as the soft-label pass called it (the store's counted forwards, spread
    evenly over the folds). No loading, padding, Gaussian weighting, softmax, encoding or writing."""
    import torch

    from fastkd.cache import SoftLabelCache
    from fastkd.softlabels import TeacherEnsemble

    cache = SoftLabelCache(store)
    teacher = json.loads(teacher_manifest.read_text())
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        ensemble = TeacherEnsemble([teacher], [1.0], step_size=0.5, mirroring=False, device=device)
    networks = ensemble.members[0][1]
    forwards = cache.attrs["teacher_forwards"]
    channels = len(teacher.get("channels", [])) or next(iter(networks[0].parameters())).shape[1]
    tile = torch.randn((1, channels, *cache.provenance["patch_size"]), device=device)
    torch.set_num_threads(threads)
    per_fold = [forwards // len(networks) + (i < forwards % len(networks)) for i in range(len(networks))]
    with torch.inference_mode():
        networks[0](tile)  # warm-up, untimed
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for network, n in zip(networks, per_fold):
            for _ in range(n):
                network(tile)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return {"forwards": forwards, "seconds": seconds}


def bench_sliding_window(case_manifest: Path, case_folder: Path, teacher_manifest: Path, args) -> dict:
    """Seconds of nnU-Net's own sliding window alone, the floor fastkd cannot go below while it predicts
    through nnU-Net's predictor: ``predict_sliding_window_return_logits`` of every fold on every
    benchmark case (same step size, mirroring, device and threads as the pass), i.e. the forwards plus
    nnU-Net's padding, tile copies, Gaussian weighting and float16 accumulation of C channels. Loading the
    case is not timed; no softmax, fold mean, encoding or writing."""
    import numpy as np
    import torch
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    from fastkd.softlabels import TeacherEnsemble

    teacher = json.loads(teacher_manifest.read_text())
    cases = sorted(json.loads(case_manifest.read_text())["cases"])
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        ensemble = TeacherEnsemble([teacher], [1.0], step_size=args.step_size, mirroring=not args.disable_mirroring,
                                   device=args.device)
    predictor, networks, _ = ensemble.members[0]
    dataset = infer_dataset_class(str(case_folder))(str(case_folder), cases)
    torch.set_num_threads(args.threads)
    seconds = 0.0
    with torch.inference_mode():
        for case in cases:
            data, _, _, _ = dataset.load_case(case)
            x = torch.from_numpy(np.ascontiguousarray(data[:], dtype=np.float32))
            for network in networks:
                predictor.network = network
                start = time.perf_counter()
                logits = predictor.predict_sliding_window_return_logits(x)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                seconds += time.perf_counter() - start
                del logits
    return {"seconds": seconds, "forwards": ensemble.forwards}


# -- 2. bytes -------------------------------------------------------------------------------------
def bench_storage(store: Path, preprocessed: Path, cases: list[str]) -> dict:
    from fastkd.cache import info

    report = info(store)
    b2nd = sum((preprocessed / f"{c}{suffix}.b2nd").stat().st_size for c in cases for suffix in ("", "_seg"))
    voxels = sum(c["voxels"] for c in report["cases"].values())
    return {"cache_bytes": report["bytes"], "preprocessed_b2nd_bytes": b2nd,
            "bytes_per_voxel": report["bytes"] / voxels, "compression": report["compression_ratio"],
            "float32_softlabel_bytes": report["float32_bytes"],
            "ratio_to_b2nd": report["bytes"] / b2nd, "ratio_to_float32": report["bytes"] / report["float32_bytes"]}


# -- 3. reads vs student iterations ---------------------------------------------------------------
def student_plans(plans: dict, reduction: int) -> dict:
    """The teacher plans with 3d_fullres features_per_stage = max(f // r, 8), under its own plans name."""
    student = copy.deepcopy(plans)
    cfg = student["configurations"][CONFIGURATION]
    if "architecture" not in cfg:
        sys.exit(f"bench_cache: plans {plans['plans_name']} {CONFIGURATION} has no architecture entry of its own")
    kwargs = cfg["architecture"]["arch_kwargs"]
    kwargs["features_per_stage"] = [max(f // reduction, 8) for f in kwargs["features_per_stage"]]
    student["plans_name"] = f"{plans['plans_name']}_benchStudent_r{reduction}"  # its own results folder
    return student


def make_student_trainer(plans: dict, dataset_json: dict, device: str, log: Path):
    """nnU-Net's stock trainer on the student plans, initialised (its chatter goes to ``log``)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    with open(log, "w") as f, contextlib.redirect_stdout(f):
        trainer = nnUNetTrainer(dict(plans, continue_training=False), CONFIGURATION, 0, dataset_json,
                                torch.device(device))
        trainer.initialize()
        _, _, initial_patch, _ = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    return trainer, [int(s) for s in initial_patch]


def draw_boxes(trainer, initial_patch: list[int], folder: Path, cases: list[str], n: int) -> list:
    """``n`` (case, bbox) pairs drawn the way nnUNetDataLoader.generate_train_batch draws them."""
    import numpy as np
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    np.random.seed(SEED)
    dataset = infer_dataset_class(str(folder))(str(folder), cases)
    loader = nnUNetDataLoader(dataset, trainer.batch_size, initial_patch, trainer.configuration_manager.patch_size,
                              trainer.label_manager, oversample_foreground_percent=trainer.oversample_foreground_percent,
                              sampling_probabilities=None, pad_sides=None,
                              probabilistic_oversampling=trainer.probabilistic_oversampling)
    boxes = []
    while len(boxes) < n:
        for j, case in enumerate(loader.get_indices()):
            data, _, _, properties = dataset.load_case(case)
            lbs, ubs = loader.get_bbox(data.shape[1:], loader.get_do_oversample(j), properties["class_locations"])
            boxes.append((case, [[lo, hi] for lo, hi in zip(lbs, ubs)]))
    return boxes[:n]


def bench_loading(store: Path, boxes: list, trainer, iterations: int, warmup: int = 2) -> tuple[float, float]:
    """(patch reads per second, student iterations per second), measured in alternating blocks.

    Reads: ``SoftLabelCache.read_crop`` of ``boxes`` on a cache opened once (case arrays opened
    before timing), one thread as in nnU-Net's loader workers. Iterations: ``train_step`` on a
    synthetic batch. Each of ``iterations`` rounds times one iteration, then its share of the reads,
    so that both rates see the same machine load.
    """
    import numpy as np
    import torch
    from threadpoolctl import threadpool_limits

    from fastkd.cache import SoftLabelCache

    cache = SoftLabelCache(store)
    for case in {case for case, _ in boxes}:
        cache.array(case)

    batch, patch = trainer.batch_size, list(trainer.configuration_manager.patch_size)
    heads = trainer.label_manager.num_segmentation_heads
    torch.manual_seed(SEED)
    data = torch.randn(batch, trainer.num_input_channels, *patch)
    # DownsampleSegForDSTransform's shapes: round(patch * scale) per deep-supervision output
    target = [torch.randint(0, heads, (batch, 1, *(round(p * s) for p, s in zip(patch, scale)))).to(torch.int16)
              for scale in trainer._get_deep_supervision_scales()]
    trainer.network.train()

    def step() -> float:
        start = time.perf_counter()
        trainer.train_step({"data": data, "target": target})
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    read_s = train_s = 0.0
    for share in np.array_split(np.arange(len(boxes)), iterations):
        train_s += step()
        with threadpool_limits(limits=1, user_api=None):
            start = time.perf_counter()
            for i in share:
                cache.read_crop(*boxes[i])
            read_s += time.perf_counter() - start
    return len(boxes) / read_s, iterations / train_s


def read_amplification(store: Path, boxes: list) -> dict:
    """Voxels decompressed per voxel read: a read decompresses every chunk its box (clipped to the
    volume) touches, whole; summed over ``boxes``. The same for every class channel, so per voxel."""
    import numpy as np

    from fastkd.cache import SoftLabelCache

    cache = SoftLabelCache(store)
    read = decompressed = 0
    for case, box in boxes:
        array = cache.array(case)
        shape, chunks = array.shape[-3:], array.chunks[-3:]
        inside = [(max(int(lo), 0), min(int(hi), n)) for (lo, hi), n in zip(box, shape)]  # numpy ints: JSON
        if any(lo >= hi for lo, hi in inside):
            continue
        touched = 1
        for (lo, hi), c in zip(inside, chunks):
            touched *= (hi - 1) // c - lo // c + 1
        read += int(np.prod([hi - lo for lo, hi in inside]))
        decompressed += touched * int(np.prod(chunks))
    if not read:
        raise SystemExit(f"read amplification: none of the {len(boxes)} boxes intersects its case's volume in {store}")
    return {"chunk_voxels": list(chunks), "voxels_read": read, "voxels_decompressed": decompressed,
            "ratio": decompressed / read}


# -- 4. teacher forwards --------------------------------------------------------------------------
def bench_forwards(store: Path, pm: dict) -> dict:
    from fastkd.cache import SoftLabelCache
    from fastkd.softlabels import tiles_per_case

    cache = SoftLabelCache(store)
    p = cache.provenance
    folds = sum(len(t["folds"]) for t in p["teachers"])
    passes = 2 ** len(p["mirror_axes"])

    def count(cases):
        # tiles x mirror passes x folds per case, as the soft-label job counts them
        return sum(tiles_per_case(pm["cases"][c]["shape"][1:], p["patch_size"], p["step_size"]) * passes * folds
                   for c in cases)

    measured = cache.attrs["teacher_forwards"]
    if count(cache.cases) != measured:
        sys.exit(f"bench_cache: the store counts {measured} teacher forwards for its {len(cache.cases)} cases, "
                 f"the extrapolation formula {count(cache.cases)}; they must agree")
    online = ONLINE_EPOCHS * ONLINE_STEPS * folds
    dataset = count(pm["cases"])
    return {"cache_forwards_benchmark_cases": measured, "cache_forwards_all_cases": dataset,
            "online_forwards": online, "folds": folds, "mirror_passes": passes,
            "ratio_benchmark_cases": measured / online, "ratio_all_cases": dataset / online}


# -- report ---------------------------------------------------------------------------------------
def table(rows: list[dict]) -> str:
    lines = [f"{'figure':<58} {'value':>10}  {'goal':>8}  result", "-" * 88]
    for r in rows:
        goal = "" if r["goal"] is None else f"{r['op']} {r['goal']:g}"
        result = "" if r["goal"] is None else ("PASS" if r["pass"] else "MISS")
        lines.append(f"{r['figure']:<58} {r['value']:>10.4g}  {goal:>8}  {result}")
    return "\n".join(lines)


def row(figure: str, value: float, op: str | None = None, goal: float | None = None) -> dict:
    passed = None if goal is None else (value <= goal if op == "<=" else value >= goal)
    return {"figure": figure, "value": value, "op": op, "goal": goal, "pass": passed}


def main(argv=None) -> int:
    args = parse_args(argv)
    dataset_id = args.dataset_id
    args.work.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(args.work.resolve(), args.threads)
    wall_start = time.perf_counter()

    pm = json.loads(setup_preprocessed(args, env, dataset_id).read_text())
    teacher_folder, teacher_manifest, short = setup_teachers(args, env, dataset_id, pm)
    cases = sorted(pm["cases"])[:args.cases]
    if len(cases) < args.cases:
        sys.exit(f"bench_cache: --cases {args.cases}: the dataset has only {len(cases)} cases")
    case_manifest = subset_manifest(pm, cases, args.work / f"manifest_{len(cases)}cases.json")
    preprocessed = Path(env["nnUNet_preprocessed"]) / pm["dataset_name"]
    print(f"teachers: {teacher_folder} (folds {args.folds})")
    if short:
        print(f"  NOTE: short-trained teachers ({args.teacher_epochs} epochs x {args.teacher_iterations} iterations "
              "per fold): their soft labels are far from a converged ensemble's (no confident regions, "
              "texture that follows the image), and how well the cache compresses (figure 2) depends on "
              "that; use --teachers FOLDER with real teachers for a figure 2 that transfers")
    print(f"benchmark: {len(cases)} cases ({cases[0]} .. {cases[-1]}), T = {args.temperature}, step "
          f"{args.step_size}, mirroring {'off' if args.disable_mirroring else 'on'}, {args.dtype}, "
          f"{args.device}, {args.threads} threads", flush=True)

    import torch

    torch.set_num_threads(args.threads)
    print("1. soft-label pass vs stock nnUNetv2_predict (interleaved) ...", flush=True)
    wall = bench_wall_time(args, env, dataset_id, teacher_folder, teacher_manifest, case_manifest, cases)
    store = Path(wall["store"])
    from fastkd.softlabels import finalize_cache

    finalize_cache(store, case_manifest)
    storage = bench_storage(store, preprocessed / pm["data_identifier"], cases)
    print("1b. the floor: the same teacher forwards alone ...", flush=True)
    floor = bench_floor(store, teacher_manifest, args.device, args.threads)
    floor["ratio_case_loop"] = statistics.median(wall["case_loop_seconds"]) / floor["seconds"]
    floor["ratio_wall"] = statistics.median(wall["softlabel_seconds"]) / floor["seconds"]
    print("1c. nnU-Net's sliding window alone (the same folds and cases) ...", flush=True)
    sliding = bench_sliding_window(case_manifest, preprocessed / pm["data_identifier"], teacher_manifest, args)
    sliding["ratio_case_loop"] = statistics.median(wall["case_loop_seconds"]) / sliding["seconds"]
    sliding["ratio_floor"] = sliding["seconds"] / floor["seconds"]

    print("3. patch reads vs student iterations ...", flush=True)
    plans = json.loads((preprocessed / f"{pm['plans_name']}.json").read_text())
    dataset_json = json.loads((preprocessed / "dataset.json").read_text())
    trainer, initial_patch = make_student_trainer(student_plans(plans, args.reduction_factor), dataset_json,
                                                  args.device, args.work / "logs" / "student_trainer.log")
    boxes = draw_boxes(trainer, initial_patch, preprocessed / pm["data_identifier"], cases, args.reads)
    reads_per_s, its_per_s = bench_loading(store, boxes, trainer, args.train_iterations)
    amplification = read_amplification(store, boxes)
    batch = trainer.batch_size
    loading = {"reads_per_second": reads_per_s, "iterations_per_second": its_per_s, "batch_size": batch,
               "patch_size": list(trainer.configuration_manager.patch_size), "initial_patch_size": initial_patch,
               "student_features_per_stage": trainer.configuration_manager.network_arch_init_kwargs["features_per_stage"],
               "reads": len(boxes), "ratio": reads_per_s / its_per_s, "batch_ratio": reads_per_s / batch / its_per_s,
               "read_amplification": amplification}
    forwards = bench_forwards(store, pm)
    n_all = len(pm["cases"])

    rows = [
        row(f"1. soft-label pass / stock predict wall time (median of {args.repeats})", wall["ratio"], "<=", 1.1),
        row("1b. soft-label case loop / teacher forwards alone (floor)", floor["ratio_case_loop"], "<=", 1.2),
        row("    soft-label pass wall time (with start-up) / floor", floor["ratio_wall"]),
        row("1c. soft-label case loop / nnU-Net's sliding window alone", sliding["ratio_case_loop"]),
        row("    nnU-Net's sliding window alone / floor (1b's lower bound)", sliding["ratio_floor"]),
        row("2. cache bytes / preprocessed .b2nd bytes", storage["ratio_to_b2nd"], "<=", 0.5),
        row("   cache bytes / float32 soft labels", storage["ratio_to_float32"]),
        row("3. patch reads per s / student iterations per s", loading["ratio"], ">=", 10),
        row(f"   (reads per s / batch {batch}) / student iterations per s", loading["batch_ratio"]),
        row("   voxels decompressed / voxels read (chunks a read touches, whole)", amplification["ratio"]),
        row(f"4. teacher forwards: cache / online, all {n_all} cases", forwards["ratio_all_cases"], "<=", 0.01),
        row(f"   teacher forwards: cache / online, {len(cases)} benchmark cases", forwards["ratio_benchmark_cases"]),
    ]
    elapsed = time.perf_counter() - wall_start
    print()
    print(f"raw figures ({len(cases)} cases):")
    print(f"  1. soft-label pass s: {', '.join(f'{s:.1f}' for s in wall['softlabel_seconds'])}; "
          f"stock predict s: {', '.join(f'{s:.1f}' for s in wall['stock_seconds'])}; "
          f"pair ratios: {', '.join(f'{r:.3f}' for r in wall['pair_ratios'])}")
    print(f"     the soft-label pass includes: Python and torch start-up, loading the {len(args.folds)} teacher folds, "
          "per case reading nnU-Net's preprocessed array, the sliding window of every fold (Gaussian weighting, "
          "mirroring as set), tempered softmax, the fold mean, uint8 encoding, the Zarr write; stock "
          "nnUNetv2_predict includes: start-up, loading the folds, per case reading the raw NIfTI, nnU-Net's "
          "preprocessing (crop, resample, normalise), the same sliding window, the fold mean of logits, "
          "resampling to the original grid and writing a segmentation")
    print(f"  1b. floor: {floor['forwards']} teacher forwards alone (random patch-sized tiles) "
          f"{floor['seconds']:.1f} s; the soft-label case loop {statistics.median(wall['case_loop_seconds']):.1f} s; "
          f"peak RSS of the pass {max(wall['softlabel_peak_rss_bytes']) / 1e9:.2f} GB")
    print(f"  1c. nnU-Net's predict_sliding_window_return_logits of every fold on every case (loading untimed): "
          f"{sliding['seconds']:.1f} s, {sliding['forwards']} forwards; what the pass adds to it: softmax, fold "
          "mean, encoding, writing, loading")
    print(f"  2. cache {storage['cache_bytes'] / 1e6:.3f} MB, preprocessed .b2nd "
          f"{storage['preprocessed_b2nd_bytes'] / 1e6:.3f} MB, soft labels as float32 "
          f"{storage['float32_softlabel_bytes'] / 1e6:.3f} MB; {storage['bytes_per_voxel']:.3f} bytes per voxel, "
          f"compression {storage['compression']:.1f}x over the stored values")
    print(f"  3. {reads_per_s:.1f} reads/s of initial patch {initial_patch} ({len(boxes)} reads); student "
          f"{loading['student_features_per_stage']} {its_per_s:.3f} it/s (batch {batch}, patch "
          f"{loading['patch_size']}, {args.device}, {args.threads} threads); chunks "
          f"{amplification['chunk_voxels']} voxels x all classes, {amplification['ratio']:.2f} voxels decompressed "
          "per voxel read")
    print(f"  4. cache: {forwards['cache_forwards_benchmark_cases']} forwards for {len(cases)} cases, "
          f"{forwards['cache_forwards_all_cases']} extrapolated to all {n_all}; online: {ONLINE_EPOCHS} epochs x "
          f"{ONLINE_STEPS} steps x {forwards['folds']} folds = {forwards['online_forwards']} batched forwards "
          f"(one per step and fold)")
    print()
    print(table(rows))
    print(f"\nbench_cache: done in {elapsed:.0f} s")

    out = args.work / "bench_cache.json"
    out.write_text(json.dumps({
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "cases": cases, "teacher_folder": str(teacher_folder), "short_trained_teachers": short,
        "wall_time": wall, "floor": floor, "sliding_window": sliding, "storage": storage, "loading": loading, "forwards": forwards, "table": rows,
        "seconds": elapsed}, indent=2) + "\n")
    print(f"bench_cache: figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
