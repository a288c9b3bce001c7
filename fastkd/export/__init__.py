"""Export trained students (stock nnU-Net model folders) for deployment: ONNX (:mod:`.onnx`).

Checkpoints are loaded safely (:func:`fastkd.nnunet.load_checkpoint`) into a network built from the
model folder's own plans with ``strict=True``, so a checkpoint that does not match its plans is an
error, never a model with random weights.
"""
