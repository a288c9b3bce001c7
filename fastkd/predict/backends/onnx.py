"""The onnx backend: a ``fastkd export onnx`` file run by onnxruntime as nnU-Net's predictor calls its network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastkd.errors import FastkdError

INPUT, OUTPUT = "image", "logits"
SUFFIXES = (".onnx",)
ENSEMBLE = False


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
        logits = self.session.run([OUTPUT], {INPUT: x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The weights are in the ONNX graph; nnU-Net's predictor hands each fold's (empty) parameters here."""
        if state_dict:
            raise FastkdError("an ONNX model carries its own weights; it takes no parameters")


def load(model: Path, folds: tuple, checkpoint: str, device: torch.device) -> dict:
    """A ``fastkd export onnx`` file, with the plans and dataset.json of its metadata (``checkpoint``: unused)."""
    import onnx

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
