"""Config validation: defaults are filled, every bad value is rejected with key, value and what is valid."""

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fastkd.checks import load_config, validate_config

from fastkd.config import ConfigError

REPO = Path(__file__).resolve().parents[2]


def demo_config():
    with open(REPO / "config.yaml") as f:
        return yaml.safe_load(f)


def test_repo_config_is_valid_and_complete(tmp_path):
    config = validate_config(demo_config(), base_dir=tmp_path)
    assert config["dataset"]["raw"] == "demo"
    assert config["teachers"]["folds"] == [0, 1, 2, 3, 4]
    assert config["distillation"]["temperature"] == 1.0 and config["student"]["seeds"] == [0, 1, 2]


def test_empty_config_gets_every_default(tmp_path):
    config = validate_config({}, base_dir=tmp_path)
    assert config["dataset"] == {"raw": "demo", "demo": {"id": 900, "name": "FastkdDemo", "n_cases": 12, "n_test": 4,
                                                         "anisotropic": False, "seed": 0, "shape": None, "spacing": None,
                                                         "n_structures": 2, "n_channels": 1, "regions": False,
                                                         "label_noise": 0, "n_unlabelled": 0},
                                 "holdout": {"n_test": 0, "seed": 0}, "unlabelled": None}
    assert config["paths"]["nnunet_results"] == "nnUNet_results"
    assert config["teachers"]["schedule"] == {"epochs": 1000, "iterations_per_epoch": 250,
                                              "val_iterations_per_epoch": 50, "batch_size": None, "save_every": 10}
    assert config["resources"]["train_teacher"] == {"threads": 1, "mem_mb": 8000, "runtime": 1440}


def test_partial_resources_block_keeps_the_other_defaults(tmp_path):
    config = validate_config({"resources": {"train_teacher": {"threads": 4}}}, base_dir=tmp_path)
    assert config["resources"]["train_teacher"] == {"threads": 4, "mem_mb": 8000, "runtime": 1440}
    assert config["resources"]["plan_preprocess"]["threads"] == 2


def test_defaults_do_not_leak_between_configs(tmp_path):
    a = validate_config({}, base_dir=tmp_path)
    a["teachers"]["folds"].append(99)
    assert validate_config({}, base_dir=tmp_path)["teachers"]["folds"] == [0, 1, 2, 3, 4]


# (override, words the message must contain: the key, the value, what is valid)
BAD_VALUES = [
    ({"distillation": {"temperature": 0}}, ["distillation.temperature", "0", "> 0"]),
    ({"distillation": {"temperature": -1.5}}, ["distillation.temperature", "-1.5", "> 0"]),
    ({"distillation": {"alpha": 1.2, "loss": "convex"}}, ["distillation.alpha", "1.2", "<= 1"]),
    ({"distillation": {"alpha": -0.1}}, ["distillation.alpha", "-0.1", ">= 0"]),
    ({"distillation": {"reduction_factors": [0]}}, ["distillation.reduction_factors[0]", "0", ">= 1"]),
    ({"distillation": {"reduction_factors": []}}, ["distillation.reduction_factors", "at least 1"]),
    ({"teachers": {"folds": [0, 5]}}, ["teachers.folds[1]", "5", "<= 4"]),
    ({"teachers": {"folds": [-1]}}, ["teachers.folds[0]", "-1", ">= 0"]),
    ({"teachers": {"folds": [1, 1]}}, ["teachers.folds", "repeat"]),
    ({"teachers": {"folds": []}}, ["teachers.folds", "at least 1"]),
    ({"teachers": {"schedule": {"epochs": "ten"}}}, ["teachers.schedule.epochs", "'ten'", "expected integer"]),
    ({"teachers": {"schedule": {"epochs": 0}}}, ["teachers.schedule.epochs", "0", ">= 1"]),
    ({"teachers": {"schedule": {"batch_size": 1.5}}}, ["teachers.schedule.batch_size", "1.5", "integer or null"]),
    ({"teachers": {"device": "gpu"}}, ["teachers.device", "'gpu'", "cpu, cuda, mps"]),
    ({"teachers": {"checkpoint": "fold_0/x.pth"}}, ["teachers.checkpoint", "fold_0/x.pth", "pattern"]),
    ({"teachers": {"trainer": "my trainer"}}, ["teachers.trainer", "'my trainer'", "pattern"]),
    ({"plans": {"planner": "ResEncS"}}, ["plans.planner", "'ResEncS'", "default, ResEncM, ResEncL, ResEncXL"]),
    ({"plans": {"configurations": ["3d"]}}, ["plans.configurations[0]", "'3d'", "2d, 3d_fullres, 3d_lowres"]),
    ({"dataset": {"demo": {"n_cases": 3}}}, ["dataset.demo.n_cases", "3", ">= 5"]),
    ({"dataset": {"demo": {"anisotropic": "maybe"}}}, ["dataset.demo.anisotropic", "'maybe'", "boolean"]),
    ({"dataset": {"demo": {"shape": [32, 40, 32, 8]}}}, ["dataset.demo.shape", "must hold at most 3 item(s)"]),
    ({"dataset": {"demo": {"shape": [32, 40]}}}, ["dataset.demo.shape", "must hold at least 3 item(s)"]),
    ({"paths": {"work": ""}}, ["paths.work", "''", "must not be empty"]),
    ({"resources": {"train_teacher": {"threads": 0}}}, ["resources.train_teacher.threads", "0", ">= 1"]),
    ({"temprature": 3}, ["'temprature'", "top level", "valid keys", "distillation"]),
    ({"distillation": {"temprature": 3}}, ["'temprature'", "under 'distillation'", "temperature"]),
    ({"teachers": {"schedule": {"epoch": 3}}}, ["'epoch'", "teachers.schedule", "epochs"]),
]


@pytest.mark.parametrize("override,words", BAD_VALUES, ids=[json.dumps(o) for o, _ in BAD_VALUES])
def test_bad_value_is_rejected_naming_key_value_and_valid_range(tmp_path, override, words):
    with pytest.raises(ConfigError) as info:
        validate_config(override, base_dir=tmp_path)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} missing from: {message}"


def test_all_problems_are_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as info:
        validate_config({"distillation": {"temperature": 0, "alpha": -1}}, base_dir=tmp_path)
    assert "distillation.temperature" in str(info.value) and "distillation.alpha" in str(info.value)


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(ConfigError, match=r"dataset.raw = '.*Dataset004_Missing'.*does not exist"):
        validate_config({"dataset": {"raw": str(tmp_path / "Dataset004_Missing")}}, base_dir=tmp_path)


def test_dataset_folder_without_dataset_json_lists_what_it_found(tmp_path):
    folder = tmp_path / "Dataset004_Empty"
    (folder / "imagesTr").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"no dataset.json .*found: imagesTr"):
        validate_config({"dataset": {"raw": str(folder)}}, base_dir=tmp_path)


def test_dataset_folder_must_be_named_like_nnunet(tmp_path):
    folder = tmp_path / "hippocampus"
    folder.mkdir()
    (folder / "dataset.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"dataset.raw = .*DatasetXXX_Name"):
        validate_config({"dataset": {"raw": str(folder)}}, base_dir=tmp_path)


def test_relative_dataset_path_resolves_against_base_dir(tmp_path):
    folder = tmp_path / "data" / "Dataset004_Tiny"
    folder.mkdir(parents=True)
    (folder / "dataset.json").write_text(json.dumps(
        {"file_ending": ".nii.gz", "channel_names": {"0": "MRI"}, "labels": {"background": 0, "a": 1}, "numTraining": 1}))
    for sub, suffix in (("imagesTr", "_0000.nii.gz"), ("labelsTr", ".nii.gz")):
        (folder / sub).mkdir()
        for case in ("case_000", "case_001"):
            (folder / sub / f"{case}{suffix}").touch()
    validate_config({"dataset": {"raw": "data/Dataset004_Tiny"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"softlabels.shards = 3: more soft-label jobs than training cases \(2\); use 1-2"):
        validate_config({"dataset": {"raw": "data/Dataset004_Tiny"}, "softlabels": {"shards": 3}}, base_dir=tmp_path)
    (folder / "dataset.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"dataset.raw = 'data/Dataset004_Tiny': cannot list its training cases"):
        validate_config({"dataset": {"raw": "data/Dataset004_Tiny"}, "softlabels": {"shards": 1}}, base_dir=tmp_path)


def test_teacher_configuration_must_be_preprocessed(tmp_path):
    with pytest.raises(ConfigError, match=r"teachers.configuration = '2d'.*plans.configurations \['3d_fullres'\]"):
        validate_config({"teachers": {"configuration": "2d"}}, base_dir=tmp_path)


#: the least an nnU-Net plans configuration holds for nnU-Net's PlansManager to read it
ARCHITECTURE = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {"n_stages": 2, "features_per_stage": [32, 64]}, "_kw_requires_import": []}


def make_teacher_folder(root: Path, folds, checkpoint="checkpoint_final.pth", configuration="3d_fullres",
                        name="nnUNetTrainer__nnUNetPlans__3d_fullres", data_identifier="nnUNetPlans_3d_fullres") -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "plans.json").write_text(json.dumps(
        {"plans_name": name.split("__")[1],
         "configurations": {configuration: {"data_identifier": data_identifier, "architecture": ARCHITECTURE}}}))
    (folder / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}}))
    for f in folds:
        (folder / f"fold_{f}").mkdir()
        (folder / f"fold_{f}" / checkpoint).write_bytes(b"x")
    return folder


def test_external_teacher_folder_missing_fold_lists_what_was_found(tmp_path):
    folder = make_teacher_folder(tmp_path, folds=[0, 1], checkpoint="checkpoint_best.pth")
    (folder / "fold_1" / "checkpoint_final.pth").write_bytes(b"x")
    with pytest.raises(ConfigError) as info:
        validate_config({"teachers": {"model_folder": str(folder), "folds": [0, 1, 2]}}, base_dir=tmp_path)
    message = str(info.value)
    assert "teachers.model_folder" in message
    assert "missing fold_0/checkpoint_final.pth, fold_2/checkpoint_final.pth" in message
    assert "fold_0: checkpoint_best.pth" in message
    assert "fold_1: checkpoint_best.pth, checkpoint_final.pth" in message


def test_external_teacher_folder_without_plans(tmp_path):
    folder = tmp_path / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    (folder / "fold_0").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"lacks plans.json, dataset.json \(found: fold_0\)"):
        validate_config({"teachers": {"model_folder": str(folder), "folds": [0]}}, base_dir=tmp_path)


def test_external_teacher_folder_without_the_configuration(tmp_path):
    folder = make_teacher_folder(tmp_path, folds=[0], configuration="2d")
    with pytest.raises(ConfigError, match=r"no configuration '3d_fullres' \(it has: 2d\)"):
        validate_config({"teachers": {"model_folder": str(folder), "folds": [0]}}, base_dir=tmp_path)


def test_external_teacher_folder_complete_is_accepted(tmp_path):
    folder = make_teacher_folder(tmp_path, folds=[0, 3])
    validate_config({"teachers": {"model_folder": str(folder), "folds": [0, 3]}}, base_dir=tmp_path)


def test_load_config_merges_files_in_order(tmp_path):
    override = tmp_path / "override.yaml"
    override.write_text("teachers:\n  folds: [0, 1]\n  schedule:\n    epochs: 7\n")
    config = load_config([REPO / "config.yaml", override], base_dir=tmp_path)
    assert config["teachers"]["folds"] == [0, 1]
    assert config["teachers"]["schedule"]["epochs"] == 7
    assert config["teachers"]["schedule"]["iterations_per_epoch"] == demo_config()["teachers"]["schedule"]["iterations_per_epoch"]


def test_cli_config_exits_nonzero_with_the_message(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**copy.deepcopy(demo_config()), "distillation": {"temperature": -2}}))
    run = subprocess.run([sys.executable, "-m", "fastkd.cli", "config", "show", str(bad)], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert run.returncode == 1
    assert "distillation.temperature = -2 (int): must be > 0" in run.stderr
    assert "Traceback" not in run.stderr


def test_cli_config_prints_complete_config_and_paths(tmp_path):
    run = subprocess.run([sys.executable, "-m", "fastkd", "config", "show", str(REPO / "config.yaml"), "--paths"],
                         capture_output=True, text=True, cwd=tmp_path, check=True, timeout=600)
    printed = yaml.safe_load(run.stdout)
    assert printed["teachers"]["checkpoint"] == "checkpoint_final.pth"
    assert "# teacher fold 4: nnUNet_results/Dataset900_FastkdDemo/nnUNetTrainer__nnUNetPlans__3d_fullres/fold_4/checkpoint_final.pth" in run.stdout


def test_extra_teacher_folders_are_checked(tmp_path):
    main = make_teacher_folder(tmp_path / "a", folds=[0, 1])
    resenc = make_teacher_folder(tmp_path / "b", folds=[0], name="nnUNetTrainer__nnUNetResEncUNetMPlans__3d_fullres")
    other_grid = make_teacher_folder(tmp_path / "c", folds=[0], name="nnUNetTrainer__nnUNetPlansX__3d_fullres",
                                     data_identifier="nnUNetPlansX_3d_fullres")
    teachers = {"model_folder": str(main), "folds": [0, 1]}
    config = validate_config({"teachers": {**teachers, "extra": [{"model_folder": str(resenc), "folds": [0],
                                                                     "weight": 0.5}]}}, base_dir=tmp_path)
    assert config["teachers"]["extra"][0] == {"model_folder": str(resenc), "configuration": None, "folds": [0],
                                              "checkpoint": "checkpoint_final.pth", "weight": 0.5}
    with pytest.raises(ConfigError) as info:
        validate_config({"teachers": {**teachers, "extra": [{"model_folder": str(other_grid), "folds": [0]},
                                                            {"model_folder": str(resenc), "folds": [0, 2]},
                                                            {"model_folder": str(main)}]}}, base_dir=tmp_path)
    message = str(info.value)
    assert "teachers.extra[0].model_folder: preprocessed as 'nnUNetPlansX_3d_fullres', the teachers as " \
           "'nnUNetPlans_3d_fullres'" in message
    assert "teachers.extra[1].model_folder" in message and "missing fold_2/checkpoint_final.pth" in message
    assert "teachers.extra: teacher folders need distinct names" in message
    with pytest.raises(ConfigError, match=r"teachers.extra\[0\].weight = 0 \(int\): must be > 0"):
        validate_config({"teachers": {**teachers, "extra": [{"model_folder": str(resenc), "weight": 0}]}},
                        base_dir=tmp_path)


def test_strings_from_snakemake_command_line_become_numbers_and_booleans(tmp_path):
    config = validate_config({"distillation": {"temperature": "2.5", "alpha": "0"},
                              "softlabels": {"mirroring": "false", "shards": "3"}}, base_dir=tmp_path)
    assert config["distillation"]["temperature"] == 2.5 and config["distillation"]["alpha"] == 0
    assert config["softlabels"]["mirroring"] is False and config["softlabels"]["shards"] == 3
    with pytest.raises(ConfigError, match=r"softlabels.shards = '2.5' \(str\): expected integer"):
        validate_config({"softlabels": {"shards": "2.5"}}, base_dir=tmp_path)


# -- one source per setting: defaults and checks come from the schema -------------------------------
def test_defaults_come_from_the_schema():
    from fastkd.config import default, load_schema

    student = load_schema()["properties"]["student"]["properties"]
    assert default("student.schedule.epochs") == student["schedule"]["properties"]["epochs"]["default"] == 1000
    assert default("distillation.temperature") == 1.0
    with pytest.raises(KeyError, match="'student.nope' is not a fastkd config key"):
        default("student.nope")


def test_command_line_flags_are_checked_by_the_schema():
    import argparse

    from fastkd.cli import build_parser
    from fastkd.config import arg_type

    assert arg_type("distillation.temperature")("2.5") == 2.5
    assert arg_type("teachers.schedule.batch_size")("null") is None
    assert arg_type("teachers.folds")("3") == 3  # a list key: each value of the flag is one item
    for key, text, message in [("distillation.temperature", "0", "distillation.temperature = 0 (int): must be > 0"),
                               ("teachers.folds", "7", "teachers.folds[] = 7 (int): must be <= 4"),
                               ("softlabels.dtype", "int8", "must be one of: uint8, float16")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
            arg_type(key)(text)
    # argparse defaults are the schema's
    args = build_parser().parse_args(["softlabels", "fill", "-o", "s", "-t", "t", "-m", "m"])
    assert (args.temperature, args.step_size, args.dtype, args.device) == (1.0, 0.5, "uint8", "cpu")
    args = build_parser().parse_args(["teachers", "train", "-d", "4", "-f", "0"])
    assert (args.epochs, args.iterations, args.save_every, args.trainer) == (1000, 250, 10, "nnUNetTrainer")


def test_overrides_round_trip_through_the_schema(tmp_path):
    from fastkd.config import overrides, parse_overrides

    subset = {"student": {"schedule": {"epochs": 4, "batch_size": None}, "augmentation": "da5", "plans": None,
                          "resume": False}, "distillation": {"temperature": 2.0}}
    pairs = overrides(subset)
    assert "student.schedule.epochs=4" in pairs and "student.augmentation=da5" in pairs
    assert parse_overrides(pairs) == subset
    config = validate_config(parse_overrides(pairs), base_dir=tmp_path)
    assert config["student"]["schedule"]["epochs"] == 4 and config["student"]["schedule"]["iterations_per_epoch"] == 250
    with pytest.raises(ConfigError, match="'student.epochs' is not a fastkd config key"):
        parse_overrides(["student.epochs=4"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["student.schedule.epochs"])


def test_one_thread_training_jobs_keep_an_augmentation_worker(monkeypatch):
    from fastkd.cli.common import set_threads

    for key in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc"):
        monkeypatch.delenv(key, raising=False)
    set_threads(1, training=True)
    assert os.environ["nnUNet_n_proc_DA"] == "1" and os.environ["nnUNet_def_n_proc"] == "1"
    monkeypatch.delenv("nnUNet_n_proc_DA")
    set_threads(1)  # soft labels and the like: no augmentation at all
    assert os.environ["nnUNet_n_proc_DA"] == "0"
    monkeypatch.setenv("nnUNet_n_proc_DA", "6")  # the user's choice wins
    set_threads(1, training=True)
    assert os.environ["nnUNet_n_proc_DA"] == "6"


def test_top_k_is_checked_against_dtype_classes_and_regions(tmp_path):
    from fastkd.paths import Paths

    config = validate_config({"softlabels": {"top_k": 2}}, base_dir=tmp_path)
    assert "__uint8-top2__" in Paths(config).softlabel_name  # its own store
    with pytest.raises(ConfigError, match=r"softlabels.top_k = 2 stores uint8 values: set softlabels.dtype: uint8 "
                                          r"\(is float16\)"):
        validate_config({"softlabels": {"top_k": 2, "dtype": "float16"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="softlabels.top_k"):
        validate_config({"softlabels": {"top_k": 0}}, base_dir=tmp_path)
    raw = tmp_path / "Dataset004_Hippocampus"
    (raw / "imagesTr").mkdir(parents=True)
    for i in range(2):
        (raw / "imagesTr" / f"hippocampus_{i:03d}_0000.nii.gz").write_bytes(b"")
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "anterior": 1, "posterior": 2},
                                                 "channel_names": {"0": "MRI"}, "file_ending": ".nii.gz",
                                                 "numTraining": 2}))
    with pytest.raises(ConfigError, match=r"softlabels.top_k = 3: must be below the number of classes of "
                                          r"Dataset004_Hippocampus \(3\)"):
        validate_config({"dataset": {"raw": str(raw)}, "softlabels": {"top_k": 3, "shards": 1}}, base_dir=tmp_path)


# configs whose data a protocol script prepares first, run from a working directory of their own:
# tests/unit/test_unlabelled_protocol.py prepares it and validates them there
ON_PREPARED_DATA = {"unlabelled-hippocampus.yaml"}


@pytest.mark.parametrize("name", [  # configs of the real datasets in ../shared: ci tier (the default needs no data)
    pytest.param(p.name, marks=[pytest.mark.ci] if "../shared/" in p.read_text() else [])
    for p in sorted((REPO / "configs").glob("*.yaml")) if p.name not in ON_PREPARED_DATA])
def test_checked_in_configs_validate_on_top_of_config_yaml(name):
    """configs/*.yaml are documented as `--configfile configs/X.yaml` from the repository root."""
    load_config([REPO / "config.yaml", REPO / "configs" / name], base_dir=REPO)


def test_configs_on_prepared_data_exist_and_say_how_to_prepare_it():
    for name in ON_PREPARED_DATA:
        text = (REPO / "configs" / name).read_text()
        assert "unlabelled_protocol.py prepare" in text and "From a working directory" in text, name


@pytest.mark.parametrize("distillation", [{"loss": "convex", "alpha": 1.5}, {"loss": ["additive", "convex"], "alpha": [0.5, 2]}])
def test_the_convex_loss_form_needs_alpha_at_most_one(tmp_path, distillation):
    with pytest.raises(ConfigError, match=r"distillation.alpha = (1.5|2) with distillation.loss 'convex'.*0 <= alpha <= 1"):
        validate_config({"distillation": distillation}, base_dir=tmp_path)
    config = validate_config({"distillation": {"loss": "additive", "alpha": 2}}, base_dir=tmp_path)
    assert (config["distillation"]["loss"], config["distillation"]["alpha"]) == ("additive", 2.0)
