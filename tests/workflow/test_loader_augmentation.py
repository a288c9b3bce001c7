"""fastkd.student.loader.KDDataLoader under nnU-Net's real augmentation, with a cache we know the answer for.

The cache holds the one-hot of each demo case's own preprocessed segmentation (uint8, exact 0 / 255),
so after any augmentation the argmax of ``dense(batch)`` must be the augmented segmentation
``batch["target"]`` that nnU-Net computes from the same sample: if the soft labels missed a rotation,
scaling, mirror or crop, or were read from another box or case, they stop agreeing.

Data: the ``trained`` fixture (conftest.py; shared) for nnU-Net's preprocessed demo (3d_fullres, 5 cases).
"""

import os
from pathlib import Path
from types import SimpleNamespace

import blosc2
import numpy as np
import pytest
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from threadpoolctl import threadpool_limits

from fastkd import cache
from fastkd.cache import CacheError, SoftLabelCache
from fastkd.student.loader import KDDataLoader, collate, finish_softlabels
from fastkd.student.loss import SoftLabels

torch.set_num_threads(1)

DS = "Dataset900_FastkdDemo"
CHANNELS = ["background", "organ", "lesion"]


# -- the one-hot cache and nnU-Net's objects -------------------------------------------------------
def provenance(patch_size) -> dict:
    return {"format_version": cache.FORMAT_VERSION, "temperature": 1.0, "activation": "softmax", "ensemble": "one-hot",
            "channels": CHANNELS, "labels": {"background": 0, "organ": 1, "lesion": 2}, "regions": False,
            "teachers": [], "dataset_name": DS, "plans_name": "nnUNetPlans", "configuration": "3d_fullres",
            "data_identifier": "nnUNetPlans_3d_fullres", "spacing": [1.0, 1.0, 1.0], "transpose_forward": [0, 1, 2],
            "patch_size": list(patch_size), "dtype": "uint8", "scale": cache.DTYPES["uint8"], "step_size": 0.5,
            "mirroring": False, "mirror_axes": [], "gaussian": True}


def one_hot(seg: np.ndarray) -> np.ndarray:
    """(1, x, y, z) nnU-Net seg (-1 outside the nonzero mask = background, as RemoveLabelTansform does) -> (C, ...)."""
    seg = np.maximum(seg[0], 0)
    return (seg[None] == np.arange(len(CHANNELS)).reshape(-1, 1, 1, 1)).astype(np.float32)


def write_store(store: Path, folder: Path, cases, patch_size) -> Path:
    shapes = {}
    for case in cases:
        probs = one_hot(blosc2.open(str(folder / f"{case}_seg.b2nd"), mode="r")[:])
        cache.write_case(store, case, probs, provenance(patch_size))
        shapes[case] = list(probs.shape)
    cache.finalize(store, shapes, folder)
    return store


def make_demo(dataset_folder: Path, tmp: Path) -> SimpleNamespace:
    folder = dataset_folder / "nnUNetPlans_3d_fullres"
    plans = PlansManager(str(dataset_folder / "nnUNetPlans.json"))
    cm = plans.get_configuration("3d_fullres")
    lm = plans.get_label_manager({"labels": {"background": 0, "organ": 1, "lesion": 2}})
    cases = sorted(p.name[:-len("_seg.b2nd")] for p in folder.glob("*_seg.b2nd"))
    store = write_store(tmp / "onehot.zarr", folder, cases, cm.patch_size)
    return SimpleNamespace(folder=folder, plans=plans, cm=cm, lm=lm, cases=cases, store=store)


@pytest.fixture(scope="module")
def demo(trained, tmp_path_factory):
    return make_demo(trained / "nnUNet_preprocessed" / DS, tmp_path_factory.mktemp("onehot"))


def trainer_settings(trainer_class, cm):
    """What ``trainer_class.get_dataloaders`` computes from the plans, by the trainer's own methods (on a bare
    instance: only these two methods run): (rotation, dummy 2d, initial patch size, mirror axes), DS scales."""
    trainer = object.__new__(trainer_class)
    trainer.configuration_manager = cm
    trainer.enable_deep_supervision = True
    trainer.print_to_log_file = lambda *args, **kwargs: None
    return trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size(), trainer._get_deep_supervision_scales()


def training_transforms(trainer_class, demo, cm=None):
    """(transforms, initial patch size, patch size) exactly as ``trainer_class.get_dataloaders`` builds them."""
    cm = cm or demo.cm
    (rotation, dummy_2d, initial_patch_size, mirror_axes), ds_scales = trainer_settings(trainer_class, cm)
    transforms = trainer_class.get_training_transforms(
        cm.patch_size, rotation, ds_scales, mirror_axes, dummy_2d, use_mask_for_norm=cm.use_mask_for_norm,
        is_cascaded=False, foreground_labels=demo.lm.foreground_labels, regions=None,
        ignore_label=demo.lm.ignore_label)
    return transforms, initial_patch_size, cm.patch_size


class RecordingLoader(KDDataLoader):
    """KDDataLoader that also keeps each sample's (case, box), to compare with an unaugmented crop."""

    def get_indices(self):
        self.samples = []
        return super().get_indices()

    def get_bbox(self, *args, **kwargs):
        bbox = super().get_bbox(*args, **kwargs)
        self.samples.append(self.pending[-1])  # (case key, box), as the transforms will read it
        return bbox


def loader(demo, transforms, patch_size, final_patch_size, cls=KDDataLoader, identifiers=None, store=None,
           batch_size=2):
    dataset = nnUNetDatasetBlosc2(str(demo.folder), identifiers=identifiers)
    return cls(dataset, batch_size, patch_size, final_patch_size, demo.lm, oversample_foreground_percent=0.33,
               sampling_probabilities=None, pad_sides=None, transforms=transforms, probabilistic_oversampling=False,
               cache_path=store or demo.store)


def seed(value=0):
    np.random.seed(value)
    torch.manual_seed(value)


def dense(batch) -> torch.Tensor:
    """The batch's soft labels as the trainer uses them: float32 (B, C, *patch) (KDDataLoader ships the
    present classes in float16)."""
    assert batch["softlabels"].dtype == torch.float16
    return SoftLabels(batch["softlabels"], batch["softlabel_classes"], len(CHANNELS)).dense()


def check_softlabels(soft, batch_size, patch_size):
    assert soft.dtype == torch.float32 and soft.shape == (batch_size, len(CHANNELS), *patch_size)
    assert torch.isfinite(soft).all()
    assert soft.min() >= 0 and soft.max() <= 1
    assert (soft.sum(1) - 1).abs().max() <= 1e-3  # float16 in the batch


def centre_crop(volume: torch.Tensor, patch_size) -> torch.Tensor:
    """The crop SpatialTransform takes when it neither rotates nor scales (centre floor(s / 2))."""
    lo = [s // 2 - p // 2 for s, p in zip(volume.shape[1:], patch_size)]
    return volume[(slice(None), *(slice(a, a + p) for a, p in zip(lo, patch_size)))]


# -- 1 + 2: the real pipelines ---------------------------------------------------------------------
@pytest.mark.smoke
@pytest.mark.parametrize("trainer_class", [nnUNetTrainer, nnUNetTrainerDA5], ids=["default", "DA5"])
def test_softlabels_follow_the_segmentation_through_nnunet_augmentation(demo, trainer_class):
    transforms, initial, patch = training_transforms(trainer_class, demo)
    assert all(i > p for i, p in zip(initial, patch))  # crops larger than the volume: padding is exercised
    spatial = next(t for t in transforms.transforms if isinstance(t, SpatialTransform))
    warped = []
    get_parameters = spatial.get_parameters

    def recording(**data):
        params = get_parameters(**data)
        warped.append(params["grid"] is not None)
        return params

    spatial.get_parameters = recording
    dl = loader(demo, transforms, initial, patch, cls=RecordingLoader)
    reader = SoftLabelCache(demo.store)
    seed(1)
    agree = total = 0
    moved = []  # per sample: share of voxels where an unaugmented centre crop of the cache disagrees with the target
    fg_agree = fg_total = 0
    for _ in range(8):
        batch = next(dl)
        soft, target = dense(batch), batch["target"]
        assert isinstance(target, list) and len(target) > 1  # deep supervision from the plans
        target = target[0][:, 0].long()
        check_softlabels(soft, 2, patch)
        hard = soft.argmax(1)
        agree += (hard == target).sum().item()
        total += target.numel()
        fg = target > 0
        fg_agree += (hard[fg] == target[fg]).sum().item()
        fg_total += fg.sum().item()
        for j, (case, box) in enumerate(dl.samples):
            plain = centre_crop(finish_softlabels(torch.from_numpy(reader.read_crop(case, box)[:-1]), True), patch)
            plain = plain.argmax(0)
            moved.append((plain != target[j]).float().mean().item())
    fraction, fg_fraction = agree / total, fg_agree / fg_total
    print(f"{trainer_class.__name__}: argmax(softlabels) == target on {fraction:.6f} of {total} voxels "
          f"({fg_fraction:.5f} of {fg_total} foreground voxels); {sum(warped)} of {len(warped)} samples rotated/scaled, "
          f"{sum(m > 0.01 for m in moved)} moved (rotated, scaled or mirrored)")
    assert fraction >= 0.999
    assert fg_fraction >= 0.99
    assert sum(warped) >= 3 and sum(m > 0.01 for m in moved) >= 8  # the augmentation really moved the labels
    assert len(warped) == len(moved) == 16


# -- 3: padding ------------------------------------------------------------------------------------
@pytest.mark.smoke
def test_padding_outside_the_volume_is_background(demo):
    transforms, initial, patch = training_transforms(nnUNetTrainer, demo)
    seed(2)
    batch = next(loader(demo, None, initial, patch))  # no augmentation: the raw crops of the initial patch size
    soft, seg = dense(batch), batch["target"][:, 0]
    check_softlabels(soft, 2, initial)
    outside = seg == -1  # nnU-Net pads the segmentation with -1 (the demo has no -1 inside the volume)
    assert outside.float().mean() > 0.2
    assert (soft[:, 0][outside] == 1).all() and (soft[:, 1:].sum(1)[outside] == 0).all()
    inside = ~outside
    assert torch.equal(soft.argmax(1)[inside], seg[inside].long())
    assert set(torch.unique(soft).tolist()) == {0.0, 1.0}

    # zoomed out by SpatialTransform: the patch sees beyond the crop, where the seg is padded with -1
    zoom = ComposeTransforms([SpatialTransform(patch, 0, False, p_scaling=1, scaling=(1.4, 1.4),
                                               border_mode_seg="constant", padding_value_seg=-1)])
    seed(3)
    batch = next(loader(demo, zoom, initial, patch))
    soft, seg = dense(batch), batch["target"][:, 0]
    check_softlabels(soft, 2, patch)
    outside = seg == -1
    assert outside.any()
    assert (soft.argmax(1)[outside] == 0).all() and (soft[:, 0][outside] > 0.5).all()


# -- 4: intensity-only transforms ------------------------------------------------------------------
@pytest.mark.smoke
def test_intensity_transforms_leave_softlabels_alone(demo):
    intensity = ComposeTransforms([
        GaussianNoiseTransform(noise_variance=(0.1, 0.1), p_per_channel=1, synchronize_channels=True),
        MultiplicativeBrightnessTransform(multiplier_range=BGContrast((0.75, 1.25)), synchronize_channels=False,
                                          p_per_channel=1),
        ContrastTransform(contrast_range=BGContrast((0.75, 1.25)), preserve_range=True, synchronize_channels=False,
                          p_per_channel=1),
        GammaTransform(gamma=BGContrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
                       p_retain_stats=1),
    ])
    patch = [24, 24, 24]
    reader = SoftLabelCache(demo.store)
    for transforms in (None, intensity):
        dl = loader(demo, transforms, patch, patch, cls=RecordingLoader)
        seed(4)
        batch = next(dl)
        for j, (case, box) in enumerate(dl.samples):
            expected = finish_softlabels(torch.from_numpy(reader.read_crop(case, box)[:-1]), True)
            assert torch.equal(dense(batch)[j], expected)  # exactly the cache crop (+ padding = background)
            seg = batch["target"][j, 0]
            assert torch.equal(dense(batch)[j].argmax(0)[seg >= 0], seg[seg >= 0].long())
        if transforms is None:
            raw = batch["data"]
        else:
            assert (batch["data"] - raw).abs().max() > 0.1  # the image was changed, the soft labels were not


# -- 5: 2-D patches on 3-D data --------------------------------------------------------------------
@pytest.mark.smoke
def test_2d_patches_on_3d_data(demo):
    cm2d = demo.plans.get_configuration("2d")
    transforms, initial, patch = training_transforms(nnUNetTrainer, demo, cm2d)
    assert len(patch) == 2
    dl = loader(demo, transforms, initial, patch)
    assert dl.patch_size_was_2d
    seed(5)
    agree = total = 0
    for _ in range(4):
        batch = next(dl)
        soft, target = dense(batch), batch["target"][0][:, 0].long()
        check_softlabels(soft, 2, patch)
        agree += (soft.argmax(1) == target).sum().item()
        total += target.numel()
    print(f"2d: argmax(softlabels) == target on {agree / total:.6f} of {total} pixels")
    assert agree / total >= 0.999


# -- 6: finish_softlabels --------------------------------------------------------------------------
def test_finish_softlabels_fills_padding_for_softmax_only_and_clamps():
    # voxel 0 half outside the volume (sum 0.5), voxel 1 outside, voxel 2 inside with overshoot
    probs = torch.tensor([[0.2, 0.0, 1.0 + 1e-7], [0.3, 0.0, -1e-7], [0.0, 0.0, 0.0]])[:, :, None, None]
    before = probs.clone()
    out = finish_softlabels(probs, softmax=True)
    assert out.shape == (3, 3, 1, 1) and torch.equal(probs, before)  # the input is not modified
    torch.testing.assert_close(out[:, :, 0, 0], torch.tensor([[0.7, 1.0, 1.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.sum(0), torch.ones(3, 1, 1))
    regions = finish_softlabels(probs, softmax=False)
    torch.testing.assert_close(regions[:, :, 0, 0], torch.tensor([[0.2, 0.0, 1.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert regions.min() >= 0 and regions.max() <= 1


# -- 7: nnU-Net's multi-process augmenter ----------------------------------------------------------
class PidLoader(KDDataLoader):
    def generate_train_batch(self):
        batch = super().generate_train_batch()
        batch["pids"] = (os.getpid(), self._cache_pid)
        return batch


@pytest.mark.smoke
def test_loader_in_nnunet_background_workers(demo):
    transforms, initial, patch = training_transforms(nnUNetTrainer, demo)
    dl = loader(demo, transforms, initial, patch, cls=PidLoader)
    dl.cache  # opened in this process before the fork: each worker must open its own
    augmenter = NonDetMultiThreadedAugmenter(data_loader=dl, transform=None, num_processes=2, num_cached=2,
                                             seeds=None, pin_memory=False, wait_time=0.002)
    try:
        pids = set()
        for _ in range(8):
            batch = next(augmenter)
            check_softlabels(dense(batch), 2, patch)
            assert (dense(batch).argmax(1) == batch["target"][0][:, 0]).float().mean() >= 0.99
            worker, reader = batch["pids"]
            assert worker == reader != os.getpid()
            pids.add(worker)
        assert len(pids) == 2, pids  # both workers served batches, each from the reader it opened itself
    finally:
        augmenter._finish()


# -- 8: a case the cache lacks ---------------------------------------------------------------------
@pytest.mark.smoke
def test_case_missing_from_the_cache_names_the_case(demo, tmp_path):
    present, missing = demo.cases[0], demo.cases[1]
    store = write_store(tmp_path / "partial.zarr", demo.folder, [present], demo.cm.patch_size)
    transforms, initial, patch = training_transforms(nnUNetTrainer, demo)
    dl = loader(demo, transforms, initial, patch, identifiers=[missing], store=store)
    with pytest.raises(CacheError, match=f"case .*{missing}.* is not in the soft-label cache"):
        next(dl)
    assert next(loader(demo, transforms, initial, patch, identifiers=[present], store=store))["softlabels"].shape[0] == 2



# -- 9: many classes: only the classes present in a crop travel, exactly ---------------------------
def many_classes(seg: np.ndarray, n: int) -> np.ndarray:
    """Soft labels of n classes for a demo case: foreground split into n - 1 bands along x, each a
    class, one-hot blurred (sigma 1 voxel, so a class is zero away from its band) and renormalised."""
    from scipy import ndimage

    label = np.maximum(seg[0], 0)
    band = 1 + np.arange(label.shape[0])[:, None, None] * (n - 1) // label.shape[0]
    classes = np.where(label > 0, band, 0)
    probs = np.stack([ndimage.gaussian_filter((classes == c).astype(np.float32), 1.0, truncate=2.0)
                      for c in range(n)])
    return probs / probs.sum(0, keepdims=True)


@pytest.mark.parametrize("has_rest", [False, True])
def test_a_batch_carries_each_samples_own_classes_not_their_union(has_rest):
    """Two crops with disjoint classes: K is the larger crop's count (3), not the union's (5); each row is
    that sample's classes padded with classes it does not carry, at its value for them (0 or its rest),
    so the dense soft labels are each sample's own."""
    g = torch.Generator().manual_seed(0)
    n, spatial = 9, (2, 3, 4)
    crops = [np.array([0, 4, 7]), np.array([2, 5])]
    samples, expected = [], []
    for classes in crops:
        k = len(classes)
        values = torch.rand((k + has_rest, *spatial), generator=g) * 0.1
        dense = (values[k:] if has_rest else torch.zeros((1, *spatial))).expand(n, *spatial).clone()
        dense[torch.from_numpy(classes)] = values[:k]
        samples.append((values, classes))
        expected.append(dense)
    soft, rows = collate(samples, has_rest)
    assert soft.dtype == torch.float16 and soft.shape == (2, 3 + has_rest, *spatial)
    assert rows.dtype == torch.int64 and rows.tolist() == [[0, 4, 7], [0, 2, 5]]  # sample 1 padded with class 0
    got = SoftLabels(soft, rows, n).dense()
    for b in range(2):
        torch.testing.assert_close(got[b], expected[b].half().float())


@pytest.mark.smoke
@pytest.mark.parametrize("top_k", [None, 3])
def test_only_present_classes_travel_and_expand_to_what_all_classes_give(demo, tmp_path, top_k):
    n = 20
    names = ["background", *[f"organ{i}" for i in range(1, n)]]
    prov = {**provenance(demo.cm.patch_size), "channels": names, "labels": {c: i for i, c in enumerate(names)},
            **({"top_k": top_k} if top_k else {})}
    store, shapes = tmp_path / "many.zarr", {}
    for case in demo.cases:
        probs = many_classes(blosc2.open(str(demo.folder / f"{case}_seg.b2nd"), mode="r")[:], n)
        cache.write_case(store, case, probs, prov)
        shapes[case] = list(probs.shape)
    cache.finalize(store, shapes, demo.folder)
    patch = [24, 24, 24]
    # a deterministic spatial transform (fixed rotation and scale, centre crop): the same on every call
    spatial = ComposeTransforms([SpatialTransform(patch, 0, False, p_rotation=1, rotation=(0.4, 0.4), p_scaling=1,
                                                  scaling=(0.85, 0.85), p_elastic_deform=0)])
    dl = loader(demo, spatial, [40, 40, 40], patch, cls=RecordingLoader, store=store)
    reader = SoftLabelCache(store)
    seed(6)
    carried = []
    for _ in range(3):
        batch = next(dl)
        got = SoftLabels(batch["softlabels"], batch["softlabel_classes"], n).dense()
        assert batch["softlabels"].dtype == torch.float16
        carried.append(batch["softlabels"].shape[1])
        check = got.sum(1)
        assert (check - 1).abs().max() < 1e-2  # float16
        for j, (case, box) in enumerate(dl.samples):
            full = torch.from_numpy(reader.read_crop(case, box)[:-1])  # all n classes, as before
            image = torch.zeros((1, *full.shape[1:]))
            expected = finish_softlabels(spatial(image=image, regression_target=full)["regression_target"], True)
            assert torch.allclose(got[j], expected, atol=2e-3), (got[j] - expected).abs().max()
    assert min(carried) < n - (1 if top_k else 0)  # fewer channels than classes travelled


# -- 10: the pairing of boxes and transforms under both batch-loop orders ----------------------------
LABELS = {"background": 0, "organ": 1, "lesion": 2}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small preprocessed dataset written with nnU-Net's own ``nnUNetDatasetBlosc2.save_case`` (no nnU-Net
    planning or training: seconds) and its one-hot cache. Every case is striped with a case-dependent phase,
    so a soft label read from another case or another box disagrees with the segmentation on most voxels."""
    tmp = tmp_path_factory.mktemp("tiny")
    folder = tmp / "nnUNetPlans_3d_fullres"
    folder.mkdir()
    rng = np.random.default_rng(0)
    cases = [f"tiny_{c:03d}" for c in range(5)]
    for c, case in enumerate(cases):
        shape = (18 + c, 20, 22 - c)
        x, y, z = np.indices(shape)
        seg = (((x + 2 * y + 3 * z + 5 * c) // 4) % 3).astype(np.int8)[None]
        data = rng.normal(size=(1, *shape)).astype(np.float32)
        locations = {label: np.argwhere(seg == label) for label in (1, 2)}  # (N, 4): channel, x, y, z
        nnUNetDatasetBlosc2.save_case(data, seg, {"class_locations": locations}, str(folder / case),
                                      chunks=data.shape, blocks=data.shape)
    store = write_store(tmp / "onehot.zarr", folder, cases, [16, 16, 16])
    return SimpleNamespace(folder=folder, lm=LabelManager(LABELS, regions_class_order=None), cases=cases,
                           store=store)


class TwoPassBatchLoop(nnUNetDataLoader):
    """``nnUNetDataLoader`` with the batch loop of nnU-Net's development branch: ``get_bbox`` and the crop for
    every sample first, then the transforms per sample (sample 0 first, the probe that sizes the batch, then
    the rest). Each step is the installed ``nnUNetDataLoader.generate_train_batch``'s, with the same calls
    and arguments; only the order differs."""

    def generate_train_batch(self):
        selected_keys = self.get_indices()
        crops = []
        with torch.no_grad():
            with threadpool_limits(limits=1, user_api=None):
                for j, i in enumerate(selected_keys):  # pass 1: every box and crop
                    force_fg = self.get_do_oversample(j)
                    data, seg, seg_prev, properties = self._data.load_case(i)
                    shape = data.shape[1:]
                    bbox_lbs, bbox_ubs = self.get_bbox(shape, force_fg, properties['class_locations'])
                    bbox = [[a, b] for a, b in zip(bbox_lbs, bbox_ubs)]
                    data_cropped = torch.from_numpy(crop_and_pad_nd(data, bbox, 0)).float()
                    seg_cropped = torch.from_numpy(crop_and_pad_nd(seg, bbox, -1, cast_cropped_to=np.int16)).to(
                        torch.int16)
                    if seg_prev is not None:
                        seg_prev_cropped = torch.from_numpy(
                            crop_and_pad_nd(seg_prev, bbox, -1, cast_cropped_to=np.int16)).to(torch.int16)
                        seg_cropped = torch.cat((seg_cropped, seg_prev_cropped[None]), dim=0)
                    if self.patch_size_was_2d:
                        data_cropped = data_cropped[:, 0]
                        seg_cropped = seg_cropped[:, 0]
                    crops.append((data_cropped, seg_cropped))

                data_all = seg_all = None
                for j, (data_cropped, seg_cropped) in enumerate(crops):  # pass 2: the transforms, in order
                    if self.transforms is not None:
                        transformed = self.transforms(**{'image': data_cropped, 'segmentation': seg_cropped})
                        data_sample = transformed['image']
                        seg_sample = transformed['segmentation']
                    else:
                        data_sample = data_cropped
                        seg_sample = seg_cropped

                    if data_all is None:
                        data_all = torch.empty((self.batch_size, *data_sample.shape), dtype=torch.float32)
                    data_all[j] = data_sample

                    if isinstance(seg_sample, list):
                        if seg_all is None:
                            seg_all = [torch.empty((self.batch_size, *s.shape), dtype=s.dtype) for s in seg_sample]
                        for s_idx, s in enumerate(seg_sample):
                            seg_all[s_idx][j] = s
                    else:
                        if seg_all is None:
                            seg_all = torch.empty((self.batch_size, *seg_sample.shape), dtype=seg_sample.dtype)
                        seg_all[j] = seg_sample
        return {'data': data_all, 'target': seg_all, 'keys': selected_keys}


class TwoPassKDDataLoader(KDDataLoader, TwoPassBatchLoop):
    """KDDataLoader, unchanged, on a parent whose batch loop is the two-pass one: KDDataLoader's
    ``generate_train_batch`` (and its checks) runs ``TwoPassBatchLoop.generate_train_batch`` as its parent's."""


class CallOrder:
    """Mixin: records "bbox" and "transforms" in the order the batch loop calls them."""

    def get_indices(self):
        self.calls = []
        return super().get_indices()

    def get_bbox(self, *args, **kwargs):
        self.calls.append("bbox")
        return super().get_bbox(*args, **kwargs)

    def generate_train_batch(self):
        transforms = self.transforms

        def recording(**sample):
            self.calls.append("transforms")
            return transforms(**sample)

        self.transforms = recording
        try:
            return super().generate_train_batch()
        finally:
            self.transforms = transforms


class StockOrder(CallOrder, KDDataLoader):
    pass


class TwoPassOrder(CallOrder, TwoPassKDDataLoader):
    pass


@pytest.mark.parametrize("cls", [StockOrder, TwoPassOrder], ids=["stock", "two-pass"])
def test_each_sample_gets_its_own_softlabels_in_either_batch_loop_order(tiny, cls):
    """argmax of every sample's soft labels == its own segmentation, inside the volume (the target is -1 in the
    padding), whether the parent calls get_bbox and the transforms per sample or get_bbox for all first."""
    batch_size, patch, final = 4, [16, 16, 16], [12, 12, 12]  # boxes may reach outside the volume
    transforms = ComposeTransforms([SpatialTransform(final, 0, False, border_mode_seg="constant",
                                                     padding_value_seg=-1),
                                    MirrorTransform(allowed_axes=(0, 1, 2))])
    dl = loader(tiny, transforms, patch, final, cls=cls, batch_size=batch_size)
    seed(7)
    for _ in range(3):
        batch = next(dl)
        expected = (["bbox", "transforms"] * batch_size if cls is StockOrder
                    else ["bbox"] * batch_size + ["transforms"] * batch_size)
        assert dl.calls == expected  # the loop really ran in that order
        soft, seg = dense(batch), batch["target"][:, 0]
        check_softlabels(soft, batch_size, final)
        assert len(set(batch["keys"])) > 1  # more than one case per batch: a swap between cases would show
        for j in range(batch_size):
            inside = seg[j] >= 0
            assert inside.float().mean() > 0.5
            wrong = (soft[j].argmax(0)[inside] != seg[j][inside].long()).sum().item()
            assert wrong == 0, (f"sample {j} ({batch['keys'][j]}) of {batch_size}: argmax(soft labels) disagrees "
                                f"with its segmentation on {wrong} of {inside.sum().item()} voxels")


class SkipsLastTransforms(TwoPassKDDataLoader):
    """A batch loop that does not transform its last sample: its box is left in the queue."""

    def generate_train_batch(self):
        transforms, calls = self.transforms, [0]

        def all_but_last(**sample):
            calls[0] += 1
            return transforms(**sample) if calls[0] < self.batch_size else sample

        self.transforms = all_but_last
        try:
            return super().generate_train_batch()
        finally:
            self.transforms = transforms


def test_a_changed_batch_loop_raises_naming_the_counts(tiny):
    patch = [16, 16, 16]
    dl = loader(tiny, None, patch, patch, batch_size=3)
    dl.get_indices()
    crop = {"image": torch.zeros((1, *patch)), "segmentation": torch.zeros((1, *patch), dtype=torch.int16)}
    with pytest.raises(RuntimeError, match=r"transforms were called .* no get_bbox box queued .*0 get_bbox and 0 "
                                           r"transforms calls .* batch of 3.*batch loop changed"):
        dl.transforms(**crop)
    with pytest.raises(RuntimeError, match=r"a batch of 3 samples made 3 get_bbox and 2 transforms calls \(1 boxes "
                                           r"left over.*batch loop changed"):
        next(loader(tiny, None, patch, patch, cls=SkipsLastTransforms, batch_size=3))
