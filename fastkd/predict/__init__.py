"""``fastkd predict``: nnU-Net's predictor over a model folder, an ONNX export or a TensorRT engine.

:mod:`.predictor` runs the prediction (nnU-Net's predictor with tiles batched per forward, the record);
:mod:`.backends` loads the model it runs, one module per backend. Nothing is imported here, so the CLI can
read the backend table without importing torch.
"""
