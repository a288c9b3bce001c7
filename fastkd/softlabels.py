"""Fill the soft-label cache: the teacher folds run on every training case, tempered and averaged.

Per case (nnU-Net's preprocessed array, read with nnU-Net's own dataset class) and per teacher fold:
nnU-Net's sliding-window prediction (:meth:`nnUNetPredictor.predict_sliding_window_return_logits`:
Gaussian tile weighting, the configured step, optional mirroring), then ``softmax(logits / T)`` in
float32 (per-region ``sigmoid(logits / T)`` for region-based datasets), then the weighted mean over
the case's folds ``F_t(c)`` of each teacher folder ``t`` (both sums over the folders whose ``F_t(c)``
is not empty)::

    p_c = sum_t w_t * mean_{f in F_t(c)} act(logits_{t,f} / T) / sum_t w_t

We average **probabilities**, not logits as nnU-Net's predictor does when it ensembles folds: the
student is trained to match a distribution, and the mean of the folds' distributions is the ensemble's
predictive distribution (a confident fold cannot outvote the others through large logits). The
tempered probabilities are what the KD loss compares with ``softmax(student / T)``.

Which folds a case gets (``softlabels.folds_per_case``, :data:`FOLDS_PER_CASE`):

- ``all``: ``F_t(c)`` = every fold of the folder's manifest, for every case.
- ``out_of_fold``: ``F_t(c)`` = the folds ``f`` of the folder whose validation set in nnU-Net's split
  file (``splits_final.json``: ``splits[f]["val"]``) holds ``c``, i.e. the folds that did not train on
  it (:func:`out_of_fold`); a folder with none contributes nothing to that case, and a fold ``all``
  (trained on every case) never does. Why: a fold that trained on a case has mostly memorised its
  label, so its soft labels there are near one-hot; the held-out folds show the teachers' real
  uncertainty, as on the unseen cases the student will meet. And with nnU-Net's 5 folds each case
  costs one fold's forwards per folder instead of five. Every case of the shard is checked before any
  teacher runs: one that no selected fold holds out is an error naming the case, the fold that
  validates it and the folds there are. A job loads only the folds some case of its shard needs.

Unlabelled images (``dataset.unlabelled``, :mod:`fastkd.unlabelled`) go through the same function with
their own manifest and shards: every fold for every image (none trained on them), the case marked
``unlabelled`` with the teachers' class locations, in the same store.

A job handles one shard of the cases (:func:`shard_cases`), loads its teacher folds once, and writes
each case atomically (:func:`fastkd.cache.write_case`), with the folds it used (``teacher_folds``) and
the forwards they cost among the case's attributes. The provenance records ``folds_per_case`` and, for
``out_of_fold``, ``splits_sha256`` (the split file's sha256); a case already in the store with the same
provenance (settings, mode, split and checkpoint sha256) is skipped, so a rerun after a kill only
computes what is missing, and a changed mode or split recomputes every case. The store's format:
:mod:`fastkd.cache.layout`. The case attributes also record ``preprocessed_sha256``, the sha256 of the
preprocessed ``<case>.b2nd`` (:func:`fastkd.cache.fingerprint`): a re-preprocessed case no longer
matches and is recomputed. The store's root is removed just before the first case is written,
not before (a run that fails in its checks, or finds every case current, leaves a complete store
complete). Non-finite teacher logits are an error naming the case and the fold.

Memory. Per case, the fold mean is one float32 array on the CPU, updated in place slab by slab
(:data:`SLAB_VALUES`) from each fold's float16 logits as nnU-Net's predictor returns them; encoding and
writing go block by block (:data:`fastkd.cache.BLOCK_VALUES`). With C soft-label channels and V voxels,
a job's peak is about ``C V (4 + 2 + 1) + 12 V channels + ~1.8 GB`` on the CPU (:func:`peak_memory_bytes`;
with a GPU the 2 bytes of logits and nnU-Net's 1-byte inf check sit on the GPU), e.g. 16 classes x 512 x
512 x 300 voxels: ~12 GB. Measured: 6.70 GB peak RSS for 119 classes x 128 x 192 x 192 voxels (formula
5.87 GB, mem_mb 7.04 GB), 2.28 GB for a BraTS case (5 classes), 1.40 GB for Hippocampus.
The workflow asks for that (+20 %) for the largest case of the manifest (:func:`mem_mb`) unless
``resources.softlabels.mem_mb`` is set.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from fastkd import cache, nnunet
from fastkd.errors import FastkdError
from fastkd.io import read_json

#: values of ``softlabels.folds_per_case``: which teacher folds make a case's soft labels (module docstring)
FOLDS_PER_CASE = ("all", "out_of_fold")
#: plans entries that must agree for two models to read the same preprocessed data
GRID_KEYS = ("data_identifier", "spacing", "transpose_forward", "normalization_schemes", "use_mask_for_norm")


def shard_cases(cases, n_shards: int, shard: int) -> list[str]:
    """The cases of shard ``shard`` of ``n_shards``: every n-th of the sorted cases (balanced, disjoint)."""
    cases = sorted(cases)
    if not 1 <= n_shards <= len(cases):
        raise FastkdError(f"softlabels.shards = {n_shards}: must be between 1 and the number of cases ({len(cases)})")
    if not 0 <= shard < n_shards:
        raise FastkdError(f"shard = {shard}: must be between 0 and {n_shards - 1}")
    return cases[shard::n_shards]


def read_splits(path: str | Path) -> list[dict]:
    """nnU-Net's split file: per fold ``{"train": [cases], "val": [cases]}``, fold f at index f."""
    splits = read_json(path, "nnU-Net split file", "nnU-Net writes splits_final.json into "
                       "nnUNet_preprocessed/<dataset>/ when a fold trains; give the split the teachers were trained with")
    if not isinstance(splits, list) or not all(isinstance(s, dict) and isinstance(s.get("val"), list) for s in splits):
        raise FastkdError(f"nnU-Net split file {path}: expected a list with one {{\"train\": [...], \"val\": [...]}} "
                          "per fold (nnU-Net's splits_final.json)")
    return splits


def out_of_fold(cases, teacher_folds: list[list], splits: list[dict], names: list[str] | None = None,
                source: str = "the split") -> dict[str, list[list]]:
    """Per case, per teacher folder: the folds that held the case out, i.e. whose ``splits[f]["val"]`` holds it.

    ``teacher_folds``: the folds of each teacher folder (ints or their strings, as in a manifest; a fold
    ``all`` trained on every case and holds none out). Returns the folds as given. Raises
    :class:`FastkdError` naming every case no fold holds out, the fold(s) that validate it and the
    folds there are (``names``: the folders, for that message; ``source``: the split file).
    """
    validated_by: dict[str, list[int]] = {}
    for fold, split in enumerate(splits):
        for case in split["val"]:
            validated_by.setdefault(case, []).append(fold)
    selection, problems = {}, []
    for case in cases:
        held_out = {str(f) for f in validated_by.get(case, [])}
        selection[case] = [[f for f in folds if str(f) in held_out] for folds in teacher_folds]
        if not any(selection[case]):
            by = validated_by.get(case)
            problems.append(f"{case}: " + (f"validated by fold {', '.join(map(str, by))}" if by else
                                           "in no fold's validation set"))
    if problems:
        names = names or [f"teacher {i + 1}" for i in range(len(teacher_folds))]
        have = "; ".join(f"{n}: {', '.join(map(str, folds))}" for n, folds in zip(names, teacher_folds))
        raise FastkdError(f"folds_per_case = out_of_fold: no teacher fold holds out {len(problems)} case(s) "
                          f"(split {source}; teacher folds {have}):\n  - " + "\n  - ".join(problems)
                          + "\nadd the teacher folds that validate them, or use folds_per_case = all")
    return selection


def grid_differences(teacher_plans: dict, teacher_cfg: str, grid_plans: dict, grid_cfg: str) -> list[str]:
    """How a teacher's preprocessing differs from the grid the cache is written on (empty: same grid)."""
    a, b = nnunet.configuration(teacher_plans, teacher_cfg), nnunet.configuration(grid_plans, grid_cfg)
    a["transpose_forward"], b["transpose_forward"] = teacher_plans["transpose_forward"], grid_plans["transpose_forward"]
    return [f"{k}: teacher {a.get(k)} vs grid {b.get(k)}" for k in GRID_KEYS if a.get(k) != b.get(k)]


def check_teachers(teachers: list[dict], grid_plans: dict, grid_cfg: str, grid_dataset_json: dict) -> None:
    """Every teacher folder must read the grid's preprocessed data and predict the grid's labels."""
    problems = []
    for t in teachers:
        folder = Path(t["model_folder"])
        plans, dataset_json = nnunet.read_plans(folder / "plans.json"), nnunet.read_dataset_json(folder)
        diff = grid_differences(plans, t["configuration"], grid_plans, grid_cfg)
        if dataset_json["labels"] != grid_dataset_json["labels"]:
            diff.append(f"labels: teacher {dataset_json['labels']} vs dataset {grid_dataset_json['labels']}")
        if diff:
            problems.append(f"{folder} ({t['plans_name']} {t['configuration']}): " + "; ".join(diff))
    if problems:
        raise FastkdError(
            f"teacher folders whose preprocessed grid differs from the cache's ({grid_plans['plans_name']} "
            f"{grid_cfg}) cannot share one soft-label cache:\n  - " + "\n  - ".join(problems)
            + "\nuse teachers planned on the same data (e.g. nnU-Net default and ResEnc plans share nnUNetPlans_3d_fullres)")


def tiles_per_case(spatial_shape, patch_size, step_size: float) -> int:
    """Sliding-window tiles nnU-Net's predictor runs on a case (2d: per slice along the first axis)."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    tiles = 1
    if len(patch_size) < len(spatial_shape):
        tiles, spatial_shape = spatial_shape[0], spatial_shape[1:]
    padded = [max(s, p) for s, p in zip(spatial_shape, patch_size)]  # smaller cases are padded to the patch
    for steps in compute_steps_for_sliding_window(padded, list(patch_size), step_size):
        tiles *= len(steps)
    return tiles


class TeacherEnsemble:
    """The teacher folds, loaded once, each predicting through nnU-Net's predictor.

    ``folds``: per teacher folder, the folds to load (manifest keys; default: all of them; a folder
    with none is not loaded). Each fold keeps its own network on the device (as nnU-Net's predictor
    would after loading its weights), so nothing is reloaded or copied per case. ``predict`` and
    ``forwards_per_case`` take the folds of one case in the same form (default: every loaded fold).
    """

    def __init__(self, teachers: list[dict], weights: list[float], step_size: float, mirroring: bool, device: str,
                 folds: list[list[str]] | None = None):
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        from fastkd.device import torch_device
        from fastkd.io import sha256

        self.device = torch_device(device, "softlabels.device")
        self.forwards = 0  # tiles through a teacher network, counted at the network call (_count)
        self.weights = [float(w) for w in weights]
        self.names = [Path(t["model_folder"]).name for t in teachers]
        self.members = []  # per teacher folder: (its predictor, [network per loaded fold], [its fold keys])
        for t, use in zip(teachers, folds if folds is not None else [list(t["folds"]) for t in teachers]):
            if not use:
                self.members.append((None, [], []))
                continue
            for fold in use:
                entry = t["folds"][fold]
                if sha256(entry["checkpoint"]) != entry["sha256"]:
                    raise FastkdError(f"{entry['checkpoint']} changed since its teacher manifest was written "
                                      "(sha256 differs); rerun the teacher_manifest rule")
            predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                                        perform_everything_on_device=self.device.type == "cuda", device=self.device,
                                        verbose=False, allow_tqdm=False)
            with nnunet.safe_unpickling():  # teacher checkpoints come from elsewhere: plain data only
                predictor.initialize_from_trained_model_folder(t["model_folder"],
                                                               use_folds=[int(f) for f in use],
                                                               checkpoint_name=t["checkpoint"])
            networks = []
            for params in predictor.list_of_parameters:
                network = copy.deepcopy(predictor.network)
                network.load_state_dict(params)
                network.register_forward_pre_hook(self._count)
                networks.append(network.to(self.device).eval())
            predictor.list_of_parameters = None  # the networks hold the weights now
            self.members.append((predictor, networks, list(use)))
        first = next(p for p, _, _ in self.members if p is not None)
        self.label_manager = first.label_manager
        self.mirror_axes = list(first.allowed_mirroring_axes or []) if mirroring else []

    def _count(self, module, args) -> None:
        """Forward pre-hook of every teacher network: counts the tiles it is called on (batch size)."""
        self.forwards += int(args[0].shape[0]) if args and hasattr(args[0], "shape") else 1

    @property
    def softmax(self) -> bool:
        return not self.label_manager.has_regions

    def channels(self) -> list[str]:
        if self.label_manager.has_regions:
            return [f"region{i}:{r}" for i, r in enumerate(self.label_manager.foreground_regions)]
        names = {int(v): k for k, v in self.label_manager.label_dict.items() if isinstance(v, int)}
        return [names.get(i, str(i)) for i in self.label_manager.all_labels]

    def _runs(self, folds: list[list[str]] | None) -> list[tuple]:
        """(predictor, [network], weight per network, [fold names]) of each teacher folder with folds in ``folds``."""
        folds = folds if folds is not None else [keys for _, _, keys in self.members]
        runs = []
        for (predictor, networks, keys), weight, use, name in zip(self.members, self.weights, folds, self.names):
            missing = [f for f in use if f not in keys]
            if missing:
                raise FastkdError(f"teacher folds {missing} were not loaded (loaded: {keys})")
            if use:
                runs.append((predictor, [networks[keys.index(f)] for f in use], weight,
                             [f"{name} fold {f}" for f in use]))
        if not runs:
            raise FastkdError(f"no teacher fold selected (folds per teacher folder: {folds})")
        total = sum(run[2] for run in runs)
        return [(predictor, networks, weight / total / len(networks), names)
                for predictor, networks, weight, names in runs]

    def forwards_per_case(self, spatial_shape, folds: list[list[str]] | None = None) -> tuple[int, int]:
        """(tiles of the first teacher run, network forward passes of the case's folds) for one case."""
        runs = self._runs(folds)
        tiles = [tiles_per_case(spatial_shape, p.configuration_manager.patch_size, p.tile_step_size)
                 for p, _, _, _ in runs]
        forwards = sum(
            n * 2 ** (len(p.allowed_mirroring_axes or []) if p.use_mirroring else 0) * len(networks)
            for n, (p, networks, _, _) in zip(tiles, runs))  # identity + every combination of flips
        return tiles[0], forwards

    def predict(self, data: np.ndarray, temperature: float, folds: list[list[str]] | None = None) -> np.ndarray:
        """Weighted mean over the case's folds of the tempered probabilities, float32 (C, x, y, z).

        Memory (module docstring): the mean accumulates in place in one float32 array on the CPU, as
        nnU-Net's predictor moves each fold's result to the CPU; each fold's logits (nnU-Net returns
        them in float16, on the device, or on the CPU after its out-of-memory fallback) are turned into
        probabilities slab by slab, so no full-size float32 copy of them is made on any device.
        Non-finite logits are an error naming the fold.
        """
        import torch

        x = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
        total = None
        with torch.inference_mode():
            for predictor, networks, weight, names in self._runs(folds):
                for network, name in zip(networks, names):
                    predictor.network = network
                    logits = predictor.predict_sliding_window_return_logits(x)
                    if total is None:
                        total = torch.zeros(logits.shape, dtype=torch.float32)  # CPU
                    parts = slabs(logits.shape, SLAB_VALUES)
                    scratch = torch.empty(max(logits[p].numel() for p in parts), dtype=torch.float32,
                                          device=logits.device)  # one float32 slab, reused
                    part = None
                    for slab in parts:
                        part = scratch[:logits[slab].numel()].view(logits[slab].shape)
                        part.copy_(logits[slab]).mul_(1.0 / temperature)
                        # one reduction; NaN or inf anywhere makes the sum non-finite (float16 logits
                        # cannot overflow a float32 sum), the element-wise test confirms
                        if not torch.isfinite(part.sum()) and not torch.isfinite(part).all():
                            raise FastkdError(f"{name} produced non-finite logits (NaN or inf) in the voxels "
                                              f"{[(s.start, s.stop) for s in slab[1:]]}; check the checkpoint "
                                              "(a diverged training) and the preprocessed input")
                        if self.softmax:  # in place: exp(z - max), then total += weight * e / sum(e)
                            part.sub_(part.amax(0, keepdim=True)).exp_()
                            total[slab].addcdiv_(part.cpu(), part.sum(0, keepdim=True).cpu(), value=weight)
                        else:
                            total[slab].add_(part.sigmoid_().cpu(), alpha=weight)
                    del logits, scratch, part
        return total.numpy()


#: values turned from logits into probabilities per step in TeacherEnsemble.predict (64 MB as float32)
SLAB_VALUES = 2**24


def slabs(shape, max_values: int):
    """Slices ``(:, a:b)`` along the first spatial axis of a (C, x, ...) array, each of at most
    ``max_values`` values (at least one x-slice)."""
    per_slice = int(np.prod(shape)) // max(shape[1], 1)
    step = max(1, max_values // max(per_slice, 1))
    return [(slice(None), slice(i, min(i + step, shape[1]))) for i in range(0, shape[1], step)]


def peak_memory_bytes(n_heads: int, shape, *, device_logits_on_cpu: bool = True) -> int:
    """Peak memory of one soft-label job for a case of preprocessed ``shape`` (channels, x, y, z) with
    ``n_heads`` soft-label channels (module docstring)::

        C V (4 + 2 + 1) + channels V 4 x 3 + BLOCK_VALUES x 29 + SLAB_VALUES x 8 + FIXED_BYTES

    4: the float32 mean; 2: one fold's float16 logits from nnU-Net (on the CPU when the device is the
    CPU or after nnU-Net's out-of-memory fallback; else on the GPU and the term is 0); 1: the boolean
    ``torch.isinf`` of those logits that nnU-Net's sliding window checks before returning them (where
    the logits are); the image as
    float32 three times (the loaded case, its float32 tensor, nnU-Net's padded copy); encoding and
    the slab-wise softmax in bounded steps; a fixed part for torch, nnU-Net and the networks.
    """
    channels, voxels = int(shape[0]), int(np.prod(shape[1:]))
    logits = 2 + 1 if device_logits_on_cpu else 0  # nnU-Net's float16 logits and its isinf() mask
    from fastkd.cache import BLOCK_VALUES

    return (n_heads * voxels * (4 + logits) + channels * voxels * 4 * 3 + BLOCK_VALUES * 29 + SLAB_VALUES * 8
            + FIXED_BYTES)


#: torch, nnU-Net, the teacher networks and Python: measured ~1.2 GB on the demo and Hippocampus
FIXED_BYTES = 1_500_000_000


def mem_mb(preprocess_manifest: str | Path, dataset_json: str | Path, device: str = "cpu") -> int:
    """``mem_mb`` for a soft-label job: :func:`peak_memory_bytes` of the largest case of the manifest,
    plus 20 %, in MB (what the workflow asks the scheduler for unless ``resources.softlabels.mem_mb``
    is set)."""
    pm = read_json(preprocess_manifest, "preprocess manifest", "written by `fastkd preprocess run`")
    dj = read_json(dataset_json, "dataset.json", "nnU-Net's dataset.json next to the plans")
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    n_heads = LabelManager(dj["labels"], dj.get("regions_class_order")).num_segmentation_heads
    largest = max((c["shape"] for c in pm["cases"].values()), key=lambda shape: int(np.prod(shape[1:])))
    return int(np.ceil(peak_memory_bytes(n_heads, largest, device_logits_on_cpu=device == "cpu") * 1.2 / 1e6))


def provenance(teachers: list[dict], weights: list[float], grid_plans: dict, configuration: str,
               dataset_json: dict, ensemble: TeacherEnsemble, temperature: float, step_size: float,
               mirroring: bool, dtype: str, folds_per_case: str = "all", splits_sha256: str | None = None,
               top_k: int | None = None) -> dict:
    """What a case's soft labels depend on (identical for every case of one store).

    ``splits_sha256``: of the split file that picks the folds (``out_of_fold``; None for ``all``).
    """
    cfg = nnunet.configuration(grid_plans, configuration)
    act = "softmax" if ensemble.softmax else "sigmoid"
    return {
        "format_version": cache.FORMAT_VERSION,
        "temperature": float(temperature),
        "activation": act,
        "ensemble": (f"weighted mean over folds of {act}(logits / T); folds of a teacher folder share its weight "
                     "equally" if folds_per_case == "all" else
                     f"per case, weighted mean of {act}(logits / T) over the folds that held the case out (their "
                     "split's val set holds it); those of a teacher folder share its weight equally, folders "
                     "without one are left out"),
        "folds_per_case": folds_per_case,
        "splits_sha256": splits_sha256,
        "channels": ensemble.channels(),
        "labels": dataset_json["labels"],
        "regions": ensemble.label_manager.has_regions,
        "teachers": [{"name": Path(t["model_folder"]).name, "model_folder": t["model_folder"], "trainer": t["trainer"],
                      "plans_name": t["plans_name"], "configuration": t["configuration"],
                      "folds": [int(f) for f in t["folds"]], "checkpoint": t["checkpoint"],
                      "sha256": {f: e["sha256"] for f, e in t["folds"].items()}, "weight": float(w)}
                     for t, w in zip(teachers, weights)],
        "dataset_name": grid_plans["dataset_name"],
        "plans_name": grid_plans["plans_name"],
        "configuration": configuration,
        "data_identifier": cfg["data_identifier"],
        "spacing": cfg["spacing"],
        "transpose_forward": grid_plans["transpose_forward"],
        "patch_size": cfg["patch_size"],
        "dtype": dtype,
        "scale": cache.DTYPES[dtype],
        "step_size": float(step_size),
        "mirroring": bool(mirroring),
        "mirror_axes": ensemble.mirror_axes,
        "gaussian": True,
        **({"top_k": int(top_k)} if top_k else {}),  # absent: every class stored (stores before top-k too)
    }


def fill_cache(store: str | Path, teacher_manifests: list[str | Path], preprocess_manifest: str | Path,
               temperature: float, *, step_size: float, mirroring: bool, dtype: str, device: str,
               weights: list[float] | None = None, n_shards: int = 1, shard: int = 0,
               folds_per_case: str = "all", splits: str | Path | None = None,
               marker: str | Path | None = None, progress: bool = True, top_k: int | None = None) -> dict:
    """Compute and write the soft labels of one shard of the cases; return (and write to ``marker``) a summary.

    ``teacher_manifests``: from :func:`fastkd.teachers.write_manifest`, one per teacher folder.
    ``preprocess_manifest``: from :func:`fastkd.preprocess.plan_preprocess` (cases and shapes); the
    preprocessed arrays are read from ``nnUNet_preprocessed`` (environment) as nnU-Net does.
    ``temperature``, ``step_size``, ``mirroring``, ``dtype``, ``device`` are checked by the config
    schema (their ``distillation.*`` / ``softlabels.*`` keys). ``folds_per_case``: one of
    :data:`FOLDS_PER_CASE` (module docstring); ``out_of_fold`` reads nnU-Net's split file ``splits``
    (default ``$nnUNet_preprocessed/<dataset>/splits_final.json``). Every case of the shard is checked
    before anything is written.
    """
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from tqdm import tqdm

    from fastkd.config import check_values
    from fastkd.io import atomic_write_text
    from fastkd.io import sha256

    if folds_per_case not in FOLDS_PER_CASE:
        raise FastkdError(f"softlabels.folds_per_case = {folds_per_case!r}: must be one of {', '.join(FOLDS_PER_CASE)}")
    check_values({"distillation.temperature": temperature, "softlabels.step_size": step_size,
                  "softlabels.mirroring": mirroring, "softlabels.dtype": dtype, "softlabels.device": device,
                  "softlabels.top_k": top_k})
    if top_k is not None and dtype != "uint8":
        raise FastkdError(f"softlabels.top_k = {top_k} stores uint8 values: set softlabels.dtype: uint8 "
                          f"(is {dtype}) or softlabels.top_k: null")
    weights = list(weights) if weights else [1.0] * len(teacher_manifests)
    if len(weights) != len(teacher_manifests) or min(weights) <= 0:
        raise FastkdError(f"weights = {weights}: need one weight > 0 per teacher manifest ({len(teacher_manifests)})")
    pm = read_json(preprocess_manifest, "preprocess manifest", "written by `fastkd preprocess run` or `fastkd preprocess manifest`")
    teachers = [read_json(m, "teacher manifest", "written by `fastkd teachers manifest`") for m in teacher_manifests]
    preprocessed_root = os.environ.get("nnUNet_preprocessed")
    if not preprocessed_root:
        raise FastkdError("nnUNet_preprocessed is not set (Snakemake sets it from the config; export it by hand)")
    dataset_folder = Path(preprocessed_root) / pm["dataset_name"]
    case_folder = manifest_case_folder(dataset_folder, pm)
    unlabelled = bool(pm.get("unlabelled"))
    grid_plans = nnunet.read_plans(dataset_folder / f"{pm['plans_name']}.json")
    dataset_json = nnunet.read_dataset_json(dataset_folder)
    check_teachers(teachers, grid_plans, pm["configuration"], dataset_json)
    cases = shard_cases(pm["cases"], n_shards, shard)
    missing = [c for c in cases if not (case_folder / f"{c}.b2nd").is_file()]
    if missing:
        rule = "preprocess_unlabelled" if unlabelled else "plan_preprocess"
        raise FastkdError(f"preprocessed cases missing in {case_folder}: {', '.join(missing)} "
                          f"(rerun {rule}: snakemake --forcerun {rule} ..., or check nnUNet_preprocessed)")
    teacher_folds = [list(t["folds"]) for t in teachers]
    splits_sha256 = None
    if folds_per_case == "out_of_fold":  # the provenance is the store's; unlabelled cases get every fold below
        splits = Path(splits) if splits else dataset_folder / "splits_final.json"
        splits_sha256 = sha256(splits)
    if folds_per_case == "out_of_fold" and not unlabelled:
        selection = out_of_fold(cases, teacher_folds, read_splits(splits),
                                [Path(t["model_folder"]).name for t in teachers], str(splits))
    else:  # every fold; for unlabelled images also with out_of_fold: no fold trained on them
        selection = {case: teacher_folds for case in cases}
    # load only the folds some case of the shard uses, in the manifest's order
    load = [[f for f in folds if any(f in selection[c][i] for c in cases)] for i, folds in enumerate(teacher_folds)]

    ensemble = TeacherEnsemble(teachers, weights, step_size, mirroring, device, load)
    prov = provenance(teachers, weights, grid_plans, pm["configuration"], dataset_json, ensemble, temperature,
                      step_size, mirroring, dtype, folds_per_case, splits_sha256, top_k)
    if top_k is not None and not 1 <= top_k < len(prov["channels"]):
        raise FastkdError(f"softlabels.top_k = {top_k}: must be between 1 and the number of classes - 1 "
                          f"({len(prov['channels']) - 1}; this dataset has {len(prov['channels'])}), or null")
    if top_k is not None and not ensemble.softmax:
        raise FastkdError(f"softlabels.top_k = {top_k}: region-based datasets store every region (their "
                          "probabilities are independent); set softlabels.top_k: null")
    dataset = infer_dataset_class(str(case_folder))(str(case_folder), cases)
    n_channels = len(prov["channels"])
    summary = {"store": str(Path(store).resolve()), "shard": shard, "n_shards": n_shards, "cases": cases,
               "folds_per_case": folds_per_case, "computed": [], "skipped": [], "teacher_forwards": 0, "seconds": 0.0}
    start = time.perf_counter()
    for case in tqdm(cases, desc=f"soft labels, shard {shard + 1}/{n_shards}", unit="case", disable=not progress):
        shape = (n_channels, *pm["cases"][case]["shape"][1:])
        source = cache.fingerprint(case_folder, case)
        if cache.is_current(store, case, prov, shape, source):
            summary["skipped"].append(case)
            continue
        t0 = time.perf_counter()
        data, _, _, _ = dataset.load_case(case)
        counted = ensemble.forwards
        try:
            probs = ensemble.predict(data[:], temperature, selection[case])
        except FastkdError as e:
            raise FastkdError(f"{case}: {e}") from e
        del data
        if probs.shape != shape:
            raise FastkdError(f"{case}: teachers predicted shape {list(probs.shape)}, expected {list(shape)} "
                              f"from the preprocess manifest {preprocess_manifest}")
        counted = ensemble.forwards - counted  # real network calls (x tiles per call)
        tiles, forwards = ensemble.forwards_per_case(shape[1:], selection[case])
        if counted != forwards:  # the record is what ran; the formula extrapolates benchmarks
            print(f"warning: {case}: the teachers ran {counted} tile forwards, forwards_per_case predicts "
                  f"{forwards} (tiles x mirror passes x folds)", file=sys.stderr)
        extra = {"tiles": tiles, "teacher_forwards": counted, "seconds": round(time.perf_counter() - t0, 3),
                 "teacher_folds": [[int(f) for f in folds] for folds in selection[case]],
                 "preprocessed_sha256": source, "unlabelled": unlabelled}
        if unlabelled:  # nnU-Net's foreground oversampling needs them; there is no label to take them from
            from fastkd.unlabelled import teacher_class_locations

            extra["class_locations"] = teacher_class_locations(probs, grid_plans, dataset_json)
        if not summary["computed"]:  # the store changes now: it must not open as complete until finalize
            cache.invalidate(store)
        cache.write_case(store, case, probs, prov, extra)
        del probs
        summary["computed"].append(case)
        summary["teacher_forwards"] += counted
    summary["seconds"] = round(time.perf_counter() - start, 3)
    if marker is not None:
        atomic_write_text(marker, json.dumps(summary, indent=2) + "\n")
    return summary


def manifest_case_folder(dataset_folder: Path, manifest: dict) -> Path:
    """Where a preprocess manifest's ``<case>.b2nd`` files are: nnU-Net's ``<data_identifier>/``, or the
    folder an unlabelled manifest names (relative to the preprocessed dataset, :mod:`fastkd.unlabelled`)."""
    return Path(dataset_folder) / manifest.get("folder", manifest["data_identifier"])


def finalize_cache(store: str | Path, preprocess_manifests: list[str | Path]) -> dict:
    """Check every case of the preprocess manifests (the training cases', and the unlabelled images' if
    any, :mod:`fastkd.unlabelled`) is in the store, then write the store's root."""
    if isinstance(preprocess_manifests, (str, Path)):
        preprocess_manifests = [preprocess_manifests]
    labelled, unlabelled, folders = {}, {}, {}
    for path in preprocess_manifests:
        pm = read_json(path, "preprocess manifest", "written by `fastkd preprocess run|adopt|unlabelled`")
        kind = bool(pm.get("unlabelled"))
        if kind in folders:
            raise FastkdError(f"two {'un' if kind else ''}labelled preprocess manifests given ({path}); pass the "
                              "training cases' manifest and at most one of unlabelled images")
        (unlabelled if kind else labelled).update({c: v["shape"] for c, v in pm["cases"].items()})
        folders[kind] = None
        if os.environ.get("nnUNet_preprocessed"):
            folders[kind] = manifest_case_folder(Path(os.environ["nnUNet_preprocessed"]) / pm["dataset_name"], pm)
    if False not in folders:
        raise FastkdError(f"no manifest of the training cases among {[str(p) for p in preprocess_manifests]}")
    return cache.finalize(store, labelled, folders[False], unlabelled, folders.get(True))

