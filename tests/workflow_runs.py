"""Helpers for tests that run the real Snakemake workflow on a copy of it in a temporary directory."""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
HIPPOCAMPUS = REPO.parent / "shared" / "datasets" / "Dataset004_Hippocampus"
BIN = Path(sys.executable).parent

# A schedule small enough for CI: one epoch of two iterations, one validation iteration.
TINY = {
    "dataset": {"demo": {"n_cases": 5}},
    "plans": {"num_processes": 1},
    "teachers": {"folds": [0], "schedule": {"epochs": 1, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1,
                                            "batch_size": 2, "save_every": 1}},
    "student": {"seeds": [0], "schedule": {"epochs": 2, "iterations_per_epoch": 2, "val_iterations_per_epoch": 1, "batch_size": 2,
                             "save_every": 1}},
    "resources": {"plan_preprocess": {"threads": 1}, "train_teacher": {"threads": 2}, "train_student": {"threads": 1}},
}


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    e["PATH"] = f"{BIN}{os.pathsep}{e.get('PATH', '')}"
    return e


def workdir(tmp_path: Path, override: dict | None = None, name: str = "wf") -> Path:
    wd = tmp_path / name
    wd.mkdir()
    shutil.copy(REPO / "Snakefile", wd)
    shutil.copy(REPO / "config.yaml", wd)
    shutil.copytree(REPO / "workflow", wd / "workflow", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "envs", wd / "envs")  # the rules name their conda envs
    (wd / "test.yaml").write_text(yaml.safe_dump(override or {}))
    return wd


#: the tier marker of the running test (set by conftest.py): a real Snakemake run needs one
CURRENT_TIER: str | None = None
#: a Snakemake run of a test longer than this is a hung run: it fails with its output
SNAKEMAKE_TIMEOUT_S = 900
#: options after which Snakemake runs no job
NO_JOBS = {"-n", "--dry-run", "--dryrun", "--lint", "--unlock", "--report", "--list-rules"}


def snakemake(wd: Path, *args, check=True, tier: str | None = None, no_jobs: bool = False,
              timeout: float = SNAKEMAKE_TIMEOUT_S) -> subprocess.CompletedProcess:
    """``snakemake --configfile test.yaml ARGS`` in ``wd``; a real run (not a dry run) only from a test that
    carries a tier marker (or a fixture that names its ``tier``), or one that must stop before any job
    (``no_jobs``: checked), and never longer than ``timeout``."""
    if not NO_JOBS & set(args) and not no_jobs and (tier or CURRENT_TIER) is None:
        raise AssertionError(f"snakemake {' '.join(args)} runs jobs: mark the test smoke, ci or extended "
                             "(tests/conftest.py)")
    cmd = [str(BIN / "snakemake"), "--configfile", "test.yaml", *args]
    try:
        run = subprocess.run(cmd, cwd=wd, env=env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"snakemake {' '.join(args)} ran over {timeout} s:\n{_text(e.stdout)[-5000:]}\n"
                             f"{_text(e.stderr)[-5000:]}") from None
    if no_jobs:
        assert "Job stats:" not in run.stdout + run.stderr, f"snakemake {' '.join(args)} ran jobs:\n{run.stderr}"
    if check and run.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed ({run.returncode}):\n{run.stdout}\n{run.stderr}")
    return run


def _text(output) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def clone(src: Path, parent: Path, name: str = "wf") -> Path:
    """A copy of the workflow folder ``src`` in ``parent/name`` with its modification times (so that what was
    up to date stays up to date), for a test that changes it: the session's fixtures stay as they were."""
    dst = parent / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def job_counts(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M) if m.group(1) != "total"}


def nnunet_env(wd: Path) -> dict:
    """``env()`` plus nnU-Net's folders of the workflow copy ``wd`` (for running commands by hand)."""
    e = env()
    for key in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        e[key] = str(wd / key)
    return e


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
