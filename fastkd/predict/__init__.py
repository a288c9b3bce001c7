"""``fastkd predict``: nnU-Net's predictor over a model folder, an ONNX export or a TensorRT engine.

:mod:`.predictor` runs the prediction (nnU-Net's predictor with tiles batched per forward, the record);
:mod:`.backends` loads the model it runs, one module per backend. Nothing is imported here, so the CLI can
read the backend table without importing torch.
"""

#: where ``fastkd predict`` resamples each case to its image and segments it: ``device`` (the GPU, the
#: default on CUDA) or ``cpu`` (nnU-Net's own export). Here, not in the predictor, so that the CLI can offer
#: the choices without importing torch.
RESAMPLE = ("device", "cpu")
