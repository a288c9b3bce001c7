"""The reference system's training commands (fastkd.reference_cli): flag mapping, errors, help, dry run,
(a real run on the workflow's cache: tests/workflow/test_reference_cli_training.py)."""

import json
import os
import subprocess

import numpy as np
import pytest

from fastkd import reference_cli as rc
from fastkd.cache import FORMAT_VERSION, finalize, write_case
from fastkd.checks import validate_config
from fastkd.paths import Paths
from workflow_runs import BIN

DS = "Dataset900_FastkdDemo"
CASES = [f"demo_{i:03d}" for i in range(5)]
DATASET_JSON = {"channel_names": {"0": "MRI"}, "labels": {"background": 0, "blob": 1}, "numTraining": 5,
                "file_ending": ".nii.gz"}
REFERENCE_FLAGS = ["-d", "--dataset_id", "-c", "-f", "--fold", "-t", "--teacher_model_folder", "-tf",
                   "--teacher_folds", "-tcp", "-a", "--alpha", "-temp", "--temperature", "-r", "--reduction_factor",
                   "-d_device", "-c_continue", "--continue_training", "-disable_mirroring", "-rotate_folds",
                   "-rotate_freq", "-e", "--epochs", "--use_da5", "-tpl", "--teacher_plans"]
RESENC_FLAGS = ["-spl", "--student_plans", "-bs", "--block_strategy"]
EXTRA_FLAGS = ["--iterations", "--val-iterations", "--batch-size", "--save-every", "--step-size", "--cache-dtype",
               "-num_gpus", "--loss", "--kd-scales", "--class-balanced", "--soft-dice", "--cauchy-schwarz", "--threads",
               "--work", "--dry-run"]


def plans(name, resenc=False, data_identifier="nnUNetPlans_3d_fullres"):
    arch = "ResidualEncoderUNet" if resenc else "PlainConvUNet"
    kwargs = {"n_stages": 2, "features_per_stage": [32, 64]}
    if resenc:
        kwargs["n_blocks_per_stage"] = [1, 3]
    return {"dataset_name": DS, "plans_name": name, "transpose_forward": [0, 1, 2],
            "configurations": {"3d_fullres": {
                "data_identifier": data_identifier, "spacing": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
                "architecture": {"network_class_name": f"dynamic_network_architectures.architectures.unet.{arch}",
                                 "arch_kwargs": kwargs, "_kw_requires_import": []}}}}


def write_json(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def add_teachers(root, plans_name, resenc=False, ckpts=None):
    """A teacher model folder: fold_0, fold_1 with checkpoint_final.pth, fold_2 with only checkpoint_latest.pth."""
    folder = root / "nnUNet_results" / DS / f"nnUNetTrainer__{plans_name}__3d_fullres"
    write_json(folder / "plans.json", plans(plans_name, resenc))
    write_json(folder / "dataset.json", DATASET_JSON)
    ckpts = ckpts or {0: "checkpoint_final.pth", 1: "checkpoint_final.pth", 2: "checkpoint_latest.pth"}
    for fold, ckpt in ckpts.items():
        (folder / f"fold_{fold}").mkdir()
        (folder / f"fold_{fold}" / ckpt).write_bytes(f"weights {fold}".encode())
    write_json(root / "nnUNet_preprocessed" / DS / f"{plans_name}.json", plans(plans_name, resenc))
    return folder


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """nnU-Net folders with a raw dataset, its preprocessed folder and teachers (plain and ResEnc L); cwd = tmp_path."""
    raw = tmp_path / "nnUNet_raw" / DS
    for case in CASES:
        for sub, name in (("imagesTr", f"{case}_0000.nii.gz"), ("labelsTr", f"{case}.nii.gz")):
            (raw / sub).mkdir(parents=True, exist_ok=True)
            (raw / sub / name).write_bytes(b"")
    write_json(raw / "dataset.json", DATASET_JSON)
    write_json(tmp_path / "nnUNet_preprocessed" / DS / "dataset.json", DATASET_JSON)
    (tmp_path / "nnUNet_preprocessed" / DS / "nnUNetPlans_3d_fullres").mkdir()
    add_teachers(tmp_path, "nnUNetPlans")
    add_teachers(tmp_path, "nnUNetResEncUNetLPlans", resenc=True)
    monkeypatch.chdir(tmp_path)
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.setenv(key, str(tmp_path / key))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return tmp_path


def resolve(*argv, resenc=False, environ=None):
    args = rc.build_parser(resenc).parse_args(["-d", "900", *argv])
    return rc.resolve(args, os.environ if environ is None else environ)


def main(capsys, *argv, resenc=False):
    try:
        code = (rc.resenc_distillation_train if resenc else rc.distillation_train)(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# -- defaults and the flag mapping ---------------------------------------------------------------
def test_defaults_equal_the_reference_but_the_kd_loss_is_fastkds(fake):
    plan = resolve("-d_device", "cpu")
    cfg, s = plan.config, plan.settings
    assert (plan.configuration, plan.fold, plan.r) == ("3d_fullres", 0, 2)
    assert (s["schedule"]["epochs"], s["schedule"]["rotate_every"]) == (1000, 0)
    # FastnnUNet's -a 0.3 -temp 3 (convex) trailed the no-KD baseline; fastkd's schema defaults instead
    assert (s["alpha"], s["temperature"], s["loss"], s["scales"], s["class_balanced"]) == (1.0, 1.0, "additive", "full", True)
    assert cfg["teachers"]["folds"] == [0, 1]  # auto-detected: fold_2 has no checkpoint_final.pth
    assert cfg["teachers"]["checkpoint"] == "checkpoint_final.pth"
    assert plan.teacher_folder.name == "nnUNetTrainer__nnUNetPlans__3d_fullres"
    assert cfg["softlabels"]["mirroring"] and s["validation_mirroring"]
    assert (plan.resume, plan.trainer, plan.num_gpus) == (False, "nnUNetTrainerFastKD", 1)
    # fastkd extras: nnU-Net's schedule, fastkd's cache defaults
    schedule = tuple(s["schedule"][k] for k in ("iterations_per_epoch", "val_iterations_per_epoch", "batch_size",
                                                  "save_every"))
    assert schedule == (250, 50, None, 5)
    assert (cfg["softlabels"]["step_size"], cfg["softlabels"]["dtype"]) == (0.5, "uint8")
    assert plan.student_plans_name == "nnUNetPlans_fastkdR2"
    assert str(plan.student_plans_file) == f"nnUNet_preprocessed/{DS}/nnUNetPlans_fastkdR2.json"
    assert str(plan.model_folder) == f"nnUNet_results/{DS}/nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres/fold_0"
    assert str(plan.cache).startswith(f"fastkd_work/{DS}/softlabels/3d_fullres__T1__mirror__step0.5__uint8__")
    assert s["cache"] == str(plan.cache.resolve())


def test_resenc_defaults_equal_the_reference(fake):
    plan = resolve("-d_device", "cpu", resenc=True)
    assert plan.teacher_folder.name == "nnUNetTrainer__nnUNetResEncUNetLPlans__3d_fullres"
    # -spl nnUNetPlans, the reference's default: a plain U-Net student derived from those plans
    assert plan.config["student"]["plans"] == "nnUNetPlans" and plan.student_plans_name == "nnUNetPlans_fastkdR2"
    assert plan.settings["schedule"]["rotate_every"] == 0
    assert resolve("-d_device", "cpu", "-rotate_folds", resenc=True).settings["schedule"]["rotate_every"] == 5
    assert resolve("-d_device", "cpu", "-rotate_folds").settings["schedule"]["rotate_every"] == 400


def test_resenc_default_with_only_resenc_plans_preprocessed(fake):
    """Without nnUNetPlans the default -spl falls back to the teacher plans: a ResEnc student."""
    (fake / "nnUNet_preprocessed" / DS / "nnUNetPlans.json").unlink()
    plan = resolve("-d_device", "cpu", resenc=True)
    assert plan.config["student"]["plans"] is None
    assert plan.block_strategy == "keep" and plan.student_plans_name == "nnUNetResEncUNetLPlans_fastkdR2keep"


def test_student_plans_flag_selects_the_base_plans(fake):
    """-tpl L -spl M -r 2: the student is derived from the M plans (their network, /2), not from L."""
    write_json(fake / "nnUNet_preprocessed" / DS / "nnUNetResEncUNetMPlans.json",
               plans("nnUNetResEncUNetMPlans", resenc=True))
    plan = resolve("-d_device", "cpu", "-tpl", "nnUNetResEncUNetLPlans", "-spl", "nnUNetResEncUNetMPlans", "-r", "2",
                   resenc=True)
    assert plan.teacher_folder.name == "nnUNetTrainer__nnUNetResEncUNetLPlans__3d_fullres"
    assert plan.student_plans_name == "nnUNetResEncUNetMPlans_fastkdR2keep"
    assert plan.paths.student_base_plans_file.name == "nnUNetResEncUNetMPlans.json"
    assert plan.paths.plans_file.name == "nnUNetResEncUNetLPlans.json"  # the preprocessed grid is the teachers"


def _get(plan, key):
    node = plan
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


@pytest.mark.parametrize("argv, expected", [
    (["-a", "0.5"], {"settings.alpha": 0.5, "config.distillation.alpha": 0.5}),
    (["-temp", "2"], {"settings.temperature": 2.0, "cache": lambda p: "__T2__" in p.name}),
    (["-r", "4"], {"student_plans_name": "nnUNetPlans_fastkdR4", "config.distillation.reduction_factors": [4]}),
    (["-e", "7"], {"settings.schedule.epochs": 7}),
    (["-f", "all"], {"fold": "all", "model_folder": lambda p: p.name == "fold_all"}),
    (["-f", "3"], {"fold": 3, "model_folder": lambda p: p.name == "fold_3"}),
    (["-tf", "1"], {"config.teachers.folds": [1]}),
    (["-tcp", "checkpoint_latest.pth"], {"config.teachers.folds": [2],
                                         "config.teachers.checkpoint": "checkpoint_latest.pth"}),
    (["-disable_mirroring"], {"config.softlabels.mirroring": False, "settings.validation_mirroring": False,
                              "cache": lambda p: "__nomirror__" in p.name}),
    (["-rotate_folds", "-rotate_freq", "10"], {"settings.schedule.rotate_every": 10}),
    (["--use_da5"], {"trainer": "nnUNetTrainerFastKD_DA5", "config.student.augmentation": "da5",
                     "model_folder": lambda p: p.parent.name.startswith("nnUNetTrainerFastKD_DA5__")}),
    (["-c_continue"], {"resume": True}),
    (["-a", "0"], {"cache": None, "settings.cache": None, "trainer": "nnUNetTrainerFastKDNoKD"}),
    (["-d_device", "cuda:1"], {"device": "cuda", "environ": {"CUDA_VISIBLE_DEVICES": "1"}}),
    (["-d_device", "mps"], {"device": "mps", "environ": {}}),
    (["-d_device", "cuda", "-num_gpus", "2"], {"num_gpus": 2, "config.student.num_gpus": 2}),
    (["--iterations", "3", "--val-iterations", "2", "--batch-size", "4", "--save-every", "2", "--soft-dice", "0.1",
      "--cauchy-schwarz", "0.2", "--threads", "1"],
     {"settings.schedule.iterations_per_epoch": 3, "settings.schedule.val_iterations_per_epoch": 2,
      "settings.schedule.batch_size": 4, "settings.schedule.save_every": 2, "settings.soft_dice": 0.1,
      "settings.cauchy_schwarz": 0.2, "config.resources.train_student.threads": 1}),
    (["--loss", "convex", "--kd-scales", "all", "--class-balanced", "false", "-a", "0.3", "-temp", "3"],
     {"settings.loss": "convex", "settings.scales": "all", "settings.class_balanced": False, "settings.alpha": 0.3,
      "trainer": "nnUNetTrainerFastKD_T3_a0.3_convex_dsall_nocb"}),
    (["--step-size", "0.25", "--cache-dtype", "float16", "--work", "elsewhere"],
     {"cache": lambda p: str(p).startswith(f"elsewhere/{DS}/softlabels/") and "__step0.25__float16__" in p.name}),
])
def test_flag_maps_to_setting(fake, argv, expected):
    plan = resolve(*(["-d_device", "cpu"] if "-d_device" not in argv else []), *argv)
    for key, value in expected.items():
        got = _get(plan, key)
        assert value(got) if callable(value) else got == value, (key, got)


@pytest.mark.parametrize("argv, expected", [
    (["-bs", "adaptive", "-spl", "nnUNetResEncUNetLPlans"], "nnUNetResEncUNetLPlans_fastkdR2adaptive"),
    (["-bs", "reduce", "-r", "4", "-spl", "nnUNetResEncUNetLPlans"], "nnUNetResEncUNetLPlans_fastkdR4reduce"),
    (["-tpl", "nnUNetPlans"], "nnUNetPlans_fastkdR2"),
    (["-spl", "nnUNetResEncUNetLPlans"], "nnUNetResEncUNetLPlans_fastkdR2keep"),
])
def test_resenc_flags(fake, argv, expected):
    plan = resolve("-d_device", "cpu", *argv, resenc=True)
    assert plan.student_plans_name == expected
    assert plan.config["student"]["block_strategy"] == (argv[1] if argv[0] == "-bs" else "keep")


def test_teacher_folder_flag_and_paths_outside_cwd(fake, tmp_path_factory):
    import shutil

    elsewhere = tmp_path_factory.mktemp("teachers") / "nnUNetTrainer__nnUNetPlans__3d_fullres"
    shutil.copytree(fake / "nnUNet_results" / DS / elsewhere.name, elsewhere)
    plan = resolve("-d_device", "cpu", "-t", str(elsewhere))
    assert plan.config["teachers"]["model_folder"] == str(elsewhere)  # outside cwd: absolute
    assert plan.config["paths"]["nnunet_results"] == "nnUNet_results"  # inside cwd: relative, as a workflow config
    with pytest.raises(rc.FastkdError, match="trained with the plans nnUNetPlans"):
        resolve("-d_device", "cpu", "-t", str(elsewhere), "-tpl", "nnUNetResEncUNetLPlans")


def test_same_cache_path_as_the_workflow(fake):
    """The default workflow config (relative paths, teachers trained in the workflow) names the same store."""
    workflow = validate_config({"teachers": {"folds": [0, 1]}}, check_files=False)
    plan = resolve("-d_device", "cpu")
    assert plan.cache == Paths(workflow).softlabel_cache()
    assert plan.paths.teacher_manifest == Paths(workflow).teacher_manifest
    assert plan.paths.preprocess_manifest("3d_fullres") == Paths(workflow).preprocess_manifest("3d_fullres")
    assert plan.student_plans_file == Paths(workflow).student_plans_file(2)


@pytest.mark.parametrize("visible, requested, expected", [
    (None, "cuda:0", "0"), ("2,3", "cuda:1", "3"), ("GPU-abc,GPU-def", "cuda:0", "GPU-abc")])
def test_cuda_n_selects_that_gpu(fake, visible, requested, expected):
    environ = {**os.environ, **({"CUDA_VISIBLE_DEVICES": visible} if visible else {})}
    plan = resolve("-d_device", requested, environ=environ)
    assert plan.device == "cuda" and plan.environ == {"CUDA_VISIBLE_DEVICES": expected}


# -- cache reuse ---------------------------------------------------------------------------------
def _store(path, plan):
    prov = {"format_version": FORMAT_VERSION, "temperature": 3.0, "activation": "softmax",
            "channels": ["background", "blob"], "labels": DATASET_JSON["labels"], "configuration": "3d_fullres",
            "data_identifier": "nnUNetPlans_3d_fullres", "patch_size": [16, 16, 16], "dtype": "uint8",
            "scale": 1 / 255, "step_size": 0.5, "mirroring": True}
    write_case(path, "demo_000", np.full((2, 2, 2, 2), 0.5, np.float32), prov)
    finalize(path, {"demo_000": [2, 2, 2]})


def test_a_complete_store_of_the_same_settings_is_reused(fake):
    """The store's name carries the teachers and settings; the workflow reuses it when it is complete."""
    plan = resolve("-d_device", "cpu")
    assert rc.cache_state(plan).startswith(f"build {plan.cache} (5 cases x 2 teacher fold(s)")
    plan.cache.mkdir(parents=True)  # an unfinished store (no root): built again
    assert rc.cache_state(plan).startswith("build ")
    plan.cache.rmdir()
    _store(plan.cache, plan)
    assert rc.cache_state(plan).startswith(f"reuse {plan.cache} (complete")
    assert rc.cache_state(resolve("-d_device", "cpu", "-temp", "2")).startswith("build ")
    assert rc.cache_state(resolve("-d_device", "cpu", "-a", "0")).startswith("none: alpha = 0")


# -- errors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, code, message", [
    (["-a", "-0.5"], 2, "argument -a/--alpha: distillation.alpha = -0.5 (float): must be >= 0"),
    (["-a", "1.5", "--loss", "convex"], 1, "-a/--alpha (distillation.alpha) = 1.5 with distillation.loss 'convex'"),
    (["--loss", "mixed"], 2, "argument --loss: distillation.loss = 'mixed' (str): must be one of"),
    (["-temp", "0"], 2, "argument -temp/--temperature: distillation.temperature = 0 (int): must be > 0"),
    (["-r", "0"], 2, "argument -r/--reduction_factor: distillation.reduction_factors[] = 0 (int): must be >= 1"),
    (["-e", "0"], 2, "argument -e/--epochs: student.schedule.epochs = 0 (int): must be >= 1"),
    (["-a", "x"], 2, "argument -a/--alpha: distillation.alpha = 'x' (str): must be a number >= 0"),
    (["-tf", "7"], 2, "argument -tf/--teacher_folds: teachers.folds[] = 7 (int): must be <= 4"),
    (["-f", "5"], 2, "a fold is 0-4 or 'all'"),
    (["-c", "3d_cascade"], 2, "argument -c: invalid choice"),
    (["-d_device", "gpu"], 1, "-d_device 'gpu': must be cpu, cuda, cuda:N (e.g. cuda:1) or mps"),
    (["-rotate_freq", "10"], 1, "-rotate_freq 10 only applies with -rotate_folds"),
    (["-rotate_folds", "-rotate_freq", "0"], 2, "argument -rotate_freq: '0': must be an integer >= 1"),
    (["-rotate_folds", "-f", "all"], 1, "with -f all every case trains already"),
    (["-tf", "2"], 1, "is missing fold_2/checkpoint_final.pth (found: fold_0: checkpoint_final.pth; "
                      "fold_1: checkpoint_final.pth; fold_2: checkpoint_latest.pth)"),
    (["-tcp", "checkpoint_best.pth"], 1, "/nnUNetTrainer__nnUNetPlans__3d_fullres holds checkpoint_best.pth "
                                         "(found: fold_0: checkpoint_final.pth; fold_1: checkpoint_final.pth; "
                                         "fold_2: checkpoint_latest.pth)"),
    (["-tpl", "nnUNetResEncUNetMPlans"], 1, "/Dataset900_FastkdDemo: nnUNetTrainer__nnUNetPlans__3d_fullres, "
                                            "nnUNetTrainer__nnUNetResEncUNetLPlans__3d_fullres (give the teachers' "
                                            "folder with -t"),
    (["-d", "901"], 1, "-d 901: no Dataset901_* folder in"),
    (["-d_device", "cuda:0", "-num_gpus", "2"], 1, "pick the GPUs with CUDA_VISIBLE_DEVICES"),
])
def test_bad_values_exit_with_a_clear_message(fake, capsys, argv, code, message):
    got, out, err = main(capsys, "-d", "900", "-d_device", "cpu", *argv)
    assert got == code
    assert message in err, err
    assert "Traceback" not in err
    if code == 1:
        assert err.startswith("nnUNetv2_distillation_train: error: ")


@pytest.mark.parametrize("argv, message", [
    (["-bs", "sideways"], "argument -bs/--block_strategy: invalid choice: 'sideways'"),
    (["-tpl", "nnUNetPlans", "-bs", "reduce"], "-bs reduce: block strategies apply to ResEnc teachers"),
    (["-spl", "nnUNetResEncUNetMPlans"], "-spl/--student_plans (student.plans) = 'nnUNetResEncUNetMPlans': no plans"),
])
def test_bad_resenc_values(fake, capsys, argv, message):
    code, _, err = main(capsys, "-d", "900", "-d_device", "cpu", *argv, resenc=True)
    assert code in (1, 2) and message in err, err


def test_student_data_plans_must_share_the_teachers_data(fake, capsys):
    write_json(fake / "nnUNet_preprocessed" / DS / "OtherPlans.json",
               plans("OtherPlans", data_identifier="OtherPlans_3d_fullres"))
    code, _, err = main(capsys, "-d", "900", "-d_device", "cpu", "-spl", "OtherPlans", resenc=True)
    assert code == 1
    assert "its 3d_fullres data is 'OtherPlans_3d_fullres', the teachers' is 'nnUNetPlans_3d_fullres'" in err


def test_missing_env_vars_are_named(fake, capsys, monkeypatch):
    monkeypatch.delenv("nnUNet_results")
    monkeypatch.delenv("nnUNet_raw")
    code, _, err = main(capsys, "-d", "900")
    assert code == 1 and "nnUNet_raw, nnUNet_results are not set" in err


def test_not_preprocessed_points_to_plan_and_preprocess(fake, capsys):
    (fake / "nnUNet_preprocessed" / DS / "nnUNetPlans_3d_fullres").rmdir()
    code, _, err = main(capsys, "-d", "900", "-d_device", "cpu")
    assert code == 1 and "is not preprocessed with the teacher plans nnUNetPlans" in err
    assert "nnUNetv2_plan_and_preprocess -d 900 -c 3d_fullres`" in err
    (fake / "nnUNet_preprocessed" / DS / "nnUNetResEncUNetLPlans.json").unlink()
    code, _, err = main(capsys, "-d", "Dataset900_FastkdDemo", "-d_device", "cpu", resenc=True)
    assert code == 1 and "nnUNetv2_plan_and_preprocess -d 900 -c 3d_fullres -pl nnUNetPlannerResEncL`" in err


# -- help and dry run ----------------------------------------------------------------------------
@pytest.mark.parametrize("command, flags", [
    ("nnUNetv2_distillation_train", REFERENCE_FLAGS + EXTRA_FLAGS),
    ("nnUNetv2_resenc_distillation_train", REFERENCE_FLAGS + RESENC_FLAGS + EXTRA_FLAGS)])
def test_help_of_the_console_scripts_lists_every_flag(command, flags):
    run = subprocess.run([str(BIN / command), "--help"], capture_output=True, text=True, check=True, timeout=600)
    words = set(run.stdout.replace(",", " ").split())
    assert not [f for f in flags if f not in words]
    assert "fastkd extras (not in FastnnUNet)" in run.stdout


def test_dry_run_prints_the_plan_and_writes_nothing(fake, capsys):
    before = sorted(p for p in fake.rglob("*"))
    code, out, err = main(capsys, "-d", "900", "-d_device", "cuda:1", "-temp", "2", "--dry-run")
    assert code == 0, err
    assert sorted(p for p in fake.rglob("*")) == before
    for text in ("dry run", f"build fastkd_work/{DS}/softlabels/3d_fullres__T2__mirror__",
                 "5 cases x 2 teacher fold(s)",
                 f"nnUNetPlans_fastkdR2 -> nnUNet_preprocessed/{DS}/nnUNetPlans_fastkdR2.json",
                 f"nnUNet_results/{DS}/nnUNetTrainerFastKD_T2__nnUNetPlans_fastkdR2__3d_fullres/fold_0 (new)",
                 "nnUNetTrainerFastKD_T2, alpha = 1, T = 2, 1000 epochs x 250 iterations",
                 "cuda:1 (CUDA_VISIBLE_DEVICES=1)", '"temperature": 2.0', "fastkd config", "reduction_factors:"):
        assert text in out, text
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def test_plan_says_whether_the_student_continues(fake):
    from fastkd.student.run import fold_state

    def state(plan):
        return fold_state(plan.model_folder, plan.settings, plan.resume)

    plan = resolve("-d_device", "cpu", "-c_continue")
    assert state(plan) == "new"
    plan.model_folder.mkdir(parents=True)
    (plan.model_folder / "checkpoint_latest.pth").write_bytes(b"")
    assert state(plan).startswith("start over: its checkpoints were trained with other")
    (plan.model_folder / "fastkd_student.json").write_text(json.dumps(plan.settings))
    assert state(plan) == "continue from checkpoint_latest.pth"
    assert f"{plan.model_folder} (continue from checkpoint_latest.pth)" in rc.describe(plan)
    again = resolve("-d_device", "cpu")
    assert state(again) == \
        "start over: without resuming, checkpoint_latest.pth move to previous_run/ once training starts"
