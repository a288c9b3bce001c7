"""The student trainers: nnU-Net's ``nnUNetTrainer`` plus the student's schedule, and for the KD student
cached soft labels and a KD loss term.

Written into the student's nnU-Net fold folder, besides nnU-Net's own files: checkpoints that stock
nnU-Net loads (``trainer_name = "nnUNetTrainer"``: the student network is built exactly as nnU-Net
builds it from the plans, so ``nnUNetv2_predict`` runs it without knowing fastkd; the trainer and its
settings ride along under the key ``"fastkd"``), ``kd_losses.json`` (KD students: hard and KD loss per
epoch, for the report), a ``"fastkd"`` entry in nnU-Net's ``validation/summary.json`` saying whether
the validation was optimistic (see :func:`validation_note`), and ``previous_run/`` (what an earlier
run left when this one started from scratch).

Like nnU-Net's own variants (``nnUNetTrainerDA5`` overrides only the augmentation), each class adds
one concern:

- :class:`nnUNetTrainerFastKDBase`, what both students need:

  - ``__init__`` reads the settings from ``fastkd_student.json`` in its own fold folder (nnU-Net
    constructs trainers with exactly ``(plans, configuration, fold, dataset_json, device)``; a file
    beside the checkpoints also reaches the processes of multi-GPU training and documents how the
    student was trained; layout: :mod:`fastkd.student.run`), refuses settings of the other student
    (class attribute :attr:`~nnUNetTrainerFastKDBase.kd`) and applies the schedule;
  - ``on_train_start`` moves an earlier run's checkpoints to ``previous_run/`` when this run starts
    from scratch, once nnU-Net's start-up (and the KD student's cache check) has passed, so a run that
    fails to start leaves the trained model in place;
  - ``do_split`` / ``on_epoch_start`` rotate the training split every ``schedule.rotate_every``
    epochs (fold ``f`` trains on split ``(f + epoch // rotate_every) % 5``); the loaders are rebuilt
    when it changes, and a resumed run lands on the same split because it depends only on the epoch;
  - ``perform_actual_validation`` runs nnU-Net's final validation (without test-time mirroring when
    ``validation_mirroring`` is false) and marks its ``summary.json``;
  - ``save_checkpoint`` writes nnU-Net's checkpoint once, to a temporary file renamed into place (a
    kill never leaves a truncated checkpoint).

- :class:`nnUNetTrainerFastKDNoKD`, the baseline: the base as it is (nnU-Net's loss and loader).
- :class:`nnUNetTrainerFastKD`, the distilled student:

  - ``_build_loss`` wraps nnU-Net's DC+CE (or DC+BCE for regions) with deep supervision in
    :class:`DistillationLoss`: ``nnU-Net loss + alpha * KD`` (``distillation.loss: additive``) or
    ``(1 - alpha) * nnU-Net loss + alpha * KD`` (``convex``), KD from :class:`fastkd.student.loss.KDLoss`
    on the full-resolution output or at every deep-supervision scale (``distillation.scales``), plain or
    class-balanced (``distillation.class_balanced``);
  - ``get_dataloaders`` puts :class:`fastkd.student.loader.KDDataLoader` in place of the training
    loader (validation keeps the stock loader and the plain nnU-Net loss, so the pseudo-Dice and the
    validation loss curves compare with a plain nnU-Net run);
  - ``train_step`` appends the batch's soft labels (:class:`fastkd.student.loss.SoftLabels`, the
    classes present in the batch, never expanded to all C) to nnU-Net's target list; the parent's step
    moves them to the device, runs autocast, the loss, gradient clipping and the optimizer unchanged;
  - ``on_train_epoch_end`` appends the epoch's hard and KD loss to ``kd_losses.json``;
  - ``on_train_start`` checks the cache against the student (temperature, labels, grid, configuration,
    every training case's shape) before any step, so a mismatched cache is an error, not a bad model;
  - unlabelled images (``student.unlabelled_share`` > 0 and a cache that holds some, :mod:`fastkd.unlabelled`):
    ``check_unlabelled`` finds them preprocessed with their soft labels' shapes, ``get_tr_and_val_datasets``
    adds them to the training dataset (:class:`fastkd.student.loader.WithUnlabelled`; validation stays
    labelled), the loader draws the share of each batch from them, and :class:`DistillationLoss` leaves
    them out of nnU-Net's loss (``SoftLabels.unlabelled``), so they give the KD term only.

- ``..._DA5``: either student with nnU-Net's DA5 augmentation, by inheriting ``nnUNetTrainerDA5`` too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

from fastkd.errors import FastkdError
from fastkd.io import atomic_write_text
from fastkd.paths import VALIDATION_SUMMARY
from fastkd.student import KD_LOSSES_FILE, N_SPLITS, RUN_FILES, SETTINGS_FILE, move_aside
from fastkd.sweep import trainer_name

#: what the checkpoint says built the network; the student's architecture is nnU-Net's own
STOCK_TRAINER = "nnUNetTrainer"


#: how the KD term joins nnU-Net's loss (``distillation.loss``)
LOSS_FORMS = ("additive", "convex")


class DistillationLoss(torch.nn.Module):
    """``form="additive"``: ``hard(output, target) + alpha * kd(output, soft, mask)``, nnU-Net's loss at
    full weight with the KD term on top (alpha >= 0); ``form="convex"``: ``(1 - alpha) * hard + alpha * kd``
    (0 <= alpha <= 1), which also weakens nnU-Net's Dice term, its only class-balanced one.

    ``target`` is nnU-Net's target (a list under deep supervision); during training the soft labels
    ride as one extra last element (see :meth:`nnUNetTrainerFastKD.train_step`). Without it (the
    validation step) this is nnU-Net's loss alone.
    """

    def __init__(self, hard, kd, alpha: float, ignore_label: int | None, regions: bool, deep_supervision: bool,
                 form: str = "convex"):
        super().__init__()
        if form not in LOSS_FORMS:
            raise ValueError(f"loss form {form!r}: must be one of {', '.join(LOSS_FORMS)}")
        if not alpha >= 0 or (form == "convex" and alpha > 1):
            raise ValueError(f"alpha = {alpha}: the {form} form needs " + ("0 <= alpha <= 1" if form == "convex" else "alpha >= 0"))
        self.form = form
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
        hard = self._hard(output, target, getattr(soft, "unlabelled", None))
        full_res = target[0] if self.deep_supervision else target
        kd = self.kd(output, soft, kd_mask_from_target(full_res, self.ignore_label, self.regions))
        self.last = {"hard": hard.detach(), "kd": kd.detach()}
        return (hard if self.form == "additive" else (1 - self.alpha) * hard) + self.alpha * kd

    def _hard(self, output, target, unlabelled):
        """nnU-Net's loss over the labelled samples only (``unlabelled``: bool (B,) on the CPU, or None): an
        unlabelled image has no label, its segmentation map is nnU-Net's placeholder. A batch of unlabelled
        samples only has a hard loss of 0 (still part of the graph)."""
        if unlabelled is None or not bool(unlabelled.any()):
            return self.hard(output, target)
        outputs = output if self.deep_supervision else [output]
        keep = torch.nonzero(~unlabelled).flatten()
        if not len(keep):
            return sum(o.sum() for o in outputs) * 0.0
        keep = keep.to(outputs[0].device)
        if self.deep_supervision:
            return self.hard([o.index_select(0, keep) for o in output], [t.index_select(0, keep) for t in target])
        return self.hard(output.index_select(0, keep), target.index_select(0, keep))


class nnUNetTrainerFastKDBase(nnUNetTrainer):
    """Settings, schedule, fold rotation, final validation and checkpoints of every fastkd student."""

    #: whether this trainer distils; its settings must say the same (alpha > 0)
    kd = False

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.settings = load_settings(Path(self.output_folder))
        alpha = self.settings["alpha"]
        if self.kd != (alpha > 0):
            raise FastkdError(f"{type(self).__name__} trains with alpha {'> 0' if self.kd else '= 0'}, "
                              f"but {self.output_folder}/{SETTINGS_FILE} has alpha = {alpha}")
        schedule = self.settings["schedule"]
        self.num_epochs = schedule["epochs"]
        self.num_iterations_per_epoch = schedule["iterations_per_epoch"]
        self.num_val_iterations_per_epoch = schedule["val_iterations_per_epoch"]
        self.save_every = schedule["save_every"]
        if schedule["batch_size"]:
            # the trainer's own copy of the configuration; plans.json keeps the planned batch size
            self.configuration_manager.configuration["batch_size"] = schedule["batch_size"]
        self._split = None

    def on_train_start(self):
        super().on_train_start()
        if self.current_epoch == 0 and self.local_rank == 0:  # from scratch: keep what an earlier run left
            aside = move_aside(Path(self.output_folder), RUN_FILES, "previous_run")
            if aside is not None:
                self.print_to_log_file(f"training from scratch: moved the previous run's results to {aside}")
        self.print_to_log_file(f"fastkd student settings: {json.dumps(self.settings)}")

    # -- fold rotation ---------------------------------------------------------------------------
    def split_for_epoch(self, epoch: int):
        """The split epoch ``epoch`` trains on; the final validation uses the last epoch's."""
        every = self.settings["schedule"]["rotate_every"]
        if self.fold == "all" or not every:
            return self.fold
        epoch = min(epoch, self.num_epochs - 1)
        return (int(self.fold) + epoch // every) % N_SPLITS

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

    # -- final validation ------------------------------------------------------------------------
    def perform_actual_validation(self, save_probabilities: bool = False):
        axes = self.inference_allowed_mirroring_axes
        if not self.settings["validation_mirroring"]:
            self.inference_allowed_mirroring_axes = None
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.inference_allowed_mirroring_axes = axes
        if self.local_rank == 0:
            mark_validation(Path(self.output_folder) / VALIDATION_SUMMARY, self.fold,
                            [self.split_for_epoch(epoch) for epoch in range(self.num_epochs)])

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        # nnU-Net builds the checkpoint inline and hands it to torch.save: add fastkd's keys on the way
        stock = torch.save

        def save(checkpoint, *args, **kwargs):
            stock({**checkpoint, "trainer_name": STOCK_TRAINER,
                   "fastkd": {"trainer": type(self).__name__, "settings": self.settings}}, *args, **kwargs)

        tmp = f"{filename}.partial"
        torch.save = save
        try:
            super().save_checkpoint(tmp)
        finally:
            torch.save = stock
        os.replace(tmp, filename)


class nnUNetTrainerFastKDNoKD(nnUNetTrainerFastKDBase):
    """The no-KD baseline: same student plans, schedule and checkpointing, alpha = 0 (nnU-Net's loss)."""


class nnUNetTrainerFastKD(nnUNetTrainerFastKDBase):
    """Student trainer with knowledge distillation from a soft-label cache (alpha > 0)."""

    kd = True

    # -- loss ------------------------------------------------------------------------------------
    def _build_loss(self):
        from fastkd.student.loss import KDLoss, kd_scale_weights

        hard = super()._build_loss()
        s = self.settings
        regions = self.label_manager.has_regions
        ds_weights = list(hard.weight_factors) if self.enable_deep_supervision else None
        kd = KDLoss(s["temperature"], ds_weights=kd_scale_weights(ds_weights, s["scales"]), regions=regions,
                    soft_dice=s["soft_dice"], cauchy_schwarz=s["cauchy_schwarz"], class_balanced=s["class_balanced"])
        return DistillationLoss(hard, kd, s["alpha"], self.label_manager.ignore_label, regions,
                                self.enable_deep_supervision, form=s["loss"])

    def train_step(self, batch: dict) -> dict:
        target, soft = batch["target"], batch.pop("softlabels")
        classes = batch.pop("softlabel_classes", None)
        if classes is not None:  # KDDataLoader's compact batch: the present classes, float16
            from fastkd.student.loss import SoftLabels

            soft = SoftLabels(soft, classes, self.label_manager.num_segmentation_heads, batch.pop("unlabelled", None))
        batch["target"] = [*target, soft] if isinstance(target, list) else [target, soft]
        out = super().train_step(batch)
        out.update({f"{k}_loss": v.cpu().numpy() for k, v in self.loss.last.items()})
        return out

    def on_train_epoch_end(self, train_outputs: list[dict]):
        import numpy as np

        super().on_train_epoch_end(train_outputs)
        parts = {k: float(np.mean([o[k] for o in train_outputs])) for k in ("hard_loss", "kd_loss")}
        self.print_to_log_file(f"train hard loss {parts['hard_loss']:.4f}, KD loss {parts['kd_loss']:.4f}")
        if self.local_rank == 0:
            path = Path(self.output_folder) / KD_LOSSES_FILE
            rows = json.loads(path.read_text()) if path.is_file() else []
            rows = [r for r in rows if r["epoch"] < self.current_epoch] + [{"epoch": self.current_epoch, **parts}]
            atomic_write_text(path, json.dumps(rows) + "\n")

    # -- data ------------------------------------------------------------------------------------
    def on_train_start(self):
        self.check_cache()
        super().on_train_start()

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
        self.check_unlabelled(cache)

    def check_unlabelled(self, cache) -> None:
        """The unlabelled cases this student trains on (``student.unlabelled_share`` > 0: the cache's), each
        preprocessed with its soft labels' shape."""
        import blosc2

        share = self.settings.get("unlabelled_share", 0.0)
        self.unlabelled_cases = sorted(cache.unlabelled) if share > 0 else []
        if share > 0 and not self.unlabelled_cases:
            self.print_to_log_file(f"student.unlabelled_share = {share}, but the soft-label cache {cache.path} holds no "
                                   "unlabelled cases: training on the labelled cases only")
        if not self.unlabelled_cases:
            return
        folder = Path(cache.attrs.get("unlabelled_folder") or "")
        missing = [c for c in self.unlabelled_cases if not (folder / f"{c}.b2nd").is_file()]
        if missing:
            raise FastkdError(f"the unlabelled cases of {cache.path} are not preprocessed in {folder} "
                              f"({', '.join(missing[:5])} missing); rerun `snakemake ... preprocess_unlabelled`")
        cache.check(shapes={c: list(blosc2.open(str(folder / f"{c}.b2nd"), mode="r").shape)
                            for c in self.unlabelled_cases})
        self.unlabelled_folder = str(folder)

    def get_tr_and_val_datasets(self):
        """nnU-Net's datasets; the training one also holds the unlabelled cases (:class:`WithUnlabelled`)."""
        dataset_tr, dataset_val = super().get_tr_and_val_datasets()
        if getattr(self, "unlabelled_cases", None):
            from fastkd.student.loader import WithUnlabelled

            unlabelled = self.dataset_class(self.unlabelled_folder, list(self.unlabelled_cases))
            dataset_tr = WithUnlabelled(dataset_tr, unlabelled, self.settings["cache"])
            # logged here, where the loader's dataset is built (tests/workflow/test_reruns.py reads it): this
            # relies on nnU-Net building its datasets after on_train_start's cache check
            self.print_to_log_file(f"unlabelled images: {len(self.unlabelled_cases)} (KD only), "
                                   f"{self.settings['unlabelled_share']:.0%} of each batch in expectation")
        return dataset_tr, dataset_val

    def get_dataloaders(self):
        # nnU-Net builds its loaders inline; swap the class it uses for the training loader (the first
        # one it builds) and let the parent do everything else.
        import nnunetv2.training.nnUNetTrainer.nnUNetTrainer as module

        from fastkd.student.loader import KDDataLoader

        stock, built = module.nnUNetDataLoader, []

        def make_loader(*args, **kwargs):
            if not built:
                loader = KDDataLoader(*args, cache_path=self.settings["cache"],
                                      softmax=not self.label_manager.has_regions,
                                      unlabelled_share=self.settings.get("unlabelled_share", 0.0), **kwargs)
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


class nnUNetTrainerFastKD_DA5(nnUNetTrainerFastKD, nnUNetTrainerDA5):
    """KD student with nnU-Net's DA5 augmentation (its transforms also carry the soft labels)."""


class nnUNetTrainerFastKDNoKD_DA5(nnUNetTrainerFastKDNoKD, nnUNetTrainerDA5):
    """The no-KD baseline with DA5."""


TRAINERS = {c.__name__: c for c in (nnUNetTrainerFastKD, nnUNetTrainerFastKD_DA5,
                                    nnUNetTrainerFastKDNoKD, nnUNetTrainerFastKDNoKD_DA5)}


def trainer_class(kd: bool, da5: bool, tag: str = "") -> type:
    """The trainer class; with a sweep's ``tag`` (:func:`fastkd.sweep.student_tag`) a subclass named
    ``<class><tag>``, because nnU-Net names the model folder after the trainer class."""
    base = TRAINERS[trainer_name(kd, da5)]
    return type(trainer_name(kd, da5, tag), (base,), {"__doc__": base.__doc__}) if tag else base


def load_settings(fold_folder: Path) -> dict:
    path = Path(fold_folder) / SETTINGS_FILE
    if not path.is_file():
        raise FastkdError(f"{path} is missing: fastkd student trainers are started by "
                          "fastkd.student.run.train_student (the workflow and fastkd's commands), which writes "
                          "their settings there")
    return json.loads(path.read_text())


def validation_note(fold, splits: list) -> dict:
    """``summary.json``'s ``"fastkd"`` entry: whether the final validation scored cases the model trained on.

    ``fold``: 0-4 or ``"all"``; ``splits``: the split each epoch trained on (the last one's held-out
    cases are the validation cases). With fold rotation over several splits, the validation cases
    were training cases of the other splits, and ``checkpoint_best`` was chosen on the pseudo-Dice of
    rotating validation cases: both scores are optimistic, not cross-validation.
    """
    if fold == "all":
        return {"optimistic": True, "reason": "fold 'all' trains on every case: the validation cases were trained on"}
    used = sorted(set(splits))
    if len(used) > 1:
        return {"optimistic": True,
                "reason": f"fold rotation trained on splits {used}: the validation cases (held out of split "
                          f"{splits[-1]}) were training cases of the others, and checkpoint_best was chosen on "
                          "rotating validation cases"}
    return {"optimistic": False, "reason": f"held-out cases of split {used[0]}, never trained on"}


def mark_validation(summary: Path, fold, splits: list) -> None:
    """Add :func:`validation_note` to nnU-Net's ``summary.json`` (in nnU-Net's JSON format)."""
    data = json.loads(summary.read_text())
    data["fastkd"] = validation_note(fold, splits)
    atomic_write_text(summary, json.dumps(data, sort_keys=True, indent=4))
