"""The knowledge-distillation loss: student logits against the teacher ensemble's cached soft labels.

The soft labels ``p`` are the teachers' tempered probabilities (``softmax(logits / T)``, or per-region
``sigmoid(logits / T)`` for region-based datasets; :mod:`fastkd.softlabels`) at full resolution. The
student's logits ``z`` are tempered the same way. With ``x = z / T``, ``m`` the mask of counted voxels
(nnU-Net's ignore label and padding excluded) and ``N_s`` the number of counted voxels at scale ``s``::

    loss = sum_s w_s * T^2 * KL_s  +  soft_dice * SD  +  cauchy_schwarz * CS

KL per deep-supervision scale ``s`` (``p_s`` = ``p`` area-downsampled to the scale's shape)::

    softmax mode: KL_s = 1/N_s sum_{v: m_v} sum_c p_c * (log p_c - log_softmax(x)_c)
    region mode:  KL_s = 1/N_s sum_{v: m_v} sum_r [ p_r (log p_r - log sigmoid(x_r))
                                                   + (1-p_r) (log(1-p_r) - log sigmoid(-x_r)) ]

``0 log 0 = 0`` (``p log max(p, tiny)``): uint8-quantised teacher probabilities are often exactly 0.

Class-balanced KL (``class_balanced=True``). The mean over counted voxels lets the
background, 90 % or more of a medical patch, outweigh a 1 % structure 90 to 1. The class-balanced KL
groups the counted voxels by the teachers' most likely class ``k(v) = argmax_c p_c`` (at the scale's own
soft labels) and gives each group of the batch the same total weight::

    KL_s = 1/|K_s| sum_{k in K_s} 1/N_{s,k} sum_{v: m_v, k(v) = k} KL_v

with ``K_s`` the classes that are the argmax of at least one counted voxel of the batch and ``N_{s,k}``
their counted voxels: each structure the teachers see counts as much as the background. The argmax
(not the soft mass) decides the groups, so a class with a little stray probability somewhere is not
made as heavy as the background on those few voxels. The weights carry no gradient; the by-voxel
KL and its gradient are the plain mode's. In region mode (overlapping regions: no one class per voxel)
each region is balanced on its own: its counted voxels inside (``p_r >= 0.5``) and outside weigh the
same in total, and the regions add up as in the plain region KL::

    KL_s = sum_r 1/|G_{s,r}| sum_{g in G_{s,r}} 1/N_{s,r,g} sum_{v: m_v, g_r(v) = g} KL_{v,r}

with ``G_{s,r}`` the groups (inside, outside) of region ``r`` that hold at least one counted voxel of
the batch.
Region mode is one Bernoulli KL per region (never a softmax across regions), computed stably as
``BCE-with-logits(x, p) - H(p)``. The ``T^2`` factor (Hinton et al. 2015) keeps the gradient's size
independent of ``T``. ``w_s`` are used as given (scales of weight 0 are not computed at all): the
trainer passes :func:`kd_scale_weights`, ``(1, 0, ..., 0)`` for KD on the full-resolution output only
(``distillation.scales: full``) or nnU-Net's normalised deep supervision weights (``2^-s``, lowest
resolution 0, sum 1) for KD at every scale (``all``), on the scale of nnU-Net's DC+CE deep-supervision
loss either way.

Like FastnnUNet, KD on the full-resolution output only is available (``scales: full``), but the KL is
averaged over counted voxels only and summed over classes: FastnnUNet's ``F.kl_div(reduction='mean')``
also divides by the number of classes C, so its KD term at the same weight is C times smaller.

How the KD term joins nnU-Net's loss (``distillation.loss``) is the trainer's
:class:`fastkd.student.trainers.DistillationLoss`: ``additive`` keeps nnU-Net's DC+CE at full weight
and adds ``alpha * KD`` on top; ``convex`` is ``(1 - alpha) * DC+CE + alpha * KD``.

Downsampling. The teacher probabilities at a coarser scale are the mean of ``p`` over the counted
voxels of each block (area interpolation, :func:`downsample_soft`; each scale pooled from the one
above where its shape divides exactly), so they still sum to 1 and ignored voxels never leak into
them. The mask is downsampled nearest-exact (:func:`downsample_mask`), exactly as nnU-Net's
``DownsampleSegForDSTransform`` downsamples the target that its own loss masks with.

Optional terms, on the full-resolution output only, with ``q = softmax(x)`` (per-region ``sigmoid(x)``):

- Soft Dice (nnU-Net batch-Dice style: sums over batch and counted voxels, mean over channels ``K``)::

      SD = 1 - 1/|K| sum_{c in K} (2 sum q_c p_c + eps) / (sum q_c^2 + sum p_c^2 + eps),  eps = 1e-5

  ``K`` excludes the background channel 0 in softmax mode (nnU-Net's ``do_bg=False``); all regions in
  region mode (nnU-Net uses ``do_bg=True`` for regions). The denominator is squared (V-Net form), not
  nnU-Net's ``sum q + sum p``: against a *soft* target the linear form is not 1 at ``q = p``
  (``sum p^2 / sum p < 1``) and is maximised by hardening ``q``, whereas
  ``2 <q,p> / (|q|^2 + |p|^2) <= 1`` with equality exactly at ``q = p``. For one-hot targets the two agree.
- Cauchy-Schwarz divergence, per voxel over the class axis, averaged over counted voxels::

      D_CS(p, q) = -log( sum_c p_c q_c / sqrt(sum_c p_c^2 * sum_c q_c^2) )
                 = -log(sum_c p_c q_c + eps) + 1/2 log(sum_c p_c^2 + eps) + 1/2 log(sum_c q_c^2 + eps)

  with ``eps = 1e-7`` (0 at ``q = p`` also with eps; finite when the supports are disjoint). In region
  mode, per region on the Bernoulli vectors ``[p_r, 1-p_r]`` and ``[q_r, 1-q_r]``, summed over regions
  (like the region KL). Related system 004 ("UNet distillation", a Hybrid Distillation Loss) only names
  its terms (classification loss + Dice loss + Cauchy-Schwarz divergence); it gives no formula, weights
  or axis. The definition above is the standard CS divergence ``-log(<p,q> / (|p| |q|))`` applied to
  each voxel's class distribution; temperature, masking, the region form and the log-sum form with eps
  are our choices. It is >= 0 and 0 only when q is proportional to p (for distributions: q = p).

Computing the KL in softmax mode. The teacher term ``sum_c p_c log p_c`` has no gradient and is
computed without autograd; the rest, ``-sum_c p_c log_softmax(x)_c``, goes through one autograd function
(:class:`_SoftmaxCrossEntropy`, which also divides the logits by T, so the division needs no backward
pass of its own) whose backward is ``((sum_c p_c) softmax(x) - p) / T``: one log-softmax over all C
channels forward, one exp backward, nothing else the size of C x voxels. The soft labels may come
as :class:`SoftLabels`, the classes present in each sample's patch (plus a "rest" channel for top-k
caches) as the KD loader ships them: the KL then touches the other classes only through the
log-softmax, which every KL needs, so its cost hardly grows with the classes absent from the patch.
The teacher's entropy term uses ``p log max(p, tiny)`` (torch's ``xlogy`` is not vectorised on the
CPU: a sixth of the whole loss at 119 classes), and the deep-supervision scales are pooled one from
the next; together with per-sample classes the KD loss at 119 classes (patch 64 x 80 x 80, batch 2,
one thread) takes about 0.55x the time it took (ad-hoc timing, old and new alternating in one process). Region
mode, soft Dice and Cauchy-Schwarz use the dense ``(B, C, ...)`` probabilities (:meth:`SoftLabels.dense`).

Neither optional term carries ``T^2``. Everything is computed in float32 with autocast disabled, so fp16
logits from a CUDA autocast forward are fine; gradients flow to the logits only (``soft`` is detached).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

#: smoothing of the soft Dice ratio (nnU-Net's trainer uses 1e-5 too)
DICE_EPS = 1e-5
#: keeps the logs of the Cauchy-Schwarz divergence finite
CS_EPS = 1e-7


def downsample_soft(soft: torch.Tensor, shape: Sequence[int], mask: torch.Tensor | None = None) -> torch.Tensor:
    """Area-downsample probabilities ``(B, C, *spatial)`` to ``shape`` (the same tensor if already there).

    Each output voxel is the mean of its input block (``F.interpolate(mode="area")``, i.e. adaptive
    average pooling), so per-voxel sums over C are preserved. With ``mask`` ((B, 1, *spatial) bool) the
    mean is over the block's counted voxels only; values at uncounted voxels (even NaN) do not matter,
    and a block with no counted voxel becomes 0.
    """
    if mask is not None:
        soft = torch.where(mask, soft, 0.0)
    return _pyramid(soft, [shape], mask)[0]


def _pyramid(p: torch.Tensor, shapes: Sequence[Sequence[int]], mask: torch.Tensor | None) -> list[torch.Tensor]:
    """:func:`downsample_soft` of ``p`` to each of ``shapes`` (highest resolution first), for ``p`` that is
    already 0 wherever ``mask`` is False: area means of the counted voxels, each scale pooled from the
    previous one where that one's shape divides it exactly (block means of block means of equal blocks are
    the block means: one pass over the full-resolution channels instead of one per scale), else from ``p``."""
    full = tuple(p.shape[2:])
    share_full = None if mask is None else mask.to(p.dtype)
    prev = (full, p, share_full)  # (shape, sum of counted values / block size, counted share)
    out = []
    for shape in shapes:
        shape = tuple(int(s) for s in shape)
        if shape == full:
            out.append(p)
            continue
        _, total, share = prev if all(a % b == 0 for a, b in zip(prev[0], shape)) else (full, p, share_full)
        total = F.interpolate(total, size=shape, mode="area")
        share = None if share is None else F.interpolate(share, size=shape, mode="area")
        prev = (shape, total, share)
        out.append(total if share is None else total / share.clamp_min(torch.finfo(p.dtype).tiny))
    return out


def _xlogx(p: torch.Tensor) -> torch.Tensor:
    """``p log p`` with ``0 log 0 = 0`` for ``p >= 0``, as ``torch.xlogy(p, p)`` (to within the smallest
    normal float: p below it counts log of it) but on the vectorised log: xlogy took 24 ns per value on
    a CPU, a sixth of the whole KD loss at 119 classes."""
    return p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def downsample_mask(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """Nearest-exact downsampling of a (B, 1, *spatial) bool mask, as nnU-Net's DownsampleSegForDSTransform
    downsamples the target (so KD counts the voxels nnU-Net's own loss counts at that scale)."""
    shape = tuple(int(s) for s in shape)
    if tuple(mask.shape[2:]) == shape:
        return mask
    return F.interpolate(mask.float(), size=shape, mode="nearest-exact") > 0.5


def kd_mask_from_target(target0: torch.Tensor, ignore_label: int | None, regions: bool) -> torch.Tensor | None:
    """The voxels KD counts, from nnU-Net's full-resolution training target (``batch['target'][0]``
    under deep supervision), or None when every voxel counts (no ignore label).

    - Labels: target (B, 1, *spatial) of label values; counted = ``target != ignore_label``
      (as in nnU-Net's ``DC_and_CE_loss``).
    - Regions: nnU-Net's ``ConvertSegmentationToRegionsTransform`` makes a bool target with one channel
      per region, plus a last channel ``seg == ignore_label`` when the dataset has an ignore label
      (``regions + [ignore_label]`` in ``get_training_transforms``); without one there is no extra
      channel. Counted = ``~target[:, -1:]`` (as in ``DC_and_BCE_loss(use_ignore_label=True)``; any
      dtype, nonzero meaning ignored).

    Returns (B, 1, *spatial) bool.
    """
    if ignore_label is None:
        return None
    if regions:
        return ~target0[:, -1:].bool()
    if target0.shape[1] != 1:
        raise ValueError(f"label target must have shape (B, 1, *spatial), got {tuple(target0.shape)}")
    return target0 != ignore_label


def kd_scale_weights(ds_weights: Sequence[float] | None, scales: str) -> list[float] | None:
    """The KD term's weight per deep-supervision output: ``"all"``: nnU-Net's weights as they are;
    ``"full"``: 1 on the full-resolution output, 0 (not computed) elsewhere. ``ds_weights`` None (no deep
    supervision) stays None: the single output has weight 1 either way."""
    if scales not in ("full", "all"):
        raise ValueError(f"scales = {scales!r}: must be 'full' (KD on the full-resolution output only) or 'all' "
                         "(every deep-supervision output, at nnU-Net's weights)")
    if ds_weights is None:
        return None
    weights = [float(w) for w in ds_weights]
    return weights if scales == "all" else [1.0] + [0.0] * (len(weights) - 1)


def _argmax_class(p: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, *spatial) int64: the class of largest probability among the carried channels of ``p``
    (``classes`` as in :class:`SoftLabels`; None: channel c is class c). A top-k cache's rest channel is
    not a class: the carried classes are the most likely ones."""
    idx = p.argmax(1, keepdim=True)
    if classes is None:
        return idx
    if classes.ndim == 1:
        return classes[idx]
    return classes.gather(1, idx.reshape(idx.shape[0], -1)).reshape(idx.shape)


def class_balanced_weights(p: torch.Tensor, classes: torch.Tensor | None, n_classes: int,
                           mask: torch.Tensor | None) -> torch.Tensor:
    """Per-voxel weights (B, 1, *spatial) of the class-balanced KL (module docstring): ``1 / (|K| N_k(v))`` at
    counted voxels, 0 elsewhere; they sum to 1 (0 when no voxel counts). ``p``: the carried channels
    (B, K, *spatial), no rest channel."""
    with torch.no_grad():
        cls = _argmax_class(p, classes)
        counted = torch.ones_like(cls, dtype=torch.bool) if mask is None else mask
        counts = torch.bincount(cls[counted], minlength=n_classes).to(p.dtype)
        present = (counts > 0).sum().clamp_min(1).to(p.dtype)
        weights = 1.0 / (present * counts.clamp_min(1))
        return torch.where(counted, weights[cls], 0.0)


def region_balanced_weights(p: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-voxel, per-region weights (B, R, *spatial) of the region-mode class-balanced KL (module
    docstring): for each region, ``1 / (|G_r| N_{r,g}(v))`` at counted voxels, with ``g`` inside
    (``p_r >= 0.5``) or outside; each region's weights sum to 1 (0 when no voxel counts)."""
    with torch.no_grad():
        inside = p >= 0.5
        counted = torch.ones_like(inside) if mask is None else mask.expand_as(inside)
        axes = [0, *range(2, p.ndim)]
        n_in = (inside & counted).sum(axes, keepdim=True).to(p.dtype)
        n_out = (~inside & counted).sum(axes, keepdim=True).to(p.dtype)
        groups = ((n_in > 0).to(p.dtype) + (n_out > 0).to(p.dtype)).clamp_min(1)
        weights = torch.where(inside, 1.0 / (groups * n_in.clamp_min(1)), 1.0 / (groups * n_out.clamp_min(1)))
        return torch.where(counted, weights, 0.0)


def _masked_mean(per_voxel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (B, 1, *spatial) values over counted voxels; 0 when none counts (never NaN)."""
    if mask is None:
        return per_voxel.mean()
    return torch.where(mask, per_voxel, 0.0).sum() / mask.sum().clamp_min(1)


class SoftLabels:
    """Teacher probabilities over some of the classes, as the KD loader ships them.

    ``values``: ``(B, K, *spatial)`` for ``classes``, or ``(B, K + 1, *spatial)`` whose last channel is
    the probability of each class not carried (top-k caches spread the rest of the mass evenly); a
    class not carried is 0 otherwise. ``classes``: int64, sorted distinct indices in ``[0, n_classes)``,
    either ``(K,)`` (the same for every sample) or ``(B, K)`` (one row per sample: the KD loader ships
    each sample's own present classes, padded to the batch's largest count with classes that sample
    does not carry, at their value there, 0 or the rest).
    ``.to(device)`` moves it like a tensor, so nnU-Net's ``train_step`` moves it with the target list.
    ``unlabelled``: bool ``(B,)``, the samples from unlabelled images (KD only: the trainer's loss leaves
    them out of the hard loss); None = all labelled. It stays on the CPU (indexing needs no GPU sync).
    """

    def __init__(self, values: torch.Tensor, classes: torch.Tensor, n_classes: int,
                 unlabelled: torch.Tensor | None = None):
        k = classes.shape[-1] if classes.ndim else 0
        if classes.ndim not in (1, 2) or values.ndim < 3 or values.shape[1] not in (k, k + 1) \
                or (classes.ndim == 2 and classes.shape[0] != values.shape[0]):
            raise ValueError(f"soft labels of shape {tuple(values.shape)} for classes of shape {tuple(classes.shape)}: "
                             f"need (B, {k}, *spatial) or (B, {k + 1}, *spatial) with a rest channel, and classes "
                             f"(K,) or (B, K)")
        if k == 0 or int(classes.min()) < 0 or int(classes.max()) >= n_classes \
                or (k > 1 and not bool((classes[..., 1:] > classes[..., :-1]).all())):
            raise ValueError(f"soft-label classes {classes.tolist()}: need sorted distinct indices in [0, {n_classes})")
        if unlabelled is not None and tuple(unlabelled.shape) != (values.shape[0],):
            raise ValueError(f"unlabelled mask of shape {tuple(unlabelled.shape)}: need ({values.shape[0]},), one "
                             "flag per sample")
        self.values, self.classes, self.n_classes = values, classes, int(n_classes)
        self.unlabelled = None if unlabelled is None else unlabelled.bool().cpu()

    @property
    def has_rest(self) -> bool:
        return self.values.shape[1] == self.classes.shape[-1] + 1

    def to(self, device, non_blocking: bool = False) -> "SoftLabels":
        """The same soft labels on ``device`` (not checked again: that would wait for the GPU every step)."""
        moved = object.__new__(SoftLabels)
        moved.values = self.values.to(device, non_blocking=non_blocking)
        moved.classes = self.classes.to(device, non_blocking=non_blocking)
        moved.n_classes = self.n_classes
        moved.unlabelled = self.unlabelled
        return moved

    def dense(self) -> torch.Tensor:
        """float32 ``(B, n_classes, *spatial)`` on the values' device."""
        b, _, *spatial = self.values.shape
        k = self.classes.shape[-1]
        if self.has_rest:
            out = self.values[:, k:].float().expand(b, self.n_classes, *spatial).clone()
        else:
            out = self.values.new_zeros((b, self.n_classes, *spatial), dtype=torch.float32)
        classes = self.classes.to(out.device)
        if classes.ndim == 1:
            out[:, classes] = self.values[:, :k].float()
        else:
            out.scatter_(1, _channel_index(classes, spatial), self.values[:, :k].float())
        return out


def _channel_index(classes: torch.Tensor, spatial) -> torch.Tensor:
    """(B, K) class rows -> an index (B, K, *spatial) for gather / scatter along the channel axis (a view)."""
    return classes.reshape(*classes.shape, *(1,) * len(spatial)).expand(*classes.shape, *spatial)


class _SoftmaxCrossEntropy(torch.autograd.Function):
    """Per voxel ``-sum_c p_c log_softmax(z / T)_c``, (B, 1, *spatial), for p over ``classes`` (None: all
    channels of z; ``(K,)`` or per sample ``(B, K)``, see :class:`SoftLabels`) plus an optional ``rest``
    (B, 1, ...) for every class not carried. Backward ``((sum_c p_c) softmax(z / T) - p) / T`` without
    autograd's C x voxels temporaries (see module docstring); the temperature is applied here, so the
    division of the logits needs no backward pass of its own."""

    @staticmethod
    def forward(ctx, z, p, rest, classes, temperature):
        x = z.float() if z.dtype in (torch.float16, torch.bfloat16) else z  # float32 (float64 in tests) stays
        x = x / temperature if x is z else x.div_(temperature)  # never in place on the caller's logits
        log_q = torch.log_softmax(x, 1)
        del x
        if classes is None:
            carried = log_q
        elif classes.ndim == 1:
            carried = log_q.index_select(1, classes)
        else:
            carried = log_q.gather(1, _channel_index(classes, log_q.shape[2:]))
        cross = (p * carried).sum(1, keepdim=True)
        if rest is not None:
            cross += rest * (log_q.sum(1, keepdim=True) - carried.sum(1, keepdim=True))
        ctx.save_for_backward(log_q, p, rest, classes)
        ctx.temperature = temperature
        return cross.neg_()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        log_q, p, rest, classes = ctx.saved_tensors
        grad = grad / ctx.temperature  # (B, 1, ...): d(z / T) / dz
        mass = p.sum(1, keepdim=True)
        if rest is not None:
            mass += rest * (log_q.shape[1] - p.shape[1])
        out = torch.exp(log_q).mul_(mass * grad)
        if classes is None:
            out -= p * grad
            return out, None, None, None, None
        if rest is None:
            carried = p * grad
            sign = -1
        else:
            out -= rest * grad
            carried = (rest - p) * grad
            sign = 1
        if classes.ndim == 1:
            out.index_add_(1, classes, carried, alpha=sign)
        else:
            out.scatter_add_(1, _channel_index(classes, out.shape[2:]), carried if sign > 0 else carried.neg_())
        return out, None, None, None, None


def _softmax_kl(z: torch.Tensor, p: torch.Tensor, rest: torch.Tensor | None,
                classes: torch.Tensor | None, temperature: float = 1.0) -> torch.Tensor:
    """Per-voxel KL(p || softmax(z / temperature)), (B, 1, *spatial), p over ``classes`` (+ ``rest``) as in
    :class:`_SoftmaxCrossEntropy`."""
    with torch.no_grad():
        entropy = _xlogx(p).sum(1, keepdim=True)
        if rest is not None:
            entropy += _xlogx(rest) * (z.shape[1] - p.shape[1])
    return _SoftmaxCrossEntropy.apply(z, p, rest, classes, float(temperature)) + entropy


def _region_kl(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Per-voxel, per-region Bernoulli KL(p_r || sigmoid(x_r)), (B, R, *spatial)."""
    return F.binary_cross_entropy_with_logits(x, p, reduction="none") + _xlogx(p) + _xlogx(1 - p)


def _kl(x: torch.Tensor, p: torch.Tensor, regions: bool) -> torch.Tensor:
    """Per-voxel KL(p || act(x)) summed over channels, (B, 1, *spatial), p dense over all channels."""
    if regions:
        return _region_kl(x, p).sum(1, keepdim=True)
    return _softmax_kl(x, p, None, None)


def _soft_dice(q: torch.Tensor, p: torch.Tensor, mask: torch.Tensor | None, regions: bool) -> torch.Tensor:
    """1 - batch soft Dice (squared denominator) between student q and teacher p; see module docstring."""
    if not regions:
        q, p = q[:, 1:], p[:, 1:]
    if mask is not None:
        q = torch.where(mask, q, 0.0)
    axes = [0, *range(2, q.ndim)]
    intersect = (q * p).sum(axes)
    denominator = (q * q).sum(axes) + (p * p).sum(axes)
    return 1 - ((2 * intersect + DICE_EPS) / (denominator + DICE_EPS)).mean()


def _cauchy_schwarz(q: torch.Tensor, p: torch.Tensor, regions: bool) -> torch.Tensor:
    """Per-voxel Cauchy-Schwarz divergence, (B, 1, *spatial); see module docstring."""
    if regions:
        pq = p * q + (1 - p) * (1 - q)
        pp = p * p + (1 - p) * (1 - p)
        qq = q * q + (1 - q) * (1 - q)
    else:
        pq, pp, qq = (p * q).sum(1, keepdim=True), (p * p).sum(1, keepdim=True), (q * q).sum(1, keepdim=True)
    cs = -torch.log(pq + CS_EPS) + 0.5 * torch.log(pp + CS_EPS) + 0.5 * torch.log(qq + CS_EPS)
    return cs.sum(1, keepdim=True)


class KDLoss(torch.nn.Module):
    """``sum_s w_s T^2 KL_s + soft_dice * SD + cauchy_schwarz * CS`` (formulas in the module docstring).

    ``ds_weights``: one weight per deep-supervision output, highest resolution first (:func:`kd_scale_weights`);
    None = a single output with weight 1. ``regions``: sigmoid (region-based) outputs and soft labels
    instead of softmax. ``class_balanced``: each teacher-argmax class of the batch weighs the same in
    ``KL_s`` instead of each voxel (region mode: the inside and outside of each region).
    """

    def __init__(self, temperature: float, ds_weights: Sequence[float] | None = None, regions: bool = False,
                 soft_dice: float = 0.0, cauchy_schwarz: float = 0.0, class_balanced: bool = False):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature = {temperature}: must be > 0")
        weights = (1.0,) if ds_weights is None else tuple(float(w) for w in ds_weights)
        if not weights or any(not w >= 0 for w in weights) or not any(w > 0 for w in weights):
            raise ValueError(f"ds_weights = {ds_weights}: must be non-negative with at least one > 0")
        for name, value in (("soft_dice", soft_dice), ("cauchy_schwarz", cauchy_schwarz)):
            if not value >= 0:
                raise ValueError(f"{name} = {value}: must be >= 0")
        self.class_balanced = bool(class_balanced)
        self.temperature = float(temperature)
        self.ds_weights = weights
        self.regions = regions
        self.soft_dice = float(soft_dice)
        self.cauchy_schwarz = float(cauchy_schwarz)

    def forward(self, outputs, soft, mask: torch.Tensor | None = None) -> torch.Tensor:
        """outputs: student logits, a Tensor (B, C, *sp) or a list of them, one per deep-supervision scale,
        highest resolution first (as nnU-Net's network returns them).
        soft: teacher probabilities at full resolution, a Tensor (B, C, *sp) or :class:`SoftLabels`;
        softmax mode: they sum to 1 over C; region mode: each channel an independent probability in [0, 1].
        mask: optional (B, 1, *sp) bool at full resolution, True = voxel counts; None = all voxels.
        Returns a float32 scalar."""
        outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
        self._check(outputs, soft, mask)
        T = self.temperature
        compact = isinstance(soft, SoftLabels)
        if compact and self.regions:  # few channels: the dense form is as cheap
            soft, compact = soft.dense(), False
        values = soft.values if compact else soft
        with torch.autocast(values.device.type, enabled=False):
            # clamp: resampled soft labels may overshoot [0, 1] by ~1e-7, and log of a negative is NaN
            p = values.detach().to(torch.float32, copy=True).clamp_(0, 1)  # our copy: in place from here
            if mask is not None:
                p.masked_fill_(~mask, 0.0)
            classes = soft.classes.to(p.device) if compact else None
            k = p.shape[1] if classes is None else classes.shape[-1]
            loss = torch.zeros((), dtype=torch.float32, device=p.device)
            weighted = [(w, z) for w, z in zip(self.ds_weights, outputs) if w != 0]
            for (w, z), p_s in zip(weighted, _pyramid(p, [z.shape[2:] for _, z in weighted], mask)):
                m = None if mask is None else downsample_mask(mask, z.shape[2:])
                if self.regions and self.class_balanced:
                    kl = (_region_kl(z.float() / T, p_s) * region_balanced_weights(p_s, m)).sum()
                elif self.regions:
                    kl = _masked_mean(_kl(z.float() / T, p_s, True), m)
                else:
                    rest = p_s[:, k:] if p_s.shape[1] > k else None
                    per_voxel = _softmax_kl(z, p_s[:, :k], rest, classes, T)
                    if self.class_balanced:
                        kl = (per_voxel * class_balanced_weights(p_s[:, :k], classes, z.shape[1], m)).sum()
                    else:
                        kl = _masked_mean(per_voxel, m)
                loss = loss + w * T * T * kl
            if self.soft_dice or self.cauchy_schwarz:
                if compact:
                    p = SoftLabels(p, classes, soft.n_classes).dense()
                x = outputs[0].float() / T
                q = torch.sigmoid(x) if self.regions else torch.softmax(x, dim=1)
                if self.soft_dice:
                    loss = loss + self.soft_dice * _soft_dice(q, p, mask, self.regions)
                if self.cauchy_schwarz:
                    loss = loss + self.cauchy_schwarz * _masked_mean(_cauchy_schwarz(q, p, self.regions), mask)
        return loss

    def _check(self, outputs: list, soft: torch.Tensor, mask: torch.Tensor | None) -> None:
        if len(outputs) != len(self.ds_weights):
            raise ValueError(f"{len(outputs)} student outputs but {len(self.ds_weights)} ds_weights "
                             f"{list(self.ds_weights)}: need one weight per deep-supervision output")
        full = outputs[0]
        if isinstance(soft, SoftLabels):
            values = soft.values
            shape = (values.shape[0], soft.n_classes, *values.shape[2:])
        else:
            values = soft
            shape = tuple(soft.shape)
        if shape != tuple(full.shape):
            raise ValueError(f"soft labels have shape {shape} but the full-resolution student output "
                             f"has {tuple(full.shape)}: they must match (B, C, *spatial)")
        if not values.is_floating_point():
            raise ValueError(f"soft labels have dtype {values.dtype}: must be probabilities in a float dtype")
        if not self.regions and full.shape[1] < 2:
            raise ValueError(f"softmax mode needs at least 2 channels, got output shape {tuple(full.shape)}")
        for i, z in enumerate(outputs[1:], 1):
            if z.shape[:2] != full.shape[:2] or z.ndim != full.ndim \
                    or any(a > b for a, b in zip(z.shape[2:], full.shape[2:])):
                raise ValueError(f"student output {i} has shape {tuple(z.shape)}, not a downsampled version of "
                                 f"output 0 {tuple(full.shape)}: same B and C, no larger spatial size")
        if mask is not None:
            expected = (full.shape[0], 1, *full.shape[2:])
            if tuple(mask.shape) != expected or mask.dtype != torch.bool:
                raise ValueError(f"mask has shape {tuple(mask.shape)} and dtype {mask.dtype} but the student "
                                 f"output has {tuple(full.shape)}: need bool {expected}")
