"""nnU-Net's training data loader, plus the cached soft labels of every patch it samples.

:class:`KDDataLoader` is nnU-Net's own ``nnUNetDataLoader``: same case sampling, same foreground
oversampling, same boxes (half-open voxel ranges in the preprocessed grid that may reach outside the
volume). It hooks three points of the parent's batch loop instead of copying it:

- ``get_indices``: remembers the batch's case keys and empties the queue below;
- ``get_bbox``: queues each sample's (case key, box) (the parent discards the box after cropping).
  ``get_bbox`` is not told the case (only its shape, ``force_fg`` and class locations), so the key is
  the next of ``get_indices``' keys: the parent calls ``get_bbox`` once per sample, in the keys' order;
- the transforms: a wrapper takes the oldest queued (case key, box), first in first out, and reads
  that box from the soft-label cache, keeping only the classes present in it
  (:meth:`fastkd.cache.SoftLabelCache.read_crop_classes`: the classes above zero in the stored crop,
  plus background; float32, zero outside the volume; top-k caches add one "rest" channel, the mass
  spread over the classes not stored), and hands those channels to nnU-Net's augmentation as
  ``regression_target``.

The queue pairs the n-th transforms call with the n-th ``get_bbox`` call, so the pairing holds whether
the parent's batch loop crops and transforms one sample at a time (nnU-Net 2.8's loop) or first calls
``get_bbox`` for every sample and only then runs the transforms per sample (nnU-Net's development
branch); remembering only the latest box would give every sample but the last another sample's soft
labels there. A transforms call with nothing queued, or boxes left over at the end of the batch, raises
``RuntimeError``: the parent's loop no longer calls ``get_bbox`` and the transforms once per sample.

batchgeneratorsv2 resamples ``regression_target`` on the same grid as image and segmentation in every
spatial transform (rotation, scaling, elastic in DA5, mirroring, transposes, pseudo-2D), and its
intensity-only and segmentation-only transforms leave it alone: the soft labels move exactly with the
segmentation and are never blurred, noised or gamma-corrected. Every spatial transform interpolates
linearly per channel, so a class that is zero in the whole crop stays zero and one equal to "rest"
stays equal to the resampled rest: carrying only the present classes (plus rest) gives exactly what
carrying all C would, at a cost that grows with the classes in the crop, not with C. After
augmentation the padding is given to the background class (softmax caches; region caches stay 0 =
"not in the region") and values are clamped to [0, 1] because trilinear weights overshoot by ~1e-7.

The batch gains ``batch["softlabels"]``: float16 ``(B, K, *patch)`` over each sample's own present
classes ``batch["softlabel_classes"]`` (int64 ``(B, K)``, one sorted row per sample, K the largest
count in the batch, shorter rows padded with classes the sample does not carry; top-k caches:
``(B, K + 1, ...)``, the last channel the rest), half the bytes of float32 and K <= C channels
through nnU-Net's worker queue. The trainer hands both to the KD loss as
:class:`fastkd.student.loss.SoftLabels`, whose KL works on the carried classes
(``SoftLabels.dense()`` gives float32 ``(B, C, *patch)``).

The reader's "valid" channel is not augmented: inside the volume a voxel's probabilities sum to one
and the padding is zero, and every spatial transform interpolates linearly, so after augmentation the
sum over classes *is* the valid fraction. ``1 - sum`` goes to the background, which is what carrying
the valid channel would give, for one channel less through the costliest transform.

The cache is opened lazily in each process, so nnU-Net's augmentation workers (forked) each hold
their own reader.

**Unlabelled images** (``dataset.unlabelled``, :mod:`fastkd.unlabelled`): the KD trainer hands the loader
a :class:`WithUnlabelled` dataset (the training cases plus the cache's unlabelled cases, each read from
its own preprocessed folder, an unlabelled case with the teachers' class locations from the cache in
place of a label's) and the share ``s`` of each batch to draw from the unlabelled cases. ``get_indices``
draws ``floor(s B)`` unlabelled samples plus one more with probability ``s B - floor(s B)`` (so the
expected share is exactly ``s``), the rest from the training cases, each with replacement as nnU-Net
does, and shuffles their order so nnU-Net's foreground oversampling (the last third of the batch) falls
on both kinds. The batch gains ``batch["unlabelled"]``, a bool ``(B,)`` tensor: the trainer drops those
samples from the hard loss.
"""

from __future__ import annotations

import os
from collections import deque

import numpy as np
import torch
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


class _SoftLabelTransforms:
    """Calls nnU-Net's transforms with the current sample's soft labels as ``regression_target``."""

    def __init__(self, loader: "KDDataLoader", transforms):
        self.loader = loader
        self.transforms = transforms

    def __call__(self, **sample):
        loader = self.loader
        if not loader.pending:
            raise RuntimeError(f"KDDataLoader: the transforms were called for a sample with no get_bbox box queued "
                               f"({loader.sample + 1} get_bbox and {len(loader.softlabels)} transforms calls so far "
                               f"in a batch of {len(loader.keys)}); nnUNetDataLoader's batch loop changed (expected "
                               "one get_bbox call per sample before or with that sample's transforms call)")
        key, box = loader.pending.popleft()  # the oldest box: get_bbox and transforms are paired in call order
        values, classes, rest = loader.cache.read_crop_classes(key, box)
        soft = torch.from_numpy(values if rest is None else np.concatenate([values, rest[None]]))
        if loader.patch_size_was_2d:  # as the parent does with image and segmentation
            soft = soft[:, 0]
        if self.transforms is not None:
            sample = self.transforms(**sample, regression_target=soft)
            soft = sample.pop("regression_target")
        else:
            sample = dict(sample)
        loader.softlabels.append(finish_classes(soft, classes, loader.cache.num_channels, rest is not None,
                                                loader.softmax))
        return sample


def finish_softlabels(soft: torch.Tensor, softmax: bool) -> torch.Tensor:
    """(C, ...) augmented probabilities -> (C, ...) probabilities in [0, 1].

    For softmax caches the padding (1 - the sum over classes) becomes background, so every voxel sums
    to one; region caches are only clamped.
    """
    probs = soft.clone()
    if softmax:
        probs[0] += 1 - probs.sum(0)
    return probs.clamp_(0, 1)


def finish_classes(soft: torch.Tensor, classes: np.ndarray, n_classes: int, has_rest: bool,
                   softmax: bool) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`finish_softlabels` on the present classes, in place (``soft`` is the sample's own tensor, fresh
    from the reader and augmentation: a copy of ~50 channels x the patch cost ~0.2 s per sample at 119
    classes): ``soft`` is ``(K [+ 1 rest], ...)`` for ``classes`` (class 0 among them for softmax); the
    padding goes to background, counting the rest channel once per class not carried. Returns (float32
    ``(K [+ 1], ...)``, classes)."""
    probs = soft
    if softmax:
        k = len(classes)
        total = probs[:k].sum(0) + (probs[k] * (n_classes - k) if has_rest else 0)
        probs[int(np.flatnonzero(classes == 0)[0])] += 1 - total
    return probs.clamp_(0, 1), classes


def collate(samples: list[tuple[torch.Tensor, np.ndarray]], has_rest: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (values, classes) -> float16 ``(B, K [+ 1], ...)`` and int64 classes ``(B, K)``, one row
    per sample, K the largest count in the batch. A sample with fewer classes is padded with the lowest
    classes it does not carry, at the value it gives them (0 for dense caches, its rest channel for
    top-k), so every row is that sample's own soft labels, exactly: a batch costs the largest crop's
    classes, not the union of all crops' (twice as many channels at batch 2 on CT-sized volumes)."""
    k_max = max(len(classes) for _, classes in samples)
    spatial = samples[0][0].shape[1:]
    out = torch.zeros((len(samples), k_max + has_rest, *spatial), dtype=torch.float16)
    rows = np.empty((len(samples), k_max), np.int64)
    for i, (values, classes) in enumerate(samples):
        k = len(classes)
        # among 0 .. k_max - 1 at most k are carried, so the pads are classes < k_max <= C
        pads = np.setdiff1d(np.arange(k_max), classes)[:k_max - k]
        rows[i] = np.sort(np.concatenate([classes, pads]))
        if has_rest:
            out[i] = values[k].to(torch.float16)  # pads (and the rest channel) get the rest, then the carried
        out[i, torch.from_numpy(np.searchsorted(rows[i], classes))] = values[:k].to(torch.float16)
    return out, torch.from_numpy(rows)


class WithUnlabelled:
    """The training cases (an nnU-Net dataset) plus unlabelled cases (another, on their own folder), as one
    dataset for ``nnUNetDataLoader``: ``identifiers`` and ``load_case``, whose properties of an unlabelled
    case carry the teachers' ``class_locations`` from the soft-label cache at ``cache_path``."""

    def __init__(self, labelled, unlabelled, cache_path: str):
        clash = sorted(set(labelled.identifiers) & set(unlabelled.identifiers))
        if clash:
            raise ValueError(f"cases both labelled and unlabelled: {clash[:5]}")
        self.labelled, self.unlabelled = labelled, unlabelled
        self.unlabelled_ids = frozenset(unlabelled.identifiers)
        self.identifiers = sorted([*labelled.identifiers, *unlabelled.identifiers])
        self.cache_path = str(cache_path)
        self._cache, self._cache_pid = None, None

    def __getitem__(self, identifier):
        return self.load_case(identifier)

    def load_case(self, identifier):
        if identifier not in self.unlabelled_ids:
            return self.labelled.load_case(identifier)
        data, seg, seg_prev, properties = self.unlabelled.load_case(identifier)
        if self._cache_pid != os.getpid():
            from fastkd.cache import SoftLabelCache

            self._cache, self._cache_pid = SoftLabelCache(self.cache_path), os.getpid()
        return data, seg, seg_prev, {**properties, "class_locations": self._cache.class_locations(identifier)}


class KDDataLoader(nnUNetDataLoader):
    """``nnUNetDataLoader`` whose batches also carry the cached soft labels of each sampled box.

    ``cache_path``: a complete soft-label cache on the same preprocessed grid (checked by the trainer).
    ``softmax``: whether the cache holds softmax probabilities (else per-region sigmoids).
    ``unlabelled_share``: the expected share of each batch drawn from the dataset's unlabelled cases
    (a :class:`WithUnlabelled` dataset; the module docstring).
    """

    def __init__(self, *args, cache_path: str, softmax: bool = True, unlabelled_share: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        unlabelled = getattr(self._data, "unlabelled_ids", frozenset())
        if not 0 <= unlabelled_share <= 1:
            raise ValueError(f"student.unlabelled_share = {unlabelled_share}: must be between 0 and 1")
        self.unlabelled_share = float(unlabelled_share)
        self.pools = ([k for k in self.indices if k not in unlabelled], sorted(unlabelled))
        if self.unlabelled_share < 1 and not self.pools[0]:
            raise ValueError("no labelled training case to draw from")
        self.cache_path = str(cache_path)
        self.softmax = softmax
        self.transforms = _SoftLabelTransforms(self, self.transforms)
        self._cache, self._cache_pid = None, None
        # keys: the batch's cases (get_indices); sample: index of the latest get_bbox call in the batch;
        # pending: (case key, box) per get_bbox call, not yet taken by the transforms (first in first out)
        self.keys, self.sample, self.pending, self.softlabels = [], -1, deque(), []

    @property
    def cache(self):
        if self._cache_pid != os.getpid():
            from fastkd.cache import SoftLabelCache

            self._cache, self._cache_pid = SoftLabelCache(self.cache_path), os.getpid()
        return self._cache

    def get_indices(self):
        self.keys = list(self._mixed_indices() if self.pools[1] else super().get_indices())
        self.sample, self.pending, self.softlabels = -1, deque(), []
        return self.keys

    def _mixed_indices(self) -> list:
        """``batch_size`` keys, ``unlabelled_share`` of them unlabelled in expectation, in random order."""
        want = self.unlabelled_share * self.batch_size
        n_unlabelled = int(np.floor(want)) + int(np.random.uniform() < want - np.floor(want))
        labelled, unlabelled = self.pools
        keys = list(np.random.choice(unlabelled, n_unlabelled, replace=True)) if n_unlabelled else []
        if self.batch_size > n_unlabelled:
            keys += list(np.random.choice(labelled, self.batch_size - n_unlabelled, replace=True))
        return [keys[i] for i in np.random.permutation(len(keys))]

    def get_bbox(self, *args, **kwargs):
        """The parent's box, queued with its case: the parent passes the case's shape, ``force_fg`` and class
        locations, not its key, and calls this once per sample in the order of ``get_indices``' keys."""
        lbs, ubs = super().get_bbox(*args, **kwargs)
        self.sample += 1
        if self.sample >= len(self.keys):
            raise RuntimeError(f"KDDataLoader: get_bbox call {self.sample + 1} for a batch of {len(self.keys)} "
                               "cases; nnUNetDataLoader's batch loop changed (expected one get_bbox call per sample)")
        self.pending.append((str(self.keys[self.sample]), [[int(lo), int(hi)] for lo, hi in zip(lbs, ubs)]))
        return lbs, ubs

    def generate_train_batch(self):
        batch = super().generate_train_batch()
        n, boxes, crops = len(batch["keys"]), self.sample + 1, len(self.softlabels)
        if self.pending or not n == boxes == crops:
            raise RuntimeError(f"KDDataLoader: a batch of {n} samples made {boxes} get_bbox and {crops} transforms "
                               f"calls ({len(self.pending)} boxes left over without soft labels); "
                               "nnUNetDataLoader's batch loop changed (expected one get_bbox and one transforms "
                               "call per sample, in the same order)")
        batch["softlabels"], batch["softlabel_classes"] = collate(self.softlabels, bool(self.cache.top_k))
        unlabelled = getattr(self._data, "unlabelled_ids", frozenset())
        batch["unlabelled"] = torch.tensor([str(k) in unlabelled for k in batch["keys"]], dtype=torch.bool)
        self.softlabels = []
        return batch
