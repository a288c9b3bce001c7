"""fastkd.predict.backends.tensorrt's runner and its TensorRT check, without TensorRT or a GPU: a fake engine,
context and CUDA streams record what TrtNetwork asks of them (the CPU stands in for the GPU's memory)."""

import sys
import types

import pytest
import torch

from fastkd.errors import FastkdError
from fastkd.predict.backends import tensorrt as trt_backend
from fastkd.predict.backends.tensorrt import TrtNetwork, aligned, check_tensorrt_version, require_tensorrt


class Stream:
    def __init__(self, log, name, handle):
        self.log, self.name, self.cuda_stream = log, name, handle

    def wait_stream(self, other):
        self.log.append(("wait_stream", self.name, other.name))


@pytest.fixture
def runner(monkeypatch, tmp_path):
    """A TrtNetwork on a fake engine (batch 1-8 of 1 x 16 x 24 x 16 -> 3 classes); ``log`` records the calls."""
    log = []

    class Context:
        def set_input_shape(self, name, shape):
            self.shape = shape
            log.append(("set_input_shape", name, shape))
            return shape[0] <= 8

        def get_tensor_shape(self, name):
            return (self.shape[0], 3, *self.shape[2:])

        def set_tensor_address(self, name, address):
            log.append(("set_tensor_address", name, address))

        def execute_async_v3(self, handle):
            log.append(("execute_async_v3", handle))
            return True

    class Engine:
        def create_execution_context(self):
            return Context()

        def get_tensor_profile_shape(self, name, profile):
            return [(1, 1, 16, 24, 16), (8, 1, 16, 24, 16), (8, 1, 16, 24, 16)]

        def get_tensor_dtype(self, name):
            return "float32"

    trt = types.SimpleNamespace(__version__="10.13.3.9", float16="float16", Logger=lambda level: None,
                                Runtime=lambda logger: types.SimpleNamespace(deserialize_cuda_engine=lambda b: Engine()))
    trt.Logger.WARNING = "WARNING"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda device: __import__("contextlib").nullcontext())
    current = Stream(log, "current", 0)  # torch's default stream: the legacy stream, handle 0
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "Stream", lambda device=None: Stream(log, "private", 0x7F00))
    monkeypatch.setattr(torch.Tensor, "record_stream",
                        lambda self, stream: log.append(("record_stream", self.data_ptr(), stream.name)))
    engine = tmp_path / "student.engine"
    engine.write_bytes(b"engine")
    network = TrtNetwork(engine, torch.device("cuda"))
    network.device = torch.device("cpu")  # no GPU here: the tensors stay in host memory
    return network, log


def test_the_engine_runs_on_its_own_stream_ordered_with_the_callers(runner):
    network, log = runner
    x = aligned(torch.randn(2, 1, 16, 24, 16))  # an aligned input is used in place
    out = network(x)
    assert out.shape == (2, 3, 16, 24, 16) and out.dtype == torch.float32
    addresses = {c[1]: c[2] for c in log if c[0] == "set_tensor_address"}
    assert addresses["image"] == x.data_ptr() and all(a % 256 == 0 for a in addresses.values())
    steps = [c for c in log if c[0] in ("wait_stream", "record_stream", "execute_async_v3")]
    assert steps == [("wait_stream", "private", "current"),  # the input was written on the caller's stream
                     ("record_stream", addresses["image"], "private"), ("record_stream", addresses["logits"], "private"),
                     ("execute_async_v3", 0x7F00),  # never the legacy default stream (0): it syncs the device
                     ("wait_stream", "current", "private")]  # what reads the logits waits for the engine


def test_an_unaligned_input_is_copied_to_an_aligned_buffer(runner):
    network, log = runner
    storage = torch.randn(16 * 24 * 16 + 128)
    start = (-storage.data_ptr() % 256) // 4 + 1  # 4 bytes past a 256-byte boundary
    x = storage[start:start + 16 * 24 * 16].view(1, 1, 16, 24, 16)
    assert x.data_ptr() % 256 == 4
    network(x)
    address = next(c[2] for c in log if c[:2] == ("set_tensor_address", "image"))
    assert address % 256 == 0 and address != x.data_ptr()
    copy = aligned(x)
    assert copy.data_ptr() % 256 == 0 and torch.equal(copy, x) and aligned(copy) is copy


def test_an_input_outside_the_profile_is_refused(runner):
    network, log = runner
    with pytest.raises(FastkdError, match=r"input \[9, 1, 16, 24, 16\] is outside the engine's profile"):
        network(torch.zeros(9, 1, 16, 24, 16))
    assert network.max_batch == 8 and not [c for c in log if c[0] == "execute_async_v3"]


@pytest.mark.parametrize("version", ["10.13.0.35", "10.13.3.9", "10.16.1"])
def test_supported_tensorrt_versions_pass(version):
    check_tensorrt_version(version)


@pytest.mark.parametrize("version", ["11.0.0.12", "10.12.0.36", "10.3.0", "8.6.1", "unknown"])
def test_other_tensorrt_versions_are_refused_with_the_pip_command(version, monkeypatch):
    for cuda, wheel in (("13.0", "tensorrt-cu13"), ("12.8", "tensorrt-cu12")):
        monkeypatch.setattr(torch.version, "cuda", cuda)
        with pytest.raises(FastkdError, match=rf'^TensorRT {version} is installed; fastkd builds and runs engines '
                                              rf'with TensorRT >= 10.13, < 11 .*: pip install "{wheel}>=10.13,<11" '
                                              rf'\(torch .* is a CUDA {cuda} build\)$'):
            check_tensorrt_version(version)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(FastkdError, match="has CUDA None: install a CUDA 12 or 13 build of torch"):
        check_tensorrt_version(version)


def test_require_tensorrt_refuses_tensorrt_11_before_asking_for_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.0.0.12"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(FastkdError, match="TensorRT 11.0.0.12 is installed"):
        require_tensorrt()


def test_the_default_opt_batch_is_the_tile_batch_predict_uses_on_cuda():
    from fastkd.predict.predictor import DEFAULT_TILE_BATCH

    assert trt_backend.TILE_BATCH == DEFAULT_TILE_BATCH["cuda"]
