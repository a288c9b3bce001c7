"""fastkd predict's CUDA paths, run here without a GPU: the onnx backend against a fake onnxruntime that
records what it is given (providers, IOBinding) and computes through the bound pointers, and the
segmentation made on the device run on CPU tensors (the device path forced on).

What only a GPU can show (torch's and onnxruntime's streams really ordered, the speed) is not tested here.
"""

import ctypes
import json
import shutil
import sys
import types

import numpy as np
import pytest
import torch

from fastkd.errors import FastkdError

from test_predict import DATASET_JSON, full_plans, trace_cache, write_model_folder  # noqa: F401 (fixture)


# -- onnx on CUDA: providers and IOBinding ----------------------------------------------------------------
class FakeBinding:
    def __init__(self):
        self.inputs, self.outputs, self.synchronized = [], [], 0

    def bind_input(self, name, device_type, device_id, element_type, shape, buffer_ptr):
        self.inputs.append((name, device_type, device_id, element_type, tuple(shape), buffer_ptr))

    def bind_output(self, name, device_type="cpu", device_id=0, element_type=None, shape=None, buffer_ptr=None):
        self.outputs.append((name, device_type, device_id, element_type, tuple(shape), buffer_ptr))

    def synchronize_outputs(self):
        self.synchronized += 1


class FakeSession:
    """onnxruntime.InferenceSession's surface the backend uses; ``got``: the providers it really gets.
    A run reads the bound input through its pointer and writes 2 * input - channel into the bound output."""

    got: list = []
    made: list = []

    def __init__(self, path, options, providers):
        self.asked, self.runs = providers, []
        FakeSession.made.append(self)

    def get_providers(self):
        return list(self.got)

    def get_outputs(self):
        return [types.SimpleNamespace(type="tensor(float)")]

    def io_binding(self):
        return FakeBinding()

    def run_with_iobinding(self, binding):
        self.runs.append(binding)
        (_, _, _, in_type, in_shape, in_ptr), = binding.inputs
        (_, _, _, out_type, out_shape, out_ptr), = binding.outputs
        x = np.empty(in_shape, in_type)
        ctypes.memmove(x.ctypes.data, in_ptr, x.nbytes)
        y = np.concatenate([2 * x - c for c in range(out_shape[1])], axis=1).astype(out_type)
        assert y.shape == out_shape
        ctypes.memmove(out_ptr, y.ctypes.data, y.nbytes)


@pytest.fixture
def fake_ort(monkeypatch):
    class Options:
        intra_op_num_threads = 0

        def add_session_config_entry(self, key, value):
            pass

    module = types.SimpleNamespace(InferenceSession=FakeSession, SessionOptions=Options, __version__="1.99-fake",
                                   get_available_providers=lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setitem(sys.modules, "onnxruntime", module)
    FakeSession.made, FakeSession.stream = [], types.SimpleNamespace(cuda_stream=4242, synchronized=0)

    def synchronize():
        FakeSession.stream.synchronized += 1

    FakeSession.stream.synchronize = synchronize
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeSession.stream)
    return FakeSession


def test_onnx_on_cuda_refuses_a_cpu_fallback(fake_ort, tmp_path):
    """onnxruntime and onnxruntime-gpu in one folder leave a session without CUDA: refused, naming the providers
    it really got and the fix, never run on the CPU."""
    from fastkd.predict.backends.onnx import OnnxNetwork

    fake_ort.got = ["CPUExecutionProvider"]
    with pytest.raises(FastkdError) as e:
        OnnxNetwork(tmp_path / "s.onnx", torch.device("cuda", 0), None, 3)
    message = str(e.value)
    assert "gave s.onnx the providers CPUExecutionProvider, not CUDAExecutionProvider first" in message
    assert "pip uninstall onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu" in message
    assert "pip install fastkd[gpu]" in message and "onnxruntime 1.99-fake" in message
    fake_ort.got = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    with pytest.raises(FastkdError, match="providers TensorrtExecutionProvider, CUDAExecutionProvider, CPU"):
        OnnxNetwork(tmp_path / "s.onnx", torch.device("cuda", 0), None, 3)


def test_onnx_on_cuda_binds_torch_tensors_on_torchs_stream(fake_ort, tmp_path):
    """CUDA first: the session asked for CUDA on torch's current stream (copies in the default stream kept);
    each forward binds the contiguous float32 input and a preallocated output by pointer and runs with the
    binding, no numpy round trip. The tensors live on the CPU here (no GPU): the fake reads and writes
    through the bound pointers, so a wrong pointer, shape or stride gives wrong logits."""
    from fastkd.predict.backends.onnx import OnnxNetwork

    fake_ort.got = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    net = OnnxNetwork(tmp_path / "s.onnx", torch.device("cuda", 0), None, 3)
    session, = fake_ort.made
    assert session.asked == [("CUDAExecutionProvider", {"device_id": "0", "user_compute_stream": "4242",
                                                        "do_copy_in_default_stream": "1"}), "CPUExecutionProvider"]
    net.device = torch.device("cpu")  # where this test's tensors live; the binding still says cuda
    x = torch.arange(2 * 1 * 4 * 6 * 5, dtype=torch.float64).reshape(2, 1, 5, 6, 4).permute(0, 1, 4, 3, 2)
    assert not x.is_contiguous()
    y = net(x)
    binding, = session.runs
    (name, device_type, device_id, element_type, shape, _), = binding.inputs
    assert (name, device_type, device_id, element_type, shape) == ("image", "cuda", 0, np.float32, (2, 1, 4, 6, 5))
    (name, device_type, device_id, element_type, shape, ptr), = binding.outputs
    assert (name, device_type, device_id, element_type, shape) == ("logits", "cuda", 0, np.float32, (2, 3, 4, 6, 5))
    expected = torch.cat([2 * x.float() - c for c in range(3)], dim=1)
    assert y.dtype == torch.float32 and torch.equal(y, expected)
    # on torch's own stream: onnxruntime orders its work there; the outputs synchronized before torch reads
    assert binding.synchronized == 1 and fake_ort.stream.synchronized == 0
    # torch's default stream (a null handle, which onnxruntime ignores): no user stream, torch's synchronized first
    fake_ort.stream.cuda_stream = 0
    net = OnnxNetwork(tmp_path / "s.onnx", torch.device("cuda", 0), None, 3)
    assert fake_ort.made[-1].asked[0] == ("CUDAExecutionProvider", {"device_id": "0", "do_copy_in_default_stream": "1"})
    net.device = torch.device("cpu")
    assert torch.equal(net(x), expected)
    assert fake_ort.made[-1].runs[0].synchronized == 1 and fake_ort.stream.synchronized == 1


def test_onnx_on_the_cpu_runs_as_before(fake_ort, tmp_path, monkeypatch):
    """The CPU path: the CPU provider only, whatever onnxruntime offers, and no binding."""
    from fastkd.predict.backends.onnx import OnnxNetwork

    fake_ort.got = ["CPUExecutionProvider"]
    calls = []
    monkeypatch.setattr(fake_ort, "run", lambda self, names, feeds: calls.append((names, feeds)) or
                        [np.zeros((1, 3, 2, 2, 2), np.float32)], raising=False)
    net = OnnxNetwork(tmp_path / "s.onnx", torch.device("cpu"), None, 3)
    assert fake_ort.made[0].asked == ["CPUExecutionProvider"]
    assert net(torch.ones(1, 1, 2, 2, 2)).shape == (1, 3, 2, 2, 2)
    (names, feeds), = calls
    assert names == ["logits"] and isinstance(feeds["image"], np.ndarray) and not fake_ort.made[0].runs


# -- the segmentation made on the device ------------------------------------------------------------------
def _case(tmp_path, spacing=(2.0, 1.25, 1.25), transpose=None):
    """A preprocessed anisotropic demo case (resampled to the plans' grid and back) and smooth logits;
    ``transpose``: the plans' transpose_forward, and the image gets a zero border (nnU-Net crops it off)."""
    import SimpleITK as sitk
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from fastkd.demo import make_demo_dataset

    raw = tmp_path / "Dataset901_Aniso"
    make_demo_dataset(raw, n_cases=5, n_test=0, anisotropic=True)
    image = raw / "imagesTr" / "demo_000_0000.nii.gz"
    plans = full_plans(spacing=spacing)
    if transpose:
        plans.update(transpose_forward=list(transpose), transpose_backward=[int(i) for i in np.argsort(transpose)])
        read = sitk.ReadImage(str(image))
        array = sitk.GetArrayFromImage(read) + 1.0
        array[:1], array[:, -2:], array[:, :, :3] = 0, 0, 0
        bordered = sitk.GetImageFromArray(array)
        bordered.CopyInformation(read)
        sitk.WriteImage(bordered, str(image))
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    data, _, properties = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm, DATASET_JSON)
    x = torch.from_numpy(data[0]).float()
    logits = torch.stack([torch.zeros_like(x), x - 0.5, -x - 0.5]).half()  # nnU-Net's logits are fp16
    return raw, image, pm, cm, properties, logits


@pytest.mark.parametrize("save_probabilities", [False, True])
def test_device_segmentation_is_written_as_nnunet_writes_the_fp32_logits(tmp_path, save_probabilities):
    """Pins the nnU-Net internals the device path relies on: the segmentation made from the resampled
    logits (argmax, or from the probabilities when they are saved) and written by write_case is exactly
    what nnU-Net's export_prediction_from_logits writes from the same logits as float32 (the earlier path,
    which pickled them to the writers); only the integer labels (or fp16 probabilities) go to the writer."""
    import SimpleITK as sitk

    from fastkd.predict.predictor import Segmented, resample_logits, segment_on_device, write_case

    _, image, pm, cm, properties, logits = _case(tmp_path, transpose=(1, 2, 0))
    bbox, before = properties["bbox_used_for_cropping"], properties["shape_before_cropping"]
    assert [hi - lo for lo, hi in bbox] != list(before) and pm.transpose_backward == [2, 0, 1]  # both undone
    lm = pm.get_label_manager(DATASET_JSON)
    cpu = torch.device("cpu")
    segmented = segment_on_device(logits, properties, pm, cm, lm, cpu, save_probabilities)
    shape = tuple(properties["shape_after_cropping_and_before_resampling"])
    assert isinstance(segmented, Segmented) and segmented.segmentation.dtype == np.uint8
    assert segmented.segmentation.shape == shape
    if save_probabilities:
        assert segmented.probabilities.dtype == np.float16 and segmented.probabilities.shape == (3, *shape)
    else:
        assert segmented.probabilities is None
    for name, prediction in (("ours", segmented), ("fp32", resample_logits(logits, properties, pm, cm, cpu).numpy())):
        (tmp_path / name).mkdir()
        write_case(prediction, properties, cm, pm, DATASET_JSON, str(tmp_path / name / "case"), save_probabilities)
    ours, fp32 = (sitk.ReadImage(str(tmp_path / name / "case.nii.gz")) for name in ("ours", "fp32"))
    reference = sitk.ReadImage(str(image))
    assert np.array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(fp32))
    assert len(np.unique(sitk.GetArrayFromImage(ours))) == 3
    assert ours.GetSize() == reference.GetSize() and ours.GetSpacing() == fp32.GetSpacing() == reference.GetSpacing()
    assert ours.GetOrigin() == fp32.GetOrigin() and ours.GetDirection() == fp32.GetDirection()
    if save_probabilities:
        a, b = (np.load(tmp_path / name / "case.npz")["probabilities"] for name in ("ours", "fp32"))
        assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
        np.testing.assert_allclose(a, b, atol=1e-3)  # fp16 on the way to the writer
        assert (tmp_path / "ours" / "case.pkl").is_file()
    # the bytes that cross to the writer: uint8 labels, against the full-resolution float32 logits
    assert segmented.segmentation.nbytes * 4 * 3 == resample_logits(logits, properties, pm, cm, cpu).numpy().nbytes


def test_label_dtype_is_the_smallest_that_holds_the_labels():
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from fastkd.predict.predictor import label_dtype

    assert label_dtype(LabelManager({"background": 0, "a": 1, "b": 255}, None)) == torch.uint8
    assert label_dtype(LabelManager({"background": 0, "a": 1, "b": 256}, None)) == torch.int16
    regions = LabelManager({"background": 0, "whole": [1, 2], "core": 2}, [1, 2])
    assert regions.has_regions and label_dtype(regions) == torch.uint8


@pytest.fixture
def one_case(tmp_path):
    """A model folder and one anisotropic demo case (nnU-Net resamples it to the plans' grid and back)."""
    model = write_model_folder(tmp_path / "nnUNetTrainer__nnUNetPlans_fastkdR2__3d_fullres",
                               full_plans(spacing=(2.0, 1.25, 1.25)), folds=(0,))
    raw, image, *_ = _case(tmp_path / "raw")
    images = tmp_path / "images"
    images.mkdir()
    shutil.copy(image, images)
    return model, images


def test_device_path_hands_the_writer_labels_and_falls_back_on_out_of_memory(one_case, tmp_path, monkeypatch,
                                                                            capsys):
    """The whole run with the device path asked for (``resample="device"``, on CPU tensors): the writer gets uint8 labels of the
    cropped shape, not float32 logits, and writes the labels of the fp32 device path; out of GPU memory
    (simulated) the case goes through nnU-Net's CPU path, said once, and is written as stock writes it."""
    import SimpleITK as sitk

    import fastkd.predict.predictor as predictor

    model, images = one_case
    real_write = predictor.write_case
    real_segment = predictor.segment_on_device
    handed = []

    def recording_write(prediction, *args):
        handed.append(prediction)
        return real_write(prediction, *args)

    monkeypatch.setattr(predictor, "write_case", recording_write)

    def run(name, on_device):
        where = "device" if on_device else "cpu"
        record = predictor.predict(images, tmp_path / name, model, mirroring=False, num_processes=1, progress=False,
                                   jit=False, resample=where)
        assert record["resample"] == where
        return sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / name / "demo_000.nii.gz")))

    cpu_path = run("cpu", False)
    assert isinstance(handed[-1], np.ndarray) and handed[-1].dtype == np.float16  # nnU-Net's own logits
    device_path = run("device", True)
    segmented = handed[-1]
    assert isinstance(segmented, predictor.Segmented) and segmented.segmentation.dtype == np.uint8
    assert segmented.segmentation.nbytes < handed[0].nbytes / 3  # less than one class's fp16 logits
    # the fp32 path: the resampled logits handed over as float32, written by nnU-Net's export
    fp32 = []
    monkeypatch.setattr(predictor, "segment_on_device", lambda logits, properties, pm, cm, lm, device, save: fp32.append(
        1) or predictor.resample_logits(logits, properties, pm, cm, device).numpy())
    assert np.array_equal(run("fp32", True), device_path) and fp32 == [1]
    assert (device_path == cpu_path).mean() > 0.99  # torch's resampling, not nnU-Net's spline: a few voxels differ

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(predictor, "segment_on_device", real_segment)
    monkeypatch.setattr(predictor, "resample_logits", out_of_memory)
    capsys.readouterr()
    assert np.array_equal(run("oom", True), cpu_path)
    err = capsys.readouterr().err
    assert err.count("out of GPU memory") == 1 and "nnU-Net resamples and writes this case on the CPU" in err
    assert isinstance(handed[-1], np.ndarray) and handed[-1].dtype == np.float16
    assert json.loads((tmp_path / "oom" / "fastkd_predict.json").read_text())["cases"] == 1


class Logits:
    """What the sliding window returns, recording where it is moved to."""

    def __init__(self):
        self.moved = []

    def to(self, *args, **kwargs):
        self.moved.append(args)
        return self


def test_one_models_logits_stay_on_the_device_for_its_segmentation(one_case, monkeypatch):
    """nnU-Net moves every fold's logits to the CPU (``.to('cpu')``, pinned here: the CPU path shows it);
    with the segmentation made on the device one model's logits are handed over where the sliding window
    left them, with nnU-Net's parameters loaded first."""
    import fastkd.predict.predictor as predictor

    model, _ = one_case
    for where, moved in (("device", []), ("cpu", [("cpu",)])):
        p, _ = predictor.build_predictor(model, resample=where, jit=False, progress=False)
        loaded = []
        monkeypatch.setattr(p.network, "load_state_dict", lambda sd, *a, **k: loaded.append(sd))
        out = Logits()
        monkeypatch.setattr(p, "predict_sliding_window_return_logits", lambda data: out)
        assert p.predict_logits_from_preprocessed_data(torch.zeros(1, 4, 4, 4)) is out
        assert out.moved == moved, where
        assert len(loaded) == 1 and loaded[0] is p.list_of_parameters[0]


def test_network_seconds_on_cuda_come_from_events_read_once_per_case(one_case, monkeypatch):
    """On CUDA each forward is timed by a pair of CUDA events, read after the case's last forward with one
    synchronisation (a synchronisation per forward would stall the GPU between tiles)."""
    import fastkd.predict.predictor as predictor

    class Event:
        clock, synchronized = 0.0, 0

        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            Event.clock += 0.25  # milliseconds, as torch's
            self.at = Event.clock

        def synchronize(self):
            Event.synchronized += 1

        def elapsed_time(self, end):
            return end.at - self.at

    model, _ = one_case
    p, _ = predictor.build_predictor(model, resample="cpu", jit=False, progress=False)
    monkeypatch.setattr(p, "device", torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: pytest.fail("synchronized the whole device"))
    for _ in range(3):  # three forwards of one case
        p._before_forward(None, ())
        p._after_forward(None, (), None)
    assert p.seconds_network == 0 and Event.synchronized == 0
    p._add_network_time()
    assert p.seconds_network == pytest.approx(3 * 0.25 / 1000) and Event.synchronized == 1
    p._add_network_time()  # nothing more to read
    assert p.seconds_network == pytest.approx(3 * 0.25 / 1000) and Event.synchronized == 1
