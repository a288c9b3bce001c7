"""The onnx backend: a ``fastkd export onnx`` file run by onnxruntime as nnU-Net's predictor calls its network."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fastkd.errors import FastkdError

INPUT, OUTPUT = "image", "logits"
SUFFIXES = (".onnx",)
ENSEMBLE = False


#: what fixes a CUDA device's session that onnxruntime gave no CUDA provider
GPU_FIX = ("onnxruntime and onnxruntime-gpu share one package folder, so with both installed the one installed "
           "last is what runs: pip uninstall onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (the gpu "
           "extra: pip install fastkd[gpu])")
#: onnxruntime's output type -> (numpy, torch) dtype of the bound output
OUTPUT_TYPES = {"tensor(float)": ("float32", torch.float32), "tensor(float16)": ("float16", torch.float16)}


class OnnxNetwork(torch.nn.Module):
    """An exported student as nnU-Net's predictor calls its network: ``logits = network(x)``.

    On the CPU each forward hands onnxruntime a numpy array. On a CUDA device the session must have
    onnxruntime's CUDA provider first (else a FastkdError: a CPU fallback would run silently and slowly),
    and torch's CUDA tensors are bound in place (IOBinding: the input read and the logits written on the
    GPU, no copies through host memory), with onnxruntime on torch's current stream
    (``user_compute_stream``), so its work is ordered with torch's; on torch's default stream, whose null
    handle onnxruntime ignores, each run waits for torch's stream first; either way the outputs are
    synchronized before torch reads them."""

    def __init__(self, path: Path, device: torch.device, max_batch: int | None = None, num_outputs: int | None = None):
        import onnxruntime as ort

        super().__init__()
        self.device, self.num_outputs = device, num_outputs
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            self.device_id = torch.cuda.current_device() if device.index is None else device.index
            stream = torch.cuda.current_stream(self.device_id).cuda_stream
            cuda = {"device_id": str(self.device_id), "do_copy_in_default_stream": "1"}
            # onnxruntime ignores a null handle, which is torch's (legacy) default stream: then each run
            # is synchronized with torch's stream by hand (forward)
            self.shared_stream = bool(stream)
            if stream:
                cuda["user_compute_stream"] = str(stream)
            providers.insert(0, ("CUDAExecutionProvider", cuda))
        options = ort.SessionOptions()
        # onnxruntime's pool would spin between forwards, fighting torch's own threads (which accumulate
        # the tiles) and nnU-Net's preprocessing workers for the cores: on a 2-core CPU the network phase of
        # a Hippocampus case took 0.098 s spinning and 0.063 s not (the forward alone: 0.054 s)
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.intra_op_num_threads = torch.get_num_threads()
        self.session = ort.InferenceSession(str(path), options, providers=providers)
        self.max_batch = max_batch  # None: a dynamic batch axis
        got = list(self.session.get_providers())
        if device.type == "cuda" and got[:1] != ["CUDAExecutionProvider"]:
            raise FastkdError(f"device {device}: onnxruntime {ort.__version__} gave {path.name} the providers "
                              f"{', '.join(got) or 'none'}, not CUDAExecutionProvider first, so it would run on the "
                              f"CPU; {GPU_FIX}")
        self.bound = device.type == "cuda"  # forwards bind torch's tensors (IOBinding)
        self.output_type = OUTPUT_TYPES.get(self.session.get_outputs()[0].type, OUTPUT_TYPES["tensor(float)"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.bound:
            logits = self.session.run([OUTPUT], {INPUT: x.detach().float().cpu().numpy()})[0]
            return torch.from_numpy(logits).to(x.device)
        import numpy as np

        image = x.detach().to(self.device, torch.float32).contiguous()  # held until the run has read it
        logits = torch.empty((image.shape[0], self.num_outputs, *image.shape[2:]), dtype=self.output_type[1],
                             device=self.device)
        binding = self.session.io_binding()
        binding.bind_input(INPUT, "cuda", self.device_id, np.float32, tuple(image.shape), image.data_ptr())
        binding.bind_output(OUTPUT, "cuda", self.device_id, getattr(np, self.output_type[0]), tuple(logits.shape),
                            logits.data_ptr())
        if not self.shared_stream:  # torch's writes of the input done before onnxruntime's stream reads it
            torch.cuda.current_stream(self.device_id).synchronize()
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()  # the logits written before torch reads them
        return logits.float()

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
    network = OnnxNetwork(model, device, None if 0 in dynamic else shape[0], meta["num_outputs"])
    return {"network": network, "parameters": [{}],
            "plans": json.loads(props["nnunet_plans"]), "dataset_json": json.loads(props["nnunet_dataset_json"]),
            "configuration": meta["configuration"], "mirror_axes": meta["inference_allowed_mirroring_axes"],
            "folds": [meta["fold"]]}
