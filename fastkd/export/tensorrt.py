"""Build a TensorRT engine from a verified ONNX export (``fastkd export onnx``), checked against onnxruntime.

Writes two files, both only once the engine passed its checks (a failed build leaves neither; a
rebuild first removes the stale pair):

- ``<out>`` (``.engine`` or ``.plan``): TensorRT's serialized engine, for one GPU model and one TensorRT
  version, with the ONNX's input ``image`` (B, C, x, y, z) and output ``logits`` (float32). Precision
  ``fp32`` (TF32 off: the reference is float32 onnxruntime); ``fp16``; or ``int8`` (FP16 where a layer
  has no INT8 kernel), calibrated by TensorRT's entropy calibrator (IInt8EntropyCalibrator2) on the
  centre patch of preprocessed cases. In fp16 and int8 every normalization layer is asked to stay in
  FP32: FP16 InstanceNorm over a 3D U-Net's activations overflows (black outputs, lost accuracy); what
  the engine really runs is read back and checked (below). One optimization profile min/opt/max: a
  static ONNX input gives its own shape; a dynamic batch gives min batch 1, opt batch min(8, max_batch)
  (8: the tiles ``fastkd predict`` batches on CUDA), max batch ``max_batch`` (default 8), at nnU-Net's
  patch along dynamic spatial axes. A static-batch ONNX with ``max_batch`` > its batch is an error, never
  a silently capped engine: the workflow exports a dynamic-batch ONNX (``--batch 0``) when engines are on.
- ``<out>.json``, the engine's metadata::

      format_version, fastkd_version, tensorrt_version, gpu {name, compute_capability}, precision,
      profile {min, opt, max}, onnx, onnx_sha256, workspace_gb, min_agreement, calibration_sha256
      (int8: sha256 of the calibration batches, else null), timing_cache {path, status: new | reused |
      replaced (unreadable) | replaced (it came from another GPU or TensorRT version)}, calibration
      {folder, batches} (int8), fp32_layers (the network layers asked to stay FP32), normalization
      {nodes, covered, layers [{name, type, precision, onnx_nodes}], fused_nodes} (what the engine runs:
      :mod:`fastkd.export.tensorrt_inspect`), metadata {fastkd, nnunet_plans, nnunet_dataset_json} (the
      ONNX's own metadata_props: a predictor needs no model folder), parity {runtime, min_agreement,
      checks [{input, shape, max_abs_diff, agreement, gating}], real_patches, passed}, seconds

An engine whose JSON records this ``format_version``, the running TensorRT version and GPU, and the
requested precision, profile, ONNX sha256, workspace, agreement threshold and calibration data is up
to date and kept; any difference rebuilds it. The timing cache (default ``tensorrt_timing.cache``
beside the engine) keeps TensorRT's kernel timings between builds on the same GPU and TensorRT version;
one from another GPU or version, or one TensorRT cannot read, is replaced by a fresh one.

Parity: TensorRT against onnxruntime (CPU) on real preprocessed patches (from ``calibration``, else
nnU-Net's folder of the model under ``$nnUNet_preprocessed``; none found is an error naming where it
looked), at nnU-Net's patch and the profile's min and opt batches: the fraction of voxels whose argmax
(or thresholded region) agrees must be >= ``min_agreement`` (99.9 %). Random inputs of each profile
shape are recorded for information only (``gating`` false) at every precision: noise gives near-tied
logits that FP16 legitimately flips.

Normalization layers: fastkd's exports write InstanceNorm as staged means (accurate in float32, see
:mod:`fastkd.export.onnx`); the nodes in the scopes its metadata lists (``normalization_scopes``) are
normalization. TensorRT 10's ONNX parser imports a native InstanceNormalization (and Group/Layer
normalization) as an INormalizationLayer (``LayerType.NORMALIZATION``); older parsers emit a plugin
(``InstanceNormalization_TRT``) or a reduce/elementwise subgraph. Layers of that type, and every
layer whose name holds the name of an ONNX normalization node (the parser names layers after their
node), are pinned to FP32 with ``OBEY_PRECISION_CONSTRAINTS``; a graph with normalization nodes and no
pinned layer is an error. The engine is then inspected (``ProfilingVerbosity.DETAILED``): an observed
normalization layer in FP16 or INT8, or no engine layer running any normalization node, fails the build;
a normalization fused into a Myelin node is recorded as ``fused (Myelin), precision not observable``
and left to the parity gate on real patches.

Written against the TensorRT 10 Python API (``tensorrt`` >= 10.13, < 11; the engine runs on torch CUDA
tensors, no pycuda). TensorRT 11 removes the builder precision flags, ``layer.precision``,
``set_output_type`` and IInt8EntropyCalibrator2; its plan (docs/export-and-predict.md): a strongly typed
network whose precision comes from an FP16 ONNX with the normalization subgraphs kept FP32. Without
TensorRT (or with another version) or a GPU, :func:`require_tensorrt` raises a FastkdError, after the
arguments were checked and before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fastkd.errors import FastkdError
from fastkd.export.common import real_patches, segmentation_agreement
from fastkd.export.tensorrt_inspect import check_normalization, engine_layers, normalization_report
from fastkd.predict.backends.onnx import INPUT, OUTPUT
from fastkd.predict.backends.tensorrt import (METADATA_KEYS, SUFFIXES, TILE_BATCH, TrtNetwork, differences,
                                             metadata_path, require_tensorrt, running_platform)

FORMAT_VERSION = 2  # 2: parity gated on real patches, normalization precision read back, more build keys
NORMALIZATION_OPS = {"InstanceNormalization", "GroupNormalization", "LayerNormalization", "BatchNormalization"}
CALIBRATION_PATCHES = 64  # one centre patch per case, at most this many cases


def read_onnx(onnx_path: str | Path) -> tuple[dict, set[str]]:
    """(the ONNX's fastkd metadata {fastkd, nnunet_plans, nnunet_dataset_json}, its normalization node names)."""
    import onnx
    from google.protobuf.message import DecodeError

    path = Path(onnx_path)
    if path.suffix != ".onnx" or not path.is_file():
        raise FastkdError(f"ONNX {path}: no such .onnx file; write one with `fastkd export onnx`")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError) as e:
        raise FastkdError(f"ONNX {path} is not an ONNX model ({e})") from None
    props = {p.key: p.value for p in model.metadata_props}
    missing = [k for k in METADATA_KEYS if k not in props]
    if missing:
        raise FastkdError(f"ONNX {path} lacks the metadata {', '.join(missing)}: export it with `fastkd export onnx` "
                          "(the engine carries that metadata so that a predictor needs no model folder)")
    meta = {k: json.loads(props[k]) for k in METADATA_KEYS}
    # fastkd exports InstanceNorm as staged means (fastkd.export.onnx.StableInstanceNorm): every node in
    # one of the norms' scopes belongs to a normalization
    scopes = tuple(meta["fastkd"].get("normalization_scopes") or ())
    norms = {n.name for n in model.graph.node
             if n.name and (n.op_type in NORMALIZATION_OPS or n.name.startswith(scopes) and scopes)}
    return meta, norms


def resolve_profile(meta: dict, profile: dict | None = None, max_batch: int = TILE_BATCH) -> dict:
    """The optimization profile {min, opt, max} of an ONNX input (``meta``: its fastkd metadata).

    ``profile``: any of min/opt/max given; the others default to nnU-Net's patch along dynamic spatial
    axes and the ONNX's own size along static ones; a dynamic batch defaults to min 1, max ``max_batch``,
    opt min(:data:`TILE_BATCH`, max). Every shape is checked: rank, channels, static axes, multiples of the
    network's stride, min <= opt <= max. A static batch below ``max_batch`` is an error, never a cap.
    """
    shape, n_in, divisible = meta["input"]["shape"], meta["num_input_channels"], meta["divisible_by"]
    dynamic = {int(a) for a in meta["input"]["dynamic_axes"]}
    if max_batch > 1 and 0 not in dynamic and max_batch != shape[0]:
        raise FastkdError(f"max batch {max_batch}: the ONNX input {shape} has a static batch of {shape[0]}; an engine "
                          f"batches up to {TILE_BATCH} tiles by default: export the ONNX with a dynamic batch (fastkd "
                          "export onnx --batch 0, which the workflow does with export.tensorrt.enabled; or --dynamic), "
                          f"or build with --max-batch {shape[0]}")
    base = [1 if 0 in dynamic else shape[0], n_in,
            *(p if i + 2 in dynamic else s for i, (p, s) in enumerate(zip(meta["patch_size"], shape[2:])))]
    given = {k: v for k, v in (profile or {}).items() if v is not None}
    unknown = sorted(set(given) - {"min", "opt", "max"})
    if unknown:
        raise FastkdError(f"profile keys {unknown}: valid keys are min, opt, max")
    top = [int(v) for v in given.get("max", [max_batch if 0 in dynamic else shape[0], *base[1:]])]
    defaults = {"min": base, "opt": [min(TILE_BATCH, top[0]) if 0 in dynamic else shape[0], *base[1:]], "max": top}
    resolved = {k: [int(v) for v in given.get(k, defaults[k])] for k in defaults}
    for key, s in resolved.items():
        what = f"profile {key} shape {s}"
        if len(s) != len(shape):
            raise FastkdError(f"{what}: {len(s)} dims, the ONNX input takes {len(shape)} (b c "
                              f"{' '.join('xyz'[:len(shape) - 2])})")
        if s[1] != n_in:
            raise FastkdError(f"{what}: {s[1]} channels, the network takes {n_in}")
        fixed = [i for i in range(len(s)) if i not in dynamic and s[i] != shape[i]]
        if fixed:
            raise FastkdError(f"{what}: axis {fixed[0]} is static in the ONNX input {shape} (dynamic axes: "
                              f"{sorted(dynamic) or 'none'}); export with --batch 0 or --dynamic for other sizes")
        if min(s) < 1 or any(v % d for v, d in zip(s[2:], divisible)):
            raise FastkdError(f"{what}: sizes must be >= 1 and spatial dims multiples of {divisible} "
                              "(the network's total stride)")
    bad = [i for i in range(len(shape)) if not resolved["min"][i] <= resolved["opt"][i] <= resolved["max"][i]]
    if bad:
        raise FastkdError(f"profile min {resolved['min']} <= opt {resolved['opt']} <= max {resolved['max']} fails "
                          f"on axis {bad[0]}")
    return resolved


def calibration_batches(folder: str | Path, shape: list[int], limit: int = CALIBRATION_PATCHES) -> list[np.ndarray]:
    """INT8 calibration data: the centre patch (``shape[2:]``, zero-padded) of up to ``limit`` preprocessed
    cases of ``folder`` (nnU-Net's ``<case>.b2nd``), stacked into batches of ``shape[0]``."""
    folder = Path(folder)
    cases = [p for p in folder.glob("*.b2nd") if not p.name.endswith("_seg.b2nd")] if folder.is_dir() else []
    if not cases:
        raise FastkdError(f"calibration folder {folder}: no preprocessed <case>.b2nd in it (nnU-Net's "
                          "$nnUNet_preprocessed/<dataset>/<data identifier>)")
    patches = real_patches(folder, list(shape[2:]), n=limit)
    if patches[0].shape[1] != shape[1]:
        raise FastkdError(f"calibration folder {folder}: cases have {patches[0].shape[1]} channels, the network "
                          f"takes {shape[1]}")
    batch = shape[0]
    if len(patches) < batch:
        raise FastkdError(f"calibration folder {folder}: {len(patches)} cases, fewer than one batch of {batch}")
    return [np.concatenate(patches[i:i + batch]) for i in range(0, len(patches) - batch + 1, batch)]


def batches_sha256(batches: list[np.ndarray] | None) -> str | None:
    """What identifies calibration data in the rebuild decision: the sha256 of its batches (None: none)."""
    if not batches:
        return None
    digest = hashlib.sha256()
    for batch in batches:
        digest.update(repr(batch.shape).encode())
        digest.update(np.ascontiguousarray(batch, np.float32).tobytes())
    return digest.hexdigest()


def keep_fp32(layer_name: str, layer_type: str, normalization_nodes: set[str]) -> bool:
    """Whether a TensorRT layer is normalization (held in FP32): by type, or by the ONNX node it came from."""
    return layer_type == "NORMALIZATION" or any(node in layer_name for node in normalization_nodes)


def _pin_fp32(trt, network, normalization_nodes: set[str]) -> list[str]:
    floats = (trt.float32, trt.float16)
    pinned = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outputs = [layer.get_output(j) for j in range(layer.num_outputs)]
        if not keep_fp32(layer.name, layer.type.name, normalization_nodes) or any(o.dtype not in floats for o in outputs):
            continue  # shape and index arithmetic inside a decomposed norm has no float precision to set
        layer.precision = trt.float32
        for j in range(layer.num_outputs):
            layer.set_output_type(j, trt.float32)
        if layer.type == trt.LayerType.NORMALIZATION:
            layer.__class__ = trt.INormalizationLayer  # the subclass's attributes (get_layer returns ILayer)
            layer.compute_precision = trt.float32
        pinned.append(layer.name)
    return pinned


def _calibrator(trt, batches: list[np.ndarray]):
    """TensorRT's entropy calibrator fed with ``batches`` (copied to the GPU one at a time)."""

    class Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)
            self.batches = iter(batches)
            self.on_gpu = None  # the batch TensorRT reads: alive until the next one

        def get_batch_size(self):
            return batches[0].shape[0]

        def get_batch(self, names):
            batch = next(self.batches, None)
            if batch is None:
                return None
            self.on_gpu = torch.from_numpy(batch).cuda().contiguous()
            return [int(self.on_gpu.data_ptr())]

        def read_calibration_cache(self):
            return None  # always calibrate: a cache keyed by tensor names would survive a retrain

        def write_calibration_cache(self, cache):
            return None  # the scales live in the engine

    return Calibrator()


def _timing_cache(config, path: Path):
    """(TensorRT's timing cache for ``config``, from ``path`` when TensorRT can use it; what happened to it)."""
    blob = path.read_bytes() if path.is_file() else b""
    try:
        cache = config.create_timing_cache(blob)
    except Exception:  # TensorRT raises, or returns None, on a cache another version wrote
        cache = None
    note = "reused" if blob else "new"
    if cache is None:
        cache, note = config.create_timing_cache(b""), "replaced (unreadable)"
    if not config.set_timing_cache(cache, ignore_mismatch=False):  # another GPU or TensorRT version
        note = "replaced (it came from another GPU or TensorRT version)"
        config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)
    return note


def _build(trt, onnx_path: Path, precision: str, profile: dict, batches, normalization_nodes: set[str],
           timing_cache: Path, workspace_gb: float) -> tuple[bytes, list[str], str, list[dict]]:
    """(serialized engine, layers asked to stay FP32, what happened to the timing cache, the engine's layers
    as its inspector describes them)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise FastkdError(f"TensorRT's ONNX parser rejected {onnx_path}: {errors[:800]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # per-layer datatypes for the inspector
    shapes = builder.create_optimization_profile()
    shapes.set_shape(INPUT, profile["min"], profile["opt"], profile["max"])
    config.add_optimization_profile(shapes)
    pinned = []
    if precision == "fp32":
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; the parity reference is float32 onnxruntime
    else:
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        pinned = _pin_fp32(trt, network, normalization_nodes)
        if normalization_nodes and not pinned:
            raise FastkdError(f"{onnx_path} has normalization nodes but no TensorRT layer matched them; they would "
                              f"run in {precision.upper()}: build with --precision fp32")
    if precision == "int8":
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _calibrator(trt, batches)
        config.int8_calibrator = calibrator
        if profile["min"] != profile["max"]:  # a dynamic input calibrates at one shape: the batches'
            shape = list(batches[0].shape)
            fixed = builder.create_optimization_profile()
            fixed.set_shape(INPUT, shape, shape, shape)
            config.set_calibration_profile(fixed)
    cache_note = _timing_cache(config, timing_cache)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise FastkdError(f"TensorRT could not build an engine from {onnx_path} (its log above says why)")
    partial = timing_cache.with_name(f".{timing_cache.name}.{os.getpid()}.partial")  # builds beside it may share it
    partial.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(partial, timing_cache)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None:
        raise FastkdError(f"TensorRT cannot load the engine it just built from {onnx_path}")
    return bytes(serialized), pinned, cache_note, engine_layers(trt, engine, profile["opt"])


def real_batches(patches: list[np.ndarray], profile: dict) -> list[tuple[str, np.ndarray]]:
    """The gating inputs: real patches stacked to the profile's min and opt batches (cycling through them)."""
    inputs = []
    for batch in dict.fromkeys((profile["min"][0], profile["opt"][0])):
        cases = [i % len(patches) for i in range(batch)]
        inputs.append((f"preprocessed cases {sorted(set(cases))} at batch {batch}",
                       np.concatenate([patches[i] for i in cases])))
    return inputs


def _parity(engine: Path, onnx_path: Path, meta: dict, profile: dict, real: list[np.ndarray],
            min_agreement: float) -> dict:
    """TensorRT against onnxruntime (CPU): gated on real patches, random inputs of each profile shape for
    information."""
    import onnxruntime as ort

    network = TrtNetwork(engine, torch.device("cuda"))
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    shapes = list(dict.fromkeys(tuple(profile[key]) for key in ("opt", "min", "max")))
    inputs = [(f"random {list(s)}", rng.standard_normal(s).astype(np.float32), False) for s in shapes]
    inputs += [(name, x, True) for name, x in real_batches(real, profile)]
    checks = []
    for name, x, gating in inputs:
        expected = session.run([OUTPUT], {INPUT: x})[0]
        with torch.no_grad():
            got = network(torch.from_numpy(x)).cpu().numpy()
        checks.append({"input": name, "shape": list(x.shape), "max_abs_diff": float(np.abs(got - expected).max()),
                       "agreement": segmentation_agreement(got, expected, meta["regions"]), "gating": gating})
    return {"runtime": f"onnxruntime {ort.__version__} (CPUExecutionProvider)", "min_agreement": min_agreement,
            "checks": checks, "real_patches": len(real),
            "passed": all(c["agreement"] >= min_agreement for c in checks if c["gating"])}


def _preprocessed(calibration, metadata: dict) -> tuple[Path | None, str]:
    """(the folder of real preprocessed cases, where that was looked for: for the error when it has none)."""
    from fastkd import nnunet

    if calibration is not None:
        return Path(calibration), f"--calibration {calibration}"
    if not os.environ.get("nnUNet_preprocessed"):
        return None, "no --calibration, and $nnUNet_preprocessed is not set"
    meta = metadata["fastkd"]
    folder = (Path(os.environ["nnUNet_preprocessed"]) / meta["dataset_name"]
              / nnunet.data_identifier(metadata["nnunet_plans"], meta["configuration"]))
    return folder, f"nnU-Net's folder of the model, {folder}"


def build_engine(onnx_path: str | Path, out: str | Path, *, precision: str = "fp16", profile: dict | None = None,
                 max_batch: int = TILE_BATCH, calibration: str | Path | None = None,
                 timing_cache: str | Path | None = None, workspace_gb: float = 4.0, min_agreement: float = 0.999,
                 force: bool = False) -> dict:
    """Build, check and keep a TensorRT engine of a ``fastkd export onnx`` file (see the module docstring).

    Returns the engine's metadata (as written to ``<out>.json``) plus ``built``: False when the engine
    was up to date. ``profile``: {min, opt, max} shapes, any of them (see :func:`resolve_profile`).
    ``calibration``: folder of preprocessed ``<case>.b2nd``: INT8 calibration data (required for int8),
    and the real patches of the parity gate (default: nnU-Net's, under ``$nnUNet_preprocessed``).
    ``force``: rebuild even when up to date. Raises FastkdError, and leaves nothing at ``out``, when
    anything fails.
    """
    import fastkd
    from fastkd.config import check_values
    from fastkd.io import atomic_write_text
    from fastkd.io import sha256

    check_values({"export.tensorrt.precision": precision, "export.tensorrt.max_batch": max_batch,
                  "export.tensorrt.workspace_gb": workspace_gb})
    out, onnx_path = Path(out), Path(onnx_path)
    if out.suffix not in SUFFIXES:
        raise FastkdError(f"output {out}: the file name must end in {' or '.join(SUFFIXES)}")
    if not 0 <= min_agreement <= 1:
        raise FastkdError(f"min agreement {min_agreement}: must be a fraction in [0, 1]")
    if precision == "int8" and calibration is None:
        raise FastkdError("precision int8 needs calibration data: --calibration FOLDER of preprocessed <case>.b2nd")
    if calibration is not None and not Path(calibration).is_dir():
        raise FastkdError(f"calibration folder {calibration} does not exist")
    metadata, normalization_nodes = read_onnx(onnx_path)
    meta = metadata["fastkd"]
    shapes = resolve_profile(meta, profile, max_batch)
    patch = [shapes["min"][0], meta["num_input_channels"], *meta["patch_size"]]
    if not all(lo <= v <= hi for lo, v, hi in zip(shapes["min"], patch, shapes["max"])):
        raise FastkdError(f"profile min {shapes['min']} .. max {shapes['max']} excludes nnU-Net's patch {patch}: the "
                          "parity gate and fastkd predict run patches of that size")
    trt = require_tensorrt()

    batches = calibration_batches(calibration, [shapes["min"][0], *shapes["opt"][1:]]) if precision == "int8" \
        else None
    current = {**running_platform(), "format_version": FORMAT_VERSION, "precision": precision, "profile": shapes,
               "onnx_sha256": sha256(onnx_path), "workspace_gb": workspace_gb, "min_agreement": min_agreement,
               "calibration_sha256": batches_sha256(batches)}
    json_path = metadata_path(out)
    try:
        recorded = json.loads(json_path.read_text()) if out.is_file() else None
    except (OSError, ValueError):  # missing or unreadable: rebuild
        recorded = None
    if not force and not differences(recorded, current):
        return {**recorded, "built": False}
    preprocessed, looked = _preprocessed(calibration, metadata)
    real = real_patches(preprocessed, meta["patch_size"], n=max(2, shapes["opt"][0]))
    if not real:
        raise FastkdError(f"no preprocessed <case>.b2nd for the parity gate ({looked}): the engine is checked on "
                          "real patches; pass --calibration FOLDER of nnU-Net's preprocessed cases")
    json_path.unlink(missing_ok=True)  # a stale pair goes first: never an old JSON beside a new engine
    out.unlink(missing_ok=True)

    started = time.time()
    timing_cache = Path(timing_cache) if timing_cache else out.parent / "tensorrt_timing.cache"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    try:
        engine, pinned, cache_note, layers = _build(trt, onnx_path, precision, shapes, batches, normalization_nodes,
                                                    timing_cache, workspace_gb)
        normalization = normalization_report(layers, normalization_nodes)
        check_normalization(normalization, precision)
        tmp.write_bytes(engine)
        parity = _parity(tmp, onnx_path, meta, shapes, real, min_agreement)
        if not parity["passed"]:
            worst = min((c for c in parity["checks"] if c["gating"]), key=lambda c: c["agreement"])
            raise FastkdError(f"TensorRT ({precision}) disagrees with onnxruntime on {worst['input']}: agreement "
                              f"{worst['agreement']:.6f} (needs >= {min_agreement}), max |logit difference| "
                              f"{worst['max_abs_diff']:.3g}; no engine written")
        record = {"fastkd_version": fastkd.__version__, **current, "onnx": str(onnx_path),
                  "timing_cache": {"path": str(timing_cache), "status": cache_note},
                  "calibration": {"folder": str(calibration), "batches": len(batches)} if batches else None,
                  "fp32_layers": pinned, "normalization": normalization, "metadata": metadata, "parity": parity,
                  "seconds": round(time.time() - started, 1)}
        os.replace(tmp, out)
        atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    finally:
        tmp.unlink(missing_ok=True)
    return {**record, "built": True}
