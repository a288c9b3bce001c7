"""Tests for fastkd.student.plans and `fastkd student`: student plans derived from real nnU-Net plans."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

from fastkd.cli import main
from fastkd.demo import make_demo_dataset
from fastkd.errors import FastkdError
from fastkd.nnunet import is_resenc
from fastkd.student.plans import (
    BLOCK_STRATEGIES,
    FEATURE_FLOOR,
    count_parameters_and_flops,
    derive_student_plans,
    format_info,
    student_plans_name,
    write_student_plans,
)

torch.set_num_threads(1)

DATASET = "Dataset901_StudentPlans"
# nnU-Net's planners, run in a child process because nnU-Net reads its folders from the environment
# at import. The fingerprint is written here rather than extracted (that spawns workers for ~10 s):
# the large shape makes the default planner add 3d_lowres and 3d_cascade_fullres (which only
# `inherits_from` 3d_fullres), the demo's own shape gives a ResEnc net small enough to run on a CPU.
PLAN = """
import json, os, sys
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
from nnunetv2.experiment_planning.experiment_planners.residual_unets.residual_encoder_unet_planners import (
    nnUNetPlannerResEncM)
folder = os.path.join(os.environ["nnUNet_preprocessed"], sys.argv[1])
os.makedirs(folder)
intensities = {"0": {"max": 170.0, "mean": 120.0, "median": 120.0, "min": 80.0, "percentile_00_5": 90.0,
                     "percentile_99_5": 150.0, "std": 11.0}}
for planner, shape in ((ExperimentPlanner, [256, 256, 256]), (nnUNetPlannerResEncM, [32, 40, 32])):
    with open(os.path.join(folder, "dataset_fingerprint.json"), "w") as f:
        json.dump({"foreground_intensity_properties_per_channel": intensities,
                   "median_relative_size_after_cropping": 1.0, "shapes_after_crop": [shape] * 5,
                   "spacings": [[1.0, 1.0, 1.0]] * 5}, f)
    planner(sys.argv[1]).plan_experiment()
"""


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    """{"plain": nnUNetPlans, "resenc": nnUNetResEncUNetMPlans, "dataset_json", "folder": where both plans are}."""
    tmp = tmp_path_factory.mktemp("plans")
    make_demo_dataset(tmp / "raw" / DATASET, n_cases=5)
    env = {**os.environ, "nnUNet_raw": str(tmp / "raw"), "nnUNet_preprocessed": str(tmp / "preprocessed"),
           "nnUNet_results": str(tmp / "results"), "nnUNet_n_proc_DA": "1", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", PLAN, DATASET], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    folder = tmp / "preprocessed" / DATASET
    assert sorted(p.name for p in folder.iterdir()) == ["dataset.json", "dataset_fingerprint.json", "nnUNetPlans.json",
                                                        "nnUNetResEncUNetMPlans.json"]  # planned, not preprocessed
    plain, resenc, dataset_json = (json.loads((folder / f"{name}.json").read_text())
                                   for name in ("nnUNetPlans", "nnUNetResEncUNetMPlans", "dataset"))
    assert set(plain["configurations"]) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    assert plain["configurations"]["3d_cascade_fullres"] == {"inherits_from": "3d_fullres", "previous_stage": "3d_lowres"}
    return {"plain": plain, "resenc": resenc, "dataset_json": dataset_json, "folder": folder}


# -- names and validation ---------------------------------------------------------------------------


def test_plans_name():
    assert student_plans_name("nnUNetPlans", 2) == "nnUNetPlans_fastkdR2"
    assert student_plans_name("nnUNetResEncUNetLPlans", 2, "keep") == "nnUNetResEncUNetLPlans_fastkdR2keep"
    assert student_plans_name("nnUNetResEncUNetMPlans", 8, "adaptive") == "nnUNetResEncUNetMPlans_fastkdR8adaptive"
    with pytest.raises(FastkdError, match="'my__plans'.*'__'"):
        student_plans_name("my__plans", 2)


@pytest.mark.parametrize("r", [0, -2, 2.5, "2", True, None])
def test_bad_reduction_factor(planned, r):
    with pytest.raises(FastkdError, match=f"r = {r!r}: must be an integer >= 1"):
        derive_student_plans(planned["plain"], r)


def test_bad_block_strategy(planned):
    with pytest.raises(FastkdError, match="'fast': must be one of reduce, keep, increase, adaptive"):
        derive_student_plans(planned["resenc"], 2, "fast")
    with pytest.raises(FastkdError, match="feature floor 0"):
        derive_student_plans(planned["plain"], 2, floor=0)


@pytest.mark.parametrize("strategy", ["reduce", "increase", "adaptive"])
def test_block_strategy_on_plain_teacher_is_an_error(planned, strategy):
    with pytest.raises(FastkdError, match=f"block strategy '{strategy}' only applies to ResidualEncoderUNet.*PlainConvUNet"):
        derive_student_plans(planned["plain"], 2, strategy)


def test_broken_inheritance_is_an_error(planned):
    teacher = copy.deepcopy(planned["plain"])
    teacher["configurations"]["a"] = {"inherits_from": "b"}
    teacher["configurations"]["b"] = {"inherits_from": "a"}
    with pytest.raises(FastkdError, match="'a': inherits_from chain a -> b -> a is circular"):
        derive_student_plans(teacher, 2)


# -- derivation ------------------------------------------------------------------------------------


def test_is_resenc(planned):
    assert not any(is_resenc(planned["plain"], c) for c in planned["plain"]["configurations"])
    assert all(is_resenc(planned["resenc"], c) for c in planned["resenc"]["configurations"])
    with pytest.raises(FastkdError, match="'3d_huge' not in the plans nnUNetPlans"):
        is_resenc(planned["plain"], "3d_huge")


@pytest.mark.parametrize("r", [1, 2, 4, 16])
def test_widths_divided_with_floor_topology_kept(planned, r):
    teacher = planned["plain"]
    before = copy.deepcopy(teacher)
    student = derive_student_plans(teacher, r)
    assert teacher == before  # the teacher's dict is not modified
    assert student["plans_name"] == f"nnUNetPlans_fastkdR{r}" and "__" not in student["plans_name"]
    assert student["fastkd"] == {"teacher_plans_name": "nnUNetPlans", "reduction_factor": r, "block_strategy": None,
                                 "feature_floor": FEATURE_FLOOR}
    assert {k: v for k, v in student.items() if k not in ("plans_name", "fastkd", "configurations")} == \
           {k: v for k, v in teacher.items() if k not in ("plans_name", "configurations")}
    for c, cfg in teacher["configurations"].items():
        s = student["configurations"][c]
        assert {k: v for k, v in s.items() if k != "architecture"} == {k: v for k, v in cfg.items() if k != "architecture"}
        if "architecture" in cfg:  # everything but the widths is the teacher's
            t_kwargs, s_kwargs = cfg["architecture"]["arch_kwargs"], s["architecture"]["arch_kwargs"]
            assert s_kwargs["features_per_stage"] == [max(f // r, 8) for f in t_kwargs["features_per_stage"]]
            assert {**s_kwargs, "features_per_stage": None} == {**t_kwargs, "features_per_stage": None}
            assert s["data_identifier"] == cfg["data_identifier"]
    if r == 1:
        assert student["configurations"] == teacher["configurations"]
    if r == 16:
        assert teacher["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][:4] == [32, 64, 128, 256]
        assert student["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"][:4] == [8, 8, 8, 16]


def test_every_configuration_manager_returns_the_student(planned):
    """2d, 3d_fullres, 3d_lowres and 3d_cascade_fullres (which only inherits) all resolve to the student."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    teacher = copy.deepcopy(planned["plain"])
    configurations = teacher["configurations"]
    configurations["3d_fullres_bs4"] = {"inherits_from": "3d_cascade_fullres", "batch_size": 4}
    configurations["3d_fullres_own"] = {"inherits_from": "3d_fullres",
                                        "architecture": copy.deepcopy(configurations["3d_lowres"]["architecture"])}
    student = derive_student_plans(teacher, 4)
    t_pm, s_pm = PlansManager(teacher), PlansManager(student)
    assert s_pm.plans_name == "nnUNetPlans_fastkdR4"
    assert set(s_pm.available_configurations) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres",
                                                  "3d_fullres_bs4", "3d_fullres_own"}
    for c in s_pm.available_configurations:
        t_cm, s_cm = t_pm.get_configuration(c), s_pm.get_configuration(c)
        assert s_cm.network_arch_init_kwargs["features_per_stage"] == \
               [max(f // 4, 8) for f in t_cm.network_arch_init_kwargs["features_per_stage"]], c
        assert s_cm.data_identifier == t_cm.data_identifier and s_cm.patch_size == t_cm.patch_size
    assert s_pm.get_configuration("3d_lowres").data_identifier == "nnUNetPlans_3d_lowres"
    assert s_pm.get_configuration("3d_cascade_fullres").previous_stage_name == "3d_lowres"


BLOCKS = [1, 2, 3, 6, 7, 8]
EXPECTED_BLOCKS = {
    ("reduce", 2): [1, 1, 1, 3, 3, 4], ("reduce", 4): [1, 1, 1, 3, 3, 4], ("reduce", 8): [1, 1, 1, 3, 3, 4],
    ("keep", 2): BLOCKS, ("keep", 4): BLOCKS, ("keep", 8): BLOCKS,
    ("increase", 2): [2, 3, 4, 7, 8, 8], ("increase", 4): [2, 3, 4, 7, 8, 8], ("increase", 8): [2, 3, 4, 7, 8, 8],
    ("adaptive", 2): BLOCKS, ("adaptive", 4): [2, 3, 4, 7, 8, 8], ("adaptive", 8): [3, 4, 5, 8, 8, 8],
}


@pytest.mark.parametrize("strategy, r", sorted(EXPECTED_BLOCKS))
def test_resenc_block_strategies(planned, strategy, r):
    teacher = copy.deepcopy(planned["resenc"])
    real = teacher["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["n_blocks_per_stage"]
    assert real == [1, 3, 4, 6, 6, 6][:len(real)]  # what nnU-Net's ResEnc M planner writes
    for cfg in teacher["configurations"].values():
        cfg["architecture"]["arch_kwargs"]["n_blocks_per_stage"] = BLOCKS
    student = derive_student_plans(teacher, r, strategy)
    assert student["plans_name"] == f"nnUNetResEncUNetMPlans_fastkdR{r}{strategy}"
    assert student["fastkd"]["block_strategy"] == strategy
    for c, cfg in student["configurations"].items():
        kwargs = cfg["architecture"]["arch_kwargs"]
        t_kwargs = teacher["configurations"][c]["architecture"]["arch_kwargs"]
        assert kwargs["n_blocks_per_stage"] == EXPECTED_BLOCKS[strategy, r]
        assert kwargs["features_per_stage"] == [max(f // r, 8) for f in t_kwargs["features_per_stage"]]
        assert kwargs["n_conv_per_stage_decoder"] == t_kwargs["n_conv_per_stage_decoder"]


def test_every_block_strategy_is_a_valid_setting_and_an_unknown_one_is_refused():
    """One list of strategies: the schema's enum and the reference CLI's -bs choices are BLOCK_STRATEGIES
    (derive_student_plans' own refusal of 'fast' is tested above), and a name outside it is refused."""
    from fastkd.config import load_schema
    from fastkd.reference_cli import build_parser

    schema = load_schema()["properties"]["student"]["properties"]["block_strategy"]
    assert tuple(schema["enum"]) == BLOCK_STRATEGIES
    parser = build_parser(resenc=True)
    for strategy in BLOCK_STRATEGIES:
        assert parser.parse_args(["-d", "4", "-bs", strategy]).block_strategy == strategy
    with pytest.raises(SystemExit):
        parser.parse_args(["-d", "4", "-bs", "halve"])


# -- the student network in nnU-Net ----------------------------------------------------------------


@pytest.mark.parametrize("key, r, strategy, configuration",
                         [("plain", 4, "keep", "3d_fullres"), ("plain", 8, "keep", "2d"),
                          ("resenc", 2, "adaptive", "3d_fullres"), ("resenc", 4, "reduce", "2d")])
def test_student_builds_and_runs_in_nnunet(planned, key, r, strategy, configuration):
    import numpy as np
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(derive_student_plans(planned[key], r, strategy))
    cm = pm.get_configuration(configuration)
    n_out = pm.get_label_manager(planned["dataset_json"]).num_segmentation_heads
    network = nnUNetTrainer.build_network_architecture(pm, cm, 1, n_out, enable_deep_supervision=False)
    counted = count_parameters_and_flops(pm.plans, planned["dataset_json"], configuration)
    assert counted["parameters"] == sum(p.numel() for p in network.parameters())
    assert counted["features_per_stage"] == cm.network_arch_init_kwargs["features_per_stage"]
    assert counted["patch_size"] == list(cm.patch_size)
    # the smallest input the strides allow, doubled along one axis: instance norm needs 2 voxels at the bottom
    shape = np.prod(cm.pool_op_kernel_sizes, axis=0).tolist()
    shape[0] *= 2
    with torch.no_grad():
        out = network.eval()(torch.zeros((1, 1, *shape)))
    assert n_out == 3 and tuple(out.shape) == (1, 3, *shape)


def test_counts_match_a_hand_computation(planned):
    """Two-stage 2d PlainConvUNet, 8 x 8 patch, 1 input channel, 3 classes."""
    plans = copy.deepcopy(planned["plain"])
    cfg = plans["configurations"]["2d"]
    cfg["patch_size"] = [8, 8]
    cfg["architecture"]["arch_kwargs"].update(n_stages=2, features_per_stage=[4, 8], kernel_sizes=[[3, 3], [3, 3]],
                                              strides=[[1, 1], [2, 2]], n_conv_per_stage=[1, 1],
                                              n_conv_per_stage_decoder=[1])
    macs = (64 * 4 * 1 * 9     # stage 0 conv 1 -> 4, 8 x 8
            + 16 * 8 * 4 * 9   # stage 1 conv 4 -> 8, stride 2, 4 x 4
            + 16 * 8 * 4 * 4   # transposed conv 8 -> 4, 2 x 2 kernel, from 4 x 4
            + 64 * 4 * 8 * 9   # decoder conv (4 + 4 skip) -> 4, 8 x 8
            + 64 * 3 * 4)      # 1 x 1 segmentation head 4 -> 3
    params = ((9 * 1 * 4 + 4) + 2 * 4 + (9 * 4 * 8 + 8) + 2 * 8  # encoder convs (+bias) and instance norms
              + (4 * 8 * 4 + 4) + (9 * 8 * 4 + 4) + 2 * 4 + (4 * 3 + 3))  # transposed conv, decoder conv, norm, head
    assert count_parameters_and_flops(plans, planned["dataset_json"], "2d") == {
        "parameters": params, "flops": 2 * macs, "patch_size": [8, 8], "features_per_stage": [4, 8]}


@pytest.mark.parametrize("r", [2, 4])
def test_plain_student_is_about_r_squared_smaller(planned, r):
    teacher, dataset_json = planned["plain"], planned["dataset_json"]
    student = derive_student_plans(teacher, r)
    for c in ("3d_fullres", "3d_lowres", "3d_cascade_fullres", "2d"):
        t, s = count_parameters_and_flops(teacher, dataset_json, c), count_parameters_and_flops(student, dataset_json, c)
        # the first conv and the heads shrink by r only, biases and norms too
        assert 0.9 * r ** 2 < t["parameters"] / s["parameters"] <= r ** 2, c
        assert 0.75 * r ** 2 < t["flops"] / s["flops"] <= r ** 2, c
        assert t["flops"] > 1e11 if c != "2d" else t["flops"] > 1e9  # the real, large teacher nets


def test_cascade_input_channels(planned):
    """3d_cascade_fullres also gets the one-hot 3d_lowres segmentation as input (1 image + 2 foreground labels)."""
    plans = derive_student_plans(planned["plain"], 2)
    full = count_parameters_and_flops(plans, planned["dataset_json"], "3d_fullres")
    cascade = count_parameters_and_flops(plans, planned["dataset_json"], "3d_cascade_fullres")
    first_conv = 3 * 3 * 3 * full["features_per_stage"][0]
    assert cascade["parameters"] - full["parameters"] == 2 * first_conv
    with pytest.raises(FastkdError, match="'4d' not in the plans"):
        count_parameters_and_flops(plans, planned["dataset_json"], "4d")


def test_format_info(planned):
    teacher = planned["resenc"]
    text = format_info(teacher, derive_student_plans(teacher, 4, "adaptive"), planned["dataset_json"], ["3d_fullres"])
    lines = text.splitlines()
    assert lines[0] == ("teacher nnUNetResEncUNetMPlans -> student nnUNetResEncUNetMPlans_fastkdR4adaptive "
                        "(r = 4, block strategy adaptive, feature floor 8)")
    assert lines[1].split() == ["configuration", "network", "teacher", "params", "student", "params", "ratio",
                                "teacher", "GFLOPs/patch", "student", "GFLOPs/patch", "ratio"]
    assert lines[2].split()[:2] == ["3d_fullres", "ResidualEncoderUNet"] and lines[2].endswith("x")
    assert lines[3].startswith("  3d_fullres: patch [") and "-> [8, 16, " in lines[3]
    with pytest.raises(FastkdError, match="'3d_lowres'"):
        format_info(teacher, teacher, planned["dataset_json"], ["3d_lowres"])


def test_write_student_plans(planned, tmp_path):
    teacher_file = tmp_path / "nnUNetResEncUNetMPlans.json"
    teacher_file.write_text(json.dumps(planned["resenc"]))
    out = tmp_path / "out" / "nnUNetResEncUNetMPlans_fastkdR2reduce.json"
    plans = write_student_plans(teacher_file, out, 2, "reduce")
    assert json.loads(out.read_text()) == plans == derive_student_plans(planned["resenc"], 2, "reduce")
    assert out.read_text().startswith('{\n  "dataset_name"')
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name]
    with pytest.raises(FastkdError, match="does not exist"):
        write_student_plans(tmp_path / "missing.json", out, 2)


# -- CLI -------------------------------------------------------------------------------------------


def test_cli_student_plans(planned, tmp_path, capsys):
    teacher = planned["folder"] / "nnUNetPlans.json"
    out = tmp_path / "nnUNetPlans_fastkdR2.json"
    assert main(["student", "plans", str(teacher), "-r", "2", "-o", str(out)]) == 0
    assert capsys.readouterr().out == f"student plans nnUNetPlans_fastkdR2: {out}\n"
    assert json.loads(out.read_text())["fastkd"]["reduction_factor"] == 2

    for argv, message in [(["-r", "0"], "reduction factor r = 0: must be an integer >= 1"),
                          (["-r", "2", "-bs", "adaptive"], "block strategy 'adaptive' only applies to ResidualEncoderUNet")]:
        assert main(["student", "plans", str(teacher), *argv, "-o", str(tmp_path / "x.json")]) == 1
        assert capsys.readouterr().err.startswith(f"fastkd student plans: error: {message}")
    assert main(["student", "plans", str(tmp_path / "none.json"), "-r", "2"]) == 1
    assert f"plans file {tmp_path / 'none.json'} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_cli_student_plans_default_output(planned, tmp_path):
    """As a console script; without -o the plans go beside the teacher's, where nnU-Net looks for them."""
    teacher = tmp_path / "nnUNetResEncUNetMPlans.json"
    teacher.write_text(json.dumps(planned["resenc"]))
    run = subprocess.run(["fastkd", "student", "plans", str(teacher), "-r", "4", "-bs", "adaptive"],
                         capture_output=True, text=True, timeout=60)
    out = tmp_path / "nnUNetResEncUNetMPlans_fastkdR4adaptive.json"
    assert run.returncode == 0, run.stderr
    assert run.stdout == f"student plans nnUNetResEncUNetMPlans_fastkdR4adaptive: {out}\n"
    assert json.loads(out.read_text()) == derive_student_plans(planned["resenc"], 4, "adaptive")


def test_cli_student_info(planned, tmp_path, capsys):
    teacher = planned["folder"] / "nnUNetPlans.json"
    assert main(["student", "info", str(teacher), "-r", "4", "-c", "3d_fullres", "3d_lowres"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "teacher nnUNetPlans -> student nnUNetPlans_fastkdR4 (r = 4, block strategy -, feature floor 8)"
    assert [line.split()[0] for line in out[2:4]] == ["3d_fullres", "3d_lowres"]

    student = tmp_path / "student.json"
    student.write_text(json.dumps(derive_student_plans(planned["plain"], 2)))
    assert main(["student", "info", str(teacher), "--student", str(student),
                 "--dataset-json", str(planned["folder"] / "dataset.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("teacher nnUNetPlans -> student nnUNetPlans_fastkdR2 (r = 2")
    assert sorted(line.split()[0] for line in out[2:6]) == ["2d", "3d_cascade_fullres", "3d_fullres", "3d_lowres"]

    lonely = tmp_path / "lonely" / "nnUNetPlans.json"
    lonely.parent.mkdir()
    lonely.write_text(teacher.read_text())
    assert main(["student", "info", str(lonely), "-r", "2"]) == 1
    assert capsys.readouterr().err == (f"fastkd student info: error: dataset.json {lonely.parent / 'dataset.json'} "
                                       "does not exist (needed for the input and output channels; give one with "
                                       "--dataset-json)\n")
    assert main(["student", "info", str(teacher), "-c", "3d_huge"]) == 1
    assert "configuration(s) ['3d_huge'] not in the plans nnUNetPlans" in capsys.readouterr().err
    assert main(["student", "info", str(teacher), "--student", str(student), "-bs", "reduce"]) == 1
    assert "-bs reduce derives a student; --student" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: -r and --student exclude each other
        main(["student", "info", str(teacher), "-r", "2", "--student", str(student)])
