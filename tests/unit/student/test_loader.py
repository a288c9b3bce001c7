"""The KD loader on small synthetic stores: each sample's own soft labels under nnU-Net's stock and two-pass batch loops, padding and clamping of soft labels, per-sample classes."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from acvl_utils.cropping_and_padding.bounding_boxes import crop_and_pad_nd
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.label_handling.label_handling import LabelManager
from threadpoolctl import threadpool_limits

from fastkd.student.loader import KDDataLoader, collate, finish_softlabels
from fastkd.student.loss import SoftLabels

from onehot_cache import check_softlabels, dense, loader, seed, write_store

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
