"""What reruns after a change, through the real ``snakemake``: dry-run reasons, then real runs.

Each test changes its own copy of the session's ``finished`` fixture (tests/conftest.py: the demo to the
end of the workflow, students for fold 1, ONNX exports, evaluation), so their order does not matter: a new
temperature, forced rules, a second reduction factor, a replaced teacher checkpoint (run killed with
SIGKILL while it rewrites the soft labels, then resumed), a case deleted from the soft-label store. The
dry runs show the whole DAG, evaluation included; the real runs stop before the evaluation
(:data:`BUILT`), whose predictions are the slowest jobs here, and each test ends with nothing to do up to
the exports.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from workflow_runs import BIN, clone, env, nnunet_env, sha256, snakemake

DS = "Dataset900_FastkdDemo"
TEACHERS = "nnUNetTrainer__nnUNetPlans__3d_fullres"
KD = "nnUNetTrainerFastKD__nnUNetPlans_fastkdR2__3d_fullres"
# the distilled student at T = 2: a setting off its default is in the model folder's name, so the T = 1
# student stays as it was
KD_T2 = "nnUNetTrainerFastKD_T2__nnUNetPlans_fastkdR2__3d_fullres"
NOKD = "nnUNetTrainerFastKDNoKD__nnUNetPlans_fastkdR2__3d_fullres"
#: the student fold of the session's fixtures
FOLD = 1
#: jobs before the soft labels: a change of the distillation settings must not rerun them
UPSTREAM = {"demo_data", "plan_preprocess", "train_teacher", "teacher_manifest"}
#: the targets of the real runs after the fixture's: everything but the evaluation
BUILT = ("softlabels", "student", "export")


def jobs(run: subprocess.CompletedProcess) -> list[dict]:
    """The jobs a run printed (dry run: stdout; real run: stderr), each ``{"rule", "reason", "output", ...}``."""
    text = run.stdout + run.stderr
    found = []
    for block in re.split(r"^\[\w{3} \w{3} [ \d]\d [\d:]+ \d{4}\]$", text, flags=re.M)[1:]:
        head = re.match(r"\s*(?:local)?rule (\w+):\n", block)
        if head:
            found.append({"rule": head.group(1), **dict(re.findall(r"^    (\w+): (.*)$", block, re.M))})
    return found


def rules(run) -> Counter:
    return Counter(j["rule"] for j in jobs(run) if j["rule"] != "all")


def reason(run, rule: str, output: str = "") -> str:
    """The reason of the one job of ``rule`` whose output names ``output``."""
    [job] = [j for j in jobs(run) if j["rule"] == rule and output in j.get("output", "")]
    return job["reason"]


def configure(wd: Path, **blocks) -> None:
    """Merge config blocks into the copy's test.yaml (one level deep, as the tests need)."""
    config = yaml.safe_load((wd / "test.yaml").read_text())
    for key, value in blocks.items():
        config.setdefault(key, {}).update(value)
    (wd / "test.yaml").write_text(yaml.safe_dump(config))


def store(wd: Path, temperature: int) -> Path:
    [path] = (wd / "fastkd_work" / DS / "softlabels").glob(f"3d_fullres__T{temperature}__*.zarr")
    return path


def shard_summaries(path: Path) -> list[dict]:
    return [json.loads(m.read_text()) for m in sorted(path.with_suffix(".shards").glob("shard-*.json"))]


def case_teacher_sha(path: Path, case: str) -> str:
    attrs = json.loads((path / case / "zarr.json").read_text())["attributes"]["fastkd_softlabels"]
    return attrs["provenance"]["teachers"][0]["sha256"]["0"]


def cases_of(path: Path, sha: str) -> list[str]:
    """Cases of the store written from the teacher checkpoint ``sha`` (a case may be mid-rename: skipped)."""
    found = []
    for case in path.glob("demo_*"):
        try:
            if case_teacher_sha(path, case.name) == sha:
                found.append(case.name)
        except (OSError, ValueError, KeyError):
            pass
    return found


def verify(wd: Path, path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "fastkd"), "cache", "verify", str(path)], env=nnunet_env(wd),
                          capture_output=True, text=True, timeout=300)


def stamps(wd: Path) -> dict[Path, int]:
    """Modification times of what the teachers, the baseline and the preprocessing wrote."""
    files = [wd / "nnUNet_results" / DS / TEACHERS / "fold_0" / "checkpoint_final.pth",
             wd / "fastkd_work" / DS / "preprocess" / "nnUNetPlans__3d_fullres.json",
             wd / "nnUNet_results" / DS / NOKD / f"fold_{FOLD}" / "validation" / "summary.json",
             *sorted((wd / "nnUNet_preprocessed" / DS / "nnUNetPlans_3d_fullres").glob("*.b2nd"))]
    return {f: f.stat().st_mtime_ns for f in files}


def student_folder(wd: Path, model: str = KD) -> Path:
    return wd / "nnUNet_results" / DS / model / f"fold_{FOLD}"


def nothing_to_do(wd: Path, *targets) -> bool:
    return "Nothing to be done" in snakemake(wd, "-n", "--cores", "2", *targets).stdout


@pytest.fixture
def wf(finished, tmp_path):
    """A copy of the session's ``finished`` workflow (students of fold 1, KD and baseline, exports, evaluation)
    for one test to change."""
    wd = clone(finished, tmp_path)
    assert nothing_to_do(wd)
    return wd


@pytest.mark.ci
def test_new_temperature_reruns_soft_labels_and_what_follows_only(wf):
    before = stamps(wf)
    old = store(wf, 1)
    old_root = (old / "zarr.json").read_bytes()
    configure(wf, distillation={"temperature": 2.0})
    dry = snakemake(wf, "-n", "--cores", "2")
    ran = rules(dry)
    assert {r: ran[r] for r in ("softlabels_shard", "softlabels_finalize", "softlabels_preview", "train_student",
                                "export_onnx", "predict_student", "evaluate", "student_report")} == {
        "softlabels_shard": 2, "softlabels_finalize": 1, "softlabels_preview": 1, "train_student": 1,
        "export_onnx": 1, "predict_student": 1, "evaluate": 1, "student_report": 1}
    assert not ran.keys() & (UPSTREAM | {"train_baseline", "predict_teachers", "student_plans", "student_info"})
    shard = reason(dry, "softlabels_shard", "shard-1-of-2")
    assert shard.startswith("Missing output files: ") and "3d_fullres__T2__" in shard  # T is in the store's name
    # a new student (its own folder, T in the name), while the T = 1 student stays where it is
    assert reason(dry, "train_student").startswith("Missing output files: ") and KD_T2 in reason(dry, "train_student")
    assert KD_T2 in reason(dry, "export_onnx") and KD_T2 in reason(dry, "predict_student")  # not NOKD's
    kd_t1 = (student_folder(wf, KD) / "validation" / "summary.json").stat().st_mtime_ns

    run = snakemake(wf, "--cores", "2", *BUILT)
    assert rules(run) == {"softlabels_shard": 2, "softlabels_finalize": 1, "softlabels_preview": 1, "train_student": 1,
                          "export_onnx": 1, "student_report": 1, "softlabels": 1, "student": 1, "export": 1}
    assert stamps(wf) == before  # no teacher, preprocessing or baseline file was rewritten
    assert (old / "zarr.json").read_bytes() == old_root  # the T = 1 store is kept as it was
    new = store(wf, 2)
    assert verify(wf, new).returncode == 0
    settings = json.loads((student_folder(wf, KD_T2) / "fastkd_student.json").read_text())
    assert settings["temperature"] == 2.0 and settings["cache"] == str(new.resolve())
    log = (wf / "fastkd_work" / "logs" / "train_student" / f"{DS}__{KD_T2}_fold_{FOLD}.log").read_text()
    assert "Epoch 0" in log and "resuming" not in log  # other settings: trained from scratch, never continued
    assert (student_folder(wf, KD) / "validation" / "summary.json").stat().st_mtime_ns == kd_t1
    assert nothing_to_do(wf, *BUILT)
    # back to T = 1: its student and store are still there, only the r = 2 report (its list of students) would rerun
    configure(wf, distillation={"temperature": 1.0})
    assert set(rules(snakemake(wf, "-n", "--cores", "2", *BUILT))) <= {"student_report", "student"}
    configure(wf, distillation={"temperature": 2.0})
    assert nothing_to_do(wf, *BUILT)


@pytest.mark.ci
def test_forcerun_reruns_the_rule_and_what_follows(wf):
    # -R train_student: the distilled students and what follows them, not the baselines
    dry = snakemake(wf, "-n", "--cores", "2", *BUILT, "-R", "train_student")
    assert rules(dry) == {"train_student": 1, "export_onnx": 1, "student_report": 1, "student": 1, "export": 1}
    assert reason(dry, "train_student") == "Forced execution"
    assert KD in reason(dry, "export_onnx")
    # --forcerun (the same option) with a target before it: the soft-label jobs, up to that target
    dry = snakemake(wf, "-n", "--cores", "2", "softlabels", "--forcerun", "softlabels_shard")
    assert rules(dry) == {"softlabels_shard": 2, "softlabels_finalize": 1, "softlabels_preview": 1, "softlabels": 1}
    assert reason(dry, "softlabels_shard", "shard-1-of-2") == "Forced execution"
    # -R takes every word after it: a target written after it is forced too, and the default target runs
    dry = snakemake(wf, "-n", "--cores", "2", "-R", "softlabels_shard", "softlabels")
    assert {"train_student", "export_onnx", "evaluate"} <= rules(dry).keys()
    # -R of the first rule: everything after it
    ran = rules(snakemake(wf, "-n", "--cores", "2", "-R", "plan_preprocess"))
    assert {"plan_preprocess", "train_teacher", "teacher_manifest", "softlabels_shard", "train_student",
            "train_baseline", "export_onnx", "predict_teachers", "evaluate"} <= ran.keys()
    assert "demo_data" not in ran


@pytest.mark.ci
def test_new_reduction_factor_adds_its_students_only(wf):
    before = stamps(wf)
    r2 = {m: (student_folder(wf, m) / "validation" / "summary.json").stat().st_mtime_ns for m in (KD, NOKD)}
    configure(wf, distillation={"reduction_factors": [2, 4]})
    dry = snakemake(wf, "-n", "--cores", "2", *BUILT)
    assert rules(dry) == {"student_plans": 1, "student_info": 1, "train_student": 1, "train_baseline": 1,
                          "export_onnx": 2, "student_report": 1, "student": 1, "export": 1}
    for job in jobs(dry):
        if job["rule"] in ("student_plans", "student_info", "train_student", "train_baseline", "student_report"):
            assert job["wildcards"].startswith("r=4") or "fastkdR4" in job["wildcards"], job
            assert job["reason"].startswith("Missing output files: "), job
        if job["rule"] == "export_onnx":
            assert "fastkdR4" in job["output"] and "fastkdR2" not in job["output"], job

    run = snakemake(wf, "--cores", "2", "export")  # the r = 4 students and their exports, for real
    assert rules(run) == {"student_plans": 1, "train_student": 1, "train_baseline": 1, "export_onnx": 2, "export": 1}
    assert {m: (student_folder(wf, m) / "validation" / "summary.json").stat().st_mtime_ns for m in (KD, NOKD)} == r2
    assert stamps(wf) == before
    r4 = wf / "fastkd_work" / DS / "export" / "nnUNetTrainerFastKD__nnUNetPlans_fastkdR4__3d_fullres"
    assert (r4 / f"fold_{FOLD}.onnx").is_file()
    # back to r = 2 alone: the r = 2 results are what they were, nothing to do
    configure(wf, distillation={"reduction_factors": [2]})
    assert nothing_to_do(wf, *BUILT)


@pytest.mark.ci
def test_replaced_teacher_checkpoint_reruns_soft_labels_and_a_killed_run_resumes(wf):
    """A teacher fold replaced by a copy that kept an older modification time (``cp -p``, ``rsync -a``); the
    run that rewrites the soft labels is killed (controller and jobs, SIGKILL) and resumed."""
    import torch

    checkpoint = wf / "nnUNet_results" / DS / TEACHERS / "fold_0" / "checkpoint_final.pth"
    old_sha, old_time = sha256(checkpoint), checkpoint.stat().st_mtime_ns
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    for weights in state["network_weights"].values():
        weights.mul_(1.01)
    torch.save(state, checkpoint)
    os.utime(checkpoint, ns=(old_time - 60 * 10**9, old_time - 60 * 10**9))  # older than everything after it
    new_sha = sha256(checkpoint)
    baseline = (student_folder(wf, NOKD) / "validation" / "summary.json").stat().st_mtime_ns
    aside = set(student_folder(wf).glob("previous_settings*"))

    # Snakemake's modification-time trigger alone does not see it ...
    assert nothing_to_do(wf, *BUILT, "--rerun-triggers", "mtime")
    # ... the manifest's checkpoint stamps (size, mtime) do, and everything that read the teachers follows
    dry = snakemake(wf, "-n", "--cores", "2")
    ran = rules(dry)
    assert reason(dry, "teacher_manifest").startswith("Params have changed since last execution")
    assert {r: ran[r] for r in ("teacher_manifest", "softlabels_shard", "softlabels_finalize", "train_student",
                                "predict_teachers", "evaluate")} == {
        "teacher_manifest": 1, "softlabels_shard": 2, "softlabels_finalize": 1, "train_student": 1,
        "predict_teachers": 1, "evaluate": 1}
    assert f"teachers/{TEACHERS}.json" in reason(dry, "predict_teachers")
    assert not ran.keys() & {"demo_data", "plan_preprocess", "train_teacher", "train_baseline"}

    path = store(wf, 1)
    command = [str(BIN / "snakemake"), "--configfile", "test.yaml", "--cores", "2", *BUILT]
    controller = subprocess.Popen(command, cwd=wf, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
    deadline = time.time() + 600
    rewritten = []
    while not rewritten:  # kill once the first case holds the new teacher's soft labels
        assert controller.poll() is None and time.time() < deadline, "the run ended or stalled"
        time.sleep(0.05)
        rewritten = cases_of(path, new_sha)
    os.killpg(controller.pid, signal.SIGKILL)
    controller.wait()
    assert not (path / "zarr.json").exists()  # the store's root is gone while cases are rewritten
    assert verify(wf, path).returncode == 1
    locked = snakemake(wf, "--cores", "2", *BUILT, check=False)
    assert locked.returncode != 0 and "LockException" in locked.stdout + locked.stderr

    snakemake(wf, "--unlock")
    run = snakemake(wf, "--cores", "2", *BUILT, "--rerun-incomplete")
    assert {"softlabels_shard", "softlabels_finalize", "train_student"} <= rules(run).keys()
    summaries = shard_summaries(path)
    skipped = sorted(c for s in summaries for c in s["skipped"])
    computed = sorted(c for s in summaries for c in s["computed"])
    assert set(rewritten) <= set(skipped) and computed
    assert sorted(skipped + computed) == [f"demo_{i:03d}" for i in range(5)]
    assert verify(wf, path).returncode == 0
    assert {case_teacher_sha(path, f"demo_{i:03d}") for i in range(5)} == {new_sha}
    settings = json.loads((student_folder(wf) / "fastkd_student.json").read_text())
    assert settings["teachers"] == {TEACHERS: {"0": new_sha}}
    [moved] = set(student_folder(wf).glob("previous_settings*")) - aside  # the student of the old soft labels
    assert json.loads((moved / "fastkd_student.json").read_text())["teachers"] == {TEACHERS: {"0": old_sha}}
    log = (wf / "fastkd_work" / "logs" / "train_student" / f"{DS}__{KD}_fold_{FOLD}.log").read_text()
    assert "Epoch 0" in log and "resuming" not in log  # retrained on the new soft labels, not continued
    assert (student_folder(wf, NOKD) / "validation" / "summary.json").stat().st_mtime_ns == baseline
    assert nothing_to_do(wf, *BUILT)


@pytest.mark.ci
def test_deleted_cache_case_is_rebuilt_when_its_jobs_are_forced(wf):
    import zarr

    path = store(wf, 1)
    case = "demo_003"
    kept = zarr.open_array(str(path / case), mode="r")[...]
    shutil.rmtree(path / case)
    check = verify(wf, path)
    assert check.returncode == 1 and f"{case}: listed in the root but missing" in check.stderr
    # Snakemake cannot see inside the store: its outputs (shard markers, the root) are all there
    assert nothing_to_do(wf, *BUILT)
    dry = snakemake(wf, "-n", "--cores", "2", "softlabels", "-R", "softlabels_shard")
    assert rules(dry) == {"softlabels_shard": 2, "softlabels_finalize": 1, "softlabels_preview": 1, "softlabels": 1}

    snakemake(wf, "--cores", "2", "softlabels", "-R", "softlabels_shard")
    summaries = shard_summaries(path)
    assert [c for s in summaries for c in s["computed"]] == [case]  # the cases in place are kept
    assert verify(wf, path).returncode == 0
    assert abs(zarr.open_array(str(path / case), mode="r")[...].astype(int) - kept).max() <= 1

    # the students follow the rewritten store; same teachers, same soft labels: only their validation reruns
    dry = snakemake(wf, "-n", "--cores", "2", *BUILT)
    assert rules(dry) == {"train_student": 1, "student_report": 1, "export_onnx": 1, "student": 1, "export": 1}
    assert reason(dry, "train_student").startswith("Updated input files: ")
    snakemake(wf, "--cores", "2", *BUILT)
    log = (wf / "fastkd_work" / "logs" / "train_student" / f"{DS}__{KD}_fold_{FOLD}.log").read_text()
    assert re.search(r"fastkd: resuming .* at epoch 2", log) and "Epoch 0" not in log


def set_unlabelled(wd: Path, n: int) -> None:
    """dataset.demo.n_unlabelled = ``n``, the rest of the demo's settings kept."""
    config = yaml.safe_load((wd / "test.yaml").read_text())
    config.setdefault("dataset", {}).setdefault("demo", {})["n_unlabelled"] = n
    (wd / "test.yaml").write_text(yaml.safe_dump(config))


@pytest.mark.ci
def test_added_unlabelled_images_rerun_their_soft_labels_and_the_kd_students_only(wf):
    before = stamps(wf)
    path = store(wf, 1)
    labelled_shards = {p: p.stat().st_mtime_ns for p in path.with_suffix(".shards").glob("shard-[0-9]*.json")}
    assert len(labelled_shards) == 2
    set_unlabelled(wf, 2)
    dry = snakemake(wf, "-n", "--cores", "2")
    ran = rules(dry)
    assert not ran.keys() & (UPSTREAM | {"train_baseline", "predict_teachers", "student_plans", "student_info"})
    assert {r: ran[r] for r in ("demo_unlabelled", "preprocess_unlabelled", "softlabels_shard", "softlabels_finalize",
                                "train_student")} == {"demo_unlabelled": 1, "preprocess_unlabelled": 1,
                                                      "softlabels_shard": 2, "softlabels_finalize": 1, "train_student": 1}
    shards = [j["output"] for j in jobs(dry) if j["rule"] == "softlabels_shard"]
    assert sorted(Path(s).name for s in shards) == ["shard-unlabelled-1-of-2.json", "shard-unlabelled-2-of-2.json"]

    snakemake(wf, "--cores", "2", "softlabels", "student")  # the KD student trains on both kinds
    assert stamps(wf) == before  # no teacher, preprocessing or baseline file was rewritten
    assert {p: p.stat().st_mtime_ns for p in labelled_shards} == labelled_shards  # the training cases' jobs
    assert verify(wf, path).returncode == 0
    root = json.loads((path / "zarr.json").read_text())["attributes"]["fastkd_softlabels"]
    assert root["unlabelled"] == ["demo_unl_000", "demo_unl_001"] and len(root["cases"]) == 7
    settings = json.loads((student_folder(wf) / "fastkd_student.json").read_text())
    assert settings["unlabelled_share"] == 0.5 and settings["unlabelled_cases"]["n"] == 2
    log = (wf / "fastkd_work" / "logs" / "train_student" / f"{DS}__{KD}_fold_{FOLD}.log").read_text()
    assert "unlabelled images: 2 (KD only)" in log and "Epoch 0" in log  # new training data: from scratch

    # one more image: the teachers run on it alone
    set_unlabelled(wf, 3)
    dry = snakemake(wf, "-n", "--cores", "2", "softlabels")
    assert rules(dry) == {"demo_unlabelled": 1, "preprocess_unlabelled": 1, "softlabels_shard": 2,
                          "softlabels_finalize": 1, "softlabels_preview": 1, "softlabels": 1}
    snakemake(wf, "--cores", "2", "softlabels")
    summaries = [json.loads(m.read_text()) for m in sorted(path.with_suffix(".shards").glob("shard-unlabelled-*.json"))]
    assert sorted(c for s in summaries for c in s["computed"]) == ["demo_unl_002"]
    assert sorted(c for s in summaries for c in s["skipped"]) == ["demo_unl_000", "demo_unl_001"]
    manifest = json.loads((wf / "fastkd_work" / DS / "preprocess" / "nnUNetPlans__3d_fullres__unlabelled.json")
                          .read_text())
    assert manifest["preprocessed_now"] == 1 and len(manifest["cases"]) == 3  # the others' arrays were kept
    assert {p: p.stat().st_mtime_ns for p in labelled_shards} == labelled_shards
    info = subprocess.run([str(BIN / "fastkd"), "cache", "info", str(path)], env=nnunet_env(wf), capture_output=True,
                          text=True, timeout=300)
    assert "(5 labelled, 3 unlabelled)" in info.stdout, info.stdout
