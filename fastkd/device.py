"""The torch device a stage runs its networks on, set up the way nnU-Net's own commands set it up.

Writes nothing. Every stage that runs nnU-Net networks (teachers, soft labels, student) asks here, so
that a missing GPU is one error with one message, and a CUDA run gets what ``nnUNetv2_train`` turns
on before training: cuDNN's autotuner (``torch.backends.cudnn.benchmark``), which picks the fastest
convolution algorithms for nnU-Net's fixed patch size.
"""

from __future__ import annotations

import torch

from fastkd.errors import FastkdError


def torch_device(name: str, what: str) -> torch.device:
    """``torch.device(name)``; ``what`` names the setting it came from (e.g. ``student.device``) in the error."""
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FastkdError(f"{what} = {name!r} but torch sees no CUDA GPU; use 'cpu' or run on a GPU node")
        torch.backends.cudnn.benchmark = True
    return device


def device_flag(requested: str | None, environ) -> tuple[str, str, dict[str, str]]:
    """nnU-Net-style ``-d_device`` (cpu, cuda, cuda:N, mps; None: cuda if available, else cpu) ->
    (device for torch, the flag as shown, environment to set before CUDA starts).

    ``cuda:N`` selects GPU N through ``CUDA_VISIBLE_DEVICES`` (of those already visible, if it is set),
    so every process of the run, multi-GPU workers included, sees it as ``cuda``.
    """
    import re

    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested in ("cpu", "cuda", "mps"):
        return requested, requested, {}
    m = re.fullmatch(r"cuda:(\d+)", requested)
    if m is None:
        raise FastkdError(f"-d_device {requested!r}: must be cpu, cuda, cuda:N (e.g. cuda:1) or mps")
    n = int(m.group(1))
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return "cuda", requested, {"CUDA_VISIBLE_DEVICES": str(n)}
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if n >= len(ids):
        raise FastkdError(f"-d_device {requested}: CUDA_VISIBLE_DEVICES={visible} makes only "
                          f"{', '.join(f'cuda:{i}' for i in range(len(ids))) or 'no GPU'} visible")
    return "cuda", requested, {"CUDA_VISIBLE_DEVICES": ids[n]}
