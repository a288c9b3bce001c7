"""What a built TensorRT engine really runs its normalization in, read back from the engine itself.

Asking for FP32 normalization layers (``layer.precision`` with ``OBEY_PRECISION_CONSTRAINTS``) is a
request: TensorRT fuses element-wise and reduce chains into Myelin ("ForeignNode") layers, where
per-layer precision is not applied (NVIDIA/TensorRT issues #3889, #4505). The builder sets
``profiling_verbosity = DETAILED``; :func:`engine_layers` reads the engine inspector's JSON
(``get_engine_information(LayerInformationFormat.JSON)``, with an execution context at the profile's
opt shape so that formats are shown)::

    {"Layers": [{"Name", "LayerType", "Metadata": "[ONNX Layer: <node>]" (one per fused ONNX node,
                 separated by \\x1e or \\x1f), "Inputs"/"Outputs": [{"Name", "Dimensions",
                 "Format/Datatype": "Row major linear FP32" | "Half" | ...}], ...}], "Bindings": [...]}

:func:`normalization_report` maps every layer to the ONNX normalization nodes it runs (its Metadata;
without Metadata, the node names its name holds, reformat copies left out) and gives each the
precision its float tensors have: ``fp32``, ``fp16`` / ``bf16`` / ``fp8`` / ``int8`` (reduced),
``no float data`` (shape arithmetic), or,
for a Myelin layer, ``fused (Myelin), precision not observable``: its boundary tensors say nothing of
the arithmetic inside, and refusing every fused norm would refuse most real builds, so such a norm is
recorded as fused and the engine is judged by the parity gate on real patches instead. A layer
without datatypes (``not observable``) is recorded the same way. :func:`check_normalization` fails
the build when an observed normalization layer runs in reduced precision, or when the graph has
normalization nodes and no engine layer maps to any of them.
"""

from __future__ import annotations

import json
import re

from fastkd.errors import FastkdError
from fastkd.predict.backends.onnx import INPUT

MYELIN = "fused (Myelin), precision not observable"
UNOBSERVED = "not observable"
NO_FLOAT = "no float data"  # shape arithmetic inside a decomposed norm
REDUCED = ("fp16", "bf16", "fp8", "int8")
_NODE = re.compile(r"\[ONNX Layer: ([^\]\x1e\x1f]*)\]")
# the words of "Format/Datatype" strings ("Row major linear FP32", "Channel major FP16 format ...",
# Myelin's kgen names "Float", "Half", "BFloat16"), in the order they are tried
_DATATYPES = (("bfloat16", "bf16"), ("bf16", "bf16"), ("fp16", "fp16"), ("half", "fp16"), ("fp8", "fp8"),
              ("int8", "int8"), ("fp32", "fp32"), ("float", "fp32"))


def engine_layers(trt, engine, opt_shape: list[int]) -> list[dict]:
    """The engine inspector's layers (see the module docstring) at the profile's opt shape."""
    context = engine.create_execution_context()
    context.set_input_shape(INPUT, tuple(opt_shape))  # dynamic shapes: formats are shown only for a context
    inspector = engine.create_engine_inspector()
    inspector.execution_context = context
    text = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
    try:
        layers = json.loads(text)["Layers"]
    except (TypeError, ValueError, KeyError) as e:
        raise FastkdError(f"TensorRT's engine inspector gave no layer list ({e}): {str(text)[:200]}") from None
    if not all(isinstance(layer, dict) for layer in layers):
        raise FastkdError("TensorRT's engine inspector gave layer names only: the engine was not built with "
                          "ProfilingVerbosity.DETAILED")
    return layers


def datatype(format_string: str) -> str | None:
    """The float precision a tensor format names (``fp32``, ``fp16``, ...), None for other data (int, bool)."""
    words = format_string.lower().replace(".", "").split()
    for word, name in _DATATYPES:
        if word in words:
            return name
    return None if any(w in words for w in ("int32", "int64", "bool", "uint8")) else UNOBSERVED


def is_myelin(layer: dict) -> bool:
    return layer.get("LayerType") == "Myelin" or str(layer.get("Name", "")).startswith("{ForeignNode[")


def _nodes(layer: dict, normalization_nodes: set[str]) -> set[str]:
    metadata = layer.get("Metadata")
    if metadata:
        return set(_NODE.findall(metadata)) & normalization_nodes
    name = str(layer.get("Name", ""))
    if layer.get("LayerType") == "Reformat" or name.startswith("Reformatting CopyNode"):
        return set()  # a copy between formats names the layer it feeds; it computes nothing
    return {node for node in normalization_nodes if node in name}


def layer_precision(layer: dict) -> str:
    if is_myelin(layer):
        return MYELIN
    raw = [datatype(t.get("Format/Datatype", "")) for t in (*layer.get("Inputs", ()), *layer.get("Outputs", ()))
           if isinstance(t, dict)]
    if raw and not any(raw):
        return NO_FLOAT
    found = set(raw) - {None}
    reduced = [p for p in REDUCED if p in found]
    if reduced:
        return reduced[0]
    return "fp32" if found == {"fp32"} else UNOBSERVED


def normalization_report(layers: list[dict], normalization_nodes: set[str]) -> dict:
    """{nodes, covered, layers [{name, type, precision, onnx_nodes}], fused_nodes}: per engine layer that
    runs ONNX normalization nodes, the precision it runs in; the nodes inside Myelin layers."""
    rows, fused, covered = [], set(), set()
    for layer in layers:
        nodes = _nodes(layer, normalization_nodes)
        if not nodes:
            continue
        precision = layer_precision(layer)
        covered |= nodes
        if precision == MYELIN:
            fused |= nodes
        rows.append({"name": layer.get("Name"), "type": layer.get("LayerType"), "precision": precision,
                     "onnx_nodes": len(nodes)})
    return {"nodes": len(normalization_nodes), "covered": len(covered), "layers": rows, "fused_nodes": sorted(fused)}


def check_normalization(report: dict, precision: str) -> None:
    """A FastkdError when a normalization runs in reduced precision, or when none was found at all."""
    if report["nodes"] and not report["covered"]:
        raise FastkdError(f"the ONNX has {report['nodes']} normalization nodes, but no layer of the built engine "
                          "maps to any of them (TensorRT's layer information lost them): their precision cannot "
                          "be checked; no engine written")
    reduced = [r for r in report["layers"] if r["precision"] in REDUCED]
    if reduced:
        shown = ", ".join(f"{r['name']} ({r['precision']})" for r in reduced[:3])
        raise FastkdError(f"{len(reduced)} normalization layers run in reduced precision in the {precision} engine "
                          f"though they are held in FP32: {shown}; build with --precision fp32; no engine written")
