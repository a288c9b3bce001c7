"""The onnx backend: a ``fastkd export onnx`` file run by onnxruntime as nnU-Net's predictor calls its network."""

from __future__ import annotations

from pathlib import Path

import torch

from fastkd.errors import FastkdError

INPUT, OUTPUT = "image", "logits"


class OnnxNetwork(torch.nn.Module):
    """An exported student as nnU-Net's predictor calls its network: ``logits = network(x)``."""

    def __init__(self, path: Path, device: torch.device, max_batch: int | None = None):
        import onnxruntime as ort

        super().__init__()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        # onnxruntime's pool would spin between forwards, fighting torch's own threads (which accumulate
        # the tiles) and nnU-Net's preprocessing workers for the cores: on a 2-core CPU the network phase of
        # a Hippocampus case took 0.098 s spinning and 0.063 s not (the forward alone: 0.054 s)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.max_batch = max_batch  # None: a dynamic batch axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(["logits"], {"image": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The weights are in the ONNX graph; nnU-Net's predictor hands each fold's (empty) parameters here."""
        if state_dict:
            raise FastkdError("an ONNX model carries its own weights; it takes no parameters")
