"""``fastkd predict``: segment images with nnU-Net's predictor, from a model folder (torch), an ONNX export
(onnx) or a TensorRT engine (trt), with tiles batched per forward and a record of the run written last.

nnU-Net's own predictor does the work, so the result is what ``nnUNetv2_predict`` writes: its
preprocessing from the plans, its sliding window (Gaussian tile weighting, the step size, test-time
mirroring over the axes the model was trained for), its resampling back to each image's geometry, its
file naming. The output folder holds ``<case><file_ending>`` per input case (``.npz`` / ``.pkl``
probabilities with ``save_probabilities``), the ``plans.json``, ``dataset.json`` and
``predict_from_raw_data_args.json`` nnU-Net writes there, and, written last and atomically once every
case is on disk, ``fastkd_predict.json``::

    {"model": absolute path as given, "backend": "torch" | "onnx" | "trt", "folds": [..] (the ONNX's own
     fold from its metadata; null where an engine does not say), "device", "mirroring" (whether test-time
     mirroring ran: asked for and the model has mirroring axes), "step_size", "tile_batch" (network
     inputs per forward, as run), "jit" (the torch network ran frozen by TorchScript), "cases" (number predicted), "seconds_total" (wall time of the whole
     call: loading the model, every case's loading, preprocessing, network, resampling and writing),
     "seconds_per_case" (seconds_total / cases), "fastkd_version"}

A folder without it holds a prediction that did not finish (an old record is deleted first).

The models, and TorchScript freezing of a torch network on the CPU (``jit``), are in
:mod:`fastkd.predict.backends`.

**Tiles batched per forward** (:class:`FastkdPredictor`). ``tile_batch`` is the number of network inputs
per forward: tiles and their mirrored copies alike, the copies of a tile first, so a forward never
holds more than ``tile_batch`` inputs whatever the mirroring (with mirroring in 3D and ``tile_batch`` 8,
one tile and its 7 flips; without mirroring, 8 tiles). Each tile's outputs are un-flipped and summed in
nnU-Net's order, divided by the passes, weighted by nnU-Net's Gaussian and accumulated in nnU-Net's
fp16 buffers in nnU-Net's tile order: only the network's own batch-size dependence (float rounding of
batched convolutions) can differ from the stock sliding window. ``tile_batch`` 1 runs nnU-Net's own
sliding window unchanged. Defaults: 1 on the CPU, where batching costs (on this project's 2-core CPU
one forward of two BraTS tiles of the r = 4 student took 3.6x as long as one; ``bench_predict.py``
measures it again), so the CPU default equals stock nnU-Net bit for bit; 8 on a GPU, which nnU-Net's
single small tiles leave mostly idle (not measured here: no GPU). A network that takes a fixed batch
(an ONNX exported with static batch 1; an engine that says ``max_batch``) caps it.

**Overlap.** nnU-Net's ``predict_from_files`` already loads and preprocesses the next cases in
background processes and resamples and writes finished ones in a process pool while the network runs;
fastkd keeps that: ``num_processes`` is the size of both pools (and never more than the cases).

**Resampling on the device.** On CUDA each case's logits are resampled back to the image's shape on
the GPU, with nnU-Net's torch resampling (``resample_torch_fornnunet``: trilinear, no antialiasing,
``align_corners=False``; for anisotropic spacing in-plane trilinear and nearest along the anisotropic
axis, nnU-Net's threshold and the plans' ``force_separate_z``), before they go to the CPU for writing;
nnU-Net's export then finds nothing left to resample. That is close to nnU-Net's default CPU resampling
(order-1 spline, nearest along an anisotropic axis) but not bit-identical: a few boundary voxels may
take the other label. On the CPU nnU-Net's own export path runs, so the output equals stock. The CUDA
path has not run on a GPU here (no GPU on this project's machines); the tests run the same code on
CPU tensors.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.inference.sliding_window_prediction import compute_gaussian
from nnunetv2.utilities.helpers import empty_cache
from tqdm import tqdm

from fastkd.errors import FastkdError
from fastkd.predict.backends import backend_module, default_backend, load_model
from fastkd.predict.backends.torch import FrozenNetwork

RECORD = "fastkd_predict.json"
#: network inputs per forward when ``tile_batch`` is not given (see the module docstring)
DEFAULT_TILE_BATCH = {"cpu": 1, "cuda": 8}


class FastkdPredictor(nnUNetPredictor):
    """nnU-Net's predictor with tiles batched per forward, a progress bar over cases and, when asked
    (default on CUDA), each case's logits resampled on the device (see the module docstring)."""

    def __init__(self, *, tile_batch: int = 1, resample_on_device: bool | None = None, n_cases: int | None = None,
                 progress: bool = True, **kwargs):
        super().__init__(**kwargs)
        self.tile_batch = tile_batch
        self.resample_on_device = self.device.type == "cuda" if resample_on_device is None else resample_on_device
        self.n_cases, self.progress, self._properties = n_cases, progress, None

    # -- the sliding window ----------------------------------------------------------------------
    def _passes(self) -> list[tuple[int, ...]]:
        """Flip axes of every network pass of a (batched) tile, in nnU-Net's order; ``()`` is the tile itself."""
        axes = self.allowed_mirroring_axes if self.use_mirroring else None
        if not axes:
            return [()]
        if max(axes) >= len(self.configuration_manager.patch_size):
            raise RuntimeError(f"mirror axes {axes} do not fit the {len(self.configuration_manager.patch_size)}D patch")
        axes = [a + 2 for a in axes]
        return [(), *(c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1))]

    @torch.inference_mode()
    def _internal_predict_sliding_window_return_logits(self, data, slicers, do_on_device: bool = True):
        if self.tile_batch == 1:
            return super()._internal_predict_sliding_window_return_logits(data, slicers, do_on_device)
        results_device = self.device if do_on_device else torch.device("cpu")
        empty_cache(self.device)
        data = data.to(results_device)
        logits = torch.zeros((self.label_manager.num_segmentation_heads, *data.shape[1:]), dtype=torch.half,
                             device=results_device)
        weights = torch.zeros(data.shape[1:], dtype=torch.half, device=results_device)
        gaussian = compute_gaussian(tuple(self.configuration_manager.patch_size), sigma_scale=1. / 8,
                                    value_scaling_factor=10, device=results_device) if self.use_gaussian else 1
        passes = self._passes()
        inputs = [(t, axes) for t in range(len(slicers)) for axes in passes]  # the copies of a tile together
        outputs = {}  # tile -> the outputs of its passes so far, un-flipped
        for start in range(0, len(inputs), self.tile_batch):
            chunk = inputs[start:start + self.tile_batch]
            x = torch.cat([_flip(data[slicers[t]][None], axes) for t, axes in chunk]).to(self.device)
            for (t, axes), y in zip(chunk, self.network(x)):
                outputs.setdefault(t, []).append(_flip(y[None], axes))
                if len(outputs[t]) < len(passes):
                    continue
                tile, *flipped = outputs.pop(t)  # nnU-Net's sum: the tile, then each flip in order
                for y_flip in flipped:
                    tile += y_flip
                if flipped:
                    tile /= len(passes)
                tile = tile[0].to(results_device)
                if self.use_gaussian:
                    tile *= gaussian
                logits[slicers[t]] += tile
                weights[slicers[t][1:]] += gaussian
        torch.div(logits, weights, out=logits)
        if torch.any(torch.isinf(logits)):
            raise RuntimeError("inf in the predicted logits (nnU-Net's fp16 accumulation overflowed)")
        return logits

    # -- per case: progress, resampling on the device --------------------------------------------
    def predict_from_data_iterator(self, data_iterator, *args, **kwargs):
        def cases():
            with tqdm(total=self.n_cases, unit="case", desc="fastkd predict", file=sys.stderr,
                      disable=not self.progress) as bar:
                for item in data_iterator:
                    self._properties = item["data_properties"]
                    yield item
                    bar.update()  # the next case is asked for: this one went through the network

        return super().predict_from_data_iterator(cases(), *args, **kwargs)

    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        logits = super().predict_logits_from_preprocessed_data(data)
        if not self.resample_on_device or self._properties is None:
            return logits
        return resample_logits(logits, self._properties, self.plans_manager, self.configuration_manager, self.device)


def _flip(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, axes) if axes else x


@torch.inference_mode()
def resample_logits(logits: torch.Tensor, properties: dict, plans_manager, configuration_manager,
                    device: torch.device) -> torch.Tensor:
    """Logits on the preprocessed grid -> the image's cropped shape, resampled on ``device`` with nnU-Net's
    torch resampling (the spacings as nnU-Net's export computes them); returned on the CPU, float32."""
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    shape = properties["shape_after_cropping_and_before_resampling"]
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) else \
        [spacing[0], *configuration_manager.spacing]
    kwargs = {k: v for k, v in configuration_manager.configuration.get("resampling_fn_probabilities_kwargs", {}).items()
              if k in ("force_separate_z", "separate_z_anisotropy_threshold")}
    out = resample_torch_fornnunet(logits.to(device, torch.float32), shape, current, spacing, is_seg=False,
                                   num_threads=torch.get_num_threads(), device=device, **kwargs)
    return out.float().cpu()


def resolve_tile_batch(tile_batch: int | None, device: torch.device, backend: str, network) -> int:
    """Network inputs per forward: the request (or the device's default), capped by the network's
    ``max_batch`` (a torch network takes any batch; an ONNX or engine network says, else 1)."""
    if tile_batch is not None and (isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1):
        raise FastkdError(f"--tile-batch {tile_batch!r}: must be an integer >= 1")
    wanted = tile_batch or DEFAULT_TILE_BATCH.get(device.type, 1)
    limit = None if backend == "torch" else getattr(network, "max_batch", 1)
    if limit is not None and wanted > limit:
        if tile_batch is not None:
            print(f"fastkd predict: {backend} model takes batches of at most {limit}: --tile-batch {tile_batch} -> "
                  f"{limit}", file=sys.stderr)
        return limit
    return wanted


def resolve_jit(jit: bool | None, device: torch.device, backend: str) -> bool:
    """Whether the torch network runs as a :class:`FrozenNetwork`: asked for, or by default on the CPU."""
    if jit and (backend != "torch" or device.type != "cpu"):
        raise FastkdError(f"--jit: TorchScript freezing is for the torch backend on the CPU, not {backend} on "
                          f"{device.type}")
    return backend == "torch" and device.type == "cpu" if jit is None else bool(jit)


def build_predictor(model: str | Path, *, backend: str | None = None, folds=(0,),
                    checkpoint: str = "checkpoint_final.pth", device: str = "cpu", mirroring: bool = True,
                    step_size: float = 0.5, tile_batch: int | None = None, n_cases: int | None = None,
                    progress: bool = True, jit: bool | None = None) -> tuple[FastkdPredictor, dict]:
    """The predictor :func:`predict` runs, initialised with the model (arguments as there), and what the
    record says of it: ``{"backend", "folds", "device", "mirroring", "step_size", "tile_batch", "jit"}``."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from fastkd.config import check_values
    from fastkd.device import torch_device

    backend = backend or default_backend(model)
    backend_module(backend)  # an unknown name is refused before the other arguments are checked
    check_values({"softlabels.step_size": step_size})
    on = torch_device(device, "--device")
    m = load_model(model, backend, folds, checkpoint, on)
    batch = resolve_tile_batch(tile_batch, on, backend, m["network"])
    jit = resolve_jit(jit, on, backend)
    network = FrozenNetwork(m["network"]) if jit else m["network"]
    plans_manager = PlansManager(m["plans"])
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # nnU-Net's note on CPU devices
        predictor = FastkdPredictor(
            tile_batch=batch, n_cases=n_cases, progress=progress, tile_step_size=step_size, use_gaussian=True,
            use_mirroring=mirroring, perform_everything_on_device=on.type == "cuda", device=on, verbose=False,
            verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network.to(on), plans_manager,
                                        plans_manager.get_configuration(m["configuration"]), m["parameters"],
                                        m["dataset_json"], "nnUNetTrainer", m["mirror_axes"])
    return predictor, {"backend": backend, "folds": m.get("folds"), "device": str(on),
                       "mirroring": bool(mirroring and m["mirror_axes"]), "step_size": step_size, "tile_batch": batch, "jit": jit}


def predict(input_folder: str | Path, output_folder: str | Path, model: str | Path, *, backend: str | None = None,
            folds=(0,), checkpoint: str = "checkpoint_final.pth", device: str = "cpu", mirroring: bool = True,
            step_size: float = 0.5, save_probabilities: bool = False, num_processes: int = 2,
            tile_batch: int | None = None, progress: bool = True, jit: bool | None = None) -> dict:
    """Segment every image of ``input_folder`` (nnU-Net raw naming, ``<case>_0000<file_ending>``) into
    ``output_folder``; write and return the run's record (see the module docstring).

    ``backend``: torch, onnx or trt (default: onnx for ``.onnx``, trt for ``.engine``/``.plan``, else torch).
    ``folds``: folds of a model folder; several = nnU-Net's ensemble (torch). ``tile_batch``: network inputs
    per forward (default by device, :data:`DEFAULT_TILE_BATCH`). ``num_processes``: loading/preprocessing
    workers and resampling/writing workers (each pool). nnU-Net's chatter is hidden; ``progress`` shows a
    bar over cases.
    """
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    import fastkd
    from fastkd.io import atomic_write_text

    start = time.perf_counter()
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise FastkdError(f"num_processes = {num_processes!r}: must be an integer >= 1")
    if not Path(input_folder).is_dir():
        raise FastkdError(f"-i {input_folder}: not a folder of images")
    predictor, settings = build_predictor(model, backend=backend, folds=folds, checkpoint=checkpoint, device=device,
                                          mirroring=mirroring, step_size=step_size, tile_batch=tile_batch,
                                          progress=progress, jit=jit)
    ending = predictor.dataset_json["file_ending"]
    inputs = create_lists_from_splitted_dataset_folder(str(input_folder), ending, num_processes=num_processes)
    if not inputs:
        raise FastkdError(f"-i {input_folder}: no images named <case>_0000{ending}")
    predictor.n_cases = len(inputs)
    output_folder = Path(output_folder)
    (output_folder / RECORD).unlink(missing_ok=True)  # present only once this run has finished
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # nnU-Net's chatter, per case
        n = min(num_processes, len(inputs))
        predictor.predict_from_files(inputs, str(output_folder), save_probabilities=save_probabilities,
                                     overwrite=True, num_processes_preprocessing=n,
                                     num_processes_segmentation_export=n)
    seconds = time.perf_counter() - start
    record = {"model": str(Path(model).absolute()), **settings, "cases": len(inputs), "seconds_total": seconds,
              "seconds_per_case": seconds / len(inputs), "fastkd_version": fastkd.__version__}
    atomic_write_text(output_folder / RECORD, json.dumps(record, indent=2) + "\n")
    return record
