"""The models ``fastkd predict`` runs, loaded into what nnU-Net's predictor takes (:func:`load_model`); the
code of each backend is in its own module here.

**Models.** ``torch``: folds of a model folder (a student's or the teachers'), each checkpoint loaded
safely (``weights_only=True``) into the network nnU-Net builds from the plans; several folds are
nnU-Net's ensemble (their logits averaged), exactly what ``nnUNetv2_predict -f 0 1 2 3 4`` does.
``onnx``: an ``.onnx`` written by ``fastkd export onnx``, run by onnxruntime; plans and dataset.json
come from the file's metadata, so no model folder is needed. ``trt``: an ``.engine`` / ``.plan`` read by
``fastkd.predict.backends.tensorrt.load_engine_model`` (imported only when asked for).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from fastkd.errors import FastkdError

if TYPE_CHECKING:  # torch is imported by the backend that runs
    import torch

BACKENDS = ("torch", "onnx", "trt")
ENGINE_SUFFIXES = (".engine", ".plan")


def default_backend(model: str | Path) -> str:
    suffix = Path(model).suffix
    return "onnx" if suffix == ".onnx" else "trt" if suffix in ENGINE_SUFFIXES else "torch"


def _check_folds(folds) -> tuple:
    folds = (folds,) if isinstance(folds, (int, str)) else tuple(folds)
    bad = [f for f in folds if f != "all" and (isinstance(f, bool) or f not in range(5))]
    if not folds or bad or len(set(folds)) != len(folds):
        raise FastkdError(f"-f {' '.join(map(str, folds)) or '(none)'}: folds are distinct values of 0-4 or 'all'")
    return folds


def load_model(model: str | Path, backend: str, folds, checkpoint: str, device: torch.device) -> dict:
    """What nnU-Net's predictor needs: ``{"network", "parameters" (one state dict per fold; [{}] for a model
    that holds its weights), "plans", "dataset_json", "configuration", "mirror_axes"}`` (+ ``"folds"``)."""
    from fastkd import nnunet

    model, folds = Path(model), _check_folds(folds)
    if backend == "torch":
        from fastkd.predict.backends.torch import load_student

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
    if len(folds) > 1:
        raise FastkdError(f"-f {' '.join(map(str, folds))}: an {backend} model holds one fold; an ensemble of "
                          "folds needs the model folder (--backend torch)")
    if backend == "trt":
        if model.suffix not in ENGINE_SUFFIXES or not model.is_file():
            raise FastkdError(f"-m {model}: the trt backend takes a TensorRT engine file "
                              f"({' or '.join(ENGINE_SUFFIXES)})")
        from fastkd.predict.backends.tensorrt import load_engine_model  # imports tensorrt only when an engine is loaded

        return load_engine_model(model, device)
    import onnx

    from fastkd.predict.backends.onnx import OnnxNetwork

    if model.suffix != ".onnx" or not model.is_file():
        raise FastkdError(f"-m {model}: the onnx backend takes a .onnx file written by `fastkd export onnx`")
    props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
    missing = [k for k in ("fastkd", "nnunet_plans", "nnunet_dataset_json") if k not in props]
    if missing:
        raise FastkdError(f"{model} lacks the metadata {', '.join(missing)}: export it with `fastkd export onnx`")
    meta = json.loads(props["fastkd"])
    shape, dynamic = meta["input"]["shape"], {int(a) for a in meta["input"]["dynamic_axes"]}
    tile = [1, meta["num_input_channels"], *meta["patch_size"]]
    fixed = [i for i in range(len(tile)) if i not in dynamic and shape[i] != tile[i]]
    if fixed:
        raise FastkdError(f"{model} takes input {shape} (dynamic axes {sorted(dynamic) or 'none'}), but nnU-Net's "
                          f"sliding window feeds {tile}: export it with the default shape, --batch 0 or --dynamic")
    return {"network": OnnxNetwork(model, device, None if 0 in dynamic else shape[0]), "parameters": [{}],
            "plans": json.loads(props["nnunet_plans"]), "dataset_json": json.loads(props["nnunet_dataset_json"]),
            "configuration": meta["configuration"], "mirror_axes": meta["inference_allowed_mirroring_axes"],
            "folds": [meta["fold"]]}

