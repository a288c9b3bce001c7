"""Packaging: the console script, the shipped schema, and conda env files that agree with pyproject."""

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def pyproject():
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]


def test_dependencies_follow_the_design():
    names = {d.split(">")[0].split("=")[0].split("<")[0] for d in pyproject()["dependencies"]}
    assert {"torch", "nnunetv2", "zarr", "numcodecs", "blosc2", "snakemake", "onnx", "onnxruntime"} <= names
    assert "zarr>=3" in pyproject()["dependencies"] and "snakemake>=9" in pyproject()["dependencies"]
    assert "tensorrt" not in names
    extras = pyproject()["optional-dependencies"]
    # TensorRT 11 removed the 10.x builder API fastkd uses (BuilderFlag.FP16/INT8, layer precision, the
    # entropy calibrator): every TensorRT pin stays below 11
    trt = [d for d in extras["trt"] + extras["trt-cu12"] if d.startswith("tensorrt")]
    assert trt == ["tensorrt-cu13>=10.13,<11", "tensorrt-cu12>=10.13,<11"], trt
    assert any(d.startswith("onnxruntime-gpu") for d in extras["gpu"]) and "fastkd[trt]" in extras["gpu"]
    assert any(d.startswith("pytest") for d in extras["test"])


#: how the rule envs install fastkd itself: from the workflow's source folder (common.smk sets it)
FASTKD_FROM_SOURCE = "--no-deps -e ${FASTKD_SOURCE}"


def test_env_files_agree_with_pyproject():
    # the base dependencies and the extras' own pins (an env may install an extra, e.g. TensorRT)
    declared = set(pyproject()["dependencies"]) | {d for extra in pyproject()["optional-dependencies"].values()
                                                    for d in extra if not d.startswith("fastkd[")}
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert pip, env_file
        for requirement in pip:
            if requirement != FASTKD_FROM_SOURCE:
                assert requirement in declared, f"{env_file.name}: {requirement} differs from pyproject.toml"


def test_every_rule_names_an_env_file_that_installs_fastkd(tmp_path):
    """`snakemake --use-conda` needs a conda env per rule; conda channels are out of reach here, so the
    env files are checked, not created (docs/workflow.md: what was and was not run)."""
    from snakemake.api import SnakemakeApi
    from snakemake.settings.types import ConfigSettings, OutputSettings, ResourceSettings

    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    with SnakemakeApi(OutputSettings(quiet=True)) as api:
        workflow = api.workflow(resource_settings=ResourceSettings(cores=1), config_settings=ConfigSettings(),
                                snakefile=REPO / "Snakefile", workdir=tmp_path)._workflow
        rules = {rule.name: rule for rule in workflow.rules}
    assert {"demo_data", "plan_preprocess", "train_teacher", "teacher_manifest", "softlabels_shard",
            "softlabels_finalize", "softlabels_preview", "student_plans", "student_info", "train_student",
            "train_baseline", "student_report"} <= set(rules)
    for name, rule in rules.items():
        if rule.shellcmd is None:  # target rules run nothing
            continue
        assert rule.conda_env is not None, f"rule {name} names no conda env"
        env_file = (REPO / "workflow" / "rules" / str(rule.conda_env)).resolve()
        assert env_file.parent == REPO / "envs" and env_file.is_file(), (name, env_file)
        pip = next(d["pip"] for d in yaml.safe_load(env_file.read_text())["dependencies"] if isinstance(d, dict))
        assert FASTKD_FROM_SOURCE in pip, f"{env_file.name} does not install fastkd"


def test_snakemake_lint_finds_nothing(tmp_path):
    """`snakemake --lint` exits 1 on any finding (e.g. a rule without a log or conda env)."""
    (tmp_path / "config.yaml").write_text((REPO / "config.yaml").read_text())
    run = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "-s", str(REPO / "Snakefile"), "--lint"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr


def test_console_script_is_installed():
    fastkd = Path(sys.executable).parent / "fastkd"
    run = subprocess.run([str(fastkd), "--help"], capture_output=True, text=True, check=True, timeout=600)
    for stage in ("demo", "config", "preprocess", "teachers", "softlabels", "cache", "student"):
        assert stage in run.stdout
    for stage, actions in {"demo": ["write"], "config": ["show"], "preprocess": ["run", "adopt"],
                           "teachers": ["train", "check", "manifest"], "softlabels": ["fill", "finalize"],
                           "cache": ["info", "verify", "show"], "student": ["plans", "info", "train", "report"]}.items():
        run = subprocess.run([str(fastkd), stage, "--help"], capture_output=True, text=True, check=True, timeout=600)
        assert all(action in run.stdout for action in actions), (stage, run.stdout)


def test_schema_ships_inside_the_package():
    from fastkd.config import SCHEMA_FILE, load_schema

    assert SCHEMA_FILE.resolve() == (REPO / "workflow" / "schemas" / "config.schema.yaml").resolve()
    assert "distillation" in load_schema()["properties"]


def ci_steps(text: str) -> list[str]:
    """The commands of a bash script, one per line, without the shebang, comments and blank lines."""
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def readme_command(marker: str) -> str:
    """The one-line bash block after ``<!-- marker -->`` in the README."""
    readme = (REPO / "README.md").read_text()
    command = readme.split(f"<!-- {marker} -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert len(command.splitlines()) == 1, command
    return command


def test_ci_runs_the_readme_ci_command():
    """.ci/run is strict bash that goes to the clone's root, installs SLURM, starts from a fresh venv and then
    runs exactly the README's CI command as its last line (so `... && pytest || true` or a later step cannot
    hide it); the README's default command is the same install with plain `pytest`."""
    default, ci = readme_command("test-command"), readme_command("ci-command")
    assert default.endswith(" && pytest") and ci == default + " --tier ci", (default, ci)
    assert ci_steps((REPO / ".ci" / "run").read_text()) == [
        "set -euo pipefail", 'cd "$(dirname "$0")/.."', "bash .ci/install-slurm", "rm -rf .venv", ci]


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_commands_turn_on_torchs_huge_pages_before_torch_loads(given, expected):
    """fastkd's commands set THP_MEM_ALLOC_ENABLE=1 (unless the user set it) before torch is imported:
    torch reads it once, at its first allocation."""
    probe = ("import os, sys\n"
             "from fastkd import cli, reference_cli, reference_export\n"
             "assert 'torch' not in sys.modules, 'a command module imports torch: too early for THP'\n"
             "cli.main(['cache', 'info', '/nonexistent/store.zarr'])\n"
             "print(os.environ.get('THP_MEM_ALLOC_ENABLE'))\n")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if given is not None:
        env["THP_MEM_ALLOC_ENABLE"] = given
    run = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip().splitlines()[-1] == expected
