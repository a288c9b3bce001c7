"""Packaging: the console script, the shipped schema, and conda env files that agree with pyproject."""

import subprocess
import sys
import tomllib
from pathlib import Path

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
    assert any(d.startswith("tensorrt") for d in extras["trt"])
    assert any(d.startswith("pytest") for d in extras["test"])


def test_env_files_agree_with_pyproject():
    declared = set(pyproject()["dependencies"])
    env_files = sorted((REPO / "envs").glob("*.yaml"))
    assert env_files
    for env_file in env_files:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        assert pip, env_file
        for requirement in pip:
            assert requirement in declared, f"{env_file.name}: {requirement} differs from pyproject.toml"


def test_console_script_is_installed():
    fastkd = Path(sys.executable).parent / "fastkd"
    run = subprocess.run([str(fastkd), "--help"], capture_output=True, text=True, check=True)
    for command in ("demo-data", "config", "plan-preprocess", "train-teacher", "teachers"):
        assert command in run.stdout


def test_schema_ships_inside_the_package():
    from fastkd.config import SCHEMA_FILE, load_schema

    assert SCHEMA_FILE.resolve() == (REPO / "workflow" / "schemas" / "config.schema.yaml").resolve()
    assert "distillation" in load_schema()["properties"]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    command = readme.split("<!-- test-command -->", 1)[1].split("```bash", 1)[1].split("```", 1)[0].strip()
    assert command and command in ci
