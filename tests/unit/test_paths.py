"""The path module: every artifact path follows from the config, and matches what nnU-Net writes."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from fastkd.checks import validate_config
from fastkd.nnunet import PLANNERS
from fastkd.paths import Paths
from fastkd.preprocess import training_cases

from test_config import ARCHITECTURE, make_teacher_folder


def paths_for(tmp_path, **override) -> Paths:
    return Paths(validate_config(override, base_dir=tmp_path))


def test_demo_paths(tmp_path):
    p = paths_for(tmp_path)
    ds = "Dataset900_FastkdDemo"
    assert p.dataset_name == ds and p.dataset_id == 900 and p.is_demo
    assert p.raw_dataset == p.raw_source == Path("nnUNet_raw") / ds
    assert p.raw_dataset_json == Path("nnUNet_raw") / ds / "dataset.json"
    assert p.plans_file == Path("nnUNet_preprocessed") / ds / "nnUNetPlans.json"
    assert p.splits_file == Path("nnUNet_preprocessed") / ds / "splits_final.json"
    assert p.preprocessed_case("3d_fullres", "demo_003") == Path("nnUNet_preprocessed") / ds / "nnUNetPlans_3d_fullres" / "demo_003.b2nd"
    assert p.preprocessed_case("2d", "demo_003", seg=True).name == "demo_003_seg.b2nd"
    assert p.preprocess_manifest("3d_fullres") == Path("fastkd_work") / ds / "preprocess" / "nnUNetPlans__3d_fullres.json"
    folder = Path("nnUNet_results") / ds / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert p.teacher_folder == folder
    assert p.teacher_checkpoint(2) == folder / "fold_2" / "checkpoint_final.pth"
    assert p.teacher_validation_summary(2) == folder / "fold_2" / "validation" / "summary.json"
    assert p.teacher_manifest == Path("fastkd_work") / ds / "teachers" / "nnUNetTrainer__nnUNetPlans__3d_fullres.json"
    assert p.log("train_teacher", "fold_1") == Path("fastkd_work") / "logs" / "train_teacher" / f"{ds}__fold_1.log"
    assert p.benchmark("plan_preprocess").suffix == ".tsv"
    assert training_cases(p.config) == [f"demo_{i:03d}" for i in range(12)]


def test_configured_folders_and_absolute_environment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = paths_for(tmp_path, paths={"nnunet_raw": "r", "nnunet_preprocessed": "/abs/pp", "nnunet_results": "res",
                                   "work": "w"},
                  teachers={"checkpoint": "checkpoint_best.pth", "trainer": "nnUNetTrainerDA5"},
                  dataset={"demo": {"id": 17, "name": "Tiny", "n_cases": 6}})
    assert p.dataset_name == "Dataset017_Tiny"
    assert p.teacher_checkpoint(0) == Path("res/Dataset017_Tiny/nnUNetTrainerDA5__nnUNetPlans__3d_fullres/fold_0/checkpoint_best.pth")
    assert p.preprocess_manifest("3d_fullres").parts[0] == "w"
    assert p.nnunet_env() == {"nnUNet_raw": str(tmp_path / "r"), "nnUNet_preprocessed": "/abs/pp",
                              "nnUNet_results": str(tmp_path / "res")}
    assert len(training_cases(p.config)) == 6


@pytest.mark.parametrize("planner", sorted(PLANNERS))
@pytest.mark.parametrize("configuration", ["2d", "3d_fullres", "3d_lowres"])
def test_plans_name_and_data_identifier_match_nnunet_planners(tmp_path, planner, configuration):
    """The parse-time guess must equal what the nnU-Net planner class itself generates."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import recursive_find_python_class
    import nnunetv2

    planner_class, plans_name = PLANNERS[planner]
    cls = recursive_find_python_class(str(Path(nnunetv2.__path__[0]) / "experiment_planning"), planner_class,
                                      current_module="nnunetv2.experiment_planning")
    import inspect

    assert inspect.signature(cls.__init__).parameters["plans_name"].default == plans_name
    p = paths_for(tmp_path, plans={"planner": planner, "configurations": [configuration]},
                  teachers={"configuration": configuration})
    assert p.plans_name == plans_name
    expected = cls.generate_data_identifier(SimpleNamespace(plans_identifier=plans_name), configuration)
    assert p.data_identifier(configuration) == expected


def test_external_teachers_provide_folder_and_plans(tmp_path):
    folder = make_teacher_folder(tmp_path / "elsewhere", folds=[0, 1])
    plans = json.loads((folder / "plans.json").read_text())
    plans["plans_name"] = "nnUNetResEncUNetLPlans"
    plans["configurations"]["3d_fullres"] = {"data_identifier": "nnUNetPlans_3d_fullres", "architecture": ARCHITECTURE}
    (folder / "plans.json").write_text(json.dumps(plans))
    p = paths_for(tmp_path, teachers={"model_folder": str(folder), "folds": [0, 1]})
    assert p.teacher_folder == folder
    assert p.plans_name == "nnUNetResEncUNetLPlans" and p.planner_class is None
    assert p.plans_file.name == "nnUNetResEncUNetLPlans.json"
    assert p.data_identifier("3d_fullres") == "nnUNetPlans_3d_fullres"
    assert p.teacher_checkpoint(1) == folder / "fold_1" / "checkpoint_final.pth"
    assert p.teacher_manifest.name == "nnUNetTrainer__nnUNetPlans__3d_fullres.json"


def test_real_dataset_cases_come_from_dataset_json(tmp_path):
    from fastkd.demo import make_demo_dataset

    raw = tmp_path / "Dataset123_Elsewhere"
    make_demo_dataset(raw, n_cases=5)
    (raw / "imagesTr" / "demo_004_0000.nii.gz").unlink()  # nnU-Net lists cases by their images
    p = paths_for(tmp_path, dataset={"raw": str(raw)})
    assert p.dataset_name == "Dataset123_Elsewhere" and p.dataset_id == 123 and not p.is_demo
    assert p.raw_source == raw and p.raw_dataset == Path("nnUNet_raw") / "Dataset123_Elsewhere"
    assert training_cases(p.config) == ["demo_000", "demo_001", "demo_002", "demo_003"]


def test_every_student_fold_comes_from_one_function(tmp_path):
    """The rules and the report loop over ``student_folds``: every student of a sweep (by model folder) times
    every fold, students first, each with the Paths of its own single-valued config."""
    from fastkd.paths import student_folds, students_by_folder
    from fastkd.sweep import students

    config = validate_config({"distillation": {"temperature": [1, 3], "reduction_factors": [2, 4]},
                              "student": {"folds": [0, 3], "seeds": [0]}}, base_dir=tmp_path)
    by_folder = students_by_folder(config)
    assert [s for s, _ in by_folder.values()] == students(config)  # 2 r x (2 T + the baseline)
    assert len(by_folder) == 6 and all(p.student_folder(s.r, s.kd).name == name for name, (s, p) in by_folder.items())
    assert {p.softlabel_name for s, p in by_folder.values() if s.kd} == {Paths(validate_config(
        {"distillation": {"temperature": t}}, base_dir=tmp_path)).softlabel_name for t in (1, 3)}
    folds = student_folds(config)
    assert [(s, fold) for s, _, fold in folds] == [(s, f) for s in students(config) for f in (0, 3)]
    s, p, fold = folds[-1]
    assert p.student_validation_summary(s.r, fold, s.kd) == (
        p.student_folder(s.r, s.kd) / "fold_3" / "validation" / "summary.json")


def test_files_named_after_other_files_come_from_paths(tmp_path):
    """The rules ask Paths for every file, also those beside another one (an export's verification, an
    engine's metadata) and the demo's raw files in nnU-Net's naming."""
    p = paths_for(tmp_path, dataset={"demo": {"n_channels": 2}}, export={"tensorrt": {"enabled": True}})
    ds, model = "Dataset900_FastkdDemo", "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres"
    export = Path("fastkd_work") / ds / "export" / model
    assert p.onnx_verification(model, 1) == export / "fold_1.onnx.json"
    assert p.trt_metadata(model, "{fold}") == export / "fold_{fold}.engine.json"
    assert p.teacher_plans == p.teacher_folder / "plans.json"
    assert p.preprocessed_dataset_json == Path("nnUNet_preprocessed") / ds / "dataset.json"
    images, labels = p.raw_case_files(["demo_000", "demo_001"], 2)
    raw = Path("nnUNet_raw") / ds
    assert images == [raw / "imagesTr" / f"demo_00{c}_000{ch}.nii.gz" for c in (0, 1) for ch in (0, 1)]
    assert labels == [raw / "labelsTr" / "demo_000.nii.gz", raw / "labelsTr" / "demo_001.nii.gz"]
    assert p.raw_case_files(["demo_test_000"], 1, test=True) == ([raw / "imagesTs" / "demo_test_000_0000.nii.gz"],
                                                                [raw / "labelsTs" / "demo_test_000.nii.gz"])
