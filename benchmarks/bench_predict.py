"""Benchmark of ``fastkd predict``: seconds per case against stock nnU-Net, side by side in one run on real data.

Machines are noisy, so the goals are RATIOS of timings measured in the same run on the same machine,
never absolute timings; and every timing is put beside its physical floor, the network forwards alone.

Models (set up once in ``--work``, reused by later runs): nnU-Net's plans and preprocessing of the
dataset (``fastkd preprocess run``); a 5-fold teacher model folder (``nnUNetTrainer__nnUNetPlans__3d_fullres``,
the plans' network) and students of reduction ``r`` (default 2 and 4: ``fastkd.student.plans``, features
per stage divided by r, as stock nnU-Net model folders), all with RANDOM weights: the time of a
prediction does not depend on what the weights are (same network, same tiles, same resampling), so no
training is needed to time it; and each student exported to ONNX (``fastkd export onnx``, static batch 1).

Figures, on the first ``--cases`` cases (sorted) of the dataset:

1. **Whole case** (what a user waits for): each configuration as the command a user runs, one process
   over all cases and one over the first k cases (below), with the peak memory of its process tree (the sum of
   the resident sets of the process and its workers, sampled every 0.2 s; shared pages count once per
   process):
   - stock ``nnUNetv2_predict``, 5 folds, test-time mirroring (nnU-Net's default);
   - stock ``nnUNetv2_predict``, fold 0, no mirroring (``--disable_tta``);
   - ``fastkd predict`` (torch: the student's model folder; onnx: its export), fold 0, no mirroring,
     per r; torch runs TorchScript-frozen on the CPU, fastkd's default;
   - ``fastkd predict`` of the teacher's fold 0 (like for like: the student's share of the gain, with the
     runtime the same) and of the r = 2 student with ``--no-jit`` (eager PyTorch, as stock: what
     TorchScript adds).
   Every one uses ``--threads`` worker processes per pool (``-npp``/``-nps`` for stock) and the same
   torch threads (``nnUNet_def_n_proc``); ``--repeats`` rounds, configurations interleaved, the median.
   A run pays once for starting Python, importing, loading the model and starting its workers (8-15 s
   on a 2-core CPU for stock, far more than a small case's network), so a run of n cases is also split: the
   MARGINAL time, (run of all n cases - run of the first k) / (n - k) (k = ``--threads``, at least one
   more than the cases ``fastkd predict`` runs in its own process, when n is larger, so that both runs
   start the same workers, else 1), is a case's cost with loading,
   preprocessing, network, resampling and writing overlapped as in production, and the start-up is the
   k-case run - k x marginal. On Hippocampus a student's case costs ~0.1 s, which the start-up's noise
   (+-0.5 s between runs here) hides unless n - k is large (say >= 50): read the marginal only then.
   **Start-up** on its own: each command on ONE case (what a user waits for one scan; fastkd runs it in
   its own process, no worker pools), minus that case's phases in turn (figure 2): Python, imports,
   loading the model (and TorchScript: traced once, then read from fastkd's cache), workers. Rows: stock's
   start-up over fastkd's, and fastkd's own ``seconds_startup`` from its ``fastkd_predict.json``.
2. **Phases**, measured one after the other in this process with nnU-Net's own components, per
   case (after one untimed warm-up case): load + preprocess (``preprocessor.run_case``), network
   (``predict_logits_from_preprocessed_data`` of the same predictor the command builds: stock
   ``nnUNetPredictor`` from the model folder, fastkd's ``build_predictor``), resample + write
   (``export_prediction_from_logits``). Their sum, "in turn", is a whole case's cost without the run's
   start-up and without overlap (the commands overlap loading and writing with the network, which can
   only make a case cheaper): the GOALS ARE JUDGED ON IT, for stock and fastkd alike.
3. **Floor**: tiles of each case (nnU-Net's steps on its preprocessed shape) x mirror passes x folds x one
   forward of the network on one patch (median of 3 after a warm-up): what the network phase cannot
   go below without a cheaper network.
4. **Tile batch** (CPU or GPU, whichever runs): the network phase of the r = 2 student (torch) WITH
   mirroring at ``tile_batch`` 1 and at ``--tile-batch`` (default 8: one tile and its 7 flips per forward).
5. **Sizes**: parameters and MB of each network (fp32), the checkpoint and the ONNX file.

Goals (whole case, r = 2, torch and onnx; judged on the phases in turn, figure 2): >= 20x faster than the
default ensemble (stock 5 folds with mirroring) and >= 2x faster than one teacher fold without mirroring.
The whole-run and marginal ratios of figure 1 are printed beside them.

``--brats``: also one BraTS case (2 channels, 240 x 240 x 155; default
``../shared/datasets/Dataset005_BraTS2015DeepMedic``). On a CPU the stock 5-fold mirrored ensemble takes
hours there, so its whole-case time is ESTIMATED from the measured one-fold run (its load + preprocess
and resample + write, plus 40 = 5 folds x 8 passes times its network phase) and marked so, unless
``--brats-ensemble`` measures it.

Results: a table on stdout and ``<work>/bench_predict.json``; command logs in ``<work>/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_cache  # noqa: E402  (shared helpers: nnU-Net environment, raw-case links, console scripts)

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BRATS = REPO / ".." / "shared" / "datasets" / "Dataset005_BraTS2015DeepMedic"
CONFIGURATION = "3d_fullres"
FOLDS = [0, 1, 2, 3, 4]
TEACHER = f"nnUNetTrainer__nnUNetPlans__{CONFIGURATION}"
GOAL_ENSEMBLE, GOAL_ONE_FOLD = 20.0, 2.0
MIRROR_PASSES = 8  # 3D: every combination of the 3 axes


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--raw", type=Path, default=bench_cache.DEFAULT_RAW, help="nnU-Net raw dataset DatasetXXX_Name")
    p.add_argument("--work", type=Path, default=Path("/tmp/fastkd_bench_predict"),
                   help="work dir (nnU-Net folders, models, outputs, logs, JSON); reused by later runs")
    p.add_argument("--cases", type=int, default=10, help="benchmark cases: the first N of the sorted cases")
    p.add_argument("-r", "--reductions", type=int, nargs="+", default=[2, 4], help="student reduction factors")
    p.add_argument("--threads", type=int, default=2, help="torch threads, and workers per pool of every command")
    p.add_argument("--repeats", type=int, default=1, help="rounds of the whole-case commands (median)")
    p.add_argument("--tile-batch", type=int, default=8, help="the batched setting of figure 4")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="device of every network")
    p.add_argument("--brats", type=Path, nargs="?", const=DEFAULT_BRATS, default=None,
                   help="also one case of this BraTS raw dataset (default path if given without one)")
    p.add_argument("--brats-ensemble", action="store_true",
                   help="measure stock's 5-fold mirrored ensemble on the BraTS case (hours on a CPU) instead of "
                        "estimating it")
    p.add_argument("--quick", action="store_true", help="a few minutes on a 2-core CPU: 4 cases, r = 2 and 4, 1 round")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.repeats = 4, 1
    for name in ("cases", "threads", "repeats", "tile_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} = {getattr(args, name)}: must be >= 1")
    if 2 not in args.reductions:
        p.error("--reductions must include 2 (the goals are for the r = 2 student)")
    for raw in filter(None, (args.raw, args.brats)):
        if not (raw / "dataset.json").is_file():
            p.error(f"raw dataset {raw} not found (no dataset.json there)")
    return args


# -- processes and memory -------------------------------------------------------------------------
def _tree_rss(root: int) -> int:
    """Bytes resident in process ``root`` and all its descendants (/proc)."""
    page = os.sysconf("SC_PAGE_SIZE")
    rss, children = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        pid = int(stat.parent.name)
        rss[pid] = int(fields[21]) * page
        children.setdefault(int(fields[1]), []).append(pid)
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo += children.get(pid, [])
    return total


def run_measured(cmd: list, env: dict, log: Path) -> tuple[float, int]:
    """(wall seconds, peak bytes of the process tree) of ``cmd``; exits naming the log on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], env=env, stdout=f, stderr=subprocess.STDOUT)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _tree_rss(proc.pid))
            time.sleep(0.2)
        seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        sys.exit(f"bench_predict: `{' '.join(map(str, cmd))}` failed (exit {proc.returncode}); log {log}:\n{tail}")
    return seconds, peak


# -- setup ----------------------------------------------------------------------------------------
def write_random_fold(folder: Path, plans: dict, dataset_json: dict, fold: int, seed: int) -> None:
    """``folder/fold_<fold>/checkpoint_final.pth`` as nnU-Net writes it, with random weights (once)."""
    import torch

    from fastkd.nnunet import build_network

    path = folder / f"fold_{fold}" / "checkpoint_final.pth"
    if path.is_file():
        return
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    torch.manual_seed(seed)
    network, _, _ = build_network(plans, CONFIGURATION, dataset_json)
    path.parent.mkdir(exist_ok=True)
    torch.save({"network_weights": network.state_dict(), "trainer_name": "nnUNetTrainer", "current_epoch": 0,
                "init_args": {"configuration": CONFIGURATION, "fold": fold},
                "inference_allowed_mirroring_axes": (0, 1, 2)}, path)


def setup_dataset(args, env: dict, raw: Path, n_cases: int) -> dict:
    """Plans and preprocessing, the random-weight teachers and students, the ONNX exports, the input folder."""
    from fastkd.export.onnx import export_onnx
    from fastkd.nnunet import parse_dataset_name
    from fastkd.student.plans import write_student_plans

    dataset_id, _ = parse_dataset_name(raw.resolve().name)
    manifest = args.work / f"manifest_{dataset_id}.json"
    if not manifest.is_file():
        print(f"setup: planning and preprocessing {raw.name} (fastkd preprocess run) ...", flush=True)
        bench_cache.run(bench_cache.fastkd_cmd("preprocess", "run", "-d", dataset_id, "--raw-source", raw.resolve(),
                                               "-c", CONFIGURATION, "--manifests", manifest, "-np", args.threads),
                        env, args.work / "logs" / f"plan_preprocess_{dataset_id}.log")
    pm = json.loads(manifest.read_text())
    ds = pm["dataset_name"]
    preprocessed = Path(env["nnUNet_preprocessed"]) / ds
    plans_file = preprocessed / f"{pm['plans_name']}.json"
    plans, dataset_json = json.loads(plans_file.read_text()), json.loads((preprocessed / "dataset.json").read_text())
    results = Path(env["nnUNet_results"]) / ds
    teacher = results / TEACHER
    for fold in FOLDS:
        write_random_fold(teacher, plans, dataset_json, fold, seed=fold)
    students = {}
    for r in args.reductions:
        student_plans_file = preprocessed / f"{pm['plans_name']}_fastkdR{r}.json"
        student_plans = write_student_plans(plans_file, student_plans_file, r)
        folder = results / f"nnUNetTrainer__{student_plans['plans_name']}__{CONFIGURATION}"
        write_random_fold(folder, student_plans, dataset_json, 0, seed=100 + r)
        onnx_file = args.work / "export" / ds / f"r{r}.onnx"
        if not onnx_file.is_file():
            print(f"setup: exporting the r = {r} student to ONNX ...", flush=True)
            export_onnx(folder, 0, onnx_file)
        students[r] = {"folder": folder, "onnx": onnx_file}
    cases = sorted(pm["cases"])[:n_cases]
    if len(cases) < n_cases:
        sys.exit(f"bench_predict: --cases {n_cases}: {ds} has only {len(cases)} cases")
    inputs = bench_cache.stock_input(raw, cases, args.work / "inputs" / ds)
    return {"raw": raw, "dataset_id": dataset_id, "dataset": ds, "plans": plans, "dataset_json": dataset_json,
            "teacher": teacher, "students": students, "cases": cases, "inputs": inputs, "manifest": pm}


def model_sizes(d: dict) -> dict:
    import torch

    from fastkd.nnunet import load_checkpoint

    sizes = {}
    for name, checkpoint, onnx_file in [("teacher (one fold)", d["teacher"] / "fold_0" / "checkpoint_final.pth", None),
                                        *((f"student r={r}", s["folder"] / "fold_0" / "checkpoint_final.pth", s["onnx"])
                                          for r, s in d["students"].items())]:
        weights = load_checkpoint(checkpoint)["network_weights"]
        params = sum(t.numel() for t in weights.values() if isinstance(t, torch.Tensor))
        sizes[name] = {"parameters": params, "fp32_mb": params * 4 / 1e6,
                       "checkpoint_mb": checkpoint.stat().st_size / 1e6,
                       "onnx_mb": onnx_file.stat().st_size / 1e6 if onnx_file else None}
    return sizes


# -- 1. whole case --------------------------------------------------------------------------------
def configurations(args, d: dict, ensemble: bool) -> dict[str, dict]:
    """name -> {"cmd": what a user runs (without -i/-o), "phases": how to build the same predictor here}."""
    t = str(args.threads)
    stock = [bench_cache.nnunet_script("nnUNetv2_predict"), "-d", d["dataset_id"], "-tr", "nnUNetTrainer",
             "-p", d["manifest"]["plans_name"], "-c", CONFIGURATION, "-device", args.device, "-npp", t, "-nps", t,
             "--disable_progress_bar"]
    out = {}
    if ensemble:
        out["stock 5 folds, mirroring"] = {"cmd": [*stock, "-f", *map(str, FOLDS)],
                                           "stock": (FOLDS, True)}
    out["stock fold 0, no mirroring"] = {"cmd": [*stock, "-f", "0", "--disable_tta"], "stock": ([0], False)}
    fastkd = lambda model, *extra: [*bench_cache.fastkd_cmd(  # noqa: E731
        "predict", "-m", model, "-f", "0", "--disable-mirroring", "--threads", t, "--device", args.device, *extra)]
    # like for like: the teacher fold through fastkd's own runtime (TorchScript on the CPU)
    out["fastkd torch teacher fold 0, no mirroring"] = {"cmd": fastkd(d["teacher"]),
                                                         "fastkd": (d["teacher"], False, None)}
    for r, s in d["students"].items():
        for backend, model in (("torch", s["folder"]), ("onnx", s["onnx"])):
            out[f"fastkd {backend} r={r}, no mirroring"] = {"cmd": fastkd(model), "fastkd": (model, False, None)}
        if r == 2 and args.device == "cpu":  # what TorchScript adds
            out["fastkd torch r=2 --no-jit"] = {"cmd": fastkd(s["folder"], "--no-jit"),
                                                 "fastkd": (s["folder"], False, False)}
    return out


def bench_whole_case(args, env: dict, d: dict, configs: dict) -> dict:
    """Each command on the first k cases and on all n, ``--repeats`` rounds, configurations interleaved:
    wall per case, the marginal seconds per case ((all - first k) / (n - k): a case's whole cost with the
    start-up taken out) and the start-up (k-case wall - k x marginal). k = the workers per pool when there
    are more cases than that, so that both runs start the same workers (each imports torch and nnU-Net:
    seconds of CPU), else 1."""
    from fastkd.predict.predictor import IN_PROCESS_CASES

    n = len(d["cases"])
    inputs = {n: d["inputs"]}
    if n > 1:
        k = max(args.threads, IN_PROCESS_CASES + 1)
        k = k if n > k else 1
        for m in {k, 1}:
            inputs[m] = bench_cache.stock_input(d["raw"], d["cases"][:m], args.work / "inputs" / f"{d['dataset']}_{m}")
    walls = {name: {m: [] for m in inputs} for name in configs}
    peak = {name: 0 for name in configs}
    recorded = {name: [] for name in configs}  # fastkd's own seconds_startup of its one-case runs
    for i in range(args.repeats):
        for name, c in configs.items():
            for m, folder in inputs.items():
                out = args.work / "runs" / d["dataset"] / f"{_slug(name)}_{m}"
                shutil.rmtree(out, ignore_errors=True)
                s, p = run_measured([*c["cmd"], "-i", folder, "-o", out], env,
                                    args.work / "logs" / d["dataset"] / f"{out.name}_{i}.log")
                walls[name][m].append(s)
                peak[name] = max(peak[name], p)
                if m == 1 and (out / "fastkd_predict.json").is_file():
                    recorded[name].append(json.loads((out / "fastkd_predict.json").read_text())["seconds_startup"])
            print(f"  {name}: " + ", ".join(f"{walls[name][m][-1]:.1f} s for {m} case{'s' * (m > 1)}" for m in inputs)
                  + f"; peak {peak[name] / 1e9:.2f} GB", flush=True)
    out = {}
    for name in configs:
        wall_n = statistics.median(walls[name][n])
        result = {"wall_seconds": walls[name], "per_case_with_startup": wall_n / n, "peak_gb": peak[name] / 1e9,
                  "marginal_per_case": None, "startup": None, "wall_one_case": statistics.median(walls[name][1]),
                  "recorded_startup": statistics.median(recorded[name]) if recorded[name] else None}
        if n > 1:
            wall_k = statistics.median(walls[name][k])
            result["marginal_per_case"] = (wall_n - wall_k) / (n - k)
            result["startup"] = wall_k - k * result["marginal_per_case"]
        out[name] = result
    return out


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


# -- 2.-4. phases, floor, tile batch ----------------------------------------------------------------
def make_predictor(args, d: dict, config: dict, tile_batch: int | None = None, mirroring: bool | None = None):
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from fastkd.predict.predictor import build_predictor

    if "stock" in config:
        folds, mirror = config["stock"]
        predictor = nnUNetPredictor(tile_step_size=0.5, use_mirroring=mirror, device=torch.device(args.device),
                                    perform_everything_on_device=args.device == "cuda", allow_tqdm=False)
        predictor.initialize_from_trained_model_folder(str(d["teacher"]), folds, "checkpoint_final.pth")
        return predictor, len(folds), mirror
    model, mirror, jit = config["fastkd"]
    mirror = mirror if mirroring is None else mirroring
    predictor, _ = build_predictor(model, mirroring=mirror, device=args.device, tile_batch=tile_batch, progress=False,
                                   jit=jit)
    return predictor, 1, mirror


def _case_files(d: dict, case: str) -> list[str]:
    ending = d["dataset_json"]["file_ending"]
    return [str(d["inputs"] / f"{case}_{int(ch):04d}{ending}") for ch in d["dataset_json"]["channel_names"]]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def bench_phases(args, d: dict, predictor, out: Path, network_only: bool = False) -> dict:
    """Mean seconds per case of load + preprocess, network, resample + write (nnU-Net's components, in turn)."""
    import torch
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    pm, cm = predictor.plans_manager, predictor.configuration_manager
    preprocessor = cm.preprocessor_class(verbose=False)
    out.mkdir(parents=True, exist_ok=True)
    times, shapes = {"load_preprocess": [], "network": [], "resample_write": []}, []
    data, _, _ = preprocessor.run_case(_case_files(d, d["cases"][0]), None, pm, cm, d["dataset_json"])
    predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data))  # warm-up (allocators, onnxruntime)
    for case in d["cases"]:
        start = time.perf_counter()
        data, _, properties = preprocessor.run_case(_case_files(d, case), None, pm, cm, d["dataset_json"])
        loaded = time.perf_counter()
        logits = predictor.predict_logits_from_preprocessed_data(torch.from_numpy(data)).cpu()
        _sync(args.device)
        predicted = time.perf_counter()
        if not network_only:
            export_prediction_from_logits(logits.numpy(), properties, cm, pm, d["dataset_json"], str(out / case), False)
        written = time.perf_counter()
        times["load_preprocess"].append(loaded - start)
        times["network"].append(predicted - loaded)
        times["resample_write"].append(written - predicted)
        shapes.append(list(data.shape[1:]))
    mean = {k: statistics.mean(v) for k, v in times.items()}
    mean["sum"] = sum(mean.values())
    return {"mean": mean, "per_case": times, "preprocessed_shapes": shapes}


def bench_floor(args, predictor, shapes: list, folds: int, mirroring: bool) -> dict:
    """Tiles x passes x folds x one forward on one patch (median of 3 after a warm-up), per case on average."""
    import numpy as np
    import torch
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    patch = list(predictor.configuration_manager.patch_size)
    x = torch.zeros((1, len(predictor.dataset_json["channel_names"]), *patch), device=args.device)
    network = predictor.network.to(args.device).eval()
    with torch.inference_mode():
        network(x)
        _sync(args.device)
        forward = []
        for _ in range(3):
            start = time.perf_counter()
            network(x)
            _sync(args.device)
            forward.append(time.perf_counter() - start)
    one = statistics.median(forward)
    tiles = [int(np.prod([len(s) for s in compute_steps_for_sliding_window([max(a, b) for a, b in zip(shape, patch)],
                                                                             patch, 0.5)])) for shape in shapes]
    passes = MIRROR_PASSES if mirroring else 1
    return {"forward_seconds": one, "tiles_per_case": statistics.mean(tiles), "passes": passes, "folds": folds,
            "floor_per_case": statistics.mean(tiles) * passes * folds * one}


# -- report ---------------------------------------------------------------------------------------
def row(figure: str, value: float, goal: float | None = None, unit: str = "") -> dict:
    return {"figure": figure, "value": value, "goal": goal, "unit": unit,
            "pass": None if goal is None else value >= goal}


def table(rows: list[dict]) -> str:
    lines = [f"{'figure':<66} {'value':>10}  {'goal':>7}  result", "-" * 94]
    for r in rows:
        goal = "" if r["goal"] is None else f">= {r['goal']:g}"
        result = "" if r["goal"] is None else ("PASS" if r["pass"] else "MISS")
        lines.append(f"{r['figure']:<66} {r['value']:>10.3g}{r['unit']:<1} {goal:>7}  {result}")
    return "\n".join(lines)


def bench_dataset(args, env: dict, raw: Path, n_cases: int, ensemble: bool) -> dict:
    d = setup_dataset(args, env, raw, n_cases)
    n = len(d["cases"])
    print(f"\n== {d['dataset']}: {n} case{'s' * (n > 1)} ({d['cases'][0]} .. {d['cases'][-1]}), {args.device}, "
          f"{args.threads} threads; random weights (the time of a prediction does not depend on them)", flush=True)
    configs = configurations(args, d, ensemble)
    print("1. whole case: each configuration as the command a user runs ...", flush=True)
    whole = bench_whole_case(args, env, d, configs)
    print("2./3. phases (in turn, nnU-Net's components) and the network floor ...", flush=True)
    phases, floors = {}, {}
    for name, config in configs.items():
        predictor, folds, mirroring = make_predictor(args, d, config)
        phases[name] = bench_phases(args, d, predictor, args.work / "phases" / d["dataset"] / _slug(name))
        floors[name] = bench_floor(args, predictor, phases[name]["preprocessed_shapes"], folds, mirroring)
        m = phases[name]["mean"]
        print(f"  {name}: load+preprocess {m['load_preprocess']:.3f} s, network {m['network']:.3f} s (floor "
              f"{floors[name]['floor_per_case']:.3f} s), resample+write {m['resample_write']:.3f} s per case",
              flush=True)
    estimated = None
    if not ensemble:  # stock's 5-fold mirrored ensemble from its measured one-fold phases
        one = phases["stock fold 0, no mirroring"]["mean"]
        k = len(FOLDS) * MIRROR_PASSES
        sequential = one["load_preprocess"] + k * one["network"] + one["resample_write"]
        estimated = {"sequential": sequential, "network": k * one["network"],
                     "how": f"load+preprocess + {k} x network + resample+write of stock fold 0 without mirroring"}
    print(f"4. tile batch: r=2 torch with mirroring, tile_batch 1 vs {args.tile_batch} ...", flush=True)
    r2 = configs["fastkd torch r=2, no mirroring"]
    batching = {}
    for b in (1, args.tile_batch):
        predictor, _, _ = make_predictor(args, d, r2, tile_batch=b, mirroring=True)
        batching[b] = bench_phases(args, d, predictor, args.work / "phases" / d["dataset"] / f"tb{b}",
                                   network_only=True)["mean"]["network"]
    sizes = model_sizes(d)

    # judged: a case's whole cost as its phases in turn (stable; the marginal needs many cases, see the docstring)
    judged_kind = "sequential"

    def seconds(name: str, kind: str) -> float | None:
        if name == "stock 5 folds, mirroring" and estimated:
            return estimated["sequential"] if kind == "sequential" else None
        if kind == "sequential":
            return phases[name]["mean"]["sum"]
        return whole[name][kind]

    ensemble_name, one_name = "stock 5 folds, mirroring", "stock fold 0, no mirroring"
    same_runtime = "fastkd torch teacher fold 0, no mirroring"
    rows = []
    labels = {"marginal_per_case": "whole case, start-up out", "per_case_with_startup": f"run of {n} / {n}",
              "sequential": "phases in turn"}
    for r in args.reductions:
        for backend in ("torch", "onnx"):
            name = f"fastkd {backend} r={r}, no mirroring"
            for kind in ("sequential", "marginal_per_case", "per_case_with_startup") if r == 2 else ("sequential",):
                ours = seconds(name, kind)
                if ours is None:
                    continue
                for base, what, goal in ((ensemble_name, "5-fold mirrored ensemble", GOAL_ENSEMBLE),
                                         (one_name, "1 teacher fold, no mirroring", GOAL_ONE_FOLD)):
                    theirs = seconds(base, kind)
                    if theirs is None:
                        continue
                    est = " (est.)" if base == ensemble_name and estimated else ""
                    rows.append(row(f"{backend} r={r} vs {what}{est}: {labels[kind]}", theirs / ours,
                                    goal if (r == 2 and kind == judged_kind) else None, "x"))
            if backend == "torch":  # the student's own share: the teacher fold through the same runtime
                rows.append(row(f"torch r={r} vs 1 teacher fold, both fastkd torch: phases in turn",
                                seconds(same_runtime, "sequential") / seconds(name, "sequential"), unit="x"))
    if "fastkd torch r=2 --no-jit" in configs:
        rows.append(row("torch r=2: --no-jit / TorchScript, phases in turn",
                        seconds("fastkd torch r=2 --no-jit", "sequential") /
                        seconds("fastkd torch r=2, no mirroring", "sequential"), unit="x"))
    # start-up on its own: a one-case run less that case's phases in turn
    startup = {name: whole[name]["wall_one_case"] - phases[name]["mean"]["sum"] for name in configs}
    for backend in ("torch", "onnx"):
        name = f"fastkd {backend} r=2, no mirroring"
        if name not in configs:
            continue
        for base in (ensemble_name, one_name):
            if base in configs:
                rows.append(row(f"start-up: {base} / fastkd {backend} r=2 (1-case run - phases)",
                                startup[base] / startup[name], unit="x"))
        if whole[name]["recorded_startup"] is not None:
            rows.append(row(f"start-up: fastkd {backend} r=2, its record's seconds_startup",
                            whole[name]["recorded_startup"], unit="s"))
    for name in configs:
        rows.append(row(f"network / floor: {name}", phases[name]["mean"]["network"] / floors[name]["floor_per_case"],
                        unit="x"))
    rows.append(row(f"r=2 torch, mirroring: network tile_batch 1 / tile_batch {args.tile_batch}",
                    batching[1] / batching[args.tile_batch], unit="x"))

    print(f"\n{d['dataset']} ({n} case{'s' * (n > 1)}, {args.device}, {args.threads} threads). Settings: stock "
          "nnUNetv2_predict with its defaults (step 0.5, Gaussian), 5 folds with mirroring, and fold 0 with "
          "--disable_tta; fastkd predict fold 0 with --disable-mirroring and the default tile batch (1 on CPU) "
          "and runtime (TorchScript for torch on the CPU; --no-jit: eager PyTorch as stock). "
          "Seconds per case:")
    print(f"{'configuration':<40} {'whole':>7} {'start-up':>8} {'1-case':>7} {'run/N':>7} {'peak GB':>7} | "
          f"{'load+pre':>8} {'network':>8} {'floor':>7} {'res+wri':>7} {'in turn':>7}")
    fmt = lambda v, w, p=3: f"{'-' if v is None else format(v, f'.{p}f'):>{w}}"  # noqa: E731
    for name in configs:
        w, m, f = whole[name], phases[name]["mean"], floors[name]["floor_per_case"]
        print(f"{name:<40} {fmt(w['marginal_per_case'], 7)} {fmt(w['startup'], 8, 1)} {fmt(startup[name], 7, 2)} "
              f"{fmt(w['per_case_with_startup'], 7)} {fmt(w['peak_gb'], 7, 2)} | {fmt(m['load_preprocess'], 8)} "
              f"{fmt(m['network'], 8)} {fmt(f, 7)} {fmt(m['resample_write'], 7)} {fmt(m['sum'], 7)}")
    if estimated:
        print(f"{ensemble_name + ' (est.)':<40} {'-':>7} {'-':>8} {'-':>7} {'-':>7} {'-':>7} | {'':>8} "
              f"{fmt(estimated['network'], 8)} {'':>7} {'':>7} {fmt(estimated['sequential'], 7)}   "
              f"estimated: {estimated['how']}")
    print("whole = (run of all n cases - run of the first k) / (n - k); start-up = run of k cases - k x whole; "
          "1-case = start-up on its own: a run of one case - its phases in turn; run/N = run of all cases / cases; "
          "in turn = the three phases one after the other")
    print(f"tile batch (r=2 torch, mirroring, network s/case): 1 -> {batching[1]:.3f}, {args.tile_batch} -> "
          f"{batching[args.tile_batch]:.3f}")
    for name, size in sizes.items():
        print(f"size {name}: {size['parameters'] / 1e6:.2f} M parameters, {size['fp32_mb']:.1f} MB fp32, checkpoint "
              f"{size['checkpoint_mb']:.1f} MB" + (f", ONNX {size['onnx_mb']:.1f} MB" if size["onnx_mb"] else ""))
    print()
    print(table(rows))
    return {"dataset": d["dataset"], "cases": d["cases"], "whole_case": whole, "phases": phases, "floor": floors,
            "estimated_ensemble": estimated, "judged": judged_kind, "tile_batch_network_seconds": batching,
            "sizes": sizes, "table": rows,
            "commands": {name: [str(c) for c in config["cmd"]] for name, config in configs.items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    args.work = args.work.resolve()
    env = bench_cache.nnunet_env(args.work, args.threads)  # before nnU-Net is imported: it reads them once
    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
               "note": "random weights: the time of a prediction does not depend on them"}
    results["dataset"] = bench_dataset(args, env, args.raw, args.cases, ensemble=True)
    if args.brats is not None:
        results["brats"] = bench_dataset(args, env, args.brats, 1, ensemble=args.brats_ensemble)
    results["seconds"] = time.perf_counter() - start
    out = args.work / "bench_predict.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"\nbench_predict: done in {results['seconds']:.0f} s; figures written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
