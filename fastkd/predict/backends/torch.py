"""The torch backend: folds of an nnU-Net model folder (a student's or the teachers'). :func:`load_student`
loads one fold's checkpoint safely (``weights_only=True``) into the network nnU-Net builds from the folder's
own plans, strictly: a checkpoint that does not fit its plans is an error, never a model with random
weights. With the network it returns the fold's metadata, which an ONNX export records (:mod:`fastkd.export.onnx`).

**TorchScript on the CPU** (:class:`FrozenNetwork`, ``jit``; default on for torch on the CPU, off with
``--no-jit``): each fold's network is traced, frozen and optimised for inference once per run, which
made the r = 2 student's forward 2.7x faster here; outputs differ from eager by float rounding (1e-5).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fastkd import nnunet
from fastkd.errors import FastkdError

#: the version of the metadata :func:`load_student` returns (the ONNX export writes it into the file)
FORMAT_VERSION = 1
SUFFIXES = ()  # a model folder
ENSEMBLE = True


class FrozenNetwork(torch.nn.Module):
    """A torch network as TorchScript runs it fastest on a CPU: traced on its first input, frozen (weights
    become constants) and optimised for inference (oneDNN convolutions with pre-packed weights, fused
    element-wise ops), once per set of parameters nnU-Net loads into it (one per fold of an ensemble).

    Why: PyTorch's eager CPU convolutions are slow at a student's few channels: one forward of the r = 2
    Hippocampus student took 0.090 s eager and 0.033 s frozen (r = 4: 0.124 s and 0.017 s; the teacher:
    0.136 s and 0.116 s), outputs within 1e-5. Tracing costs about 1 s per fold, once per run. nnU-Net's
    sliding window always feeds the patch size; the trace also takes other batch sizes and shapes."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network.eval()
        self._frozen: list[tuple[dict | None, torch.jit.ScriptModule]] = []  # (state dict loaded, its module)
        self._loaded: dict | None = None

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        self._loaded = state_dict
        if not any(sd is state_dict for sd, _ in self._frozen):
            return self.network.load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for sd, module in self._frozen:
            if sd is self._loaded:
                return module(x)
        import copy
        import warnings

        # a copy: freezing may keep the live tensors as constants, which the next fold's load would overwrite
        network = copy.deepcopy(self.network).eval()
        with warnings.catch_warnings():  # the tracer's notes on Python values it records as constants
            warnings.simplefilter("ignore")
            module = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(network, x)))
        self._frozen.append((self._loaded, module))  # the dict is held here: no other dict can take its place
        return module(x)


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
    return {"network": network, "parameters": parameters, **files,
            "configuration": meta["configuration"], "mirror_axes": meta["inference_allowed_mirroring_axes"],
            "folds": list(folds)}


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
