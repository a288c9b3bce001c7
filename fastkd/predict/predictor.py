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
     mirroring ran: asked for and the model has mirroring axes), "step_size", "tile_batch_wanted" (network
     inputs per forward asked for, or the device's default), "tile_batch" (as run: capped by a
     fixed-batch network), "jit" (the torch network ran frozen by TorchScript), "in_process" (the cases ran
     in the calling process, no worker pools), "cases" (number predicted), "seconds_total" (wall time of
     the whole call, from the CLI's start before it imports torch and nnU-Net: start-up, then every case's
     loading, preprocessing, network, resampling and writing), "seconds_per_case" (seconds_total / cases),
     "seconds_startup" (of seconds_total, until the first case could start: imports, loading the model,
     TorchScript traced or read from its cache), "seconds_network" (the network's forwards summed; on
     CUDA timed by CUDA events, read once per case), "seconds_network_per_case", "resample" ("device": each
     case resampled and segmented on the device, see below; "cpu": nnU-Net's own CPU export), "fastkd_version"}

A folder without it holds a prediction that did not finish (an old record is deleted first).

The models, and TorchScript freezing of a torch network on the CPU (``jit``, its trace cached per
checkpoint), are in :mod:`fastkd.predict.backends`.

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
(an ONNX exported with static batch 1; an engine that says ``max_batch``) caps it, with one line on
stderr saying so and how to lift it (export with a dynamic batch; build the engine with ``--max-batch 8``).

**Workers, or none.** For more than :data:`IN_PROCESS_CASES` cases nnU-Net's ``predict_from_files``
loads and preprocesses the next cases in background processes and fastkd writes finished ones in a
process pool while the network runs (nnU-Net's loop, at most two cases queued beyond the writers):
``num_processes`` is the size of both pools (never more than the cases). Each of those processes
imports torch and nnU-Net again (seconds each on a 2-core CPU), more than the overlap saves on one or
two cases, so those run in the calling process: the same preprocessing (``preprocessor.run_case``),
network and writer, one case after the other, with the same files.

**Segmentation on the device.** On CUDA each case's logits (nnU-Net's fp16: those of one model stay on
the device; an ensemble's are summed on the CPU as nnU-Net does, and brought back once) are resampled to the image's shape on the GPU with nnU-Net's torch resampling
(``resample_torch_fornnunet``: trilinear, no antialiasing, ``align_corners=False``; for anisotropic
spacing in-plane trilinear and nearest along the anisotropic axis, nnU-Net's threshold and the plans'
``force_separate_z``), and turned into the segmentation there (argmax; regions: nnU-Net's sigmoid over
0.5 in ``regions_class_order``; from the softmax when probabilities are saved, as nnU-Net does):
only the labels (uint8, or int16 beyond 255) and, with ``save_probabilities``, float16 probabilities
go to the CPU writer (:class:`Segmented`), which puts the crop back into the image, transposes the
axes back and writes as nnU-Net's ``export_prediction_from_logits`` does (probabilities as float32
``.npz``; a test pins this to nnU-Net's own export). Out of GPU memory there, the case goes nnU-Net's
CPU way instead (one line on stderr). The resampling is close to nnU-Net's default CPU resampling
(order-1 spline, nearest along an anisotropic axis) but not bit-identical: a few boundary voxels may
take the other label. On the CPU nnU-Net's own export path runs, so the output equals stock. The CUDA
path has not run on a GPU here (no GPU on this project's machines); the tests run the same code on
CPU tensors. ``resample`` chooses: ``"device"`` (the default on CUDA) or ``"cpu"`` (the default on the
CPU; on CUDA, nnU-Net's own export from the fp16 logits, e.g. to compare the two's speed).
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
from fastkd.predict import RESAMPLE
from fastkd.predict.backends import backend_module, default_backend, load_model
from fastkd.predict.backends.torch import FrozenNetwork

RECORD = "fastkd_predict.json"
#: network inputs per forward when ``tile_batch`` is not given (see the module docstring)
DEFAULT_TILE_BATCH = {"cpu": 1, "cuda": 8}
#: runs of at most this many cases load, predict and write in this process: nnU-Net's worker pools start
#: processes that import torch and nnU-Net again (seconds each), more than they overlap on so few cases
IN_PROCESS_CASES = 2


class FastkdPredictor(nnUNetPredictor):
    """nnU-Net's predictor with tiles batched per forward, a progress bar over cases, each case's
    segmentation made on the device when asked (default on CUDA), the cases run in this process when
    ``in_process`` (no worker pools), and the network's seconds summed (see the module docstring)."""

    def __init__(self, *, tile_batch: int = 1, resample_on_device: bool | None = None, n_cases: int | None = None,
                 progress: bool = True, in_process: bool = False, **kwargs):
        super().__init__(**kwargs)
        self.tile_batch = tile_batch
        self.resample_on_device = self.device.type == "cuda" if resample_on_device is None else resample_on_device
        self.n_cases, self.progress, self.in_process = n_cases, progress, in_process
        self.seconds_network, self._forward_started, self._events = 0.0, None, []

    def manual_initialization(self, network, *args, **kwargs):
        super().manual_initialization(network, *args, **kwargs)
        network.register_forward_pre_hook(self._before_forward)
        network.register_forward_hook(self._after_forward)

    # -- the network's own time (``seconds_network``) ---------------------------------------------
    # On CUDA a pair of timing events per forward, read once per case: a synchronisation per forward would
    # stall the GPU between tiles (the cost item 2 of the TensorRT runner removes).
    def _before_forward(self, module, args):
        if self.device.type == "cuda":
            self._events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self._events[-1][0].record()
        else:
            self._forward_started = time.perf_counter()

    def _after_forward(self, module, args, output):
        if self.device.type == "cuda":
            self._events[-1][1].record()
        else:
            self.seconds_network += time.perf_counter() - self._forward_started

    def _add_network_time(self):
        """The case's forwards timed on the GPU, summed (after its last forward has finished)."""
        if self._events:
            self._events[-1][1].synchronize()
            self.seconds_network += sum(start.elapsed_time(end) for start, end in self._events) / 1000
            self._events.clear()

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's, except that one fold's logits stay on the device when the case is segmented there.
        nnU-Net moves every fold's fp16 logits to the CPU (so that an ensemble's sum cannot run out of GPU
        memory); a single model's would only come back to the device for resampling."""
        if not (self.resample_on_device and len(self.list_of_parameters) == 1):
            return super().predict_logits_from_preprocessed_data(data)
        from nnunetv2.configuration import default_num_processes

        n_threads = torch.get_num_threads()
        torch.set_num_threads(min(default_num_processes, n_threads))  # as nnU-Net's
        try:
            getattr(self.network, "_orig_mod", self.network).load_state_dict(self.list_of_parameters[0])
            return self.predict_sliding_window_return_logits(data)
        finally:
            torch.set_num_threads(n_threads)

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

    # -- per case: loading, the network, the writers -------------------------------------------------
    def _internal_get_data_iterator_from_lists_of_filenames(self, input_list_of_lists, seg_from_prev_stage_files,
                                                            output_filenames_truncated, num_processes):
        if not self.in_process:
            return super()._internal_get_data_iterator_from_lists_of_filenames(
                input_list_of_lists, seg_from_prev_stage_files, output_filenames_truncated, num_processes)
        if any(f is not None for f in seg_from_prev_stage_files or ()):
            raise FastkdError("fastkd predict runs single-stage models (no cascade)")
        return _preprocessed_in_process(self, input_list_of_lists, output_filenames_truncated)

    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 2):
        """nnU-Net's loop over the preprocessed cases (each through the network, then written), with a progress
        bar; what goes to the writer is :meth:`to_writer`'s; the writers are a process pool as nnU-Net's (at
        most two cases queued beyond its workers) unless ``in_process``."""
        import multiprocessing

        from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy

        pool = None if self.in_process else \
            multiprocessing.get_context("spawn").Pool(num_processes_segmentation_export)
        with pool or contextlib.nullcontext(), tqdm(total=self.n_cases, unit="case", desc="fastkd predict",
                                                    file=sys.stderr, disable=not self.progress) as bar:
            workers, pending = (list(pool._pool) if pool else []), []
            for item in data_iterator:
                while pool and check_workers_alive_and_busy(pool, workers, pending, allowed_num_queued=2):
                    time.sleep(0.1)
                logits = self.predict_logits_from_preprocessed_data(item["data"])
                self._add_network_time()
                args = (self.to_writer(logits, item["data_properties"], save_probabilities), item["data_properties"],
                        self.configuration_manager, self.plans_manager, self.dataset_json, item["ofile"],
                        save_probabilities)
                if pool:
                    pending.append(pool.apply_async(write_case, args))
                else:
                    write_case(*args)
                bar.update()
            for result in pending:
                while not result.ready():
                    if not all(w.is_alive() for w in workers):
                        raise RuntimeError("a segmentation writer died (killed by the OS for lack of memory?)")
                    result.wait(0.1)
                result.get()
        compute_gaussian.cache_clear()
        empty_cache(self.device)

    def to_writer(self, logits: torch.Tensor, properties: dict, save_probabilities: bool):
        """What the writer gets for a case: on the device path its :class:`Segmented` (made by
        :func:`segment_on_device`), else nnU-Net's logits as nnU-Net's own loop hands them over; out of GPU
        memory on the device path, the latter (nnU-Net resamples on the CPU)."""
        if not self.resample_on_device:
            return logits.cpu().numpy()
        try:
            return segment_on_device(logits, properties, self.plans_manager, self.configuration_manager,
                                     self.label_manager, self.device, save_probabilities)
        except torch.cuda.OutOfMemoryError:
            empty_cache(self.device)
            print(f"fastkd predict: out of GPU memory resampling a case of shape "
                  f"{properties['shape_after_cropping_and_before_resampling']} on {self.device}; nnU-Net resamples "
                  f"and writes this case on the CPU instead", file=sys.stderr)
            return logits.cpu().numpy()


def _preprocessed_in_process(predictor: FastkdPredictor, inputs: list, output_files: list):
    """The cases loaded and preprocessed one by one in this process, as nnU-Net's workers hand them over."""
    preprocessor = predictor.configuration_manager.preprocessor_class(verbose=False)
    for files, ofile in zip(inputs, output_files):
        data, _, properties = preprocessor.run_case(files, None, predictor.plans_manager,
                                                    predictor.configuration_manager, predictor.dataset_json)
        data = torch.from_numpy(data).to(dtype=torch.float32, memory_format=torch.contiguous_format)
        yield {"data": data, "data_properties": properties, "ofile": ofile}


def _flip(x: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
    return torch.flip(x, axes) if axes else x


@torch.inference_mode()
def resample_logits(logits: torch.Tensor, properties: dict, plans_manager, configuration_manager,
                    device: torch.device) -> torch.Tensor:
    """Logits on the preprocessed grid -> the image's cropped shape, resampled on ``device`` with nnU-Net's
    torch resampling (the spacings as nnU-Net's export computes them); float32, on ``device``."""
    from nnunetv2.preprocessing.resampling.resample_torch import resample_torch_fornnunet

    shape = properties["shape_after_cropping_and_before_resampling"]
    spacing = [properties["spacing"][i] for i in plans_manager.transpose_forward]
    current = configuration_manager.spacing if len(configuration_manager.spacing) == len(shape) else \
        [spacing[0], *configuration_manager.spacing]
    kwargs = {k: v for k, v in configuration_manager.configuration.get("resampling_fn_probabilities_kwargs", {}).items()
              if k in ("force_separate_z", "separate_z_anisotropy_threshold")}
    # the fp16 logits cross to the device as they are and become float32 there
    return resample_torch_fornnunet(logits.to(device).float(), shape, current, spacing, is_seg=False,
                                    num_threads=torch.get_num_threads(), device=device, **kwargs).float()


class Segmented:
    """A case's segmentation made on the device (cropped, preprocessed axis order) in the smallest integer
    dtype that holds its labels, and its probabilities in float16 when they are saved: all the writer needs."""

    def __init__(self, segmentation, probabilities=None):
        self.segmentation, self.probabilities = segmentation, probabilities


def label_dtype(label_manager) -> torch.dtype:
    """uint8 when every label fits, else int16 (torch has no uint16 arithmetic; nnU-Net's own choice)."""
    labels = label_manager.regions_class_order if label_manager.has_regions else label_manager.all_labels
    return torch.uint8 if max(labels) < 256 else torch.int16


@torch.inference_mode()
def segment_on_device(logits: torch.Tensor, properties: dict, plans_manager, configuration_manager, label_manager,
                      device: torch.device, save_probabilities: bool = False) -> Segmented:
    """nnU-Net's ``convert_predicted_logits_to_segmentation_with_correct_shape`` up to the cropping, on
    ``device``: the logits resampled (:func:`resample_logits`), then its segmentation (argmax; regions: the
    sigmoid over 0.5 in ``regions_class_order``), from the probabilities when they are saved, as nnU-Net does."""
    resampled = resample_logits(logits, properties, plans_manager, configuration_manager, device)
    probabilities = label_manager.apply_inference_nonlin(resampled) if save_probabilities else None
    scores = resampled if probabilities is None else probabilities
    if label_manager.has_regions:  # nnU-Net's torch path runs on any device
        segmentation = (label_manager.convert_probabilities_to_segmentation(scores) if save_probabilities else
                        label_manager.convert_logits_to_segmentation(scores))
    else:  # nnU-Net's argmax goes through numpy; torch's also takes the first of equal scores
        segmentation = scores.argmax(0)
    return Segmented(segmentation.to(label_dtype(label_manager)).cpu().numpy(),
                     None if probabilities is None else probabilities.half().cpu().numpy())


def write_case(prediction, properties: dict, configuration_manager, plans_manager, dataset_json: dict, ofile: str,
               save_probabilities: bool) -> None:
    """Write one case as nnU-Net's ``export_prediction_from_logits`` does: from logits by that function
    itself; from a :class:`Segmented` by its last steps (the crop put back into the image, the axes
    transposed back, probabilities as float32 ``.npz`` + ``.pkl``, the reader/writer of the plans)."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image
    from batchgenerators.utilities.file_and_folder_operations import save_pickle
    from nnunetv2.inference.export_prediction import export_prediction_from_logits

    if not isinstance(prediction, Segmented):
        return export_prediction_from_logits(prediction, properties, configuration_manager, plans_manager,
                                             dataset_json, ofile, save_probabilities)
    import numpy as np

    label_manager = plans_manager.get_label_manager(dataset_json)
    bbox, shape = properties["bbox_used_for_cropping"], properties["shape_before_cropping"]
    segmentation = np.zeros(shape, dtype=np.uint8 if len(label_manager.foreground_labels) < 255 else np.uint16)
    segmentation = insert_crop_into_image(segmentation, prediction.segmentation, bbox)
    if save_probabilities:
        probabilities = label_manager.revert_cropping_on_probabilities(
            prediction.probabilities.astype(np.float32), bbox, shape)
        np.savez_compressed(ofile + ".npz", probabilities=probabilities.transpose(
            [0] + [i + 1 for i in plans_manager.transpose_backward]))
        save_pickle(properties, ofile + ".pkl")
    plans_manager.image_reader_writer_class().write_seg(segmentation.transpose(plans_manager.transpose_backward),
                                                        ofile + dataset_json["file_ending"], properties)


#: how to lift a fixed-batch network's cap, per backend
LIFT_BATCH_CAP = {"onnx": "export it with a dynamic batch: fastkd export onnx --batch 0 (or --dynamic)",
                  "trt": "build the engine for larger batches: fastkd export trt --max-batch 8"}


def resolve_tile_batch(tile_batch: int | None, device: torch.device, backend: str, network) -> tuple[int, int]:
    """``(wanted, used)`` network inputs per forward: the request (or the device's default), and that capped
    by the network's ``max_batch`` (a torch network takes any batch; an ONNX or engine network says, else 1);
    a cap is said on stderr, with how to lift it."""
    if tile_batch is not None and (isinstance(tile_batch, bool) or not isinstance(tile_batch, int) or tile_batch < 1):
        raise FastkdError(f"--tile-batch {tile_batch!r}: must be an integer >= 1")
    wanted = tile_batch or DEFAULT_TILE_BATCH.get(device.type, 1)
    limit = None if backend == "torch" else getattr(network, "max_batch", 1)
    if limit is None or wanted <= limit:
        return wanted, wanted
    asked = f"--tile-batch {tile_batch}" if tile_batch is not None else f"the {device.type} default of {wanted}"
    print(f"fastkd predict: the {backend} model takes batches of at most {limit}: {asked} -> {limit} network "
          f"input(s) per forward; to lift it, {LIFT_BATCH_CAP.get(backend, 're-export it with a larger batch')}",
          file=sys.stderr)
    return wanted, limit


def resolve_jit(jit: bool | None, device: torch.device, backend: str) -> bool:
    """Whether the torch network runs as a :class:`FrozenNetwork`: asked for, or by default on the CPU."""
    if jit and (backend != "torch" or device.type != "cpu"):
        raise FastkdError(f"--jit: TorchScript freezing is for the torch backend on the CPU, not {backend} on "
                          f"{device.type}")
    return backend == "torch" and device.type == "cpu" if jit is None else bool(jit)


def build_predictor(model: str | Path, *, backend: str | None = None, folds=(0,),
                    checkpoint: str = "checkpoint_final.pth", device: str = "cpu", mirroring: bool = True,
                    step_size: float = 0.5, tile_batch: int | None = None, n_cases: int | None = None,
                    progress: bool = True, jit: bool | None = None,
                    resample: str | None = None) -> tuple[FastkdPredictor, dict]:
    """The predictor :func:`predict` runs, initialised with the model (arguments as there), and what the
    record says of it: ``{"backend", "folds", "device", "mirroring", "step_size", "tile_batch_wanted",
    "tile_batch", "jit", "resample"}``. A TorchScript network is ready (traced, or read from the cache) on
    return."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from fastkd.config import check_values
    from fastkd.device import torch_device

    backend = backend or default_backend(model)
    backend_module(backend)  # an unknown name is refused before the other arguments are checked
    check_values({"softlabels.step_size": step_size})
    on = torch_device(device, "--device")
    if resample is not None and resample not in RESAMPLE:
        raise FastkdError(f"--resample {resample!r}: valid values are {', '.join(RESAMPLE)}")
    resample = resample or ("device" if on.type == "cuda" else "cpu")
    m = load_model(model, backend, folds, checkpoint, on)
    wanted, batch = resolve_tile_batch(tile_batch, on, backend, m["network"])
    jit = resolve_jit(jit, on, backend)
    plans_manager = PlansManager(m["plans"])
    configuration = plans_manager.get_configuration(m["configuration"])
    network = m["network"]
    if jit:
        network = FrozenNetwork(network, m["parameters"], m["trace_keys"],
                                (1, m["num_input_channels"], *configuration.patch_size))
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # nnU-Net's note on CPU devices
        predictor = FastkdPredictor(
            tile_batch=batch, n_cases=n_cases, progress=progress, tile_step_size=step_size,
            resample_on_device=resample == "device",
            use_gaussian=True, use_mirroring=mirroring, perform_everything_on_device=on.type == "cuda", device=on,
            verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        predictor.manual_initialization(network.to(on), plans_manager, configuration, m["parameters"],
                                        m["dataset_json"], "nnUNetTrainer", m["mirror_axes"])
    return predictor, {"backend": backend, "folds": m.get("folds"), "device": str(on),
                       "mirroring": bool(mirroring and m["mirror_axes"]), "step_size": step_size,
                       "tile_batch_wanted": wanted, "tile_batch": batch, "jit": jit, "resample": resample}


def predict(input_folder: str | Path, output_folder: str | Path, model: str | Path, *, backend: str | None = None,
            folds=(0,), checkpoint: str = "checkpoint_final.pth", device: str = "cpu", mirroring: bool = True,
            step_size: float = 0.5, save_probabilities: bool = False, num_processes: int = 2,
            tile_batch: int | None = None, progress: bool = True, jit: bool | None = None,
            resample: str | None = None, started: float | None = None) -> dict:
    """Segment every image of ``input_folder`` (nnU-Net raw naming, ``<case>_0000<file_ending>``) into
    ``output_folder``; write and return the run's record (see the module docstring).

    ``backend``: torch, onnx or trt (default: onnx for ``.onnx``, trt for ``.engine``/``.plan``, else torch).
    ``folds``: folds of a model folder; several = nnU-Net's ensemble (torch). ``tile_batch``: network inputs
    per forward (default by device, :data:`DEFAULT_TILE_BATCH`). ``resample``: ``"device"`` or ``"cpu"``
    (default: the device on CUDA; see the module docstring). ``num_processes``: loading/preprocessing
    workers and resampling/writing workers (each pool; none for up to :data:`IN_PROCESS_CASES` cases).
    nnU-Net's chatter is hidden; ``progress`` shows a bar over cases. ``started``: the
    ``time.perf_counter()`` the run's clock starts from (the CLI's, before it imports torch; default: now).
    """
    from nnunetv2.utilities.utils import create_lists_from_splitted_dataset_folder

    import fastkd
    from fastkd.io import atomic_write_text

    start = time.perf_counter() if started is None else started
    if isinstance(num_processes, bool) or not isinstance(num_processes, int) or num_processes < 1:
        raise FastkdError(f"num_processes = {num_processes!r}: must be an integer >= 1")
    if not Path(input_folder).is_dir():
        raise FastkdError(f"-i {input_folder}: not a folder of images")
    predictor, settings = build_predictor(model, backend=backend, folds=folds, checkpoint=checkpoint, device=device,
                                          mirroring=mirroring, step_size=step_size, tile_batch=tile_batch,
                                          progress=progress, jit=jit, resample=resample)
    ending = predictor.dataset_json["file_ending"]
    inputs = create_lists_from_splitted_dataset_folder(str(input_folder), ending, num_processes=num_processes)
    if not inputs:
        raise FastkdError(f"-i {input_folder}: no images named <case>_0000{ending}")
    predictor.n_cases, predictor.in_process = len(inputs), len(inputs) <= IN_PROCESS_CASES
    startup = time.perf_counter() - start
    output_folder = Path(output_folder)
    (output_folder / RECORD).unlink(missing_ok=True)  # present only once this run has finished
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # nnU-Net's chatter, per case
        n = min(num_processes, len(inputs))
        predictor.predict_from_files(inputs, str(output_folder), save_probabilities=save_probabilities,
                                     overwrite=True, num_processes_preprocessing=n,
                                     num_processes_segmentation_export=n)
    seconds = time.perf_counter() - start
    record = {"model": str(Path(model).absolute()), **settings, "in_process": predictor.in_process,
              "cases": len(inputs), "seconds_total": seconds, "seconds_per_case": seconds / len(inputs),
              "seconds_startup": startup, "seconds_network": predictor.seconds_network,
              "seconds_network_per_case": predictor.seconds_network / len(inputs),
              "fastkd_version": fastkd.__version__}
    atomic_write_text(output_folder / RECORD, json.dumps(record, indent=2) + "\n")
    return record
