"""The student trainer classes, hook by hook, on bare trainers (no data, no training): what each class
overrides, the settings check, the fresh-start move, the single atomic checkpoint write and the note
on optimistic validations. Real training runs: tests/workflow/test_student_training.py.
"""

import json
from types import SimpleNamespace

import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from fastkd.errors import FastkdError
from fastkd.student.loss import KDLoss, kd_scale_weights
from fastkd.student.trainers import (DistillationLoss, nnUNetTrainerFastKD, nnUNetTrainerFastKDBase,
                                     nnUNetTrainerFastKDNoKD, validation_note)

SCHEDULE = {"epochs": 4, "iterations_per_epoch": 3, "val_iterations_per_epoch": 2, "batch_size": 2, "save_every": 1,
            "rotate_every": 0}


def _settings(kd: bool, **schedule) -> dict:
    head = {"cache": "/c.zarr", "alpha": 0.3, "temperature": 3.0, "loss": "convex", "scales": "all",
            "class_balanced": False, "soft_dice": 0.0, "cauchy_schwarz": 0.0} if kd \
        else {"cache": None, "alpha": 0.0}
    return {**head, "validation_mirroring": True, "schedule": {**SCHEDULE, **schedule}}


def _bare(cls, folder, settings, **attributes):
    """A trainer object without nnU-Net's ``__init__``: only what the hooks under test read."""
    trainer = object.__new__(cls)
    trainer.__dict__.update({"output_folder": str(folder), "settings": settings, "local_rank": 0, "fold": 0,
                             "current_epoch": 0, "num_epochs": settings["schedule"]["epochs"],
                             "print_to_log_file": lambda *a, **k: None, **attributes})
    return trainer


def _own(cls) -> set:
    return {k for k in vars(cls) if not k.startswith("__")}


def test_each_class_adds_one_concern():
    assert _own(nnUNetTrainerFastKDNoKD) == set()  # the baseline is the shared base as it is
    assert _own(nnUNetTrainerFastKD) == {"kd", "_build_loss", "train_step", "on_train_epoch_end", "on_train_start",
                                         "check_cache", "check_unlabelled", "get_tr_and_val_datasets",
                                         "get_dataloaders"}
    assert _own(nnUNetTrainerFastKDBase) == {"kd", "on_train_start", "split_for_epoch", "do_split", "on_epoch_start",
                                             "_shutdown_dataloaders", "perform_actual_validation", "save_checkpoint"}
    assert "__init__" in vars(nnUNetTrainerFastKDBase) and "__init__" not in vars(nnUNetTrainerFastKD)
    assert nnUNetTrainerFastKDNoKD.kd is False and nnUNetTrainerFastKD.kd is True


@pytest.fixture
def constructed(monkeypatch, tmp_path):
    """Build a trainer class on settings in ``tmp_path``, nnU-Net's own ``__init__`` reduced to the folder."""
    def init(self, plans, configuration, fold, dataset_json, device):
        self.output_folder = str(tmp_path)
        self.configuration_manager = SimpleNamespace(configuration={"batch_size": 9})

    monkeypatch.setattr(nnUNetTrainer, "__init__", init)

    def build(cls, settings):
        (tmp_path / "fastkd_student.json").write_text(json.dumps(settings))
        return cls({}, "3d_fullres", 0, {}, torch.device("cpu"))

    return build


def test_settings_schedule_the_trainer(constructed):
    trainer = constructed(nnUNetTrainerFastKDNoKD, _settings(False))
    assert (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch,
            trainer.save_every, trainer.configuration_manager.configuration["batch_size"]) == (4, 3, 2, 1, 2)
    planned = constructed(nnUNetTrainerFastKD, _settings(True, batch_size=None))
    assert planned.configuration_manager.configuration["batch_size"] == 9


@pytest.mark.parametrize("cls, kd, message", [
    (nnUNetTrainerFastKDNoKD, True, "nnUNetTrainerFastKDNoKD trains with alpha = 0, but"),
    (nnUNetTrainerFastKD, False, "nnUNetTrainerFastKD trains with alpha > 0, but"),
])
def test_a_trainer_refuses_the_other_students_settings(constructed, cls, kd, message):
    with pytest.raises(FastkdError, match=message):
        constructed(cls, _settings(kd))


def _run_files(fold, text):
    for name in ("checkpoint_final.pth", "checkpoint_best.pth", "kd_losses.json"):
        (fold / name).write_text(text)
    (fold / "validation").mkdir(exist_ok=True)
    (fold / "validation" / "summary.json").write_text(text)
    (fold / "fastkd_student.json").write_text("settings")


def test_a_fresh_start_moves_the_previous_run_aside_once_training_starts(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: started.append(sorted(p.name for p in tmp_path.iterdir())))
    _run_files(tmp_path, "run 1")
    _bare(nnUNetTrainerFastKDNoKD, tmp_path, _settings(False)).on_train_start()
    assert "checkpoint_final.pth" in started[0]  # nnU-Net's start-up ran before anything moved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fastkd_student.json", "previous_run"]
    assert (tmp_path / "previous_run" / "checkpoint_final.pth").read_text() == "run 1"
    assert (tmp_path / "previous_run" / "validation" / "summary.json").read_text() == "run 1"
    _run_files(tmp_path, "run 2")
    _bare(nnUNetTrainerFastKDNoKD, tmp_path, _settings(False)).on_train_start()
    assert (tmp_path / "previous_run" / "checkpoint_final.pth").read_text() == "run 1"  # never overwritten
    assert (tmp_path / "previous_run.1" / "checkpoint_best.pth").read_text() == "run 2"
    _run_files(tmp_path, "run 3")
    _bare(nnUNetTrainerFastKDNoKD, tmp_path, _settings(False), current_epoch=2).on_train_start()  # resumed
    assert (tmp_path / "checkpoint_final.pth").read_text() == "run 3"


def test_a_kd_run_that_fails_its_cache_check_moves_nothing(monkeypatch, tmp_path):
    def bad_cache(self):
        raise FastkdError("temperature: the cache was made with T = 3.0, expected T = 2.0")

    monkeypatch.setattr(nnUNetTrainer, "on_train_start", lambda self: None)
    monkeypatch.setattr(nnUNetTrainerFastKD, "check_cache", bad_cache)
    _run_files(tmp_path, "trained")
    with pytest.raises(FastkdError, match="temperature"):
        _bare(nnUNetTrainerFastKD, tmp_path, _settings(True)).on_train_start()
    assert (tmp_path / "checkpoint_final.pth").read_text() == "trained" and not (tmp_path / "previous_run").exists()


def _checkpointing(tmp_path):
    from nnunetv2.training.logging.nnunet_logger import MetaLogger

    network = torch.nn.Conv3d(1, 2, 1)
    return _bare(nnUNetTrainerFastKDNoKD, tmp_path, _settings(False), disable_checkpointing=False, is_ddp=False,
                 network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.1), grad_scaler=None,
                 logger=MetaLogger(str(tmp_path), False), _best_ema=None, my_init_kwargs={}, inference_allowed_mirroring_axes=(0, 1, 2))


def test_a_checkpoint_is_written_once_atomically_for_stock_nnunet(monkeypatch, tmp_path):
    real_save, real_load, saved = torch.save, torch.load, []

    def counting_save(obj, f, *args, **kwargs):
        saved.append(str(f))
        real_save(obj, f, *args, **kwargs)

    def no_load(*args, **kwargs):
        raise AssertionError("a checkpoint is written once, never read back")

    monkeypatch.setattr(torch, "save", counting_save)
    monkeypatch.setattr(torch, "load", no_load)
    trainer = _checkpointing(tmp_path)
    path = tmp_path / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(path))
    assert saved == [f"{path}.partial"] and torch.save is counting_save
    checkpoint = real_load(path, map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == "nnUNetTrainer" and checkpoint["current_epoch"] == 1
    assert checkpoint["fastkd"] == {"trainer": "nnUNetTrainerFastKDNoKD", "settings": _settings(False)}
    assert set(checkpoint["network_weights"]) == {"weight", "bias"}

    def killed(obj, f, *args, **kwargs):
        with open(f, "wb") as out:
            out.write(b"trunc")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint(str(path))
    assert torch.save is killed  # restored after the failed write
    assert real_load(path, map_location="cpu", weights_only=False)["current_epoch"] == 1  # the old one is intact


def test_validation_note():
    assert validation_note(2, [2, 2, 2]) == {"optimistic": False, "reason": "held-out cases of split 2, never trained on"}
    rotated = validation_note(3, [3, 4, 0])
    assert rotated["optimistic"] and "splits [0, 3, 4]" in rotated["reason"] and "held out of split 0" in rotated["reason"]
    assert validation_note("all", ["all"])["optimistic"]


def test_final_validation_is_marked_and_honours_the_mirroring_setting(monkeypatch, tmp_path):
    seen = []

    def validate(self, save_probabilities=False):
        seen.append(self.inference_allowed_mirroring_axes)
        (tmp_path / "validation").mkdir(exist_ok=True)
        (tmp_path / "validation" / "summary.json").write_text(json.dumps({"foreground_mean": {"Dice": 0.5}}))

    monkeypatch.setattr(nnUNetTrainer, "perform_actual_validation", validate)
    settings = dict(_settings(False, epochs=4, rotate_every=2), validation_mirroring=False)
    trainer = _bare(nnUNetTrainerFastKDNoKD, tmp_path, settings, fold=4, current_epoch=4,
                    inference_allowed_mirroring_axes=(0, 1, 2))
    trainer.perform_actual_validation()
    assert seen == [None] and trainer.inference_allowed_mirroring_axes == (0, 1, 2)
    summary = json.loads((tmp_path / "validation" / "summary.json").read_text())
    assert summary["foreground_mean"] == {"Dice": 0.5}  # nnU-Net's content stays
    assert summary["fastkd"]["optimistic"] and "splits [0, 4]" in summary["fastkd"]["reason"]


# -- the loss forms -------------------------------------------------------------------------------
DS_WEIGHTS = [4 / 7, 2 / 7, 1 / 7]
DS_SHAPES = [(8, 8, 8), (4, 4, 4), (2, 2, 2)]


def _nnunet_hard_loss():
    """nnU-Net's own DC+CE under its deep-supervision wrapper, as nnUNetTrainer._build_loss makes it."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    dc_ce = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                           weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(dc_ce, DS_WEIGHTS)


def _batch(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    outs = [(torch.randn((2, 3, *s), generator=g, dtype=dtype) * 2).requires_grad_() for s in DS_SHAPES]
    seg = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    targets = [seg[:, :, ::f, ::f, ::f].to(dtype) for f in (1, 2, 4)]
    soft = torch.softmax(torch.randn((2, 3, 8, 8, 8), generator=g, dtype=dtype) * 3, 1)
    return outs, targets, soft


@pytest.mark.parametrize("form", ["additive", "convex"])
@pytest.mark.parametrize("scales", ["full", "all"])
@pytest.mark.parametrize("class_balanced", [False, True])
def test_each_loss_form_is_nnunets_loss_and_the_kd_term_combined_by_hand(form, scales, class_balanced):
    outs, targets, soft = _batch()
    alpha, T = 0.4, 2.0
    hard = _nnunet_hard_loss()
    kd = KDLoss(T, kd_scale_weights(DS_WEIGHTS, scales), class_balanced=class_balanced)
    loss = DistillationLoss(hard, kd, alpha, None, regions=False, deep_supervision=True, form=form)
    h, k = hard(outs, targets).item(), kd(outs, soft).item()
    expected = (h if form == "additive" else (1 - alpha) * h) + alpha * k
    assert loss(outs, [*targets, soft]).item() == pytest.approx(expected, rel=1e-5)
    assert loss.last["hard"].item() == pytest.approx(h, rel=1e-6) and loss.last["kd"].item() == pytest.approx(k, rel=1e-6)
    assert loss(outs, targets).item() == pytest.approx(h, rel=1e-6)  # the validation step: nnU-Net's loss alone


@pytest.mark.parametrize("form", ["additive", "convex"])
def test_each_loss_form_passes_gradcheck(form):
    # nnU-Net's cross-entropy under its deep-supervision wrapper (its Dice term fails gradcheck on its own)
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.robust_ce_loss import RobustCrossEntropyLoss

    outs, targets, soft = _batch(1, torch.float64)
    kd = KDLoss(1.0, kd_scale_weights(DS_WEIGHTS, "full"))
    hard = DeepSupervisionWrapper(RobustCrossEntropyLoss(), DS_WEIGHTS)
    loss = DistillationLoss(hard, kd, 0.7, None, regions=False, deep_supervision=True, form=form)
    assert torch.autograd.gradcheck(lambda *zs: loss(list(zs), [*targets, soft]), tuple(outs))


def test_loss_forms_refuse_bad_weights():
    for form, alpha, message in (("convex", 1.5, "0 <= alpha <= 1"), ("additive", -1.0, "alpha >= 0"),
                                 ("mixed", 0.3, "must be one of additive, convex")):
        with pytest.raises(ValueError, match=message):
            DistillationLoss(None, None, alpha, None, regions=False, deep_supervision=True, form=form)


@pytest.mark.parametrize("scales, kd_weights", [("full", [1.0, 0.0, 0.0]), ("all", DS_WEIGHTS)])
def test_build_loss_applies_the_kd_settings(monkeypatch, tmp_path, scales, kd_weights):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    monkeypatch.setattr(nnUNetTrainer, "_build_loss", lambda self: DeepSupervisionWrapper(lambda *a: 0, DS_WEIGHTS))
    settings = {**_settings(True), "loss": "additive", "alpha": 2.0, "scales": scales, "class_balanced": True}
    labels = SimpleNamespace(has_regions=False, ignore_label=None)
    trainer = _bare(nnUNetTrainerFastKD, tmp_path, settings, enable_deep_supervision=True, label_manager=labels)
    loss = trainer._build_loss()
    assert (loss.form, loss.alpha, loss.kd.ds_weights, loss.kd.class_balanced) == ("additive", 2.0, tuple(kd_weights), True)
    trainer.label_manager = SimpleNamespace(has_regions=True, ignore_label=None)
    loss = trainer._build_loss()
    assert (loss.kd.regions, loss.kd.class_balanced) == (True, True)  # regions balance inside against outside
