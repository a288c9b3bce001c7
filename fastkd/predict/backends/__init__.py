"""The models ``fastkd predict`` runs, loaded into what nnU-Net's predictor takes (:func:`load_model`): one
module per backend, found by name in :data:`BACKENDS`.

Every backend module has the same interface:

- ``load(model: Path, folds: tuple, checkpoint: str, device: torch.device) -> dict``: what nnU-Net's
  predictor needs (see :func:`load_model`), or a FastkdError saying why ``model`` is not one it runs;
  ``folds`` are checked already (distinct, 0-4 or 'all'; one unless ``ENSEMBLE``);
- ``SUFFIXES``: the model file suffixes it serves, for :func:`default_backend` (none: a model folder);
- ``ENSEMBLE``: whether several folds load as nnU-Net's ensemble (else a model holds one fold).

A new backend is a module with these three and its entry in :data:`BACKENDS` (``fastkd predict --backend``
offers the names of this table).

**Models.** ``torch``: folds of a model folder (a student's or the teachers'), each checkpoint loaded
safely (``weights_only=True``) into the network nnU-Net builds from the plans; several folds are
nnU-Net's ensemble (their logits averaged), exactly what ``nnUNetv2_predict -f 0 1 2 3 4`` does.
``onnx``: an ``.onnx`` written by ``fastkd export onnx``, run by onnxruntime; plans and dataset.json
come from the file's metadata, so no model folder is needed. ``trt``: an ``.engine`` / ``.plan`` read by
``fastkd.predict.backends.tensorrt.load_engine_model`` (TensorRT is imported only when an engine is loaded).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from fastkd.errors import FastkdError

if TYPE_CHECKING:  # torch is imported by the backend that runs
    import torch

#: backend name -> its module (imported when the backend is asked for)
BACKENDS = {"torch": "fastkd.predict.backends.torch", "onnx": "fastkd.predict.backends.onnx",
            "trt": "fastkd.predict.backends.tensorrt"}


def backend_module(backend: str) -> ModuleType:
    """The module of ``backend``; an unknown name is refused with the valid ones listed."""
    if backend not in BACKENDS:
        raise FastkdError(f"--backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[backend])


def default_backend(model: str | Path) -> str:
    """The backend whose ``SUFFIXES`` hold the model's suffix; torch for any other (a model folder)."""
    suffix = Path(model).suffix
    return next((name for name in BACKENDS if suffix in backend_module(name).SUFFIXES), "torch")


def _check_folds(folds) -> tuple:
    folds = (folds,) if isinstance(folds, (int, str)) else tuple(folds)
    bad = [f for f in folds if f != "all" and (isinstance(f, bool) or f not in range(5))]
    if not folds or bad or len(set(folds)) != len(folds):
        raise FastkdError(f"-f {' '.join(map(str, folds)) or '(none)'}: folds are distinct values of 0-4 or 'all'")
    return folds


def load_model(model: str | Path, backend: str, folds, checkpoint: str, device: torch.device) -> dict:
    """What nnU-Net's predictor needs: ``{"network", "parameters" (one state dict per fold; [{}] for a model
    that holds its weights), "plans", "dataset_json", "configuration", "mirror_axes"}`` (+ ``"folds"``)."""
    module = backend_module(backend)
    model, folds = Path(model), _check_folds(folds)
    if len(folds) > 1 and not module.ENSEMBLE:
        raise FastkdError(f"-f {' '.join(map(str, folds))}: an {backend} model holds one fold; an ensemble of "
                          "folds needs the model folder (--backend torch)")
    return module.load(model, folds, checkpoint, device)
