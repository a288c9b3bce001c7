"""The torch backend: folds of an nnU-Net model folder (a student's or the teachers'). :func:`load_student`
loads one fold's checkpoint safely (``weights_only=True``) into the network nnU-Net builds from the folder's
own plans, strictly: a checkpoint that does not fit its plans is an error, never a model with random
weights. With the network it returns the fold's metadata, which an ONNX export records (:mod:`fastkd.export.onnx`).

**TorchScript on the CPU** (:class:`FrozenNetwork`, ``jit``; default on for torch on the CPU, off with
``--no-jit``): each fold's network is traced (once per checkpoint, torch version and patch: the trace is
cached, :func:`cached_trace`), frozen and optimised for inference when the model is loaded, which made the
r = 2 student's forward 2.7x faster here; outputs differ from eager by float rounding (1e-5).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch

from fastkd import nnunet
from fastkd.errors import FastkdError

#: the version of the metadata :func:`load_student` returns (the ONNX export writes it into the file)
FORMAT_VERSION = 1
#: the version of a cached trace's key (:func:`cached_trace`), and the file in the trace that holds the key
TRACE_FORMAT, TRACE_KEY_FILE = 1, "fastkd_trace_key.json"
SUFFIXES = ()  # a model folder
ENSEMBLE = True


class FrozenNetwork(torch.nn.Module):
    """A torch network as TorchScript runs it fastest on a CPU: one module per set of parameters nnU-Net loads
    into it (one per fold of an ensemble), each traced at ``input_shape``, frozen (weights become constants)
    and optimised for inference (oneDNN convolutions with pre-packed weights, fused element-wise ops), all
    ready when the constructor returns.

    Why: PyTorch's eager CPU convolutions are slow at a student's few channels: one forward of the r = 2
    Hippocampus student took 0.090 s eager and 0.033 s frozen (r = 4: 0.124 s and 0.017 s; the teacher:
    0.136 s and 0.116 s), outputs within 1e-5. Tracing took 1.7 s per fold of the demo's r = 2 student on
    this 2-core CPU, so each trace is kept in the cache (:func:`cached_trace`): reading it back, freezing and
    optimising took 0.07 s. nnU-Net's sliding window always feeds the patch size; the trace also takes other
    batch sizes and shapes."""

    def __init__(self, network: torch.nn.Module, parameters: list[dict], trace_keys: list[dict],
                 input_shape: tuple[int, ...]):
        super().__init__()
        self.network = network.eval()
        self._frozen = [(sd, cached_trace(network, sd, key, input_shape)) for sd, key in zip(parameters, trace_keys)]
        self._loaded = parameters[0]

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        if not any(sd is state_dict for sd, _ in self._frozen):
            raise RuntimeError("FrozenNetwork runs the parameters it was built with; got others")
        self._loaded = state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return next(m for sd, m in self._frozen if sd is self._loaded)(x)


def cache_dir() -> Path:
    """Where traced networks are kept: ``$FASTKD_CACHE/torchscript``, else ``$XDG_CACHE_HOME/fastkd/torchscript``
    (default ``~/.cache/fastkd/torchscript``); not beside the checkpoint, which may be read-only, a shared
    model or a workflow's output that must not change."""
    root = os.environ.get("FASTKD_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastkd"
    return Path(root) / "torchscript"


def cached_trace(network: torch.nn.Module, state_dict: dict, key: dict,
                 input_shape: tuple[int, ...]) -> torch.jit.ScriptModule:
    """``network`` with ``state_dict`` traced at ``input_shape``, frozen and optimised for inference. The
    trace is read from :func:`cache_dir` when the key stored in the file equals this one (the checkpoint's
    and architecture's sha256, ``key``, + torch's version + the input shape); else traced and stored, written
    atomically (a cache that cannot be written is said once and the run goes on)."""
    import copy
    import warnings

    key = {"format": TRACE_FORMAT, **key, "torch": torch.__version__, "input_shape": list(input_shape)}
    text = json.dumps(key, sort_keys=True)
    path = cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()[:32]}.pt"
    traced = None
    # torch's notes: on Python values the tracer records as constants, and TorchScript's deprecation
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if path.is_file():
            extra = {TRACE_KEY_FILE: ""}
            try:
                traced = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
            except (RuntimeError, OSError, ValueError):  # torn or foreign: traced again below, and replaced
                traced = None
            if traced is not None and extra[TRACE_KEY_FILE] not in (text, text.encode()):
                traced = None
        if traced is None:
            # a copy: freezing may keep the live tensors as constants, which the next fold's load would overwrite
            network = copy.deepcopy(network).eval()
            network.load_state_dict(state_dict)
            traced = torch.jit.trace(network, torch.zeros(input_shape))
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.jit.save(traced, str(tmp), _extra_files={TRACE_KEY_FILE: text})
                os.replace(tmp, path)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                print(f"fastkd predict: cannot keep the TorchScript trace in {path} ({e}); it is traced again next run",
                      file=sys.stderr)
        return torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))


def load(model: Path, folds: tuple, checkpoint: str, device: torch.device) -> dict:
    """Folds of a model folder, several as nnU-Net's ensemble (``device``: unused, nnU-Net's predictor moves
    the network there)."""
    if not model.is_dir():
        raise FastkdError(f"-m {model}: the torch backend takes a model folder (Trainer__Plans__configuration)")
    missing = [f for f in folds if not (model / f"fold_{f}" / checkpoint).is_file()]
    if missing:
        raise FastkdError(f"-f {' '.join(map(str, folds))}: "
                          f"{', '.join(f'fold_{f}/{checkpoint}' for f in missing)} does not exist in {model} "
                          f"(found {nnunet.describe_folds(model)})")
    loaded = [load_student(model, fold, checkpoint) for fold in folds]
    network, meta, files = loaded[0]
    configurations = {m["configuration"] for _, m, _ in loaded}
    if len(configurations) > 1:
        raise FastkdError(f"-f {' '.join(map(str, folds))}: the folds' checkpoints were trained with different "
                          f"configurations ({', '.join(sorted(configurations))}); an ensemble needs one")
    # nnU-Net loads each fold's parameters into the first fold's network in turn: that network's own
    # state dict must be a copy, not its live tensors, or the second fold overwrites the first
    parameters = [{k: v.clone() for k, v in network.state_dict().items()}]
    parameters += [net.state_dict() for net, _, _ in loaded[1:]]
    architecture = json.dumps(nnunet.configuration(files["plans"], meta["configuration"])["architecture"],
                              sort_keys=True)
    trace_keys = [{"checkpoint_sha256": m["checkpoint_sha256"],
                   "architecture_sha256": hashlib.sha256(architecture.encode()).hexdigest()} for _, m, _ in loaded]
    return {"network": network, "parameters": parameters, **files,
            "configuration": meta["configuration"], "mirror_axes": meta["inference_allowed_mirroring_axes"],
            "folds": list(folds), "num_input_channels": meta["num_input_channels"], "trace_keys": trace_keys}


def load_student(model_folder: str | Path, fold, checkpoint: str):
    """``(network in eval mode, metadata)`` of one fold of an nnU-Net model folder (see the module docstring)."""
    import fastkd
    from fastkd.nnunet import load_checkpoint
    from fastkd.io import package_version
    from fastkd.io import sha256

    folder = Path(model_folder)
    plans, dataset_json = nnunet.read_plans(folder / "plans.json"), nnunet.read_dataset_json(folder)
    path = folder / f"fold_{fold}" / checkpoint
    ckpt = load_checkpoint(path)
    configuration = (ckpt.get("init_args") or {}).get("configuration")
    if configuration is None or "network_weights" not in ckpt:
        raise FastkdError(f"{path} is not an nnU-Net training checkpoint (no init_args.configuration / network_weights)")
    network, n_in, n_out = nnunet.build_network(plans, configuration, dataset_json, allow_init=False)
    try:
        network.load_state_dict(ckpt["network_weights"], strict=True)
    except RuntimeError as e:  # missing, unexpected or mis-shaped weights, all listed by torch
        raise FastkdError(f"{path} does not fit the network of {folder / 'plans.json'} ({configuration}): "
                          + " ".join(str(e).split())[:800]) from None
    cfg = nnunet.configuration(plans, configuration)
    label_manager = _label_manager(plans, dataset_json)
    strides = np.array(cfg["architecture"]["arch_kwargs"]["strides"])  # (stages, axes)
    meta = {
        "format_version": FORMAT_VERSION, "fastkd_version": fastkd.__version__,
        "nnunetv2_version": package_version("nnunetv2"), "dataset_name": plans["dataset_name"],
        "plans_name": plans["plans_name"], "configuration": configuration, "fold": fold,
        "trainer": (ckpt.get("fastkd") or {}).get("trainer", ckpt.get("trainer_name")), "checkpoint": checkpoint,
        "checkpoint_sha256": sha256(path), "patch_size": list(cfg["patch_size"]), "spacing": list(cfg["spacing"]),
        "transpose_forward": plans["transpose_forward"], "transpose_backward": plans["transpose_backward"],
        "normalization_schemes": cfg["normalization_schemes"], "use_mask_for_norm": cfg["use_mask_for_norm"],
        "foreground_intensity_properties_per_channel": plans.get("foreground_intensity_properties_per_channel"),
        "channel_names": dataset_json.get("channel_names", dataset_json.get("modality")),
        "labels": dataset_json["labels"], "regions": label_manager.has_regions,
        "regions_class_order": dataset_json.get("regions_class_order"), "file_ending": dataset_json.get("file_ending"),
        "num_input_channels": n_in, "num_outputs": n_out,
        "divisible_by": [int(v) for v in np.prod(strides, axis=0)],
        "inference_allowed_mirroring_axes": ckpt.get("inference_allowed_mirroring_axes"),
    }
    return network.eval(), meta, {"plans": plans, "dataset_json": dataset_json}


def _label_manager(plans: dict, dataset_json: dict):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    return PlansManager(plans).get_label_manager(dataset_json)
