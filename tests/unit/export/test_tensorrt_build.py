"""fastkd.export.tensorrt's build, end to end against a fake ``tensorrt`` module that records what the builder
asks of it (the TensorRT 10 Python API calls fastkd makes) and plays back an engine inspector's JSON; the
engine's forward is onnxruntime itself, perturbed where a test says. What TensorRT would build cannot run
here (no GPU): these tests check fastkd's side of each call."""

import json
import re
import types

import numpy as np
import pytest

from fastkd.errors import FastkdError
from fastkd.export import tensorrt as fastkd_trt
from fastkd.export import tensorrt_inspect as inspect
from fastkd.export.onnx import export_onnx
from fastkd.export.tensorrt import build_engine, read_onnx
from fastkd.predict.backends.tensorrt import metadata_path
from fake_models import write_model

PLATFORM = {"tensorrt_version": "10.13.3.9", "gpu": {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}}


class Enum:
    def __init__(self, *names):
        for name in names:
            setattr(self, name, name)


class FakeTrt(types.SimpleNamespace):
    """The parts of TensorRT 10's Python API the builder calls; ``calls`` records them."""

    def __init__(self, layers, cache_readable=True):
        calls = []
        trt = self
        super().__init__(__version__="10.13.3.9", calls=calls, float32="float32", float16="float16",
                         MemoryPoolType=Enum("WORKSPACE"), ProfilingVerbosity=Enum("DETAILED"),
                         BuilderFlag=Enum("FP16", "INT8", "OBEY_PRECISION_CONSTRAINTS", "TF32"),
                         LayerType=Enum("NORMALIZATION"), LayerInformationFormat=Enum("JSON"))

        class Logger:
            WARNING = "WARNING"

            def __init__(self, level):
                pass

        class Layer:
            def __init__(self, name):
                self.name, self.type, self.num_outputs = name, types.SimpleNamespace(name="ELEMENTWISE"), 1

            def get_output(self, j):
                return types.SimpleNamespace(dtype="float32")

            def set_output_type(self, j, dtype):
                calls.append(("set_output_type", self.name, dtype))

        class Network:
            def __init__(self):
                self.names = [n for n in trt.network_layers]
                self.num_layers = len(self.names)

            def get_layer(self, i):
                return Layer(self.names[i])

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                calls.append(("set_shape", name, list(lo), list(opt), list(hi)))

        class Cache:
            def serialize(self):
                return b"timings"

        class Config:
            def __init__(self):
                self.flags = {"TF32"}  # TensorRT's default

            def set_memory_pool_limit(self, pool, size):
                calls.append(("set_memory_pool_limit", pool, size))

            def set_flag(self, flag):
                self.flags.add(flag)

            def clear_flag(self, flag):
                self.flags.discard(flag)

            def add_optimization_profile(self, profile):
                pass

            def create_timing_cache(self, blob):
                calls.append(("create_timing_cache", bytes(blob)))
                if blob and not cache_readable:
                    return None  # what TensorRT does with a cache another version wrote
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                if cache is None:
                    raise TypeError("set_timing_cache(): incompatible function arguments")
                return True

            def get_timing_cache(self):
                return Cache()

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return Network()

            def create_builder_config(self):
                trt.config = Config()
                return trt.config

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                calls.append(("build", sorted(config.flags), getattr(config, "profiling_verbosity", None)))
                return b"serialized engine"

        class Parser:
            num_errors = 0

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                return True

        class Inspector:
            execution_context = None

            def get_engine_information(self, fmt):
                calls.append(("get_engine_information", fmt, self.execution_context.shape))
                return json.dumps({"Layers": trt.engine_json, "Bindings": ["image", "logits"]})

        class Context:
            shape = None

            def set_input_shape(self, name, shape):
                self.shape = list(shape)
                return True

        class Engine:
            def create_execution_context(self):
                return Context()

            def create_engine_inspector(self):
                return Inspector()

        class Runtime:
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, blob):
                return Engine()

        self.Logger, self.Builder, self.OnnxParser, self.Runtime = Logger, Builder, Parser, Runtime
        self.network_layers, self.engine_json = [], layers


@pytest.fixture(scope="module")
def batch_onnx(tmp_path_factory):
    """A small student exported with a dynamic batch only (fastkd export onnx --batch 0)."""
    tmp = tmp_path_factory.mktemp("batch")
    export_onnx(write_model(tmp), 0, tmp / "batch.onnx", batch=0)
    return tmp / "batch.onnx"


@pytest.fixture
def cases(tmp_path):
    import blosc2

    folder = tmp_path / "preprocessed"
    folder.mkdir()
    for i in range(3):
        data = np.random.default_rng(100 + i).standard_normal((1, 16, 24, 16)).astype(np.float32)
        blosc2.asarray(data, urlpath=str(folder / f"case_{i}.b2nd"), mode="w")
    return folder


def norm_layers(nodes, datatype="Row major linear FP32"):
    """Engine layers as the inspector describes them: one per normalization node, with ``datatype``."""
    return [{"Name": node, "LayerType": "CaskPointWise", "Metadata": f"[ONNX Layer: {node}]",
             "Inputs": [{"Name": "a", "Format/Datatype": datatype}],
             "Outputs": [{"Name": "b", "Format/Datatype": datatype}]} for node in sorted(nodes)]


def fake(monkeypatch, trt, flip=None):
    """TensorRT faked by ``trt``; the engine runs onnxruntime, its argmax flipped on inputs ``flip`` picks."""
    import onnxruntime as ort
    import torch

    trt.network_layers = trt.network_layers or sorted(read_onnx(trt.onnx)[1])  # the parser's layers, named by node
    monkeypatch.setattr(fastkd_trt, "require_tensorrt", lambda: trt)
    monkeypatch.setattr(fastkd_trt, "running_platform", lambda: PLATFORM)
    monkeypatch.delenv("nnUNet_preprocessed", raising=False)

    class Network:
        def __init__(self, path, device):
            assert path.read_bytes() == b"serialized engine" and device.type == "cuda"
            self.session = ort.InferenceSession(str(trt.onnx), providers=["CPUExecutionProvider"])

        def __call__(self, x):
            out = self.session.run(["logits"], {"image": x.numpy()})[0]
            if flip and flip(x.numpy()):
                out = out[:, ::-1].copy()  # another class wins everywhere
            return torch.from_numpy(out)

    monkeypatch.setattr(fastkd_trt, "TrtNetwork", Network)


def test_a_build_asks_tensorrt_for_what_the_engine_needs_and_records_what_it_got(batch_onnx, cases, tmp_path,
                                                                                 monkeypatch):
    _, norms = read_onnx(batch_onnx)
    trt = FakeTrt(norm_layers(norms))
    trt.onnx, trt.network_layers = batch_onnx, sorted(norms)[:3] + ["/conv/Conv"]
    # random inputs are informational: an engine that flips them (near-tied noise logits) is still kept
    fake(monkeypatch, trt, flip=lambda x: not any(np.array_equal(x[0], c) for c in _cases(cases)))
    engine = tmp_path / "out" / "student.engine"
    record = build_engine(batch_onnx, engine, calibration=cases)
    assert record["built"] and engine.read_bytes() == b"serialized engine"
    patch = [1, 1, 16, 24, 16]
    assert ("set_shape", "image", patch, [8, 1, 16, 24, 16], [8, 1, 16, 24, 16]) in trt.calls
    assert ("set_memory_pool_limit", "WORKSPACE", 4 << 30) in trt.calls
    build, = [c for c in trt.calls if c[0] == "build"]
    assert build == ("build", ["FP16", "OBEY_PRECISION_CONSTRAINTS", "TF32"], "DETAILED")
    assert {c[1] for c in trt.calls if c[0] == "set_output_type"} == set(sorted(norms)[:3])
    assert ("get_engine_information", "JSON", [8, 1, 16, 24, 16]) in trt.calls  # formats need a context's shapes
    assert record["fp32_layers"] == sorted(norms)[:3]
    assert record["normalization"]["nodes"] == record["normalization"]["covered"] == len(norms)
    assert {r["precision"] for r in record["normalization"]["layers"]} == {"fp32"}
    assert record["timing_cache"]["status"] == "new" and (engine.parent / "tensorrt_timing.cache").read_bytes() == \
        b"timings"
    checks = record["parity"]["checks"]
    assert [(c["shape"][0], c["gating"]) for c in checks] == [(8, False), (1, False), (1, True), (8, True)]
    assert [c["agreement"] == 1.0 for c in checks] == [False, False, True, True], checks
    assert record["parity"]["passed"] and record["parity"]["real_patches"] == 3
    assert json.loads(metadata_path(engine).read_text()) == {k: v for k, v in record.items() if k != "built"}
    assert record["format_version"] == fastkd_trt.FORMAT_VERSION and record["min_agreement"] == 0.999


def _cases(folder):
    import blosc2

    return [np.asarray(blosc2.open(str(p))[:]) for p in sorted(folder.glob("*.b2nd"))]


def test_an_fp32_build_turns_tf32_off(batch_onnx, cases, tmp_path, monkeypatch):
    _, norms = read_onnx(batch_onnx)
    trt = FakeTrt(norm_layers(norms))
    trt.onnx = batch_onnx
    fake(monkeypatch, trt)
    build_engine(batch_onnx, tmp_path / "student.engine", precision="fp32", calibration=cases)
    build, = [c for c in trt.calls if c[0] == "build"]
    assert build[1] == []  # no FP16, and TF32 cleared: the reference is float32 onnxruntime


def test_an_engine_that_disagrees_on_real_patches_is_not_written(batch_onnx, cases, tmp_path, monkeypatch):
    _, norms = read_onnx(batch_onnx)
    trt = FakeTrt(norm_layers(norms))
    trt.onnx = batch_onnx
    fake(monkeypatch, trt, flip=lambda x: x.shape[0] == 8)
    engine = tmp_path / "student.engine"
    with pytest.raises(FastkdError, match=re.escape("TensorRT (fp16) disagrees with onnxruntime on preprocessed "
                                                    "cases [0, 1, 2] at batch 8: agreement")):
        build_engine(batch_onnx, engine, calibration=cases)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preprocessed", "tensorrt_timing.cache"]


@pytest.mark.parametrize("layers, message", [
    (lambda norms: norm_layers(norms, "Channel major FP16 format where channel % 8 == 0"),
     "normalization layers run in reduced precision in the fp16 engine"),
    (lambda norms: norm_layers(norms, "Half")[:1] + norm_layers(norms)[1:], "1 normalization layers run in reduced"),
    (lambda norms: [{"Name": "/conv/Conv", "LayerType": "CaskConvolution", "Metadata": "[ONNX Layer: /conv/Conv]",
                     "Inputs": [], "Outputs": []}], "but no layer of the built engine maps to any of them"),
])
def test_an_engine_running_normalization_in_fp16_is_refused(batch_onnx, cases, tmp_path, monkeypatch, layers,
                                                            message):
    _, norms = read_onnx(batch_onnx)
    trt = FakeTrt(layers(norms))
    trt.onnx = batch_onnx
    fake(monkeypatch, trt)
    with pytest.raises(FastkdError, match=re.escape(message) + ".*no engine written"):
        build_engine(batch_onnx, tmp_path / "student.engine", calibration=cases)
    assert not (tmp_path / "student.engine").exists() and not (tmp_path / "student.engine.json").exists()


def test_normalization_fused_into_myelin_is_recorded_and_left_to_the_parity_gate(batch_onnx, cases, tmp_path,
                                                                                 monkeypatch):
    _, norms = read_onnx(batch_onnx)
    fused = sorted(norms)[:4]
    myelin = {"Name": f"{{ForeignNode[{fused[0]}...{fused[-1]}]}}", "LayerType": "Myelin",
              "Metadata": "\x1e".join(f"[ONNX Layer: {n}]" for n in fused + ["/conv/Conv"]),
              "Inputs": [{"Name": "a", "Format/Datatype": "Half"}], "Outputs": [{"Name": "b", "Format/Datatype": "Half"}]}
    reformat = {"Name": f"Reformatting CopyNode for Input Tensor 0 to {sorted(norms)[5]}", "LayerType": "Reformat",
                "Inputs": [{"Format/Datatype": "Row major linear FP16 format"}],
                "Outputs": [{"Format/Datatype": "Row major linear FP32"}]}
    trt = FakeTrt([myelin, reformat] + norm_layers(sorted(norms)[4:]))
    trt.onnx = batch_onnx
    fake(monkeypatch, trt)
    record = build_engine(batch_onnx, tmp_path / "student.engine", calibration=cases)
    norm = record["normalization"]
    assert norm["fused_nodes"] == fused and norm["covered"] == norm["nodes"] == len(norms)
    assert norm["layers"][0] == {"name": myelin["Name"], "type": "Myelin", "onnx_nodes": 4,
                                 "precision": "fused (Myelin), precision not observable"}
    assert reformat["Name"] not in [r["name"] for r in norm["layers"]]  # a format copy computes nothing


def test_an_unreadable_timing_cache_is_replaced(batch_onnx, cases, tmp_path, monkeypatch):
    _, norms = read_onnx(batch_onnx)
    trt = FakeTrt(norm_layers(norms), cache_readable=False)
    trt.onnx = batch_onnx
    fake(monkeypatch, trt)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"written by TensorRT 10.9")
    record = build_engine(batch_onnx, tmp_path / "student.engine", calibration=cases, timing_cache=cache)
    assert record["timing_cache"] == {"path": str(cache), "status": "replaced (unreadable)"}
    assert [c[1] for c in trt.calls if c[0] == "create_timing_cache"] == [b"written by TensorRT 10.9", b""]
    assert cache.read_bytes() == b"timings"


def test_tensor_formats_name_their_precision():
    assert [inspect.datatype(f) for f in ("Row major linear FP32", "Float", "Half", "Row major linear FP16 format",
                                          "Channel major BFloat16 format where channel % 8 == 0", "Int8 NC/32HW32",
                                          "Row major linear Int32", "Row major linear BOOL", "Unknown format")] == \
        ["fp32", "fp32", "fp16", "fp16", "bf16", "int8", None, None, "not observable"]
    shape_only = {"Name": "n", "Inputs": [{"Format/Datatype": "Row major linear Int64 format"}], "Outputs": []}
    assert inspect.layer_precision(shape_only) == "no float data"
    assert inspect.layer_precision({"Name": "n", "Inputs": [], "Outputs": []}) == "not observable"
