"""Unlabelled images in a KD student's batches: they never reach the hard loss, the KD term covers every voxel
of theirs, the loader draws the configured share of them, and the cache hands their teacher class locations
to nnU-Net's foreground oversampling (fastkd.student.loader, fastkd.student.trainers, fastkd.cache)."""

import numpy as np
import pytest
import torch

from fastkd import cache
from fastkd.student.loader import KDDataLoader, WithUnlabelled
from fastkd.student.loss import KDLoss, SoftLabels, kd_scale_weights
from fastkd.student.trainers import DistillationLoss

from fake_stores import provenance, softmax

DS_WEIGHTS = [4 / 7, 2 / 7, 1 / 7]
DS_SHAPES = [(8, 8, 8), (4, 4, 4), (2, 2, 2)]


def _hard_loss(ignore_label=None):
    """nnU-Net's own DC+CE with deep supervision, as nnUNetTrainer._build_loss makes it (batch Dice: the one
    form where a sample can change another's loss)."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    dc_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False},
                           {} if ignore_label is None else {"ignore_index": ignore_label}, weight_ce=1, weight_dice=1,
                           ignore_label=ignore_label, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(dc_ce, DS_WEIGHTS)


def _batch(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    outs = [(torch.randn((n, 3, *s), generator=g) * 2).requires_grad_() for s in DS_SHAPES]
    seg = torch.randint(0, 3, (n, 1, 8, 8, 8), generator=g)
    targets = [seg[:, :, ::f, ::f, ::f].float() for f in (1, 2, 4)]
    soft = torch.softmax(torch.randn((n, 3, 8, 8, 8), generator=g) * 3, 1)
    return outs, targets, soft


def _soft(values, unlabelled):
    return SoftLabels(values, torch.arange(3), 3, torch.tensor(unlabelled))


def test_an_unlabelled_sample_never_reaches_the_hard_loss():
    outs, targets, soft = _batch()
    kd = KDLoss(1.0, kd_scale_weights(DS_WEIGHTS, "full"))
    loss = DistillationLoss(_hard_loss(), kd, 0.0, None, regions=False, deep_supervision=True, form="additive")
    unlabelled = [False, True, False]
    total = loss(outs, [*targets, _soft(soft, unlabelled)])
    # the hard loss of the labelled samples alone (nnU-Net's batch Dice over those two)
    keep = torch.tensor([0, 2])
    alone = _hard_loss()([o[keep] for o in outs], [t[keep] for t in targets])
    assert total.item() == pytest.approx(alone.item(), rel=1e-6) and loss.last["hard"].item() == pytest.approx(alone.item())
    total.backward()
    assert all(o.grad[1].abs().max() == 0 for o in outs)  # alpha 0: nothing but the hard loss, none of it
    assert all(o.grad[0].abs().max() > 0 and o.grad[2].abs().max() > 0 for o in outs)
    # whatever the placeholder segmentation of the unlabelled sample holds, the loss is the same
    changed = [t.clone() for t in targets]
    for t in changed:
        t[1] = 2 - t[1]
    assert loss(outs, [*changed, _soft(soft, unlabelled)]).item() == pytest.approx(total.item(), rel=1e-6)
    # without the mask the second sample would count: the test above can fail
    assert loss(outs, [*targets, _soft(soft, [False] * 3)]).item() != pytest.approx(total.item(), rel=1e-3)


def test_a_batch_of_unlabelled_samples_only_has_no_hard_loss_but_kd():
    outs, targets, soft = _batch(2)
    kd = KDLoss(1.0, kd_scale_weights(DS_WEIGHTS, "full"))
    loss = DistillationLoss(_hard_loss(), kd, 1.0, None, regions=False, deep_supervision=True, form="additive")
    total = loss(outs, [*targets, _soft(soft, [True, True])])
    assert loss.last["hard"].item() == 0.0
    assert total.item() == pytest.approx(kd(outs, _soft(soft, [True, True])).item(), rel=1e-6)
    total.backward()
    assert outs[0].grad.abs().max() > 0 and outs[1].grad.abs().max() == 0  # KD on the full resolution only


@pytest.mark.parametrize("ignore_label", [None, 3])
def test_kd_covers_every_voxel_of_an_unlabelled_sample(ignore_label):
    """The unlabelled sample's gradient is KD's alone, and nonzero at every voxel: no voxel is masked, also
    when the dataset has an ignore label (its placeholder segmentation is never the ignore label)."""
    outs, targets, soft = _batch()
    if ignore_label is not None:
        for t in targets:
            t[0, :, :2] = ignore_label  # a labelled sample with ignored voxels: KD leaves them out
            t[1] = 0  # nnU-Net's placeholder for an image without label, after RemoveLabelTansform(-1 -> 0)
    kd = KDLoss(1.0, kd_scale_weights(DS_WEIGHTS, "full"))
    loss = DistillationLoss(_hard_loss(ignore_label), kd, 1.0, ignore_label, regions=False, deep_supervision=True,
                            form="additive")
    loss(outs, [*targets, _soft(soft, [False, True, False])]).backward()
    grad = outs[0].grad
    assert (grad[1].abs().sum(0) > 0).all()  # every voxel of the unlabelled sample
    if ignore_label is not None:
        # the labelled sample's ignored voxels get neither hard nor KD gradient
        assert grad[0, :, :2].abs().max() == 0 and (grad[0, :, 2:].abs().sum(0) > 0).all()


def test_soft_labels_keep_the_mask_on_the_cpu_when_moved():
    soft = _soft(torch.rand(2, 3, 2, 2, 2), [True, False])
    moved = soft.to("cpu")
    assert moved.unlabelled.tolist() == [True, False] and moved.unlabelled.device.type == "cpu"
    with pytest.raises(ValueError, match="one flag per sample"):
        SoftLabels(torch.rand(2, 3, 2, 2, 2), torch.arange(3), 3, torch.tensor([True]))


def _mixer(share, batch_size=2, labelled=("a", "b", "c"), unlabelled=("u1", "u2")):
    loader = KDDataLoader.__new__(KDDataLoader)  # the draw only: no dataset, cache or transforms
    loader.unlabelled_share, loader.batch_size, loader.pools = share, batch_size, (list(labelled), list(unlabelled))
    return loader


@pytest.mark.parametrize("share, batch_size", [(0.0, 2), (0.5, 2), (1.0, 2), (0.25, 2), (0.3, 5)])
def test_the_loader_draws_the_configured_share_of_unlabelled_samples(share, batch_size):
    np.random.seed(0)
    loader = _mixer(share, batch_size)
    batches = [loader._mixed_indices() for _ in range(4000)]
    assert all(len(b) == batch_size for b in batches)
    counts = np.array([sum(k.startswith("u") for k in b) for b in batches])
    want = share * batch_size
    # exact when share x batch is whole, else floor or ceil with the right mean
    assert set(counts) <= {int(np.floor(want)), int(np.ceil(want))}
    assert counts.mean() == pytest.approx(want, abs=0.03)
    drawn = {k for b in batches for k in b}
    assert drawn == ({"a", "b", "c"} if share == 0 else {"u1", "u2"} if share == 1 else {"a", "b", "c", "u1", "u2"})
    if 0 < share < 1:  # both kinds land on the oversampled (last) position
        last = [b[-1].startswith("u") for b in batches]
        assert 0 < np.mean(last) < 1


def test_with_unlabelled_gives_unlabelled_cases_the_teachers_class_locations(tmp_path):
    prov = provenance()
    rng = np.random.default_rng(0)
    probs = {c: softmax(rng.normal(scale=3, size=(3, 6, 7, 5))) for c in ("lab", "unl")}
    locations = {1: np.array([[0, 1, 2, 3], [0, 5, 6, 4]]), 2: np.zeros((0, 4), int)}
    cache.write_case(tmp_path / "c.zarr", "lab", probs["lab"], prov, {"unlabelled": False})
    cache.write_case(tmp_path / "c.zarr", "unl", probs["unl"], prov,
                     {"unlabelled": True, "class_locations": cache.layout.encode_class_locations(locations)})
    root = cache.finalize(tmp_path / "c.zarr", {"lab": [1, 6, 7, 5]}, None, {"unl": [1, 6, 7, 5]})
    assert root["unlabelled"] == ["unl"] and set(root["cases"]) == {"lab", "unl"}

    class Dataset:
        def __init__(self, ids):
            self.identifiers = ids

        def load_case(self, identifier):
            return "data", "seg", None, {"class_locations": {1: "from the label"}, "case": identifier}

    mixed = WithUnlabelled(Dataset(["lab"]), Dataset(["unl"]), str(tmp_path / "c.zarr"))
    assert mixed.identifiers == ["lab", "unl"]
    assert mixed.load_case("lab")[3]["class_locations"] == {1: "from the label"}
    got = mixed.load_case("unl")[3]["class_locations"]
    assert set(got) == {1, 2} and got[1].tolist() == locations[1].tolist() and got[2].shape == (0, 4)
    with pytest.raises(ValueError, match="both labelled and unlabelled"):
        WithUnlabelled(Dataset(["lab", "unl"]), Dataset(["unl"]), str(tmp_path / "c.zarr"))


def test_class_locations_round_trip_and_are_capped():
    many = np.zeros((5000, 4), int)
    many[:, 1:] = np.arange(15000).reshape(5000, 3)
    stored = cache.layout.encode_class_locations({1: many, (1, 2): many[:3], (3,): many[:0]})
    assert set(stored) == {"1", "1,2", "3,"} and len(stored["1"]) == 3 * cache.layout.CLASS_LOCATIONS_PER_CLASS
    back = cache.layout.decode_class_locations(stored)
    assert set(back) == {1, (1, 2), (3,)}
    assert back[(1, 2)].tolist() == many[:3].tolist() and back[(3,)].shape == (0, 4)
    rows = {tuple(r) for r in many.tolist()}
    assert all(tuple(r) in rows for r in back[1].tolist())  # a pick of the real voxels, never made up


def test_finalize_verify_and_info_keep_the_two_kinds_apart(tmp_path):
    prov = provenance()
    rng = np.random.default_rng(1)
    p = softmax(rng.normal(scale=3, size=(3, 6, 7, 5)))
    store = tmp_path / "c.zarr"
    cache.write_case(store, "lab", p, prov, {"unlabelled": False})
    cache.write_case(store, "unl", p, prov, {"unlabelled": True, "class_locations": {"1": [1, 2, 3]}})
    # the manifests say "unl" is labelled: refused, naming it
    with pytest.raises(cache.CacheError, match="unl: marked unlabelled in the store"):
        cache.finalize(store, {"lab": [1, 6, 7, 5], "unl": [1, 6, 7, 5]})
    cache.write_case(store, "bad", p, prov, {"unlabelled": True})
    with pytest.raises(cache.CacheError, match="bad: unlabelled but without class_locations"):
        cache.finalize(store, {"lab": [1, 6, 7, 5]}, None, {"unl": [1, 6, 7, 5], "bad": [1, 6, 7, 5]})
    cache.finalize(store, {"lab": [1, 6, 7, 5]}, None, {"unl": [1, 6, 7, 5]})
    report = cache.info(store)
    assert report["n_unlabelled"] == 2 and report["cases"]["unl"]["unlabelled"]  # "bad" is there, not listed
    assert "(1 labelled, 2 unlabelled)" in cache.format_info(report)
    problems = cache.verify(store)
    assert any(p.startswith("bad: unlabelled but without class_locations") for p in problems)
    assert any(p.startswith("bad: marked unlabelled, but the root lists it as labelled") for p in problems)
    assert not [p for p in problems if p.startswith(("lab:", "unl:"))]


PLANS = {"dataset_name": "D", "plans_name": "P", "configurations": {}, "transpose_forward": [0, 1, 2],
         "transpose_backward": [0, 1, 2], "image_reader_writer": "SimpleITKIO", "label_manager": "LabelManager",
         "original_median_spacing_after_transp": [1, 1, 1], "original_median_shape_after_transp": [1, 1, 1],
         "experiment_planner_used": "test", "foreground_intensity_properties_per_channel": {}}


def _probs_of(seg, n):
    probs = np.full((n, *seg.shape), 0.1 / n, np.float32)
    for k in range(n):
        probs[k][seg == k] += 0.9
    return probs


def test_teacher_class_locations_are_voxels_of_the_teachers_segmentation():
    from fastkd.unlabelled import teacher_class_locations

    seg = np.zeros((30, 20, 10), np.uint8)
    seg[2:20, 3:15, 1:9] = 1  # 1728 voxels: more than the cap
    seg[25:27, 5:7, 5:7] = 2  # 8 voxels
    labels = {"background": 0, "a": 1, "b": 2, "c": 3}  # c: predicted nowhere
    got = cache.layout.decode_class_locations(
        teacher_class_locations(_probs_of(seg, 4), PLANS, {"labels": labels}))
    assert set(got) == {1, 2, 3}
    assert len(got[1]) == cache.layout.CLASS_LOCATIONS_PER_CLASS and len(got[2]) == 8 and len(got[3]) == 0
    for k in (1, 2):
        x, y, z = got[k][:, 1:].T
        assert (seg[x, y, z] == k).all() and (got[k][:, 0] == 0).all()
    assert len({tuple(v) for v in got[1].tolist()}) == len(got[1])  # distinct voxels
    # regions: voxels where the region is predicted (label map from nnU-Net's region order); an ignore label
    # adds nnU-Net's key of every annotated voxel
    regions = {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}
    got = cache.layout.decode_class_locations(teacher_class_locations(
        np.stack([(seg >= 1), (seg == 2)]).astype(np.float32), PLANS,
        {"labels": regions, "regions_class_order": [1, 2]}))
    assert set(got) == {(1, 2), 2, (-1, 0, 1, 2)}
    assert len(got[2]) == 8 and len(got[(-1, 0, 1, 2)]) == cache.layout.CLASS_LOCATIONS_PER_CLASS
    x, y, z = got[(1, 2)][:, 1:].T
    assert (seg[x, y, z] >= 1).all()


def test_nnunets_loader_oversamples_an_unlabelled_case_at_the_teachers_class_locations(tmp_path):
    """Pins the nnU-Net internals WithUnlabelled relies on: nnUNetDataLoader reads each case through the
    dataset's ``load_case`` and hands that case's ``properties["class_locations"]`` to ``get_bbox`` for
    foreground oversampling. If nnU-Net read the locations elsewhere, unlabelled images would silently be
    sampled without the teachers' foreground."""
    import os

    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    folder = tmp_path / "cases"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for case in ("lab", "unl"):
        seg = np.zeros((1, 12, 12, 12), np.int8)
        seg[0, 2:4, 2:4, 2:4] = 1  # the label's foreground (for "unl": nnU-Net's placeholder would hold none)
        nnUNetDatasetBlosc2.save_case(rng.normal(size=(1, 12, 12, 12)).astype(np.float32), seg,
                                      {"class_locations": {1: np.argwhere(seg == 1)}}, str(folder / case))
    teachers = {1: np.array([[0, 9, 8, 7]])}  # one voxel of the teachers' foreground, nowhere near the label's

    class Cache:
        def class_locations(self, case):
            assert case == "unl"
            return teachers

    mixed = WithUnlabelled(nnUNetDatasetBlosc2(str(folder), identifiers=["lab"]),
                           nnUNetDatasetBlosc2(str(folder), identifiers=["unl"]), str(tmp_path / "unused.zarr"))
    mixed._cache, mixed._cache_pid = Cache(), os.getpid()
    boxes = []  # (the class locations get_bbox received, the box it drew)

    class Recording(nnUNetDataLoader):
        def get_bbox(self, data_shape, force_fg, class_locations, *args, **kwargs):
            lbs, ubs = super().get_bbox(data_shape, force_fg, class_locations, *args, **kwargs)
            boxes.append((class_locations, lbs, ubs))
            return lbs, ubs

    lm = LabelManager({"background": 0, "organ": 1}, regions_class_order=None)
    dl = Recording(mixed, 4, [4, 4, 4], [4, 4, 4], lm, oversample_foreground_percent=1.0,
                   sampling_probabilities=None, pad_sides=None, probabilistic_oversampling=False, transforms=None)
    np.random.seed(0)
    keys = [k for _ in range(5) for k in dl.generate_train_batch()["keys"]]
    assert len(boxes) == len(keys) and {"lab", "unl"} <= set(keys)
    for key, (locations, lbs, ubs) in zip(keys, boxes):
        assert (locations is teachers) == (key == "unl"), f"{key}: get_bbox got the wrong class locations"
        if key == "unl":  # every box of the unlabelled case is drawn around the teachers' voxel
            assert all(lo <= v < hi for lo, v, hi in zip(lbs, (9, 8, 7), ubs)), (lbs, ubs)
