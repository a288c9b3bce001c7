"""Sweeps: list-valued temperature, alpha, soft-label fold selection and seeds expand into one student per
combination (one cache per temperature and fold selection), each with its own model folder, settings,
workflow jobs and evaluation row (the dry runs: tests/workflow/test_dry_runs.py)."""

import copy

import pytest
import yaml

from fastkd.checks import validate_config
from fastkd.config import ConfigError, default
from fastkd.errors import FastkdError
from fastkd.paths import Paths
from fastkd.student.run import student_fold_folder, student_settings
from fastkd.sweep import (
    Student,
    one,
    soft_label_settings,
    student_tag,
    students,
    trainer_name,
)

from sweep_configs import FORMS, SWEEP
from workflow_runs import REPO


def config(override=None):
    """The demo config with one seed (config.yaml's three would triple every list), plus ``override``."""
    c = yaml.safe_load((REPO / "config.yaml").read_text())
    c["student"]["seeds"] = [0]
    for block, values in (override or {}).items():
        c[block].update(copy.deepcopy(values))
    return validate_config(c, check_files=False)


def test_a_config_of_single_values_is_one_student_and_its_baseline_with_the_plain_names():
    c = config()
    assert students(c) == [KD(2, 1.0, 1.0, "all", 0), Student(2, False, None, 0.0, None, 0)]
    assert soft_label_settings(c) == [(1.0, "all")]
    assert student_tag(c, kd=True) == student_tag(c, kd=False) == ""
    p = Paths(c)
    assert p.student_folder(2).name == "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres"
    assert p.softlabel_cache().name.startswith("3d_fullres__T1__mirror__step0.5__uint8__teachers-")


def test_every_combination_is_its_own_student_and_every_t_and_fold_selection_its_own_cache():
    c = config(SWEEP)
    kd = [s for s in students(c) if s.kd]
    assert len(kd) == 16 and len(set(kd)) == 16
    assert {(s.temperature, s.alpha, s.folds_per_case, s.seed) for s in kd} == {
        (t, a, f, s) for t in (1.0, 3.0) for a in (0.3, 0.7) for f in ("all", "out_of_fold") for s in (0, 1)}
    assert [s for s in students(c) if not s.kd] == [Student(4, False, None, 0.0, None, 0),
                                                    Student(4, False, None, 0.0, None, 1)]
    assert soft_label_settings(c) == [(1.0, "all"), (1.0, "out_of_fold"), (3.0, "all"), (3.0, "out_of_fold")]
    folders = {s: Paths(s.config(c)).student_folder(s.r, s.kd).name for s in students(c)}
    assert len(set(folders.values())) == 18  # no two students share a model folder
    assert folders[KD(4, 3.0, 0.7, "out_of_fold", 1)] == \
        "nnUNetTrainerFastKD_T3_a0.7_oof_s1__nnUNetPlans_fastkdR4__3d_fullres"
    assert folders[KD(4, 1.0, 0.3, "all", 0)] == "nnUNetTrainerFastKD_a0.3__nnUNetPlans_fastkdR4__3d_fullres"
    assert folders[Student(4, False, None, 0.0, None, 1)] == "nnUNetTrainerFastKDNoKD_s1__nnUNetPlans_fastkdR4__3d_fullres"
    caches = {(s.temperature, s.folds_per_case): Paths(s.config(c)).softlabel_cache().name for s in kd}
    assert len(set(caches.values())) == 4
    assert "__T1__" in caches[(1.0, "all")] and "__oof__" in caches[(1.0, "out_of_fold")]
    assert "__oof__" not in caches[(3.0, "all")]
    # the alphas and seeds of one T and fold selection read one cache
    assert len({Paths(s.config(c)).softlabel_cache() for s in kd if s.temperature == 1.0 and s.folds_per_case == "all"}) == 1


def KD(r, temperature, alpha, folds_per_case, seed, **loss):
    """A KD student with the default loss settings (``loss`` overrides some)."""
    values = {k: default(f"distillation.{k}") for k in ("loss", "scales", "class_balanced")}
    values["unlabelled_share"] = default("student.unlabelled_share")
    return Student(r, True, temperature, alpha, folds_per_case, seed, **{**values, **loss})


def test_a_student_config_holds_single_values_and_its_settings_its_seed_and_soft_labels(tmp_path):
    c = config(SWEEP)
    s = KD(4, 1.0, 0.7, "out_of_fold", 1)
    single = s.config(c)
    assert one(single, "distillation.temperature") == 1.0 and single["student"]["seeds"] == [1]
    assert single["distillation"]["reduction_factors"] == [4]
    settings = student_settings(single, tmp_path / "cache.zarr", kd=True)
    assert (settings["temperature"], settings["alpha"], settings["folds_per_case"], settings["seed"]) == \
        (1.0, 0.7, "out_of_fold", 1)
    assert "seeds" not in settings
    baseline = student_settings(Student(4, False, None, 0.0, None, 1).config(c), None, kd=False)
    assert baseline["seed"] == 1 and "temperature" not in baseline and "folds_per_case" not in baseline
    with pytest.raises(FastkdError, match=r"distillation.alpha = \[0.3, 0.7\]: one value is needed here"):
        student_settings(c, tmp_path / "cache.zarr", kd=True)
    with pytest.raises(FastkdError, match="one value is needed"):
        Paths(c).softlabel_cache()


def test_the_trainer_class_and_fold_folder_carry_the_tag():
    from fastkd.student.trainers import nnUNetTrainerFastKD, trainer_class

    cls = trainer_class(True, False, "_T1_s1")
    assert cls.__name__ == "nnUNetTrainerFastKD_T1_s1" and issubclass(cls, nnUNetTrainerFastKD)
    assert trainer_class(True, False) is nnUNetTrainerFastKD
    assert trainer_name(False, True, "_s2") == "nnUNetTrainerFastKDNoKD_DA5_s2"
    folder = student_fold_folder("/r", "Dataset1_X", "P_fastkdR4", "3d_fullres", 0, True, tag="_a0.7")
    assert str(folder) == "/r/Dataset1_X/nnUNetTrainerFastKD_a0.7__P_fastkdR4__3d_fullres/fold_0"


def test_list_values_are_checked_item_by_item():
    for override, message in [({"distillation": {"temperature": [1, 0]}}, r"distillation.temperature\[1\] = 0 .*must be > 0"),
                              ({"distillation": {"alpha": [0.3, 0.3]}}, "distillation.alpha = .*must not repeat a value"),
                              ({"softlabels": {"folds_per_case": "oof"}}, "softlabels.folds_per_case = 'oof' .*all, out_of_fold"),
                              ({"student": {"seeds": []}}, "student.seeds = .*at least 1")]:
        with pytest.raises(ConfigError, match=message):
            config(override)


def test_alpha_zero_in_the_list_is_the_baseline():
    c = config({"distillation": {"alpha": [0, 0.5]}, "student": {"baseline": False}})
    assert [(s.kd, s.alpha) for s in students(c)] == [(True, 0.5), (False, 0.0)]


def test_teacher_validation_without_mirroring_keeps_the_checkpoints_axes(monkeypatch, tmp_path):
    """teachers.validation_mirroring: false validates without mirroring; the axes every later prediction
    reads from the trainer (and its checkpoint) are back afterwards, also when the validation fails."""
    import nnunetv2.run.run_training as run_training

    from fastkd.teachers import train_teacher

    seen = []

    class Trainer:
        output_folder = str(tmp_path)
        inference_allowed_mirroring_axes = (0, 1, 2)
        configuration_manager = type("C", (), {"configuration": {}})()

        def run_training(self):
            pass

        def perform_actual_validation(self, save_probabilities=False):
            seen.append(self.inference_allowed_mirroring_axes)
            if len(seen) == 3:
                raise RuntimeError("validation failed")

    trainers = []
    monkeypatch.setattr(run_training, "get_trainer_from_args", lambda *a, **k: trainers.append(Trainer()) or trainers[-1])
    schedule = {"epochs": 1, "iterations_per_epoch": 1, "val_iterations_per_epoch": 1, "batch_size": None, "save_every": 1}
    train_teacher(1, "3d_fullres", 0, "P", "T", schedule=schedule, device="cpu")
    train_teacher(1, "3d_fullres", 0, "P", "T", schedule=schedule, device="cpu", validation_mirroring=False)
    with pytest.raises(RuntimeError, match="validation failed"):
        train_teacher(1, "3d_fullres", 0, "P", "T", schedule=schedule, device="cpu", validation_mirroring=False)
    assert seen == [(0, 1, 2), None, None]
    assert all(t.inference_allowed_mirroring_axes == (0, 1, 2) for t in trainers)


def test_loss_forms_sweep_into_students_of_their_own_with_their_settings_in_the_name(tmp_path):
    c = config(FORMS)
    kd = [s for s in students(c) if s.kd]
    assert len(kd) == 16 and len({(s.alpha, s.loss, s.scales, s.class_balanced) for s in kd}) == 16
    folders = {s: Paths(s.config(c)).student_folder(s.r, s.kd).name for s in kd}
    assert len(set(folders.values())) == 16
    odd = {"loss": "convex" if default("distillation.loss") == "additive" else "additive",
           "scales": "all" if default("distillation.scales") == "full" else "full",
           "class_balanced": not default("distillation.class_balanced")}
    s = KD(2, 1.0, 0.5, "all", 0, **odd)
    tag = ("_ds" + odd["scales"]) + ("_cb" if odd["class_balanced"] else "_nocb")
    assert f"_{odd['loss']}{tag}__" in folders[s]
    assert "_additive" not in folders[KD(2, 1.0, 0.5, "all", 0)] and "_convex" not in folders[KD(2, 1.0, 0.5, "all", 0)]
    # all four loss forms of one T share one soft-label cache
    assert len({Paths(s.config(c)).softlabel_cache() for s in kd}) == 1
    settings = student_settings(s.config(c), tmp_path / "cache.zarr", kd=True)
    assert {k: settings[k] for k in odd} == odd
    baseline = student_settings(Student(2, False, None, 0.0, None, 0).config(c), None, kd=False)
    assert not {"loss", "scales", "class_balanced"} & set(baseline)
