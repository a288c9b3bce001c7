"""fastkd.student.loss against hand-written formulas, nnU-Net's own transforms and the edge cases of training
(deep-supervision weights, ignore label, exact-zero soft labels, fp16 logits)."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastkd.student import loss as kd
from fastkd.student.loss import KDLoss, downsample_mask, downsample_soft, kd_mask_from_target

SHAPES = [(8, 8, 8), (4, 4, 4), (2, 2, 2)]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def rand_probs(shape, g, regions=False, zeros=False):
    """Random teacher probabilities (B, C, *sp): softmax over C, or independent in (0, 1) for regions.
    ``zeros``: quantised like the cache (uint8 / 255), so many are exactly 0 (and 1 for regions)."""
    logits = 3 * torch.randn(shape, generator=g)
    p = torch.sigmoid(logits) if regions else torch.softmax(logits, 1)
    if zeros:
        p = torch.round(p * 255) / 255
        if not regions:
            p = p / p.sum(1, keepdim=True)
    return p


def matching_outputs(p, T, regions=False):
    """Student logits at every DS scale whose tempered activation equals the downsampled teacher."""
    outs = []
    for s in SHAPES:
        ps = downsample_soft(p, s)
        outs.append(T * torch.logit(ps) if regions else T * torch.log(ps))
    return outs


def ref_kl(z, p, T, regions=False, mask=None):
    """Mean over counted voxels of sum over channels of KL(p || act(z/T)), by F.kl_div / explicit Bernoulli."""
    x = z.double() / T
    p = p.double()
    if regions:
        q = torch.sigmoid(x)
        per = (torch.xlogy(p, p) - torch.xlogy(p, q) + torch.xlogy(1 - p, 1 - p) - torch.xlogy(1 - p, 1 - q)).sum(1)
    else:
        per = F.kl_div(F.log_softmax(x, 1), p, reduction="none").sum(1)
    if mask is not None:
        return per[mask[:, 0]].mean() if mask.any() else per.new_zeros(())
    return per.mean()


def ref_pooled(p, shape):
    """Block means by reshaping (integer factors)."""
    B, C = p.shape[:2]
    f = [a // b for a, b in zip(p.shape[2:], shape)]
    v = p.reshape(B, C, shape[0], f[0], shape[1], f[1], shape[2], f[2])
    return v.mean((3, 5, 7))


# ---------------------------------------------------------------- downsampling


def test_downsample_soft_is_block_mean_and_keeps_sums():
    p = rand_probs((2, 4, 8, 8, 8), gen())
    for s in SHAPES[1:]:
        d = downsample_soft(p, s)
        assert d.shape == (2, 4, *s)
        torch.testing.assert_close(d, ref_pooled(p, s))
        torch.testing.assert_close(d.sum(1), torch.ones(2, *s))
    assert downsample_soft(p, (8, 8, 8)) is p
    p2 = rand_probs((1, 3, 6, 4), gen(1))
    torch.testing.assert_close(downsample_soft(p2, (3, 2)).sum(1), torch.ones(1, 3, 2))


def test_downsample_soft_with_mask_averages_counted_voxels_only():
    g = gen(2)
    p = rand_probs((1, 3, 4, 4, 4), g)
    mask = torch.rand((1, 1, 4, 4, 4), generator=g) > 0.4
    d = downsample_soft(torch.where(mask, p, float("nan")), (2, 2, 2), mask)
    expected = ref_pooled(p * mask, (2, 2, 2)) / ref_pooled(mask.float(), (2, 2, 2)).clamp_min(1e-30)
    torch.testing.assert_close(d, expected)
    counted = ref_pooled(mask.float(), (2, 2, 2))[:, 0] > 0
    torch.testing.assert_close(d.sum(1)[counted], torch.ones(int(counted.sum())))


def test_downsample_mask_matches_nnunet_target_downsampling():
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform

    mask = torch.rand((2, 1, 8, 6, 8), generator=gen(3)) > 0.5
    ds = DownsampleSegForDSTransform(ds_scales=[[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.5, 0.25]])
    for b in range(2):
        ref = ds(segmentation=mask[b].to(torch.int16))["segmentation"]
        for r in ref:
            d = downsample_mask(mask, r.shape[1:])
            assert d.dtype == torch.bool
            assert torch.equal(d[b], r.bool())


# ---------------------------------------------------------------- KL, deep supervision


@pytest.mark.parametrize("regions", [False, True])
def test_zero_when_student_equals_teacher_at_every_scale(regions):
    T = 3.0
    p = rand_probs((2, 3, 8, 8, 8), gen(4), regions)
    outs = matching_outputs(p, T, regions)
    for weights in ([1, 0, 0], [0, 1, 0], [0, 0, 1], [4 / 7, 2 / 7, 1 / 7]):
        value = KDLoss(T, weights, regions=regions)(outs, p)
        assert abs(value.item()) < 1e-5
    worse = [o + torch.randn(o.shape, generator=gen(5)) for o in outs]
    for weights in ([1, 0, 0], [0, 1, 0], [0, 0, 1]):
        assert KDLoss(T, weights, regions=regions)(worse, p).item() > 1e-3


def test_matches_explicit_loop_reference():
    g = gen(6)
    T = 2.5
    z = torch.randn((2, 3, 2, 3, 2), generator=g) * 2
    p = rand_probs((2, 3, 2, 3, 2), g)
    total, n = 0.0, 0
    for b in range(2):
        for v in range(12):
            zz = z[b].reshape(3, -1)[:, v].tolist()
            pp = p[b].reshape(3, -1)[:, v].tolist()
            lse = math.log(sum(math.exp(zi / T) for zi in zz))
            total += sum(pi * (math.log(pi) - (zi / T - lse)) for pi, zi in zip(pp, zz))
            n += 1
    expected = T * T * total / n
    assert KDLoss(T)(z, p).item() == pytest.approx(expected, rel=1e-5)
    assert KDLoss(T)([z], p).item() == pytest.approx(expected, rel=1e-5)


def test_temperature_squared_scaling():
    g = gen(7)
    z = torch.randn((2, 4, 4, 4, 4), generator=g) * 3
    p = rand_probs((2, 4, 4, 4, 4), g)
    for T in (1.0, 2.0, 4.0):
        raw = ref_kl(z, p, T)  # KL(p || softmax(z / T)), the tempered distributions
        assert KDLoss(T)(z, p).item() == pytest.approx(T * T * raw.item(), rel=1e-5)
    # same logits, T=2 vs T=1: only the T^2 factor and the tempering differ
    assert KDLoss(2.0)(z, p).item() / KDLoss(1.0)(z, p).item() == pytest.approx(
        4 * (ref_kl(z, p, 2.0) / ref_kl(z, p, 1.0)).item(), rel=1e-5)


def test_scale_weights_and_skipped_zero_weight_scale():
    g = gen(8)
    T, a, b = 2.0, 0.6, 0.3
    p = rand_probs((2, 3, 8, 8, 8), g)
    outs = [torch.randn((2, 3, *s), generator=g, requires_grad=True) for s in SHAPES[:2]]
    garbage = torch.full((2, 3, *SHAPES[2]), float("inf"), requires_grad=True)
    value = KDLoss(T, [a, b, 0])([*outs, garbage], p)
    expected = a * T * T * ref_kl(outs[0], p, T) + b * T * T * ref_kl(outs[1], downsample_soft(p, SHAPES[1]), T)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    value.backward()
    assert all(torch.isfinite(o.grad).all() for o in outs)
    assert garbage.grad is None


def test_weights_must_match_outputs():
    p = rand_probs((1, 2, 8, 8, 8), gen(9))
    outs = matching_outputs(p, 1.0)
    with pytest.raises(ValueError, match="3 student outputs but 2 ds_weights"):
        KDLoss(1.0, [0.5, 0.5])(outs, p)
    with pytest.raises(ValueError, match="3 student outputs but 1 ds_weights"):
        KDLoss(1.0)(outs, p)
    with pytest.raises(ValueError, match="1 student outputs but 3 ds_weights"):
        KDLoss(1.0, [0.5, 0.5, 0])(outs[0], p)
    for bad in ([0, 0], [1, -1], []):
        with pytest.raises(ValueError, match="ds_weights"):
            KDLoss(1.0, bad)
    with pytest.raises(ValueError, match="temperature"):
        KDLoss(0.0)


def test_shape_errors_name_both_shapes():
    p = rand_probs((2, 3, 8, 8, 8), gen(10))
    z = torch.zeros((2, 3, 8, 8, 8))
    loss = KDLoss(1.0)
    for bad in (p[:, :2], p[:1], p[..., :4]):
        with pytest.raises(ValueError, match=r"soft labels have shape \(.*\) but .* has \(2, 3, 8, 8, 8\)"):
            loss(z, bad)
    with pytest.raises(ValueError, match=r"mask has shape \(2, 3, 8, 8, 8\).*\(2, 1, 8, 8, 8\)"):
        loss(z, p, torch.ones((2, 3, 8, 8, 8), dtype=torch.bool))
    with pytest.raises(ValueError, match="dtype torch.float32"):
        loss(z, p, torch.ones((2, 1, 8, 8, 8)))
    with pytest.raises(ValueError, match="student output 1"):
        KDLoss(1.0, [0.5, 0.5])([z, torch.zeros((2, 4, 4, 4, 4))], p)
    with pytest.raises(ValueError, match="dtype"):
        loss(z, (p * 255).to(torch.uint8))


# ---------------------------------------------------------------- mask / ignore label


def test_masked_voxels_do_not_change_the_loss():
    g = gen(11)
    T = 2.0
    p = rand_probs((2, 3, 8, 8, 8), g)
    outs = [torch.randn((2, 3, *s), generator=g) for s in SHAPES]
    mask = torch.rand((2, 1, 8, 8, 8), generator=g) > 0.3
    loss = KDLoss(T, [0.5, 0.3, 0.2], soft_dice=0.7, cauchy_schwarz=0.4)
    reference = loss(outs, p, mask)

    garbage_p = torch.where(mask, p, float("nan"))
    garbage_outs = [torch.where(downsample_mask(mask, o.shape[2:]), o, 1e4 * torch.randn(o.shape, generator=g))
                    .requires_grad_() for o in outs]
    inputs = [x.detach().clone() for x in (garbage_p, *garbage_outs)]
    value = loss(garbage_outs, garbage_p, mask)
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    for before, after in zip(inputs, (garbage_p, *garbage_outs)):  # the loss works on copies
        torch.testing.assert_close(after.detach(), before, rtol=0, atol=0, equal_nan=True)
    value.backward()
    assert all(torch.isfinite(o.grad).all() for o in garbage_outs)

    # and it is the mean over counted voxels only, at each scale with nnU-Net's downsampled mask
    kl_only = KDLoss(T, [0.5, 0.3, 0.2])(outs, p, mask)
    expected = sum(w * T * T * ref_kl(o, downsample_soft(p, o.shape[2:], mask), T,
                                      mask=downsample_mask(mask, o.shape[2:]))
                   for w, o in zip([0.5, 0.3, 0.2], outs))
    assert kl_only.item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("regions", [False, True])
def test_all_masked_is_zero_not_nan(regions):
    p = rand_probs((1, 3, 8, 8, 8), gen(12), regions)
    outs = [torch.randn((1, 3, *s), generator=gen(13), requires_grad=True) for s in SHAPES]
    mask = torch.zeros((1, 1, 8, 8, 8), dtype=torch.bool)
    value = KDLoss(2.0, [0.5, 0.3, 0.2], regions=regions, soft_dice=1.0, cauchy_schwarz=1.0)(outs, p, mask)
    assert value.item() == 0.0
    value.backward()
    assert all(torch.equal(o.grad, torch.zeros_like(o)) for o in outs)


def test_kd_mask_from_label_target():
    target = torch.randint(0, 4, (2, 1, 4, 4, 4), generator=gen(14)).to(torch.int16)
    assert kd_mask_from_target(target, None, regions=False) is None
    m = kd_mask_from_target(target, 3, regions=False)
    assert m.dtype == torch.bool and m.shape == (2, 1, 4, 4, 4)
    assert torch.equal(m, target != 3)
    with pytest.raises(ValueError, match="label target"):
        kd_mask_from_target(target.repeat(1, 2, 1, 1, 1), 3, regions=False)


def test_kd_mask_from_region_target_built_by_nnunet():
    from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform

    seg = torch.randint(0, 4, (2, 1, 4, 4, 4), generator=gen(15)).to(torch.int16)
    regions, ignore = [[1, 2], 2], 3

    def region_target(region_list):
        t = ConvertSegmentationToRegionsTransform(regions=region_list, channel_in_seg=0)
        return torch.stack([t(segmentation=s)["segmentation"] for s in seg])

    with_ignore = region_target(regions + [ignore])  # what nnU-Net's trainer builds with an ignore label
    assert with_ignore.shape == (2, 3, 4, 4, 4) and with_ignore.dtype == torch.bool
    m = kd_mask_from_target(with_ignore, ignore, regions=True)
    assert m.dtype == torch.bool and torch.equal(m, seg != ignore)
    assert torch.equal(kd_mask_from_target(with_ignore.float(), ignore, regions=True), seg != ignore)
    assert kd_mask_from_target(region_target(regions), None, regions=True) is None


# ---------------------------------------------------------------- region mode


def test_region_mode_is_binary_kl_per_region():
    g = gen(16)
    T = 2.0
    z = torch.randn((2, 3, 4, 4, 4), generator=g) * 2
    p = rand_probs((2, 3, 4, 4, 4), g, regions=True)
    value = KDLoss(T, regions=True)(z, p)
    assert value.item() == pytest.approx(T * T * ref_kl(z, p, T, regions=True).item(), rel=1e-5)

    # no softmax across regions: changing region 0's logits changes only region 0's term
    z2 = z.clone()
    z2[:, 0] += torch.randn(z2[:, 0].shape, generator=g)
    delta = KDLoss(T, regions=True)(z2, p) - value
    expected = T * T * (ref_kl(z2[:, :1], p[:, :1], T, regions=True) - ref_kl(z[:, :1], p[:, :1], T, regions=True))
    assert delta.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("regions", [False, True])
def test_gradient_is_tempered_prediction_minus_teacher(regions):
    g = gen(17)
    T = 3.0
    z = (torch.randn((2, 3, 4, 4, 4), generator=g) * 2).requires_grad_()
    p = rand_probs((2, 3, 4, 4, 4), g, regions=regions).requires_grad_()
    KDLoss(T, regions=regions)(z, p).backward()
    q = torch.sigmoid(z / T) if regions else torch.softmax(z / T, 1)
    n_voxels = 2 * 4 * 4 * 4
    torch.testing.assert_close(z.grad, T * (q - p).detach() / n_voxels)
    assert p.grad is None


# ---------------------------------------------------------------- soft Dice and Cauchy-Schwarz


def ref_soft_dice(z, p, T, regions):
    q = torch.sigmoid(z.double() / T) if regions else torch.softmax(z.double() / T, 1)
    p = p.double()
    k = slice(0, None) if regions else slice(1, None)
    dcs = []
    for c in range(q.shape[1])[k]:
        inter = (q[:, c] * p[:, c]).sum()
        dcs.append((2 * inter + 1e-5) / ((q[:, c] ** 2).sum() + (p[:, c] ** 2).sum() + 1e-5))
    return 1 - sum(dcs) / len(dcs)


def ref_cs(z, p, T, regions):
    q = torch.sigmoid(z.double() / T) if regions else torch.softmax(z.double() / T, 1)
    p = p.double()
    if regions:
        q, p = torch.stack([q, 1 - q], 1), torch.stack([p, 1 - p], 1)  # (B, 2, R, *sp)
    cos = (p * q).sum(1) / torch.sqrt((p * p).sum(1) * (q * q).sum(1))
    per = -torch.log(cos)
    return (per.sum(1) if regions else per).mean()


@pytest.mark.parametrize("regions", [False, True])
def test_soft_dice_and_cauchy_schwarz(regions):
    g = gen(18)
    T = 2.0
    p = rand_probs((2, 3, 8, 8, 8), g, regions)
    z = torch.randn((2, 3, 8, 8, 8), generator=g) * 2
    kl = KDLoss(T, regions=regions)(z, p)
    for kw, ref in (("soft_dice", ref_soft_dice), ("cauchy_schwarz", ref_cs)):
        loss = KDLoss(T, regions=regions, **{kw: 0.5})
        # zero at student == teacher, matches the formula (positive) otherwise, finite gradients
        assert abs(loss(matching_outputs(p, T, regions)[0], p).item()) < 1e-5
        zz = z.clone().requires_grad_()
        value = loss(zz, p)
        term = (value - kl).item() / 0.5
        assert term > 1e-3
        assert term == pytest.approx(ref(z, p, T, regions).item(), rel=1e-4)
        value.backward()
        assert torch.isfinite(zz.grad).all()


def test_zero_weight_terms_are_not_computed(monkeypatch):
    def boom(*args):
        raise AssertionError("computed although its weight is 0")

    monkeypatch.setattr(kd, "_soft_dice", boom)
    monkeypatch.setattr(kd, "_cauchy_schwarz", boom)
    g = gen(19)
    p = rand_probs((1, 3, 4, 4, 4), g)
    z = torch.randn((1, 3, 4, 4, 4), generator=g)
    assert KDLoss(2.0)(z, p).item() == pytest.approx(4 * ref_kl(z, p, 2.0).item(), rel=1e-5)


# ---------------------------------------------------------------- robustness


@pytest.mark.parametrize("regions", [False, True])
def test_exact_zero_teacher_probabilities_give_finite_loss_and_gradient(regions):
    g = gen(20)
    p = rand_probs((2, 3, 8, 8, 8), g, regions, zeros=True)
    assert (p == 0).any()
    outs = [(torch.randn((2, 3, *s), generator=g) * 5).requires_grad_() for s in SHAPES]
    value = KDLoss(3.0, [4 / 7, 2 / 7, 1 / 7], regions=regions, soft_dice=1.0, cauchy_schwarz=1.0)(outs, p)
    assert torch.isfinite(value) and value.item() > 0
    value.backward()
    assert all(torch.isfinite(o.grad).all() and o.grad.abs().sum() > 0 for o in outs)


def test_one_hot_teacher_and_overshoot_are_finite():
    p = F.one_hot(torch.randint(0, 3, (1, 4, 4, 4), generator=gen(21)), 3).permute(0, 4, 1, 2, 3).float()
    p[:, 0] += 1e-7  # trilinear resampling overshoots by about this much
    p[:, 1] -= 1e-7
    z = torch.randn((1, 3, 4, 4, 4), generator=gen(22), requires_grad=True)
    value = KDLoss(2.0, soft_dice=1.0, cauchy_schwarz=1.0)(z, p)
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(z.grad).all()


def test_fp16_logits():
    g = gen(23)
    p = rand_probs((2, 3, 8, 8, 8), g)
    outs = [(torch.randn((2, 3, *s), generator=g) * 3).half().requires_grad_() for s in SHAPES]
    loss = KDLoss(3.0, [4 / 7, 2 / 7, 0], soft_dice=0.5, cauchy_schwarz=0.5)
    value = loss(outs, p)
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(loss([o.detach().float() for o in outs], p).item(), rel=1e-6)
    value.backward()
    assert outs[0].grad.dtype == torch.float16 and torch.isfinite(outs[0].grad).all()


# ---------------------------------------------------------------- the KD loader's compact soft labels


def compact_case(g, rest: bool, B=2, C=7, shape=(8, 8, 8), per_sample=False):
    """Soft labels over classes {0, 2, 5} (+ a rest channel spread over the 4 others), and the dense twin;
    ``per_sample``: one class row per sample instead ({0, 2, 5}, {1, 3, 6}, ...)."""
    classes = torch.tensor([0, 2, 5])
    if per_sample:
        classes = torch.stack([(classes + i) % C for i in range(B)]).sort(1).values
    carried = torch.rand((B, 3, *shape), generator=g)
    other = torch.rand((B, 1, *shape), generator=g) * 0.05 if rest else torch.zeros((B, 1, *shape))
    carried = carried / carried.sum(1, keepdim=True) * (1 - other * (C - 3))
    values = torch.cat([carried, other], 1) if rest else carried
    soft = kd.SoftLabels(values.half(), classes, C)
    return soft, soft.dense()


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("rest", [False, True])
@pytest.mark.parametrize("extras", [{}, {"soft_dice": 0.5, "cauchy_schwarz": 0.3}])
def test_compact_soft_labels_give_the_dense_loss_and_gradient(rest, extras, per_sample):
    g = gen(30)
    soft, dense = compact_case(g, rest, per_sample=per_sample)
    assert dense.shape == (2, 7, 8, 8, 8)
    for b, row in enumerate(soft.classes.expand(2, 3).tolist()):
        others = [c for c in range(7) if c not in row]
        assert torch.equal(dense[b, row], soft.values[b, :3].float())
        if rest:
            assert torch.equal(dense[b, others], soft.values[b, 3:].float().expand(4, 8, 8, 8))
        else:
            assert not dense[b, others].any()
    if rest:
        torch.testing.assert_close(dense.sum(1), torch.ones((2, 8, 8, 8)), atol=2e-3, rtol=0)
    mask = torch.rand((2, 1, 8, 8, 8), generator=g) > 0.2
    loss = KDLoss(3.0, [4 / 7, 2 / 7, 1 / 7], **extras)
    results = []
    for target in (soft, dense):
        outs = [(torch.randn((2, 7, *s), generator=gen(31 + i)) * 3).requires_grad_() for i, s in enumerate(SHAPES)]
        value = loss(outs, target, mask)
        value.backward()
        results.append((value, [o.grad for o in outs]))
    (v_compact, g_compact), (v_dense, g_dense) = results
    assert v_compact.item() > 1e-3
    assert v_compact.item() == pytest.approx(v_dense.item(), rel=1e-5)
    for a, b in zip(g_compact, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("rest", [False, True])
def test_compact_kl_matches_the_reference_and_its_gradient_is_exact(rest, per_sample):
    g = gen(32)
    B = 2 if per_sample else 1
    soft, dense = compact_case(g, rest, B=B, C=6, shape=(2, 3, 2), per_sample=per_sample)
    z = torch.randn((B, soft.n_classes, 2, 3, 2), generator=g, dtype=torch.float64) * 2
    assert KDLoss(2.0)(z, soft).item() == pytest.approx(4 * ref_kl(z, dense, 2.0).item(), rel=1e-5)
    p = soft.values.double()
    k = soft.classes.shape[-1]
    args = (p[:, :k], p[:, k:] if rest else None, soft.classes)
    for temperature in (1.0, 2.0):  # the temperature is applied inside, forward and backward
        assert torch.autograd.gradcheck(lambda x: kd._SoftmaxCrossEntropy.apply(x, *args, temperature),
                                        (z.requires_grad_(),))


def test_soft_labels_refuse_bad_shapes_and_classes():
    values = torch.zeros((1, 3, 2, 2, 2))
    for classes, n, match in ((torch.tensor([1]), 5, "need \\(B, 1"), (torch.tensor([0, 2, 2]), 5, "sorted distinct"),
                              (torch.tensor([0, 2, 5]), 5, r"in \[0, 5\)"), (torch.tensor([2, 0, 1]), 5, "sorted"),
                              (torch.tensor([[0, 1, 2], [0, 1, 3]]), 5, r"classes \(K,\) or \(B, K\)"),
                              (torch.tensor([[0, 3, 1]]), 5, "sorted")):
        with pytest.raises(ValueError, match=match):
            kd.SoftLabels(values, classes, n)
    soft = kd.SoftLabels(values, torch.tensor([0, 1, 4]), 5)
    with pytest.raises(ValueError, match=r"soft labels have shape \(1, 5, 2, 2, 2\) but .* \(1, 4, 2, 2, 2\)"):
        KDLoss(1.0)(torch.zeros((1, 4, 2, 2, 2)), soft)


def test_soft_labels_move_with_the_target_list():
    soft = kd.SoftLabels(torch.rand((1, 2, 2, 2, 2)).half(), torch.tensor([0, 3]), 4)
    moved = soft.to(torch.device("cpu"), non_blocking=True)
    assert moved is not soft and moved.n_classes == 4 and not moved.has_rest
    assert torch.equal(moved.dense(), soft.dense())


# ---------------------------------------------------------------- loss forms: scales, class balance


def ref_class_balanced_kl(z, p, T, mask=None):
    """By hand: group the counted voxels by the teacher's argmax class, mean KL per group, mean over groups."""
    x = z.double() / T
    per = F.kl_div(F.log_softmax(x, 1), p.double(), reduction="none").sum(1)  # (B, *sp)
    cls = p.argmax(1)
    counted = torch.ones_like(cls, dtype=torch.bool) if mask is None else mask[:, 0]
    groups = [per[(cls == c) & counted] for c in range(p.shape[1])]
    means = [g.mean() for g in groups if g.numel()]
    return sum(means) / len(means)


def test_kd_scale_weights():
    assert kd.kd_scale_weights([4 / 7, 2 / 7, 1 / 7, 0.0], "all") == [4 / 7, 2 / 7, 1 / 7, 0.0]
    assert kd.kd_scale_weights([4 / 7, 2 / 7, 1 / 7, 0.0], "full") == [1.0, 0.0, 0.0, 0.0]
    assert kd.kd_scale_weights(None, "full") is None and kd.kd_scale_weights(None, "all") is None
    with pytest.raises(ValueError, match="scales = 'some'.*'full'.*'all'"):
        kd.kd_scale_weights([1.0], "some")


def test_full_resolution_only_is_the_full_resolution_kl_and_leaves_coarse_outputs_alone():
    g = gen(40)
    T = 1.0
    p = rand_probs((2, 3, 8, 8, 8), g)
    outs = [torch.randn((2, 3, *s), generator=g, requires_grad=True) for s in SHAPES]
    value = KDLoss(T, kd.kd_scale_weights([4 / 7, 2 / 7, 1 / 7], "full"))(outs, p)
    assert value.item() == pytest.approx(ref_kl(outs[0], p, T).item(), rel=1e-5)
    value.backward()
    assert outs[0].grad is not None and outs[1].grad is None and outs[2].grad is None


def test_class_balanced_kl_matches_the_by_hand_group_means():
    g = gen(41)
    T = 2.0
    # a background-heavy teacher: class 0 on most voxels, classes 1 and 2 on a few
    logits = torch.randn((2, 3, 4, 4, 4), generator=g)
    logits[:, 0] += 3
    logits[0, 1, :2, :2, :1] += 8
    logits[1, 2, 3:, 3:, 2:] += 8
    p = torch.softmax(logits, 1)
    assert set(p.argmax(1).unique().tolist()) == {0, 1, 2}
    z = torch.randn((2, 3, 4, 4, 4), generator=g) * 2
    mask = torch.rand((2, 1, 4, 4, 4), generator=g) > 0.25
    for m in (None, mask):
        expected = T * T * ref_class_balanced_kl(z, p, T, m)
        assert KDLoss(T, class_balanced=True)(z, p, m).item() == pytest.approx(expected.item(), rel=1e-5)
        plain = T * T * ref_kl(z, p, T, mask=m)
        assert abs(expected.item() - plain.item()) > 1e-3  # the balanced form is another loss, not a rename
    # the weights are 1 / (|K| N_k) at counted voxels: they sum to 1, and each class's sum is 1 / |K|
    w = kd.class_balanced_weights(p, None, 3, mask)
    assert w.sum().item() == pytest.approx(1.0)
    assert not w[~mask].any()
    cls = p.argmax(1, keepdim=True)
    for c in range(3):
        assert w[(cls == c) & mask].sum().item() == pytest.approx(1 / 3)


def test_class_balanced_kl_at_every_scale_uses_each_scales_own_argmax():
    g = gen(42)
    T = 1.0
    p = rand_probs((2, 3, 8, 8, 8), g)
    outs = [torch.randn((2, 3, *s), generator=g) for s in SHAPES]
    w = [0.5, 0.3, 0.2]
    expected = sum(wi * ref_class_balanced_kl(o, downsample_soft(p, s), T) for wi, o, s in zip(w, outs, SHAPES))
    assert KDLoss(T, w, class_balanced=True)(outs, p).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("rest", [False, True])
def test_class_balanced_compact_soft_labels_give_the_dense_loss(rest, per_sample):
    g = gen(43)
    soft, dense = compact_case(g, rest, per_sample=per_sample)
    mask = torch.rand((2, 1, 8, 8, 8), generator=g) > 0.2
    loss = KDLoss(1.0, [4 / 7, 2 / 7, 1 / 7], class_balanced=True)
    results = []
    for target in (soft, dense):
        outs = [(torch.randn((2, 7, *s), generator=gen(44 + i)) * 3).requires_grad_() for i, s in enumerate(SHAPES)]
        value = loss(outs, target, mask)
        value.backward()
        results.append((value, [o.grad for o in outs]))
    (v_compact, g_compact), (v_dense, g_dense) = results
    assert v_compact.item() == pytest.approx(v_dense.item(), rel=1e-5)
    for a, b in zip(g_compact, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("class_balanced", [False, True])
@pytest.mark.parametrize("scales", ["full", "all"])
def test_every_kd_form_passes_gradcheck(class_balanced, scales):
    g = gen(45)
    p = rand_probs((1, 3, 4, 4, 4), g).double()
    shapes = [(4, 4, 4), (2, 2, 2)]
    outs = tuple((torch.randn((1, 3, *s), generator=g, dtype=torch.float64) * 2).requires_grad_() for s in shapes)
    mask = torch.rand((1, 1, 4, 4, 4), generator=g) > 0.2
    for T in (1.0, 3.0):
        loss = KDLoss(T, kd.kd_scale_weights([2 / 3, 1 / 3], scales), class_balanced=class_balanced)
        assert torch.autograd.gradcheck(lambda *zs: loss(list(zs), p, mask), outs)


def by_hand_region_balanced_kl(z, p, T, mask):
    """Loops over regions and their inside / outside groups, with the Bernoulli KL written out."""
    total = 0.0
    q = torch.sigmoid(z.double() / T)
    pd = p.double()
    counted = torch.ones_like(pd[:, :1], dtype=torch.bool) if mask is None else mask
    for r in range(p.shape[1]):
        pr, qr_, c = pd[:, r:r + 1], q[:, r:r + 1], counted
        kl = torch.where(pr > 0, pr * torch.log(pr.clamp_min(1e-300) / qr_), 0.0) \
            + torch.where(pr < 1, (1 - pr) * torch.log((1 - pr).clamp_min(1e-300) / (1 - qr_)), 0.0)
        groups = [sel for sel in ((pr >= 0.5) & c, (pr < 0.5) & c) if sel.any()]
        total += sum(kl[sel].mean() for sel in groups) / max(len(groups), 1)
    return total


def test_region_class_balanced_kl_matches_the_by_hand_group_means():
    g = gen(46)
    T = 2.0
    # region 0 is large (the whole tumour), region 1 small, region 2 absent (never >= 0.5)
    logits = torch.randn((2, 3, 4, 4, 4), generator=g) - 2
    logits[:, 0, 1:, 1:, 1:] += 6
    logits[0, 1, :2, :2, :1] += 8
    logits[:, 2] = -6
    p = torch.sigmoid(logits)
    z = torch.randn((2, 3, 4, 4, 4), generator=g) * 2
    mask = torch.rand((2, 1, 4, 4, 4), generator=g) > 0.25
    for m in (None, mask):
        expected = T * T * by_hand_region_balanced_kl(z, p, T, m)
        got = KDLoss(T, regions=True, class_balanced=True)(z, p, m).item()
        assert got == pytest.approx(float(expected), rel=1e-5)
        plain = KDLoss(T, regions=True)(z, p, m).item()
        assert abs(got - plain) > 1e-3  # another loss, not a rename
    # each region's weights sum to 1 over counted voxels, half inside and half outside where both exist
    w = kd.region_balanced_weights(p, mask)
    assert not w[~mask.expand_as(w)].any()
    for r, halves in ((0, 2), (1, 2), (2, 1)):
        assert w[:, r].sum().item() == pytest.approx(1.0)
        inside = (p[:, r:r + 1] >= 0.5) & mask
        assert w[:, r:r + 1][inside].sum().item() == pytest.approx(0.5 if halves == 2 else 0.0)


def test_region_class_balanced_gradient_is_the_weighted_sigmoid_residual():
    """Region mode computes in float32 (so no float64 gradcheck): its gradient against the closed form
    d/dz [w T^2 KL(p || sigmoid(z / T))] = w T (sigmoid(z / T) - p), w the balanced weights."""
    g = gen(47)
    p = rand_probs((2, 3, 4, 4, 4), g, regions=True)
    mask = torch.rand((2, 1, 4, 4, 4), generator=g) > 0.2
    for T in (1.0, 3.0):
        z = (torch.randn((2, 3, 4, 4, 4), generator=g) * 2).requires_grad_()
        KDLoss(T, regions=True, class_balanced=True)(z, p, mask).backward()
        expected = kd.region_balanced_weights(p, mask) * T * (torch.sigmoid(z.detach() / T) - p)
        torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-7)
