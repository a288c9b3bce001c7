"""The student's driver (fastkd.student.run): its settings, the combined loss's dispatch, the checks before
training, and whether a distilled student is continued or trained again. Real training runs:
tests/workflow/test_student_training.py.
"""

import json

import pytest
import torch

TEACHERS = "nnUNetTrainer__nnUNetPlans__3d_fullres"

DS = "Dataset900_FastkdDemo"


# -- fast -----------------------------------------------------------------------------------------
def _config(tmp_path, distillation=None, student=None):
    from fastkd.checks import validate_config

    return validate_config({"dataset": {"raw": "demo"}, "distillation": distillation or {}, "student": student or {}},
                           base_dir=tmp_path)


def test_trainer_names_match_the_classes():
    from fastkd.student.trainers import TRAINERS, trainer_class
    from fastkd.sweep import trainer_name

    for kd in (True, False):
        for da5 in (True, False):
            assert trainer_class(kd, da5).__name__ == trainer_name(kd, da5)
            assert trainer_class(kd, da5).kd is kd
    assert set(TRAINERS) == {"nnUNetTrainerFastKD", "nnUNetTrainerFastKD_DA5", "nnUNetTrainerFastKDNoKD",
                             "nnUNetTrainerFastKDNoKD_DA5"}
    from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import (
        nnUNetTrainerDA5,
    )

    assert issubclass(trainer_class(True, True), nnUNetTrainerDA5)
    assert not issubclass(trainer_class(True, False), nnUNetTrainerDA5)


def test_settings_are_the_config_student_block_without_run_keys(tmp_path):
    from fastkd.student.run import RUN_KEYS, student_settings

    config = _config(tmp_path, {"temperature": 2.0, "alpha": 1.5, "loss": "additive", "scales": "full",
                                "class_balanced": True},
                     {"schedule": {"epochs": 7, "rotate_every": 2}, "validation_mirroring": False, "soft_dice": 0.5,
                      "augmentation": "da5", "folds": [1, "all"]})
    s = student_settings(config, tmp_path / "c.zarr", kd=True)
    assert s == {"cache": str((tmp_path / "c.zarr").resolve()), "alpha": 1.5, "temperature": 2.0, "soft_dice": 0.5,
                 "loss": "additive", "scales": "full", "class_balanced": True, "folds_per_case": "all", "seed": 0,
                 "cauchy_schwarz": 0.0, "validation_mirroring": False, "unlabelled_share": 0.5,
                 "schedule": {"epochs": 7, "iterations_per_epoch": 250, "val_iterations_per_epoch": 50,
                              "batch_size": None, "save_every": 5, "rotate_every": 2}}
    assert not set(RUN_KEYS) & set(s)
    s["schedule"]["epochs"] = 1  # a copy: the config is not changed through the settings
    assert config["student"]["schedule"]["epochs"] == 7
    config["student"]["a_new_option"] = 3  # a new schema key flows into both students' settings
    assert student_settings(config, tmp_path / "c.zarr", kd=True)["a_new_option"] == 3
    assert student_settings(config, None, kd=False)["a_new_option"] == 3


def test_baseline_settings_ignore_what_only_distillation_uses(tmp_path):
    from fastkd.student.run import student_settings

    a = _config(tmp_path, {"temperature": 2.0, "alpha": 0.3}, {"soft_dice": 0.0})
    b = _config(tmp_path, {"temperature": 5.0, "alpha": 0.7, "loss": "additive", "scales": "full", "class_balanced": True},
                {"soft_dice": 0.5, "cauchy_schwarz": 1.0})
    base = student_settings(a, tmp_path / "t2.zarr", kd=False)
    assert base == student_settings(b, tmp_path / "t5.zarr", kd=False)  # a T sweep does not retrain the baseline
    assert base["cache"] is None and base["alpha"] == 0.0 and "temperature" not in base and "soft_dice" not in base
    assert not {"loss", "scales", "class_balanced"} & set(base)
    assert student_settings(a, tmp_path / "t2.zarr", kd=True) != student_settings(b, tmp_path / "t5.zarr", kd=True)


@pytest.mark.parametrize("alpha, cache, message", [
    (0.0, "/x.zarr", "distillation.alpha = 0: a KD student needs alpha > 0"),
    (0.3, None, "distillation.alpha = 0.3 needs a soft-label cache"),
])
def test_kd_settings_errors_name_the_value(tmp_path, alpha, cache, message):
    from fastkd.errors import FastkdError
    from fastkd.student.run import student_settings

    with pytest.raises(FastkdError) as e:
        student_settings(_config(tmp_path, {"alpha": alpha}), cache, kd=True)
    assert message in str(e.value)


def test_checkpoints_of_other_settings_are_moved_aside(tmp_path):
    from fastkd.student.run import prepare_fold_folder, student_settings

    fold = tmp_path / "fold_0"
    a = student_settings(_config(tmp_path, student={"schedule": {"epochs": 3}}), None, kd=False)
    assert prepare_fold_folder(fold, a) is False
    (fold / "checkpoint_latest.pth").write_text("x")
    assert prepare_fold_folder(fold, a) is True  # same settings: resume
    b = student_settings(_config(tmp_path, student={"schedule": {"epochs": 4}}), None, kd=False)
    assert prepare_fold_folder(fold, b) is False  # other settings: never continued
    assert not (fold / "checkpoint_latest.pth").exists()
    assert (fold / "previous_settings" / "checkpoint_latest.pth").read_text() == "x"
    assert json.loads((fold / "previous_settings" / "fastkd_student.json").read_text())["schedule"]["epochs"] == 3
    assert json.loads((fold / "fastkd_student.json").read_text())["schedule"]["epochs"] == 4
    (fold / "checkpoint_latest.pth").write_text("y")
    assert prepare_fold_folder(fold, a) is False  # and again: the earlier move is kept, not overwritten
    assert (fold / "previous_settings" / "checkpoint_latest.pth").read_text() == "x"
    assert (fold / "previous_settings.1" / "checkpoint_latest.pth").read_text() == "y"


def _summary(fold, note=None):
    (fold / "validation").mkdir(parents=True, exist_ok=True)
    summary = {"mean": {"1": {"Dice": 0.5}, "2": {"Dice": 0.25}}, "foreground_mean": {"Dice": 0.375}}
    if note is not None:
        summary["fastkd"] = note
    (fold / "validation" / "summary.json").write_text(json.dumps(summary))


def test_report_needs_finished_validation(tmp_path):
    from fastkd.errors import FastkdError
    from fastkd.student.report import write_report

    fold = tmp_path / "fold_0"
    (fold / "validation").mkdir(parents=True)
    with pytest.raises(FastkdError, match="validation/summary.json is missing"):
        write_report([f"KD={fold}"], tmp_path / "r.png", tmp_path / "r.tsv")
    _summary(fold)
    (fold / "kd_losses.json").write_text(json.dumps([{"epoch": 0, "hard_loss": 1.0, "kd_loss": 2.0}]))
    rows = write_report([f"KD={fold}"], tmp_path / "r.png", tmp_path / "r.tsv")
    assert rows[0]["kd_loss"] == [2.0]
    assert (tmp_path / "r.tsv").read_text() == "model\tDice 1\tDice 2\tmean\toptimistic\nKD\t0.5000\t0.2500\t0.3750\tfalse\n"
    assert (tmp_path / "r.png").stat().st_size > 0
    with pytest.raises(FastkdError, match="LABEL=FOLD_FOLDER"):
        write_report([str(fold)], tmp_path / "r.png", tmp_path / "r.tsv")


def test_report_marks_optimistic_validation(tmp_path):
    from fastkd.student.report import dice_table, figure_cells, write_report
    from fastkd.student.trainers import mark_validation

    rotated, held_out = tmp_path / "rotated" / "fold_3", tmp_path / "held_out" / "fold_3"
    _summary(rotated)
    _summary(held_out)
    mark_validation(rotated / "validation" / "summary.json", 3, [3, 3, 4])  # fold rotation crossed two splits
    mark_validation(held_out / "validation" / "summary.json", 3, [3, 3, 3])
    rows = write_report([f"rotated={rotated}", f"held-out={held_out}"], tmp_path / "r.png", tmp_path / "r.tsv")
    assert [r["optimistic"] for r in rows] == [True, False]
    tsv = [line.split("\t") for line in (tmp_path / "r.tsv").read_text().splitlines()]
    assert tsv[0][-1] == "optimistic" and [t[0] for t in tsv[1:]] == ["rotated", "held-out"]
    assert [t[-1] for t in tsv[1:]] == ["true", "false"]
    assert [c[0] for c in figure_cells(rows)[1:]] == ["rotated (optimistic)", "held-out"]
    assert dice_table(rows) == (tmp_path / "r.tsv").read_text()


def test_multi_gpu_needs_cuda_gpus(tmp_path):
    from fastkd.errors import FastkdError
    from fastkd.student.run import student_settings, train_student

    settings = student_settings(_config(tmp_path), None, kd=False)
    with pytest.raises(FastkdError, match="num_gpus = 2 needs device = 'cuda' and 2 visible GPUs"):
        train_student(900, "nnUNetPlans_fastkdR2", "3d_fullres", 0, settings, device="cpu", num_gpus=2)
    with pytest.raises(FastkdError, match="fold = 7: must be 0-4 or 'all'"):
        train_student(900, "nnUNetPlans_fastkdR2", "3d_fullres", 7, settings)


def test_torch_device_needs_a_gpu_for_cuda_and_tunes_cudnn(monkeypatch):
    from fastkd.device import torch_device
    from fastkd.errors import FastkdError

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    assert torch_device("cpu", "student.device") == torch.device("cpu")
    assert torch.backends.cudnn.benchmark is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FastkdError, match="teachers.device = 'cuda' but torch sees no CUDA GPU; use 'cpu'"):
        torch_device("cuda", "teachers.device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert torch_device("cuda", "teachers.device") == torch.device("cuda")
    assert torch.backends.cudnn.benchmark is True  # as nnUNetv2_train sets it


def _missing_plans_run(monkeypatch, tmp_path, settings, **kwargs):
    """``train_student`` on a dataset without the student plans: it fails where the trainer is built."""
    import nnunetv2.paths

    from fastkd.errors import FastkdError
    from fastkd.student.run import train_student

    monkeypatch.setattr(nnunetv2.paths, "nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setattr(nnunetv2.paths, "nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    (tmp_path / "preprocessed" / DS).mkdir(parents=True, exist_ok=True)
    with pytest.raises(FastkdError, match="student plans .* do not exist"):
        train_student(DS, "nnUNetPlans_fastkdR2", "3d_fullres", 0, settings, **kwargs)


def test_student_training_on_cuda_tunes_cudnn(monkeypatch, tmp_path):
    from fastkd.student.run import student_settings

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    _missing_plans_run(monkeypatch, tmp_path, student_settings(_config(tmp_path), None, kd=False), device="cuda")
    assert torch.backends.cudnn.benchmark is True


def test_a_run_without_resume_keeps_the_old_checkpoints_until_it_trains(monkeypatch, tmp_path):
    """``resume=False`` (the reference's missing ``-c_continue``) must not destroy a trained model up front;
    the trainer moves it to ``previous_run/`` once it trains (tests/unit/student/test_trainers.py)."""
    from fastkd.student.run import (
        prepare_fold_folder,
        student_fold_folder,
        student_settings,
    )

    settings = student_settings(_config(tmp_path), None, kd=False)
    fold = student_fold_folder(tmp_path / "results", DS, "nnUNetPlans_fastkdR2", "3d_fullres", 0, kd=False)
    prepare_fold_folder(fold, settings)
    (fold / "checkpoint_final.pth").write_text("trained")
    _missing_plans_run(monkeypatch, tmp_path, settings, resume=False)
    assert (fold / "checkpoint_final.pth").read_text() == "trained"


class _Recorder(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value, self.calls = value, []

    def forward(self, *args):
        self.calls.append(args)
        return torch.tensor(self.value)


def test_distillation_loss_mixes_hard_and_kd_only_when_soft_labels_ride_along():
    from fastkd.student.trainers import DistillationLoss

    hard, kd = _Recorder(2.0), _Recorder(10.0)
    loss = DistillationLoss(hard, kd, alpha=0.25, ignore_label=None, regions=False, deep_supervision=True)
    outputs = [torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 3, 2, 2, 2)]
    targets = [torch.zeros(1, 1, 4, 4, 4), torch.zeros(1, 1, 2, 2, 2)]
    soft = torch.full((1, 3, 4, 4, 4), 1 / 3)
    assert loss(outputs, targets).item() == 2.0  # the validation step: nnU-Net's loss alone
    assert not kd.calls
    assert loss(outputs, [*targets, soft]).item() == pytest.approx(0.75 * 2.0 + 0.25 * 10.0)
    assert len(hard.calls[-1][1]) == 2  # the hard loss never sees the soft labels
    assert kd.calls[-1][1] is soft and kd.calls[-1][2] is None  # no ignore label: no mask
    ignore = DistillationLoss(hard, kd, alpha=0.5, ignore_label=2, regions=False, deep_supervision=True)
    targets[0][0, 0, 0, 0, 0] = 2
    ignore(outputs, [*targets, soft])
    mask = kd.calls[-1][2]
    assert mask.shape == (1, 1, 4, 4, 4) and not mask[0, 0, 0, 0, 0] and mask.sum() == 63


def test_student_paths_follow_the_config(tmp_path):
    from fastkd.checks import validate_config
    from fastkd.paths import Paths

    config = validate_config({"dataset": {"raw": "demo"}, "distillation": {"reduction_factors": [2, 4]},
                              "student": {"folds": [0, "all"], "augmentation": "da5"}}, base_dir=tmp_path)
    p = Paths(config)
    assert p.student_plans_name(4) == "nnUNetPlans_fastkdR4"
    assert p.student_plans_name("{r}") == "nnUNetPlans_fastkdR{r}"
    assert str(p.student_checkpoint(4, "all", kd=False)).endswith(
        f"{DS}/nnUNetTrainerFastKDNoKD_DA5__nnUNetPlans_fastkdR4__3d_fullres/fold_all/checkpoint_final.pth")
    from fastkd.sweep import student_kinds

    assert student_kinds(config) == [True, False]
    assert student_kinds({**config, "student": {**config["student"], "baseline": False}}) == [True]
    assert student_kinds({**config, "distillation": {**config["distillation"], "alpha": 0.0}}) == [False]


def test_a_distilled_student_is_continued_only_on_soft_labels_of_the_same_teachers(tmp_path):
    """A retrained teacher rewrites the cache at the same path: the student's settings name its checkpoints."""
    from fastkd.checks import validate_config
    from fastkd.student.run import prepare_fold_folder, student_settings

    config = validate_config({"dataset": {"raw": "demo"}}, base_dir=tmp_path)
    cache, fold = tmp_path / "c.zarr", tmp_path / "fold_0"

    def finalized(sha):
        cache.mkdir(exist_ok=True)
        root = {"complete": True, "provenance": {"teachers": [{"name": TEACHERS, "sha256": {"0": sha}}]}}
        (cache / "zarr.json").write_text(json.dumps({"zarr_format": 3, "node_type": "group",
                                                      "attributes": {"fastkd_softlabels": root}}))
        return student_settings(config, cache, kd=True)

    assert "teachers" not in student_settings(config, cache, kd=True)  # no complete store yet
    old = finalized("a" * 64)
    assert old["teachers"] == {TEACHERS: {"0": "a" * 64}}
    assert "teachers" not in student_settings(config, None, kd=False)  # the baseline reads no soft labels
    prepare_fold_folder(fold, old)
    (fold / "checkpoint_final.pth").write_text("trained on the old soft labels")
    assert prepare_fold_folder(fold, finalized("a" * 64)) is True  # same teachers: continued
    assert prepare_fold_folder(fold, finalized("b" * 64)) is False  # retrained teacher: from scratch
    assert (fold / "previous_settings" / "checkpoint_final.pth").is_file()


def test_a_copied_work_folder_keeps_its_students(tmp_path):
    """The store's folder is not a setting (a copied or moved work folder resumes its students); its name is."""
    from fastkd.student.run import fold_state, prepare_fold_folder

    settings = {"cache": str(tmp_path / "a" / "3d_fullres__T1__mirror.zarr"), "alpha": 1.0}
    fold = tmp_path / "fold_0"
    prepare_fold_folder(fold, settings)
    (fold / "checkpoint_latest.pth").write_text("a run")
    moved = {**settings, "cache": str(tmp_path / "b" / "3d_fullres__T1__mirror.zarr")}
    assert fold_state(fold, moved, resume=True) == "continue from checkpoint_latest.pth"
    assert prepare_fold_folder(fold, moved) is True
    other = {**settings, "cache": str(tmp_path / "b" / "3d_fullres__T2__mirror.zarr")}
    assert fold_state(fold, other, resume=True).startswith("start over: its checkpoints were trained with other")
    assert prepare_fold_folder(fold, {**moved, "alpha": 0.5}) is False
