"""A soft-label cache we know the answer for: the one-hot of each case's own preprocessed segmentation
(uint8, exact 0 / 255), and a KD loader over it whose batches are read back densely, for the loader tests."""

from pathlib import Path
from types import SimpleNamespace

import blosc2
import numpy as np
import torch
from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from fastkd import cache
from fastkd.student.loader import KDDataLoader
from fastkd.student.loss import SoftLabels

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
