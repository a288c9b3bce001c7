"""``fastkd predict``: nnU-Net's predictor over a model folder, an ONNX export or a TensorRT engine.

:mod:`.predictor` runs the prediction (nnU-Net's predictor with tiles batched per forward, the record);
:mod:`.backends` loads the model it runs, one module per backend.
"""

from fastkd.predict.backends import default_backend, load_model
from fastkd.predict.backends.torch import FrozenNetwork
from fastkd.predict.predictor import (DEFAULT_TILE_BATCH, RECORD, FastkdPredictor, build_predictor, predict,
                                      resample_logits, resolve_jit, resolve_tile_batch)

__all__ = ["DEFAULT_TILE_BATCH", "RECORD", "FastkdPredictor", "FrozenNetwork", "build_predictor", "default_backend",
           "load_model", "predict", "resample_logits", "resolve_jit", "resolve_tile_batch"]
