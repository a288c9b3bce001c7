"""``fastkd predict``: segment images with a student, from its model folder (torch) or its ONNX export (onnx).

nnU-Net's own predictor does the work, so the result is what ``nnUNetv2_predict`` writes: its
preprocessing from the plans, its sliding window (Gaussian tile weighting, the step size, test-time
mirroring over the axes the model was trained for), its resampling back to each image's geometry, its
file naming, and the loading of the next cases and the writing of the last ones in worker processes
beside the network. The output folder holds ``<case><file_ending>`` per input case (``.npz`` / ``.pkl``
probabilities with ``--save-probabilities``), plus the ``plans.json``, ``dataset.json`` and
``predict_from_raw_data_args.json`` nnU-Net writes there.

What fastkd changes: the model. ``torch``: one fold of a model folder, its checkpoint loaded safely
(``weights_only=True``) into the network nnU-Net builds from the plans. ``onnx``: an ``.onnx`` written
by ``fastkd export onnx``, run by onnxruntime; the plans and dataset.json come from the file's
metadata, so no model folder is needed.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fastkd.errors import FastkdError

BACKENDS = ("torch", "onnx")


class OnnxNetwork(torch.nn.Module):
    """An exported student as nnU-Net's predictor calls its network: ``logits = network(x)``."""

    def __init__(self, path: Path, device: torch.device):
        import onnxruntime as ort

        super().__init__()
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(str(path), providers=providers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(["logits"], {"image": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits).to(x.device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The weights are in the ONNX graph; nnU-Net's predictor hands each fold's (empty) parameters here."""
        if state_dict:
            raise FastkdError("an ONNX model carries its own weights; it takes no parameters")


def load_model(model: str | Path, backend: str, fold, checkpoint: str, device: torch.device) -> dict:
    """What nnU-Net's predictor needs (network, plans, configuration, dataset.json, parameters, mirroring axes)."""
    import json

    model = Path(model)
    if backend == "torch":
        from fastkd.export.onnx import load_student

        if not model.is_dir():
            raise FastkdError(f"-m {model}: the torch backend takes a model folder (Trainer__Plans__configuration)")
        network, meta, files = load_student(model, fold, checkpoint)
        return {"network": network, "parameters": [network.state_dict()], **files,
                "configuration": meta["configuration"], "mirror_axes": meta["inference_allowed_mirroring_axes"]}
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
    return {"network": OnnxNetwork(model, device), "parameters": [{}], "plans": json.loads(props["nnunet_plans"]),
            "dataset_json": json.loads(props["nnunet_dataset_json"]), "configuration": meta["configuration"],
            "mirror_axes": meta["inference_allowed_mirroring_axes"]}


def predict(input_folder: str | Path, output_folder: str | Path, model: str | Path, *, backend: str | None = None,
            fold=0, checkpoint: str = "checkpoint_final.pth", device: str = "cpu", mirroring: bool = True,
            step_size: float = 0.5, save_probabilities: bool = False, num_processes: int = 2) -> Path:
    """Segment every image of ``input_folder`` (nnU-Net raw naming, ``<case>_0000<file_ending>``) into
    ``output_folder``. ``backend``: ``torch`` or ``onnx`` (default: onnx for a ``.onnx``, else torch)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from fastkd.config import check_values
    from fastkd.device import torch_device

    backend = backend or ("onnx" if Path(model).suffix == ".onnx" else "torch")
    if backend not in BACKENDS:
        raise FastkdError(f"--backend {backend!r}: must be one of {', '.join(BACKENDS)}")
    check_values({"softlabels.step_size": step_size})
    if not Path(input_folder).is_dir():
        raise FastkdError(f"-i {input_folder}: not a folder of images")
    on = torch_device(device, "--device")
    m = load_model(model, backend, fold, checkpoint, on)
    plans_manager = PlansManager(m["plans"])
    predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=on.type == "cuda", device=on, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=True)
    predictor.manual_initialization(m["network"].to(on) if backend == "torch" else m["network"], plans_manager,
                                    plans_manager.get_configuration(m["configuration"]), m["parameters"],
                                    m["dataset_json"], "nnUNetTrainer", m["mirror_axes"])
    predictor.predict_from_files(str(input_folder), str(output_folder), save_probabilities=save_probabilities,
                                 overwrite=True, num_processes_preprocessing=num_processes,
                                 num_processes_segmentation_export=num_processes)
    return Path(output_folder)
