"""The trt backend: a TensorRT engine built by ``fastkd export trt``, run on torch CUDA tensors, with the
metadata JSON beside it that makes it a model on its own (the runtime side of :mod:`fastkd.export.tensorrt`).

An engine runs only with the TensorRT version and GPU it was built for, as its JSON records. Written
against the TensorRT 10 Python API (``tensorrt`` >= 10.13, < 11; no pycuda): TensorRT 11 removed the
builder precision flags, per-layer precision and the INT8 calibrator that the builder uses, so
:func:`require_tensorrt` refuses any other version, as it refuses a machine without TensorRT or a GPU
(``tensorrt`` is imported only then).

Each :class:`TrtNetwork` enqueues on a CUDA stream of its own: on torch's default stream (the legacy
stream, handle 0) ``execute_async_v3`` synchronizes the device around every forward. The private stream
waits for the caller's current stream before the forward, and the current stream waits for it after,
so the caller sees ordinary stream semantics; input and output addresses are 256-byte aligned.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fastkd.errors import FastkdError
from fastkd.predict.backends.onnx import INPUT, OUTPUT

SUFFIXES = (".engine", ".plan")
ENSEMBLE = False
METADATA_KEYS = ("fastkd", "nnunet_plans", "nnunet_dataset_json")
#: the TensorRT versions the builder and runner are written for: [minimum, next unsupported)
SUPPORTED_TENSORRT = ((10, 13), (11, 0))
#: fastkd predict's tile batch on CUDA (fastkd.predict.predictor.DEFAULT_TILE_BATCH["cuda"], which a backend
#: cannot import: the predictor imports the backends): the default profile's opt batch
TILE_BATCH = 8
ALIGNMENT = 256  # bytes: the I/O address alignment TensorRT asks for
# what an engine was built from and for: any difference makes it stale
BUILD_KEYS = ("format_version", "tensorrt_version", "gpu", "precision", "profile", "onnx_sha256", "workspace_gb",
              "min_agreement", "calibration_sha256")
# what an engine can run on
PLATFORM_KEYS = ("tensorrt_version", "gpu")


def metadata_path(engine: str | Path) -> Path:
    engine = Path(engine)
    return engine.with_name(engine.name + ".json")


def pip_command() -> str:
    """The pip command for a supported TensorRT that matches torch's CUDA (the wheels are per CUDA major)."""
    (low_major, low_minor), (high, _) = SUPPORTED_TENSORRT
    cuda = torch.version.cuda
    wheel = f"tensorrt-cu{cuda.split('.')[0]}" if cuda and cuda.split(".")[0] in ("12", "13") else None
    command = f'pip install "{wheel or "tensorrt-cu12"}>={low_major}.{low_minor},<{high}"'
    if wheel is None:
        return f"{command} (torch {torch.__version__} has CUDA {cuda}: install a CUDA 12 or 13 build of torch, " \
               "and the tensorrt-cu12 or tensorrt-cu13 wheel of the same CUDA major)"
    return f"{command} (torch {torch.__version__} is a CUDA {cuda} build)"


def check_tensorrt_version(version: str) -> None:
    """A FastkdError unless ``version`` is in :data:`SUPPORTED_TENSORRT`."""
    (low_major, low_minor), (high, _) = SUPPORTED_TENSORRT
    found = re.match(r"(\d+)\.(\d+)", str(version))
    if found and (low_major, low_minor) <= (int(found[1]), int(found[2])) < (high, 0):
        return
    raise FastkdError(f"TensorRT {version} is installed; fastkd builds and runs engines with TensorRT >= "
                      f"{low_major}.{low_minor}, < {high} (TensorRT {high} removed the FP16/INT8 builder flags, "
                      f"per-layer precision and the INT8 calibrator it uses): {pip_command()}")


def require_tensorrt():
    """The ``tensorrt`` module, or a FastkdError saying what is missing (TensorRT, a supported version, a GPU)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: a wheel whose CUDA libraries are missing
        raise FastkdError(f"TensorRT is not installed ({e}): install NVIDIA's wheels, {pip_command()}, on a "
                          "machine with an NVIDIA GPU") from None
    check_tensorrt_version(getattr(trt, "__version__", "(no __version__)"))
    if not torch.cuda.is_available():
        raise FastkdError("TensorRT needs an NVIDIA GPU; torch sees none (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
    return trt


def running_platform() -> dict:
    """The TensorRT version and GPU of this process: what an engine is built for."""
    trt = require_tensorrt()
    major, minor = torch.cuda.get_device_capability()
    return {"tensorrt_version": trt.__version__,
            "gpu": {"name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}}


def differences(recorded: dict | None, current: dict, keys=BUILD_KEYS) -> list[str]:
    """What differs between an engine's recorded metadata and ``current`` (empty: up to date)."""
    if not isinstance(recorded, dict):
        return ["no engine metadata"]
    return [f"{key} {json.dumps(recorded.get(key))} -> {json.dumps(current[key])}"
            for key in keys if recorded.get(key) != current[key]]


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` (contiguous) if its address is a multiple of :data:`ALIGNMENT`, else an aligned copy (a view
    into a slightly larger buffer: the allocator's own alignment is not part of its contract)."""
    if tensor.data_ptr() % ALIGNMENT == 0:
        return tensor
    count, size = tensor.numel(), tensor.element_size()
    buffer = torch.empty(count + ALIGNMENT // size, dtype=tensor.dtype, device=tensor.device)
    start = (-buffer.data_ptr() % ALIGNMENT) // size
    out = buffer[start:start + count].view(tensor.shape)
    out.copy_(tensor)
    return out


class TrtNetwork(torch.nn.Module):
    """A TensorRT engine as nnU-Net's predictor calls its network: ``logits = network(x)`` (as OnnxNetwork).

    Runs on torch CUDA tensors: TensorRT reads the input and writes the output in place, on a stream of
    its own ordered after the caller's current stream and before its next work; a CPU input is copied
    over and its logits copied back.
    """

    def __init__(self, path: str | Path, device: torch.device):
        trt = require_tensorrt()
        super().__init__()
        if device.type != "cuda":
            raise FastkdError(f"device {device}: a TensorRT engine runs on an NVIDIA GPU (cuda)")
        self.path, self.device = Path(path), device
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # must outlive its engine
        with torch.cuda.device(device):
            self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise FastkdError(f"{path}: TensorRT {trt.__version__} cannot load this engine (built by another "
                              "TensorRT version, or for another GPU?); rebuild it with `fastkd export trt`")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream(device=device)
        self.profile = [list(s) for s in self.engine.get_tensor_profile_shape(INPUT, 0)]  # min, opt, max
        self.max_batch = self.profile[2][0]  # fastkd predict batches its tiles up to this
        self.output_dtype = torch.float16 if self.engine.get_tensor_dtype(OUTPUT) == trt.float16 else torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.cuda.device(self.device):
            current = torch.cuda.current_stream(self.device)
            image = aligned(x.detach().to(self.device, torch.float32).contiguous())
            if not self.context.set_input_shape(INPUT, tuple(image.shape)):
                raise FastkdError(f"input {list(image.shape)} is outside the engine's profile min/opt/max "
                                  f"{self.profile} ({self.path})")
            logits = aligned(torch.empty(tuple(self.context.get_tensor_shape(OUTPUT)), dtype=self.output_dtype,
                                         device=self.device))
            self.context.set_tensor_address(INPUT, image.data_ptr())
            self.context.set_tensor_address(OUTPUT, logits.data_ptr())
            self.stream.wait_stream(current)  # the input is written by work queued on the current stream
            for tensor in (image, logits):  # the allocator keeps their memory until the private stream is past them
                tensor.record_stream(self.stream)
            if not self.context.execute_async_v3(self.stream.cuda_stream):
                raise FastkdError(f"TensorRT failed to run {self.path} (its log above says why)")
            current.wait_stream(self.stream)  # whatever reads the logits next runs after the engine
        return logits.float().to(x.device)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """The weights are in the engine; nnU-Net's predictor hands each fold's (empty) parameters here."""
        if state_dict:
            raise FastkdError("a TensorRT engine carries its own weights; it takes no parameters")


def load(model: Path, folds: tuple, checkpoint: str, device: torch.device) -> dict:
    """A TensorRT engine (``checkpoint``: unused); TensorRT is imported only once the file is one."""
    if model.suffix not in SUFFIXES or not model.is_file():
        raise FastkdError(f"-m {model}: the trt backend takes a TensorRT engine file ({' or '.join(SUFFIXES)})")
    return load_engine_model(model, device)


def load_engine_model(path: str | Path, device: torch.device) -> dict:
    """What nnU-Net's predictor needs, from an engine and its metadata JSON (as ``fastkd.predict.backends.load_model``
    gives for an ONNX file): network, parameters, plans, dataset.json, configuration, mirroring axes."""
    from fastkd.io import read_json

    path = Path(path)
    if path.suffix not in SUFFIXES or not path.is_file():
        raise FastkdError(f"-m {path}: the trt backend takes an {' or '.join(SUFFIXES)} file written by "
                          "`fastkd export trt`")
    record = read_json(metadata_path(path), "engine metadata",
                       "written beside the engine by `fastkd export trt`; rebuild the engine with it")
    missing = [k for k in (*PLATFORM_KEYS, "profile", "metadata") if k not in record]
    missing += [f"metadata.{k}" for k in METADATA_KEYS if k not in record.get("metadata", {})]
    if missing:
        raise FastkdError(f"{metadata_path(path)} lacks {', '.join(missing)}: not written by `fastkd export trt`; "
                          "rebuild the engine")
    meta = record["metadata"]["fastkd"]
    tile, profile = [1, meta["num_input_channels"], *meta["patch_size"]], record["profile"]
    if not all(lo <= t <= hi for lo, t, hi in zip(profile["min"], tile, profile["max"])):
        raise FastkdError(f"{path} takes inputs from {profile['min']} to {profile['max']}, but nnU-Net's sliding "
                          f"window feeds {tile}: rebuild it with the default profile")
    stale = differences(record, running_platform(), PLATFORM_KEYS)
    if stale:
        raise FastkdError(f"{path} was built for another platform ({'; '.join(stale)}): an engine runs only with "
                          f"the TensorRT version and GPU it was built for; rebuild it with `fastkd export trt "
                          f"{record.get('onnx', 'STUDENT.onnx')} -o {path}`")
    return {"network": TrtNetwork(path, device), "parameters": [{}],
            "plans": record["metadata"]["nnunet_plans"], "dataset_json": record["metadata"]["nnunet_dataset_json"],
            "configuration": meta["configuration"], "mirror_axes": meta["inference_allowed_mirroring_axes"]}
