"""The test suite's own rules: tiers chosen by ``--tier``, the marker guard, time limits on every subprocess
a test starts, and the README's two test commands (default and CI), the second of which ``.ci/run`` runs."""

import ast
import shutil
import subprocess
import sys

import pytest

import workflow_runs
from workflow_runs import REPO, snakemake, workdir

TESTS = REPO / "tests"
#: subprocess functions that wait for their process: each call needs a timeout
WAITING = {"run", "check_output", "check_call", "call"}


def collected(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:randomly", *args],
                          cwd=cwd, capture_output=True, text=True, timeout=300)


def test_each_tier_collects_its_tests():
    ids = {}
    for tier in ("default", "ci", "extended", "all"):
        run = collected("tests/workflow/test_workflow.py", "--tier", tier)
        assert run.returncode == 0, run.stdout + run.stderr
        ids[tier] = {line.split("::")[1] for line in run.stdout.splitlines() if "::" in line}
    unit, smoke = "test_dry_run_dag_of_the_demo", "test_real_run_writes_nnunet_artifacts_and_manifests"
    ci, extended = "test_hippocampus_dag_takes_cases_from_dataset_json", \
        {"test_killed_teacher_resumes_from_its_latest_checkpoint", "test_teachers_trained_elsewhere_are_validated_and_reused"}
    assert {unit, smoke} <= ids["default"] and not ({ci} | extended) & ids["default"]
    assert {unit, smoke, ci} <= ids["ci"] and not extended & ids["ci"]
    assert ids["extended"] == extended
    assert ids["all"] == ids["ci"] | ids["extended"]


def test_a_test_using_a_workflow_fixture_without_a_tier_is_refused(tmp_path):
    for name in ("conftest.py", "workflow_runs.py"):
        shutil.copy(TESTS / name, tmp_path / name)
    (tmp_path / "test_unmarked.py").write_text("def test_reads_the_cache(trained):\n    pass\n")
    run = collected("--rootdir", str(tmp_path), str(tmp_path / "test_unmarked.py"), cwd=tmp_path)
    assert run.returncode != 0
    assert "tests that use a workflow fixture must be marked smoke, ci or extended: " \
           "test_unmarked.py::test_reads_the_cache" in run.stdout + run.stderr


def test_an_unmarked_test_cannot_run_snakemake_for_real(tmp_path):
    assert workflow_runs.CURRENT_TIER is None  # this test has no tier marker
    wd = workdir(tmp_path)
    with pytest.raises(AssertionError, match="runs jobs: mark the test smoke, ci or extended"):
        snakemake(wd, "--cores", "1", "preprocessed")
    assert not (wd / "nnUNet_raw").exists()
    assert "demo_data" in snakemake(wd, "-n", "--cores", "1", "preprocessed").stdout  # a dry run is fine


def subprocess_calls_without_timeout(source: str) -> list[str]:
    """Calls ``subprocess.run/check_output/...`` without ``timeout=``, and ``subprocess.Popen`` in a top-level
    function that neither waits with a timeout nor polls against a deadline (a helper that returns its
    Popen passes when every function calling it does)."""
    def bounded(text):
        return "deadline" in text or "timeout=" in text

    tree = ast.parse(source)
    tops = [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.ClassDef))]
    found = []
    for top in tops:
        for call in ast.walk(top):
            if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                    and isinstance(call.func.value, ast.Name) and call.func.value.id == "subprocess"):
                continue
            keywords = {k.arg for k in call.keywords}
            if call.func.attr in WAITING and "timeout" not in keywords and None not in keywords:
                found.append(f"line {call.lineno}: subprocess.{call.func.attr} without timeout=")
            if call.func.attr == "Popen" and not bounded(ast.unparse(top)):
                returned = any(isinstance(r, ast.Return) and r.value is call for r in ast.walk(top))
                callers = [ast.unparse(t) for t in tops if t is not top and any(
                    isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and c.func.id == top.name
                    for c in ast.walk(t))]
                if not (returned and callers and all(map(bounded, callers))):
                    found.append(f"line {call.lineno}: subprocess.Popen without a deadline or a wait(timeout=)")
    return sorted(set(found))


def test_the_timeout_check_finds_a_missing_timeout():
    assert subprocess_calls_without_timeout("import subprocess\ndef f():\n    subprocess.run(['x'])\n") == [
        "line 3: subprocess.run without timeout="]
    assert subprocess_calls_without_timeout("import subprocess\ndef f():\n    subprocess.Popen(['x']).wait()\n") == [
        "line 3: subprocess.Popen without a deadline or a wait(timeout=)"]
    assert subprocess_calls_without_timeout("import subprocess\ndef f():\n    subprocess.run(['x'], timeout=9)\n") == []
    helper = "import subprocess\ndef start():\n    return subprocess.Popen(['x'])\n"
    assert subprocess_calls_without_timeout(helper + "def test():\n    start().communicate(timeout=5)\n") == []
    assert subprocess_calls_without_timeout(helper + "def test():\n    start().communicate()\n") == [
        "line 3: subprocess.Popen without a deadline or a wait(timeout=)"]


@pytest.mark.parametrize("path", sorted(TESTS.rglob("*.py")), ids=lambda p: str(p.relative_to(TESTS)))
def test_every_subprocess_of_the_tests_has_a_time_limit(path):
    """A hung Snakemake, nnU-Net or SLURM daemon fails its test with its output instead of eating CI's limit."""
    assert subprocess_calls_without_timeout(path.read_text()) == []


def test_the_frozen_fixture_check_sees_a_changed_file_but_not_snakemakes_bookkeeping(tmp_path):
    from conftest import snapshot

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.json").write_text("1")
    (tmp_path / ".snakemake" / "log").mkdir(parents=True)
    before = snapshot(tmp_path)
    (tmp_path / ".snakemake" / "log" / "run.log").write_text("a dry run's log")
    assert snapshot(tmp_path) == before
    (tmp_path / "a" / "f.json").write_text("22")
    assert set(snapshot(tmp_path)) == set(before) and snapshot(tmp_path) != before
    (tmp_path / "a" / "new").write_text("")
    assert set(snapshot(tmp_path)) - set(before) == {"a/new"}
