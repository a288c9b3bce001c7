"""fastkd predict: nnU-Net's predictor with tiles batched per forward, fold ensembles, the torch / onnx / trt
backends, the record written last.

The tests build a small model folder here (nnU-Net's network from full plans, random weights) and compare
with nnU-Net's own predictor in-process. Equality with stock ``nnUNetv2_predict_from_modelfolder`` on
trained students: tests/workflow/test_predict_parity.py.
"""

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fastkd.errors import FastkdError
from fastkd.nnunet import build_network

from fake_models import ARCH, RECORD_KEYS


def full_plans(spacing=(1.0, 1.0, 1.0), patch=(16, 24, 16)) -> dict:
    """Plans as nnU-Net's planner writes them (everything its preprocessing and export read)."""
    resampling = {"resampling_fn_data": "resample_data_or_seg_to_shape",
                  "resampling_fn_seg": "resample_data_or_seg_to_shape",
                  "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
                  "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
                  "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                         "force_separate_z": None}}
    return {"dataset_name": "Dataset900_FastkdDemo", "plans_name": "nnUNetPlans_fastkdR2",
            "original_median_spacing_after_transp": list(spacing), "original_median_shape_after_transp": [32, 40, 32],
            "image_reader_writer": "SimpleITKIO", "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
            "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
            "foreground_intensity_properties_per_channel": {"0": {"mean": 1.0, "std": 2.0, "median": 1.0, "min": -5.0,
                                                                  "max": 9.0, "percentile_00_5": -4.0,
                                                                  "percentile_99_5": 8.0}},
            "configurations": {"3d_fullres": {
                "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
                "batch_size": 2, "patch_size": list(patch), "median_image_size_in_voxels": [32, 40, 32],
                "spacing": list(spacing), "normalization_schemes": ["ZScoreNormalization"],
                "use_mask_for_norm": [False],
                **resampling, "batch_dice": False, "architecture": ARCH}}}


DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "organ": 1, "lesion": 2},
                "numTraining": 5, "file_ending": ".nii.gz"}


def write_model_folder(folder, plans, folds=(0, 1)):
    """A model folder as nnU-Net writes it; each fold its own random weights."""
    (folder).mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(plans))
    (folder / "dataset.json").write_text(json.dumps(DATASET_JSON))
    for fold in folds:
        (folder / f"fold_{fold}").mkdir()
        torch.manual_seed(fold)
        network, _, _ = build_network(plans, "3d_fullres", DATASET_JSON)
        torch.save({"network_weights": network.state_dict(), "init_args": {"configuration": "3d_fullres", "fold": fold},
                    "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1, 2)},
                   folder / f"fold_{fold}" / "checkpoint_final.pth")
    return folder




@pytest.fixture(autouse=True)
def trace_cache(tmp_path, monkeypatch):
    """Every test's own TorchScript cache (fastkd keeps traces in $FASTKD_CACHE)."""
    monkeypatch.setenv("FASTKD_CACHE", str(tmp_path / "fastkd_cache"))
    return tmp_path / "fastkd_cache" / "torchscript"


@pytest.fixture
def model(tmp_path):
    return write_model_folder(tmp_path / "nnUNetTrainer__nnUNetPlans_fastkdR2__3d_fullres", full_plans())


def _predictor(cls, m, mirroring=True, **kwargs):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    predictor = cls(tile_step_size=0.5, use_mirroring=mirroring, device=torch.device("cpu"), allow_tqdm=False, **kwargs)
    pm = PlansManager(m["plans"])
    predictor.manual_initialization(m["network"], pm, pm.get_configuration(m["configuration"]), m["parameters"],
                                    m["dataset_json"], "nnUNetTrainer", m["mirror_axes"])
    return predictor


class CountingNetwork(torch.nn.Module):
    """The network, recording the batch size of every forward."""

    def __init__(self, network):
        super().__init__()
        self.network, self.batches = network, []

    def forward(self, x):
        self.batches.append(x.shape[0])
        return self.network(x)


# -- fast: the sliding window ---------------------------------------------------------------------
@pytest.mark.parametrize("mirroring", [True, False])
def test_batched_tiles_give_nnunets_sliding_window_logits(model, mirroring):
    """Every tile batch gives nnU-Net's logits: tile_batch 1 is nnU-Net's own code (bit for bit); larger
    batches differ only by the float rounding of batched convolutions (in nnU-Net's fp16 accumulators)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from fastkd.predict.backends import load_model
    from fastkd.predict.predictor import FastkdPredictor

    m = load_model(model, "torch", (0,), "checkpoint_final.pth", torch.device("cpu"))
    data = torch.from_numpy(np.random.default_rng(0).standard_normal((1, 20, 30, 18)).astype(np.float32))
    stock = _predictor(nnUNetPredictor, m, mirroring).predict_sliding_window_return_logits(data)
    passes = 8 if mirroring else 1
    # 8 tiles of 8 passes: 3 splits a tile's passes between forwards, 10 000 takes all 64 in one
    for tile_batch in (1, 3, 10_000) if mirroring else (1, 2, 3, 8):
        counting = dict(m, network=CountingNetwork(m["network"]))
        ours = _predictor(FastkdPredictor, counting, mirroring, tile_batch=tile_batch)
        logits = ours.predict_sliding_window_return_logits(data)
        batches = counting["network"].batches
        assert logits.dtype == stock.dtype == torch.float16 and logits.shape == stock.shape == (3, 20, 30, 18)
        if tile_batch == 1:
            assert torch.equal(logits, stock) and set(batches) == {1}
        else:  # measured: at most one fp16 ulp, on < 1 % of the voxels
            torch.testing.assert_close(logits, stock, rtol=2 ** -9, atol=2 ** -12)
            assert max(batches) == min(tile_batch, sum(batches)) and all(b <= tile_batch for b in batches)
        assert sum(batches) == len(ours._internal_get_sliding_window_slicers(data.shape[1:])) * passes


def test_tile_batch_defaults_and_fixed_batch_models(model, tmp_path, capsys):
    """1 on the CPU, 8 on CUDA; a static-batch ONNX caps it at 1, with a line saying so and how to lift it
    whether the batch was asked for or the default, a dynamic-batch ONNX takes any; (wanted, used) both
    come back for the record; an ONNX network with batched tiles gives the torch network's logits."""
    from fastkd.export.onnx import export_onnx
    from fastkd.predict.backends import load_model
    from fastkd.predict.predictor import FastkdPredictor, resolve_tile_batch

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    torch_model = load_model(model, "torch", (0,), "checkpoint_final.pth", cpu)
    assert resolve_tile_batch(None, cpu, "torch", torch_model["network"]) == (1, 1)
    assert resolve_tile_batch(None, cuda, "torch", torch_model["network"]) == (8, 8)
    assert resolve_tile_batch(5, cpu, "torch", torch_model["network"]) == (5, 5)
    export_onnx(model, 0, tmp_path / "static.onnx")
    export_onnx(model, 0, tmp_path / "dynamic.onnx", batch=0)
    static = load_model(tmp_path / "static.onnx", "onnx", (0,), "", cpu)
    dynamic = load_model(tmp_path / "dynamic.onnx", "onnx", (0,), "", cpu)
    assert static["folds"] == [0] and static["parameters"] == [{}]
    capsys.readouterr()
    assert resolve_tile_batch(8, cpu, "onnx", static["network"]) == (8, 1)
    assert "takes batches of at most 1: --tile-batch 8 -> 1" in capsys.readouterr().err
    assert resolve_tile_batch(None, cuda, "onnx", static["network"]) == (8, 1)
    err = capsys.readouterr().err  # the default capped: said too, once, with the way out
    assert err.count("\n") == 1 and "the cuda default of 8 -> 1" in err and "fastkd export onnx --batch 0" in err
    assert resolve_tile_batch(None, cpu, "onnx", static["network"]) == (1, 1) and not capsys.readouterr().err
    assert resolve_tile_batch(8, cpu, "onnx", dynamic["network"]) == (8, 8)

    class Engine:
        max_batch = 4

    assert resolve_tile_batch(None, cuda, "trt", Engine()) == (8, 4)
    assert "fastkd export trt --max-batch 8" in capsys.readouterr().err
    assert resolve_tile_batch(3, cpu, "trt", object()) == (3, 1)  # an engine network that does not say: one at a time
    for bad in (0, -1, 2.5, True):
        with pytest.raises(FastkdError, match=f"--tile-batch {bad!r}"):
            resolve_tile_batch(bad, cpu, "torch", torch_model["network"])
    data = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 20, 30, 18)).astype(np.float32))
    reference = _predictor(FastkdPredictor, torch_model, tile_batch=1).predict_sliding_window_return_logits(data)
    got = _predictor(FastkdPredictor, dynamic, tile_batch=8).predict_sliding_window_return_logits(data)
    torch.testing.assert_close(got, reference, rtol=2 ** -9, atol=2 ** -12)


def test_fold_ensemble_equals_nnunets_predictor_with_the_same_folds(model):
    """-f 0 1: the folds' logits averaged, as nnU-Net's predictor loads and averages them itself."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    from fastkd.predict.backends import load_model
    from fastkd.predict.predictor import FastkdPredictor

    data = torch.from_numpy(np.random.default_rng(2).standard_normal((1, 20, 30, 18)).astype(np.float32))
    stock = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(model), (0, 1), "checkpoint_final.pth")
    expected = stock.predict_logits_from_preprocessed_data(data)
    m = load_model(model, "torch", (0, 1), "checkpoint_final.pth", torch.device("cpu"))
    assert m["folds"] == [0, 1] and len(m["parameters"]) == 2
    ours = _predictor(FastkdPredictor, m, mirroring=False)
    for _ in range(2):  # every case: the folds' own weights, whatever the last case left in the network
        assert torch.equal(ours.predict_logits_from_preprocessed_data(data), expected)
    one = _predictor(FastkdPredictor, load_model(model, "torch", (1,), "checkpoint_final.pth", torch.device("cpu")),
                     mirroring=False)
    assert not torch.equal(one.predict_logits_from_preprocessed_data(data), expected)  # the folds differ


def test_torchscript_network_gives_each_folds_logits(model):
    """--jit (the CPU default for torch): each fold's network traced and frozen once, then reused; the
    ensemble's logits equal eager nnU-Net's up to float rounding, case after case, and each fold's frozen
    network keeps that fold's weights (loading the next fold must not change it)."""
    from fastkd.predict.backends import load_model
    from fastkd.predict.backends.torch import FrozenNetwork
    from fastkd.predict.predictor import build_predictor, resolve_jit

    cpu = torch.device("cpu")
    assert resolve_jit(None, cpu, "torch") and not resolve_jit(None, torch.device("cuda"), "torch")
    assert not resolve_jit(None, cpu, "onnx") and not resolve_jit(False, cpu, "torch")
    for backend, device in (("onnx", cpu), ("torch", torch.device("cuda"))):
        with pytest.raises(FastkdError, match=f"--jit: .* not {backend} on {device.type}"):
            resolve_jit(True, device, backend)
    data = torch.from_numpy(np.random.default_rng(3).standard_normal((1, 20, 30, 18)).astype(np.float32))
    eager, settings = build_predictor(model, folds=(0, 1), mirroring=True, jit=False, progress=False)
    frozen, frozen_settings = build_predictor(model, folds=(0, 1), mirroring=True, progress=False)
    assert not settings["jit"] and frozen_settings["jit"] and isinstance(frozen.network, FrozenNetwork)
    expected = eager.predict_logits_from_preprocessed_data(data)
    for _ in range(2):  # the second case reuses the frozen networks
        got = frozen.predict_logits_from_preprocessed_data(data)
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-3)
    assert len(frozen.network._frozen) == 2  # one per fold, ready before the first case
    m = load_model(model, "torch", (0, 1), "checkpoint_final.pth", cpu)
    net = FrozenNetwork(m["network"], m["parameters"], m["trace_keys"], (1, 1, 16, 24, 16))
    x = data[None, :, :16, :24, :16]
    outputs = []
    for params in m["parameters"]:
        net.load_state_dict(params)
        outputs.append(net(x))
    net.load_state_dict(m["parameters"][0])
    torch.testing.assert_close(net(x), outputs[0])
    assert (outputs[0] - outputs[1]).abs().max() > 1e-2  # the folds differ


def test_resampling_on_the_device_matches_nnunets_export(tmp_path):
    """The CUDA path's resampling (nnU-Net's torch resampling of the logits, then nnU-Net's export finding
    nothing left to resample), run here on CPU tensors: the shape and the labels of nnU-Net's own export."""
    import SimpleITK as sitk
    from nnunetv2.inference.export_prediction import (
        convert_predicted_logits_to_segmentation_with_correct_shape,
    )
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from fastkd.demo import make_demo_dataset
    from fastkd.predict.predictor import resample_logits

    raw = tmp_path / "Dataset901_Aniso"
    make_demo_dataset(raw, n_cases=5, n_test=0, anisotropic=True)
    image = raw / "imagesTr" / "demo_000_0000.nii.gz"
    plans = full_plans(spacing=(2.0, 1.25, 1.25))  # (z, y, x) as nnU-Net reads it: 3 x 1 x 1 mm -> 2 x 1.25 x 1.25
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")
    data, _, properties = cm.preprocessor_class(verbose=False).run_case([str(image)], None, pm, cm, DATASET_JSON)
    assert properties["spacing"] == [3.0, 1.0, 1.0]
    assert data.shape[1:] != tuple(properties["shape_after_cropping_and_before_resampling"])  # resampled
    # smooth logits with real structure: the image itself, shifted per class
    x = torch.from_numpy(data[0]).float()
    logits = torch.stack([torch.zeros_like(x), x - 0.5, -x - 0.5])
    resampled = resample_logits(logits, properties, pm, cm, torch.device("cpu"))
    assert tuple(resampled.shape[1:]) == tuple(properties["shape_after_cropping_and_before_resampling"])
    lm = pm.get_label_manager(DATASET_JSON)
    ours = convert_predicted_logits_to_segmentation_with_correct_shape(resampled.numpy(), pm, cm, lm, properties)
    stock = convert_predicted_logits_to_segmentation_with_correct_shape(logits.numpy(), pm, cm, lm, properties)
    assert ours.shape == stock.shape == sitk.GetArrayFromImage(sitk.ReadImage(str(image))).shape
    assert len(np.unique(stock)) == 3 and (ours == stock).mean() >= 0.99, (ours == stock).mean()


# -- fast: the whole run ----------------------------------------------------------------------------
@pytest.mark.parametrize("in_process", [True, False])
def test_predict_writes_stock_output_and_its_record_last(model, tmp_path, monkeypatch, in_process):
    """A whole run on two demo cases, in this process (the default for so few) and with nnU-Net's worker
    pools: nnU-Net's files, the same labels and geometry as stock nnU-Net (its sequential predictor on the
    same folds), and the record, with exactly its keys: start-up and network seconds within the total."""
    import SimpleITK as sitk
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    import fastkd.predict.predictor as predictor
    from fastkd.demo import make_demo_dataset

    raw = tmp_path / "Dataset900_FastkdDemo"
    make_demo_dataset(raw, n_cases=5, n_test=0)
    images = tmp_path / "images"
    images.mkdir()
    for case in ("demo_000", "demo_003"):
        shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", images)
    out = tmp_path / "out"
    out.mkdir()
    (out / predictor.RECORD).write_text("{}")  # a stale record of an earlier run goes first
    if not in_process:
        monkeypatch.setattr(predictor, "IN_PROCESS_CASES", 1)
    record = predictor.predict(images, out, model, folds=[0, 1], mirroring=False, step_size=0.75, num_processes=1,
                               progress=False, jit=False)  # eager: bit for bit nnU-Net's (TorchScript: the jit test)
    assert set(record) == RECORD_KEYS and json.loads((out / predictor.RECORD).read_text()) == record
    assert (record["model"], record["backend"], record["folds"], record["device"], record["mirroring"],
            record["step_size"], record["tile_batch_wanted"], record["tile_batch"], record["jit"], record["cases"],
            record["in_process"], record["resample"]) == (str(model), "torch", [0, 1], "cpu", False, 0.75, 1, 1, False,
                                                          2, in_process, "cpu")
    assert record["seconds_per_case"] == pytest.approx(record["seconds_total"] / 2)
    assert record["seconds_network_per_case"] == pytest.approx(record["seconds_network"] / 2)
    assert 0 < record["seconds_startup"] < record["seconds_total"]
    assert 0 < record["seconds_network"] < record["seconds_total"] - record["seconds_startup"]
    assert (out / predictor.RECORD).stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in out.glob("*.nii.gz"))
    assert {"plans.json", "dataset.json", "predict_from_raw_data_args.json"} <= {p.name for p in out.iterdir()}

    stock = nnUNetPredictor(tile_step_size=0.75, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    stock.initialize_from_trained_model_folder(str(model), (0, 1), "checkpoint_final.pth")
    (tmp_path / "stock").mkdir()
    stock.predict_from_files_sequential(str(images), str(tmp_path / "stock"))
    for case in ("demo_000", "demo_003"):
        a, b = (sitk.ReadImage(str(folder / f"{case}.nii.gz")) for folder in (out, tmp_path / "stock"))
        assert np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
        assert (a.GetSpacing(), a.GetOrigin(), a.GetDirection()) == (b.GetSpacing(), b.GetOrigin(), b.GetDirection())


def test_traces_are_cached_per_checkpoint_torch_and_shape(model, trace_cache, monkeypatch, capsys):
    """A fold's TorchScript trace is written once (atomically, no temporary left) and read back by the
    next run instead of tracing again, with the same logits; a file whose stored key differs (another
    checkpoint, torch version or input shape) is traced again and replaced; an unwritable cache is said
    once and the run goes on."""
    from fastkd.predict.backends import load_model
    from fastkd.predict.backends import torch as torch_backend
    from fastkd.predict.backends.torch import TRACE_KEY_FILE, FrozenNetwork

    m = load_model(model, "torch", (0, 1), "checkpoint_final.pth", torch.device("cpu"))
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((1, 1, 16, 24, 16)).astype(np.float32))
    traced = []
    real_trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: traced.append(1) or real_trace(*a, **k))

    def outputs(shape=(1, 1, 16, 24, 16)):
        net = FrozenNetwork(m["network"], m["parameters"], m["trace_keys"], shape)
        result = []
        for params in m["parameters"]:
            net.load_state_dict(params)
            result.append(net(x))
        return result

    first = outputs()
    files = sorted(trace_cache.iterdir())
    assert len(traced) == 2 and len(files) == 2 and all(f.suffix == ".pt" for f in files)
    second = outputs()
    assert len(traced) == 2 and all(torch.equal(a, b) for a, b in zip(first, second))  # read, not traced
    assert (first[0] - first[1]).abs().max() > 1e-2  # each fold its own weights
    outputs((2, 1, 16, 24, 16))  # another input shape: another key
    assert len(traced) == 4 and len(list(trace_cache.iterdir())) == 4
    # a file whose key is not this one's (as if written by another torch): traced again, and replaced
    extra = {TRACE_KEY_FILE: ""}
    module = torch.jit.load(str(files[0]), _extra_files=extra)
    key = json.loads(extra[TRACE_KEY_FILE])
    torch.jit.save(module, str(files[0]), _extra_files={TRACE_KEY_FILE: json.dumps({**key, "torch": "0.0"})})
    assert all(torch.equal(a, b) for a, b in zip(outputs(), first)) and len(traced) == 5
    torch.jit.load(str(files[0]), _extra_files=extra)
    assert json.loads(extra[TRACE_KEY_FILE]) == key
    # a key names everything a trace depends on
    assert set(key) == {"format", "checkpoint_sha256", "architecture_sha256", "torch", "input_shape"}
    assert key["torch"] == torch.__version__ and key["input_shape"] == [1, 1, 16, 24, 16]
    assert m["trace_keys"][0]["checkpoint_sha256"] != m["trace_keys"][1]["checkpoint_sha256"]
    monkeypatch.setattr(torch_backend, "cache_dir", lambda: Path("/proc/fastkd_no_such_cache"))
    capsys.readouterr()
    assert all(torch.equal(a, b) for a, b in zip(outputs(), first))
    assert capsys.readouterr().err.count("cannot keep the TorchScript trace in /proc/fastkd_no_such_cache") == 2


# -- fast: errors -----------------------------------------------------------------------------------
def test_errors_name_the_value(model, tmp_path):
    from fastkd.export.onnx import export_onnx
    from fastkd.predict.predictor import predict

    images = tmp_path / "images"
    images.mkdir()
    export_onnx(model, 0, tmp_path / "s.onnx")
    engine = tmp_path / "s.engine"
    engine.write_bytes(b"")
    for kwargs, message in [
        ({"backend": "tensorflow"}, "--backend 'tensorflow': must be one of torch, onnx, trt"),
        ({"backend": "onnx"}, f"-m {model}: the onnx backend takes a .onnx file"),
        ({"folds": [0, 3]}, "fold_3/checkpoint_final.pth does not exist"),
        ({"folds": [0, 7]}, "-f 0 7: folds are distinct values of 0-4 or 'all'"),
        ({"folds": [1, 1]}, "-f 1 1: folds are distinct"),
        ({"step_size": 1.5}, "step_size = 1.5"),
        ({"step_size": 0}, "step_size = 0"),
        ({"tile_batch": 0}, "--tile-batch 0"),
        ({"resample": "gpu"}, "--resample 'gpu': valid values are device, cpu"),
        ({"checkpoint": "checkpoint_best.pth"}, "fold_0/checkpoint_best.pth does not exist"),
    ]:
        with pytest.raises(FastkdError) as e:
            predict(images, tmp_path / "out", model, **kwargs)
        assert message in str(e.value), (kwargs, str(e.value))
    for path, kwargs, message in [
        (tmp_path / "s.onnx", {"folds": [0, 1]}, "-f 0 1: an onnx model holds one fold"),
        (tmp_path / "s.onnx", {"backend": "torch"}, "the torch backend takes a model folder"),
        (model, {"backend": "trt"}, "the trt backend takes a TensorRT engine file"),
        (tmp_path / "s.onnx", {}, f"-i {images}: no images named <case>_0000.nii.gz"),
        (model, {}, f"-i {images}: no images named <case>_0000.nii.gz"),
    ]:
        with pytest.raises(FastkdError) as e:
            predict(images, tmp_path / "out", path, **kwargs)
        assert message in str(e.value), (path, kwargs, str(e.value))
    with pytest.raises(FastkdError, match="-i .*nope: not a folder of images"):
        predict(tmp_path / "nope", tmp_path / "out", model)
    assert not (tmp_path / "out").exists()


def test_trt_backend_loads_engines_lazily(model, tmp_path, monkeypatch):
    """``.engine``/``.plan`` pick the trt backend, which hands the engine to load_engine_model without
    importing TensorRT itself (load_engine_model imports it only to run the engine)."""
    from fastkd.predict import backends
    from fastkd.predict.backends import tensorrt as trt_backend

    assert [backends.default_backend(p) for p in ("a.onnx", "a.engine", "a.plan", model)] == \
        ["onnx", "trt", "trt", "torch"]
    engine = tmp_path / "s.engine"
    engine.write_bytes(b"")
    seen = {}

    def load_engine_model(path, device):
        seen["args"] = (path, device)
        return {"network": "engine network"}

    monkeypatch.setattr(trt_backend, "load_engine_model", load_engine_model)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` raises ImportError
    assert backends.load_model(engine, "trt", (0,), "", torch.device("cpu")) == {"network": "engine network"}
    assert seen["args"] == (engine, torch.device("cpu"))


def test_the_backend_table_is_what_the_cli_offers(model):
    """fastkd predict --backend offers exactly the backends of the table, each a module with the backend
    interface; an unknown name is refused with the valid ones listed."""
    import importlib

    from fastkd.cli import build_parser
    from fastkd.predict.backends import BACKENDS, load_model

    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    backend, = [a for a in predict._actions if "--backend" in a.option_strings]
    assert list(backend.choices) == list(BACKENDS) == ["torch", "onnx", "trt"]
    for name, module in BACKENDS.items():
        module = importlib.import_module(module)
        assert callable(module.load) and isinstance(module.SUFFIXES, tuple) and isinstance(module.ENSEMBLE, bool), name
    with pytest.raises(FastkdError, match="^--backend 'tflite': must be one of torch, onnx, trt$"):
        load_model(model, "tflite", (0,), "checkpoint_final.pth", torch.device("cpu"))


def test_cli_flags_reach_predict(monkeypatch, tmp_path, capsys):
    """The flags the evaluation rule passes: -f 0 1 2 3 4 --disable-mirroring --step-size --device --threads,
    and --tile-batch, --backend trt."""
    import fastkd.predict.predictor
    from fastkd.cli import main

    calls = []

    def fake_predict(*args, **kwargs):
        calls.append((args, kwargs))
        return {"cases": 3, "backend": kwargs["backend"] or "torch", "folds": kwargs["folds"], "seconds_per_case": 0.5,
                "seconds_network_per_case": 0.125, "seconds_startup": 2.5, "tile_batch": kwargs["tile_batch"] or 1}

    monkeypatch.setattr(fastkd.predict.predictor, "predict", fake_predict)
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    assert main(["predict", "-i", "IN", "-o", str(tmp_path), "-m", "M", "-f", "0", "1", "2", "3", "4",
                 "--disable-mirroring", "--step-size", "0.7", "--device", "cpu", "--threads", "3"]) == 0
    (args, kwargs), = calls
    assert [str(a) for a in args] == ["IN", str(tmp_path), "M"]
    started = kwargs.pop("started")  # the CLI's clock, started before it imports torch and nnU-Net
    assert isinstance(started, float) and started <= time.perf_counter()
    assert kwargs == {"backend": None, "folds": [0, 1, 2, 3, 4], "checkpoint": "checkpoint_final.pth", "device": "cpu",
                      "mirroring": False, "step_size": 0.7, "save_probabilities": False, "num_processes": 3,
                      "tile_batch": None, "jit": None, "resample": None}
    assert "3 segmentations in" in capsys.readouterr().out
    main(["predict", "-i", "IN", "-o", "OUT", "-m", "M"])
    assert "0.50 s per case of which 0.12 s network, 2.50 s start-up" in capsys.readouterr().out
    assert main(["predict", "-i", "IN", "-o", "OUT", "-m", "M.engine", "--backend", "trt", "-f", "all",
                 "--tile-batch", "4"]) == 0
    assert calls[-1][1]["backend"] == "trt" and calls[-1][1]["folds"] == ["all"] and calls[-1][1]["tile_batch"] == 4
    assert main(["predict", "-i", "IN", "-o", "OUT", "-m", "M", "--no-jit"]) == 0 and calls[-1][1]["jit"] is False
    assert main(["predict", "-i", "IN", "-o", "OUT", "-m", "M", "--jit"]) == 0 and calls[-1][1]["jit"] is True
    for where in ("device", "cpu"):
        assert main(["predict", "-i", "IN", "-o", "OUT", "-m", "M", "--resample", where]) == 0
        assert calls[-1][1]["resample"] == where
    for argv in (["-f", "5"], ["--tile-batch", "0"], ["--backend", "tf"], ["--step-size", "2"], ["--resample", "gpu"]):
        with pytest.raises(SystemExit):
            main(["predict", "-i", "IN", "-o", "OUT", "-m", "M", *argv])
