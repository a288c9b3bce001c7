"""fastkd.student.loader.KDDataLoader under nnU-Net's real augmentation, with a cache we know the answer for.

The cache holds the one-hot of each demo case's own preprocessed segmentation (uint8, exact 0 / 255),
so after any augmentation the argmax of ``dense(batch)`` must be the augmented segmentation
``batch["target"]`` that nnU-Net computes from the same sample: if the soft labels missed a rotation,
scaling, mirror or crop, or were read from another box or case, they stop agreeing.

Data: the ``trained`` fixture (conftest.py; shared) for nnU-Net's preprocessed demo (3d_fullres, 5 cases);
the cache and loader: tests/onehot_cache.py. The loader on small synthetic stores: tests/unit/student/test_loader.py.
"""

import os

import blosc2
import numpy as np
import pytest
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
    NonDetMultiThreadedAugmenter,
)
from batchgeneratorsv2.transforms.intensity.brightness import (
    MultiplicativeBrightnessTransform,
)
from batchgeneratorsv2.transforms.intensity.contrast import (
    BGContrast,
    ContrastTransform,
)
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import (
    nnUNetTrainerDA5,
)

from fastkd import cache
from fastkd.cache import CacheError, SoftLabelCache
from fastkd.student.loader import KDDataLoader, finish_softlabels
from fastkd.student.loss import SoftLabels

from onehot_cache import (
    DS,
    check_softlabels,
    dense,
    loader,
    make_demo,
    provenance,
    seed,
    write_store,
)

torch.set_num_threads(1)



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
