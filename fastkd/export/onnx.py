"""Export one fold of a student (any stock nnU-Net model folder) to ONNX, verified before it is kept.

Writes two files, both only once the model passed every check (a failed export leaves neither):

- ``<out>.onnx``: opset 17, one input ``image`` (B, C, x, y, z) of preprocessed data, one output
  ``logits`` (B, classes or regions, x, y, z) at full resolution (deep supervision off). Static
  shapes by default (nnU-Net's patch, batch 1), or a custom shape, a dynamic batch, dynamic spatial
  dims (each a multiple of the network's total stride). Its ``metadata_props`` make it a deployable
  model on its own::

      "fastkd":              JSON {format_version, fastkd_version, nnunetv2_version, dataset_name,
                             plans_name, configuration, fold, trainer, checkpoint, checkpoint_sha256,
                             patch_size, spacing, transpose_forward, transpose_backward,
                             normalization_schemes, use_mask_for_norm,
                             foreground_intensity_properties_per_channel, channel_names, labels,
                             regions, regions_class_order, file_ending, num_input_channels,
                             num_outputs, divisible_by, inference_allowed_mirroring_axes,
                             input {name, shape, dynamic_axes}, output {name},
                             normalization_scopes}
      "nnunet_plans":        the model folder's plans.json (nnU-Net's preprocessing reads it)
      "nnunet_dataset_json": the model folder's dataset.json

- ``<out>.onnx.json``: the verification: ``onnx.checker`` (full check), then onnxruntime against the
  PyTorch network on random patches and on real preprocessed patches (when the preprocessed data is
  found), each with the maximum absolute logit difference and the fraction of voxels whose argmax
  (softmax) or thresholded sigmoid (regions) agrees; the tolerances; whether it passed.

Instance normalization is exported as :class:`StableInstanceNorm`: the same function (the input's own
mean and variance per sample and channel, then nnU-Net's affine scale and shift) written as means over
one axis at a time and a variance of the centred values. onnxruntime's own InstanceNormalization sums
a whole (x, y, z) volume in float32 and takes E[x^2] - E[x]^2: on a BraTS-sized patch (96 x 160 x 160)
its error reached 2.8e-4 where PyTorch's was 1e-6, and the student's logits drifted by 0.03-0.05, enough
to flip 0.2 % of voxels; the staged form is as accurate as PyTorch (1e-6). The metadata's
``normalization_scopes`` name the graph scopes of these norms (the scopes of its ReduceMean nodes;
TensorRT holds every node in them in FP32).

The checkpoint is loaded with ``torch.load(weights_only=True)`` into the network nnU-Net builds from
the folder's plans, strictly: a checkpoint that does not fit its plans is an error, never a model
with random weights (the reference exporter's failure).
"""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from fastkd import nnunet
from fastkd.errors import FastkdError
from fastkd.export.common import real_patches, segmentation_agreement
from fastkd.predict.backends.onnx import INPUT, OUTPUT
from fastkd.predict.backends.torch import load_student

OPSET = 17


class StableInstanceNorm(torch.nn.Module):
    """nnU-Net's InstanceNorm (no running statistics) as staged means: accurate in float32 at any volume size."""

    def __init__(self, norm: torch.nn.Module):
        super().__init__()
        self.eps, self.weight, self.bias = norm.eps, norm.weight, norm.bias

    @staticmethod
    def _mean(x: torch.Tensor) -> torch.Tensor:
        for axis in range(x.dim() - 1, 1, -1):  # one spatial axis at a time: short float32 sums
            x = x.mean(dim=axis, keepdim=True)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - self._mean(x)
        y = centred / torch.sqrt(self._mean(centred * centred) + self.eps)
        if self.weight is not None:
            shape = [1, -1] + [1] * (x.dim() - 2)
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y


def stable_norms(network: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``network`` with every InstanceNorm as :class:`StableInstanceNorm`, wherever it is
    referenced (nnU-Net's ConvDropoutNormReLU holds its norm twice: as ``norm`` and in ``all_modules``)."""
    import copy

    network = copy.deepcopy(network)
    stable = {}
    for module in list(network.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.modules.instancenorm._InstanceNorm) and not child.track_running_stats:
                setattr(module, name, stable.setdefault(id(child), StableInstanceNorm(child)))
    return network



def _input_shape(meta: dict, input_shape, batch: int) -> list[int]:
    patch, n_in, divisible = meta["patch_size"], meta["num_input_channels"], meta["divisible_by"]
    shape = list(input_shape) if input_shape else [max(batch, 1), n_in, *patch]
    problems = []
    if len(shape) != 2 + len(patch):
        problems.append(f"{len(shape)} dims, the network takes {2 + len(patch)} (b c {' '.join('xyz'[:len(patch)])})")
    elif shape[1] != n_in:
        problems.append(f"{shape[1]} channels, the network takes {n_in}")
    elif min(shape) < 1 or any(s % d for s, d in zip(shape[2:], divisible)):
        problems.append(f"spatial dims must be >= 1 and multiples of {divisible} (the network's total stride)")
    if problems:
        raise FastkdError(f"input shape {shape}: {problems[0]}; nnU-Net's patch is {[1, n_in, *patch]}")
    return shape



def export_onnx(model_folder: str | Path, fold, out: str | Path, *, checkpoint: str = "checkpoint_final.pth",
                input_shape: list[int] | None = None, batch: int = 1, dynamic: bool = False, simplify: bool = False,
                tensorrt: bool = False, preprocessed: str | Path | None = None, atol: float = 1e-3,
                min_agreement: float = 0.999) -> dict:
    """Export, check and verify one fold (see the module docstring); return the verification record.

    ``batch``: the batch size, 0 = dynamic. ``dynamic``: dynamic batch and spatial dims.
    ``tensorrt``: what TensorRT's ONNX parser handles best: constant folding and a simplified graph
    (onnxslim); combine with static shapes, or ``dynamic`` plus an optimization profile at build time.
    ``preprocessed``: the folder of the model's preprocessed ``<case>.b2nd`` (real patches for the parity
    check; default: nnU-Net's, under ``$nnUNet_preprocessed``). Raises FastkdError, and leaves nothing
    at ``out``, when anything fails.
    """
    import onnx

    from fastkd.io import atomic_write_text

    out = Path(out)
    if out.suffix != ".onnx":
        raise FastkdError(f"output {out}: the file name must end in .onnx")
    network, meta, files = load_student(model_folder, fold, checkpoint)
    if preprocessed is None and os.environ.get("nnUNet_preprocessed"):  # where nnU-Net keeps this model's data
        preprocessed = (Path(os.environ["nnUNet_preprocessed"]) / meta["dataset_name"]
                        / nnunet.data_identifier(files["plans"], meta["configuration"]))
    shape = _input_shape(meta, input_shape, batch)
    axes = {0: "batch"} if (dynamic or batch == 0) else {}
    if dynamic:
        axes.update({2 + i: "xyz"[i] for i in range(len(shape) - 2)})
    meta["input"] = {"name": INPUT, "shape": shape, "dynamic_axes": {str(k): v for k, v in axes.items()}}
    meta["output"] = {"name": OUTPUT}
    exported = stable_norms(network)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter is deprecated (the new one needs onnxscript), and its tracer flags
            # shape checks that are constant for a fixed topology
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            torch.onnx.export(exported, torch.zeros(shape), str(tmp), opset_version=OPSET, dynamo=False,
                              input_names=[INPUT], output_names=[OUTPUT], do_constant_folding=True,
                              dynamic_axes={INPUT: axes, OUTPUT: axes} if axes else None)
        model = onnx.load(str(tmp))
        if simplify or tensorrt:
            model = _simplify(model)
        # the staged norms' node scopes (their ReduceMeans; nnU-Net's networks have no other), for TensorRT
        meta["normalization_scopes"] = sorted({n.name.rsplit("/", 1)[0] + "/" for n in model.graph.node
                                               if n.op_type == "ReduceMean" and "/" in n.name})
        for key, value in (("fastkd", meta), ("nnunet_plans", files["plans"]),
                           ("nnunet_dataset_json", files["dataset_json"])):
            onnx.helper.set_model_props(model, {**{p.key: p.value for p in model.metadata_props},
                                                key: json.dumps(value)})
        onnx.save(model, str(tmp))
        onnx.checker.check_model(str(tmp), full_check=True)
        record = verify(network, tmp, meta, preprocessed, atol, min_agreement)
        if not record["passed"]:
            worst = max(record["checks"], key=lambda c: c["max_abs_diff"])
            raise FastkdError(f"onnxruntime disagrees with PyTorch on {worst['input']}: max |logit difference| "
                              f"{worst['max_abs_diff']:.3g} (tolerance {atol:g}), agreement "
                              f"{min(c['agreement'] for c in record['checks']):.6f} (needs >= {min_agreement}); "
                              f"no model written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    record.update({"onnx": str(out), "bytes": out.stat().st_size, "metadata": meta})
    atomic_write_text(out.with_name(out.name + ".json"), json.dumps(record, indent=2) + "\n")
    return record


def _simplify(model):
    try:
        import onnxslim
    except ImportError:
        raise FastkdError("simplifying the graph needs onnxslim: pip install onnxslim (or pip install -e '.[export]')") \
            from None
    return onnxslim.slim(model)


def verify(network, onnx_file: Path, meta: dict, preprocessed, atol: float, min_agreement: float) -> dict:
    """onnxruntime against PyTorch on random and real patches; the record written beside the model."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    shape = meta["input"]["shape"]
    rng = np.random.default_rng(0)
    inputs = [("random patch", rng.standard_normal(shape).astype(np.float32))]
    dynamic = {int(k) for k in meta["input"]["dynamic_axes"]}
    if dynamic:  # another size along every dynamic axis proves the axes really are dynamic
        other = list(shape)
        for axis in dynamic:
            other[axis] += 1 if axis == 0 else meta["divisible_by"][axis - 2]
        inputs.append((f"random {other}", rng.standard_normal(other).astype(np.float32)))
    if not ({2, 3, 4} & dynamic) and shape[2:] != meta["patch_size"]:
        real = []  # real patches have nnU-Net's patch size; a custom static shape is checked on random data
    else:
        real = real_patches(preprocessed, meta["patch_size"])
    inputs += [(f"preprocessed case {i}", np.repeat(p, shape[0], 0) if 0 not in dynamic else p)
               for i, p in enumerate(real)]
    checks = []
    for name, x in inputs:
        with torch.no_grad():
            expected = network(torch.from_numpy(x)).numpy()
        got = session.run([OUTPUT], {INPUT: x})[0]
        diff = float(np.abs(got - expected).max()) if got.shape == expected.shape else math.inf
        agreement = segmentation_agreement(got, expected, meta["regions"]) if got.shape == expected.shape else 0.0
        checks.append({"input": name, "shape": list(x.shape), "max_abs_diff": diff, "agreement": agreement})
    passed = all(c["max_abs_diff"] <= atol and c["agreement"] >= min_agreement for c in checks)
    return {"checker": "onnx.checker.check_model(full_check=True) passed", "runtime": f"onnxruntime {ort.__version__}",
            "tolerance": {"max_abs_diff": atol, "agreement": min_agreement}, "checks": checks,
            "real_patches": len(real), "passed": passed}
