"""The student trainer: nnU-Net's ``nnUNetTrainer`` plus cached soft labels and a KD loss term.

Like nnU-Net's own variants, these are small subclasses that override only the hooks KD needs:

- ``__init__`` reads the student's settings from ``fastkd_student.json`` in its own fold folder
  (nnU-Net constructs trainers with exactly ``(plans, configuration, fold, dataset_json, device)``;
  a file beside the checkpoints also reaches the processes of ``-num_gpus`` training and documents
  how the student was trained) and applies the schedule;
- ``_build_loss`` wraps nnU-Net's DC+CE (or DC+BCE for regions) with deep supervision in
  :class:`DistillationLoss`: ``(1 - alpha) * nnU-Net loss + alpha * KD``, KD from
  :class:`fastkd.student.loss.KDLoss` at every deep-supervision scale with nnU-Net's scale weights;
- ``get_dataloaders`` puts :class:`fastkd.student.loader.KDDataLoader` in place of the training
  loader (validation keeps the stock loader and the plain nnU-Net loss, so the pseudo-Dice and the
  validation loss curves compare with a plain nnU-Net run);
- ``train_step`` appends the batch's soft labels to nnU-Net's target list; the parent's step moves
  them to the device, runs autocast, the loss, gradient clipping and the optimizer unchanged;
- ``on_train_start`` checks the cache against the student (temperature, labels, grid, configuration,
  every training case's shape) before any step, so a mismatched cache is an error, not a bad model;
- ``do_split`` / ``on_epoch_start`` rotate the training split every ``rotate_every`` epochs (fold
  ``f`` trains on split ``(f + epoch // rotate_every) % n_splits``); the loaders are rebuilt when it
  changes, and a resumed run lands on the same split because it depends only on the epoch;
- ``save_checkpoint`` writes atomically (temporary file, then rename: a kill never leaves a truncated
  checkpoint) and records ``trainer_name = "nnUNetTrainer"``: the student network is built exactly
  as nnU-Net builds it from the plans, so stock ``nnUNetv2_predict`` loads the model folder without
  knowing fastkd. The KD settings ride along under the checkpoint key ``"fastkd"``.

With ``alpha = 0`` (the no-KD baseline, trained into ``nnUNetTrainerFastKDNoKD__...``) the trainer
reads no cache and uses nnU-Net's loss and loader unchanged.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

from fastkd.errors import FastkdError
from fastkd.student import trainer_name

SETTINGS_FILE = "fastkd_student.json"
#: what the checkpoint says built the network; the student's architecture is nnU-Net's own
STOCK_TRAINER = "nnUNetTrainer"


class DistillationLoss(torch.nn.Module):
    """``(1 - alpha) * hard(output, target) + alpha * kd(output, soft, mask)``.

    ``target`` is nnU-Net's target (a list under deep supervision); during training the soft labels
    ride as one extra last element (see :meth:`nnUNetTrainerFastKD.train_step`). Without it (the
    validation step) this is nnU-Net's loss alone.
    """

    def __init__(self, hard, kd, alpha: float, ignore_label: int | None, regions: bool, deep_supervision: bool):
        super().__init__()
        self.hard, self.kd, self.alpha = hard, kd, float(alpha)
        self.ignore_label, self.regions, self.deep_supervision = ignore_label, regions, deep_supervision
        self.last = {}

    def forward(self, output, target):
        n_targets = len(output) if self.deep_supervision else 1
        if not isinstance(target, list) or len(target) == n_targets:
            return self.hard(output, target)
        from fastkd.student.loss import kd_mask_from_target

        *target, soft = target
        target = target if self.deep_supervision else target[0]
        hard = self.hard(output, target)
        full_res = target[0] if self.deep_supervision else target
        kd = self.kd(output, soft, kd_mask_from_target(full_res, self.ignore_label, self.regions))
        self.last = {"hard": hard.detach(), "kd": kd.detach()}
        return (1 - self.alpha) * hard + self.alpha * kd


class nnUNetTrainerFastKD(nnUNetTrainer):
    """Student trainer with knowledge distillation from a soft-label cache (alpha > 0)."""

    requires_kd = True

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.settings = load_settings(Path(self.output_folder))
        s = self.settings
        if self.requires_kd != (s["alpha"] > 0):
            raise FastkdError(f"{type(self).__name__} trains with alpha {'> 0' if self.requires_kd else '= 0'}, "
                              f"but {self.output_folder}/{SETTINGS_FILE} has alpha = {s['alpha']}")
        self.num_epochs = s["epochs"]
        self.num_iterations_per_epoch = s["iterations_per_epoch"]
        self.num_val_iterations_per_epoch = s["val_iterations_per_epoch"]
        self.save_every = s["save_every"]
        if s.get("batch_size"):
            # the trainer's own copy of the configuration; plans.json keeps the planned batch size
            self.configuration_manager.configuration["batch_size"] = s["batch_size"]
        self._split = None

    @property
    def kd_enabled(self) -> bool:
        return self.settings["alpha"] > 0

    # -- loss ------------------------------------------------------------------------------------
    def _build_loss(self):
        hard = super()._build_loss()
        if not self.kd_enabled:
            return hard
        from fastkd.student.loss import KDLoss

        s = self.settings
        kd = KDLoss(s["temperature"],
                    ds_weights=list(hard.weight_factors) if self.enable_deep_supervision else None,
                    regions=self.label_manager.has_regions,
                    soft_dice=s.get("soft_dice", 0.0), cauchy_schwarz=s.get("cauchy_schwarz", 0.0))
        return DistillationLoss(hard, kd, s["alpha"], self.label_manager.ignore_label,
                                self.label_manager.has_regions, self.enable_deep_supervision)

    def train_step(self, batch: dict) -> dict:
        if not self.kd_enabled:
            return super().train_step(batch)
        target, soft = batch["target"], batch.pop("softlabels")
        batch["target"] = [*target, soft] if isinstance(target, list) else [target, soft]
        out = super().train_step(batch)
        out.update({f"{k}_loss": v.cpu().numpy() for k, v in self.loss.last.items()})
        return out

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        if self.kd_enabled and train_outputs and "kd_loss" in train_outputs[0]:
            import numpy as np

            parts = {k: float(np.mean([o[k] for o in train_outputs])) for k in ("hard_loss", "kd_loss")}
            self.print_to_log_file(f"train hard loss {parts['hard_loss']:.4f}, KD loss {parts['kd_loss']:.4f}")
            self._log_kd(parts)

    def _log_kd(self, parts: dict) -> None:
        """Append the epoch's loss parts to ``kd_losses.json`` (the report plots them)."""
        if self.local_rank != 0:
            return
        path = Path(self.output_folder) / "kd_losses.json"
        rows = json.loads(path.read_text()) if path.is_file() else []
        rows = [r for r in rows if r["epoch"] < self.current_epoch] + [{"epoch": self.current_epoch, **parts}]
        from fastkd.io import atomic_write_text

        atomic_write_text(path, json.dumps(rows) + "\n")

    # -- data ------------------------------------------------------------------------------------
    def on_train_start(self):
        if self.kd_enabled:
            self.check_cache()
        super().on_train_start()
        self.print_to_log_file(f"fastkd student settings: {json.dumps(self.settings)}")

    def check_cache(self) -> None:
        """The cache must match the student: T, labels, grid, configuration and every case's shape."""
        import blosc2

        from fastkd.cache import SoftLabelCache

        if self.dataset_class is None:
            from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

            self.dataset_class = infer_dataset_class(self.preprocessed_dataset_folder)
        cache = SoftLabelCache(self.settings["cache"])
        tr_keys, val_keys = self.do_split()
        folder = Path(self.preprocessed_dataset_folder)
        shapes = {}
        for case in sorted(set(tr_keys)):
            b2nd = folder / f"{case}.b2nd"
            shapes[case] = list(blosc2.open(str(b2nd), mode="r").shape) if b2nd.is_file() else None
        missing = [c for c, s in shapes.items() if s is None]
        if missing:
            raise FastkdError(f"{folder} lacks preprocessed cases {', '.join(missing[:5])}: preprocess with the "
                              "teacher plans first")
        cache.check(temperature=self.settings["temperature"], labels=self.dataset_json["labels"],
                    data_identifier=self.configuration_manager.data_identifier,
                    configuration=self.configuration_name, shapes=shapes)
        if (cache.provenance["activation"] == "softmax") == self.label_manager.has_regions:
            raise FastkdError(f"soft-label cache {cache.path} holds {cache.provenance['activation']} probabilities "
                              f"but the student is {'region' if self.label_manager.has_regions else 'label'}-based")

    def get_dataloaders(self):
        if not self.kd_enabled:
            return super().get_dataloaders()
        # nnU-Net builds its loaders inline; swap the class it uses for the training loader (the first
        # one it builds) and let the parent do everything else.
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as module

        from fastkd.student.loader import KDDataLoader

        stock, built = module.nnUNetDataLoader, []

        def make_loader(*args, **kwargs):
            if not built:
                loader = KDDataLoader(*args, cache_path=self.settings["cache"],
                                      softmax=not self.label_manager.has_regions, **kwargs)
            else:
                loader = stock(*args, **kwargs)
            built.append(loader)
            return loader

        module.nnUNetDataLoader = make_loader
        try:
            loaders = super().get_dataloaders()
        finally:
            module.nnUNetDataLoader = stock
        if len(built) != 2:
            raise RuntimeError(f"expected nnUNetTrainer.get_dataloaders to build 2 loaders (train, val), it built {len(built)}")
        return loaders

    # -- fold rotation ---------------------------------------------------------------------------
    def split_for_epoch(self, epoch: int):
        """The split epoch ``epoch`` trains on; the final validation uses the last epoch's."""
        every = self.settings.get("rotate_every", 0)
        if self.fold == "all" or not every:
            return self.fold
        epoch = min(epoch, self.num_epochs - 1)
        return (int(self.fold) + epoch // every) % self.settings.get("n_splits", 5)

    def do_split(self):
        split = self.split_for_epoch(self.current_epoch)
        fold, self.fold = self.fold, split
        try:
            return super().do_split()
        finally:
            self.fold = fold

    def on_epoch_start(self):
        split = self.split_for_epoch(self.current_epoch)
        if self._split is not None and split != self._split:
            self.print_to_log_file(f"fold rotation: epoch {self.current_epoch} trains on split {split} "
                                   f"(was {self._split})")
            self._shutdown_dataloaders()
            self.dataloader_train, self.dataloader_val = self.get_dataloaders()
        self._split = split
        super().on_epoch_start()

    def _shutdown_dataloaders(self):
        for loader in (self.dataloader_train, self.dataloader_val):
            if hasattr(loader, "_finish"):
                loader._finish()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.settings.get("validation_mirroring", True):
            return super().perform_actual_validation(save_probabilities)
        axes, self.inference_allowed_mirroring_axes = self.inference_allowed_mirroring_axes, None
        try:
            return super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        tmp = f"{filename}.partial"
        super().save_checkpoint(tmp)
        checkpoint = torch.load(tmp, map_location="cpu", weights_only=False)
        checkpoint["trainer_name"] = STOCK_TRAINER
        checkpoint["fastkd"] = {"trainer": type(self).__name__, "settings": self.settings}
        torch.save(checkpoint, tmp)
        os.replace(tmp, filename)


class nnUNetTrainerFastKD_DA5(nnUNetTrainerFastKD, nnUNetTrainerDA5):
    """KD student with nnU-Net's DA5 augmentation (its transforms also carry the soft labels)."""


class nnUNetTrainerFastKDNoKD(nnUNetTrainerFastKD):
    """The no-KD baseline: same student plans, schedule and checkpointing, alpha = 0 (nnU-Net's loss)."""

    requires_kd = False


class nnUNetTrainerFastKDNoKD_DA5(nnUNetTrainerFastKDNoKD, nnUNetTrainerDA5):
    """The no-KD baseline with DA5."""


TRAINERS = {c.__name__: c for c in (nnUNetTrainerFastKD, nnUNetTrainerFastKD_DA5,
                                    nnUNetTrainerFastKDNoKD, nnUNetTrainerFastKDNoKD_DA5)}


def trainer_class(kd: bool, da5: bool) -> type:
    return TRAINERS[trainer_name(kd, da5)]


def load_settings(fold_folder: Path) -> dict:
    path = Path(fold_folder) / SETTINGS_FILE
    if not path.is_file():
        raise FastkdError(f"{path} is missing: fastkd student trainers are started by `fastkd train-student` "
                          "or `nnUNetv2_distillation_train`, which write their settings there")
    return json.loads(path.read_text())
